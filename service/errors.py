"""The service's own errors, and the HTTP status and public detail each error maps to: the
one place that decides them, for requests and for stored tasks alike."""

from __future__ import annotations

import logging

from batching import BatchFailed, DeadlineExceeded, QueueFull, Stopped
from classification import ImageTooLarge, InvalidImage, OutOfMemory
from service.middleware import INTERNAL_ERROR, REQUEST_TIMEOUT_HEADER
from service.protocol import SHUTTING_DOWN
from service.settings import Settings
from service.task_fields import InvalidTaskField, TaskNotFound
from service.task_runner import RunnerStopped
from service.tasks import (
    IdempotencyKeyReused,
    TaskNotCancellable,
    TaskQueueFull,
    TaskStoreBusy,
    TaskStoreFailed,
)
from service.webhooks import CallbackLookupFailed, InvalidCallbackUrl

logger = logging.getLogger("service")


class UploadTooLarge(Exception):
    """One uploaded file is larger than ``MAX_UPLOAD_BYTES``."""


class EmptyUpload(Exception):
    """One uploaded file has no bytes."""


class ClientDisconnected(Exception):
    """The client went away while its request waited; nobody will read the answer."""


class NotReady(Exception):
    """The worker cannot take this work now (503): its model is not loaded yet, it is
    shutting down, its model or batch processor failed, a batch has stalled, or a thread
    could not be started."""


class ThreadsUnavailable(Exception):
    """The worker could not start the threads it serves with."""


# The errors and the status codes they map to; the single place where that is decided.
ERROR_STATUS: dict[type[Exception], int] = {
    InvalidImage: 400,
    ImageTooLarge: 400,
    EmptyUpload: 400,
    TaskNotFound: 404,
    TaskNotCancellable: 409,
    UploadTooLarge: 413,
    InvalidTaskField: 422,
    InvalidCallbackUrl: 422,
    IdempotencyKeyReused: 422,
    QueueFull: 503,
    TaskQueueFull: 503,
    TaskStoreBusy: 503,
    TaskStoreFailed: 503,
    CallbackLookupFailed: 503,
    NotReady: 503,
    Stopped: 503,
    RunnerStopped: 503,
    # At the worker's memory limit (a container's, ulimit -v): it may pass.
    MemoryError: 503,
    DeadlineExceeded: 504,
    BatchFailed: 500,
    # nginx's convention for "client closed request"; only metrics and logs see it.
    ClientDisconnected: 499,
}
_PUBLIC_DETAIL: dict[type[Exception], str] = {
    Stopped: SHUTTING_DOWN,
    RunnerStopped: SHUTTING_DOWN,
    BatchFailed: "inference failed; the error is logged on the server",
    MemoryError: "the server had no memory for the request for now; retry",
}


def status_and_detail(
    error: BaseException, settings: Settings, *, own_timeout: str | None = None
) -> tuple[int, str]:
    """The status and public detail for ``error``; ``own_timeout``: the request's own time
    limit in milliseconds, in digits, where it set one shorter than REQUEST_TIMEOUT_MS,
    which its 504 names."""
    if isinstance(error, OutOfMemory):
        logger.error("no memory for a request: %s", error)  # names the device
    elif isinstance(error, MemoryError):
        logger.error(
            "no memory for a request (the worker is at its memory limit): %s",
            str(error) or "MemoryError",
        )
    for error_type, status in ERROR_STATUS.items():
        if isinstance(error, error_type):
            if error_type is DeadlineExceeded:
                if own_timeout is not None:
                    limit = f"its {REQUEST_TIMEOUT_HEADER} ({own_timeout} ms)"
                else:
                    limit = f"REQUEST_TIMEOUT_MS ({settings.request_timeout_ms:.15g} ms)"
                return status, f"the request was not served within {limit}"
            return status, _PUBLIC_DETAIL.get(error_type, str(error))
    logger.error("unexpected error", exc_info=error)
    return 500, INTERNAL_ERROR


def task_error(error: BaseException, settings: Settings) -> str:
    """A failed task's stored error: as a request's, but for a shortage of memory, which
    fails a task only on its last attempt (its runner logs it), to submit again later."""
    if isinstance(error, MemoryError):
        return "the server had no memory for the task's image; submit it again later"
    return status_and_detail(error, settings)[1]
