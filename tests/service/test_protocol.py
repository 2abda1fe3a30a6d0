"""The HTTP protocol's own limits and errors, on a real uvicorn server with a small app."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from prometheus_client import REGISTRY
from starlette.types import Receive, Scope, Send
from uvicorn.server import ServerState

from service import logs, protocol
from tests.server import free_port
from tests.support import run_python

HEAD_TIMEOUT_S = 1.0
# The documented limit, not the module's constant: a change to the constant must show.
HEAD_LIMIT_BYTES = 64 * 1024
# Longer than the head timeout: how long a connection with no request under way stays open.
KEEP_ALIVE_S = 2.5
# Well past the head timeout: a request the app takes this long on must still be answered.
SLOW_APP_S = 2.5
# How long a connection goes on reading after an early answer: at most LINGER_IDLE_S
# between two reads, LINGER_TOTAL_S in all.
LINGER_IDLE_S = 1.0
LINGER_TOTAL_S = 3.0
# How long a client may read nothing of an answer that fills its connection's buffers.
SEND_TIMEOUT_S = 1.0
# Far more than the kernel's buffers on both sides of a loopback connection hold.
BIG_ANSWER_BYTES = 64 * 2**20


# Every request the app has begun to serve, by path.
STARTED_PATHS: list[str] = []
# What the protocol noted on each request it refused, once its app had ended.
REFUSALS: list[tuple[int, str]] = []


async def echo_length(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers 200 with the body's length and the request's header names, once the body is
    read, after SLOW_APP_S on /slow; on /early, 413 at once
    without reading the body, closing the connection, as a limit, a missing API key or a full
    queue is answered."""
    assert scope["type"] == "http"
    started_at = time.monotonic()
    STARTED_PATHS.append(scope["path"])
    if scope["path"] in ("/early", "/nowhere"):
        # /nowhere: an answer that keeps the connection, as a 404 to a body does.
        close = [(b"connection", b"close")] if scope["path"] == "/early" else []
        headers = [(b"content-length", b"0"), *close]
        status = 413 if scope["path"] == "/early" else 404
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    length, more_body = 0, True
    while more_body:
        message = await receive()
        length += len(message.get("body", b""))
        more_body = message.get("more_body", False)
    if scope["path"] == "/slow":
        await asyncio.sleep(SLOW_APP_S)
    names = [name.decode("latin-1") for name, _ in scope["headers"]]
    answer: dict[str, object] = {"length": length, "headers": names}
    if (ended_at := scope.get("state", {}).get(protocol.UPLOAD_END_STATE)) is not None:
        answer["read_after_s"] = started_at - ended_at
    if (began_at := scope.get("state", {}).get(protocol.REQUEST_START_STATE)) is not None:
        answer["begun_after_s"] = started_at - began_at
    body = json.dumps(answer).encode()
    if scope["path"] == "/big":
        body = b" " * BIG_ANSWER_BYTES + body  # still JSON
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
    if (refused := scope.get("state", {}).get(protocol.REFUSED_STATE)) is not None:
        REFUSALS.append(refused)


@contextmanager
def serving(keep_alive_s: float) -> Iterator[int]:
    """uvicorn as the service runs it, with the echo app; its port."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protocol, "REQUEST_HEAD_TIMEOUT_S", HEAD_TIMEOUT_S)
        patch.setattr(protocol, "LINGER_IDLE_S", LINGER_IDLE_S)
        patch.setattr(protocol, "LINGER_TOTAL_S", LINGER_TOTAL_S)
        patch.setattr(protocol, "SEND_TIMEOUT_S", SEND_TIMEOUT_S)
        port = free_port()
        config = uvicorn.Config(
            echo_length,
            host="127.0.0.1",
            port=port,
            lifespan="off",
            log_level="error",
            timeout_keep_alive=keep_alive_s,
            **protocol.UVICORN_CONFIG,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        yield port
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with serving(KEEP_ALIVE_S) as port:
        yield port


@pytest.fixture(scope="module")
def short_keep_alive_port() -> Iterator[int]:
    """Keep-alive shorter than the head timeout, as by default (5 s against 10 s)."""
    with serving(HEAD_TIMEOUT_S / 2) as port:
        yield port


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_to_close(connection: socket.socket) -> bytes:
    received = b""
    try:
        while chunk := connection.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def request(path: str = "/", body: bytes = b"", extra_headers: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n{extra_headers}"
    return head.encode() + b"\r\n" + body


def send_until_answered(connection: socket.socket, piece: bytes, most_bytes: int) -> int:
    """Send ``piece`` again and again until an answer can be read (or ``most_bytes`` are
    sent); how many bytes were sent."""
    sent = 0
    while sent < most_bytes and not select.select([connection], [], [], 0)[0]:
        connection.sendall(piece)
        sent += len(piece)
    return sent


def json_error(answer: bytes, status: int) -> str:
    """The detail of a JSON error answer with ``status``, checking its head on the way."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").lower().split("\r\n")
    assert lines[0].startswith(f"http/1.1 {status} "), answer[:300]
    assert "content-type: application/json" in lines, head
    assert "connection: close" in lines, head
    assert any(line.startswith("x-request-id: ") for line in lines), head
    # As the app's answers are: a detail may quote the request, and is not to be sniffed.
    assert "x-content-type-options: nosniff" in lines, head
    detail: str = json.loads(body)["detail"]
    return detail


