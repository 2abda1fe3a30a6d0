"""The real server processes: gunicorn with uvicorn workers, and start-up failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import pytest
import torch
import torchvision

from tests import images
from tests.server import (
    BIN,
    PROJECT_ROOT,
    START_TIMEOUT_S,
    ServerProcess,
    free_port,
    gunicorn_command,
    running_server,
    server_env,
    start_logged,
    stop,
    uvicorn_command,
    wait_until,
    wait_until_ready,
)
from tests.support import Reference, metric_value

pytestmark = pytest.mark.slow


def test_gunicorn_serves_concurrent_requests_in_batches(
    tmp_path: Path, photos: list[Path], reference: Reference
) -> None:
    """Two workers, 48 concurrent real JPEGs: reference answers, shared batches, merged metrics."""
    env = server_env(tmp_path, WORKERS="2")
    expected = {path.name: reference.top_k(images.photo(path), 5) for path in photos}
    requests = [photos[i % len(photos)] for i in range(48)]

    async def send_all(url: str) -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=48)
        async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
            return await asyncio.gather(
                *(
                    client.post("/cls", files={"file": (p.name, p.read_bytes(), "image/jpeg")})
                    for p in requests
                )
            )

    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        responses = asyncio.run(send_all(server.url))
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    # Each worker closes its listening socket once: a second close of the same descriptor
    # could close a file another thread had opened meanwhile.
    assert "Bad file descriptor" not in server.log()

    for path, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        prediction = response.json()["prediction"]
        indices, scores = expected[path.name]
        assert [p["index"] for p in prediction] == indices
        assert [p["score"] for p in prediction] == pytest.approx(scores, rel=1e-3, abs=1e-6)

    served = metric_value(metrics, 'http_requests_total{method="POST",route="/cls",status="200"}')
    assert served == 48, "metrics must add up across both workers"
    batches = metric_value(metrics, "batch_size_count")
    batched_requests = metric_value(metrics, "batch_size_sum")
    assert batched_requests == 48
    assert batches < batched_requests, "some batch must have held more than one request"
    assert metrics.count("model_info{") == 1


NOT_HTTP = {
    "a header line without a colon": b"GET /healthz HTTP/1.1\r\nHost: test\r\nno colon\r\n\r\n",
    "a chunk size that is not hex": (
        b"POST /cls HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    ),
    "a TLS hello on the plain port": bytes.fromhex("160301020001000001fc0303") + bytes(32),
}


@pytest.mark.parametrize("start", [gunicorn_command, uvicorn_command], ids=["gunicorn", "uvicorn"])
def test_bytes_that_are_not_http_get_a_json_400_and_the_server_serves_on(
    tmp_path: Path, photos: list[Path], start: Callable[[int], list[str]]
) -> None:
    """What uvicorn's parser refuses never reaches the app, yet is answered like the rest."""
    port = free_port()
    with running_server(tmp_path, start(port), server_env(tmp_path, PORT=str(port))) as server:
        for name, request in NOT_HTTP.items():
            with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                connection.sendall(request)
                answer = b""
                while chunk := connection.recv(65536):
                    answer += chunk
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 "), (name, answer)
            assert b"content-type: application/json" in head.lower(), (name, head)
            assert b"connection: close" in head.lower(), (name, head)
            assert "not valid HTTP/1.1" in json.loads(body)["detail"], (name, body)
        photo = photos[0].read_bytes()
        response = httpx.post(
            f"{server.url}/cls", files={"file": ("photo.jpg", photo, "image/jpeg")}, timeout=30
        )
        assert response.status_code == 200, response.text


