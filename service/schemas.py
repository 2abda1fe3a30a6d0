"""The JSON the API answers with, and what its OpenAPI schema says about it."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from classification import Prediction
from service.tasks import TaskRecord, TaskStatus


class PredictionOut(BaseModel):
    """One class: its index in the model's output, its label, its softmax score."""

    index: int
    label: str
    score: float


class ClassifyResponse(BaseModel):
    """A ``/cls`` answer: the ``top_k`` classes, best first."""

    prediction: list[PredictionOut]


class BatchEntry(BaseModel):
    """One file's answer in a ``/cls/batch`` response: a prediction or its own error."""

    index: int
    status: int
    prediction: list[PredictionOut] | None = None
    detail: str | None = None


class BatchResponse(BaseModel):
    """A ``/cls/batch`` answer: one entry per file part, in the order sent."""

    results: list[BatchEntry]


class TaskAccepted(BaseModel):
    """A stored task: poll ``status_url`` (also the ``Location`` header) for its result."""

    task_id: str
    status: TaskStatus
    status_url: str


class WebhookOut(BaseModel):
    """Where the delivery of a task's callback stands: waiting (for the task to finish),
    pending, delivered or failed."""

    status: Literal["waiting", "pending", "delivered", "failed"]
    attempts: int
    last_error: str | None
    next_attempt_at: datetime | None  # after a failed attempt, until the next one begins


class TaskOut(BaseModel):
    """A task's state; ``prediction`` once it succeeded, ``error`` once it failed."""

    task_id: str
    status: TaskStatus
    prediction: list[PredictionOut] | None = None
    error: str | None = None
    metadata: dict[str, object] | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    webhook: WebhookOut | None


class ErrorOut(BaseModel):
    """Every error's body: what was wrong and, where one applies, the setting to change."""

    detail: str


class ProbeOut(BaseModel):
    """A probe's answer: ``ok`` or ``ready`` with 200; with 503, what is wrong, in a word
    (``status``) and in a sentence (``detail``)."""

    status: str
    detail: str | None = None


# What each error means, for the OpenAPI documentation; the README's table has them all.
_ERROR_DOCS = {
    400: "Not an image the service reads, or a malformed multipart body",
    401: "API_KEY is set and the request carries no key or a wrong one",
    404: "No such task: an unknown, malformed or expired id",
    409: "The task is running or finished",
    413: "A file over MAX_UPLOAD_BYTES",
    422: "A missing, repeated or malformed field or parameter",
    503: "The queue or the room for uploads is full, the server is shutting down, the worker "
    "is out of memory or threads, its model failed or a batch stalled, the task store is "
    "unavailable or its disk nearly full, or a callback_url's host could not be looked up; "
    "retry after Retry-After",
    504: "Not answered within REQUEST_TIMEOUT_MS, or the request's own X-Request-Timeout-Ms",
}