def ok_lengths(answer: bytes) -> list[int]:
    """The lengths reported by each 200 answer in ``answer``, in order."""
    lengths = []
    for part in answer.split(b"HTTP/1.1 ")[1:]:
        assert part.startswith(b"200 "), answer[:300]
        lengths.append(json.loads(part.partition(b"\r\n\r\n")[2])["length"])
    return lengths


def refused_by_server(status: int) -> float:
    sample = {"route": "unmatched", "method": "-", "status": str(status)}
    return REGISTRY.get_sample_value("http_requests_total", sample) or 0.0


@pytest.mark.parametrize(
    ("sent", "length"),
    [
        (request("/"), 0),
        (request("/", b"x" * 100), 100),
        # Each parsed again after its head, one after another (a thousand from within each
        # other would run out of Python's stack).
        (b"GET /a HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n", 0),
    ],
    ids=["no body", "bodies", "upgrades"],
)
def test_requests_sent_far_ahead_of_their_answers_are_refused_past_a_bound(
    port: int, sent: bytes, length: int
) -> None:
    """Each request queued behind the one being answered waits parsed: a client that sends
    20,000 a write without reading would have a worker hold gigabytes. Those within the bound
    are answered, each with its own body, then the next is refused and the connection
    closed."""
    with connect(port) as connection:
        connection.sendall(sent * 2000)
        answer = read_to_close(connection)
    *answers, refusal = answer.split(b"HTTP/1.1 ")[1:]
    assert protocol.MAX_PIPELINED_REQUESTS < len(answers) < 2000
    answered = b"".join(b"HTTP/1.1 " + part for part in answers)
    assert ok_lengths(answered) == [length] * len(answers)
    detail = json_error(b"HTTP/1.1 " + refusal, 429)
    assert detail.startswith("more than 32 requests were sent on this connection ahead of")


def test_a_request_refused_past_the_pipelining_bound_keeps_the_callers_id(port: int) -> None:
    """Its head was read whole, as the requests' answered before it were: its refusal
    carries the X-Request-ID it was sent with, as theirs do."""
    sent = request("/", extra_headers="X-Request-ID: mine-123\r\n")
    with connect(port) as connection:
        connection.sendall(sent * 40)
        answer = read_to_close(connection)
    refusal = b"HTTP/1.1 " + answer.split(b"HTTP/1.1 ")[-1]
    json_error(refusal, 429)
    assert b"\r\nx-request-id: mine-123\r\n" in refusal


def test_a_request_says_when_its_first_and_last_byte_arrived_not_when_the_app_read_it(
    port: int,
) -> None:
    """REQUEST_TIMEOUT_MS counts from the end of the upload, and a request's duration from
    its first byte: a request that waits behind another on its connection (or for a busy
    event loop) has its time running meanwhile; counted from when the app got to it, its
    deadline would fire that much late, and its duration leave the wait out."""
    with connect(port) as connection:
        connection.sendall(request("/slow", b"ab") + request("/", b"xyz", "Connection: close\r\n"))
        answer = read_to_close(connection)
    first, second = (
        json.loads(part.partition(b"\r\n\r\n")[2]) for part in answer.split(b"HTTP/1.1 ")[1:]
    )
    assert 0 <= first["read_after_s"] <= first["begun_after_s"] < 0.5
    assert SLOW_APP_S * 0.9 <= second["read_after_s"] <= second["begun_after_s"]


def test_a_bad_chunk_in_a_queued_request_is_answered_under_its_callers_id(port: int) -> None:
    chunked = (
        b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
        b"X-Request-ID: second-2\r\n\r\n3\r\nabc\r\nzz\r\n"
    )
    with connect(port) as connection:
        connection.sendall(request("/slow", b"ab") + chunked)
        answer = read_to_close(connection)
    refusal = b"HTTP/1.1 400 " + answer.rpartition(b"HTTP/1.1 400 ")[2]
    json_error(refusal, 400)
    assert b"\r\nx-request-id: second-2\r\n" in refusal


