"""The HTTP service: routes, lifespan and error mapping. The one place that joins transport,
batching and the model.

Run it with ``gunicorn main:app -c gunicorn_config.py`` (production) or
``uvicorn main:app --reload --port 5001`` (development).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, TypeVar

import numpy as np
import torch
from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from batching import (
    BatchFailed,
    BatchProcessor,
    DeadlineExceeded,
    Outcome,
    QueueFull,
    Stopped,
)
from classification import (
    Classifier,
    ImageTooLarge,
    InvalidImage,
    ModelLoadError,
    Prediction,
    load_classifier,
    preprocess,
)
from service import metrics
from service.middleware import (
    ApiKeyMiddleware,
    BodyLimitsMiddleware,
    RequestContextMiddleware,
    RequestIdLogFilter,
)
from service.settings import Settings, load_settings

logger = logging.getLogger("service")
T = TypeVar("T")

# Multipart framing (boundaries, part headers) on top of the file bytes themselves.
MULTIPART_OVERHEAD_BYTES = 64 * 1024
MAX_OTHER_BODY_BYTES = 64 * 1024
RETRY_AFTER_S = "1"
# Probes and scrapers reach these without the API key.
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
EXIT_STARTUP_FAILED = 3  # gunicorn stops instead of restarting a worker that exits with 3


class UploadTooLarge(Exception):
    """One uploaded file is larger than ``MAX_UPLOAD_BYTES``."""


class ClientDisconnected(Exception):
    """The client went away while its request waited; nobody will read the answer."""


class NotReady(Exception):
    """The model is not loaded yet, or the server is draining."""


@dataclass(frozen=True, slots=True)
class ClassifyJob:
    """One preprocessed image waiting for a batch."""

    pixels: np.ndarray
    top_k: int


class PredictionOut(BaseModel):
    index: int
    label: str
    score: float


class ClassifyResponse(BaseModel):
    prediction: list[PredictionOut]


class BatchEntry(BaseModel):
    """One file's answer in a ``/cls/batch`` response: a prediction or its own error."""

    index: int
    status: int
    prediction: list[PredictionOut] | None = None
    detail: str | None = None


class BatchResponse(BaseModel):
    results: list[BatchEntry]


