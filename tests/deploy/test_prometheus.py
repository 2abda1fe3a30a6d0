"""deploy/prometheus/prometheus.yml: promtool accepts it, and a real Prometheus configured from
it scrapes a real gunicorn server and answers the dashboard's queries."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.settings import PROJECT_ROOT
from tests.server import free_port, gunicorn_command, running_server, server_env, stop
from tests.support import photo_paths

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

CONFIG = PROJECT_ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "dashboards" / "resnet-service.json"
JOB = "classifier"
INSTALL_HINT = "run `make deploy-tools` (apt-get install -y prometheus), which ships both"
POLL_TIMEOUT_S = 30


def binary(name: str) -> str:
    """The path of ``name``; a missing one fails the test rather than skipping it."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.fail(f"`{name}` is not installed; {INSTALL_HINT}")
    return path


def test_promtool_accepts_the_config() -> None:
    result = subprocess.run(
        [binary("promtool"), "check", "config", str(CONFIG)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_alerts_and_they_fire_as_their_cases_say() -> None:
    """tests/deploy/alerts_test.yml: each alert fires on the series it watches, and no
    sooner, or not for a healthy instance."""
    for command in (
        ["check", "rules", str(CONFIG.parent / "alerts.yml")],
        ["test", "rules", str(Path(__file__).parent / "alerts_test.yml")],
    ):
        result = subprocess.run(
            [binary("promtool"), *command], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stdout + result.stderr


def config_for(target: str) -> dict[str, Any]:
    """The deployed config with the classifier job pointed at ``target`` and scraped every
    second, the other jobs left out."""
    config = yaml.safe_load(CONFIG.read_text())
    (job,) = (job for job in config["scrape_configs"] if job["job_name"] == JOB)
    job.update(scrape_interval="1s", scrape_timeout="1s", static_configs=[{"targets": [target]}])
    config["scrape_configs"] = [job]
    config["global"] = {**config.get("global", {}), "scrape_interval": "1s"}
    return config


@contextmanager
def running_prometheus(tmp_path: Path, config: dict[str, Any]) -> Iterator[str]:
    """A Prometheus on a free loopback port with its storage in ``tmp_path``; its URL."""
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "prometheus.log"
    command = [
        binary("prometheus"),
        f"--config.file={config_path}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        poll(
            lambda: httpx.get(f"{url}/-/ready", timeout=1).status_code == 200,
            "Prometheus to be ready",
            process,
            log_path,
        )
        yield url
    finally:
        stop(process, timeout_s=10)


def poll(
    condition: Any,
    what: str,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            output = log.read_text(errors="replace") if log else ""
            raise AssertionError(f"exited with {process.returncode} waiting for {what}:\n{output}")
        try:
            if condition():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"gave up after {POLL_TIMEOUT_S} s waiting for {what}")


def query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{prometheus}/api/v1/query", params={"query": expr}, timeout=5)
    body = response.json()
    assert response.status_code == 200, f"{expr}: {body}"
    assert body["status"] == "success", f"{expr}: {body}"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def value(prometheus: str, expr: str) -> float:
    result = query(prometheus, expr)
    return float(result[0]["value"][1]) if result else 0.0


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def test_prometheus_scrapes_the_real_server(tmp_path: Path) -> None:
    binary("prometheus")  # fail before starting a server
    photo = photo_paths()[0].read_bytes()
    command = gunicorn_command(free_port())
    with running_server(tmp_path, command, server_env(tmp_path)) as server:
        for _ in range(3):
            response = httpx.post(
                f"{server.url}/cls", files={"file": ("photo.jpg", photo, "image/jpeg")}, timeout=30
            )
            assert response.status_code == 200, response.text
        target = server.url.removeprefix("http://")
        with running_prometheus(tmp_path, config_for(target)) as prometheus:
            poll(lambda: value(prometheus, f'up{{job="{JOB}"}}') == 1, f"up{{job={JOB!r}}} == 1")
            poll(
                lambda: value(prometheus, f'sum(batch_size_count{{job="{JOB}"}})') >= 1,
                "batch_size_count >= 1",
            )
            assert value(prometheus, f'sum(batch_requests_total{{job="{JOB}",outcome="ok"}})') == 3
            # Every dashboard query is valid PromQL for a real Prometheus.
            for expr in dashboard_expressions():
                query(prometheus, expr.replace("$__rate_interval", "1m"))
