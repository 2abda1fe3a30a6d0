"""uvicorn's HTTP protocol and gunicorn worker, with limits on a request's head and JSON errors.

A request uvicorn cannot parse never reaches the app, so the app's error handlers cannot
shape its answer, and uvicorn writes a plain-text 400. Nor does uvicorn bound a request's
head: it buffers header bytes for as long as they come, and waits for them for ever. This
protocol answers what it refuses with the same ``{"detail": ...}`` body and
``X-Request-ID`` as every other error, after the answers owed to whole requests sent
before it; it refuses a head over ``MAX_REQUEST_HEAD_BYTES`` (431) or not complete within
``REQUEST_HEAD_TIMEOUT_S`` of its first byte (408), and closes a new connection that sends
nothing within the keep-alive time. ``gunicorn_config.py`` uses the worker; under uvicorn,
select the protocol with ``--http service.protocol:JsonErrorsHttpProtocol``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import select
import selectors
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

import httptools
from gunicorn.arbiter import Arbiter
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from service import logs
from service.settings import Settings, load_settings
from service.siblings import Siblings

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application
    from uvicorn.config import Config

# nginx's default (large_client_header_buffers) allows 32 KiB; twice that leaves room for
# large cookies or tokens while bounding what one connection can make a worker buffer.
MAX_REQUEST_HEAD_BYTES = 64 * 1024
# Requests a client may send ahead of their answers on one connection, each waiting parsed
# (its head, and its body up to uvicorn's 64 KiB): one that sent 20,000 a write without
# reading the answers would have a worker hold gigabytes. The next is refused, in its turn.
MAX_PIPELINED_REQUESTS = 32
# From a head's first byte to its last. A connection with no request under way is closed
# after KEEPALIVE_S, on a new connection as after an answer.
REQUEST_HEAD_TIMEOUT_S = 10.0
UNPARSABLE = "the request could not be parsed: the bytes sent are not valid HTTP/1.1"
# The longest URL httptools parses: its URL parser keeps offsets in 16 bits.
MAX_URL_BYTES = 65535
# Where the app's lifespan state may hold a callable, called once the server begins to shut
# down: the server then waits for open requests (up to DRAIN_TIMEOUT_S) before the app's
# own shutdown starts, and the app's drain counts from this moment.
SHUTDOWN_HOOK = "on_server_shutdown"
# The lifespan state's DRAIN_TIMEOUT_S, which bounds plain uvicorn's shutdown too.
DRAIN_TIMEOUT_STATE = "drain_timeout_s"
# Keys of a request's ASGI scope state: the id it is answered with, and, when this protocol
# refused its body (bytes it could not parse) while the app was reading it, the status and
# detail it answered (or, for an answer its client read nothing of, 499 and why it reset
# the connection): service.middleware then counts and logs the request so, once, not as
# the disconnect, or the answer sent into the void, that the app sees.
REQUEST_ID_STATE = "request_id"
REFUSED_STATE = "refused_by_server"
# Others: when the request's first byte and its last arrived (``time.monotonic()``).
REQUEST_START_STATE = "request_started_at"
UPLOAD_END_STATE = "upload_ended_at"
# Below this open-file limit, a worker's connections may run out of descriptors under load.
LOW_OPEN_FILE_LIMIT = 4096
# What the soft limit is raised to under an unlimited hard one, and the lower try: macOS
# refuses more than its OPEN_MAX there.
UNLIMITED_FILES_TRY = 65536
MACOS_OPEN_MAX = 10240
# At shutdown, how long an idle connection stays open for bytes already sent to it: more
# than one turn of the event loop, which reads them.
UNREAD_REQUEST_WAIT_S = 0.05
# At shutdown, how long the worker goes on taking in the connections waiting in its
# listening socket's backlog, should more keep coming.
BACKLOG_ACCEPT_S = 1.0
# What a request that the server stops before serving is told (service.errors answers the
# app's so too).
SHUTTING_DOWN = "the server is shutting down; retry"
# Stopped while it starts, with the server, how long a worker goes on reading what the
# connections it answered 503 still send, for their clients to read the answer and close.
UNSERVED_LINGER_S = 0.5
# After an answer given before its request's bytes were all read (an early 413, 401 or 503,
# a refusal), how long the connection goes on reading and dropping what the client still
# sends: closed at once, the bytes left unread make the kernel reset the connection, and a
# client that reads only once it has sent its whole request loses the answer. nginx's
# lingering_timeout (the most between two reads) and lingering_time (the most in all).
LINGER_IDLE_S = 5.0
LINGER_TOTAL_S = 30.0
# Once the server is shutting down, the most a connection lingers from then on.
LINGER_AT_SHUTDOWN_S = 1.0
# A worker that cannot start exits with gunicorn's boot error, which halts the server,
# unless other workers serve: then it exits with this, and gunicorn starts it again while
# they serve on. What changed since they started (a weights file) is the operator's to
# mend, and a halt would take the healthy workers down with it.
EXIT_RESTART = 1
EXIT_BOOT_ERROR = Arbiter.WORKER_BOOT_ERROR
# Before it exits so, it pauses this long times two to the power of the failures of the
# run since a worker last started, at most MAX_RESTART_PAUSE_S (and a quarter of the
# worker timeout): a replacement that fails the same way each time, its model loaded
# in vain, must not take a core from the workers that serve.
RESTART_PAUSE_S = 1.0
MAX_RESTART_PAUSE_S = 30.0
# How often a serving worker reports to the master (and checks that it can serve).
# uvicorn reports at the worker's own timeout, which gunicorn sets to half of
# WORKER_TIMEOUT_S: a worker could be killed after half of that of silence.
HEARTBEAT_INTERVAL_S = 1.0
# Where the app's state holds the worker's ``service.siblings.Siblings`` under gunicorn.
SIBLINGS_STATE = "siblings"
# Where it holds the function that names what keeps the worker from being alive, if any: the
# heartbeat stops while it does.
LIVENESS_STATE = "liveness_problem"
# How long a client may read nothing of an answer that fills the connection's buffers
# before the connection is reset: unbounded, it would hold the connection, the answer's
# bytes and the app writing them for good. nginx's send_timeout.
SEND_TIMEOUT_S = 60.0

logger = logging.getLogger("service")


class _NoRepeats(logging.Filter):
    """Drops uvicorn's lines that repeat what is logged already, or report nothing amiss:

    - "Invalid HTTP request received.", logged just before it calls ``send_400_response``,
      which logs the refusal with its request id and reason;
    - the traceback of each request cancelled when the drain's time is up: the request
      middleware has answered it 503, and uvicorn's own line counts them;
    - that line, an ERROR, when it counts none: the batcher ended the drain itself and
      answered what it held, and uvicorn's wait ran out only polling for their ends.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Invalid HTTP request received.":
            return False
        if str(record.msg).startswith("Cancel %s running task(s)") and record.args == (0,):
            return False
        cancelled = record.exc_info is not None and isinstance(
            record.exc_info[1], asyncio.CancelledError
        )
        return not (cancelled and str(record.msg).startswith("Exception in ASGI application"))