def test_uvicorn_with_a_metrics_dir_drops_its_live_gauges_as_it_stops(
    tmp_path: Path, photos: list[Path]
) -> None:
    """The container image names a PROMETHEUS_MULTIPROC_DIR, which a plain uvicorn run
    shares with the process before it (uvicorn's --reload starts another): that one's
    memory gauge would stay beside the new one's, as a worker that no longer exists."""
    port, metrics_dir = free_port(), tmp_path / "metrics"
    env = server_env(tmp_path, PORT=str(port), PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    with running_server(tmp_path, uvicorn_command(port), env) as server:
        photo = photos[0].read_bytes()
        response = httpx.post(
            f"{server.url}/cls", files={"file": ("photo.jpg", photo, "image/jpeg")}, timeout=30
        )
        assert response.status_code == 200, response.text
        scraped = httpx.get(f"{server.url}/metrics", timeout=30).text
        pid = server.process.pid
        assert f'worker_resident_memory_bytes{{pid="{pid}"}}' in scraped
        assert list(metrics_dir.glob(f"gauge_live*_{pid}.db"))
    assert "Application shutdown complete" in server.log()
    assert not list(metrics_dir.glob("gauge_live*"))
    assert list(metrics_dir.glob(f"counter_{pid}.db"))  # the totals stay


def test_a_body_the_parser_refuses_is_one_request_answered_under_the_callers_id(
    tmp_path: Path,
) -> None:
    """A chunked upload whose framing breaks while /cls reads it: the protocol answers
    400, and the app, reading on, sees the connection close. That must not count twice (a
    400 of no route, a 499 of /cls), nor log a client that disconnected, nor answer under a
    new id, whether the app had begun the request or not (all sent in one write)."""
    head = (
        b"POST /cls HTTP/1.1\r\nHost: test\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nX-Request-ID: %s\r\n\r\n"
        b"5\r\n--b\r\n\r\n"
    )
    port = free_port()
    with running_server(tmp_path, gunicorn_command(port), server_env(tmp_path)) as server:
        for request_id, pause_s in ((b"split-1", 0.5), (b"whole-1", 0.0)):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
                connection.sendall(head % request_id + (b"" if pause_s else b"zz\r\n"))
                if pause_s:
                    time.sleep(pause_s)  # the app is reading the body
                    connection.sendall(b"zz\r\n")
                answer = b""
                while chunk := connection.recv(65536):
                    answer += chunk
            answer_head = answer.partition(b"\r\n\r\n")[0].lower()
            assert answer_head.startswith(b"http/1.1 400 "), answer
            assert b"x-request-id: " + request_id + b"\r\n" in answer_head + b"\r\n", answer
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        cls_400 = 'http_requests_total{method="POST",route="/cls",status="400"}'
        assert metric_value(metrics, cls_400) == 2
        assert 'route="/cls",status="499"' not in metrics
        assert (
            metric_value(metrics, 'http_requests_total{method="-",route="unmatched",status="400"}')
            == 0
        )
    log = server.log()
    for request_id in ("split-1", "whole-1"):
        assert re.search(rf"\[{request_id}\] POST /cls answered 400 .*not valid HTTP/1.1", log), log
    assert "answered 499" not in log


def test_with_json_logs_every_line_of_the_server_is_json(tmp_path: Path) -> None:
    """gunicorn's and uvicorn's own lines too, once each, and no second access line; and
    what a C library behind Pillow reports about an upload, with the request's id."""
    env = server_env(tmp_path, LOG_FORMAT="json")
    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        assert httpx.get(f"{server.url}/nope", timeout=10).status_code == 404
        upload = {"file": ("broken.tif", images.tiff_with_a_corrupt_strip(), "image/tiff")}
        broken = httpx.post(f"{server.url}/cls", files=upload, timeout=30)
        assert broken.status_code == 400, broken.text
    records = [json.loads(line) for line in server.log().splitlines() if line.strip()]
    loggers = {record["logger"] for record in records}
    assert {"gunicorn.error", "uvicorn.error", "service.access"} <= loggers
    (libtiff,) = [r for r in records if r["message"].startswith("libtiff: ")]
    assert libtiff["request_id"] == broken.headers["X-Request-ID"]
    assert "uvicorn.access" not in loggers
    booting = [r for r in records if r["message"].startswith("Booting worker")]
    assert len(booting) == 1


def test_a_usr2_upgrade_answers_every_request_while_a_new_master_takes_over(
    tmp_path: Path, photos: list[Path]
) -> None:
    """gunicorn's upgrade, as the README gives it: USR2 starts a second master beside the
    first, TERM drains the old one's workers and ends it. A client sending throughout gets
    200 (but for the race below), and the new master serves on with its own metrics."""
    upload = {"file": ("photo.jpg", photos[0].read_bytes(), "image/jpeg")}
    statuses: list[int | str] = []
    sending = True

    def send() -> None:
        # A connection per request: closing an idle kept-alive connection races with a
        # request sent on it at that moment, at any server's shutdown.
        with httpx.Client(timeout=60, headers={"Connection": "close"}) as client:
            while sending:
                try:
                    statuses.append(client.post(f"{server.url}/cls", files=upload).status_code)
                except httpx.TransportError as error:
                    statuses.append(repr(error))

    with running_server(tmp_path, gunicorn_command(free_port()), server_env(tmp_path)) as server:
        old_master = psutil.Process(server.process.pid)
        (old_worker,) = old_master.children()
        sender = threading.Thread(target=send)
        sender.start()
        new_master = None
        try:
            old_master.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                masters = [p for p in old_master.children() if p.pid != old_worker.pid]
                if masters and (workers := masters[0].children()):
                    new_master = masters[0]
                    if f"[{workers[0].pid}] [INFO] Application startup complete" in server.log():
                        break
                time.sleep(0.2)
            else:
                pytest.fail(f"no new master ready: {server.log()[-3000:]}")
            served_before = len(statuses)
            old_master.send_signal(signal.SIGTERM)
            server.process.wait(timeout=60)
            assert not old_worker.is_running()
            time.sleep(1)
            metrics = httpx.get(f"{server.url}/metrics", timeout=10)
        finally:
            sending = False
            sender.join()
            if new_master is not None:
                new_master.send_signal(signal.SIGTERM)
                new_master.wait(timeout=60)

    assert served_before > 0
    assert len(statuses) > served_before  # answered after the old workers were gone too
    # A connection the old worker accepted just as it stopped, its request still on the
    # way, is closed unanswered (uvicorn closes connections with no request at shutdown):
    # once at most, in the instant of the TERM. Every other request is answered 200.
    missed = [status for status in statuses if status != 200]
    assert len(missed) <= 1, statuses
    assert all(isinstance(m, str) for m in missed), statuses  # a connection error, not a status
    assert metrics.status_code == 200
    assert (
        metric_value(metrics.text, 'http_requests_total{method="POST",route="/cls",status="200"}')
        > 0
    )


def test_sigint_to_the_master_alone_drains_the_worker_and_exits_promptly(
    tmp_path: Path,
) -> None:
    """gunicorn's master passes SIGINT (and SIGQUIT) on as SIGQUIT, which uvicorn's worker
    would ignore until the master SIGKILLed it at graceful_timeout (30 s), without its
    drain."""
    with running_server(tmp_path, gunicorn_command(free_port()), server_env(tmp_path)) as server:
        started = time.monotonic()
        server.process.send_signal(signal.SIGINT)
        server.process.wait(timeout=60)
        elapsed = time.monotonic() - started
    assert elapsed < 15, server.log()
    assert "Application shutdown complete" in server.log()
    assert "SIGKILL" not in server.log()


@pytest.mark.parametrize("start", [gunicorn_command, uvicorn_command], ids=["gunicorn", "uvicorn"])
def test_a_request_still_open_when_the_drain_time_is_up_gets_a_json_503(
    tmp_path: Path, start: Callable[[int], list[str]]
) -> None:
    """An upload that trickles on past SIGTERM (within BODY_IDLE_TIMEOUT_S between chunks)
    would hold the worker until the master SIGKILLed it, before the app's own shutdown ran,
    and plain uvicorn until the upload ended. Once DRAIN_TIMEOUT_S is up it is answered 503,
    and the worker shuts down cleanly."""
    port = free_port()
    env = server_env(tmp_path, DRAIN_TIMEOUT_S="2", PORT=str(port))
    with running_server(tmp_path, start(port), env) as server:
        head = (
            "POST /cls HTTP/1.1\r\nHost: test\r\nContent-Length: 100000\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n\r\n"
            '--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n\r\n'
        )
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            connection.sendall(head.encode())
            trickling = True

            def trickle() -> None:
                while trickling:
                    try:
                        connection.sendall(b"x" * 100)
                    except OSError:
                        return
                    time.sleep(0.5)

            sender = threading.Thread(target=trickle)
            sender.start()
            try:
                time.sleep(1)
                started = time.monotonic()
                server.process.send_signal(signal.SIGTERM)
                answer = b""
                while chunk := connection.recv(65536):
                    answer += chunk
                answered_after = time.monotonic() - started
            finally:
                trickling = False
                sender.join()
        server.process.wait(timeout=60)
        exited_after = time.monotonic() - started
    head_bytes, _, body = answer.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 503 "), answer
    assert "shut down before this request finished" in json.loads(body)["detail"]
    assert 1.5 < answered_after < 8
    assert exited_after < 11  # graceful_timeout is 12 s
    log = server.log()
    assert "Application shutdown complete" in log
    # uvicorn's one line for the requests it cut off, no traceback for each.
    assert "Cancel 1 running task(s)" in log
    assert "Exception in ASGI application" not in log
    assert "Traceback" not in log


def cls_request(photo: bytes, *, close: bool = False) -> tuple[bytes, bytes]:
    """The head and body of a ``POST /cls`` of ``photo``, as sent on a raw socket."""
    body = (
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
        b"Content-Type: image/jpeg\r\n\r\n" + photo + b"\r\n--b--\r\n"
    )
    head = (
        f"POST /cls HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    ).encode()
    return head, body


@pytest.mark.parametrize("sent_before", ["part of the head", "part of the body"])
def test_a_request_arriving_at_sigterm_is_served(
    tmp_path: Path, photos: list[Path], sent_before: str
) -> None:
    """The worker accepted the connection and the request began before SIGTERM; the rest
    of it arrives after. The drain serves it: a proxy that sent it would not resend it."""
    port = free_port()
    head, body = cls_request(photos[0].read_bytes())
    with running_server(tmp_path, gunicorn_command(port), server_env(tmp_path)) as server:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
            request = head + body
            split = 20 if sent_before == "part of the head" else len(head) + 1000
            connection.sendall(request[:split])
            time.sleep(0.5)  # the worker has read it
            server.process.send_signal(signal.SIGTERM)
            time.sleep(0.5)  # the shutdown has begun
            connection.sendall(request[split:])
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        assert server.process.wait(timeout=60) == 0
    head_bytes, _, answer_body = answer.partition(b"\r\n\r\n")
    assert head_bytes.startswith(b"HTTP/1.1 200 "), answer
    assert b"connection: close" in head_bytes.lower()
    assert len(json.loads(answer_body)["prediction"]) == 5


def test_connections_waiting_in_the_backlog_at_sigterm_are_served_not_reset(
    tmp_path: Path, photos: list[Path]
) -> None:
    """Whole requests sent on connections the worker had not accepted yet when the shutdown
    began: closing the listening socket would reset them, unanswered. The worker is paused
    so that they wait in the backlog, deterministically."""
    port = free_port()
    request = b"".join(cls_request(photos[0].read_bytes(), close=True))
    with running_server(tmp_path, gunicorn_command(port), server_env(tmp_path)) as server:
        [worker] = psutil.Process(server.process.pid).children()
        worker.suspend()
        connections = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(8)]
        for connection in connections:
            connection.sendall(request)
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the master has passed SIGTERM on
        worker.resume()
        answers = []
        for connection in connections:
            with connection:
                answer = b""
                while chunk := connection.recv(65536):
                    answer += chunk
                answers.append(answer.split(b"\r\n", 1)[0])
        assert server.process.wait(timeout=60) == 0
    assert answers == [b"HTTP/1.1 200 OK"] * 8


def test_a_shutdown_with_nothing_open_logs_no_error(tmp_path: Path) -> None:
    """With DRAIN_TIMEOUT_S=0 too: no request was open, so none was cut off."""
    env = server_env(tmp_path, DRAIN_TIMEOUT_S="0")
    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        pass
    assert "Application shutdown complete" in server.log()
    assert "ERROR" not in server.log()


def test_a_first_worker_stuck_loading_its_model_stops_the_server_after_worker_timeout(
    tmp_path: Path,
) -> None:
    """A weights file that never finishes reading (a FIFO nobody writes to) holds the worker
    in start-up: WORKER_TIMEOUT_S counts from the worker's start, and the master aborts it.
    No worker of the server has started, so each started again times out the same way,
    which left to gunicorn goes on for as long as the master runs: after three rounds, the
    server stops, with one line that names the setting, and the status of a worker that
    cannot boot. Workers that time out together, warming up at once, are one round."""
    weights = tmp_path / "weights.pth"
    os.mkfifo(weights)
    env = server_env(tmp_path, WEIGHTS=str(weights), WORKER_TIMEOUT_S="10", WORKERS="2")
    log_path = tmp_path / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            gunicorn_command(free_port()),
            cwd=PROJECT_ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # The master stops the stuck worker with SIGABRT: no core file of a torch process.
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (0, 0)),
        )
    try:
        assert process.wait(timeout=150) == 3
        log_text = log_path.read_text()
        assert log_text.count("WORKER TIMEOUT") == 6
        assert "was silent for WORKER_TIMEOUT_S=10 s while it started and was restarted" in (
            log_text
        )
        assert (
            "workers were started 3 times and each time timed out before they started, at "
            "WORKER_TIMEOUT_S=10 s"
        ) in log_text
        assert "or a warm-up of batches of MAX_BATCH_SIZE=16 on a slow device" in log_text
        assert log_text.count("Booting worker") == 6
        assert "Traceback" not in log_text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


