"""The request middleware's answer to a request that the server's shutdown cut off."""

from __future__ import annotations

import asyncio
import json

import pytest
from starlette.types import Message, Receive, Scope, Send

from service.middleware import RequestContextMiddleware


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
