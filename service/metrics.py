"""Prometheus metrics: each defined once here, fed by the batch and task observers and the
HTTP middleware.

With several gunicorn workers, ``PROMETHEUS_MULTIPROC_DIR`` must be set before this module
is imported (gunicorn_config.py does it), so every worker writes its samples to files that
``render`` merges.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

# Blanks around the path are dropped, and a blank one means unset, as under gunicorn:
# prometheus_client, once imported, would write to " /x/counter_1.db", or "/counter_1.db".
if (_given := os.environ.pop("PROMETHEUS_MULTIPROC_DIR", "").strip()) != "":
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _given

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from batching import Outcome, Priority
from service.protocol import restart_while_others_serve
from service.settings import METRIC_FILE, StartRefused, prepare_metrics_dir

if _MULTIPROCESS_DIR := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    # gunicorn_config.py prepares it for gunicorn's workers. Under plain uvicorn (the
    # container image names one) the first metric below would fail on it with a traceback.
    try:
        prepare_metrics_dir(Path(_MULTIPROCESS_DIR))
    except StartRefused:
        restart_while_others_serve()  # unusable since the server started
        raise

# From half a millisecond, a GPU's forward pass (about 2 ms for 64 images on an H200) and
# a queue wait at low load, up to a minute, so requests cut off by REQUEST_TIMEOUT_MS or
# BODY_IDLE_TIMEOUT_S still land in a bucket below +Inf.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1,
    2.5,
    5,
    10,
    15,
    30,
    60,
)
# Every size up to 16, the default MAX_BATCH_SIZE: a quantile interpolates within the
# bucket it falls in, (k - 1, k], so ceil() of it is the batch size itself. Coarser above.
BATCH_SIZE_BUCKETS = (*range(1, 17), 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)

HTTP_REQUESTS = Counter(
    "http_requests_total",
    "HTTP requests by route, method and status",
    ["route", "method", "status"],
)
HTTP_LATENCY = Histogram(
    "http_request_duration_seconds",
    "Time from request start to response end, by the class of its status (2xx, 4xx, 5xx)",
    ["route", "method", "status_class"],
    buckets=LATENCY_BUCKETS_S,
)
# /cls/batch answers 200 as a whole, with each file's own status in its entry: counted here,
# a file refused (a bad image, 400) or lost (503, 504, 500) would show nowhere.
BATCH_FILES = Counter(
    "classify_batch_files_total",
    "Files of /cls/batch requests answered, by the status of each one's entry",
    ["status"],
)
QUEUE_DEPTH = Gauge(
    "batch_queue_depth",
    "Requests and claimed tasks waiting for a batch",
    multiprocess_mode="livesum",
)
BATCH_SIZE = Histogram("batch_size", "Requests per model forward pass", buckets=BATCH_SIZE_BUCKETS)
QUEUE_WAIT = Histogram(
    "batch_queue_wait_seconds",
    "Time a request waited in the queue before its batch started, by lane",
    ["lane"],
    buckets=LATENCY_BUCKETS_S,
)
BATCH_RUN = Histogram(
    "batch_inference_seconds",
    "Time one forward pass spent in the model, including host-device copies",
    ["outcome"],
    buckets=LATENCY_BUCKETS_S,
)
BATCH_ITEMS = Counter(
    "batch_requests_total", "Requests leaving the batch processor, by outcome", ["outcome"]
)
# Every outcome's series exists from the start, at 0: a panel or a rate() over one not yet
# seen shows no data rather than none happening.
for _outcome in Outcome:
    BATCH_ITEMS.labels(outcome=_outcome.value)
for _status in (200, 400, 413, 500, 503, 504):
    BATCH_FILES.labels(status=str(_status))
for _priority in Priority:
    QUEUE_WAIT.labels(lane=_priority.name.lower())
for _run_outcome in ("ok", "failed"):
    BATCH_RUN.labels(outcome=_run_outcome)
TASK_LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)
MODEL_OUT_OF_MEMORY = Counter(
    "model_out_of_memory",
    "Forward passes the model had no memory for (a batch's halves are passes of their own)",
)
TASKS_SUCCEEDED = Counter(
    "image_task_success", "Asynchronous tasks that finished with a prediction"
)
TASKS_FAILED = Counter("image_task_failure", "Asynchronous tasks that finished with an error")
TASK_LATENCY = Histogram(
    "image_task_latency_seconds",
    "Time from a task's submission to its result being stored",
    buckets=TASK_LATENCY_BUCKETS_S,
)
# Read from the shared database, so every worker sets the same value; show the latest.
TASK_QUEUE_DEPTH = Gauge(
    "task_queue_depth",
    "Tasks waiting to start (queued, not running), across all workers",
    multiprocess_mode="mostrecent",
)
WEBHOOKS_DELIVERED = Counter("webhook_success", "Webhook deliveries the receiver accepted")
WEBHOOKS_FAILED = Counter(
    "webhook_failure",
    "Webhook deliveries ended without success: attempts used up, or the receiver answered "
    "3xx or 4xx (not 408 or 429), which is not retried",
)
WEBHOOK_LATENCY = Histogram(
    "webhook_latency_seconds",
    "Time of one webhook HTTP attempt, successful or not",
    buckets=LATENCY_BUCKETS_S,
)
# Per worker (a pid label): process_* metrics are left out in multiprocess mode.
WORKER_RESIDENT = Gauge(
    "worker_resident_memory_bytes",
    "Resident memory of each live worker, read every 5 s",
    multiprocess_mode="liveall",
)
MODEL_INFO = Gauge(
    "model_info",
    "The loaded model (value is always 1)",
    ["model", "device", "dtype", "weights"],
    multiprocess_mode="livemax",
)


class PrometheusObserver:
    """Feeds the batch processor's events into the metrics above."""

    def queue_depth_changed(self, depth: int) -> None:
        QUEUE_DEPTH.set(depth)

    def batch_started(self, size: int, queue_waits_s: Sequence[tuple[Priority, float]]) -> None:
        # Apart, as they are meant to wait apart: a task may wait for minutes behind /cls.
        for priority, wait_s in queue_waits_s:
            QUEUE_WAIT.labels(lane=priority.name.lower()).observe(wait_s)

    def handler_finished(self, size: int, run_s: float, ok: bool) -> None:
        # Each forward pass, the halves of a failed batch run again included.
        BATCH_SIZE.observe(size)
        BATCH_RUN.labels(outcome="ok" if ok else "failed").observe(run_s)

    def item_finished(self, outcome: Outcome) -> None:
        BATCH_ITEMS.labels(outcome=outcome.value).inc()


