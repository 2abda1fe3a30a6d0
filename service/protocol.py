"""uvicorn's HTTP protocol and gunicorn worker, answering what they refuse themselves in JSON.

A request uvicorn cannot parse never reaches the app, so the app's error handlers cannot
shape its answer, and uvicorn writes a plain-text 400. These answer with the same
``{"detail": ...}`` body as every other error. ``gunicorn_config.py`` uses the worker;
under uvicorn, select the protocol with ``--http service.protocol:JsonErrorsHttpProtocol``.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn_worker import UvicornWorker

CONTENT_TYPE = b"application/json"


def _detail(message: str) -> bytes:
    return json.dumps({"detail": message}).encode()


class JsonErrorsHttpProtocol(HttpToolsProtocol):
    """httptools' protocol (uvicorn's default) with JSON bodies on its own errors."""

    def send_400_response(self, msg: str) -> None:
        # Reached only when the parser refuses the bytes, before the app sees a request.
        body = _detail("the request could not be parsed: the bytes sent are not valid HTTP/1.1")
        head = [STATUS_LINE[400]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend(
            [
                b"content-type: " + CONTENT_TYPE + b"\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
            ]
        )
        self.transport.write(b"".join(head) + body)
        self.transport.close()


class JsonErrorsUvicornWorker(UvicornWorker):
    """The uvicorn worker for gunicorn, serving with ``JsonErrorsHttpProtocol``."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "auto", "http": JsonErrorsHttpProtocol}
