"""Logs: one access line per request with its id, status, latency and batch size, as text
or JSON, and server errors logged even with the access log off."""

from __future__ import annotations

import datetime
import io
import json
import logging
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from logging.handlers import QueueHandler, QueueListener
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from PIL import Image

from service import logs
from service.settings import load_settings
from tests.server import (
    free_port,
    gunicorn_command,
    running_server,
    server_env,
    uvicorn_command,
)
from tests.support import make_settings, running_app


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access_lines() -> Iterator[list[logging.LogRecord]]:
    recorder = Recorder()
    access = logging.getLogger(logs.ACCESS_LOGGER)
    access.addHandler(recorder)
    try:
        yield recorder.records
    finally:
        access.removeHandler(recorder)
        logs.configure_logging("info", "text", access_log=True)


def test_an_access_line_carries_the_request_and_its_batch(
    access_lines: list[logging.LogRecord],
) -> None:
    token, fields = logs.begin_request("req-1")
    logs.record_batch_size(6)
    logs.log_access("POST", "/cls", 200, 0.0123, fields, client="203.0.113.7")
    logs.end_request(token)

    (line,) = access_lines
    assert line.levelno == logging.INFO
    assert line.getMessage() == (
        "POST /cls answered 200 after 12.3 ms client=203.0.113.7 batch_size=6"
    )
    fields = vars(line)
    keys = ("method", "path", "status", "duration_ms", "client", "batch_size")
    assert [fields[key] for key in keys] == ["POST", "/cls", 200, 12.3, "203.0.113.7", 6]


def test_a_path_cannot_forge_a_line_of_the_text_log(
    access_lines: list[logging.LogRecord],
) -> None:
    """Paths arrive percent-decoded: "/x%0aFORGED LINE" holds a real newline, and
    "/x%20answered%20200" blanks that would make it read as other fields."""
    token, fields = logs.begin_request("req-1")
    logs.log_access("GET", "/x\nFORGED LINE\r\u2028\x1b[31m", 404, 0.001, fields)
    logs.log_access("GET", "/x answered 200 after 0.1 ms client=10.9.9.9", 401, 0.001, fields)
    logs.log_access("GET", '/x"quoted"', 404, 0.001, fields)
    logs.log_access("GET", "/caf\xe9/\U0001f600", 404, 0.001, fields)
    logs.end_request(token)

    forged, spaced, quoted, plain = (line.getMessage() for line in access_lines)
    assert forged.startswith('GET "/x\\nFORGED LINE\\r\\u2028\\u001b[31m" answered 404')
    assert forged.isprintable()
    assert vars(access_lines[0])["path"] == "/x\nFORGED LINE\r\u2028\x1b[31m"  # JSON escapes it
    assert spaced.startswith('GET "/x answered 200 after 0.1 ms client=10.9.9.9" answered 401')
    assert quoted.startswith('GET "/x\\"quoted\\"" answered 404')
    assert plain.startswith("GET /caf\xe9/\U0001f600 answered 404")  # printable, no blank: as is


def test_a_long_path_is_cut_so_that_a_line_stays_one_pipe_write(
    access_lines: list[logging.LogRecord],
) -> None:
    """Workers share one pipe, which keeps a write whole only up to PIPE_BUF (4 KiB); a
    request line may carry a 64 KiB path, here of characters that escape the longest."""
    token, fields = logs.begin_request("r" * 128)
    # The answer's detail may quote the caller (a field's name, say).
    fields["detail"] = "\U0001f600" * 10_000
    # A blank has the path quoted on a text line, each character then escaped to 12; and a
    # client that a proxy trusted with "*" passes on from X-Forwarded-For.
    path = "/ " + "\U0001f600" * 65_000
    logs.log_access("GET", path, 404, 0.001, fields, client="\xe9" * 200)
    logs.end_request(token)

    (line,) = access_lines
    json_line = logs.json_formatter().format(line)
    text_line = logs.TextLines().format(line)
    assert len(json_line.encode()) < 4096
    assert len(text_line.encode()) < 4096
    written = json.loads(json_line)
    assert written["path"] == "/ " + "\U0001f600" * (logs.ACCESS_PATH_MAX_CHARS - 2) + "..."
    assert written["status"] == 404