class PrometheusTaskObserver:
    """Feeds the task runner's events into the task and webhook metrics."""

    def task_finished(self, succeeded: bool, latency_s: float) -> None:
        (TASKS_SUCCEEDED if succeeded else TASKS_FAILED).inc()
        TASK_LATENCY.observe(latency_s)

    def task_queue_depth_changed(self, depth: int) -> None:
        TASK_QUEUE_DEPTH.set(depth)

    def webhook_attempted(self, duration_s: float) -> None:
        WEBHOOK_LATENCY.observe(duration_s)

    def webhook_finished(self, delivered: bool) -> None:
        (WEBHOOKS_DELIVERED if delivered else WEBHOOKS_FAILED).inc()


def record_model(model: str, device: str, dtype: str, weights: str) -> None:
    """Publish which model this worker serves."""
    MODEL_INFO.labels(model=model, device=device, dtype=dtype, weights=weights).set(1)


# The methods the API takes; any other (the parser knows some thirty) is counted as
# "other", so that clients cannot multiply the series.
LABELLED_METHODS = frozenset({"GET", "HEAD", "POST", "DELETE", "OPTIONS"})


def record_resident_memory(resident_bytes: int) -> None:
    """This worker's resident memory now."""
    WORKER_RESIDENT.set(resident_bytes)


def record_request(route: str, method: str, status: int, duration_s: float) -> None:
    """Count one finished HTTP request."""
    method = method if method in LABELLED_METHODS else "other"
    HTTP_REQUESTS.labels(route=route, method=method, status=str(status)).inc()
    # A class, not the status: instant refusals (503) apart from answers, few series.
    HTTP_LATENCY.labels(route=route, method=method, status_class=f"{status // 100}xx").observe(
        duration_s
    )


def record_batch_files(statuses: Iterable[int]) -> None:
    """Count the files of one answered /cls/batch request, by their entries' statuses."""
    for status in statuses:
        BATCH_FILES.labels(status=str(status)).inc()


def record_refused_by_server(status: int) -> None:
    """Count an answer the HTTP protocol gave before a request reached the app (bytes that
    are not HTTP, a head too large or too slow): route "unmatched", method "-"."""
    HTTP_REQUESTS.labels(route="unmatched", method="-", status=str(status)).inc()


class _WorkersFiles(Collector):
    """The workers' samples, merged from their files as prometheus_client's multiprocess
    collector does, but from its files alone: the directory may hold others, ``.db`` ones
    too, and that collector fails the whole scrape on any it cannot read as its own."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def collect(self) -> Iterable[Metric]:
        if not self._path.is_dir():  # removed by a cleaner of /tmp, say: no scrape passes
            raise ValueError(f"PROMETHEUS_MULTIPROC_DIR={self._path} is not a directory")
        # gunicorn_config.py's child_exit deletes the files of a worker that counted
        # nothing, which may come between listing the files and reading them: list again.
        for _ in range(2):
            with contextlib.suppress(FileNotFoundError):
                return multiprocess.MultiProcessCollector.merge(self._files(), accumulate=True)
        return multiprocess.MultiProcessCollector.merge(self._files(), accumulate=True)

    def _files(self) -> list[str]:
        """The metric files, but any a worker has only just created: empty until it sizes
        it, it would fail the scrape, and it holds no sample yet."""
        files = []
        for file in self._path.glob("*.db"):
            with contextlib.suppress(FileNotFoundError):
                if METRIC_FILE.fullmatch(file.name) and file.stat().st_size > 0:
                    files.append(str(file))
        return files


def forget_this_process() -> None:
    """Remove this process's live gauges from ``PROMETHEUS_MULTIPROC_DIR`` as it stops,
    where no gunicorn master does it (``child_exit``): the process that follows it there,
    after uvicorn's ``--reload`` say, would report them beside its own."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.mark_process_dead(os.getpid())


def render() -> tuple[bytes, str]:
    """The exposition text for ``/metrics`` and its content type, merged across workers."""
    if path := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        registry.register(_WorkersFiles(Path(path)))
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