# On uvicorn's logger once this protocol serves: uvicorn's own protocol logs nothing else.
_NO_REPEATS = _NoRepeats()


def _request_id_header(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The first ``X-Request-ID`` among a parsed head's headers, if any."""
    value = next((value for name, value in headers if name == b"x-request-id"), None)
    return None if value is None else value.decode("latin-1")


class JsonErrorsHttpProtocol(HttpToolsProtocol):
    """httptools' protocol (uvicorn's default), bounding request heads, with JSON errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        logging.getLogger("uvicorn.error").addFilter(_NO_REPEATS)  # once: a no-op after
        drain_timeout_s = self.app_state.get(DRAIN_TIMEOUT_STATE)
        if self.config.timeout_graceful_shutdown is None and drain_timeout_s is not None:
            # Plain uvicorn, whose command line set no bound: bounded as under gunicorn
            # (JsonErrorsUvicornWorker), or an upload trickling in would hold the process.
            self.config.timeout_graceful_shutdown = max(drain_timeout_s, 0.01)
        self._head_bytes = 0
        self._in_head = False
        self._messages_begun = 0
        self._head_timer: asyncio.TimerHandle | None = None
        self._pending_refusal: tuple[int, str, str | None] | None = None
        self._message_began_at: float | None = None  # the latest message's first byte
        self._request_started_at = 0.0  # the same, by time.monotonic()
        self._message_open = False
        self._body_read = False
        self._idle_deadline: float | None = None
        self._early_answer_at: float | None = None  # a body still open was answered then
        self._last_request = False  # the server is shutting down: close after this one
        self._shutting_down = False
        self._linger_until: float | None = None  # set once the connection lingers
        self._linger_timer: asyncio.TimerHandle | None = None
        self._answering: RequestResponseCycle | None = None  # the request whose app runs
        self._send_timer: asyncio.TimerHandle | None = None  # while the client reads nothing
        self._reading = b""  # the bytes being parsed
        self._head_to_replay: bytes | None = None  # an upgrade request's head, less upgrade
        self._to_replay = b""  # that head, then the bytes the parser left after it
        self._pipeline_full = False  # requests from then on are refused, not queued

    def _unsupported_upgrade_warning(self) -> None:
        # Called as the parser stops at an upgrade request (WebSocket, h2c) that will not
        # be upgraded, in place of uvicorn's two warnings, which would also tell to install
        # a WebSocket library. The parser skipped its body and leaves what follows unread:
        # both are parsed again, after the request's head without its upgrade.
        error = sys.exc_info()[1]
        if self._head_to_replay is not None and error is not None:
            self._to_replay = self._head_to_replay + self._reading[error.args[0] :]
        self._head_to_replay = None

    def _head_without_upgrade(self) -> bytes:
        """The request's head as read, less its Upgrade header and Connection's upgrade."""
        lines = [
            b"%s %s HTTP/%s"
            % (self.parser.get_method(), self.url, self.parser.get_http_version().encode())
        ]
        for name, value in self.headers:
            if name == b"upgrade":
                continue
            if name == b"connection":
                tokens = [t.strip() for t in value.split(b",")]
                value = b", ".join(t for t in tokens if t and t.lower() != b"upgrade")
                if not value:
                    continue
            lines.append(name + b": " + value)
        return b"\r\n".join(lines) + b"\r\n\r\n"

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._keep_alive_if_idle()

    def shutdown(self) -> None:
        # Called on every open connection as the server's shutdown begins.
        hook = self.app_state.get(SHUTDOWN_HOOK)
        if hook is not None:
            hook()
        self._shutting_down = True
        if self._linger_until is not None:
            self._linger_until = min(self._linger_until, self.loop.time() + LINGER_AT_SHUTDOWN_S)
            self._arm_linger_timer()
            return
        if self.cycle is not None and not self.cycle.response_complete:
            super().shutdown()  # closes the connection once the response is sent
            return
        # No request is being answered. One may be arriving, or be in the socket's buffer,
        # unread yet: sent before the shutdown began, and a proxy would not resend it.
        # uvicorn would close the connection under it (a reset). It is answered instead,
        # on a connection closed after it; the head's timer bounds the wait for its end.
        self._last_request = True
        if not self._in_head:
            self.loop.call_later(UNREAD_REQUEST_WAIT_S, self._close_unless_a_request_began)

    def _close_unless_a_request_began(self) -> None:
        if self._in_head or self.transport.is_closing() or self._linger_until is not None:
            return
        if self.cycle is None or self.cycle.response_complete:
            self.transport.close()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self._answering = cycle
        super()._start_asgi_task(cycle, app)

    def connection_lost(self, exc: Exception | None) -> None:
        # uvicorn tells only the request parsed last that its client is gone. With requests
        # pipelined, the one being answered would write to the closed transport (uvloop
        # raises: three tracebacks, and a request counted as answered that nobody got).
        for cycle in (self._answering, *(queued for queued, _ in self.pipeline)):
            if cycle is not None and not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self._cancel_head_timer()
        if self._send_timer is not None:
            self._send_timer.cancel()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        # uvicorn stops keep-alive only on a clean close; after a reset its timer would
        # hold this connection's state until it ran out.
        self._unset_keepalive_if_required()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._watch_sending(self.transport.get_write_buffer_size())

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _watch_sending(self, buffered: int) -> None:
        self._send_timer = self.loop.call_later(SEND_TIMEOUT_S, self._check_sending, buffered)

    def _check_sending(self, buffered_before: int) -> None:
        # While writing is paused the app writes nothing more: a smaller buffer is the
        # client reading, however slowly.
        buffered = self.transport.get_write_buffer_size()
        if buffered < buffered_before:
            self._watch_sending(buffered)
            return
        self._send_timer = None
        logger.info(
            "a client read nothing of its answer for %g s; its connection is reset",
            SEND_TIMEOUT_S,
        )
        answering = self._answering
        if answering is not None and not answering.response_complete:
            # Its app's writes return as if read: not a 200 the client got.
            answering.scope.setdefault("state", {})[REFUSED_STATE] = (
                499,
                f"the client read nothing of its answer for {SEND_TIMEOUT_S:g} s; its "
                "connection was reset",
            )
        self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self._parse(data)
        # A loop, not a call from within: one read may hold a thousand upgrade requests.
        while self._to_replay and self.transport.get_protocol() is self:
            replay, self._to_replay = self._to_replay, b""
            self.parser = httptools.HttpRequestParser(self)
            self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn
            self._parse(replay)

    def _parse(self, data: bytes) -> None:
        if self._linger_until is not None:
            self._arm_linger_timer()  # what is read is dropped
            return
        if self._pending_refusal is not None:
            # Requests sent before are still being answered (their reads resume reading);
            # what comes after the refused bytes is neither parsed nor kept.
            self.flow.pause_reading()
            return
        begun = self._messages_begun
        self._body_read = False
        self._reading = data
        super().data_received(data)
        self._reading = b""
        if self.transport.get_protocol() is not self or self._linger_until is not None:
            return  # upgraded (uvicorn run without UVICORN_CONFIG's ws="none"), or refused
        if self._to_replay:
            return  # parsed again by ``data_received``, and counted then
        self._keep_alive_if_idle()
        if self._pending_refusal or self.transport.is_closing():
            return
        if self._in_head:
            # A read counts when all of it continued the head being read. The read that
            # began the head may also have ended an earlier request's body, and the one
            # that ends it may carry the body too, so both go uncounted: a head may pass
            # the limit by those two reads (at most 256 KiB each).
            if self._messages_begun == begun:
                self._head_bytes += len(data)
        elif self._message_open and not self._body_read:
            # Past the head, reads that carry no body are chunk framing or trailers, which
            # the parser would keep without limit too.
            self._head_bytes += len(data)
        if self._head_bytes > MAX_REQUEST_HEAD_BYTES and len(self.url) > MAX_URL_BYTES:
            self._refuse_url()  # the same answer however the URL's bytes were split
        elif self._head_bytes > MAX_REQUEST_HEAD_BYTES:
            self._refuse_in_turn(
                431,
                f"the request's line, headers and trailers are over {MAX_REQUEST_HEAD_BYTES} "
                "bytes, the most this server reads",
            )

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._message_began_at = self.loop.time()
        self._request_started_at = time.monotonic()
        self._messages_begun += 1
        self._in_head = True
        self._head_bytes = 0
        self._message_open = True
        self._idle_deadline = None
        self._early_answer_at = None
        # From a head's first byte, the rest of it must follow in time.
        self._start_head_timer()

    def on_header(self, name: bytes, value: bytes) -> None:
        # The parser reports a chunked body's trailer fields here too. A trailer is not a
        # header (RFC 9110, 6.5): merged, a key sent in one would count or not by how the
        # bytes were split, and past a proxy that checks the headers it sees.
        if self._in_head:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._cancel_head_timer()
        if (
            self.parser.should_upgrade()
            and not self._should_upgrade()
            and self.parser.get_method() != b"CONNECT"  # which is an upgrade in any form
        ):
            # Started here, the request would run without its body (see
            # ``_unsupported_upgrade_warning``): it starts when it is parsed again.
            self._head_to_replay = self._head_without_upgrade()
            return
        if self._pipeline_full or len(self.pipeline) >= MAX_PIPELINED_REQUESTS:
            self._pipeline_full = True
            self._refuse_in_turn(
                429,
                f"more than {MAX_PIPELINED_REQUESTS} requests were sent on this connection "
                "ahead of their answers; read the answers before sending more",
                # Its head was read whole: it is answered under the caller's id.
                request_id=logs.request_id_for(_request_id_header(self.headers)),
            )
            return
        if self.parser.get_http_version() == "1.0":
            # An HTTP/1.0 client knows no 100 Continue, and a server must ignore its Expect
            # (RFC 9110, 10.1.1): it sends the body anyway.
            self.expect_100_continue = False
        super().on_headers_complete()
        if self.cycle is not None:
            # A request's duration counts from here, not from when a busy event loop, or
            # the requests before it on the connection, let the app begin it.
            self.cycle.scope.setdefault("state", {})[REQUEST_START_STATE] = self._request_started_at
            self.cycle.transport = _LingeringClose(self)  # type: ignore[assignment]
            if self._last_request:
                self.cycle.keep_alive = False

    def on_body(self, body: bytes) -> None:
        self._body_read = True
        self._head_bytes = 0
        if not self._pipeline_full:  # a refused request's: not the last queued one's
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._head_to_replay is None and not self._pipeline_full:
            super().on_message_complete()
            if self.cycle is not None:
                # REQUEST_TIMEOUT_MS counts from here: the app reads the request later, by
                # as long as the event loop is busy (or the requests before it on the
                # connection run), and a deadline counted from then would fire that late.
                self.cycle.scope.setdefault("state", {})[UPLOAD_END_STATE] = time.monotonic()
        self._message_open = False

    def on_response_complete(self) -> None:
        owed = bool(self.pipeline)  # a request queued behind this one starts now
        super().on_response_complete()
        if self.transport.is_closing():
            return
        if self._linger_until is not None:
            self._unset_keepalive_if_required()  # the linger's own timer closes it
            return
        if self._message_open:
            self._early_answer_at = self.loop.time()
        if self._pending_refusal is not None:
            if owed:
                # A request sent before the refused bytes runs now; read nothing more.
                self.flow.pause_reading()
            else:
                self._refuse(*self._pending_refusal)
        elif self._in_head:
            # A head already begun has its own timer, which answers 408 when it runs out;
            # keep-alive would close the connection without a word.
            self._unset_keepalive_if_required()

    def send_400_response(self, msg: str) -> None:
        # Reached when the parser refuses bytes, before the app sees them as a request.
        if len(self.url) > MAX_URL_BYTES:  # valid HTTP, but more than the URL parser takes
            self._refuse_url()
            return
        self._refuse_in_turn(400, UNPARSABLE)

    def _refuse_url(self) -> None:
        self._refuse_in_turn(
            414, f"the request's URL is over {MAX_URL_BYTES} bytes, the most this server reads"
        )

    def _keep_alive_if_idle(self) -> None:
        """Arm uvicorn's keep-alive timer when no request is under way.

        uvicorn arms it only as a response ends and stops it at every read, so a new
        connection, or one sending bytes that begin no request (blank lines, the rest of
        a body answered early), would otherwise stay open for good.
        """
        if (
            self.timeout_keep_alive_task is not None
            or self._in_head
            or self.pipeline
            or (self.cycle is not None and not self.cycle.response_complete)
            or self.transport.is_closing()
        ):
            return
        if self._message_open:
            # The rest of a body answered early (a 404, say, kept alive): it may go on
            # while it keeps coming, for as long as a lingering connection reads.
            answered_at = self._early_answer_at
            since_s = 0.0 if answered_at is None else self.loop.time() - answered_at
            delay = max(0.0, min(self.timeout_keep_alive, LINGER_TOTAL_S - since_s))
        else:
            # Between requests, bytes that begin none do not put the close off.
            now = self.loop.time()
            if self._idle_deadline is None:
                self._idle_deadline = now + self.timeout_keep_alive
            delay = max(0.0, self._idle_deadline - now)
        self.timeout_keep_alive_task = self.loop.call_later(delay, self.timeout_keep_alive_handler)

    def _start_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(REQUEST_HEAD_TIMEOUT_S, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._in_head or self.transport.is_closing():
            return
        if self.flow.read_paused and self._pending_refusal is None:
            # The server stopped reading while it answers the requests ahead: the rest of
            # the head may be waiting unread. Its time runs again from here.
            self._start_head_timer()
            return
        self._refuse_in_turn(
            408,
            f"the request's line and headers did not arrive within {REQUEST_HEAD_TIMEOUT_S:g} s",
        )

    def _refuse_in_turn(self, status: int, detail: str, request_id: str | None = None) -> None:
        """Refuse the request being read, once the whole requests before it are answered.

        A client's bad request must not cost it the answers it is owed. Nothing more is
        read meanwhile: the refused bytes cannot be parsed or must not be buffered.
        """
        cycle = self.cycle
        # Refused bytes in a body belong to the request being read, which may be queued
        # behind others: then it will not run, and they are answered first.
        queued = [entry for entry in self.pipeline if entry[0] is cycle and cycle.more_body]
        if queued:
            self.pipeline.remove(queued[0])
            # Its head was read whole: it is answered under the caller's id.
            request_id = request_id or logs.request_id_for(
                _request_id_header(cycle.scope["headers"])
            )
        elif cycle is None or cycle.more_body or cycle.response_complete:
            # Nothing before the refused bytes is still being answered.
            in_app = cycle is not None and cycle.more_body and not cycle.response_started
            self._refuse(status, detail, request_id, of_request_in_app=in_app)
            return
        if self._pending_refusal is None:
            self._pending_refusal = (status, detail, request_id)
        self.flow.pause_reading()

    def _refuse(
        self,
        status: int,
        detail: str,
        request_id: str | None = None,
        *,
        of_request_in_app: bool = False,
    ) -> None:
        """Answer ``status`` with a JSON detail and close: the connection cannot go on.
        ``request_id``: the caller's, where the refused request's head was read; a new one
        otherwise. ``of_request_in_app``: the refused bytes are the body of the request the
        app is reading (or is about to), which the app's middleware counts and logs."""
        self._cancel_head_timer()
        if of_request_in_app and self.cycle is not None:
            state = self.cycle.scope.setdefault("state", {})
            if REQUEST_ID_STATE not in state:  # the app has not begun the request yet
                supplied = _request_id_header(self.cycle.scope["headers"])
                state[REQUEST_ID_STATE] = logs.request_id_for(supplied)
            request_id = state[REQUEST_ID_STATE]
            state[REFUSED_STATE] = (status, detail)
        else:
            request_id = request_id or uuid.uuid4().hex
            began_at = self._message_began_at
            with logs.request_id_bound(request_id):
                # Its access line, as the app writes one for each request it answers: the
                # method and path are not read, or not to be trusted.
                logs.log_access(
                    "-",
                    "-",
                    status,
                    self.loop.time() - began_at if began_at is not None else 0.0,
                    {"detail": detail},
                    client=self.client[0] if self.client else None,
                )
            # Imported here: gunicorn's master imports this module to find the worker
            # class, and metrics must be created only in workers (their multiprocess files).
            from service import metrics

            metrics.record_refused_by_server(status)
        body = json.dumps({"detail": detail}).encode()
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"x-request-id: " + request_id.encode("ascii") + b"\r\n",
                # As service.middleware labels every answer of the app's.
                b"x-content-type-options: nosniff\r\n",
                b"connection: close\r\n",
                b"\r\n",
            ]
        )
        self.transport.write(b"".join(head) + body)
        self._linger()

    def _close_after_answer(self) -> None:
        """Close once a request's answer is sent: lingering while bytes may still come (its
        body, or a request sent behind it)."""
        if self._message_open and not self.transport.is_closing():
            self._linger()
        else:
            self.transport.close()

    def _linger(self) -> None:
        """Send what is written and no more, then drop what arrives until the client closes,
        it sends nothing for LINGER_IDLE_S, or LINGER_TOTAL_S have passed."""
        if self.transport.is_closing() or not self.transport.can_write_eof():
            self.transport.close()
            return
        self._cancel_head_timer()
        self._unset_keepalive_if_required()
        # The connection ends with this answer: a request queued behind it is not served,
        # and one being read is gone, as on a closed connection (its app would otherwise
        # wait for a body that is dropped, and write after the end).
        self.pipeline.clear()
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.disconnected = True
            cycle.waiting_for_100_continue = False
            cycle.message_event.set()
        linger_s = LINGER_AT_SHUTDOWN_S if self._shutting_down else LINGER_TOTAL_S
        self._linger_until = self.loop.time() + linger_s
        self.transport.write_eof()
        self.flow.resume_reading()
        self._arm_linger_timer()

    def _arm_linger_timer(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        assert self._linger_until is not None
        delay = min(LINGER_IDLE_S, max(0.0, self._linger_until - self.loop.time()))
        self._linger_timer = self.loop.call_later(delay, self.transport.close)


class _LingeringClose:
    """A request's transport as uvicorn's cycle sees it: closing it after an answer lingers
    while the request's body may still be arriving (``_close_after_answer``)."""

    def __init__(self, protocol: JsonErrorsHttpProtocol) -> None:
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._protocol.transport, name)

    def close(self) -> None:
        self._protocol._close_after_answer()


