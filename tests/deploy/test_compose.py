"""The compose stack: valid against the Compose Specification, and wired together.

No Docker engine runs here; the files are checked against the vendored compose-spec schema
(deploy/schema/SOURCE.md says where it comes from) and against each other.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from jsonschema import Draft202012Validator, validators

from service.settings import PROJECT_ROOT, Settings

pytestmark = pytest.mark.deploy

SCHEMA_DIR = PROJECT_ROOT / "deploy" / "schema"
BASE = PROJECT_ROOT / "docker-compose.yml"
GPU = PROJECT_ROOT / "docker-compose.gpu.yml"
PROMETHEUS_CONFIG = PROJECT_ROOT / "deploy" / "prometheus" / "prometheus.yml"
INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def load(path: Path) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text())
    assert isinstance(document, dict), f"{path.name} is not a mapping"
    return document


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def merged_gpu_stack() -> dict[str, Any]:
    return deep_merge(load(BASE), load(GPU))


def interpolated(value: object) -> str:
    """A compose value with ``${VAR:-default}`` replaced by its default, as with VAR unset."""
    return INTERPOLATION.sub(lambda match: match.group(2) or "", str(value))


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: interpolated(value) for key, value in env.items()}


def duration_s(text: str) -> float:
    """A compose duration (``40s``, ``1m30s``, ``500ms``) in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", text)
    assert parts, f"not a duration: {text!r}"
    assert "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def bind_mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (short and long syntax)."""
    mounts: dict[str, Path] = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            if source.startswith((".", "/")):
                mounts[target] = (PROJECT_ROOT / source).resolve()
        elif volume.get("type") == "bind":
            mounts[volume["target"]] = (PROJECT_ROOT / volume["source"]).resolve()
    return mounts


def host_path(service: dict[str, Any], container_path: str) -> Path:
    """Where a path inside the container comes from on the host, through a bind mount."""
    for target, source in bind_mounts(service).items():
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            return source / Path(container_path).relative_to(target)
    raise AssertionError(f"{container_path} is not inside any bind mount of the service")


@pytest.fixture(scope="module")
def validator() -> Draft202012Validator:
    schema = json.loads((SCHEMA_DIR / "compose-spec.json").read_text())
    # The schema declares draft 2020-12 and relies on its unevaluatedProperties to refuse
    # unknown keys; a Draft 7 validator would silently accept misspelt ones.
    cls = validators.validator_for(schema)
    assert cls is Draft202012Validator
    cls.check_schema(schema)
    return cls(schema)


def schema_errors(validator: Draft202012Validator, document: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
        for error in sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
    ]


def test_the_vendored_schema_is_the_one_its_source_note_names() -> None:
    digest = hashlib.sha256((SCHEMA_DIR / "compose-spec.json").read_bytes()).hexdigest()
    assert digest in (SCHEMA_DIR / "SOURCE.md").read_text(), (
        "deploy/schema/compose-spec.json changed; update SOURCE.md with its origin and hash"
    )
    assert (SCHEMA_DIR / "LICENSE.compose-spec").is_file()


@pytest.mark.parametrize(
    "document",
    [
        pytest.param(lambda: load(BASE), id="docker-compose.yml"),
        pytest.param(lambda: load(GPU), id="docker-compose.gpu.yml"),
        pytest.param(merged_gpu_stack, id="docker-compose.yml+gpu"),
    ],
)
def test_compose_files_follow_the_compose_specification(
    validator: Draft202012Validator, document: Any
) -> None:
    assert schema_errors(validator, document()) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("services", "classifier", "stop_grace_periods"), "40s"),
        (("services", "grafana", "depends_on", "prometheus", "condition"), "service_healty"),
        (("services", "prometheus", "ports"), "9090"),
    ],
)
def test_the_schema_refuses_what_compose_would_refuse(
    validator: Draft202012Validator, path: tuple[str, ...], value: object
) -> None:
    """A misspelt key or a wrong value is caught, so the checks above have teeth."""
    document = load(BASE)
    node = document
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert schema_errors(validator, document)


def test_every_bind_mount_source_exists() -> None:
    for name, service in merged_gpu_stack()["services"].items():
        for target, source in bind_mounts(service).items():
            assert source.exists(), f"{name}: {source} (mounted at {target}) does not exist"