@pytest.mark.parametrize(
    ("app", "first_statuses", "problem", "refusal"),
    [
        (
            "tests.stuck_model_app:app",
            [504],
            "stalled",
            "a batch has run longer than STALL_TIMEOUT_S",
        ),
        ("tests.failed_device_app:app", [503], "device failed", "the model's device failed"),
        (
            "tests.out_of_memory_app:app",
            [503, 503, 503],
            "out of memory",
            "the model runs out of memory",
        ),
    ],
    ids=["model stuck", "device failed", "out of memory"],
)
def test_a_worker_that_cannot_serve_is_replaced(
    tmp_path: Path,
    photos: list[Path],
    app: str,
    first_statuses: list[int],
    problem: str,
    refusal: str,
) -> None:
    """/healthz answers for whichever worker takes the probe, so with several workers it
    cannot single out one whose model is stuck (past STALL_TIMEOUT_S), whose device
    failed, or whose model finds no memory even for lone images, time after time: the
    worker stops its heartbeat, and gunicorn replaces it after WORKER_TIMEOUT_S. Meanwhile
    it refuses new requests at once, rather than let them wait for their deadline."""
    port = free_port()
    command = gunicorn_command(port, app)
    env = server_env(tmp_path, STALL_TIMEOUT_S="1", WORKER_TIMEOUT_S="10", REQUEST_TIMEOUT_MS="500")
    with running_server(tmp_path, command, env) as server:
        photo = {"file": ("photo.jpg", photos[0].read_bytes(), "image/jpeg")}
        first = [httpx.post(f"{server.url}/cls", files=photo, timeout=30) for _ in first_statuses]
        assert [response.status_code for response in first] == first_statuses
        wait_until(
            lambda: httpx.get(f"{server.url}/healthz", timeout=5).status_code == 503,
            lambda: f"/healthz never turned 503 ({problem})",
            timeout_s=10,
        )
        refused = httpx.post(f"{server.url}/cls", files=photo, timeout=30)
        assert refused.status_code == 503, refused.text
        assert refusal in refused.json()["detail"]
        deadline = time.monotonic() + 90
        while server.log().count("Booting worker") < 2 and time.monotonic() < deadline:
            assert server.process.poll() is None, server.log()
            time.sleep(0.5)
        wait_until_ready(server)
        assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
        log = server.log()
    assert f"the worker cannot serve ({problem}): its heartbeat stops" in log
    assert "WORKER TIMEOUT" in log
    assert "was silent for WORKER_TIMEOUT_S=10 s while it served and was restarted" in log
    assert log.count("Booting worker") == 2