# What the service's uvicorn runs with. No WebSocket: the service has no such route, and
# uvicorn would refuse an upgrade request in plain text, past the app (so with no request
# id and no count); it is answered as the plain request it also is.
UVICORN_CONFIG: dict[str, Any] = {"http": JsonErrorsHttpProtocol, "ws": "none"}


class BacklogDrainingServer(Server):
    """uvicorn's server, which takes in the connections waiting in its listening sockets'
    backlogs before it closes them at shutdown.

    Their clients connected, and may have sent a whole request, before the shutdown began;
    closing the socket would reset them unanswered, and a proxy does not resend such a
    request. Taken in, they are served as the drain serves every open connection; by a
    worker stopped while it starts, with no other to serve them, answered 503, to retry.
    """

    def __init__(
        self,
        config: Config,
        listeners: list[socket.socket] | None = None,
        siblings: Siblings | None = None,
    ) -> None:
        super().__init__(config)
        self._listeners = listeners or []
        self._siblings = siblings
        self._exiting = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if not self.started:
            # Stopped while it starts: loading and warming up the model, which nothing
            # interrupts, may outlast gunicorn's graceful_timeout, which would then SIGKILL
            # the worker ("Perhaps out of memory?"). Nothing is served yet: nothing to drain.
            if self._exiting:
                return  # a second signal, in the middle of the first one's handling
            self._exiting = True
            _exit_while_starting(sig, self._listeners, self._siblings, logger.info)
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        loop = asyncio.get_running_loop()
        listening = [listener.fileno() for server in self.servers for listener in server.sockets]
        deadline = loop.time() + BACKLOG_ACCEPT_S
        # Polled: the kernel holds them, with no event to wait on, until the loop accepts them.
        while _any_connection_waiting(listening) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.001)
        await super().shutdown(sockets)


