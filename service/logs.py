"""Logging: the service's messages and one access line per request, as text or JSON.

Records are handed to a queue and written by a background thread, so the event loop never
waits on a slow terminal or log collector. Every record carries the request id of the
request it belongs to ("-" outside requests).
"""

from __future__ import annotations

import atexit
import collections
import contextvars
import datetime
import ipaddress
import json
import logging
import os
import re
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from logging.handlers import QueueHandler, QueueListener
from typing import Any, TextIO

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

ACCESS_LOGGER = "service.access"
# The service's own loggers; uvicorn and gunicorn keep their handlers.
SERVICE_LOGGERS = ("service", "batching", "classification")
# What libraries say while a request is served, in the same format and with its id: Python
# warnings, python-multipart's about a malformed body, Pillow's about a damaged image.
# Warnings and above only: their debug lines are of no use to an operator.
LIBRARY_LOGGERS = ("py.warnings", "python_multipart", "PIL")
# Of those, the ones that speak of a caller's mistake that the answer's access line
# already gives (a malformed body, a damaged image): written at LOG_LEVEL=debug only, so
# that no client can fill the log with lines. So are Pillow's warnings (see
# configure_logging).
CALLERS_MISTAKES_LOGGERS = ("python_multipart", "PIL")
# uvicorn's lines other than its access lines (which the service's replace).
UVICORN_LOGGER = "uvicorn.error"
# Where Pillow's warnings come from: the module the warnings module names for them.
_PILLOW_MODULES = r"PIL(\.|$)"
# The process id tells workers apart, as gunicorn's own lines (a WORKER TIMEOUT) name them.
TEXT_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s [%(request_id)s] %(message)s"
JSON_FIELDS = "%(asctime)s %(process)d %(levelname)s %(name)s %(request_id)s %(message)s"
# A path and a client are each cut to this many characters on an access line: every
# worker writes to one pipe, which keeps a line whole only up to PIPE_BUF (4 KiB). Each is
# written twice on a JSON line, a character escaped to up to 12, and a longer path (64 KiB
# fit in a request line) would interleave with other workers' lines.
ACCESS_PATH_MAX_CHARS = 64
ACCESS_CLIENT_MAX_CHARS = 64
# An error answer's detail on its access line, in characters as JSON writes it: written
# twice on a JSON line as well, so it is bounded after escaping.
ACCESS_DETAIL_MAX_CHARS = 200

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
# Fields the handling of the current request adds to its access line (e.g. batch sizes).
_access_fields: contextvars.ContextVar[dict[str, object] | None] = contextvars.ContextVar(
    "access_fields", default=None
)
_listener: QueueListener | None = None
_direct: logging.Handler | None = None  # what the writer thread writes to
_queued: logging.Handler | None = None  # what hands records to the writer thread
_access_log_on = True
_uvicorn_lines_taken = False  # plain uvicorn's lines written by the service's handler
# How long the writer waits for more records once it has written all it had.
WRITER_LINGER_S = 0.1


class LingeringQueue:
    """The records between ``QueueHandler`` and the writer thread, handed over without a
    wake-up per record.

    Waking a sleeping writer for each access line cost the event loop about 0.2 ms per
    request. The writer instead sleeps ``linger_s`` each time it runs out of records and
    only then waits to be woken, so under steady traffic records are appended to a deque
    that the writer finds on its next round, and only a record that finds it waiting wakes
    it.
    """

    def __init__(self, linger_s: float = WRITER_LINGER_S) -> None:
        self._records: collections.deque[logging.LogRecord | None] = collections.deque()
        self._linger_s = linger_s
        self._wake = threading.Event()
        self._linger = False

    def put_nowait(self, record: logging.LogRecord | None) -> None:
        self._records.append(record)
        if not self._wake.is_set():
            self._wake.set()

    def get(self, block: bool = True) -> logging.LogRecord | None:
        """The oldest record, waiting for one (``QueueListener`` always blocks)."""
        while not self._records:
            if self._linger:
                self._linger = False
                time.sleep(self._linger_s)
                continue
            self._wake.clear()
            # A record appended before the clear would otherwise wait for the next one.
            if not self._records:
                self._wake.wait()
        self._linger = True
        return self._records.popleft()


