"""ASGI middleware: request ids and metrics, API keys, body size and time limits."""

from __future__ import annotations

import asyncio
import codecs
import hmac
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import (
    MAX_BOUNDARY_LENGTH,
    MultipartParser,
    parse_options_header,
)
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs, metrics
from service.protocol import REFUSED_STATE, REQUEST_ID_STATE, REQUEST_START_STATE

REQUEST_ID_HEADER = "x-request-id"
# A request's own time limit in milliseconds, when shorter than REQUEST_TIMEOUT_MS.
REQUEST_TIMEOUT_HEADER = "X-Request-Timeout-Ms"
# Seconds a client told that the server is busy (503) waits before it tries again.
RETRY_AFTER_S = "1"
INTERNAL_ERROR = "internal server error"  # all a client is told of a bug
# Sent with an answer given before the body was read to its end: the client may still be
# sending it, and whatever it sends next on this connection would be read as more body.
_UNREAD_BODY = {"Connection": "close"}
# An error answer is read this far for its access line's detail; every JSON error this
# service writes fits.
ERROR_BODY_READ_BYTES = 8192

logger = logging.getLogger(__name__)


class RequestContextMiddleware:
    """Assigns each request an id (``X-Request-ID``), records its status and latency in the
    metrics, and writes its access line."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        state = scope.setdefault("state", {})
        # From the request's first byte where the HTTP protocol noted it (not under plain
        # uvicorn's own).
        started = state.get(REQUEST_START_STATE, time.monotonic())
        # The HTTP protocol may have answered already (bytes of the body it could not
        # parse), under the id it chose.
        request_id = state.get(REQUEST_ID_STATE) or logs.request_id_for(
            Headers(scope=scope).get(REQUEST_ID_HEADER)
        )
        token, access_fields = logs.begin_request(request_id)
        # For the handler of unexpected errors, which Starlette runs outside this
        # middleware, and for the HTTP protocol, should it refuse the body.
        state[REQUEST_ID_STATE] = request_id
        status = 500
        response_started = False
        error_body = b""  # an error answer's first bytes, for its access line's detail

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started, error_body
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                # An error's detail can quote the request: no browser is to take an answer
                # for anything but the type it is labelled with.
                headers["X-Content-Type-Options"] = "nosniff"
            elif status >= 400 and len(error_body) < ERROR_BODY_READ_BYTES:
                error_body += message.get("body", b"")[:ERROR_BODY_READ_BYTES]
            await send(message)

        try:
            try:
                if (problem := _header_problem(scope)) is not None:
                    response = JSONResponse(
                        {"detail": problem}, status_code=400, headers=_UNREAD_BODY
                    )
                    await response(scope, receive, send_with_id)
                else:
                    await self.app(scope, receive, send_with_id)
            except asyncio.CancelledError as exc:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                # Not this request's own cancellation: something it awaited was cancelled
                # under it, a bug like any other.
                raise RuntimeError("a cancellation escaped the request's handler") from exc
        except asyncio.CancelledError:
            # The server cancels what still runs when its shutdown's drain time is up
            # (DRAIN_TIMEOUT_S): answer that in JSON, where it would send a plain 500.
            if response_started:
                raise
            detail = "the server shut down before this request finished; retry"
            if scope["method"] == "POST" and scope["path"].endswith("/tasks"):
                if "idempotency-key" in Headers(scope=scope):
                    detail += " (the task may have been stored: resend it with its Idempotency-Key)"
                else:
                    detail += (
                        " (the task may have been stored, and a resend store another: send an "
                        "Idempotency-Key with each submission to make resending safe)"
                    )
            await JSONResponse(
                {"detail": detail},
                status_code=503,
                headers={"Retry-After": RETRY_AFTER_S, **_UNREAD_BODY},
            )(scope, receive, send_with_id)
            raise  # a cancellation is passed on (service.protocol keeps it out of the log)
        except Exception:
            # A bug: logged once, here, where the request's id is bound. Passed on,
            # Starlette would answer it and raise it again for the server to log a
            # second traceback, without the id.
            logger.exception(
                "unhandled error on %s %s", scope["method"], logs.shown_path(scope["path"])
            )
            if response_started:
                raise  # the server closes the connection mid-response
            await JSONResponse({"detail": INTERNAL_ERROR}, status_code=500)(
                scope, receive, send_with_id
            )
        finally:
            elapsed_s = time.monotonic() - started
            client = scope.get("client")
            if (refused := state.get(REFUSED_STATE)) is not None:
                # What the caller was told, not the disconnect the app saw as it closed.
                status, access_fields["detail"] = refused
            elif error_body:
                access_fields["detail"] = _detail_of(error_body)
            logs.log_access(
                scope["method"],
                scope["path"],
                status,
                elapsed_s,
                access_fields,
                client=client[0] if client else None,
            )
            logs.end_request(token)
            metrics.record_request(_route_label(scope), scope["method"], status, elapsed_s)


def _detail_of(body: bytes) -> str | None:
    """The ``detail`` of a JSON error answer, if it is one: what the caller was told."""
    try:
        detail = json.loads(body)["detail"]
    except (ValueError, TypeError, KeyError):
        return None  # not JSON, or cut at ERROR_BODY_READ_BYTES: not worth guessing
    return detail if isinstance(detail, str) else json.dumps(detail)  # the log line cuts it


def _header_problem(scope: Scope) -> str | None:
    """What is wrong with the request's Host or Content-Type headers, if anything.

    HTTP/1.1 requires one Host (RFC 9112, 3.2): two may name different hosts to a proxy and
    to this server, which builds the URLs it answers (``status_url``, ``Location``) from
    the one it reads. Content-Type takes one value (RFC 9110, 8.3): a proxy that read
    another boundary than this server's parser would inspect other parts than it serves.
    """
    hosts = sum(1 for name, _ in scope["headers"] if name == b"host")
    if hosts > 1:
        return f"a request carries one Host header; this one has {hosts}"
    if hosts == 0 and scope["http_version"] == "1.1":
        return "an HTTP/1.1 request carries a Host header; this one has none"
    content_types = sum(1 for name, _ in scope["headers"] if name == b"content-type")
    if content_types > 1:
        return f"a request carries at most one Content-Type header; this one has {content_types}"
    return None


def _route_label(scope: Scope) -> str:
    """The route template of the request's path; "unmatched" for paths no route serves,
    so scanners cannot blow up the metrics' cardinality."""
    route = scope.get("route")
    if route is None and "app" in scope:
        # Refused before routing (a 401 or 413 from a middleware), or routed by a plain
        # Starlette route that does not record itself (the docs pages).
        route = matching_route(scope["app"], scope)
    return getattr(route, "path", None) or "unmatched"