async def test_an_error_answer_s_access_line_says_what_the_caller_was_told(
    access_lines: list[logging.LogRecord],
) -> None:
    async with running_app(make_settings()) as served:
        refused = await served.client.post("/cls", files={"file": ("a.txt", b"plain text")})
        answered = await served.client.get("/healthz")
    assert refused.status_code == 400
    told = refused.json()["detail"]
    assert told.startswith("the upload is not a JPEG")
    refusal, answer = (
        next(vars(line) for line in access_lines if line.path == path)  # type: ignore[attr-defined]
        for path in ("/cls", "/healthz")
    )
    assert refusal["detail"] == told
    assert refusal["msg"] % refusal["args"] == (
        f"POST /cls answered 400 after {refusal['duration_ms']:.1f} ms "
        f"client=127.0.0.1 detail={json.dumps(told)}"
    )
    assert answered.status_code == 200
    assert "detail" not in answer


def test_a_long_detail_is_cut_where_json_writes_it_within_its_bound() -> None:
    for detail in ("x" * 500, "\U0001f600" * 100, '"' * 150, "a" * 198):
        cut = logs._cut_escaped(detail, logs.ACCESS_DETAIL_MAX_CHARS)
        assert len(json.dumps(cut)) <= logs.ACCESS_DETAIL_MAX_CHARS + 2
        assert cut == detail or (cut.endswith("...") and detail.startswith(cut[:-3]))
    assert logs._cut_escaped("a" * 198, 200) == "a" * 198


def test_a_forwarded_client_address_cannot_forge_fields_of_the_line(
    access_lines: list[logging.LogRecord],
) -> None:
    """A proxy trusted with ``*`` passes on any caller's X-Forwarded-For as the client."""
    token, fields = logs.begin_request("req-1")
    logs.record_batch_size(1)
    forged = "203.0.113.9 status=500 batch_size=64" + "x" * 100
    logs.log_access("POST", "/cls", 200, 0.01, fields, client=forged)
    logs.log_access("POST", "/cls", 200, 0.01, fields, client="2001:db8::7")
    logs.end_request(token)

    cut = forged[:64] + "..."
    assert access_lines[0].getMessage() == (
        f"POST /cls answered 200 after 10.0 ms client={json.dumps(cut)} batch_size=1"
    )
    assert vars(access_lines[0])["client"] == cut  # JSON lines escape it themselves
    assert vars(access_lines[1])["client"] == "2001:db8::7"


def test_with_the_access_log_off_only_server_errors_are_logged(
    access_lines: list[logging.LogRecord],
) -> None:
    logs.configure_logging("info", "text", access_log=False)
    for status in (200, 400, 503, 500):
        token, fields = logs.begin_request(f"req-{status}")
        logs.log_access("POST", "/cls", status, 0.01, fields)
        logs.end_request(token)

    assert [(vars(r)["status"], r.levelno) for r in access_lines] == [(500, logging.WARNING)]


def test_batch_sizes_outside_a_request_are_ignored(
    access_lines: list[logging.LogRecord],
) -> None:
    logs.record_batch_size(3)  # a task's batch: no request, no access line, no error
    token, fields = logs.begin_request("req-after")
    logs.log_access("POST", "/cls", 200, 0.01, fields)
    logs.end_request(token)

    (line,) = access_lines
    assert "batch_size" not in vars(line)  # the size noted outside did not carry over


class CountingEvent(threading.Event):
    def __init__(self) -> None:
        super().__init__()
        self.sets = 0

    def set(self) -> None:
        self.sets += 1
        super().set()


def _record(message: str) -> logging.LogRecord:
    return logging.LogRecord("test", logging.INFO, __file__, 0, message, None, None)


def test_once_the_writer_stops_lines_are_written_as_they_are_logged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """At shutdown: uvicorn ends a worker stopped by a signal with that signal, skipping
    atexit, so the lines of requests cut off by the drain must not wait for a writer."""
    logs.configure_logging("info", "text", access_log=True)
    try:
        logging.getLogger("service").info("queued before the stop")
        logs.stop_writer()
        assert "queued before the stop" in capsys.readouterr().err
        token, fields = logs.begin_request("req-late")
        logs.log_access("POST", "/cls", 503, 2.5, fields)
        logs.end_request(token)
        assert "[req-late] POST /cls answered 503" in capsys.readouterr().err
    finally:
        logs.configure_logging("info", "text", access_log=True)


def test_the_writer_gets_every_record_in_order_from_many_threads() -> None:
    records = logs.LingeringQueue(linger_s=0.01)
    written = Recorder()
    listener = QueueListener(records, written)
    listener.start()

    def produce(thread: int) -> None:
        for index in range(500):
            records.put_nowait(_record(f"{thread}:{index}"))
            if index % 100 == 0:
                time.sleep(0.02)  # let the writer run dry and wait, so wake-ups happen too

    producers = [threading.Thread(target=produce, args=(thread,)) for thread in range(4)]
    for producer in producers:
        producer.start()
    for producer in producers:
        producer.join()
    # Without stop(), whose sentinel would wake a writer that missed a wake-up.
    deadline = time.monotonic() + 5
    while len(written.records) < 2000 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(written.records) == 2000
    listener.stop()

    messages = [record.getMessage() for record in written.records]
    assert len(messages) == 2000
    for thread in range(4):
        mine = [m for m in messages if m.startswith(f"{thread}:")]
        assert mine == [f"{thread}:{index}" for index in range(500)]


