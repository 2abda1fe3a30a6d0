"""uvicorn's HTTP protocol and gunicorn worker, with limits on a request's head and JSON errors.

A request uvicorn cannot parse never reaches the app, so the app's error handlers cannot
shape its answer, and uvicorn writes a plain-text 400. Nor does uvicorn bound a request's
head: it buffers header bytes for as long as they come, and waits for them for ever. This
protocol answers what it refuses with the same ``{"detail": ...}`` body and
``X-Request-ID`` as every other error, and refuses a head over ``MAX_REQUEST_HEAD_BYTES``
(431) or not complete within ``REQUEST_HEAD_TIMEOUT_S`` (408). ``gunicorn_config.py``
uses the worker; under uvicorn, select the protocol with
``--http service.protocol:JsonErrorsHttpProtocol --ws none``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn_worker import UvicornWorker

from service import logs

# nginx's default (large_client_header_buffers) allows 32 KiB; twice that leaves room for
# large cookies or tokens while bounding what one connection can make a worker buffer.
MAX_REQUEST_HEAD_BYTES = 64 * 1024
# From the connection's opening, or the previous response's end, to the head's last byte.
REQUEST_HEAD_TIMEOUT_S = 10.0
UNPARSABLE = "the request could not be parsed: the bytes sent are not valid HTTP/1.1"

logger = logging.getLogger("service")


class JsonErrorsHttpProtocol(HttpToolsProtocol):
    """httptools' protocol (uvicorn's default), bounding request heads, with JSON errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._in_head = False
        self._between_messages = True
        self._messages_begun = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._unparsable = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        between_messages, begun = self._between_messages, self._messages_begun
        super().data_received(data)
        if not self._in_head or self._unparsable or self.transport.is_closing():
            return
        # The chunk counts when all of it belongs to the head being read: it continued
        # that head, or began it with nothing before. One that also ended an earlier
        # message goes uncounted, so a head may exceed the limit by one chunk.
        new_messages = self._messages_begun - begun
        if new_messages == 0 or (new_messages == 1 and between_messages):
            self._head_bytes += len(data)
        if self._head_bytes > MAX_REQUEST_HEAD_BYTES:
            self._refuse(
                431,
                f"the request's line and headers are over {MAX_REQUEST_HEAD_BYTES} bytes, "
                "the most this server reads",
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._messages_begun += 1
        self._in_head = True
        self._between_messages = False
        self._head_bytes = 0

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._between_messages = True

    def on_response_complete(self) -> None:
        # A request queued behind this one (pipelined) has its head already.
        awaiting_head = not self.pipeline
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._unparsable and self.cycle.response_complete:
            self._refuse(400, UNPARSABLE)
        elif awaiting_head:
            self._arm_head_timer()

    def send_400_response(self, msg: str) -> None:
        # Reached when the parser refuses bytes, before the app sees them as a request.
        cycle = self.cycle
        if cycle is not None and not cycle.more_body and not cycle.response_complete:
            # They follow whole requests still being answered, which are answered first:
            # bad bytes must not cost a client the answers it is owed. Nothing more can be
            # parsed, so nothing more is read.
            self._unparsable = True
            self.flow.pause_reading()
            return
        self._refuse(400, UNPARSABLE)

    def _unsupported_upgrade_warning(self) -> None:
        # uvicorn's warning would tell the operator to install a WebSocket library.
        logger.debug("an Upgrade request is served as plain HTTP: there are no WebSocket routes")

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(REQUEST_HEAD_TIMEOUT_S, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._in_head:
            self._refuse(
                408,
                f"the request's line and headers did not arrive within "
                f"{REQUEST_HEAD_TIMEOUT_S:g} s",
            )
        else:
            # Nothing of a request came: close quietly, as keep-alive does when it expires.
            self.transport.close()

    def _refuse(self, status: int, detail: str) -> None:
        """Answer ``status`` with a JSON detail and close: the connection cannot go on."""
        self._cancel_head_timer()
        request_id = uuid.uuid4().hex
        token, _ = logs.begin_request(request_id)
        try:
            logger.warning("answered %d before a request reached the app: %s", status, detail)
        finally:
            logs.end_request(token)
        body = json.dumps({"detail": detail}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"x-request-id: " + request_id.encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
            ]
        )
        self.transport.write(b"".join(head) + body)
        self.transport.close()


# What the service's uvicorn runs with. It has no WebSocket routes: an Upgrade request is
# served as plain HTTP, with the app's own answer, rather than refused with an empty 403.
UVICORN_CONFIG: dict[str, Any] = {"http": JsonErrorsHttpProtocol, "ws": "none"}


class JsonErrorsUvicornWorker(UvicornWorker):
    """The uvicorn worker for gunicorn, serving with ``UVICORN_CONFIG``."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "auto", **UVICORN_CONFIG}