def matching_route(app: Starlette, scope: Scope) -> BaseRoute | None:
    """The first of ``app``'s routes whose path matches the request's, whatever its method."""
    return next((each for each in app.router.routes if each.matches(scope)[0] != Match.NONE), None)


def serves(app: Starlette, scope: Scope) -> bool:
    """Whether one of ``app``'s routes takes the request's path and method."""
    return any(each.matches(scope)[0] == Match.FULL for each in app.router.routes)


@dataclass
class UploadsInFlight:
    """The body bytes that a worker's requests under way hold, in memory or spooled to the
    temporary directory, from their first byte until each request ends."""

    held_bytes: int = 0


class BodyLimitsMiddleware:
    """Refuses request bodies over a per-path size limit (413), multipart bodies with a
    part over ``part_limit_bytes`` (413), bodies that stall (408), and multipart bodies that end
    before their closing boundary, declare a charset other than UTF-8, or hold a plain field
    that is not UTF-8 (400: the app's parser would read it as Latin-1, without a word).

    A declared ``Content-Length`` over the limit is refused before any body is read; a
    body that grows past it (chunked, or lying about its length) is cut off mid-stream, and
    so is a part that grows past ``part_limit_bytes``: the multipart parser spools every file to
    disk whatever its size, so a body of many files must not hold one of any size. Parts
    are found by a second parser of the same kind as the app's (``_PartSizes``).
    A body whose next chunk does not arrive within ``idle_timeout_s`` is abandoned, and so
    is one that, past its first ``idle_timeout_s`` of waiting, arrives at less than
    ``min_bytes_per_s`` on average (a byte now and then would reset the first rule for
    ever): a slow or lying client cannot hold a connection and its buffers for ever. (The
    multipart parser takes a cut-off body for a complete one without its last part, which
    would be answered as a missing field.)
    What the requests under way hold together is bounded by ``in_flight_limit_bytes``: the
    request whose bytes take the total past it gets 503 (a request alone never does).
    A request that no route takes (``routed`` says) gets its 404 or 405 whatever its size.
    An answer sent before a body was read to its end closes the connection when the body
    is long, of unknown length, or awaited with ``Expect: 100-continue``: a client that
    waits for ``100 Continue`` may send its next request instead, which would be read as
    the rest of this body.
    """

    def __init__(
        self,
        app: ASGIApp,
        limit_bytes_by_path: Mapping[str, int],
        default_limit_bytes: int,
        describe: Callable[[int], str],
        part_limit_bytes: int,
        describe_part: Callable[[int], str],
        idle_timeout_s: float,
        routed: Callable[[Scope], bool],
        in_flight_limit_bytes: int,
        in_flight: UploadsInFlight | None = None,
        min_bytes_per_s: float = 0,
    ) -> None:
        self.app = app
        self.routed = routed
        self.limit_bytes_by_path = limit_bytes_by_path
        self.default_limit_bytes = default_limit_bytes
        self.describe = describe
        self.part_limit_bytes = part_limit_bytes
        self.describe_part = describe_part
        self.idle_timeout_s = idle_timeout_s
        self.min_bytes_per_s = min_bytes_per_s  # 0: no minimum
        self.in_flight_limit_bytes = in_flight_limit_bytes
        # Uploads are bounded each, and this bounds them all.
        self.in_flight = in_flight or UploadsInFlight()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # "/cls/" has the limit of "/cls", so that its body reaches the 404 that names the
        # route rather than a 413 about its size.
        limit = self.limit_bytes_by_path.get(scope["path"].rstrip("/"), self.default_limit_bytes)
        declared = Headers(scope=scope).get("content-length", "")
        close_if_unread = _closes_if_unread(scope, self.default_limit_bytes)
        # What an answer before the body is read adds: a short body is read and dropped.
        early_headers = _UNREAD_BODY if close_if_unread else {}
        if declared.isdigit() and int(declared) > limit and self.routed(scope):
            response = JSONResponse(
                {"detail": self.describe(limit)}, status_code=413, headers=_UNREAD_BODY
            )
            await response(scope, receive, send)
            return
        if (coding := _unread_coding(scope)) is not None and self.routed(scope):
            status, detail = coding
            response = JSONResponse({"detail": detail}, status_code=status, headers=early_headers)
            await response(scope, receive, send)
            return
        if (charset := _foreign_charset(scope)) is not None and self.routed(scope):
            # The multipart parser would decode the part headers and fields with it: names
            # garbled, or a bare "There was an error parsing the body".
            detail = (
                f"multipart/form-data with charset={charset} is not supported: send the "
                "part headers and fields as UTF-8 (charset=utf-8, or none)"
            )
            response = JSONResponse({"detail": detail}, status_code=400, headers=early_headers)
            await response(scope, receive, send)
            return

        boundary = _multipart_boundary(scope)
        if boundary == b"" and self.routed(scope) and _has_body(scope):
            # The parser would look for lines of "--" alone: no part, or a misleading 400.
            response = JSONResponse({"detail": NO_BOUNDARY}, status_code=400, headers=early_headers)
            await response(scope, receive, send)
            return
        if boundary is not None and len(boundary) > MAX_BOUNDARY_LENGTH:
            # The multipart parser refuses it as it is built, before any byte is read. A path
            # no route takes gets its 404 or 405, its body unmeasured.
            if self.routed(scope) and _has_body(scope):
                detail = (
                    f"the multipart boundary is {len(boundary)} characters long; at most "
                    f"{MAX_BOUNDARY_LENGTH} are read (RFC 2046 asks for at most 70)"
                )
                response = JSONResponse({"detail": detail}, status_code=400, headers=early_headers)
                await response(scope, receive, send)
                return
            boundary = None

        received = 0
        body_complete = False
        parts = None if boundary is None else _PartSizes(boundary, self.part_limit_bytes)
        # The waiting for the client's bytes it has in hand (not the app's own pauses
        # between reads: a busy event loop, a slow disk under the spooled parts): the idle
        # timeout to begin with, and each byte earns what it takes at the minimum rate, up
        # to the idle timeout again. Uncapped, a burst bought a trickle for hours after it
        # (10 MiB, almost three), holding its share of MAX_UPLOADS_IN_FLIGHT_BYTES.
        in_hand_s = self.idle_timeout_s

        async def receive_within_limits() -> Message:
            nonlocal received, body_complete, in_hand_s
            if body_complete:
                # Past the body, receive() waits for the disconnect: no deadline applies.
                return await receive()
            wait_s, too_slow = self.idle_timeout_s, False
            if self.min_bytes_per_s and received and in_hand_s < wait_s:
                wait_s, too_slow = max(0.0, in_hand_s), True
            waiting_since = time.monotonic()
            try:
                async with asyncio.timeout(wait_s):
                    message = await receive()
            except TimeoutError:
                # Raised inside the route's body parsing, so the app's error handler
                # answers it like any other HTTP error.
                detail = (
                    f"the request body fell more than {self.idle_timeout_s:g} s "
                    f"(BODY_IDLE_TIMEOUT_S) behind {self.min_bytes_per_s:g} bytes/s "
                    "(BODY_MIN_BYTES_PER_S)"
                    if too_slow
                    else f"the request body stalled for {self.idle_timeout_s:g} s; "
                    "BODY_IDLE_TIMEOUT_S allows that long between chunks"
                )
                raise HTTPException(408, detail, headers=_UNREAD_BODY) from None
            finally:
                in_hand_s -= time.monotonic() - waiting_since
            if message["type"] == "http.disconnect":
                # nginx's "client closed request": metrics and logs tell it from a bad body.
                raise HTTPException(499, "the client disconnected during the upload")
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                received += len(chunk)
                if self.min_bytes_per_s:
                    in_hand_s = min(
                        self.idle_timeout_s, in_hand_s + len(chunk) / self.min_bytes_per_s
                    )
                self.in_flight.held_bytes += len(chunk)
                body_complete = not message.get("more_body", False)
                unread = None if body_complete else _UNREAD_BODY
                if received > limit:
                    raise HTTPException(413, self.describe(limit), headers=unread)
                # A request alone is never refused by this: its own limit bounds it.
                held = self.in_flight.held_bytes
                if held > received and held > self.in_flight_limit_bytes:
                    raise HTTPException(
                        503,
                        f"uploads under way in this worker hold {held:,} bytes; "
                        f"MAX_UPLOADS_IN_FLIGHT_BYTES allows {self.in_flight_limit_bytes:,}",
                        headers={"Retry-After": RETRY_AFTER_S, **(unread or {})},
                    )
                if parts is not None:
                    parts.feed(chunk)
                    if parts.too_large:
                        raise HTTPException(
                            413, self.describe_part(self.part_limit_bytes), headers=unread
                        )
                    if parts.unnamed:
                        raise HTTPException(
                            400,
                            "a part of the multipart body has no name in its "
                            "Content-Disposition header; send the image as the form field "
                            "'file' (curl -F file=@photo.jpg)",
                            headers=unread,
                        )
                    if parts.not_utf8 is not None:
                        raise HTTPException(
                            400,
                            f"the form field '{parts.not_utf8}' is not UTF-8 text; send form "
                            "fields as UTF-8, and the image as a file part named 'file' "
                            "(curl -F file=@photo.jpg)",
                            headers=unread,
                        )
                    if body_complete and received and not (parts.ended or parts.malformed):
                        closing = (b"--" + (boundary or b"") + b"--").decode("latin-1")
                        raise HTTPException(
                            400,
                            f"the multipart body does not end with its closing boundary "
                            f"({closing}): it was cut off, or its parts use another boundary",
                        )
            return message

        async def send_closing_if_body_unread(message: Message) -> None:
            if message["type"] == "http.response.start" and close_if_unread and not body_complete:
                response_headers = MutableHeaders(raw=list(message.get("headers", [])))
                response_headers["connection"] = "close"
                message = {**message, "headers": response_headers.raw}
            await send(message)

        try:
            await self.app(scope, receive_within_limits, send_closing_if_body_unread)
        finally:
            self.in_flight.held_bytes -= received