class EnvironmentValuesMasked(logging.Filter):
    """Leaves out the values of gunicorn's ``raw_env`` (``-e NAME=value``, ``API_KEY`` and
    ``WEBHOOK_SECRET`` among them) from the configuration gunicorn logs at debug level."""

    _NAME = re.compile(r"""(?<=['"])([^'"=]+)=""")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Current configuration:"):
            lines = message.split("\n")
            for index, line in enumerate(lines):
                if line.startswith("  raw_env: "):
                    names = ", ".join(self._NAME.findall(line))
                    lines[index] = f"  raw_env: [{names}] (values not logged)"
            record.msg, record.args = "\n".join(lines), None
        return True


class RequestIdLogFilter(logging.Filter):
    """Adds ``request_id`` to every log record, so formats can include it."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Once only, where the line is logged: the writer thread knows no request.
        if not hasattr(record, "request_id"):
            record.request_id = request_id_var.get()
        return True


# Echo a caller's id only when it is safe to put into headers and logs, and holds a letter
# or digit: "-" alone is what log lines outside any request carry.
_VALID_REQUEST_ID = re.compile(r"(?=.*[A-Za-z0-9])[A-Za-z0-9._:/+=-]{1,128}")


def request_id_for(supplied: str | None) -> str:
    """A request's id: the caller's ``X-Request-ID`` where it can go into headers and log
    lines as it is, a new one otherwise."""
    return supplied if supplied and _VALID_REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex


def begin_request(request_id: str) -> tuple[contextvars.Token[str], dict[str, object]]:
    """Bind a request id and a fresh set of access-line fields to the current context."""
    fields: dict[str, object] = {}
    _access_fields.set(fields)
    return request_id_var.set(request_id), fields


def end_request(token: contextvars.Token[str]) -> None:
    """Undo ``begin_request``: lines logged from here on carry the id from before."""
    request_id_var.reset(token)
    _access_fields.set(None)


def listed(ids: list[str], most: int = 16) -> str:
    """``ids`` for a log line, the first ``most`` of them: a line written to a pipe stays
    whole up to 4 KiB, and gunicorn's workers share one."""
    shown = ", ".join(ids[:most])
    return shown if len(ids) <= most else f"{shown} and {len(ids) - most} more"


@contextmanager
def request_id_bound(request_id: str) -> Iterator[None]:
    """Bind ``request_id`` to the log lines written inside, where no request's context is
    (an answer written by the server before the app, an error handler outside it)."""
    token = request_id_var.set(request_id)
    try:
        yield
    finally:
        request_id_var.reset(token)


def record_batch_size(size: int) -> None:
    """Note, on the current request's access line, the size of a batch it rode in."""
    fields = _access_fields.get()
    if fields is not None:
        sizes = fields.setdefault("batch_sizes", [])
        assert isinstance(sizes, list)
        sizes.append(size)


