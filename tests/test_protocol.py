"""The HTTP protocol's own limits and errors, on a real uvicorn server with a small app."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.types import Receive, Scope, Send

from service import protocol
from tests.server import free_port

HEAD_TIMEOUT_S = 0.5
# Well past the head timeout: a request the app takes this long on must still be answered.
SLOW_APP_S = 1.5


async def echo_length(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers 200 with the body's length, after SLOW_APP_S on /slow."""
    assert scope["type"] == "http"
    length, more_body = 0, True
    while more_body:
        message = await receive()
        length += len(message.get("body", b""))
        more_body = message.get("more_body", False)
    if scope["path"] == "/slow":
        await asyncio.sleep(SLOW_APP_S)
    body = json.dumps({"length": length}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def port() -> Iterator[int]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protocol, "REQUEST_HEAD_TIMEOUT_S", HEAD_TIMEOUT_S)
        port = free_port()
        config = uvicorn.Config(
            echo_length,
            host="127.0.0.1",
            port=port,
            lifespan="off",
            log_level="error",
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


def json_error(answer: bytes, status: int) -> str:
    """The detail of a JSON error answer with ``status``, checking its head on the way."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").lower().split("\r\n")
    assert lines[0].startswith(f"http/1.1 {status} "), answer[:300]
    assert "content-type: application/json" in lines, head
    assert "connection: close" in lines, head
    assert any(line.startswith("x-request-id: ") for line in lines), head
    detail: str = json.loads(body)["detail"]
    return detail


def ok_lengths(answer: bytes) -> list[int]:
    """The lengths reported by each 200 answer in ``answer``, in order."""
    lengths = []
    for part in answer.split(b"HTTP/1.1 ")[1:]:
        assert part.startswith(b"200 "), answer[:300]
        lengths.append(json.loads(part.partition(b"\r\n\r\n")[2])["length"])
    return lengths


def test_bytes_that_are_not_http_get_a_json_400(port: int) -> None:
    with connect(port) as connection:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nno colon here\r\n\r\n")
        answer = read_to_close(connection)
    assert "not valid HTTP/1.1" in json_error(answer, 400)


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


def test_an_upgrade_request_is_served_as_plain_http(port: int) -> None:
    """No WebSocket routes: the app answers, not an empty 403 from the server."""
    upgrade = "Connection: Upgrade, close\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    upgrade += "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    with connect(port) as connection:
        connection.sendall(request(body=b"", extra_headers=upgrade))
        assert ok_lengths(read_to_close(connection)) == [0]


def test_a_head_over_the_limit_is_refused_before_it_ends(port: int) -> None:
    """A header that never ends is cut off near the limit, not buffered for ever."""
    started = time.monotonic()
    with connect(port) as connection:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nX-Filler: ")
        sent = 0
        try:
            while sent < 64 * protocol.MAX_REQUEST_HEAD_BYTES:
                connection.sendall(b"a" * 16384)
                sent += 16384
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = read_to_close(connection)
    assert sent < 64 * protocol.MAX_REQUEST_HEAD_BYTES, "the server read the whole header"
    assert "over 65536 bytes" in json_error(answer, 431)
    assert time.monotonic() - started < HEAD_TIMEOUT_S, "refused by size, not by the timer"


def test_a_head_just_under_the_limit_is_served(port: int) -> None:
    filler = "a" * (protocol.MAX_REQUEST_HEAD_BYTES - 200)
    with connect(port) as connection:
        connection.sendall(request(body=b"xyz", extra_headers=f"X-Filler: {filler}\r\n"))
        connection.shutdown(socket.SHUT_WR)
        assert ok_lengths(read_to_close(connection)) == [3]


def test_pipelined_requests_with_large_bodies_are_not_taken_for_a_large_head(port: int) -> None:
    """Chunks that end one request's body and begin the next head count only as body."""
    body = b"b" * (3 * protocol.MAX_REQUEST_HEAD_BYTES)
    with connect(port) as connection:
        connection.sendall(request(body=body) * 3 + b"GET / HTTP/1.1\r\nHost: test\r\n")
        connection.sendall(b"Connection: close\r\n\r\n")
        assert ok_lengths(read_to_close(connection)) == [len(body)] * 3 + [0]


def test_a_head_that_stalls_gets_a_408(port: int) -> None:
    started = time.monotonic()
    with connect(port) as connection:
        connection.sendall(b"POST / HTTP/1.1\r\nHost: test\r\n")
        answer = read_to_close(connection)
    assert f"within {HEAD_TIMEOUT_S:g} s" in json_error(answer, 408)
    assert HEAD_TIMEOUT_S * 0.9 < time.monotonic() - started < HEAD_TIMEOUT_S + 5


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(port: int) -> None:
    started = time.monotonic()
    with connect(port) as connection:
        assert read_to_close(connection) == b""
    assert HEAD_TIMEOUT_S * 0.9 < time.monotonic() - started < HEAD_TIMEOUT_S + 5


def test_a_head_trickled_within_the_timeout_is_served(port: int) -> None:
    with connect(port) as connection:
        for byte in request(body=b"12345"):
            connection.sendall(bytes([byte]))
            time.sleep(HEAD_TIMEOUT_S / 200)
        connection.shutdown(socket.SHUT_WR)
        assert ok_lengths(read_to_close(connection)) == [5]


def test_the_timer_waits_for_a_slow_answer_and_restarts_after_it(port: int) -> None:
    """A request the app takes longer on than the head timeout is answered; the next
    request on the connection has the whole timeout again, from the answer's end."""
    with connect(port) as connection:
        connection.sendall(request("/slow", b"ab"))
        answer = b""
        while b'"length"' not in answer:
            answer += connection.recv(65536)
        time.sleep(HEAD_TIMEOUT_S * 0.6)
        connection.sendall(request(body=b"abc", extra_headers="Connection: close\r\n"))
        answer += read_to_close(connection)
    assert ok_lengths(answer) == [2, 3]
