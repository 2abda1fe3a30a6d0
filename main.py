"""The HTTP service: routes, lifespan, middleware and the answers to errors, in front of the
worker's ``service.core.Service``.

Run it with ``gunicorn main:app -c gunicorn_config.py`` (production) or ``make dev``
(development: uvicorn with the service's HTTP protocol, as the README shows).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import multiprocessing
import os
import re
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from contextlib import asynccontextmanager
from decimal import Decimal
from functools import partial
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from batching import (
    Priority,
    QueueFull,
    Stopped,
)
from classification import (
    ModelLoadError,
)
from service import logs, metrics, webhooks
from service.core import Service
from service.errors import (
    ERROR_STATUS,
    ClientDisconnected,
    NotReady,
    ThreadsUnavailable,
    status_and_detail,
)
from service.middleware import (
    INTERNAL_ERROR,
    NO_BOUNDARY,
    REQUEST_ID_HEADER,
    REQUEST_TIMEOUT_HEADER,
    RETRY_AFTER_S,
    ApiKeyMiddleware,
    BodyLimitsMiddleware,
    JsonCorsMiddleware,
    RequestContextMiddleware,
    ShedWhileFullMiddleware,
    UploadsInFlight,
    matching_route,
    serves,
)
from service.protocol import (
    DRAIN_TIMEOUT_STATE,
    EXIT_BOOT_ERROR,
    EXIT_RESTART,
    LIVENESS_STATE,
    REQUEST_ID_STATE,
    SHUTDOWN_HOOK,
    SHUTTING_DOWN,
    SIBLINGS_STATE,
    UPLOAD_END_STATE,
    pause_then_restart,
    raise_open_file_limit,
    restart_pause_s,
    restart_while_others_serve,
)
from service.schemas import (
    ANY_OTHER_ERROR,
    BATCH_HEADERS,
    METRICS_RESPONSES,
    READY_PROBE_HEADERS,
    TASK_ACCEPTED_HEADERS,
    BatchEntry,
    BatchResponse,
    ClassifyResponse,
    ProbeOut,
    TaskAccepted,
    TaskOut,
    describe_uploads_as_files,
    document_the_api_key,
    documentation_paths,
    error_responses,
    predictions_out,
    task_response,
)
from service.settings import (
    Settings,
    StartRefused,
    load_settings,
    misspelt_settings,
    settings_to_warn_of,
)
from service.siblings import Siblings
from service.task_fields import (
    IDEMPOTENCY_KEY_SCHEMA,
    InvalidTaskField,
    TaskNotFound,
    idempotency_key_in,
    parse_metadata,
    valid_task_id,
)
from service.tasks import (
    DATABASE_NAME,
    TaskQueueFull,
    TaskStoreFailed,
    TaskStoreUnavailable,
)

logger = logging.getLogger("service")
T = TypeVar("T")

# The model's routes: a model served in classification's place renames them here.
CLASSIFY_ROUTE = "/cls"
CLASSIFY_BATCH_ROUTE = "/cls/batch"
TASKS_ROUTE = "/tasks"
# Multipart framing (boundaries, part headers) on top of the file bytes themselves.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_OTHER_BODY_BYTES = 64 * 1024
DEFAULT_TOP_K = 5
# Probes and scrapers reach these without the API key.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


def _refusal_before_upload(service: Service, path: str) -> str | None:
    """Why an upload to ``path`` would be refused for a full queue now; None to read it."""
    if path in (CLASSIFY_ROUTE, CLASSIFY_BATCH_ROUTE):
        return service.queue_refusal(counted=path == CLASSIFY_ROUTE)
    if path == TASKS_ROUTE:
        return service.submission_refusal()
    return None


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


async def _one_file_named_file(request: Request) -> None:
    """Refuse a form with several ``file`` entries (an image and a plain field, say): FastAPI
    binds the last one, so by their order it would serve the image, refuse the field, or
    take an empty entry for no file at all. Refuse a second image under another name, and
    name a file sent under another name (``image``, ``upload``) where ``file`` is missing.
    An empty file part under another name (a browser form's file input left empty) is no
    image, and is ignored. Runs before the form's fields are validated."""
    form = await request.form()  # parsed already, with the route's limits, and kept
    if request.url.path == TASKS_ROUTE and any(
        name in ("metadata", "callback_url") and isinstance(part, StarletteUploadFile)
        for name, part in form.multi_items()
    ):  # even empty: the advice to send them as plain fields is the answer
        raise StarletteHTTPException(400, _takes_one_file(request.url.path))
    entries = form.getlist("file")
    images_elsewhere = _images_not_named_file(form)
    images_named_file = sum(
        isinstance(entry, StarletteUploadFile) and bool(entry.size) for entry in entries
    )
    if images_named_file > 1 or (images_named_file and images_elsewhere):
        raise StarletteHTTPException(400, _takes_one_file(request.url.path))
    if len(entries) > 1:
        several = (
            f"to {CLASSIFY_BATCH_ROUTE}" if request.url.path == CLASSIFY_ROUTE else "as a task each"
        )
        message = (
            f"was sent {len(entries)} times; send one image, as one file part (several {several})"
        )
        raise RequestValidationError([{"loc": ("body", "file"), "msg": message}])
    if images_elsewhere:  # and no image named "file"
        message = "a file under another name than 'file'; send the image as a part named 'file'"
        name = logs.shortened(images_elsewhere[0], 64)
        raise RequestValidationError([{"loc": ("body", name), "msg": message}])


def _images_not_named_file(form: FormData) -> list[str]:
    """The names of the form's non-empty file parts not named ``file`` (an empty one is a
    browser form's file input left empty, no image)."""
    return [
        name
        for name, part in form.multi_items()
        if name != "file" and isinstance(part, StarletteUploadFile) and part.size
    ]


def _takes_one_file(path: str) -> str:
    """What /cls and /tasks say to a form of several images."""
    if path == TASKS_ROUTE:
        return (
            f"{TASKS_ROUTE} takes one file, the `file` part (submit a task for each image); "
            "send `metadata` and `callback_url` as plain fields, not files "
            "(curl -F 'metadata=<m.json', not -F metadata=@m.json)"
        )
    return f"{path} takes one file; send several to {CLASSIFY_BATCH_ROUTE}"


def _top_k(request: Request, requested: int | None) -> int:
    """How many classes to return: as requested, at most the model's class count, and sent
    at most once (FastAPI takes the last of repeated values, which would answer another
    question than the one asked); DEFAULT_TOP_K (or every class of a model with fewer)
    when not asked."""
    if (sent := len(request.query_params.getlist("top_k"))) > 1:
        raise RequestValidationError(
            [{"loc": ("query", "top_k"), "msg": f"was sent {sent} times; send it at most once"}]
        )
    written = request.query_params.get("top_k")
    if written is not None and not (written.isascii() and written.isdigit()):
        # Python's int() reads "+3", " 3" and "1_0" too: a typo then answers another count.
        message = f"must be a whole number in digits only; got {written[:20]!r}"
        raise RequestValidationError([{"loc": ("query", "top_k"), "msg": message}])
    for name in request.query_params:
        # TOP_K, top-k, and top_k[] as clients that send arrays spell it.
        if name != "top_k" and "".join(filter(str.isalnum, name.lower())) == "topk":
            # Ignored, it would answer with the default number of classes without a word.
            message = "is not a parameter of this route; did you mean top_k?"
            raise RequestValidationError(
                [{"loc": ("query", logs.shortened(name, 64)), "msg": message}]
            )
    classes = _service(request).num_classes()
    if requested is None:
        return min(DEFAULT_TOP_K, classes)
    if requested > classes:
        message = f"must be at most {classes}, the model's class count; got {requested}"
        raise RequestValidationError([{"loc": ("query", "top_k"), "msg": message}])
    return requested


def _deadline(request: Request, service: Service, own_timeout: str | None = None) -> float:
    """REQUEST_TIMEOUT_MS, or the request's own time limit (``own_timeout``, its header's
    value) where shorter, from the end of the upload: from when its last byte arrived,
    where the HTTP protocol says (not in a test's in-process transport), not from when the
    handler got to it, which a busy event loop delays."""
    ended_at = request.scope.get("state", {}).get(UPLOAD_END_STATE, time.monotonic())
    timeout_ms = service.settings.request_timeout_ms
    if own_timeout is not None:
        own_timeout_ms = _milliseconds(request, own_timeout)
        if own_timeout_ms < timeout_ms:
            timeout_ms = own_timeout_ms
            # For its 504's message, in plain digits: a float prints 0.000000001 as 1e-09.
            request.state.own_timeout = format(Decimal(own_timeout.strip(" \t")).normalize(), "f")
    return float(ended_at) + timeout_ms / 1000


def _milliseconds(request: Request, written: str) -> float:
    """The request's own time limit, as its header gives it once, in digits, above 0."""
    message = None
    if (sent := len(request.headers.getlist(REQUEST_TIMEOUT_HEADER))) > 1:
        # One of them would be taken and the others ignored, unseen.
        message = f"was sent {sent} times; send it at most once"
    elif not MILLISECONDS.fullmatch(written := written.strip(" \t")) or float(written) == 0:
        # (httptools leaves blanks at a field value's end, which HTTP does not count.)
        message = (
            "must be a number of milliseconds above 0, in digits (250 or 12.5; at most 12 "
            f"before the point and 9 after); got {logs.shortened(_as_written(written), 20)!r}"
        )
    if message is not None:
        raise RequestValidationError([{"loc": ("header", REQUEST_TIMEOUT_HEADER), "msg": message}])
    return float(written)


def _as_written(header_value: str) -> str:
    """A header's value as its client wrote it, where that was UTF-8: its bytes are read as
    Latin-1, which would echo Arabic-Indic digits back as mojibake."""
    try:
        return header_value.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return header_value


def _own_timeout(request: Request) -> str | None:
    """The request's own time limit in milliseconds, as sent, where it set one shorter
    than REQUEST_TIMEOUT_MS."""
    own_timeout: str | None = getattr(request.state, "own_timeout", None)
    return own_timeout


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first.

    The body has been read by now, so the next ASGI message is the disconnect (or nothing,
    until the response is sent). Cancelling drops the request from the queue before its
    batch forms, so no model time is spent on an answer nobody will read.
    """
    task = asyncio.ensure_future(work)

    async def cancel_on_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        task.cancel()

    watcher = asyncio.create_task(cancel_on_disconnect())
    try:
        return await task
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            raise ClientDisconnected(
                "the client disconnected before the answer was ready"
            ) from None
        raise
    finally:
        watcher.cancel()


ImageFile = Annotated[UploadFile, File(description="The image: JPEG, PNG, GIF, WebP, BMP or TIFF")]
TopK = Annotated[
    int | None,
    Query(
        ge=1,
        description=f"How many classes to return, at most the model's class count "
        f"(default {DEFAULT_TOP_K})",
    ),
]

# Milliseconds in digits: no sign, exponent, "_" or "inf", which Python's float() would
# read too.
MILLISECONDS = re.compile(r"[0-9]{1,12}(\.[0-9]{1,9})?")
RequestTimeout = Annotated[
    str | None,
    Header(
        alias=REQUEST_TIMEOUT_HEADER,
        description="This request's own time limit in milliseconds (250, 12.5), counted as "
        "REQUEST_TIMEOUT_MS is, from the end of the upload; the shorter of the two applies",
        json_schema_extra={"pattern": MILLISECONDS.pattern, "examples": ["250"]},
    ),
]


# The form fields of POST /tasks.
TASK_FORM_FIELDS = ("file", "callback_url", "metadata")


def _refuse_what_the_form_would_ignore(form: FormData) -> None:
    """``top_k`` sent as a form field would be ignored, and the caller get the default
    number of classes without a word; a file part's Content-Transfer-Encoding (base64, say)
    is not undone (RFC 7578 drops it), and its image would be read as corrupt."""
    if "top_k" in form:
        message = "sent in the form, where it is not read; send it in the URL (?top_k=3)"
        raise RequestValidationError([{"loc": ("body", "top_k"), "msg": message}])
    for name, part in form.multi_items():
        if not isinstance(part, StarletteUploadFile) or not part.size:  # empty: ignored
            continue
        encoding = part.headers.get("content-transfer-encoding", "binary").strip().lower()
        if encoding not in ("binary", "8bit", "7bit"):
            raise StarletteHTTPException(
                400,
                f"the part '{logs.shortened(name, 64)}' is sent with Content-Transfer-Encoding "
                f"{logs.shortened(encoding, 32)}, which is not decoded: send the file's bytes as "
                "they are, with no such header (RFC 7578)",
            )


async def classify(
    request: Request,
    file: ImageFile,
    top_k: TopK = None,
    timeout_header: RequestTimeout = None,
) -> ClassifyResponse:
    """Classify one image; the top ``top_k`` ImageNet classes, best first."""
    service = _service(request)
    top_k = _top_k(request, top_k)
    _refuse_what_the_form_would_ignore(await request.form())
    predictions = await _unless_disconnected(
        request, service.classify(file, top_k, _deadline(request, service, timeout_header))
    )
    return ClassifyResponse(prediction=predictions_out(predictions))


async def classify_batch(
    request: Request,
    response: Response,
    # Optional for FastAPI, which drops the parts with an empty name and body (a browser's
    # file input with no file chosen) and would call a form of only those a form without
    # files; each part gets its entry, at its own index, from the form itself.
    file: Annotated[
        list[UploadFile] | None, File(description="One or more images, as repeated parts")
    ] = None,
    top_k: TopK = None,
    timeout_header: RequestTimeout = None,
) -> BatchResponse:
    """Classify several images; one entry per file, in order, each with its own status."""
    service = _service(request)
    top_k = _top_k(request, top_k)
    deadline = _deadline(request, service, timeout_header)
    form = await request.form()  # parsed already, for ``file``
    _refuse_what_the_form_would_ignore(form)
    # Any would be left out of the answer, and the caller miss an image it sent.
    if stray := _images_not_named_file(form):
        message = "a file under another name than 'file'; send each image as a part named 'file'"
        raise RequestValidationError(
            [{"loc": ("body", logs.shortened(stray[0], 64)), "msg": message}]
        )
    uploads = [part for part in form.getlist("file") if isinstance(part, StarletteUploadFile)]
    if not uploads:
        raise RequestValidationError(
            [{"type": "missing", "loc": ("body", "file"), "msg": "Field required", "input": None}]
        )
    # Refused whole, as /cls is: a 200 of refused entries would look like success.
    service.refuse_unless_classifying()
    outcomes = await _unless_disconnected(
        request,
        asyncio.gather(
            # Behind single images: one client's 32 files must not hold up everyone's /cls.
            *(service.classify(upload, top_k, deadline, Priority.BULK) for upload in uploads),
            return_exceptions=True,
        ),
    )
    # Nothing of it was taken in (the queue was full, the batcher stopped as the drain's
    # time ran out, or the device or the batcher failed, which NotReady says), or nothing
    # found memory: refused whole, as /cls is, so a client or proxy that reads only the
    # status retries it.
    if all(isinstance(outcome, Stopped | NotReady) for outcome in outcomes):
        raise next((o for o in outcomes if isinstance(o, NotReady)), NotReady(SHUTTING_DOWN))
    if all(isinstance(o, QueueFull | Stopped | NotReady | MemoryError) for o in outcomes):
        # A full queue says when to retry, a worker that failed where to (elsewhere).
        for kind in (QueueFull, NotReady, MemoryError):
            refusal = next((o for o in outcomes if isinstance(o, kind)), None)
            if refusal is not None:
                raise refusal
    results = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            status, detail = status_and_detail(
                outcome, service.settings, own_timeout=_own_timeout(request)
            )
            results.append(BatchEntry(index=index, status=status, detail=detail))
        else:
            results.append(BatchEntry(index=index, status=200, prediction=predictions_out(outcome)))
    metrics.record_batch_files(entry.status for entry in results)
    if any(entry.status == 503 for entry in results):
        # The answer is 200 as a whole; a client retrying its refused entries needs the wait.
        response.headers["Retry-After"] = RETRY_AFTER_S
    return BatchResponse(results=results)


async def submit_task(
    request: Request,
    file: ImageFile,
    callback_url: Annotated[
        str | None,
        Form(description="http(s) URL to POST the result to when the task finishes"),
    ] = None,
    metadata: Annotated[
        str | None,
        Form(description="A JSON object, returned with the result and in the webhook"),
    ] = None,
    top_k: TopK = None,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="1 to 255 visible ASCII characters, unique per request (a UUID): "
            "resending a request with the same key returns the task it created instead of "
            "creating another",
            json_schema_extra=IDEMPOTENCY_KEY_SCHEMA,
        ),
    ] = None,
) -> JSONResponse:
    """Queue an image for classification; answers at once with the task's id.

    The image is validated first: a bad one gets its 4xx now, not a failed task later.
    """
    service = _service(request)
    settings = service.settings
    top_k = _top_k(request, top_k)
    tasks = service.task_runner()
    service.refuse_unless_ready()
    # The form is parsed already (and kept by the request); FastAPI takes the last of
    # repeated fields, which would drop the others silently.
    form = await request.form()
    _refuse_what_the_form_would_ignore(form)
    # A misspelt callback_url or metadata would be dropped unseen: no webhook would come.
    # An empty file part (a form's file input left empty) holds nothing to drop.
    if unknown := [
        name
        for name, value in form.multi_items()
        if name not in TASK_FORM_FIELDS
        and not (isinstance(value, StarletteUploadFile) and not value.size)
    ]:
        raise InvalidTaskField(
            f"unknown form field {logs.shortened(unknown[0], 64)!r}; "
            f"a task takes {', '.join(TASK_FORM_FIELDS)}"
        )
    for name in ("callback_url", "metadata"):
        if (sent := len(form.getlist(name))) > 1:
            raise InvalidTaskField(f"{name} was sent {sent} times; send it at most once")
    parsed_metadata = parse_metadata(metadata, settings.task_metadata_max_bytes)
    if callback_url is not None:
        callback_url = callback_url.strip() or None
    # Not the parameter, which documents the header: FastAPI takes one of several sent.
    idempotency_key = idempotency_key_in(request.headers.getlist("idempotency-key"))
    record, created = await service.submit_task(
        file,
        tasks,
        top_k=top_k,
        metadata=parsed_metadata,
        callback_url=callback_url,
        idempotency_key=idempotency_key,
    )
    status_url = str(request.url_for("task_status", task_id=record.id))
    accepted = TaskAccepted(task_id=record.id, status=record.status, status_url=status_url)
    headers = {"Location": status_url}
    if not created:
        headers["Idempotent-Replayed"] = "true"
    return JSONResponse(accepted.model_dump(mode="json"), status_code=202, headers=headers)


async def task_status(request: Request, task_id: str) -> JSONResponse:
    """A task's state, and its prediction or error once it has finished."""
    task_id = valid_task_id(task_id)
    record = await _service(request).task_runner().get(task_id)
    if record is None:
        raise TaskNotFound(f"no task {task_id}")
    return task_response(record)


async def cancel_task(request: Request, task_id: str) -> JSONResponse:
    """Cancel a task that has not started; 409 once it is running or finished."""
    task_id = valid_task_id(task_id)
    record = await _service(request).task_runner().cancel(task_id)
    if record is None:
        raise TaskNotFound(f"no task {task_id}")
    return task_response(record)


async def healthz(request: Request) -> JSONResponse:
    """Liveness: the process serves HTTP, batches, its device has not failed, and the model is
    not stuck on a batch."""
    problem = _service(request).liveness_problem()
    if problem is not None:
        detail = f"the worker cannot serve: {problem}"
        return JSONResponse({"status": problem, "detail": detail}, status_code=503)
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """Readiness: the model is loaded and warm, is not stalled, and the server is not
    draining."""
    service = _service(request)
    stalled = service.liveness_problem() == "stalled"
    if service.ready and not service.draining and not stalled:
        return JSONResponse({"status": "ready"})
    if service.draining:
        detail = "the server is shutting down"
    elif service.model_failure is not None:
        detail = f"{service.model_failure.summary}: {service.model_failure.reason}"
    elif (failure := service.failure()) is not None:
        detail = failure
    elif stalled:
        # New requests could only wait behind the stuck batch into their 504s.
        detail = (
            f"a batch has run for more than STALL_TIMEOUT_S={service.settings.stall_timeout_s:g} s"
        )
    else:
        detail = "the model is loading"
    return JSONResponse(
        {"status": "not ready", "detail": detail},
        status_code=503,
        headers={"Retry-After": RETRY_AFTER_S},
    )


async def prometheus_metrics() -> Response:
    """Prometheus exposition, merged across gunicorn workers."""
    # Off the event loop: merging reads every worker's files, dead workers' counters
    # included, which after many restarts takes a good part of a second.
    body, content_type = await asyncio.to_thread(metrics.render)
    return Response(body, media_type=content_type)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    status, detail = status_and_detail(
        exc, _service(request).settings, own_timeout=_own_timeout(request)
    )
    if isinstance(exc, TaskStoreFailed):
        # The logs name the file where the operator put it; a client is not told where.
        store_path = _service(request).settings.data_dir / DATABASE_NAME
        detail = detail.replace(str(store_path), f"DATA_DIR's {DATABASE_NAME}")
    retry_after = str(exc.retry_after_s) if isinstance(exc, TaskQueueFull) else RETRY_AFTER_S
    headers = {"Retry-After": retry_after} if status == 503 else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


# Starlette's refusal of a form with more file parts than a route's ``max_files``.
_TOO_MANY_FILES = re.compile(r"Too many files\. Maximum number of files is (\d+)\.")
_TOO_MANY_FIELDS = re.compile(r"Too many fields\. Maximum number of fields is (\d+)\.")
# The multipart parser's words for a body it cannot read, and what they mean to a caller.
_MULTIPART_ERRORS = {
    "Missing boundary in multipart.": NO_BOUNDARY,
    "Invalid multipart data.": (
        "the body is not well-formed multipart/form-data: a part does not begin with the "
        "boundary its Content-Type names (nor may text come before the first one, a MIME "
        "preamble, which is not read), or a part's header lines are malformed (at most 8 "
        "of them, each of at most 4,224 bytes)"
    ),
}


def _no_thread(error: BaseException | None) -> bool:
    """Whether ``error`` is Python's for a thread the system would not start (at a limit
    of threads or memory), not another RuntimeError: a bug's keeps its 400 and traceback."""
    return isinstance(error, RuntimeError) and str(error) == "can't start new thread"


def _has_route(app: FastAPI, path: str) -> bool:
    return matching_route(app, {"type": "http", "path": path, "method": "GET"}) is not None


def _routes_taking_ids(app: FastAPI, prefix: str) -> list[str]:
    """The routes whose path is ``prefix`` followed by a parameter, as /task-status/{task_id}."""
    paths = (route.path for route in app.routes if isinstance(route, APIRoute))
    return list(
        dict.fromkeys(  # a path served for GET and HEAD is two routes
            path
            for path in paths
            if path.startswith(prefix)
            and path[len(prefix) :].startswith("{")
            and "/" not in path[len(prefix) :]
        )
    )


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    detail = exc.detail
    cause = exc.__cause__
    # FastAPI calls any failure to parse the body the client's; these are the server's.
    if exc.status_code == 400 and isinstance(cause, OSError):
        # A large part could not be spooled to the temporary directory.
        logger.error(
            "an upload could not be stored in the temporary directory %s: %s",
            tempfile.gettempdir(),
            cause,
        )
        reason = cause.strerror or type(cause).__name__
        return JSONResponse(
            {"detail": f"the server could not store the upload for now ({reason}); retry"},
            status_code=503,
            headers={"Retry-After": RETRY_AFTER_S},
        )
    if exc.status_code == 400 and (isinstance(cause, MemoryError) or _no_thread(cause)):
        # Out of memory, or of threads: a large part is spooled to disk on a worker thread.
        logger.error("an upload could not be read: %s: %s", type(cause).__name__, cause)
        return JSONResponse(
            {"detail": "the server could not read the upload for now; retry"},
            status_code=503,
            headers={"Retry-After": RETRY_AFTER_S},
        )
    if exc.status_code == 404 and detail == "Not Found":
        path = request.url.path
        shown = logs.shortened(path, 200)
        detail = f"no route {shown}"
        if len(path) <= 200 and path.endswith("/"):
            if _has_route(request.app, path.rstrip("/")):
                detail += f"; the route is {path.rstrip('/')}, without the trailing slash"
            elif taking := _routes_taking_ids(request.app, path):  # the id left out
                detail += f"; the route is {' or '.join(taking)}"
    if exc.status_code == 400 and str(detail) in _MULTIPART_ERRORS:
        detail = _MULTIPART_ERRORS[str(detail)]
    if exc.status_code == 400 and (match := _TOO_MANY_FILES.fullmatch(str(detail))):
        # Starlette's message names neither the setting nor the route for several files.
        if request.url.path == CLASSIFY_BATCH_ROUTE:
            detail = (
                f"more than {match[1]} files; {CLASSIFY_BATCH_ROUTE} takes at most MAX_BATCH_FILES "
                f"({match[1]}) per request"
            )
        else:
            # Empty file parts count toward the limit: the form may hold a single image.
            one_file = _takes_one_file(request.url.path)
            detail = f"more than {match[1]} file parts, empty ones included; {one_file}"
    if exc.status_code == 400 and (match := _TOO_MANY_FIELDS.fullmatch(str(detail))):
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            # An image sent as the raw body, which curl labels as a URL-encoded form: its
            # bytes read as many fields.
            detail = f"file: Field required; {_send_as_multipart(content_type)}"
            return JSONResponse({"detail": detail}, status_code=422)
        takes = "file"
        if request.url.path == TASKS_ROUTE:
            takes = f"{', '.join(TASK_FORM_FIELDS[:-1])} and {TASK_FORM_FIELDS[-1]}"
        detail = (
            f"more than {match[1]} plain form fields; {request.url.path} takes {takes} "
            "(top_k is a query parameter)"
        )
    headers = exc.headers
    if exc.status_code == 405:
        # Starlette's Allow names the methods of the first route of the path only; HEAD
        # has routes of its own.
        allowed = ", ".join(sorted(_allowed_methods(request)))
        headers = {**(headers or {}), "Allow": allowed}
        path = request.url.path
        shown = logs.shortened(path, 200)
        detail = f"{request.method} is not allowed on {shown}; it takes {allowed}"
        if shown == path and path.startswith("/tasks/") and request.method in ("GET", "HEAD"):
            detail += f"; a task's status is at /task-status/{path.removeprefix('/tasks/')}"
    return JSONResponse({"detail": detail}, status_code=exc.status_code, headers=headers)


def _allowed_methods(request: Request) -> set[str]:
    """The methods of every route whose path matches the request's."""
    return {
        method
        for route in request.app.router.routes
        if route.matches(request.scope)[0] != Match.NONE
        for method in getattr(route, "methods", None) or ()
    }


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{where}: {_public_validation_message(error)}")
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data") and any(
        tuple(error.get("loc", ())) == ("body", "file") for error in exc.errors()
    ):
        # An image sent as the raw body, or as JSON: say how to send it instead.
        problems.append(_send_as_multipart(content_type))
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)


