"""The Grafana dashboard asks only for metrics the service really exports, and for all of them."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from prometheus_client import metrics as prometheus_metrics
from prometheus_client.parser import text_string_to_metric_families

from service import metrics as service_metrics
from service.settings import PROJECT_ROOT
from tests.support import make_settings, photo_paths, running_app

pytestmark = pytest.mark.deploy

DASHBOARD = PROJECT_ROOT / "deploy" / "grafana" / "dashboards" / "resnet-service.json"
DATASOURCES = PROJECT_ROOT / "deploy" / "grafana" / "provisioning" / "datasources"
# Series Prometheus makes itself for every target, and the labels it adds to every sample.
SCRAPE_SERIES = {"up": frozenset({"job", "instance"})}
TARGET_LABELS = frozenset({"job", "instance"})
# The panels the dashboard must have, each named by the sample it cannot do without.
REQUIRED_SAMPLES = {
    "request rate by route and status": "http_requests_total",
    "request latency": "http_request_duration_seconds_bucket",
    "batch size distribution": "batch_size_bucket",
    "mean batch size": "batch_size_sum",
    "batches per second": "batch_size_count",
    "queue depth": "batch_queue_depth",
    "queue wait": "batch_queue_wait_seconds_bucket",
    "inference time": "batch_inference_seconds_bucket",
    "batcher outcomes": "batch_requests_total",
    "/cls/batch files by status": "classify_batch_files_total",
    "tasks succeeded": "image_task_success_total",
    "tasks failed": "image_task_failure_total",
    "task latency": "image_task_latency_seconds_bucket",
    "task queue depth": "task_queue_depth",
    "webhooks delivered": "webhook_success_total",
    "webhooks given up": "webhook_failure_total",
    "webhook latency": "webhook_latency_seconds_bucket",
    "worker memory": "worker_resident_memory_bytes",
}
QUANTILE_HISTOGRAMS = (
    "http_request_duration_seconds",
    "batch_size",
    "batch_queue_wait_seconds",
    "batch_inference_seconds",
    "image_task_latency_seconds",
    "webhook_latency_seconds",
)

_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_RANGE = re.compile(r"\[[^\]]*\]")
_TOKEN = re.compile(r"(?<![\w.:$])([a-zA-Z_:][\w:]*)\s*(\{[^}]*\})?\s*(\()?")
_MATCHER = re.compile(r"(\w+)\s*(?:=~|!~|!=|=)")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "atan2", "bool", "offset", "inf", "nan"}
    | {"by", "without", "on", "ignoring", "group_left", "group_right"}
)


@dataclass(frozen=True)
class Query:
    """What one PromQL expression refers to."""

    selectors: tuple[tuple[str, frozenset[str]], ...]  # metric name, labels it matches on
    grouping_labels: frozenset[str]

    @property
    def metrics(self) -> set[str]:
        return {name for name, _ in self.selectors}


def parse(expr: str) -> Query:
    """The metric names, matcher labels and grouping labels of a PromQL expression.

    Enough PromQL for dashboards: string literals, range and subquery brackets (Grafana's
    ``$__rate_interval`` included) and grouping clauses are removed first; what is left that
    is not followed by ``(`` (a function or aggregation) and is not a keyword is a metric.
    """
    text = _STRING.sub('""', expr)
    grouping = {label.strip() for labels in _GROUPING.findall(text) for label in labels.split(",")}
    text = _RANGE.sub("", _GROUPING.sub(" ", text))
    selectors = []
    for name, matchers, call in _TOKEN.findall(text):
        if call or name in _KEYWORDS:
            continue
        selectors.append((name, frozenset(_MATCHER.findall(matchers))))
    return Query(tuple(selectors), frozenset(grouping) - {""})


def test_the_promql_reader_understands_dashboard_expressions() -> None:
    query = parse(
        "histogram_quantile(0.95, sum by (le, route) (rate(http_request_duration_seconds_bucket"
        '{route!~"/metrics|/healthz", method="POST"}[$__rate_interval])))'
        " / on (route) group_left sum(rate(x_total[5m] offset 1h)) > bool 0"
    )
    assert query.selectors == (
        ("http_request_duration_seconds_bucket", frozenset({"route", "method"})),
        ("x_total", frozenset()),
    )
    assert query.grouping_labels == {"le", "route"}


def load_dashboard() -> dict[str, Any]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert isinstance(dashboard, dict)
    return dashboard


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included; rows themselves left out."""
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def expressions() -> list[str]:
    return [t["expr"] for p in panels(load_dashboard()) for t in p.get("targets", [])]


def provisioned_uid() -> str:
    (path,) = DATASOURCES.glob("*.yml")
    (datasource,) = yaml.safe_load(path.read_text())["datasources"]
    return str(datasource["uid"])


async def exposition() -> str:
    """/metrics of an in-process app after one /cls request and one finished task, so the
    labelled series exist too."""
    photo = photo_paths()[0].read_bytes()
    upload = {"file": ("photo.jpg", photo, "image/jpeg")}
    async with running_app(make_settings()) as served:
        assert (await served.client.post("/cls", files=upload)).status_code == 200
        submitted = await served.client.post("/tasks", files=upload)
        assert submitted.status_code == 202, submitted.text
        status_url = f"/task-status/{submitted.json()['task_id']}"
        async with asyncio.timeout(30):
            while (await served.client.get(status_url)).json()["status"] != "succeeded":
                await asyncio.sleep(0.05)
        response = await served.client.get("/metrics")
        assert response.status_code == 200
        return response.text


@pytest.fixture(scope="module")
def exported() -> dict[str, frozenset[str]]:
    """Sample name -> its label names, as the service exports them."""
    samples: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(asyncio.run(exposition())):
        for sample in family.samples:
            samples.setdefault(sample.name, set()).update(sample.labels)
    return {name: frozenset(labels) for name, labels in samples.items()}


def test_every_metric_on_the_dashboard_is_exported(exported: dict[str, frozenset[str]]) -> None:
    known = {**exported, **SCRAPE_SERIES}
    for expr in expressions():
        for name, labels in parse(expr).selectors:
            assert name in known, f"{name} is not exported by the service; in: {expr}"
            unknown = labels - known[name] - TARGET_LABELS
            assert not unknown, f"{name} has no label {sorted(unknown)}; in: {expr}"


def test_every_grouping_label_exists_on_the_queried_metrics(
    exported: dict[str, frozenset[str]],
) -> None:
    known = {**exported, **SCRAPE_SERIES}
    for expr in expressions():
        query = parse(expr)
        available = set(TARGET_LABELS).union(*(known[name] for name in query.metrics))
        missing = query.grouping_labels - available
        assert not missing, f"grouping by {sorted(missing)}, which no metric has: {expr}"


@pytest.mark.parametrize(("topic", "sample"), REQUIRED_SAMPLES.items())
def test_the_dashboard_covers(topic: str, sample: str) -> None:
    used = set().union(*(parse(expr).metrics for expr in expressions()))
    assert sample in used, f"no panel for {topic} (no query uses {sample})"


def test_every_service_metric_is_on_the_dashboard() -> None:
    """A metric added to service/metrics.py needs a panel too."""
    families = {
        metric.describe()[0].name
        for metric in vars(service_metrics).values()
        if isinstance(metric, prometheus_metrics.MetricWrapperBase)
    }
    used = set().union(*(parse(expr).metrics for expr in expressions()))
    suffixes = ("", "_total", "_bucket", "_sum", "_count")
    missing = {f for f in families if not any(f + suffix in used for suffix in suffixes)}
    assert not missing, f"service metrics with no panel: {sorted(missing)}"


@pytest.mark.parametrize("histogram", QUANTILE_HISTOGRAMS)
def test_histograms_show_p50_p95_and_p99(histogram: str) -> None:
    shown = {
        float(match.group(1))
        for expr in expressions()
        if (match := re.search(r"histogram_quantile\(\s*([\d.]+)\s*,", expr))
        and f"{histogram}_bucket" in parse(expr).metrics
    }
    assert {0.5, 0.95, 0.99} <= shown, f"{histogram}: quantiles shown {sorted(shown)}"


def test_errors_are_shown_by_status() -> None:
    assert any(
        "http_requests_total" in parse(expr).metrics
        and re.search(r'status=~"4\.\.\|5\.\."', expr)
        and "status" in parse(expr).grouping_labels
        for expr in expressions()
    )


def test_every_panel_uses_the_provisioned_datasource() -> None:
    dashboard = load_dashboard()
    uid = provisioned_uid()
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == "resnet-service"
    ids = [panel["id"] for panel in dashboard["panels"]] + [
        nested["id"] for row in dashboard["panels"] for nested in row.get("panels", [])
    ]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels(dashboard):
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": uid}, title
        assert panel["targets"], f"{title} has no query"
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"])["uid"] == uid, title
            assert target["expr"].strip(), title
        grid = panel["gridPos"]
        assert grid["x"] >= 0, title
        assert grid["x"] + grid["w"] <= 24, f"{title} is wider than the grid"