def _exit_while_starting(
    sig: int,
    listeners: list[socket.socket],
    siblings: Siblings | None,
    say: Callable[..., object],
) -> NoReturn:
    """Exit a worker stopped by ``sig`` before it serves. As the server stops, with no
    other worker to take them, the connections waiting for this one would be reset as the
    master closes its sockets; a proxy does not resend such a request. Each gets an answer
    instead. (Stopped by a reload, the worker that replaces it serves them.)"""
    say("stopped by %s while starting", signal.Signals(sig).name)
    if (
        siblings is not None
        and siblings.server_stopping()
        and not siblings.others_serving()
        and (answered := _answer_unserved_connections(listeners))
    ):
        say("answered %d waiting connections 503: %s", answered, SHUTTING_DOWN)
    logs.stop_writer()  # os._exit skips atexit: write the line out first
    sys.stderr.flush()
    os._exit(0)


def _any_connection_waiting(listening: list[int]) -> bool:
    ready, _, _ = select.select(listening, [], [], 0)
    return bool(ready)


def _answer_unserved_connections(listeners: list[socket.socket]) -> int:
    """Take in the connections waiting in ``listeners``' backlogs, for up to
    ``BACKLOG_ACCEPT_S`` should more keep coming, and answer each 503, to retry; how many
    were. Each is answered at once, its request read or not (an answer may come early),
    then all are read from and dropped together until their clients close, for up to
    ``UNSERVED_LINGER_S``: closed with bytes unread, a connection is reset, and its answer
    lost with it. ``listeners`` are closed meanwhile."""
    connections: list[socket.socket] = []
    deadline = time.monotonic() + BACKLOG_ACCEPT_S
    while time.monotonic() < deadline and _any_connection_waiting([s.fileno() for s in listeners]):
        for listener in listeners:
            try:
                connection, _ = listener.accept()
            except OSError:  # another worker took it, or nothing waits here
                continue
            connection.setblocking(False)
            with contextlib.suppress(OSError):  # the client left already
                connection.send(_unserved_answer())
                connection.shutdown(socket.SHUT_WR)
            connections.append(connection)
    for listener in listeners:
        # Closed by the master already: a client that connects again is refused, not
        # queued for a worker about to exit and then reset, its request sent or not.
        listener.close()
    with selectors.DefaultSelector() as selector:
        for connection in connections:
            selector.register(connection, selectors.EVENT_READ)
        linger_until = time.monotonic() + UNSERVED_LINGER_S
        while selector.get_map() and (left_s := linger_until - time.monotonic()) > 0:
            for key, _ in selector.select(left_s):
                connection = key.fileobj
                assert isinstance(connection, socket.socket)
                try:
                    if connection.recv(65536):
                        continue
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                selector.unregister(connection)  # the client closed, or reset it
                connection.close()
    for connection in connections:
        connection.close()
    return len(connections)


