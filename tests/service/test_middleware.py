"""The request middleware: its answer to a request that the server's shutdown cut off, the
time it counts, and its second parser of multipart bodies."""

from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest
from starlette.types import Message, Receive, Scope, Send

from service import logs, metrics
from service.middleware import RequestContextMiddleware, _PartSizes
from service.protocol import REQUEST_START_STATE
from tests.corpus import BOUNDARY, multipart


async def waits_for_good(scope: Scope, receive: Receive, send: Send) -> None:
    await asyncio.Event().wait()


async def answer_when_cut_off(
    method: str, path: str, headers: list[tuple[bytes, bytes]] | None = None
) -> tuple[int, str]:
    """Run one request until it waits in its handler, cancel it as the server does once
    DRAIN_TIMEOUT_S is up, and return the status and detail it was answered."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    scope: Scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "path": path,
        "query_string": b"",
        "headers": [(b"host", b"test"), *(headers or [])],
        "client": ("127.0.0.1", 40000),
    }
    request = asyncio.create_task(RequestContextMiddleware(waits_for_good)(scope, receive, send))
    await asyncio.sleep(0.01)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request
    start, body = sent[0], sent[1]
    return start["status"], json.loads(body["body"])["detail"]


async def answers_at_once(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def test_a_request_is_timed_from_its_first_byte_where_the_protocol_noted_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not from when the app began it: a busy event loop, or the requests before it on its
    connection, would leave their wait out of its access line and latency histogram, and
    a 504 would seem to come before its deadline."""
    waited_s = 3.0
    scope: Scope = {
        "type": "http",
        "http_version": "1.1",
        "method": "GET",
        "path": "/healthz",
        "query_string": b"",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 40000),
        "state": {REQUEST_START_STATE: time.monotonic() - waited_s},
    }

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        pass

    def histogram(sample: str, **bound: str) -> float:
        labels = {"route": "unmatched", "method": "GET", "status_class": "2xx", **bound}
        return metrics.REGISTRY.get_sample_value(sample, labels) or 0.0

    def counts() -> tuple[float, float]:
        """Answers timed at most 2.5 s, and all."""
        return (
            histogram("http_request_duration_seconds_bucket", le="2.5"),
            histogram("http_request_duration_seconds_count"),
        )

    fast_before, all_before = counts()
    with caplog.at_level(logging.INFO, logger=logs.ACCESS_LOGGER):
        await RequestContextMiddleware(answers_at_once)(scope, receive, send)
    [line] = [r for r in caplog.records if r.name == logs.ACCESS_LOGGER]
    assert waited_s * 1000 <= line.__dict__["duration_ms"] < (waited_s + 2) * 1000
    assert counts() == (fast_before, all_before + 1)


async def test_a_request_cut_off_by_the_shutdown_is_told_to_retry() -> None:
    status, detail = await answer_when_cut_off("POST", "/cls")
    assert status == 503
    assert detail == "the server shut down before this request finished; retry"


async def test_a_task_submission_cut_off_by_the_shutdown_is_told_to_resend_its_key() -> None:
    """It may have been stored before the cut: its Idempotency-Key keeps a resend from
    making a second task."""
    key = [(b"idempotency-key", b"5f0c2a")]
    status, detail = await answer_when_cut_off("POST", "/tasks", key)
    assert status == 503
    assert detail == (
        "the server shut down before this request finished; retry (the task may have been "
        "stored: resend it with its Idempotency-Key)"
    )


async def test_a_task_submission_without_a_key_is_told_a_resend_may_store_it_twice() -> None:
    status, detail = await answer_when_cut_off("POST", "/tasks")
    assert status == 503
    assert detail == (
        "the server shut down before this request finished; retry (the task may have been "
        "stored, and a resend store another: send an Idempotency-Key with each submission "
        "to make resending safe)"
    )


def test_a_fields_utf8_is_checked_across_chunks_and_files_are_not() -> None:
    """The body arrives in chunks of any size: a character split between two is still
    UTF-8. A file's bytes, and a plain field named "file" (an image sent as a field, which
    the app answers for), are not text."""

    def not_utf8(parts: list[tuple[str, str | None, bytes, str | None]]) -> str | None:
        checker = _PartSizes(BOUNDARY.encode(), 2**20)
        for index in range(len(body := multipart(parts))):
            checker.feed(body[index : index + 1])
        assert checker.ended or checker.not_utf8 is not None
        return checker.not_utf8

    assert not_utf8([("metadata", None, '{"a": "é ✓ 😀"}'.encode(), None)]) is None
    assert not_utf8([("file", "a.jpg", b"\xff\xd8\xff", "image/jpeg")]) is None
    assert not_utf8([("file", None, b"\xff\xd8\xff", None)]) is None
    assert not_utf8([("metadata", None, b"ok", None), ("note", None, b"\xe9t\xe9", None)]) == "note"
    assert not_utf8([("metadata", None, "é".encode()[:1], None)]) == "metadata"  # cut short
