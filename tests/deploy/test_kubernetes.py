"""deploy/k8s: every manifest valid against the Kubernetes API schema (strict), and wired as
the service needs: probes on its endpoints, a grace period that covers the drain, resources
for its workers, a non-root container on a read-only root, and a Service, an autoscaler and a
disruption budget that find the Deployment's pods.

The Deployment's environment is loaded through gunicorn_config.py, as in the pod, so the
figures compared here are the ones the server would use.
"""

from __future__ import annotations

import os
import re
import runpy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from service.settings import PROJECT_ROOT, Settings

pytestmark = pytest.mark.deploy

K8S_DIR = PROJECT_ROOT / "deploy" / "k8s"
KUSTOMIZATION = K8S_DIR / "kustomization.yaml"
MANIFESTS = sorted(path for path in K8S_DIR.glob("*.yaml") if path != KUSTOMIZATION)
GUNICORN_CONFIG = PROJECT_ROOT / "gunicorn_config.py"
# A release the installed kubernetes-validate has schemas for.
KUBERNETES_VERSION = "1.33"
CONTAINER = "classifier"
# Read by gunicorn (or prometheus-client), not by the service's Settings.
SERVER_ENV = {"PROMETHEUS_MULTIPROC_DIR", "FORWARDED_ALLOW_IPS"}
GIB = 2**30
# Beyond the workers: the gunicorn master, the allocator's slack.
MEMORY_HEADROOM_BYTES = 256 * 2**20
# A worker's peak growth while it decodes and preprocesses one image, per pixel: +305 MiB
# for a 40-megapixel JPEG, PNG, TIFF or BMP, and up to +636 MiB for a 16383x2441 WebP, the
# costliest kind at the default pixel limit (2026-12-01).
DECODE_BYTES_PER_PIXEL = 17
DRAIN_MARGIN_S = 5
# The idle timeout of the usual proxies in front of pods: ingress-nginx's
# upstream-keepalive-timeout, AWS and GCP load balancers.
PROXY_IDLE_TIMEOUT_S = 60