def heartbeat_times(worker: psutil.Process) -> Callable[[], float]:
    """When ``worker`` last reported to the master: the time gunicorn stamps on the
    worker's heartbeat file, an unlinked file the worker holds open."""
    descriptors = Path(f"/proc/{worker.pid}/fd")
    (heartbeat,) = [
        fd for fd in descriptors.iterdir() if Path(_opened(fd)).name.startswith("wgunicorn-")
    ]
    return lambda: os.stat(heartbeat).st_mtime


def _opened(descriptor: Path) -> str:
    """What a process's descriptor (a link under /proc/PID/fd) names; "" for one closed
    since its folder was listed."""
    try:
        return os.readlink(descriptor)
    except FileNotFoundError:
        return ""


def test_a_worker_silent_for_less_than_worker_timeout_is_not_killed(
    tmp_path: Path, photos: list[Path]
) -> None:
    """A serving worker reports to the master every second, so that WORKER_TIMEOUT_S is the
    silence that gets it killed. Were it to report only every half of that (gunicorn's own
    timeout for a worker), a worker stopped (a blocked event loop, a paused process) for
    7 s of a 10 s WORKER_TIMEOUT_S would be killed when its last report was over 3 s old."""
    env = server_env(tmp_path, WORKER_TIMEOUT_S="10")
    photo = {"file": ("photo.jpg", photos[0].read_bytes(), "image/jpeg")}
    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        (worker,) = psutil.Process(server.process.pid).children()
        last_report = heartbeat_times(worker)
        reports = {last_report()}
        deadline = time.monotonic() + 4.5
        while time.monotonic() < deadline:
            reports.add(last_report())
            time.sleep(0.05)
        assert len(reports) >= 4, f"{len(reports)} reports in 4.5 s"

        worker.suspend()
        time.sleep(7)
        worker.resume()
        assert httpx.post(f"{server.url}/cls", files=photo, timeout=30).status_code == 200
        assert psutil.Process(server.process.pid).children() == [worker]
        log = server.log()
    assert "WORKER TIMEOUT" not in log


def wait_for_restarts_while_serving(server: ServerProcess, restarts: int) -> None:
    """Until a worker that cannot start has said ``restarts`` times that gunicorn starts
    it again, the server up throughout."""
    deadline = time.monotonic() + 90
    while server.log().count("gunicorn starts this worker again") < restarts:
        assert time.monotonic() < deadline, server.log()
        assert server.process.poll() is None, server.log()
        time.sleep(0.2)