def log_access(
    method: str,
    path: str,
    status: int,
    duration_s: float,
    fields: dict[str, object],
    client: str | None = None,
) -> None:
    """Write one request's access line on ``service.access``; ``client`` is the caller's
    address (a trusted proxy's ``X-Forwarded-For``, see ``FORWARDED_ALLOW_IPS``).

    Server-side failures (5xx other than 503 refusals, which are expected under load) are
    WARNING lines, written even with the access log off, so a caller's report can be found.
    """
    server_error = status >= 500 and status != 503
    if not (server_error or _access_log_on):
        return
    path = shortened(path, ACCESS_PATH_MAX_CHARS)  # in the message too
    extra: dict[str, object] = {
        "method": method,
        "path": path,
        "status": status,
        "duration_ms": round(duration_s * 1000, 2),
    }
    if client is not None:
        extra["client"] = shortened(client, ACCESS_CLIENT_MAX_CHARS)
    sizes = fields.get("batch_sizes")
    if isinstance(sizes, list) and sizes:
        if len(sizes) == 1:
            extra["batch_size"] = sizes[0]
        else:
            extra["batch_sizes"] = sizes
    if isinstance(detail := fields.get("detail"), str):
        extra["detail"] = _cut_escaped(detail, ACCESS_DETAIL_MAX_CHARS)
    shown = "".join(
        f" {key}={_shown_client(str(value)) if key == 'client' else value}"
        for key, value in extra.items()
        if key == "client" or key.startswith("batch")
    )
    if "detail" in extra:  # what the caller was told, quoted: it may quote the caller
        shown += f" detail={json.dumps(extra['detail'])}"
    logging.getLogger(ACCESS_LOGGER).log(
        logging.WARNING if server_error else logging.INFO,
        "%s %s answered %d after %.1f ms%s",
        method,
        shown_path(path),
        status,
        extra["duration_ms"],  # rounded as the JSON field is, so the two never disagree
        shown,
        extra=extra,
    )


def _cut_escaped(text: str, most: int) -> str:
    """``text``, cut (and ended with "...") so that JSON writes it in at most ``most``
    characters, escapes included."""
    if len(json.dumps(text)) <= most + 2:
        return text
    cut = text[:most]
    while cut and len(json.dumps(cut + "...")) > most + 2:
        cut = cut[:-1]
    return cut + "..."


def _shown_client(client: str) -> str:
    """The client on a text line: an IP address as it is; anything else, which a proxy
    trusted with ``*`` passes on from any caller's ``X-Forwarded-For``, quoted, so that it
    cannot pass for other fields of the line."""
    try:
        ipaddress.ip_address(client)
    except ValueError:
        return json.dumps(client)
    return client


def shortened(text: str, most: int) -> str:
    """``text`` as a message quotes it, cut to ``most`` characters and "...": a client's
    path or header, or another server's answer, may be long."""
    return text if len(text) <= most else text[:most] + "..."


def shown_path(path: str) -> str:
    """A request's path on a text line: as it is, or quoted where it holds a blank, a quote
    or an unprintable character. It arrives percent-decoded: "/x%0aFORGED" must not start
    a line of its own, nor "/x%20answered%20200%20after%201%20ms" pass for other fields."""
    if path.isprintable() and " " not in path and '"' not in path:
        return path
    return json.dumps(path)


def _utc_time(record: logging.LogRecord) -> str:
    """ISO 8601 in UTC, which log collectors read without a format of their own, and which
    lines up with gunicorn's own lines (which carry their offset) whatever the host's zone."""
    created = datetime.datetime.fromtimestamp(record.created, tz=datetime.UTC)
    return created.isoformat(timespec="milliseconds")


class TextLines(logging.Formatter):
    """``TEXT_FORMAT``, its time in UTC."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return _utc_time(record)


class _JsonLines(JsonFormatter):
    """JSON lines alike for every logger: "-" where no request is (gunicorn's and uvicorn's
    lines carry no id), and without uvicorn's copy of each message in terminal colours."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 (logging's name)
        return _utc_time(record)

    def add_fields(
        self,
        log_record: dict[str, Any],
        record: logging.LogRecord,
        message_dict: dict[str, Any],
    ) -> None:
        super().add_fields(log_record, record, message_dict)
        if log_record.get("request_id") is None:
            log_record["request_id"] = "-"


def json_formatter() -> logging.Formatter:
    """One JSON object per line; gunicorn's configuration uses it for its own lines too."""
    return _JsonLines(
        JSON_FIELDS,
        rename_fields={"asctime": "time", "process": "pid", "levelname": "level", "name": "logger"},
        reserved_attrs=[*RESERVED_ATTRS, "color_message"],
    )