def test_every_service_environment_variable_is_a_setting() -> None:
    """A misspelt variable would be ignored by the service; the values must also validate."""
    for path in (BASE, GPU):
        env = environment(load(path)["services"]["classifier"])
        unknown = {key for key in env if key.lower() not in Settings.model_fields}
        assert not unknown, f"{path.name}: {sorted(unknown)} are not settings (see README)"
    merged = environment(merged_gpu_stack()["services"]["classifier"])
    Settings(**{key.lower(): value for key, value in merged.items()})


def test_prometheus_scrapes_the_classifier_every_5_s() -> None:
    stack = load(BASE)
    prometheus = stack["services"]["prometheus"]
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"])
    config_path = host_path(prometheus, "/etc/prometheus/prometheus.yml")
    assert config_path == PROMETHEUS_CONFIG
    assert any(
        re.fullmatch(r"\./deploy/prometheus/prometheus\.yml:/etc/prometheus/prometheus\.yml:ro", v)
        for v in prometheus["volumes"]
        if isinstance(v, str)
    ), "the Prometheus config is not mounted read-only"

    config = load(config_path)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    classifier_port = stack["services"]["classifier"]["ports"][0].rsplit(":", 1)[-1]
    job = jobs["classifier"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"classifier:{classifier_port}"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert duration_s(job["scrape_interval"]) == 5


def test_grafana_provisions_the_datasource_and_the_dashboard() -> None:
    stack = load(BASE)
    grafana = stack["services"]["grafana"]
    assert re.fullmatch(r"grafana/grafana:\d+\.\d+\.\d+", grafana["image"])
    assert "127.0.0.1:3000:3000" in grafana["ports"]  # admin/admin until its password is set

    datasources = load(host_path(grafana, "/etc/grafana/provisioning/datasources/prometheus.yml"))
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["uid"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert "prometheus" in stack["services"]

    providers = load(host_path(grafana, "/etc/grafana/provisioning/dashboards/dashboards.yml"))
    (provider,) = providers["providers"]
    dashboards = host_path(grafana, provider["options"]["path"])
    assert (dashboards / "resnet-service.json").is_file()
    home = environment(grafana)["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert host_path(grafana, home) == dashboards / "resnet-service.json"


def test_grafana_is_read_only_for_anonymous_viewers_and_its_password_comes_from_the_env() -> None:
    grafana = load(BASE)["services"]["grafana"]
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert INTERPOLATION.fullmatch(env["GF_SECURITY_ADMIN_PASSWORD"]), (
        "the admin password must come from the environment (GRAFANA_ADMIN_PASSWORD)"
    )


def test_health_conditions_wait_for_services_that_have_a_healthcheck() -> None:
    services = merged_gpu_stack()["services"]
    for name, service in services.items():
        assert "healthcheck" in service, f"{name} has no healthcheck"
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services, f"{name} depends on unknown {dependency}"
            if condition["condition"] == "service_healthy":
                assert "healthcheck" in services[dependency]
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_the_gpu_override_reserves_an_nvidia_gpu_and_builds_for_cuda() -> None:
    base = load(BASE)["services"]["classifier"]
    classifier = merged_gpu_stack()["services"]["classifier"]
    devices = classifier["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices
    env = environment(classifier)
    assert env["DEVICE"] == "cuda"
    assert env["DTYPE"] in ("float16", "bfloat16")
    assert int(env["MAX_BATCH_SIZE"]) > int(environment(base)["MAX_BATCH_SIZE"])
    assert classifier["build"]["args"]["TORCH_VARIANT"] == "cuda"
    assert re.search(r"^ARG TORCH_VARIANT=", (PROJECT_ROOT / "Dockerfile").read_text(), re.M)
    assert classifier["image"] != base["image"], "the CUDA image would overwrite the CPU one"


def test_the_gpu_stack_leaves_time_for_the_drain() -> None:
    """tests/test_container.py checks docker-compose.yml; the override must not undo it."""
    classifier = merged_gpu_stack()["services"]["classifier"]
    drain_s = float(environment(classifier).get("DRAIN_TIMEOUT_S", Settings().drain_timeout_s))
    assert duration_s(classifier["stop_grace_period"]) >= drain_s + 10
