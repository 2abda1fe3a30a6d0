"""The containers' health probe finds the server wherever gunicorn binds it."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from service.probe import probe


class _Health(BaseHTTPRequestHandler):
    """/healthz is 200, anything else 503, as a draining server's /readyz is."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/healthz" else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class _UnixHttpServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _Ipv6HttpServer(ThreadingHTTPServer):
    address_family = socket.AF_INET6


@contextlib.contextmanager
def serving(server: socketserver.BaseServer) -> Iterator[None]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_it_asks_the_port_on_the_loopback_interface() -> None:
    server = ThreadingHTTPServer(("0.0.0.0", 0), _Health)
    port = str(server.server_address[1])
    with serving(server):
        assert probe("/healthz", {"PORT": port}) == 0
        assert probe("/readyz", {"PORT": port}) == 1
        for bind in (f"0.0.0.0:{port}", f"127.0.0.1:{port}", f"tcp://localhost:{port}"):
            assert probe("/healthz", {"BIND": bind, "PORT": "1"}) == 0, bind
        # The settings read names whatever their case, so gunicorn binds where these say.
        assert probe("/healthz", {"port": port}) == 0
        # And as they read numbers: gunicorn binds PORT=5001.0 on 5001.
        for written in (f"{port}.0", f" {port} "):
            assert probe("/healthz", {"PORT": written}) == 0, written
        assert probe("/healthz", {"bind": f"127.0.0.1:{port}", "PORT": "1"}) == 0


def test_it_reaches_an_ipv6_bind() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        server = _Ipv6HttpServer(("::1", 0), _Health)
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")
    port = server.server_address[1]
    with serving(server):
        assert probe("/healthz", {"BIND": f"[::1]:{port}"}) == 0
        assert probe("/healthz", {"BIND": f"[::]:{port}"}) == 0


def test_it_reaches_a_unix_socket(tmp_path: Path) -> None:
    path = tmp_path / "gunicorn.sock"
    server = _UnixHttpServer(str(path), _Health)
    with serving(server):
        assert probe("/healthz", {"BIND": f"unix:{path}"}) == 0
        assert probe("/readyz", {"BIND": f"unix:{path}"}) == 1


def test_no_server_is_unhealthy(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    assert probe("/healthz", {"PORT": str(port)}) == 1
    assert f"0.0.0.0:{port}/healthz" in capsys.readouterr().err