def unconfigured_line(message: str) -> str:
    """``message`` as a critical line in the format that ``LOG_FORMAT`` asks for, read from
    the environment: for a start-up that fails before the settings, and so the logging,
    could be set up. A log collector that reads JSON lines must not miss why."""
    # Read in any case, as the settings are (log_format=json).
    formats = [value for name, value in os.environ.items() if name.upper() == "LOG_FORMAT"]
    if not any(value.strip().lower() == "json" for value in formats):
        return message
    record = logging.LogRecord("service", logging.CRITICAL, __file__, 0, message, None, None)
    return json_formatter().format(record)


def _log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """``warnings.showwarning`` as one log line (logging's own hook adds the source line
    on a line of its own)."""
    logging.getLogger("py.warnings").warning(
        "%s: %s (%s:%d)", category.__name__, message, filename, lineno
    )


def configure_logging(level: str, log_format: str, access_log: bool) -> None:
    """Route the service's loggers through one background writer, as text or JSON lines."""
    global _access_log_on
    stop_writer()
    formatter = json_formatter() if log_format == "json" else TextLines()
    global _direct, _queued
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter)
    stream.addFilter(RequestIdLogFilter())  # for the lines written once the writer stops
    _direct = stream
    records = LingeringQueue()
    handler = QueueHandler(records)
    handler.addFilter(RequestIdLogFilter())  # in the caller's context, where the id is bound
    _queued = handler
    _start_writer(QueueListener(records, stream))
    warnings.showwarning = _log_warning
    service_level = logging.getLevelNamesMapping()[level.upper()]
    # Pillow warns once for each problem it finds in an upload's metadata (an EXIF tag it
    # cannot read: tens of thousands in one crafted file, each message new, and each kept
    # in the warnings registry for good): the client's, shown at LOG_LEVEL=debug only, and
    # otherwise ignored before the registry keeps it.
    pillow = "default" if service_level <= logging.DEBUG else "ignore"
    warnings.filterwarnings(pillow, module=_PILLOW_MODULES)
    for name in (*SERVICE_LOGGERS, *LIBRARY_LOGGERS):
        named = logging.getLogger(name)
        named.handlers = [handler]
        if name in SERVICE_LOGGERS:
            named.setLevel(service_level)
        elif name in CALLERS_MISTAKES_LOGGERS and service_level > logging.DEBUG:
            named.setLevel(logging.CRITICAL)
        else:
            named.setLevel(max(service_level, logging.WARNING))
        named.propagate = False
    # Independent of LOG_LEVEL: ACCESS_LOG alone turns the access lines off.
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO)
    _access_log_on = access_log
    # Under plain uvicorn (gunicorn's workers are set so already): uvicorn's own access line
    # would repeat the service's, without its id or batch, whatever ACCESS_LOG says; its
    # other lines follow LOG_LEVEL.
    logging.getLogger("uvicorn.access").disabled = True
    uvicorn_lines = logging.getLogger(UVICORN_LOGGER)
    uvicorn_lines.setLevel(level.upper())
    # Plain uvicorn writes its lines through its parent logger, as its own text: a JSON log
    # must hold JSON lines only. Handlers of their own (gunicorn's workers hand them
    # gunicorn's, in the service's format already; a --log-config's) are left as they are.
    global _uvicorn_lines_taken
    if _uvicorn_lines_taken:  # given back as they were found
        uvicorn_lines.handlers = []
        uvicorn_lines.propagate = True
        _uvicorn_lines_taken = False
    if log_format == "json" and not uvicorn_lines.handlers and uvicorn_lines.propagate:
        uvicorn_lines.handlers = [handler]
        uvicorn_lines.propagate = False
        _uvicorn_lines_taken = True


def _start_writer(listener: QueueListener) -> None:
    global _listener
    listener.start()
    _listener = listener


def stop_writer() -> None:
    """Write out what is queued and stop the writer thread (at reconfiguration, shutdown and
    exit); from then on the service's lines are written as they are logged."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
        # Only the hand-off is swapped: a handler added beside it (a test's) stays.
        for name in (*SERVICE_LOGGERS, *LIBRARY_LOGGERS, UVICORN_LOGGER):
            named = logging.getLogger(name)
            named.handlers = [_direct if h is _queued else h for h in named.handlers]


atexit.register(stop_writer)