def test_a_record_reaches_a_waiting_writer_at_once() -> None:
    records = logs.LingeringQueue(linger_s=0.01)
    written = Recorder()
    listener = QueueListener(records, written)
    listener.start()
    try:
        for index in range(3):
            time.sleep(0.1)  # the writer has run dry, lingered and is waiting
            records.put_nowait(_record(f"alone {index}"))
            deadline = time.monotonic() + 2
            while len(written.records) <= index and time.monotonic() < deadline:
                time.sleep(0.001)
            assert len(written.records) == index + 1
    finally:
        listener.stop()


def test_records_in_steady_traffic_do_not_wake_the_writer() -> None:
    records = logs.LingeringQueue(linger_s=1.0)
    records._wake = wake = CountingEvent()
    written = Recorder()
    listener = QueueListener(records, written)
    listener.start()
    records.put_nowait(_record("first"))  # finds the writer waiting: wakes it
    deadline = time.monotonic() + 5
    while not written.records and time.monotonic() < deadline:
        time.sleep(0.001)
    assert wake.sets == 1

    for index in range(50):  # one every 2 ms, while the writer lingers after "first"
        records.put_nowait(_record(f"steady {index}"))
        time.sleep(0.002)
    assert wake.sets == 1
    started = time.monotonic()
    listener.stop()
    assert time.monotonic() - started < 3
    assert len(written.records) == 51


@pytest.mark.slow
@pytest.mark.parametrize("access_log", ["true", "false"])
def test_under_plain_uvicorn_the_settings_rule_uvicorns_lines_too(
    tmp_path: Path, photos: list[Path], access_log: str
) -> None:
    """``make dev``: one access line per request, the service's (uvicorn's own would repeat
    it, and ignore ACCESS_LOG), and uvicorn's other lines at LOG_LEVEL."""
    port = free_port()
    env = server_env(tmp_path, PORT=str(port), LOG_LEVEL="warning", ACCESS_LOG=access_log)
    with running_server(tmp_path, uvicorn_command(port), env) as server:
        answered = httpx.post(
            f"{server.url}/cls",
            files={"file": ("p.jpg", photos[0].read_bytes())},
            headers={"X-Request-ID": "dev-request"},
            timeout=30,
        )
        assert answered.status_code == 200
        time.sleep(0.5)  # the access line's writer wakes every 0.1 s
        log = server.log()
    assert '"POST /cls HTTP/1.1" 200' not in log  # uvicorn's access line
    assert "Uvicorn running on" not in log  # uvicorn's INFO lines
    assert log.count("[dev-request]") == (1 if access_log == "true" else 0)
    if access_log == "true":
        [line] = [line for line in log.splitlines() if "[dev-request]" in line]
        assert f" [{server.process.pid}] INFO service.access [dev-request] " in line


def test_under_plain_uvicorn_json_logs_hold_uvicorns_lines_as_json(
    tmp_path: Path, photos: list[Path]
) -> None:
    """uvicorn's own lines (started, startup complete, shutting down) are JSON too: as text
    among the JSON ones, a collector of JSON lines could not read them."""
    port = free_port()
    env = server_env(tmp_path, PORT=str(port), LOG_FORMAT="json")
    with running_server(tmp_path, uvicorn_command(port), env) as server:
        answered = httpx.post(
            f"{server.url}/cls", files={"file": ("p.jpg", photos[0].read_bytes())}, timeout=30
        )
        assert answered.status_code == 200
    lines = server.log().splitlines()
    assert all(line.startswith("{") for line in lines), lines
    uvicorn = [json.loads(line) for line in lines if '"uvicorn.error"' in line]
    said = " ".join(line["message"] for line in uvicorn)
    assert "Application startup complete" in said
    assert "Shutting down" in said
    assert all(line["request_id"] == "-" for line in uvicorn), uvicorn


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_uvicorns_lines_keep_handlers_of_their_own(log_format: str) -> None:
    """A --log-config that writes uvicorn's lines somewhere keeps them there: they are
    neither dropped nor taken into the service's log."""
    recorder = Recorder()
    uvicorn_lines = logging.getLogger(logs.UVICORN_LOGGER)
    uvicorn_lines.addHandler(recorder)
    try:
        logs.configure_logging("info", log_format, access_log=True)
        uvicorn_lines.info("Started server process [%d]", 7)
        assert uvicorn_lines.handlers == [recorder]
        assert uvicorn_lines.propagate
    finally:
        uvicorn_lines.removeHandler(recorder)
        logs.configure_logging("info", "text", access_log=True)
    assert [r.getMessage() for r in recorder.records] == ["Started server process [7]"]