def _send_as_multipart(content_type: str) -> str:
    shown = logs.shortened(content_type, 100)
    return (
        "send the image as a multipart/form-data part named 'file' "
        f"(curl -F file=@image.jpg), not as a body of type {shown or '(none)'}"
    )


def _public_validation_message(error: Mapping[str, object]) -> str:
    message = str(error.get("msg", "invalid"))
    # FastAPI's UploadFile check names the Python type it got ("<class 'str'>") when a
    # plain form field stands where a file should be.
    if "Expected UploadFile" in message:
        return (
            "expected a file part, with filename= in its Content-Disposition (filename* alone "
            "is not read, RFC 7578), received a plain form field"
        )
    return message


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # For errors of the request middleware itself, which answers every other one; Starlette
    # runs this outside it, so the request id is bound again.
    request_id = getattr(request.state, REQUEST_ID_STATE, None)
    with logs.request_id_bound(request_id or "-"):
        logger.error(
            "unhandled error on %s %s",
            request.method,
            logs.shown_path(request.url.path),
            exc_info=exc,
        )
    headers = {REQUEST_ID_HEADER: request_id} if request_id else None
    return JSONResponse({"detail": INTERNAL_ERROR}, status_code=500, headers=headers)


def uvicorn_workers() -> int:
    """How many workers ``uvicorn --workers`` (or ``UVICORN_WORKERS``, or
    ``WEB_CONCURRENCY``) started beside this one, as its command line says (a spawned
    process gets its parent's): 1 in a process of its own, or under ``--reload`` (or
    ``UVICORN_RELOAD``), which runs one."""
    reload = os.environ.get("UVICORN_RELOAD", "").strip().lower() in ("1", "true", "yes", "on")
    if multiprocessing.parent_process() is None or reload or "--reload" in sys.argv:
        return 1
    given = os.environ.get("UVICORN_WORKERS") or os.environ.get("WEB_CONCURRENCY", "")
    for index, argument in enumerate(sys.argv):
        if argument == "--workers":
            given = sys.argv[index + 1] if index + 1 < len(sys.argv) else ""
        elif argument.startswith("--workers="):
            given = argument.removeprefix("--workers=")
    return max(1, int(given)) if given.strip().isdigit() else 1


