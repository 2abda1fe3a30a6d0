"""The request middleware's answer to a request that the server's shutdown cut off."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.types import Message, Receive, Scope, Send

from service.middleware import RequestContextMiddleware, _PartSizes
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