@pytest.mark.slow
def test_json_logs_from_the_real_server(tmp_path: Path, photos: list[Path]) -> None:
    """``LOG_FORMAT=json``: the service's lines are JSON objects; each request's access line
    has its id, method, path, status, latency, client and the size of the batch it rode in."""
    env = server_env(tmp_path, LOG_FORMAT="json")
    photo = photos[0].read_bytes()
    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        single = httpx.post(
            f"{server.url}/cls",
            files={"file": ("p.jpg", photo)},
            headers={"X-Request-ID": "json-single"},
            timeout=30,
        )
        several = httpx.post(
            f"{server.url}/cls/batch",
            files=[("file", ("p.jpg", photo)), ("file", ("q.jpg", photo))],
            headers={"X-Request-ID": "json-batch"},
            timeout=30,
        )
        bad = httpx.post(
            f"{server.url}/cls",
            files={"file": ("x.jpg", b"not an image")},
            # From the local host, whose forwarding headers are believed by default.
            headers={"X-Request-ID": "json-bad", "X-Forwarded-For": "203.0.113.9"},
            timeout=30,
        )
        assert (single.status_code, several.status_code, bad.status_code) == (200, 200, 400)
        # The writer thread runs behind the response; wait for the last line to appear.
        lines = wait_for_json_lines(server.log, "json-bad")
        [worker] = psutil.Process(server.process.pid).children()

    by_id = {line["request_id"]: line for line in lines if line["logger"] == logs.ACCESS_LOGGER}
    first = by_id["json-single"]
    assert first["method"] == "POST"
    assert first["path"] == "/cls"
    assert first["status"] == 200
    assert first["level"] == "INFO"
    assert first["batch_size"] == 1
    assert first["client"] == "127.0.0.1"
    assert 0 < first["duration_ms"] < 30_000
    # ISO 8601 in UTC, as log collectors read it.
    logged_at = datetime.datetime.fromisoformat(first["time"])
    assert logged_at.utcoffset() == datetime.timedelta(0)
    assert abs(datetime.datetime.now(datetime.UTC) - logged_at) < datetime.timedelta(minutes=5)
    batch_line = by_id["json-batch"]
    sizes = batch_line.get("batch_sizes") or [batch_line["batch_size"]] * 2
    assert len(sizes) == 2
    assert all(size in (1, 2) for size in sizes)
    assert by_id["json-bad"]["status"] == 400
    assert by_id["json-bad"]["client"] == "203.0.113.9"
    assert "batch_size" not in by_id["json-bad"]
    startup = [line for line in lines if line["logger"] == "classification.model"]
    assert startup, "the service's own messages are JSON too"
    servers = [line for line in lines if line["logger"].startswith(("gunicorn.", "uvicorn."))]
    assert servers, "gunicorn's and uvicorn's lines are JSON too"
    # Alike: no null id, and no copy of the message in terminal colours.
    assert all(line["request_id"] == "-" for line in servers), servers
    # Each line names its process: the worker's, as gunicorn's lines name it, or the master's.
    assert {line["pid"] for line in [*by_id.values(), *startup]} == {worker.pid}
    assert {line["pid"] for line in servers} == {worker.pid, server.process.pid}
    assert not any("color_message" in line for line in lines)


def wait_for_json_lines(read_log: Callable[[], str], request_id: str) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in read_log().splitlines() if line.startswith("{")]
        if any(line.get("request_id") == request_id for line in lines):
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"no JSON line for {request_id}:\n{read_log()}")
        time.sleep(0.05)


def corrupt_exif_jpeg() -> bytes:
    """A JPEG whose EXIF tag points past the block's end: Pillow warns as it reads it."""
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1)
    tiff += struct.pack("<HHII", 0x010F, 2, 100, 0x1000) + struct.pack("<I", 0)
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(buffer, "JPEG", exif=b"Exif\x00\x00" + tiff)
    return buffer.getvalue()