@pytest.mark.parametrize("change", ["overwritten", "removed"])
def test_a_replacement_worker_that_cannot_start_leaves_the_others_serving(
    tmp_path: Path, photos: list[Path], change: str
) -> None:
    """The weights file changed on disk after the start: a worker started to replace
    another says why it cannot start and is started again, while the other worker serves
    on. (Exiting with gunicorn's boot error, it would halt the whole server.) Once the file is
    mended, the next attempt starts. A file removed is found by the settings, before the
    model: the same holds."""
    weights = tmp_path / "weights.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    env = server_env(tmp_path, WORKERS="2", WEIGHTS=str(weights))
    photo = {"file": ("photo.jpg", photos[0].read_bytes(), "image/jpeg")}
    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        good = weights.read_bytes()
        if change == "removed":
            weights.unlink()
        else:
            weights.write_bytes(b"not a state dict")
        master = psutil.Process(server.process.pid)
        first, second = master.children()
        first.kill()
        wait_for_restarts_while_serving(server, 2)
        # Each replacement waits longer before it exits, not to take a core in a loop.
        pauses = re.findall(r"gunicorn starts this worker again in (\S+) s", server.log())
        assert pauses[:2] == ["1", "2"], server.log()
        for _ in range(4):  # every one of them reaches the worker still serving
            assert httpx.post(f"{server.url}/cls", files=photo, timeout=30).status_code == 200
        weights.write_bytes(good)
        wait_until(
            lambda: (
                len([w for w in master.children() if w.pid != second.pid]) == 1
                and server.log().count("model ready") >= 3
            ),
            server.log,
        )
        wait_until_ready(server)
        log = server.log()
    assert "Reason: Worker failed to boot." not in log
    assert "Traceback" not in log


@pytest.mark.parametrize("change", ["overwritten", "removed"])
def test_a_stop_while_a_replacement_worker_pauses_logs_no_error(
    tmp_path: Path, change: str
) -> None:
    """The pausing worker, stopped, does not exit with the status that asks gunicorn to
    start it again, which gunicorn would log as an error ("Worker exited with code 1") in a
    clean stop."""
    weights = tmp_path / "weights.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    env = server_env(tmp_path, WORKERS="2", WEIGHTS=str(weights))
    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        if change == "removed":
            weights.unlink()
        else:
            weights.write_bytes(b"not a state dict")
        psutil.Process(server.process.pid).children()[0].kill()
        wait_for_restarts_while_serving(server, 1)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(timeout=60) == 0
    log = server.log()
    assert "exited with code" not in log, log
    assert "Traceback" not in log