def test_bytes_that_are_not_http_get_a_json_400(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    counted = refused_by_server(400)
    with (
        caplog.at_level(logging.WARNING, logger="uvicorn.error"),
        caplog.at_level(logging.INFO, logger=logs.ACCESS_LOGGER),
        connect(port) as connection,
    ):
        connection.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nno colon here\r\n\r\n")
        answer = read_to_close(connection)
    assert "not valid HTTP/1.1" in json_error(answer, 400)
    assert refused_by_server(400) == counted + 1  # in the metrics, as app answers are
    # One line per refusal, the service's access line, as for every request the app
    # answers (what counts 4xx from access lines counts it); not uvicorn's too.
    assert not [r for r in caplog.records if r.name == "uvicorn.error"], caplog.records
    [line] = [r for r in caplog.records if r.name == logs.ACCESS_LOGGER]
    assert line.getMessage().startswith("- - answered 400 after ")
    assert line.__dict__["detail"] == protocol.UNPARSABLE


def test_bytes_that_are_not_http_after_whole_requests_are_refused_after_their_answers(
    port: int,
) -> None:
    """Pipelined requests are answered before the 400 for what follows them."""
    with connect(port) as connection:
        connection.sendall(request("/slow", b"ab") + request(body=b"abc") + b"GARBAGE\r\n\r\n")
        answer = read_to_close(connection)
    answers, _, refusal = answer.rpartition(b"HTTP/1.1 400 ")
    assert ok_lengths(answers) == [2, 3]
    assert "not valid HTTP/1.1" in json_error(b"HTTP/1.1 400 " + refusal, 400)


@pytest.mark.parametrize(("cancelled", "logged"), [(0, False), (1, True), (3, True)])
def test_uvicorns_line_on_requests_cut_off_at_shutdown_is_kept_only_when_it_cut_some(
    cancelled: int, logged: bool
) -> None:
    """With nothing to cut off (the batcher ended the drain and answered what it held), the
    ERROR line would fire on every routine deploy that ran out its drain time."""
    message = "Cancel %s running task(s), timeout graceful shutdown exceeded"
    record = logging.LogRecord("uvicorn.error", logging.ERROR, "", 0, message, (cancelled,), None)
    assert protocol._NO_REPEATS.filter(record) is logged


@pytest.mark.parametrize("upgrade", ["websocket", "h2c"])
def test_an_upgrade_request_is_served_as_the_plain_request_it_is(
    port: int, upgrade: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The service has no WebSocket route: left to uvicorn, such a request would get a
    plain-text 403 or 400, past the app (no request id, no JSON, not counted)."""
    head = (
        f"GET /x HTTP/1.1\r\nHost: test\r\nConnection: Upgrade\r\nUpgrade: {upgrade}\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    with caplog.at_level(logging.WARNING, logger="uvicorn.error"), connect(port) as connection:
        connection.sendall(head.encode())
        answer = b""
        while not answer.endswith(b"}"):
            answer += connection.recv(65536)
        connection.sendall(request(extra_headers="Connection: close\r\n"))
        answer += read_to_close(connection)
    assert ok_lengths(answer) == [0, 0]  # and the connection goes on
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


UPGRADE_H2C = (
    "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n"
)


@pytest.mark.parametrize("split", ["one write", "body later", "chunked"])
def test_an_upgrade_request_keeps_its_body_and_the_requests_behind_it(
    port: int, split: str
) -> None:
    """The parser skips an upgrade request's body and leaves what follows unread: else a
    ``curl --http2`` upload would reach the app with no body (422 "file: Field required"),
    and a request sent behind one never be answered."""
    body = b"x" * 5000
    if split == "chunked":
        head = f"POST /a HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n{UPGRADE_H2C}"
        first = head.encode() + b"\r\n" + b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    else:
        first = request("/a", body, UPGRADE_H2C)
    behind = request("/b", b"yy", "Connection: close\r\n")
    with connect(port) as connection:
        if split == "body later":
            cut = first.index(b"\r\n\r\n") + 4
            connection.sendall(first[:cut])
            time.sleep(0.2)
            connection.sendall(first[cut:] + behind)
        else:
            connection.sendall(first + behind)
        answer = read_to_close(connection)
    assert ok_lengths(answer) == [len(body), 2]


def test_a_read_of_many_upgrade_requests_answers_them_all(port: int) -> None:
    """Each is parsed again after its head: one after another, not each from within the
    last, which would run out of Python's stack (at a thousand) and drop the connection
    unanswered. As many as may wait behind the first."""
    count = protocol.MAX_PIPELINED_REQUESTS
    upgrade = b"GET /a HTTP/1.1\r\nHost: t\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n"
    with connect(port) as connection:
        connection.sendall(upgrade * count + request("/b", b"", "Connection: close\r\n"))
        answer = read_to_close(connection)
    assert ok_lengths(answer) == [0] * (count + 1)


def test_an_upgrade_request_behind_a_slow_one_waits_its_turn(port: int) -> None:
    with connect(port) as connection:
        connection.sendall(
            request("/slow", b"abc")
            + request("/a", b"x" * 10, UPGRADE_H2C)
            + request("/b", b"", "Connection: close\r\n")
        )
        answer = read_to_close(connection)
    assert ok_lengths(answer) == [3, 10, 0]


def test_a_chunk_size_that_is_not_hex_is_refused_at_once(port: int) -> None:
    """The bad bytes are inside the request being read: it can never be answered."""
    started = time.monotonic()
    with connect(port) as connection:
        connection.sendall(
            b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"
        )
        answer = read_to_close(connection)
    assert "not valid HTTP/1.1" in json_error(answer, 400)
    assert time.monotonic() - started < HEAD_TIMEOUT_S


def test_a_head_over_the_limit_is_refused_before_it_ends(port: int) -> None:
    """A header that never ends is cut off near the limit, not buffered for ever."""
    started = time.monotonic()
    with connect(port) as connection:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nX-Filler: ")
        sent = send_until_answered(connection, b"a" * 16384, 64 * protocol.MAX_REQUEST_HEAD_BYTES)
        answer = read_to_close(connection)
    assert sent < 64 * protocol.MAX_REQUEST_HEAD_BYTES, "the server read the whole header"
    assert "over 65536 bytes" in json_error(answer, 431)
    assert time.monotonic() - started < HEAD_TIMEOUT_S, "refused by size, not by the timer"


@pytest.mark.parametrize(("url_bytes", "pieces"), [(70_000, 1), (150_000, 1), (70_000, 40)])
def test_a_url_longer_than_the_parser_takes_is_414_naming_the_limit(
    port: int, url_bytes: int, pieces: int
) -> None:
    """Valid HTTP, but httptools parses URLs of at most 65,535 bytes: not a 400 that says the
    bytes are not HTTP, nor, sent in many reads, the 431 of a head over its limit."""
    head = b"GET /" + b"a" * url_bytes + b" HTTP/1.1\r\nHost: test\r\n\r\n"
    size = -(-len(head) // pieces)
    with connect(port) as connection:
        for start in range(0, len(head), size):
            connection.sendall(head[start : start + size])
            if pieces > 1:
                time.sleep(0.01)
        answer = read_to_close(connection)
    assert "the request's URL is over 65535 bytes" in json_error(answer, 414)


def test_a_head_just_under_the_limit_is_served(port: int) -> None:
    """Sent in reads of its own after the first, so that they count."""
    head = request(body=b"xyz", extra_headers=f"X-Filler: {'a' * (HEAD_LIMIT_BYTES - 200)}\r\n")
    pieces = [head[:20]] + [head[start : start + 8192] for start in range(20, len(head), 8192)]
    with connect(port) as connection:
        for piece in pieces:
            connection.sendall(piece)
            time.sleep(0.02)
        connection.shutdown(socket.SHUT_WR)
        assert ok_lengths(read_to_close(connection)) == [3]


def test_trailers_that_never_end_are_refused_like_a_head(port: int) -> None:
    """Trailer lines after a chunked body would be kept without limit by the parser."""
    with connect(port) as connection:
        connection.sendall(
            b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
        )
        sent = send_until_answered(connection, b"X-T: " + b"a" * 8000 + b"\r\n", 64 * 2**20)
        answer = read_to_close(connection)
    assert "over 65536 bytes" in json_error(answer, 431)
    assert sent < 16 * 2**20


def test_trailer_fields_never_join_the_requests_headers(port: int) -> None:
    """A trailer is not a header (RFC 9110, 6.5): merged, an API key or an Idempotency-Key
    sent as a trailer would count or not by how TCP split the bytes, past a proxy that
    checks the headers it sees. Trailers are dropped; the request behind is served."""
    with connect(port) as connection:
        connection.sendall(
            b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-API-Key: secret\r\nHost: elsewhere\r\n\r\n"
            + request(extra_headers="Connection: close\r\n")
        )
        answer = read_to_close(connection)
    assert ok_lengths(answer) == [5, 0]
    first = json.loads(answer.split(b"HTTP/1.1 ")[1].partition(b"\r\n\r\n")[2])
    assert first["headers"] == ["host", "transfer-encoding"]


def test_a_bad_chunk_in_a_queued_request_is_refused_after_the_answer_owed(port: int) -> None:
    chunked = (
        b"POST / HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n"
    )
    with connect(port) as connection:
        connection.sendall(request("/slow", b"ab") + chunked)
        answer = read_to_close(connection)
    answered, _, refusal = answer.rpartition(b"HTTP/1.1 400 ")
    assert ok_lengths(answered) == [2]
    json_error(b"HTTP/1.1 400 " + refusal, 400)


class RecordingTransport(asyncio.Transport):
    """What the protocol writes and whether it paused reading or closed; no socket."""

    def __init__(self, protocol: asyncio.BaseProtocol) -> None:
        super().__init__()
        self.protocol = protocol
        self.written = b""
        self.paused = self.closed = self.eof_written = False

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.protocol

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 5001) if name in ("sockname", "peername") else default

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += bytes(data)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True


async def test_a_read_that_ends_a_body_and_begins_a_head_does_not_count_as_head() -> None:
    """Reads cut exactly: the second ends a 100 KB body and begins the next request's head,
    which must not count that body against the head's limit (nor be refused for it)."""
    config = uvicorn.Config(echo_length, lifespan="off", **protocol.UVICORN_CONFIG)
    http = protocol.JsonErrorsHttpProtocol(config, ServerState(), {})
    transport = RecordingTransport(http)
    http.connection_made(transport)
    body = b"b" * 100_000
    first, second = request(body=body), b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"
    http.data_received(first[: -len(body)])
    http.data_received(first[-len(body) :] + second[:10])
    http.data_received(second[10:])
    async with asyncio.timeout(10):
        while transport.written.count(b"HTTP/1.1 ") < 2:
            await asyncio.sleep(0.01)
    assert ok_lengths(transport.written) == [len(body), 0]
    assert not transport.closed
    http.connection_lost(None)


async def test_the_servers_shutdown_tells_the_app_through_its_lifespan_state() -> None:
    config = uvicorn.Config(echo_length, lifespan="off", **protocol.UVICORN_CONFIG)
    calls: list[str] = []
    state = {protocol.SHUTDOWN_HOOK: lambda: calls.append("shutdown")}
    http = protocol.JsonErrorsHttpProtocol(config, ServerState(), state)
    transport = RecordingTransport(http)
    http.connection_made(transport)
    http.shutdown()
    assert calls == ["shutdown"]
    assert not transport.closed  # for a request already sent to be read
    await asyncio.sleep(protocol.UNREAD_REQUEST_WAIT_S * 2)
    assert transport.closed  # none came
    assert transport.written == b""
    http.connection_lost(None)


@pytest.mark.parametrize("read_before_shutdown", [0, 10], ids=["unread", "head begun"])
async def test_a_request_sent_as_the_shutdown_begins_is_answered_then_closed(
    read_before_shutdown: int,
) -> None:
    """A request in an idle connection's socket buffer, not read yet, or whose head has
    begun to arrive: uvicorn's own protocol would close the connection under it (a reset,
    or no answer)."""
    config = uvicorn.Config(echo_length, lifespan="off", **protocol.UVICORN_CONFIG)
    http = protocol.JsonErrorsHttpProtocol(config, ServerState(), {})
    transport = RecordingTransport(http)
    http.connection_made(transport)
    http.data_received(request(body=b"first"))
    async with asyncio.timeout(10):
        while b"HTTP/1.1 200" not in transport.written:
            await asyncio.sleep(0.01)
    transport.written = b""
    sent = request(body=b"second")
    http.data_received(sent[:read_before_shutdown])
    http.shutdown()
    http.data_received(sent[read_before_shutdown:])
    async with asyncio.timeout(10):
        while not transport.closed:
            await asyncio.sleep(0.01)
    assert ok_lengths(transport.written) == [len(b"second")]
    assert b"connection: close" in transport.written.lower()
    http.connection_lost(None)


async def test_a_reset_connection_leaves_no_keep_alive_timer() -> None:
    """uvicorn stops keep-alive only on a clean close; a reset's timer would hold the
    connection's state for the whole keep-alive time."""
    config = uvicorn.Config(echo_length, lifespan="off", **protocol.UVICORN_CONFIG)
    http = protocol.JsonErrorsHttpProtocol(config, ServerState(), {})
    http.connection_made(RecordingTransport(http))
    assert http.timeout_keep_alive_task is not None
    http.connection_lost(ConnectionResetError())
    assert http.timeout_keep_alive_task is None


def test_a_head_over_the_limit_after_a_request_is_refused_after_its_answer(port: int) -> None:
    with connect(port) as connection:
        connection.sendall(request("/slow", b"ab") + b"GET / HTTP/1.1\r\nHost: test\r\nX-F: ")
        # In reads of their own: a read that also ends an earlier request is not counted.
        try:
            for _ in range(8):
                time.sleep(0.02)
                connection.sendall(b"a" * (protocol.MAX_REQUEST_HEAD_BYTES // 2))
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_to_close(connection)
    answered, _, refusal = answer.rpartition(b"HTTP/1.1 431 ")
    assert ok_lengths(answered) == [2]
    assert "over 65536 bytes" in json_error(b"HTTP/1.1 431 " + refusal, 431)


def test_a_head_that_stalls_gets_a_408(port: int) -> None:
    started = time.monotonic()
    with connect(port) as connection:
        connection.sendall(b"POST / HTTP/1.1\r\nHost: test\r\n")
        answer = read_to_close(connection)
    assert f"within {HEAD_TIMEOUT_S:g} s" in json_error(answer, 408)
    assert HEAD_TIMEOUT_S * 0.9 < time.monotonic() - started < HEAD_TIMEOUT_S + 5


def test_a_head_that_stalls_behind_a_slow_answer_gets_it_then_a_408(port: int) -> None:
    """What comes after the 408 is decided (the rest of that head, a request more) is not
    served: one answer per request, in order."""
    stalled = b"POST / HTTP/1.1\r\nHost: te"
    with connect(port) as connection:
        connection.sendall(request("/slow", b"ab") + stalled)
        time.sleep(HEAD_TIMEOUT_S * 1.5)
        connection.sendall(b"st\r\nContent-Length: 0\r\n\r\n" + request(body=b"late"))
        answer = read_to_close(connection)
    answered, _, refusal = answer.rpartition(b"HTTP/1.1 408 ")
    assert ok_lengths(answered) == [2]
    json_error(b"HTTP/1.1 408 " + refusal, 408)


def test_a_head_left_unread_while_the_server_answers_others_is_served(port: int) -> None:
    """Behind a whole queued request the server stops reading; the head's time does not
    run out while its bytes wait unread."""
    following = request(body=b"cde", extra_headers="Connection: close\r\n")
    with connect(port) as connection:
        connection.sendall(request("/slow", b"a"))
        time.sleep(0.2)
        connection.sendall(request(body=b"b") + following[:10])
        time.sleep(0.2)
        connection.sendall(following[10:])
        assert ok_lengths(read_to_close(connection)) == [1, 1, 3]


def test_nothing_more_is_read_once_a_refusal_waits_for_the_answers_owed(port: int) -> None:
    """A queued request reading its body resumes reading; the refused head must not."""
    sent = 0
    done = threading.Event()

    def stream_header(connection: socket.socket) -> None:
        nonlocal sent
        try:
            while not done.is_set() and sent < 256 * 2**20:
                connection.sendall(b"a" * 65536)
                sent += 65536
        except OSError:
            pass

    with connect(port) as connection:
        first = request("/slow", b"a") + request("/slow", b"b")
        connection.sendall(first + b"GET / HTTP/1.1\r\nHost: test\r\nX-F: ")
        sender = threading.Thread(target=stream_header, args=(connection,))
        sender.start()
        answer = read_to_close(connection)
        done.set()
        sender.join(10)
    answered, _, refusal = answer.rpartition(b"HTTP/1.1 431 ")
    assert ok_lengths(answered) == [1, 1]
    json_error(b"HTTP/1.1 431 " + refusal, 431)
    # Socket buffers take a few MiB; a parser still reading takes tens.
    assert sent < 16 * 2**20, f"{sent / 2**20:.0f} MiB of header taken in"


def test_a_head_that_stalls_after_an_answer_gets_a_408_not_a_silent_close(
    short_keep_alive_port: int,
) -> None:
    """Keep-alive, which runs from the answer, would close the connection first."""
    with connect(short_keep_alive_port) as connection:
        connection.sendall(request(body=b"a") + b"GET / HT")
        answer = read_to_close(connection)
    answered, _, refusal = answer.rpartition(b"HTTP/1.1 408 ")
    assert ok_lengths(answered) == [1]
    json_error(b"HTTP/1.1 408 " + refusal, 408)


def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive(port: int) -> None:
    started = time.monotonic()
    with connect(port) as connection:
        assert read_to_close(connection) == b""
    assert KEEP_ALIVE_S * 0.9 < time.monotonic() - started < KEEP_ALIVE_S + 5


def test_an_idle_connection_between_requests_stays_open_for_the_keep_alive(port: int) -> None:
    """Idle is not a head that stalls: proxies reuse connections they believe open."""
    with connect(port) as connection:
        connection.sendall(request(body=b"a"))
        answer = b""
        while b'"length"' not in answer:
            answer += connection.recv(65536)
        time.sleep((HEAD_TIMEOUT_S + KEEP_ALIVE_S) / 2)
        connection.sendall(request(body=b"bc", extra_headers="Connection: close\r\n"))
        answer += read_to_close(connection)
    assert ok_lengths(answer) == [1, 2]


def test_a_head_trickled_within_the_timeout_is_served(port: int) -> None:
    head = request(body=b"12345")
    pieces = [head[start : start + 8] for start in range(0, len(head), 8)]
    with connect(port) as connection:
        for piece in pieces:
            connection.sendall(piece)
            time.sleep(HEAD_TIMEOUT_S / (4 * len(pieces)))
        connection.shutdown(socket.SHUT_WR)
        assert ok_lengths(read_to_close(connection)) == [5]


def test_a_slow_answer_is_not_cut_off(port: int) -> None:
    with connect(port) as connection:
        connection.sendall(request("/slow", b"ab", extra_headers="Connection: close\r\n"))
        assert ok_lengths(read_to_close(connection)) == [2]


def test_a_body_still_arriving_after_an_early_answer_is_not_cut_off(port: int) -> None:
    """A client that sends its whole body before reading sees the early answer (a 413, a
    401, a full queue's 503), not a reset, however long the body takes. Closed at once, the
    connection is reset by the body's next bytes, and a client whose write fails (asyncio's
    streams, so httpx) drops the answer unread."""
    body = b"z" * 100_000
    head = f"POST /early HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n\r\n"
    pieces = [body[start : start + 10_000] for start in range(0, len(body), 10_000)]
    with connect(port) as connection:
        connection.sendall(head.encode())
        for piece in pieces:
            time.sleep(LINGER_IDLE_S / 4)
            connection.sendall(piece)
        answer = read_to_close(connection)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert b"connection: close" in answer.lower()


def test_a_request_sent_behind_an_early_answer_is_not_served(port: int) -> None:
    """The early answer closes the connection: what was sent behind it is dropped unrun, as
    a close at once would drop it."""
    behind = b"POST /behind HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n" + b"b" * 10
    with connect(port) as connection:
        connection.sendall(request("/early", b"a" * 10) + behind)
        answer = read_to_close(connection)
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert answer.count(b"HTTP/1.1 ") == 1
    time.sleep(0.2)  # for a request started by mistake to have reached the app
    assert "/behind" not in STARTED_PATHS


def test_a_request_refused_while_its_app_runs_ends_quietly(
    port: int, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad chunk in the body of a request whose app is already answering: the 400 ends
    the connection, and the app finds its client gone, not a connection it cannot write
    to (three tracebacks)."""
    bad_chunk = b"POST /early HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\n"
    uvicorn_log = logging.getLogger("uvicorn.error")  # which does not propagate to root
    uvicorn_log.addHandler(caplog.handler)
    try:
        started = len(STARTED_PATHS)
        with connect(port) as connection:
            connection.sendall(bad_chunk)
            answer = read_to_close(connection)
        deadline = time.monotonic() + 5
        while len(STARTED_PATHS) == started and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # for the app to finish
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert "not valid HTTP/1.1" in json_error(answer, 400)
    assert STARTED_PATHS[started:] == ["/early"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records


@pytest.mark.parametrize("behind", ["whole requests", "a request cut off in its body"])
@pytest.mark.parametrize("how", ["close", "reset"])
def test_a_client_gone_while_pipelined_requests_wait_ends_them_quietly(
    port: int, caplog: pytest.LogCaptureFixture, behind: str, how: str
) -> None:
    """The request being answered learns that its client is gone too, not only the one
    parsed last: its app would write to a closed connection (three tracebacks)."""
    second = request("/", b"ab") * 2 if behind == "whole requests" else request("/", b"abc")[:-1]
    uvicorn_log = logging.getLogger("uvicorn.error")  # which does not propagate to root
    uvicorn_log.addHandler(caplog.handler)
    try:
        started = len(STARTED_PATHS)
        with connect(port) as connection:
            connection.sendall(request("/slow", b"a") + second)
            deadline = time.monotonic() + 5
            while STARTED_PATHS[started:] != ["/slow"] and time.monotonic() < deadline:
                time.sleep(0.01)
            if how == "reset":
                connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(SLOW_APP_S + 0.5)  # for /slow to answer, into the closed connection
    finally:
        uvicorn_log.removeHandler(caplog.handler)
    assert STARTED_PATHS[started:] == ["/slow"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records


def test_a_client_that_reads_nothing_of_a_large_answer_is_reset_after_the_send_timeout(
    port: int,
) -> None:
    """Without a bound, the connection and the answer's bytes would be held for good."""
    with connect(port) as connection:
        connection.sendall(request("/big", b"a"))
        time.sleep(SEND_TIMEOUT_S + 1.5)
        received = read_to_close(connection)
    assert 0 < len(received) < BIG_ANSWER_BYTES / 2


def test_an_answer_cut_off_by_the_send_timeout_is_not_counted_as_sent(port: int) -> None:
    """The request queued behind a large answer begins its own while the client reads
    nothing: its writes, after the reset, return as if read, yet it is neither counted nor
    logged as a 200 nobody got."""
    refused = len(REFUSALS)
    with connect(port) as connection:
        connection.sendall(request("/big", b"a") + request("/", b"b"))
        time.sleep(SEND_TIMEOUT_S + 1.5)
        read_to_close(connection)
    assert REFUSALS[refused:] == [
        (499, "the client read nothing of its answer for 1 s; its connection was reset")
    ]


def test_a_client_that_reads_a_large_answer_slowly_gets_all_of_it(port: int) -> None:
    with connect(port) as connection:
        connection.sendall(request("/big", b"a", extra_headers="Connection: close\r\n"))
        received = b""
        while chunk := connection.recv(2**20):
            received += chunk
            time.sleep(SEND_TIMEOUT_S / 40)  # reading, slower than loopback sends
    assert ok_lengths(received) == [1]


def sends_fail_after(connection: socket.socket, interval_s: float, most_s: float) -> float:
    """Send a byte every ``interval_s`` until a send fails (the server closed, and its reset
    came back) or ``most_s`` pass; the seconds that took."""
    started = time.monotonic()
    while time.monotonic() - started < most_s:
        try:
            connection.sendall(b"z")
        except OSError:
            break
        time.sleep(interval_s)
    return time.monotonic() - started


def test_after_an_early_answer_the_connection_reads_until_the_client_goes_quiet(
    port: int,
) -> None:
    head = b"POST /early HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\n"
    with connect(port) as connection:
        connection.sendall(head)
        assert read_to_close(connection).startswith(b"HTTP/1.1 413 ")  # then its end
        # Bytes keep coming, a few at a time: read and dropped.
        assert sends_fail_after(connection, LINGER_IDLE_S / 4, LINGER_IDLE_S * 2) > (
            LINGER_IDLE_S * 1.9
        )
        time.sleep(LINGER_IDLE_S * 1.5)  # quiet for longer than the server waits
        assert sends_fail_after(connection, 0.05, LINGER_IDLE_S) < LINGER_IDLE_S / 2


def test_after_an_early_answer_the_connection_reads_for_a_bounded_time(port: int) -> None:
    head = b"POST /early HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n\r\n"
    with connect(port) as connection:
        connection.sendall(head)
        assert read_to_close(connection).startswith(b"HTTP/1.1 413 ")
        lingered_s = sends_fail_after(connection, LINGER_IDLE_S / 4, LINGER_TOTAL_S * 3)
    assert LINGER_TOTAL_S * 0.8 < lingered_s < LINGER_TOTAL_S + 2


def test_a_body_answered_early_on_a_kept_connection_is_read_for_a_bounded_time(
    port: int,
) -> None:
    """An early answer that keeps the connection (a 404 to a body): the rest of the body is
    read and dropped as it comes, but no longer than a lingering connection would read."""
    head = b"POST /nowhere HTTP/1.1\r\nHost: test\r\nContent-Length: 100000000\r\n\r\n"
    with connect(port) as connection:
        connection.sendall(head)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += connection.recv(65536)
        assert answer.startswith(b"HTTP/1.1 404 ")
        assert b"connection: close" not in answer.lower()
        read_s = sends_fail_after(connection, LINGER_IDLE_S / 4, LINGER_TOTAL_S * 3)
    assert LINGER_TOTAL_S * 0.8 < read_s < LINGER_TOTAL_S + 2


async def test_a_lingering_connection_closes_soon_once_the_server_shuts_down() -> None:
    config = uvicorn.Config(echo_length, lifespan="off", **protocol.UVICORN_CONFIG)
    http = protocol.JsonErrorsHttpProtocol(config, ServerState(), {})
    transport = RecordingTransport(http)
    http.connection_made(transport)
    http.data_received(b"POST /early HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\nab")
    async with asyncio.timeout(10):
        while not transport.eof_written:
            await asyncio.sleep(0.01)
    assert transport.written.startswith(b"HTTP/1.1 413 ")
    http.data_received(b"cd")  # dropped: no second answer
    await asyncio.sleep(0.1)
    assert not transport.closed
    started = time.monotonic()
    http.shutdown()
    async with asyncio.timeout(protocol.LINGER_AT_SHUTDOWN_S + 5):
        while not transport.closed:
            await asyncio.sleep(0.01)
    assert time.monotonic() - started > protocol.LINGER_AT_SHUTDOWN_S * 0.9
    assert transport.written.count(b"HTTP/1.1 ") == 1
    http.connection_lost(None)


def test_a_connection_that_sends_only_blank_lines_is_closed_after_the_keep_alive(
    port: int,
) -> None:
    """Blank lines begin no request: however often they come, the connection is idle."""
    done = threading.Event()

    def send_blank_lines(connection: socket.socket) -> None:
        try:
            while not done.wait(KEEP_ALIVE_S / 5):
                connection.sendall(b"\r\n")
        except OSError:
            pass

    started = time.monotonic()
    with connect(port) as connection:
        connection.sendall(b"\r\n")
        sender = threading.Thread(target=send_blank_lines, args=(connection,))
        sender.start()
        try:
            assert read_to_close(connection) == b""
        finally:
            done.set()
            sender.join(10)
    # uvicorn's own timer, armed by an answer or by a new connection, may run once more.
    assert KEEP_ALIVE_S * 0.9 < time.monotonic() - started < 2 * KEEP_ALIVE_S + 3


def test_uvicorns_repeated_lines_are_dropped_only_where_this_protocol_serves() -> None:
    """uvicorn's own protocol logs its refusals nowhere else: importing this module (as
    the app does) must not drop its lines; serving with this protocol does, once."""
    code = (
        "import logging, uvicorn\n"
        "from uvicorn.server import ServerState\n"
        "from service import protocol\n"
        "log = logging.getLogger('uvicorn.error')\n"
        "print(len(log.filters))\n"
        "config = uvicorn.Config(None, lifespan='off', **protocol.UVICORN_CONFIG)\n"
        "for _ in range(2):\n"
        "    protocol.JsonErrorsHttpProtocol(config, ServerState(), {})\n"
        "print(len(log.filters))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "1"]


@pytest.mark.parametrize(("version", "continues"), [("1.1", True), ("1.0", False)])
def test_100_continue_is_sent_only_to_http_1_1_clients(
    port: int, version: str, continues: bool
) -> None:
    """An HTTP/1.0 client's Expect is ignored (RFC 9110, 10.1.1): it knows no interim answer
    and sends its body anyway, so its first answer is the request's own."""
    with connect(port) as connection:
        head = (
            f"POST / HTTP/{version}\r\nHost: test\r\nContent-Length: 3\r\n"
            "Expect: 100-continue\r\n\r\n"
        )
        connection.sendall(head.encode())
        if continues:
            assert connection.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n")
        connection.sendall(b"abc")
        answer = read_to_close(connection) if version == "1.0" else connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert b"100 Continue" not in answer
    assert ok_lengths(answer) == [3]


def test_gunicorns_master_makes_workers_without_checking_the_settings_again(
    tmp_path: Path,
) -> None:
    """The master makes each worker object before it forks it: a check of the settings
    there, finding the weights file replaced at that moment, would end the master itself,
    its workers left running without it."""
    weights = tmp_path / "weights.pt"
    weights.write_bytes(b"checked by the settings only for being there")
    code = f"""
import os
from gunicorn.config import Config
from gunicorn.glogging import Logger
from service.protocol import JsonErrorsUvicornWorker

config = Config()
def make():
    return JsonErrorsUvicornWorker(1, os.getpid(), [], None, 30, config, Logger(config))

make()
os.remove({str(weights)!r})
print(make().config.timeout_graceful_shutdown)
"""
    env = {**os.environ, "WEIGHTS": str(weights), "DRAIN_TIMEOUT_S": "7", "DEVICE": "cpu"}
    made = run_python(code, env=env)
    assert made.returncode == 0, made.stderr
    assert made.stdout.strip() == "7.0"