@pytest.mark.parametrize("level", ["info", "debug"])
@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_library_warnings_are_lines_of_the_log_with_the_request_id(
    log_format: str, level: str
) -> None:
    """Pillow warns about a broken EXIF block (on a decode thread), python-multipart about
    a malformed body (on the event loop), and Pillow logs an error about a damaged TIFF:
    each is written as the service's own lines are, with the request's id, not bare on
    stderr, and only at LOG_LEVEL=debug: a caller's image or body is theirs to mend, which
    the answer's access line says, and one crafted image can hold 65,000 such warnings."""
    written = io.StringIO()
    logs.configure_logging(level, log_format, access_log=True)
    try:
        assert logs._direct is not None
        logs._direct.setStream(written)  # the writer thread's handler too
        async with running_app(make_settings()) as served:
            response = await served.client.post(
                "/cls",
                files={"file": ("x.jpg", corrupt_exif_jpeg(), "image/jpeg")},
                headers={"X-Request-ID": "exif-7"},
            )
            with logs.request_id_bound("req-7"):
                multipart = logging.getLogger("python_multipart.multipart")
                multipart.warning("Did not find CR at end of boundary (%d)", 40)
                multipart.debug("a debug line nobody needs")
                tiff = logging.getLogger("PIL.TiffImagePlugin")
                tiff.error("More samples per pixel than can be decoded: %s", 1000)
        logs.stop_writer()
    finally:
        logs.configure_logging("info", "text", access_log=True)
    assert response.status_code == 200, response.text
    lines = written.getvalue().splitlines()
    exif = [line for line in lines if "Tag data larger than file" in line]
    boundary = [line for line in lines if "end of boundary" in line]
    samples = [line for line in lines if "More samples per pixel" in line]
    expected = 1 if level == "debug" else 0
    assert (len(exif), len(boundary), len(samples)) == (expected, expected, expected), lines
    assert not [line for line in lines if "debug line" in line]
    if log_format == "json":
        assert all(json.loads(line)["request_id"] == "exif-7" for line in exif), exif
        assert all(json.loads(line)["request_id"] == "req-7" for line in boundary + samples)
    else:
        assert all("[exif-7]" in line for line in exif), exif
        assert all("[req-7]" in line for line in boundary + samples)
    if level != "debug":  # nor kept: each new message would stay in the registry for good
        registries = [
            getattr(module, "__warningregistry__", {})
            for name, module in list(sys.modules.items())
            if name == "PIL" or name.startswith("PIL.")
        ]
        assert not [key for r in registries for key in r if "Tag data larger" in str(key)]


@pytest.mark.parametrize("log_format", ["json", "JSON", "text", "bogus"])
def test_invalid_settings_are_one_line_in_the_asked_format(
    monkeypatch: pytest.MonkeyPatch, log_format: str
) -> None:
    """Start-up stops before logging is set up: a JSON log still gets its line as JSON."""
    monkeypatch.setenv("LOG_FORMAT", log_format)
    monkeypatch.setenv("MAX_BATCH_SIZE", "0")
    with pytest.raises(SystemExit) as stopped:
        load_settings()
    line = str(stopped.value)
    assert "\n" not in line
    if log_format.lower() == "json":
        record = json.loads(line)
        assert record["level"] == "CRITICAL"
        assert record["message"].startswith("invalid configuration: MAX_BATCH_SIZE='0'")
        assert datetime.datetime.fromisoformat(record["time"]).utcoffset() == datetime.timedelta(0)
    else:
        assert line.startswith("invalid configuration: MAX_BATCH_SIZE='0'")


def test_stopping_the_writer_keeps_the_handlers_added_beside_it() -> None:
    """Shutdown swaps the hand-off to the writer thread for direct writes, and nothing else:
    a test's capture handler, dropped, would lose every later line of the test process."""
    logs.configure_logging("info", "text", access_log=True)
    service = logging.getLogger("service")
    beside = logging.NullHandler()
    service.addHandler(beside)
    try:
        logs.stop_writer()
        assert beside in service.handlers
        assert not any(isinstance(h, QueueHandler) for h in service.handlers)
        assert len(service.handlers) == 2
    finally:
        service.removeHandler(beside)


def test_text_lines_carry_their_time_in_utc() -> None:
    """As JSON lines do: gunicorn's own lines carry their offset, and a host in another zone
    would otherwise write times that do not line up with them."""
    record = logging.LogRecord("service", logging.INFO, __file__, 1, "started", None, None)
    record.created = 86_400 * 365 + 0.25  # 1971-01-01, a quarter of a second past midnight UTC
    record.request_id = "-"
    assert logs.TextLines().format(record) == (
        f"1971-01-01T00:00:00.250+00:00 [{record.process}] INFO service [-] started"
    )