# Outside logging's tree of loggers, so no configuration turns it on.
_UNLOGGED = logging.Logger(f"{__name__}.part_sizes", level=logging.CRITICAL + 1)


class _PartsTooLarge(Exception):
    pass


class _PartSizes:
    """A second parser of a multipart body, the one the app's uses (python-multipart), fed
    the same bytes as they arrive: it only measures each part, and sees whether the body
    ended with its closing boundary. Parsing the same way, it finds the parts that the
    app's parser will, whatever lines inside them resemble a boundary."""

    def __init__(self, boundary: bytes, part_limit_bytes: int) -> None:
        self.part_limit_bytes = part_limit_bytes
        self.part_bytes = 0
        self.too_large = False
        self.ended = False
        # The app's parser refuses these bytes too, with its own answer.
        self.malformed = False
        # The name of a plain field whose value is not UTF-8, once one is met.
        self.not_utf8: str | None = None
        # A part with no name in its Content-Disposition, once one is met.
        self.unnamed = False
        self._header_name = b""
        self._header_value = b""
        self._disposition = b""
        self._text: codecs.IncrementalDecoder | None = None  # a plain field's value, checked
        self._field_name = ""
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._part_begins,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value_data,
                "on_header_end": self._header_ends,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._part_data,
                "on_part_end": self._part_ends,
                "on_end": self._ends,
            },
        )
        # The app's parser logs what is malformed in a body; this one, fed the same bytes,
        # would log every such line twice.
        self._parser.logger = _UNLOGGED

    def feed(self, chunk: bytes) -> None:
        if (
            self.ended
            or self.malformed
            or self.too_large
            or self.unnamed
            or self.not_utf8 is not None
        ):
            return
        try:
            self._parser.write(chunk)
        except _PartsTooLarge:
            self.too_large = True
        except FormParserError:
            self.malformed = True

    def _part_begins(self) -> None:
        self.part_bytes = 0
        self._disposition = b""
        self._text = None

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _header_value_data(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_ends(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def _headers_finished(self) -> None:
        # A plain field, as the app's parser tells it from a file: no filename. Its value is
        # text; "file" sent so is an image the app answers for (send it as a file).
        _, options = parse_options_header(self._disposition)
        name = options.get(b"name", b"").decode("latin-1")
        if not name:
            # Found here, so that the answer says so whatever the part's bytes: the app's
            # parser says it of the ASCII ones only, and its message names no fix.
            self.unnamed = True
            return
        if b"filename" not in options and b"filename*" not in options and name != "file":
            self._text = codecs.getincrementaldecoder("utf-8")()
            self._field_name = name

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        self.part_bytes += end - start
        if self.part_bytes > self.part_limit_bytes:
            raise _PartsTooLarge
        self._check_text(data[start:end])

    def _part_ends(self) -> None:
        self._check_text(b"", final=True)

    def _check_text(self, data: bytes, final: bool = False) -> None:
        if self._text is None:
            return
        try:
            self._text.decode(data, final)
        except UnicodeDecodeError:
            self.not_utf8 = self._field_name[:64]
            self._text = None

    def _ends(self) -> None:
        self.ended = True


def _has_body(scope: Scope) -> bool:
    """Whether the request announces a body (which an answer given now leaves unread)."""
    headers = Headers(scope=scope)
    return "transfer-encoding" in headers or headers.get("content-length", "0") != "0"


def _closes_if_unread(scope: Scope, short_body_bytes: int) -> bool:
    """Whether an answer that leaves the body unread closes the connection: the server
    would otherwise read it to its end, discarding it, and it may never come (the client
    waits for 100 Continue) or be long (chunked, or over ``short_body_bytes``). A short one,
    as some clients send to every route, is read, and the connection kept."""
    headers = Headers(scope=scope)
    declared = headers.get("content-length", "")
    return (
        headers.get("expect", "").lower() == "100-continue"
        or "transfer-encoding" in headers
        or (declared.isdigit() and int(declared) > short_body_bytes)
    )


def _unread_coding(scope: Scope) -> tuple[int, str] | None:
    """The status and detail for a body in a coding the service does not undo (it would
    reach the multipart parser still compressed): a transfer coding other than chunked
    (501, RFC 9112 6.1), or a content coding (415)."""
    headers = Headers(scope=scope)

    def codings(name: str) -> list[str]:
        values = headers.getlist(name)
        return [c.strip().lower() for value in values for c in value.split(",") if c.strip()]

    transfer = codings("transfer-encoding")
    if transfer and transfer != ["chunked"]:
        return 501, (
            f"Transfer-Encoding {', '.join(transfer)} is not supported: send the body "
            "with a Content-Length, or chunked"
        )
    content = [coding for coding in codings("content-encoding") if coding != "identity"]
    if content and _has_body(scope):
        return (
            415,
            f"Content-Encoding {', '.join(content)} is not supported: send the body uncompressed",
        )
    return None


def _foreign_charset(scope: Scope) -> str | None:
    """The charset a multipart body declares, unless UTF-8 (or ASCII, a part of it) under
    any of its names."""
    content_type, options = parse_options_header(Headers(scope=scope).get("content-type", ""))
    charset = options.get(b"charset")
    if content_type != b"multipart/form-data" or not charset or not _has_body(scope):
        return None
    name = charset.decode("latin-1")
    try:
        known = codecs.lookup(name).name
    except LookupError:
        return name
    return None if known in ("utf-8", "ascii") else name


NO_BOUNDARY = (
    "the Content-Type multipart/form-data names no boundary; let the HTTP client write "
    "the header with the body (curl -F, a files= argument) rather than setting it by hand"
)


def _multipart_boundary(scope: Scope) -> bytes | None:
    """The boundary of a multipart body, or None for other bodies (or none given, which the
    app's parser refuses)."""
    content_type, options = parse_options_header(Headers(scope=scope).get("content-type", ""))
    if content_type != b"multipart/form-data":
        return None
    return options.get(b"boundary")


class ShedWhileFullMiddleware:
    """Refuses an upload with 503 before its body is read while ``refusal`` says why (the
    queue it would wait in is full): a client on a slow link is not made to send megabytes
    only to be told to retry."""

    def __init__(self, app: ASGIApp, refusal: Callable[[str], str | None]) -> None:
        self.app = app
        self.refusal = refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            detail = self.refusal(scope["path"])
            if detail is not None:
                # Inside BodyLimitsMiddleware, which closes the connection if the body left
                # unread is long.
                headers = {"Retry-After": RETRY_AFTER_S}
                response = JSONResponse({"detail": detail}, status_code=503, headers=headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ApiKeyMiddleware:
    """Requires the API key on every path but the open ones, before any body is read.

    The key is accepted as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` and
    compared in constant time, so response timing does not reveal how much of it matched.
    """

    def __init__(
        self, app: ASGIApp, api_key: str, open_paths: frozenset[str], short_body_bytes: int
    ) -> None:
        self.app = app
        self.api_key = api_key.encode()
        self.open_paths = open_paths
        self.short_body_bytes = short_body_bytes  # read and dropped after a 401, unlike longer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        detail = "missing or wrong API key; send 'Authorization: Bearer <key>' or X-API-Key"
        response = JSONResponse(
            {"detail": detail},
            status_code=401,
            headers={
                "WWW-Authenticate": "Bearer",
                **(_UNREAD_BODY if _closes_if_unread(scope, self.short_body_bytes) else {}),
            },
        )
        await response(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        headers = Headers(scope=scope)
        scheme, _, bearer = headers.get("authorization", "").partition(" ")
        # Either header may carry it: a gateway's own Authorization beside a client's
        # X-API-Key must not lock the client out.
        offered = [headers.get("x-api-key", "")]
        if scheme.lower() == "bearer":
            offered.append(bearer)
        # Whitespace around a header value is no part of it; only spaces and tabs, since
        # str.strip() would also take latin-1's 0x85 and 0xA0, the last byte of some UTF-8
        # characters. Header values arrive decoded as latin-1: encoded back, they are the
        # bytes sent, which for a non-ASCII key are its UTF-8. Each one is compared (a
        # list, not a generator), so the time taken does not say which matched.
        return any(
            [
                hmac.compare_digest(key.strip(" \t").encode("latin-1"), self.api_key)
                for key in offered
            ]
        )


class JsonCorsMiddleware(CORSMiddleware):
    """Starlette's CORS handling, its refusal of a preflight request in JSON as every other
    error is."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code != 400:
            return response
        # "Disallowed CORS origin, method": what the preflight asked for that is not allowed.
        detail = bytes(response.body).decode()
        if "origin" in detail:
            detail += "; CORS_ORIGINS lists the allowed origins"
        if "method" in detail:
            detail += f"; the API takes {', '.join(self.allow_methods)}"
        if "headers" in detail:
            detail += f"; a request may send {', '.join(sorted(self.allow_headers))}"
        headers = {
            name: value
            for name, value in response.headers.items()
            if name not in ("content-type", "content-length")
        }
        return JSONResponse({"detail": detail}, status_code=400, headers=headers)