def _unserved_answer() -> bytes:
    body = json.dumps({"detail": SHUTTING_DOWN}).encode()
    return b"".join(
        [
            STATUS_LINE[503],
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
            b"retry-after: 1\r\n",
            b"x-request-id: " + uuid.uuid4().hex.encode("ascii") + b"\r\n",
            b"x-content-type-options: nosniff\r\n",
            b"connection: close\r\n",
            b"\r\n",
            body,
        ]
    )


class JsonErrorsUvicornWorker(UvicornWorker):
    """The uvicorn worker for gunicorn, serving with ``UVICORN_CONFIG``."""

    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {"loop": "auto", **UVICORN_CONFIG}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # On SIGTERM uvicorn waits for open requests without a bound, and gunicorn SIGKILLs
        # the worker at graceful_timeout, before the app's own shutdown (handing running
        # tasks back) has run. Requests still open after the drain time are cancelled
        # instead, and answered 503 (RequestContextMiddleware). A bound of 0 would report
        # a timeout even with nothing open (asyncio.wait_for gives the wait no turn).
        self.config.timeout_graceful_shutdown = max(_drain_timeout_s(), 0.01)
        self.config.timeout_notify = min(HEARTBEAT_INTERVAL_S, self.timeout)
        self._heart_stopped = False

    async def _serve(self) -> None:
        # As UvicornWorker's, with the server that takes in its backlog at shutdown.
        self.config.app = self.wsgi
        siblings = Siblings.from_environment()
        if (state := getattr(self.wsgi, "state", None)) is not None:
            setattr(state, SIBLINGS_STATE, siblings)
        server = BacklogDrainingServer(
            self.config, [listener.sock for listener in self.sockets], siblings
        )
        # The app imported: the server handles a stop from here. uvicorn puts back the
        # handlers it finds as its shutdown ends, and raises the signal again for them.
        for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(stop, signal.SIG_DFL)
        self._install_sigquit_handler()
        # The sockets themselves, not gunicorn's wrappers: uvloop detaches a socket whose
        # descriptor it closes, but closes a wrapper a second time, which could close a
        # file another thread had just opened under the same number.
        await server.serve(sockets=[listener.sock for listener in self.sockets])
        if not server.started:
            others_serve = siblings is not None and siblings.others_serving()
            sys.exit(EXIT_RESTART if others_serve else EXIT_BOOT_ERROR)

    def init_signals(self) -> None:
        super().init_signals()
        # Until uvicorn's server sets its own, past importing the app (seconds, torch's
        # among them), a stop would end the worker by the signal's default action.
        for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(stop, self._stopped_while_importing)

    def _stopped_while_importing(self, sig: int, frame: FrameType | None) -> None:
        for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            signal.signal(stop, signal.SIG_IGN)  # another, while this one is handled
        listeners = [listener.sock for listener in self.sockets]
        _exit_while_starting(sig, listeners, Siblings.from_environment(), self.log.info)

    def init_process(self) -> None:
        # Until a worker first reports, its heartbeat file holds the wall-clock time it was
        # made at, which the master compares with its monotonic clock: a worker stuck
        # loading its model would never time out. Reporting now starts the clock, so
        # gunicorn's timeout (WORKER_TIMEOUT_S) covers loading and warming up the model.
        self.notify()
        super().init_process()

    async def callback_notify(self) -> None:
        # /healthz answers for whichever worker takes the probe: with several workers, one
        # whose model is stuck would pass half the probes and answer 504 for good. Without
        # its heartbeat, gunicorn replaces it after WORKER_TIMEOUT_S.
        liveness_problem = getattr(getattr(self.wsgi, "state", None), LIVENESS_STATE, None)
        problem = liveness_problem() if liveness_problem is not None else None
        if problem is None:
            self._heart_stopped = False
            self.notify()
        elif not self._heart_stopped:
            self._heart_stopped = True
            logger.error(
                "the worker cannot serve (%s): its heartbeat stops until it can, and gunicorn "
                "replaces it if that lasts WORKER_TIMEOUT_S",
                problem,
            )

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGQUIT:
            # The master sends SIGQUIT when it gets SIGINT or SIGQUIT itself. uvicorn stops
            # only on SIGINT and SIGTERM: the worker would serve on until the master
            # SIGKILLs it at graceful_timeout, without draining. Stop as on SIGTERM.
            signal.raise_signal(signal.SIGTERM)