_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_FACTORS = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
_FACTORS.update({"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40})


def quantity(value: object) -> float:
    """A Kubernetes quantity (``2``, ``500m``, ``2Gi``) as a number."""
    match = _QUANTITY.match(str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    number, suffix = match.groups()
    return float(number) * (_FACTORS[suffix] if suffix else 1)


def documents(path: Path) -> list[dict[str, Any]]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def the_one(kind: str) -> dict[str, Any]:
    """The single object of ``kind`` among the manifests."""
    found = [doc for path in MANIFESTS for doc in documents(path) if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {K8S_DIR}, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = the_one("Deployment")["spec"]["template"]["spec"]
    return spec


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = the_one("Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def container() -> dict[str, Any]:
    (found,) = (c for c in pod_spec()["containers"] if c["name"] == CONTAINER)
    return dict(found)


def container_port(port: object) -> int:
    """A probe's or the Service's port (a number or a container port's name) as a number."""
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container().get("ports", []) if p.get("name") == port]
    assert named, f"no container port named {port!r}"
    return int(named[0])


def plain_env() -> dict[str, str]:
    """The container's environment, without the values that come from secrets."""
    return {var["name"]: str(var["value"]) for var in container()["env"] if "value" in var}


def selects(selector: dict[str, str]) -> bool:
    labels = pod_labels()
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


@pytest.fixture
def server_config(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """gunicorn_config.py loaded with the Deployment's environment and nothing else that
    the settings read: the pod's gunicorn settings and the service's ``settings``."""
    fields = set(Settings.model_fields)
    for name in list(os.environ):
        if name.lower() in fields or name in SERVER_ENV | {"BIND"}:
            monkeypatch.delenv(name)
    for name, value in plain_env().items():
        monkeypatch.setenv(name, value)
    try:
        return runpy.run_path(str(GUNICORN_CONFIG))
    except SystemExit as error:
        pytest.fail(f"the Deployment's environment is not a valid configuration: {error}")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda path: path.name)
def test_manifest_is_valid_against_the_kubernetes_schema(path: Path) -> None:
    """Strict: an unknown or misspelt field fails, as does a kind with no schema."""
    problems = []
    for document in documents(path):
        try:
            kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            where = ".".join(str(part) for part in error.path)
            problems.append(f"{document['kind']} at {where}: {error.message}")
        except kubernetes_validate.SchemaNotFoundError as error:
            problems.append(error.message)
    assert not problems, f"{path.name} is not valid for Kubernetes {KUBERNETES_VERSION}: {problems}"


def test_kustomization_applies_every_manifest() -> None:
    (kustomization,) = documents(KUSTOMIZATION)
    assert sorted(kustomization["resources"]) == sorted(path.name for path in MANIFESTS)


def test_environment_names_only_known_settings() -> None:
    """A misspelt variable would be ignored silently by the settings (extra="ignore")."""
    names = [var["name"] for var in container()["env"]]
    assert len(names) == len(set(names)), f"duplicate variables: {names}"
    known = {field.upper() for field in Settings.model_fields} | SERVER_ENV
    assert set(names) <= known, f"not settings of the service: {set(names) - known}"


def test_probes_use_the_service_endpoints_on_its_port(server_config: dict[str, Any]) -> None:
    settings = server_config["settings"]
    spec = container()
    (port,) = spec["ports"]
    assert port["containerPort"] == settings.port
    assert server_config["bind"].endswith(f":{settings.port}")
    probes = {
        kind: spec[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    # Ready: model loaded and warm, not draining. Live: serving and no batch stalled.
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert probes["startupProbe"]["path"] in ("/healthz", "/readyz")
    for kind, probe in probes.items():
        assert container_port(probe["port"]) == settings.port, f"{kind} probes another port"
    # Liveness is held back until the model has loaded; allow as long as gunicorn does.
    startup = spec["startupProbe"]
    assert startup["failureThreshold"] * startup["periodSeconds"] >= server_config["timeout"]


def test_the_proxy_closes_idle_connections_before_the_service(
    server_config: dict[str, Any],
) -> None:
    """Otherwise a proxy may send a request on a connection the service is closing, and a
    POST that fails so is not retried."""
    assert server_config["keepalive"] > PROXY_IDLE_TIMEOUT_S


def test_the_grace_period_covers_the_prestop_wait_and_the_drain(
    server_config: dict[str, Any],
) -> None:
    spec = pod_spec()
    command = container()["lifecycle"]["preStop"]["exec"]["command"]
    program, seconds = command
    assert program == "sleep", f"preStop is not a sleep: {command}"
    pre_stop_s = int(seconds)
    assert pre_stop_s > 0
    drain_s = server_config["settings"].drain_timeout_s
    assert "terminationGracePeriodSeconds" in spec, "the default 30 s does not cover the drain"
    grace_s = spec["terminationGracePeriodSeconds"]
    assert grace_s >= pre_stop_s + drain_s + DRAIN_MARGIN_S
    # gunicorn waits up to graceful_timeout for its workers; SIGKILL must not come sooner.
    assert grace_s >= pre_stop_s + server_config["graceful_timeout"]


def test_resources_fit_the_workers(server_config: dict[str, Any]) -> None:
    settings = server_config["settings"]
    resources = container()["resources"]
    for kind in ("cpu", "memory"):
        request = quantity(resources["requests"][kind])
        limit = quantity(resources["limits"][kind])
        assert 0 < request <= limit, f"{kind}: request {request} above limit {limit}"
    # About 1 GiB per worker at rest (ResNet18, the torch runtime), the largest images the
    # settings allow decoding at once (on every decode thread, the tasks' decode thread and
    # the model's), and the uploads under way: small ones stay in memory, 1 MiB each at most.
    assert settings.decode_threads is not None, "DECODE_THREADS must be set to the CPU limit"
    decoding_bytes = (
        (settings.decode_threads + 2) * settings.max_image_pixels * DECODE_BYTES_PER_PIXEL
    )
    worker_bytes = GIB + decoding_bytes + settings.max_uploads_in_flight_bytes
    memory_limit = quantity(resources["limits"]["memory"])
    assert memory_limit >= settings.workers * worker_bytes + MEMORY_HEADROOM_BYTES
    # The cores a container may use are not visible to os.sched_getaffinity, so the thread
    # counts are set explicitly and must fit the CPU limit.
    cpu_limit = quantity(resources["limits"]["cpu"])
    assert settings.torch_threads is not None, "TORCH_THREADS must be set to the CPU limit"
    assert settings.decode_threads is not None, "DECODE_THREADS must be set to the CPU limit"
    assert settings.workers * settings.torch_threads <= cpu_limit


def test_the_uploads_under_way_fit_the_temporary_volume(server_config: dict[str, Any]) -> None:
    """Spooled uploads are unlinked files, which the kubelet's accounting of an emptyDir
    does not see: the service's own bound must keep them within its size limit."""
    settings = server_config["settings"]
    mount = next(m for m in container()["volumeMounts"] if m["mountPath"] == "/tmp")
    (volume,) = [v for v in pod_spec()["volumes"] if v["name"] == mount["name"]]
    size_limit = quantity(volume["emptyDir"]["sizeLimit"])
    # Beside them: the metrics files, heartbeats and a request alone past the bound.
    largest_request = settings.max_batch_files * settings.max_upload_bytes
    spooled = settings.workers * (settings.max_uploads_in_flight_bytes + largest_request)
    assert spooled <= size_limit


def test_the_container_runs_as_non_root_on_a_read_only_root(
    server_config: dict[str, Any],
) -> None:
    settings = server_config["settings"]
    pod_security = pod_spec()["securityContext"]
    security = container()["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security["runAsUser"] == 10001  # the image's user (Dockerfile)
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}
    mounts = {Path(m["mountPath"]): volumes[m["name"]] for m in container()["volumeMounts"]}
    # Writable: the task database, and /tmp for the metrics files and spooled uploads.
    metrics_dir = Path(plain_env()["PROMETHEUS_MULTIPROC_DIR"])
    for needed in (Path(settings.data_dir), metrics_dir):
        assert any(needed.is_relative_to(mount) for mount in mounts), f"{needed} not writable"
    assert Path("/tmp") in mounts
    # SQLite on the pod's own disk: its locking does not hold on network file systems.
    assert "emptyDir" in mounts[Path(settings.data_dir)]


def test_the_service_routes_to_the_pods_on_the_container_port(
    server_config: dict[str, Any],
) -> None:
    settings = server_config["settings"]
    deployment = the_one("Deployment")
    service = the_one("Service")
    assert selects(deployment["spec"]["selector"]["matchLabels"])
    assert selects(service["spec"]["selector"])
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    (port,) = service["spec"]["ports"]
    assert port["port"] == 80
    assert container_port(port.get("targetPort", port["port"])) == settings.port
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(settings.port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_autoscaler_scales_the_deployment_on_cpu() -> None:
    deployment = the_one("Deployment")
    autoscaler = the_one("HorizontalPodAutoscaler")
    assert autoscaler["apiVersion"] == "autoscaling/v2"
    assert autoscaler["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    cpu_targets = [
        metric["resource"]["target"]
        for metric in autoscaler["spec"]["metrics"]
        if metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    ]
    assert len(cpu_targets) == 1
    assert cpu_targets[0]["type"] == "Utilization"
    assert 0 < cpu_targets[0]["averageUtilization"] <= 100
    # Utilisation is relative to the request, so there must be one.
    assert "cpu" in container()["resources"]["requests"]
    # Two at least, so a draining pod never leaves the Service without a ready one.
    assert 2 <= autoscaler["spec"]["minReplicas"] <= autoscaler["spec"]["maxReplicas"]
    # The autoscaler owns the count; a `replicas` here would reset it on every apply.
    assert "replicas" not in deployment["spec"]


def test_the_disruption_budget_keeps_pods_serving() -> None:
    budget = the_one("PodDisruptionBudget")
    assert selects(budget["spec"]["selector"]["matchLabels"])
    minimum = the_one("HorizontalPodAutoscaler")["spec"]["minReplicas"]
    assert budget["spec"].get("maxUnavailable", minimum) < minimum