class Service:
    """Everything one worker holds while serving: the model, the batcher and their threads."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.classifier: Classifier | None = None
        self.processor: BatchProcessor[ClassifyJob, list[Prediction]] | None = None
        self.ready = False
        self._decoding = 0
        self._observer = metrics.PrometheusObserver()
        self._decode_pool = ThreadPoolExecutor(
            settings.effective_decode_threads, thread_name_prefix="decode"
        )
        # One thread: batches reach the model one at a time, in order.
        self._inference_pool = ThreadPoolExecutor(1, thread_name_prefix="inference")

    async def start(self) -> None:
        """Load and warm up the model off the event loop, then start batching."""
        settings = self.settings
        torch.set_num_threads(settings.effective_torch_threads)
        loop = asyncio.get_running_loop()
        classifier = await loop.run_in_executor(
            self._inference_pool,
            lambda: load_classifier(
                weights=settings.weights,
                labels_file=settings.labels_file,
                device=settings.device,
                dtype=settings.dtype,
                channels_last=settings.channels_last,
                seed=settings.seed,
            ),
        )
        await loop.run_in_executor(
            self._inference_pool, classifier.warm_up, sorted({1, settings.max_batch_size})
        )
        self.classifier = classifier
        metrics.record_model(
            "resnet18",
            str(classifier.device),
            classifier.dtype_name,
            classifier.weights_description,
        )
        self.processor = BatchProcessor(self._run_batch, settings.batch_config(), self._observer)
        self.processor.start()
        self.ready = True

    async def stop(self) -> None:
        """Stop taking requests, finish the queued ones (bounded), release the threads."""
        self.ready = False
        if self.processor is not None:
            await self.processor.stop(self.settings.drain_timeout_s)
        self._decode_pool.shutdown(wait=False, cancel_futures=True)
        self._inference_pool.shutdown(wait=False, cancel_futures=True)

    async def classify(self, upload: UploadFile, top_k: int, deadline: float) -> list[Prediction]:
        """Validate, decode and classify one upload, raising a domain error on failure."""
        if not self.ready or self.processor is None:
            raise NotReady("the model is not ready")
        processor = self.processor
        # Refuse at once when the queue is full rather than spend a decode on the request.
        if processor.queue_depth + self._decoding >= processor.config.max_queue:
            # Counted like the batcher's own refusals, so the metric sees every one.
            self._observer.item_finished(Outcome.REJECTED)
            raise QueueFull(f"the queue is full; MAX_QUEUE allows {processor.config.max_queue}")
        if upload.size is not None and upload.size > self.settings.max_upload_bytes:
            raise UploadTooLarge(self._too_large_message(upload.size))
        data = await upload.read()
        if len(data) > self.settings.max_upload_bytes:
            raise UploadTooLarge(self._too_large_message(len(data)))

        self._decoding += 1
        try:
            pixels = await asyncio.get_running_loop().run_in_executor(
                self._decode_pool, _preprocess, data, self.settings.max_image_pixels
            )
        finally:
            self._decoding -= 1
        return await processor.submit(ClassifyJob(pixels, top_k), deadline=deadline)

    def check_top_k(self, top_k: int) -> None:
        if self.classifier is not None and top_k > self.classifier.num_classes:
            raise RequestValidationError(
                [
                    {
                        "loc": ("query", "top_k"),
                        "msg": f"must be at most {self.classifier.num_classes}",
                    }
                ]
            )

    def _too_large_message(self, size: int) -> str:
        return f"upload is {size} bytes; MAX_UPLOAD_BYTES allows {self.settings.max_upload_bytes}"

    async def _run_batch(self, jobs: list[ClassifyJob]) -> list[list[Prediction]]:
        assert self.classifier is not None
        return await asyncio.get_running_loop().run_in_executor(
            self._inference_pool,
            self.classifier.classify,
            [job.pixels for job in jobs],
            [job.top_k for job in jobs],
        )


def _preprocess(data: bytes, max_pixels: int) -> np.ndarray:
    return preprocess(data, max_pixels=max_pixels)


def _service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def _deadline(service: Service) -> float:
    return time.monotonic() + service.settings.request_timeout_ms / 1000


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


def _prediction_out(predictions: list[Prediction]) -> list[PredictionOut]:
    return [PredictionOut(index=p.index, label=p.label, score=p.score) for p in predictions]


TopK = Annotated[int, Query(ge=1, le=1000, description="How many classes to return")]


async def classify(
    request: Request,
    file: Annotated[UploadFile, File(description="The image: JPEG, PNG, GIF, WebP, BMP or TIFF")],
    top_k: TopK = 5,
) -> ClassifyResponse:
    """Classify one image; the top ``top_k`` ImageNet classes, best first."""
    service = _service(request)
    service.check_top_k(top_k)
    predictions = await _unless_disconnected(
        request, service.classify(file, top_k, _deadline(service))
    )
    return ClassifyResponse(prediction=_prediction_out(predictions))


async def classify_batch(
    request: Request,
    file: Annotated[list[UploadFile], File(description="One or more images, as repeated parts")],
    top_k: TopK = 5,
) -> BatchResponse:
    """Classify several images; one entry per file, in order, each with its own status."""
    service = _service(request)
    service.check_top_k(top_k)
    deadline = _deadline(service)
    outcomes = await _unless_disconnected(
        request,
        asyncio.gather(
            *(service.classify(upload, top_k, deadline) for upload in file),
            return_exceptions=True,
        ),
    )
    results = []
    for index, outcome in enumerate(outcomes):
        if isinstance(outcome, BaseException):
            status, detail = _status_and_detail(outcome)
            results.append(BatchEntry(index=index, status=status, detail=detail))
        else:
            results.append(BatchEntry(index=index, status=200, prediction=_prediction_out(outcome)))
    return BatchResponse(results=results)


async def healthz(request: Request) -> JSONResponse:
    """Liveness: the process serves HTTP and the model is not stuck on a batch."""
    service = _service(request)
    processor = service.processor
    if processor is not None and processor.oldest_batch_age_s() > service.settings.stall_timeout_s:
        return JSONResponse({"status": "stalled"}, status_code=503)
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> JSONResponse:
    """Readiness: the model is loaded and warm and the server is not draining."""
    if _service(request).ready:
        return JSONResponse({"status": "ready"})
    return JSONResponse(
        {"status": "not ready"}, status_code=503, headers={"Retry-After": RETRY_AFTER_S}
    )


async def prometheus_metrics() -> Response:
    """Prometheus exposition, merged across gunicorn workers."""
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)


# Domain errors and the status codes they map to; the single place where that is decided.
_ERROR_STATUS: dict[type[Exception], int] = {
    InvalidImage: 400,
    ImageTooLarge: 400,
    UploadTooLarge: 413,
    QueueFull: 503,
    NotReady: 503,
    Stopped: 503,
    DeadlineExceeded: 504,
    BatchFailed: 500,
    # nginx's convention for "client closed request"; only metrics and logs see it.
    ClientDisconnected: 499,
}
_PUBLIC_DETAIL = {
    BatchFailed: "inference failed; the error is logged on the server",
    DeadlineExceeded: "the request was not served within REQUEST_TIMEOUT_MS",
}


def _status_and_detail(error: BaseException) -> tuple[int, str]:
    for error_type, status in _ERROR_STATUS.items():
        if isinstance(error, error_type):
            return status, _PUBLIC_DETAIL.get(error_type, str(error))
    logger.error("unexpected error", exc_info=error)
    return 500, "internal server error"


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    status, detail = _status_and_detail(exc)
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = []
    for error in exc.errors():
        where = ".".join(str(part) for part in error.get("loc", ()) if part != "body")
        problems.append(f"{where}: {_public_validation_message(error)}")
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)


def _public_validation_message(error: Mapping[str, object]) -> str:
    message = str(error.get("msg", "invalid"))
    # FastAPI's UploadFile check names the Python type it got ("<class 'str'>") when a
    # plain form field stands where a file should be.
    if "Expected UploadFile" in message:
        return "expected a file part (with a filename), received a plain form field"
    return message


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def create_app(settings: Settings) -> FastAPI:
    """Build the application for the given settings; the model loads in its lifespan."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = Service(settings)
        app.state.service = service
        try:
            await service.start()
        except ModelLoadError as exc:
            # One line that says what to change, not a traceback; exit code 3 tells
            # gunicorn not to restart the worker in a loop.
            logger.critical("cannot start: %s", exc)
            sys.stderr.flush()
            os._exit(EXIT_STARTUP_FAILED)
        try:
            yield
        finally:
            await service.stop()

    app = FastAPI(
        title="ResNet18 classification service",
        summary="Micro-batched ImageNet classification over HTTP",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.add_api_route(
        "/cls",
        classify,
        methods=["POST"],
        response_model=ClassifyResponse,
        form_limits={"max_files": 1, "max_fields": 8},
        tags=["classification"],
    )
    app.add_api_route(
        "/cls/batch",
        classify_batch,
        methods=["POST"],
        response_model=BatchResponse,
        response_model_exclude_none=True,
        form_limits={"max_files": settings.max_batch_files, "max_fields": 8},
        tags=["classification"],
    )
    app.add_api_route("/healthz", healthz, methods=["GET"], tags=["operations"])
    app.add_api_route("/readyz", readyz, methods=["GET"], tags=["operations"])
    app.add_api_route(
        "/metrics",
        prometheus_metrics,
        methods=["GET"],
        tags=["operations"],
        include_in_schema=False,
    )

    for error_type in _ERROR_STATUS:
        app.add_exception_handler(error_type, _domain_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
    upload_limit = settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES
    app.add_middleware(
        BodyLimitsMiddleware,
        limits_by_path={
            "/cls": upload_limit,
            "/cls/batch": upload_limit * settings.max_batch_files,
        },
        default_limit=MAX_OTHER_BODY_BYTES,
        describe=lambda limit: (
            f"request body is over {limit} bytes; "
            f"MAX_UPLOAD_BYTES allows {settings.max_upload_bytes} per file"
        ),
        idle_timeout_s=settings.body_idle_timeout_s,
    )
    if settings.api_key is not None:
        app.add_middleware(
            ApiKeyMiddleware,
            api_key=settings.api_key.get_secret_value(),
            open_paths=OPEN_PATHS,
        )
    if settings.cors_origin_list:
        # Outside the key check: browsers send preflight requests without credentials.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "X-Request-ID"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    # Added last, so outermost: 401s and 413s get request ids and metrics too.
    app.add_middleware(RequestContextMiddleware)
    return app


def configure_logging(level: str) -> None:
    """Log lines carry the request id; uvicorn and gunicorn keep their own handlers."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdLogFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    )
    for name in ("service", "batching", "classification"):
        named = logging.getLogger(name)
        named.handlers = [handler]
        named.setLevel(level.upper())
        named.propagate = False


settings = load_settings()
configure_logging(settings.log_level)
app = create_app(settings)