def create_app(settings: Settings) -> FastAPI:
    """Build the application for the given settings; the model loads in its lifespan."""
    uploads = UploadsInFlight()  # counted by the body limits, read by the memory trimmer

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        siblings: Siblings | None = getattr(app.state, SIBLINGS_STATE, None)
        own = settings
        if siblings is None:  # not under gunicorn, whose master says it once for all workers
            for line in misspelt_settings():
                logger.warning("%s", line)
            if (warning := raise_open_file_limit()) is not None:
                logger.warning("%s", warning)
            # WORKERS is gunicorn's: a process of uvicorn's shares the cores with the workers
            # its command line started, if any.
            own = settings.model_copy(update={"workers": uvicorn_workers()})
            for line in settings_to_warn_of(own):
                logger.warning("%s", line)
            if own.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                logger.warning(
                    "uvicorn runs %d workers here, which know nothing of each other: /metrics "
                    "counts one worker's requests; serve several workers with gunicorn "
                    "(make run, WORKERS=%d)",
                    own.workers,
                    own.workers,
                )
        started_before = siblings is not None and siblings.server_started()
        service = Service(own, server_started=started_before, uploads=uploads)
        app.state.service = service
        setattr(app.state, LIVENESS_STATE, service.liveness_problem)
        try:
            await service.start()
        except Exception as exc:
            # One line that says what to change, not a traceback (but for a failure nobody
            # foresaw, a bug: its traceback is what mends it). Exit code 3 tells gunicorn
            # to stop rather than restart the worker in a loop, unless other workers serve.
            foreseen = isinstance(exc, (ModelLoadError, TaskStoreUnavailable, ThreadsUnavailable))
            if not foreseen and siblings is None:
                raise  # uvicorn, or a test, shows it with its traceback as it stops
            reason = exc if foreseen else f"an unexpected error ({logs.shortened(repr(exc), 300)})"
            others_serve = siblings is not None and siblings.others_serving()
            pause_s = 0.0
            if siblings is not None and others_serve:
                pause_s = restart_pause_s(siblings.failed_to_start(), settings.worker_timeout_s)
                logger.critical(
                    "cannot start: %s; gunicorn starts this worker again in %g s, and the "
                    "other workers serve meanwhile",
                    reason,
                    pause_s,
                    exc_info=not foreseen,
                )
            else:
                logger.critical("cannot start: %s", reason, exc_info=not foreseen)
            if siblings is None:
                metrics.forget_this_process()
            logs.stop_writer()  # os._exit skips atexit: write the line out first
            sys.stderr.flush()
            if pause_s:
                pause_then_restart(pause_s)
            os._exit(EXIT_RESTART if others_serve else EXIT_BOOT_ERROR)
        if siblings is not None:
            siblings.mark_ready()
        # What exists now (libraries, app, model) lives as long as the worker. Frozen, it
        # drops out of the collector's full passes, each of which would otherwise hold the
        # GIL, and so every request, for about 0.2 s.
        gc.collect()
        gc.freeze()
        try:
            yield {
                SHUTDOWN_HOOK: service.begin_shutdown,
                DRAIN_TIMEOUT_STATE: settings.drain_timeout_s,
            }
        finally:
            gc.unfreeze()
            try:
                await service.stop()
            finally:
                if siblings is None:
                    metrics.forget_this_process()
                # uvicorn ends a worker stopped by a signal with that signal once the server
                # is down, so no atexit hook writes out what is still queued.
                logs.stop_writer()

    upload_limit = settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    body_limits = {
        CLASSIFY_ROUTE: upload_limit,
        CLASSIFY_BATCH_ROUTE: upload_limit * settings.max_batch_files,
        TASKS_ROUTE: upload_limit + settings.task_metadata_max_bytes + webhooks.MAX_URL_CHARS,
    }
    # Starlette caps a plain form field at 1 MiB by default, answering 400 with a message
    # that names no setting. The body limits bound a field already, so a field too long, or
    # of the wrong kind, gets the answer that names what is wrong with it.
    max_part_bytes = max(body_limits[CLASSIFY_ROUTE], body_limits[TASKS_ROUTE])
    # /cls and /tasks: empty file parts beside the image are let through, and ignored; a
    # second image is refused by their dependency.
    one_image_form = {"max_files": 8, "max_fields": 8, "max_part_size": max_part_bytes}
    app = FastAPI(
        title="ResNet18 classification service",
        summary="Micro-batched ImageNet classification over HTTP",
        version="0.1.0",
        lifespan=lifespan,
        # A path with a trailing slash is a JSON 404, not a redirect with an empty body.
        redirect_slashes=False,
    )
    app.add_api_route(
        CLASSIFY_ROUTE,
        classify,
        methods=["POST"],
        response_model=ClassifyResponse,
        responses=error_responses(400, 413, 422, 504),
        dependencies=[Depends(_one_file_named_file)],
        form_limits=one_image_form,
        tags=["classification"],
    )
    app.add_api_route(
        CLASSIFY_BATCH_ROUTE,
        classify_batch,
        methods=["POST"],
        response_model=BatchResponse,
        response_model_exclude_none=True,
        responses={
            200: {"headers": BATCH_HEADERS},
            **error_responses(400, 413, 422),
        },
        # ``file`` is optional to FastAPI only so that a form of empty file inputs reaches
        # the handler; documented as required (OpenAPI 3.1 applies this beside the $ref).
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"multipart/form-data": {"schema": {"required": ["file"]}}},
            }
        },
        form_limits={
            "max_files": settings.max_batch_files,
            "max_fields": 8,
            "max_part_size": max_part_bytes,
        },
        tags=["classification"],
    )
    app.add_api_route(
        TASKS_ROUTE,
        submit_task,
        methods=["POST"],
        status_code=202,
        response_model=TaskAccepted,
        responses={202: {"headers": TASK_ACCEPTED_HEADERS}, **error_responses(400, 413, 422)},
        dependencies=[Depends(_one_file_named_file)],
        form_limits=one_image_form,
        tags=["tasks"],
    )
    app.add_api_route(
        "/task-status/{task_id}",
        task_status,
        methods=["GET"],
        response_model=TaskOut,
        responses=error_responses(404),
        name="task_status",
        tags=["tasks"],
    )
    app.add_api_route(
        "/task-status/{task_id}",
        task_status,
        methods=["HEAD"],
        name="task_status_head",
        include_in_schema=False,
    )
    app.add_api_route(
        "/tasks/{task_id}",
        cancel_task,
        methods=["DELETE"],
        response_model=TaskOut,
        responses=error_responses(404, 409),
        tags=["tasks"],
    )
    for path, probe in (("/healthz", healthz), ("/readyz", readyz)):
        app.add_api_route(
            path,
            probe,
            methods=["GET"],
            response_model=ProbeOut,
            responses={
                503: {
                    "model": ProbeOut,
                    "description": "Not live, or not ready",
                    # A not-ready worker says when to try again; a failed liveness probe
                    # is for the orchestrator to act on.
                    **({"headers": READY_PROBE_HEADERS} if path == "/readyz" else {}),
                },
                "default": ANY_OTHER_ERROR,
            },
            tags=["operations"],
        )
        # Some load balancers probe with HEAD; one documented operation is enough.
        app.add_api_route(path, probe, methods=["HEAD"], include_in_schema=False)
    app.add_api_route(
        "/metrics",
        prometheus_metrics,
        methods=["GET"],
        response_class=PlainTextResponse,
        responses=METRICS_RESPONSES,
        tags=["operations"],
    )
    app.add_api_route("/metrics", prometheus_metrics, methods=["HEAD"], include_in_schema=False)

    for error_type in ERROR_STATUS:
        app.add_exception_handler(error_type, _domain_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    app.add_middleware(
        ShedWhileFullMiddleware,
        refusal=lambda path: (
            _refusal_before_upload(app.state.service, path)
            if hasattr(app.state, "service")
            else None
        ),
    )
    app.add_middleware(
        BodyLimitsMiddleware,
        limit_bytes_by_path=body_limits,
        default_limit_bytes=MAX_OTHER_BODY_BYTES,
        describe=lambda limit: (
            f"request body is over {limit} bytes; "
            + (
                "this route takes no upload"
                if limit == MAX_OTHER_BODY_BYTES
                else f"MAX_UPLOAD_BYTES allows {settings.max_upload_bytes} per file"
            )
        ),
        # A file part's limit; a task's metadata, should TASK_METADATA_MAX_BYTES be set
        # larger, may take more.
        part_limit_bytes=max(
            upload_limit, settings.task_metadata_max_bytes + MULTIPART_OVERHEAD_BYTES
        ),
        describe_part=lambda limit: (
            f"a part of the request body is over {limit} bytes; "
            + f"MAX_UPLOAD_BYTES allows {settings.max_upload_bytes} per file"
            + (
                ""
                if limit == upload_limit
                else f", TASK_METADATA_MAX_BYTES {settings.task_metadata_max_bytes} for a task's "
                "metadata"
            )
        ),
        idle_timeout_s=settings.body_idle_timeout_s,
        min_bytes_per_s=settings.body_min_bytes_per_s,
        routed=partial(serves, app),
        in_flight_limit_bytes=settings.max_uploads_in_flight_bytes,
        in_flight=uploads,
    )
    describe_uploads_as_files(app)
    if settings.api_key is not None:
        document_the_api_key(app, OPEN_PATHS)
        app.add_middleware(
            ApiKeyMiddleware,
            api_key=settings.api_key.get_secret_value(),
            # The API's documentation too: a browser opening it sends no key, and its
            # "Authorize" button is how a reader then tries the routes that need one.
            open_paths=OPEN_PATHS | documentation_paths(app),
            short_body_bytes=MAX_OTHER_BODY_BYTES,
        )
    if settings.cors_origin_list:
        # Outside the key check: browsers send preflight requests without credentials.
        app.add_middleware(
            JsonCorsMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=[
                "Authorization",
                "X-API-Key",
                "X-Request-ID",
                "Idempotency-Key",
                REQUEST_TIMEOUT_HEADER,
            ],
            expose_headers=["X-Request-ID", "Retry-After", "Location", "Idempotent-Replayed"],
        )
    # Added last, so outermost: 401s and 413s get request ids and metrics too.
    app.add_middleware(RequestContextMiddleware)
    return app


def _settings_or_restart() -> Settings:
    """The settings; refused, the one line and exit status 3, but in a gunicorn worker
    started while others serve (``restart_while_others_serve``)."""
    try:
        return load_settings()
    except StartRefused:
        restart_while_others_serve()
        raise


settings = _settings_or_restart()
logs.configure_logging(settings.log_level, settings.log_format, settings.access_log)
app = create_app(settings)