@functools.cache
def _drain_timeout_s() -> float:
    """DRAIN_TIMEOUT_S, read once: gunicorn's master makes each worker object before it
    forks it, and a check of the settings that failed there (a weights file replaced just
    then) would end the master, leaving its workers without it."""
    return load_settings().drain_timeout_s


def restart_pause_s(failures: int, worker_timeout_s: float) -> float:
    """How long a worker that could not start waits before it exits to be started again."""
    doubled = RESTART_PAUSE_S * 2 ** min(failures - 1, 16)
    return min(doubled, MAX_RESTART_PAUSE_S, worker_timeout_s / 4)


def restart_while_others_serve() -> None:
    """In a gunicorn worker started while others serve, whose start is refused for its
    configuration: what the master found valid no longer is (a file a setting names
    removed since), and the worker exits to be started again after a pause, as one whose
    model cannot load does (the lifespan), rather than stop the server, and the workers
    that serve, with exit status 3. Returns anywhere else."""
    siblings = Siblings.from_environment()
    if siblings is None or not siblings.others_serving():
        return
    pause_s = restart_pause_s(siblings.failed_to_start(), _worker_timeout_s())
    print(
        logs.unconfigured_line(
            f"gunicorn starts this worker again in {pause_s:g} s, and the other workers "
            "serve meanwhile"
        ),
        file=sys.stderr,
        flush=True,
    )
    pause_then_restart(pause_s)