_RETRY_AFTER = {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}
# The headers of successful answers, for the OpenAPI documentation.
BATCH_HEADERS = {
    "Retry-After": {
        **_RETRY_AFTER,
        "description": "When an entry was refused with 503: seconds to wait before retrying it",
    }
}
TASK_ACCEPTED_HEADERS = {
    "Location": {"description": "The task's status URL", "schema": {"type": "string"}},
    "Idempotent-Replayed": {
        "description": "`true` when the answer is the task that an earlier request with "
        "the same Idempotency-Key created",
        "schema": {"type": "string", "enum": ["true"]},
    },
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A route's documented errors, each with the one body every error has (the 401 of an
    API key is added by ``document_the_api_key``, where one is set)."""
    responses: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorOut, "description": _ERROR_DOCS[status]}
        for status in sorted({*statuses, 503})
    }
    responses[503]["headers"] = {"Retry-After": _RETRY_AFTER}
    # The rest (500, and the 408 and 431 of a request that never reached the app) have the
    # same body; declared, it also keeps FastAPI from adding a 422 of another shape.
    responses["default"] = ANY_OTHER_ERROR
    return responses


# Every route can answer errors it does not list (a 405, a 413 for a body where none is
# taken, the HTTP protocol's 400): each has the body every error has.
ANY_OTHER_ERROR: dict[str, Any] = {"model": ErrorOut, "description": "Any other error"}
# The Prometheus text exposition, as /metrics answers it.
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Prometheus text exposition format, merged across workers",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    },
    # Written out: as the model of a route whose answer is text, it would be labelled so.
    "default": {
        "description": ANY_OTHER_ERROR["description"],
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}},
    },
}


READY_PROBE_HEADERS = {"Retry-After": _RETRY_AFTER}


def describe_uploads_as_files(app: FastAPI) -> None:
    """Upload fields typed as files in the OpenAPI schema, as client generators read it.

    FastAPI's OpenAPI 3.1 schema gives a file only a ``contentMediaType``, which generators
    take for text (sent as a plain field, which the service refuses): ``format: binary``
    makes it a file. A field an operation's ``openapi_extra`` requires beside the body's
    ``$ref`` (``/cls/batch``'s ``file``, optional to FastAPI) goes unread by generators: it
    is required in the body's own schema instead, without the null FastAPI allows.
    """
    build_schema = app.openapi

    def schema_with_files() -> dict[str, Any]:
        built = app.openapi_schema is not None
        schema = build_schema()
        if not built:
            components = schema.get("components", {}).get("schemas", {})
            for operations in schema["paths"].values():
                for operation in operations.values():
                    content = operation.get("requestBody", {}).get("content", {})
                    body = content.get("multipart/form-data", {}).get("schema", {})
                    if "$ref" in body:
                        _describe_form(components[body["$ref"].rsplit("/", 1)[-1]], body)
        return schema

    app.openapi = schema_with_files  # type: ignore[method-assign]


def _describe_form(form: dict[str, Any], body: dict[str, Any]) -> None:
    properties = form["properties"]
    for name in body.pop("required", []):
        if name not in form.setdefault("required", []):
            form["required"].append(name)
        field = properties[name]
        branches = [b for b in field.pop("anyOf", [field]) if b.get("type") != "null"]
        field.update(branches[0])
        if field.get("type") == "array":
            field["minItems"] = 1
    for field in properties.values():
        for schema in (field, field.get("items", {})):
            if schema.get("contentMediaType") == "application/octet-stream":
                schema["format"] = "binary"


def document_the_api_key(app: FastAPI, open_paths: frozenset[str]) -> None:
    """With API_KEY set, the OpenAPI schema says which routes need it, how to send it, and
    their 401."""
    build_schema = app.openapi

    def schema_with_the_key() -> dict[str, Any]:
        built = app.openapi_schema is not None
        schema = build_schema()
        if not built:
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKeyHeader": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
            for path, operations in schema["paths"].items():
                if path not in open_paths:
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}, {"apiKeyHeader": []}]
                        unauthorized = {
                            "description": _ERROR_DOCS[401],
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/ErrorOut"}
                                }
                            },
                        }
                        responses = {**operation["responses"], "401": unauthorized}
                        operation["responses"] = dict(sorted(responses.items()))
        return schema

    app.openapi = schema_with_the_key  # type: ignore[method-assign]


def documentation_paths(app: FastAPI) -> frozenset[str]:
    """The paths FastAPI serves the API's documentation and schema at."""
    paths = (app.docs_url, app.swagger_ui_oauth2_redirect_url, app.redoc_url, app.openapi_url)
    return frozenset(path for path in paths if path is not None)


def task_response(record: TaskRecord) -> JSONResponse:
    """``GET /task-status/{id}``'s answer for ``record``, as ``TaskOut`` documents it."""
    fields: dict[str, object] = {}
    if record.status is TaskStatus.SUCCEEDED:
        fields["prediction"] = record.prediction
    elif record.error is not None:
        fields["error"] = record.error
    webhook = None
    # A cancelled task sends no webhook, so it has no delivery to report.
    if record.webhook_status is not None or (
        record.callback_url is not None and record.status is not TaskStatus.CANCELLED
    ):
        webhook = WebhookOut(
            status=record.webhook_status or "waiting",  # for the task to finish
            attempts=record.webhook_attempts,
            last_error=record.webhook_last_error,
            next_attempt_at=_utc(record.webhook_next_attempt_at),
        )
    task = TaskOut.model_validate(
        {
            "task_id": record.id,
            "status": record.status,
            **fields,
            "metadata": record.metadata,
            "created_at": _utc(record.created_at),
            "started_at": _utc(record.started_at),
            "finished_at": _utc(record.finished_at),
            "webhook": webhook,
        }
    )
    # Only the one of prediction and error that applies.
    return JSONResponse(task.model_dump(mode="json", exclude_unset=True))


def _utc(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


def predictions_out(predictions: list[Prediction]) -> list[PredictionOut]:
    """The model's predictions as the API answers them."""
    return [PredictionOut(index=p.index, label=p.label, score=p.score) for p in predictions]