def test_a_replacement_worker_without_its_metrics_dir_leaves_the_others_serving(
    tmp_path: Path, photos: list[Path]
) -> None:
    """PROMETHEUS_MULTIPROC_DIR unusable since the start (here a file in its place): a
    worker started to replace another cannot start, and is started again after a pause
    while the other serves, as for its weights, rather than halt the server."""
    metrics_dir = tmp_path / "metrics"
    env = server_env(tmp_path, WORKERS="2", PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    photo = {"file": ("photo.jpg", photos[0].read_bytes(), "image/jpeg")}
    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        # Both started: one still warming up would write its first samples after the move.
        wait_until(lambda: server.log().count("Application startup complete") >= 2, server.log)
        metrics_dir.rename(tmp_path / "moved")
        metrics_dir.write_text("a file where the directory was")
        master = psutil.Process(server.process.pid)
        master.children()[0].kill()
        wait_for_restarts_while_serving(server, 2)
        assert "PROMETHEUS_MULTIPROC_DIR" in server.log()
        for _ in range(4):
            assert httpx.post(f"{server.url}/cls", files=photo, timeout=30).status_code == 200
        metrics_dir.unlink()
        (tmp_path / "moved").rename(metrics_dir)
        wait_until(lambda: server.log().count("model ready") >= 3, server.log)
        wait_until_ready(server)
        log = server.log()
    assert "Reason: Worker failed to boot." not in log
    assert "Traceback" not in log


def test_a_replacement_worker_failing_to_start_by_a_bug_leaves_the_others_serving(
    tmp_path: Path, photos: list[Path]
) -> None:
    """An error nobody foresaw, where a known one says what to change: the worker logs it
    with its traceback, a bug's, and is started again while the other serves, as for a
    known one. (Left to uvicorn, it would exit with gunicorn's boot error, which halts the
    whole server.)"""
    mark = tmp_path / "start-bug"
    env = server_env(tmp_path, WORKERS="2", START_BUG_MARK=str(mark))
    command = gunicorn_command(free_port(), "tests.start_bug_app:app")
    photo = {"file": ("photo.jpg", photos[0].read_bytes(), "image/jpeg")}
    with running_server(tmp_path, command, env) as server:
        mark.touch()
        first, _ = psutil.Process(server.process.pid).children()
        first.kill()
        wait_for_restarts_while_serving(server, 2)
        for _ in range(4):
            assert httpx.post(f"{server.url}/cls", files=photo, timeout=30).status_code == 200
        log = server.log()
    assert "cannot start: an unexpected error (RuntimeError('a bug in the start-up'))" in log
    assert "Traceback" in log
    assert "Reason: Worker failed to boot." not in log


def test_a_worker_that_cannot_start_with_no_other_serving_stops_the_server(
    tmp_path: Path,
) -> None:
    """With one worker, its replacement failing to start leaves nothing to serve: it stops
    the server with its one line, as at the first start, rather than a restart loop that
    holds the port and answers nothing."""
    weights = tmp_path / "weights.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    env = server_env(tmp_path, WORKERS="1", WEIGHTS=str(weights))
    with running_server(tmp_path, gunicorn_command(free_port()), env) as server:
        weights.write_bytes(b"not a state dict")
        [worker] = psutil.Process(server.process.pid).children()
        worker.kill()
        assert server.process.wait(90) == 3, server.log()
        log = server.log()
    assert "cannot start: WEIGHTS=" in log
    assert "gunicorn starts this worker again" not in log
    assert "Traceback" not in log


def test_a_first_worker_killed_before_it_started_leaves_the_store_to_its_replacement(
    tmp_path: Path, photos: list[Path]
) -> None:
    """A fresh install whose first worker outlives WORKER_TIMEOUT_S before it is ready (a
    slow first download, here a stopped process): the server never started, so its
    replacement creates the task store, and tasks are served."""
    env = server_env(tmp_path, WORKERS="1", WORKER_TIMEOUT_S="10")
    port = free_port()
    log_path = tmp_path / "server.log"
    process = start_logged(gunicorn_command(port), env, log_path)
    server = ServerProcess(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + 30
        while not (workers := psutil.Process(process.pid).children()) or not has_reported(
            workers[0].pid
        ):
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.01)
        workers[0].suspend()
        wait_until_ready(server)
        photo = {"file": ("photo.jpg", photos[0].read_bytes(), "image/jpeg")}
        accepted = httpx.post(f"{server.url}/tasks", files=photo, timeout=30)
        assert accepted.status_code == 202, accepted.text
        log_text = server.log()
    finally:
        stop(process)
    assert "WORKER TIMEOUT" in log_text
    assert (tmp_path / "data" / "tasks.sqlite3").exists()


@pytest.mark.slow
def test_a_second_server_on_the_same_port_leaves_the_first_untouched(
    tmp_path: Path, photos: list[Path]
) -> None:
    """It cannot bind, and exits: with a metrics directory given by hand, as the container
    image gives one, it must not have wiped the first server's counters, nor, with the
    default one, left directories in the temporary folder (it exits without on_exit)."""
    port = free_port()
    env = server_env(tmp_path, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
    with running_server(tmp_path, gunicorn_command(port), env) as server:
        photo = {"file": ("photo.jpg", photos[0].read_bytes(), "image/jpeg")}
        assert httpx.post(f"{server.url}/cls", files=photo, timeout=30).status_code == 200
        counted = 'http_requests_total{method="POST",route="/cls",status="200"} 1.0'
        assert counted in httpx.get(f"{server.url}/metrics").text
        temporary = set((tmp_path / "tmp").iterdir())
        for second_env in (env, server_env(tmp_path)):
            second = subprocess.run(
                gunicorn_command(port),
                cwd=PROJECT_ROOT,
                env=second_env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert second.returncode == 1, second.stderr
            # One line naming the setting, not gunicorn's tries a second apart.
            assert "Connection in use" not in second.stderr
            [refusal] = [line for line in second.stderr.splitlines() if "cannot listen" in line]
            assert "(Address already in use)" in refusal
            assert "set gunicorn's --bind to a free port" in refusal  # as the command gave it
        assert counted in httpx.get(f"{server.url}/metrics").text
        assert set((tmp_path / "tmp").iterdir()) == temporary


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl+C"])
def test_a_server_stopped_while_its_worker_starts_stops_at_once(
    tmp_path: Path, stop: signal.Signals
) -> None:
    """Loading and warming up the model, which nothing interrupts, may take minutes (a
    download, a large MAX_BATCH_SIZE): the worker would wait its start-up out, and gunicorn
    SIGKILL it at graceful_timeout (DRAIN_TIMEOUT_S + 10 s), blaming its memory. Nothing is
    served yet, so nothing is drained: it stops at once."""
    command = gunicorn_command(free_port(), "tests.slow_start_app:app")
    env = server_env(tmp_path, SLOW_START_S="120")
    log_path = tmp_path / "server.log"
    process = start_logged(command, env, log_path)
    try:
        wait_until(lambda: "Started server process" in log_path.read_text(), log_path.read_text)
        process.send_signal(stop)
        stopped_at = time.monotonic()
        process.wait(timeout=60)
        stopped_in_s = time.monotonic() - stopped_at
    finally:
        process.kill()
    log = log_path.read_text()
    assert stopped_in_s < 10, log
    assert f"stopped by {signal.SIGTERM.name} while starting" in log
    assert "SIGKILL" not in log
    assert "Traceback" not in log


def test_requests_waiting_for_a_worker_stopped_while_it_starts_are_answered_503(
    tmp_path: Path,
) -> None:
    """With no worker serving (the first start, or one worker reloaded by SIGHUP), requests
    wait on the listening socket; were the worker stopped then to exit at once, the master
    would close the socket and every one be reset unanswered, which a proxy does not resend.
    A reload meanwhile leaves them waiting for the worker that replaces the one it stops."""
    port = free_port()
    command = gunicorn_command(port, "tests.slow_start_app:app")
    env = server_env(tmp_path, SLOW_START_S="120")
    log_path = tmp_path / "server.log"
    process = start_logged(command, env, log_path)
    clients: list[socket.socket] = []
    try:
        wait_until(lambda: "Started server process" in log_path.read_text(), log_path.read_text)
        # Connections that send nothing (a browser's preconnect) first: answered together
        # with the rest, they keep none waiting for its turn.
        clients.extend(socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(4))
        body = b"not read: the worker answers before it"
        for _ in range(3):
            client = socket.create_connection(("127.0.0.1", port), timeout=30)
            client.sendall(
                b"POST /cls HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                b"boundary=b\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            clients.append(client)
        process.send_signal(signal.SIGHUP)
        # The new worker loading its model (past importing the app, when its server's
        # signal handlers are in place).
        wait_until(
            lambda: log_path.read_text().count("Started server process") >= 2, log_path.read_text
        )
        assert "stopped by SIGTERM while starting" in log_path.read_text()
        time.sleep(1)  # what an answer would take
        for client in clients:
            client.setblocking(False)
            with pytest.raises(BlockingIOError):  # neither answered nor closed
                client.recv(1)
            client.setblocking(True)
        process.send_signal(signal.SIGTERM)
        answers = []
        for client in clients:
            received = b""
            while chunk := client.recv(65536):
                received += chunk
            answers.append(received)
        process.wait(timeout=60)
    finally:
        process.kill()
        for client in clients:
            client.close()
    log = log_path.read_text()
    for answer in answers:
        head, _, answer_body = answer.partition(b"\r\n\r\n")
        status, *header_lines = head.split(b"\r\n")
        assert status.startswith(b"HTTP/1.1 503 "), (answer, log)
        assert {b"retry-after: 1", b"connection: close"} <= set(header_lines)
        assert json.loads(answer_body) == {"detail": "the server is shutting down; retry"}
    assert len(answers) == 7
    assert "answered 7 waiting connections 503" in log
    assert "Traceback" not in log


def test_requests_waiting_for_a_worker_stopped_while_it_imports_the_app_are_answered_503(
    tmp_path: Path,
) -> None:
    """Before uvicorn's server sets its signal handlers, past importing the app (seconds,
    torch's among them), a stopped worker would end by the signal's default action, and
    every request waiting for it be reset. A client connecting again is refused, not queued
    for the exiting worker and reset."""
    port = free_port()
    command = gunicorn_command(port, "tests.slow_import_app:app")
    env = server_env(tmp_path, SLOW_IMPORT_S="120")
    log_path = tmp_path / "server.log"
    process = start_logged(command, env, log_path)
    clients: list[socket.socket] = []
    try:
        wait_until(lambda: "Booting worker" in log_path.read_text(), log_path.read_text)
        for _ in range(3):
            client = socket.create_connection(("127.0.0.1", port), timeout=30)
            client.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
            clients.append(client)
        time.sleep(1)  # the worker's handlers in place: it has slept in the import since
        process.send_signal(signal.SIGTERM)
        answers = []
        for client in clients:
            received = b""
            while chunk := client.recv(65536):
                received += chunk
            answers.append(received)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
        process.wait(timeout=60)
    finally:
        process.kill()
        for client in clients:
            client.close()
    log = log_path.read_text()
    assert [answer.split(b"\r\n", 1)[0] for answer in answers] == [
        b"HTTP/1.1 503 Service Unavailable"
    ] * 3, log
    assert "stopped by SIGTERM while starting" in log
    assert "answered 3 waiting connections 503" in log
    assert process.returncode == 0, log


def test_gunicorns_error_logfile_holds_every_line_and_usr1_reopens_it(
    tmp_path: Path, photos: list[Path]
) -> None:
    """The service writes its lines to standard error: --error-logfile takes them all (the
    access lines, the model's, every error), not gunicorn's alone."""
    port = free_port()
    logfile = tmp_path / "error.log"
    command = [*gunicorn_command(port)[:-2], "--error-logfile", str(logfile), "--bind"]
    command.append(f"127.0.0.1:{port}")
    photo = {"file": ("photo.jpg", photos[0].read_bytes(), "image/jpeg")}
    with running_server(tmp_path, command, server_env(tmp_path)) as server:
        assert httpx.post(f"{server.url}/cls", files=photo, timeout=30).status_code == 200
        wait_until(lambda: "POST /cls answered 200" in logfile.read_text(), logfile.read_text)
        assert "model ready" in logfile.read_text()
        logfile.rename(tmp_path / "error.log.1")
        server.process.send_signal(signal.SIGUSR1)
        wait_until(logfile.exists, lambda: "no new error.log")
        time.sleep(1)  # the workers reopen it after the master
        assert httpx.post(f"{server.url}/cls", files=photo, timeout=30).status_code == 200
        wait_until(lambda: "POST /cls answered 200" in logfile.read_text(), logfile.read_text)


def has_reported(worker_pid: int) -> bool:
    """Whether a gunicorn worker has reported to its master once: gunicorn times out only a
    worker that has (until then its heartbeat file holds a wall-clock time, which the
    master's monotonic clock never passes)."""
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        for fd in os.listdir(f"/proc/{worker_pid}/fd"):
            descriptor = f"/proc/{worker_pid}/fd/{fd}"
            with contextlib.suppress(FileNotFoundError):
                if "wgunicorn-" in os.readlink(descriptor):
                    return os.stat(descriptor).st_mtime < time.time() / 2
    return False


def failed_start(command: list[str], env: dict[str, str]) -> tuple[str, list[str]]:
    """Start ``command``, expect it to stop with exit code 3 and no traceback; its output
    and its lines saying why it cannot start."""
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr, [line for line in result.stderr.splitlines() if "cannot start" in line]


def start_up_failure_line(env: dict[str, str]) -> str:
    """Start uvicorn, expect it to stop with exit code 3, and return its one error line."""
    output, errors = failed_start(
        [str(BIN / "uvicorn"), "main:app", "--port", str(free_port())], env
    )
    assert len(errors) == 1, output
    return errors[0]


def test_offline_imagenet_weights_stop_start_up_with_one_line(tmp_path: Path) -> None:
    env = server_env(
        tmp_path,
        WEIGHTS="imagenet",
        TORCH_HOME=str(tmp_path / "torch"),
        # A proxy that refuses connections makes the download fail the same way everywhere.
        HTTPS_PROXY=f"http://127.0.0.1:{free_port()}",
        https_proxy=f"http://127.0.0.1:{free_port()}",
    )
    error = start_up_failure_line(env)
    assert "WEIGHTS=/path/to/state_dict.pth" in error
    assert "WEIGHTS=random" in error


def test_invalid_settings_stop_uvicorns_workers_rather_than_restart_them(tmp_path: Path) -> None:
    """uvicorn's --workers starts again a worker that exits, but for one that could not
    start (exit status 3): an invalid setting would print its line every few seconds, for
    ever, and nothing be served."""
    env = server_env(tmp_path, MAX_BATCH_SIZE="abc")
    command = [str(BIN / "uvicorn"), "main:app", "--workers", "2", "--port", str(free_port())]
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    refusals = [line for line in result.stderr.splitlines() if "invalid configuration" in line]
    assert refusals, result.stderr
    assert set(refusals) == {
        "invalid configuration: MAX_BATCH_SIZE='abc': takes a whole number in digits "
        "(10485760, not 1e7 or 10.5)"
    }
    assert len(refusals) <= 2, result.stderr  # once a worker, none started again
    assert "Traceback" not in result.stderr


def symbolic_link_loop(tmp_path: Path) -> Path:
    """A DATA_DIR that the settings leave to the task store (which cannot open it)."""
    (tmp_path / "data").symlink_to(tmp_path / "loop")
    (tmp_path / "loop").symlink_to(tmp_path / "data")
    return tmp_path / "data"


def test_an_unusable_data_dir_stops_start_up_with_one_line(tmp_path: Path) -> None:
    """DATA_DIR that cannot hold the task store (here, a symbolic link loop, which opening
    the store finds) stops the worker with one line naming the setting, not a traceback and
    not a restart loop."""
    not_a_directory = symbolic_link_loop(tmp_path)
    env = server_env(tmp_path, DATA_DIR=str(not_a_directory), LOG_LEVEL="debug")
    output, errors = failed_start(
        [str(BIN / "uvicorn"), "main:app", "--port", str(free_port())], env
    )
    assert len(errors) == 1, output
    assert "DATA_DIR" in errors[0]
    assert str(not_a_directory) in errors[0]
    assert "warming up" not in output, "said only once the model had loaded"


def test_workers_that_cannot_start_stop_gunicorn_without_a_traceback(tmp_path: Path) -> None:
    """Each of several workers says in one line why it cannot start; the master halts once,
    with the boot error's status."""
    # Found before the model loads: both workers fail about together.
    env = server_env(tmp_path, WORKERS="2", DATA_DIR=str(symbolic_link_loop(tmp_path)))
    output, errors = failed_start(gunicorn_command(free_port()), env)
    assert 1 <= len(errors) <= 2, output
    assert all("DATA_DIR" in line for line in errors)
    assert output.count("Reason: Worker failed to boot.") == 1


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("MAX_BATCH_SIZE", "0", "MAX_BATCH_SIZE='0'"),
        ("DEVICE", "gpu", "DEVICE='gpu'"),
        ("WEIGHTS", "{tmp}/missing.pth", "does not exist; give a state-dict file"),
        ("LABELS_FILE", "{tmp}/missing.txt", "does not exist; give a text file"),
        ("PROMETHEUS_MULTIPROC_DIR", "{tmp}/a-file", "it is a file, not a directory"),
        ("DATA_DIR", "{tmp}/a-file", "is not a directory; set DATA_DIR to a writable"),
    ],
)
def test_invalid_settings_stop_gunicorn_before_it_listens(
    setting: str, value: str, says: str, tmp_path: Path
) -> None:
    """One line, before the port is bound and workers boot, each to fail alike."""
    (tmp_path / "a-file").write_text("a file")
    env = server_env(tmp_path, **{setting: value.format(tmp=tmp_path)})
    line = refusal_before_listening(gunicorn_command(free_port()), env)
    assert setting in line
    assert says in line


@pytest.mark.parametrize(
    ("given", "says"),
    [
        (["-e", "WORKERS=2"], "gunicorn's -e sets WORKERS after gunicorn_config.py"),
        (["-e", "MAX_BATCH_SIZE=0"], "MAX_BATCH_SIZE='0'"),
        (["--preload"], "gunicorn's --preload imports the app in the master"),
        (["-k", "uvicorn.workers.UvicornWorker"], "replaces the service's worker"),
    ],
)
def test_settings_given_with_gunicorns_e_stop_it_before_it_listens(
    given: list[str], says: str, tmp_path: Path
) -> None:
    """gunicorn applies -e after reading its configuration file: its master would run by
    the environment's values, its workers by -e's."""
    line = refusal_before_listening([*gunicorn_command(free_port()), *given], server_env(tmp_path))
    assert says in line


def refusal_before_listening(command: list[str], env: dict[str, str]) -> str:
    """The one line with which gunicorn, run so, stops before it listens."""
    result = subprocess.run(
        command, cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 3, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "invalid configuration" in line]
    assert "Listening at" not in result.stderr
    assert "Traceback" not in result.stderr
    return line


def test_a_daemonized_master_keeps_its_directories_until_it_exits(tmp_path: Path) -> None:
    """With --daemon, gunicorn reads its configuration in a process that exits once it has
    forked the master. Directories named by that process's pid would pass for a dead
    master's, and the master remove them as it started: its workers' ready marks would go
    with them, and their metrics land in a directory anyone could read."""
    port = free_port()
    env = server_env(tmp_path, WORKERS="1")
    temporary, pid_file = Path(env["TMPDIR"]), tmp_path / "gunicorn.pid"
    log = tmp_path / "server.log"
    daemon_flags = ["--daemon", "--pid", str(pid_file), "--log-file", str(log)]
    subprocess.run(
        [*gunicorn_command(port), *daemon_flags], cwd=PROJECT_ROOT, env=env, check=True, timeout=60
    )
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                break
        time.sleep(0.2)
    assert pid_file.exists(), log.read_text()
    master = psutil.Process(int(pid_file.read_text()))
    siblings = temporary / f"service-siblings-{master.pid}"
    metrics = temporary / f"prometheus-multiproc-{master.pid}"
    try:
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200, log.read_text()
        assert [mark.name for mark in siblings.iterdir()] != [], "no worker's ready mark"
        assert metrics.stat().st_mode & 0o777 == 0o700
        assert "worker_resident_memory_bytes{" in httpx.get(f"{url}/metrics", timeout=5).text
        assert list(metrics.glob("*.db")), "the workers' metrics are elsewhere"
    finally:
        master.terminate()
        try:
            master.wait(40)
        except psutil.TimeoutExpired:
            for process in [master, *master.children(recursive=True)]:
                process.kill()
    assert not siblings.exists()
    assert not metrics.exists()