def _worker_timeout_s() -> float:
    """WORKER_TIMEOUT_S as set (in any case), or its default, where the settings as a
    whole were refused."""
    for name, value in os.environ.items():
        if name.upper() == "WORKER_TIMEOUT_S":
            with contextlib.suppress(ValueError):
                return float(value)
    return float(Settings.model_fields["worker_timeout_s"].default)


def pause_then_restart(seconds: float) -> NoReturn:
    """Sleep ``seconds``, then exit for gunicorn to start the worker again; exit 0 at once
    if the master stops it meanwhile (SIGTERM, SIGINT, SIGQUIT): a worker that could not
    start has nothing to drain, nor to start again, and gunicorn logs any other exit
    status as an error."""
    stopped = threading.Event()
    for stop in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        signal.signal(stop, lambda *_: stopped.set())
    os._exit(0 if stopped.wait(seconds) else EXIT_RESTART)


def raise_open_file_limit() -> str | None:
    """Raise this process's soft limit on open files to its hard limit, as nginx and Go do;
    a warning if it stays low, else None.

    Each connection holds a descriptor. Out of them, the event loop's libuv closes every
    connection waiting to be accepted at once (its EMFILE handling), requests already sent
    unanswered and unlogged: 1,024, a common default soft limit, is about 1,000 clients.
    """
    import resource  # Unix only, as gunicorn is

    unlimited = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == unlimited:
        return None
    # An unlimited hard limit (macOS) still has a ceiling the kernel enforces: try below it.
    for target in [hard] if hard != unlimited else [UNLIMITED_FILES_TRY, MACOS_OPEN_MAX]:
        if soft >= target:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            continue  # left as it is, or tried lower: the warning below says what it is
        soft = target
        break
    if soft >= LOW_OPEN_FILE_LIMIT:
        return None
    shown_hard = "unlimited" if hard == unlimited else hard
    return (
        f"the open-file limit is {soft} (its hard limit {shown_hard}): each worker holds "
        "that many connections less the 25 to 40 files it keeps open itself (task store, "
        "metrics, pipes), and past it connections are closed unanswered; raise it "
        "(ulimit -n, compose's ulimits: nofile, LimitNOFILE= in systemd)"
    )
