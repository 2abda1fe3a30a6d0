"""deploy/nginx/nginx.conf in front of two real servers: requests reach both, and SIGTERM to
one of them under sustained load loses no request.

The config is run as written, with only its addresses and paths replaced (``render``), so
the retry and keep-alive rules under test are the ones that ship.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from main import MULTIPART_OVERHEAD_BYTES
from service.settings import PROJECT_ROOT, Settings
from tests.server import ServerProcess, free_port, gunicorn_command, running_server, server_env

pytestmark = [pytest.mark.deploy, pytest.mark.slow]

CONFIG = PROJECT_ROOT / "deploy" / "nginx" / "nginx.conf"
INSTALL_HINT = "run `make deploy-tools` (apt-get install -y nginx)"
# The replicas' addresses in the shipped config, replaced by the test servers' ones.
REPLICA_ADDRESSES = ("classifier-1:5001", "classifier-2:5001")
START_TIMEOUT_S = 30
COUNT_TIMEOUT_S = 5
CLIENTS = 8
LOAD_BEFORE_S = 3.0  # load on both replicas before the signal
LOAD_AFTER_S = 3.0  # load on the survivor after the stopped replica has exited
EXIT_TIMEOUT_S = 60
# The service's defaults, which the shipped config is written for.
DEFAULTS = Settings.model_construct()


def nginx_binary() -> str:
    """nginx's path; a missing one fails the test rather than skipping it."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    path = shutil.which("nginx", path=search)
    if path is None:
        pytest.fail(f"`nginx` is not installed; {INSTALL_HINT}")
    return path


def render(directory: Path, listen_port: int, replicas: list[str]) -> Path:
    """The shipped config listening on loopback, in front of ``replicas`` (host:port), with
    its pid file, logs and temporary files in ``directory``."""
    temp_paths = "".join(
        f"\n    {kind}_temp_path {directory / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    replacements = {
        "listen 80;": f"listen 127.0.0.1:{listen_port};",
        "pid /run/nginx.pid;": f"pid {directory / 'nginx.pid'};",
        "error_log /var/log/nginx/error.log warn;": f"error_log {directory / 'error.log'} warn;",
        "access_log /var/log/nginx/access.log json;": (
            f"access_log {directory / 'access.log'} json;"
        ),
        "http {": "http {" + temp_paths,
        **dict(zip(REPLICA_ADDRESSES, replicas, strict=True)),
    }
    text = CONFIG.read_text()
    for old, new in replacements.items():
        # Each replica is listed in the three upstreams; every other line exists once.
        expected = 3 if old in REPLICA_ADDRESSES else 1
        assert text.count(old) == expected, f"{CONFIG} must hold {old!r} {expected} times"
        text = text.replace(old, new)
    rendered = directory / "nginx.conf"
    rendered.write_text(text)
    return rendered


@dataclass
class Proxy:
    """nginx in front of the replicas, with its logs."""

    url: str
    directory: Path

    def access_log(self) -> list[dict[str, Any]]:
        path = self.directory / "access.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [json.loads(line) for line in lines]

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


@contextmanager
def running_nginx(directory: Path, replicas: list[str]) -> Iterator[Proxy]:
    """nginx in the foreground on a free loopback port; stopped gracefully (SIGQUIT) after."""
    port = free_port()
    config = render(directory, port, replicas)
    # As root, nginx would run its workers as `nobody`, who cannot enter pytest's tmp_path.
    globals_ = "daemon off;" + (" user root;" if os.geteuid() == 0 else "")
    command = [nginx_binary(), "-p", str(directory), "-c", str(config)]
    command += ["-e", str(directory / "error.log"), "-g", globals_]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, f"nginx -t refused {config}:\n{checked.stderr}"
    with (directory / "nginx.out").open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    proxy = Proxy(f"http://127.0.0.1:{port}", directory)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"nginx exited:\n{proxy.error_log()}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, f"nginx not listening:\n{proxy.error_log()}"
                time.sleep(0.1)
        yield proxy
    finally:
        process.send_signal(signal.SIGQUIT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@dataclass
class Stack:
    proxy: Proxy
    replicas: list[ServerProcess]

    def address(self, replica: ServerProcess) -> str:
        return replica.url.removeprefix("http://")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """Two servers (one worker each, their own DATA_DIR) behind nginx."""
    nginx_binary()  # fail before spending a minute on servers
    with ExitStack() as resources:
        replicas = []
        for name in ("replica-1", "replica-2"):
            directory = tmp_path / name
            directory.mkdir()
            command = gunicorn_command(free_port())
            env = server_env(directory, WORKERS="1")
            replicas.append(resources.enter_context(running_server(directory, command, env)))
        nginx_dir = tmp_path / "nginx"
        nginx_dir.mkdir()
        addresses = [replica.url.removeprefix("http://") for replica in replicas]
        proxy = resources.enter_context(running_nginx(nginx_dir, addresses))
        yield Stack(proxy, replicas)


def cls_answered(replica: ServerProcess, status: str = "200") -> int:
    """``POST /cls`` requests the replica answered with ``status``, from its own /metrics."""
    text = httpx.get(f"{replica.url}/metrics", timeout=10).text
    total = 0.0
    for labels, value in re.findall(r"^http_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        parsed = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if parsed == {"route": "/cls", "method": "POST", "status": status}:
            total += float(value)
    return int(total)


def eventually(read: Callable[[], int], expected: int) -> int:
    """``read()`` once it reaches ``expected`` or after COUNT_TIMEOUT_S: the server counts a
    request as its response ends, a moment after the client has read it."""
    deadline = time.monotonic() + COUNT_TIMEOUT_S
    while (value := read()) < expected and time.monotonic() < deadline:
        time.sleep(0.1)
    return value


def cls_lines(proxy: Proxy) -> list[dict[str, Any]]:
    return [
        line
        for line in proxy.access_log()
        if line["uri"].startswith("/cls?") or line["uri"] == "/cls"
    ]


def final_upstream(line: dict[str, Any]) -> str:
    """The replica that produced the answer (the last one tried)."""
    return str(line["upstream"]).split(", ")[-1]


def photo_files(photo: bytes) -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("photo.jpg", photo, "image/jpeg")}


def test_the_shipped_limits_match_the_service() -> None:
    """Body limits as the service's own (MAX_UPLOAD_BYTES plus framing), and an upstream
    keep-alive shorter than the service's KEEPALIVE_S."""
    text = CONFIG.read_text()
    settings = DEFAULTS
    upload_kib = (settings.max_upload_bytes + MULTIPART_OVERHEAD_BYTES) // 1024

    def body_limit_kib(location: str) -> int:
        block = re.search(rf"location {re.escape(location)} \{{(.*?)\}}", text, re.S)
        assert block, f"no `location {location}` in {CONFIG}"
        limit = re.search(r"client_max_body_size (\d+)k;", block.group(1))
        assert limit, f"`location {location}` sets no client_max_body_size in KiB"
        return int(limit.group(1))

    assert body_limit_kib("= /cls") == upload_kib
    assert body_limit_kib("= /cls/batch") == upload_kib * settings.max_batch_files
    assert body_limit_kib("= /tasks") >= upload_kib + settings.task_metadata_max_bytes // 1024
    upstream_keepalives = re.findall(
        r"^\s+keepalive_timeout (\d+)s;", text[: text.index("server {")], re.M
    )
    assert upstream_keepalives, "no upstream keepalive_timeout"
    assert all(int(seconds) < settings.keepalive_s for seconds in upstream_keepalives)


# A stand-in replica's answer to a path: a status, or None to read the request and close
# the connection without answering.
Answer = Callable[[str], int | None]


def lose_the_first_of_each_path() -> Answer:
    """Replicas (sharing this policy) that lose the first request of each path in flight, as
    a stopping server closes a keep-alive connection on which nginx has just sent a request;
    every later request gets 200."""
    lost: set[str] = set()
    lock = threading.Lock()

    def answer(path: str) -> int | None:
        with lock:
            if path in lost:
                return 200
            lost.add(path)
            return None

    return answer


@contextmanager
def stand_in_replicas(count: int, answer: Answer) -> Iterator[list[str]]:
    """``count`` HTTP/1.1 servers answering every request as ``answer`` says (a 503 with
    ``Retry-After: 1``, as the service's), echoing the ``X-Request-ID`` they get; yields
    their host:port."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status = answer(self.path.split("?")[0])
            if status is None:
                self.close_connection = True
                return
            answered = {"detail": f"stand-in answer {status}", "host": self.headers.get("Host")}
            body = json.dumps(answered).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if request_id := self.headers.get("X-Request-ID"):
                self.send_header("X-Request-ID", request_id)  # as the service does
            if status == 503:
                self.send_header("Retry-After", "1")
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_DELETE = do_POST  # noqa: N815 (http.server's names)

        def log_message(self, format: str, *args: object) -> None:
            pass

    servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(count)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield [f"127.0.0.1:{server.server_address[1]}" for server in servers]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def always(status: int) -> Answer:
    return lambda path: status


def raw_exchange(url: str, request: bytes) -> bytes:
    """Send ``request`` as is and read the answer until the proxy closes the connection."""
    address = urllib.parse.urlsplit(url)
    assert address.hostname is not None
    assert address.port is not None
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return answer


def test_heads_the_service_takes_pass_and_longer_ones_get_json(tmp_path: Path) -> None:
    """nginx's own limit on a header line (8 KiB by default) would refuse an API key or URL
    the service takes (heads up to 64 KiB), and answer in HTML."""
    with (
        stand_in_replicas(2, always(200)) as addresses,
        running_nginx(tmp_path, addresses) as proxy,
        httpx.Client(base_url=proxy.url, timeout=30) as client,
    ):
        assert client.get("/healthz", headers={"X-API-Key": "k" * 40_000}).status_code == 200
        assert client.get("/healthz?q=" + "q" * 40_000).status_code == 200
        too_long_a_header = client.get("/healthz", headers={"X-API-Key": "k" * 70_000})
        # httpx sends no URL over 64 KiB.
        too_long_a_url = raw_exchange(
            proxy.url, b"GET /healthz?q=" + b"q" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
        )
    assert too_long_a_header.status_code == 400
    assert too_long_a_header.headers["content-type"] == "application/json"
    assert too_long_a_header.headers["x-request-id"]
    assert "over 64 KiB" in too_long_a_header.json()["detail"]
    head, _, body = too_long_a_url.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 414 "), too_long_a_url[:300]
    assert b"content-type: application/json" in head.lower()
    assert "over the proxy's 64 KiB" in json.loads(body)["detail"]


NGINX_REFUSES = {
    "TRACE, which nginx never passes on": (b"TRACE /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 405),
    "a transfer coding it does not know": (
        b"POST /cls HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
        501,
    ),
    "an HTTP version it does not speak": (b"GET /healthz HTTP/3.0\r\nHost: x\r\n\r\n", 505),
}


@pytest.mark.parametrize("case", NGINX_REFUSES)
def test_what_nginx_refuses_itself_is_json_with_a_request_id(tmp_path: Path, case: str) -> None:
    """As the service's own errors are: a client that parses the body as JSON would otherwise
    get HTML."""
    request, status = NGINX_REFUSES[case]
    with (
        stand_in_replicas(2, always(200)) as addresses,
        running_nginx(tmp_path, addresses) as proxy,
    ):
        answer = raw_exchange(proxy.url, request)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), answer[:300]
    assert b"content-type: application/json" in head.lower(), head
    assert b"x-request-id: " in head.lower(), head
    assert json.loads(body)["detail"]


def test_a_request_id_without_a_letter_or_digit_is_replaced_as_the_service_would(
    tmp_path: Path,
) -> None:
    """The service makes its own id for such a one ("----"), so nginx's log line, under the
    id the caller sent, would match none of the service's."""
    with (
        stand_in_replicas(2, always(200)) as addresses,
        running_nginx(tmp_path, addresses) as proxy,
        httpx.Client(base_url=proxy.url, timeout=30) as client,
    ):
        kept = client.get("/healthz", headers={"X-Request-ID": "a-client.1"})
        replaced = client.get("/healthz", headers={"X-Request-ID": "----"})
    assert kept.headers["x-request-id"] == "a-client.1"
    assert replaced.headers["x-request-id"] not in ("", "----")


def test_a_request_without_a_host_names_the_address_it_reached(tmp_path: Path) -> None:
    """An HTTP/1.0 client may send no Host; the service then makes status_url and Location
    of what nginx passes on, which must be somewhere the client can reach."""
    with (
        stand_in_replicas(2, always(200)) as addresses,
        running_nginx(tmp_path, addresses) as proxy,
    ):
        answer = raw_exchange(proxy.url, b"GET /healthz HTTP/1.0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer[:300]
    assert json.loads(body)["host"] == proxy.url.removeprefix("http://")


def test_a_request_lost_in_flight_is_sent_again_only_where_that_is_safe(
    tmp_path: Path,
) -> None:
    """The race a stopping replica leaves: nginx sent a POST, the connection closed with no
    answer. /cls (classification, safe to repeat) goes to the next replica; /tasks, which
    the first replica may have stored, is never sent twice (the client gets 502)."""
    with (
        stand_in_replicas(2, lose_the_first_of_each_path()) as addresses,
        running_nginx(tmp_path, addresses) as proxy,
        httpx.Client(base_url=proxy.url, timeout=30) as client,
    ):
        classified = client.post("/cls", files=photo_files(b"an image"))
        submitted = client.post("/tasks", files=photo_files(b"an image"))
    # nginx has exited: its log is complete.
    lines = {line["uri"]: line for line in proxy.access_log()}
    print(
        f"\nnginx, a POST lost in flight: /cls -> {classified.status_code} (replicas answered "
        f"{lines['/cls']['upstream_status']}), /tasks -> {submitted.status_code} "
        f"({lines['/tasks']['upstream_status']})"
    )
    assert classified.status_code == 200
    assert lines["/cls"]["upstream_status"] == "502, 200"
    assert submitted.status_code == 502
    assert submitted.json() == {"detail": "no replica of the service answered"}
    assert lines["/tasks"]["upstream_status"] == "502"


def test_a_task_lookup_is_404_only_when_every_replica_said_so(tmp_path: Path) -> None:
    """Each replica holds its own tasks. While one is down, the others' 404 does not mean
    the task does not exist: the lookup is 503, to retry, and a 404 again once every
    replica answers."""
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    one_down, both_up = tmp_path / "one-down", tmp_path / "both-up"
    one_down.mkdir()
    both_up.mkdir()
    with (
        stand_in_replicas(1, lambda path: 404) as (up,),
        running_nginx(one_down, [down, up]) as proxy,
        httpx.Client(base_url=proxy.url, timeout=30) as client,
    ):
        # Round robin starts at either replica: each lookup is asked of both.
        while_down = [
            client.request(method, path)
            for method, path in [("GET", "/task-status/a"), ("DELETE", "/tasks/a")] * 2
        ]
    with (
        stand_in_replicas(2, lambda path: 404) as addresses,
        running_nginx(both_up, addresses) as proxy_of_both,
        httpx.Client(base_url=proxy_of_both.url, timeout=30) as client,
    ):
        unknown = [client.get("/task-status/a"), client.delete("/tasks/a")]
        too_large = client.request("DELETE", "/tasks/a", content=b"x" * 100_000)
    for response in while_down:
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert "did not answer" in response.json()["detail"]
        assert response.headers["x-request-id"]
    for response in unknown:
        assert response.status_code == 404, response.text
        assert "no replica knows this task" in response.json()["detail"]
    # The server's JSON errors still apply where a location has error pages of its own.
    assert too_large.status_code == 413
    assert "client_max_body_size" in too_large.json()["detail"]
    lines = [line["upstream_status"] for line in proxy.access_log()]
    assert all(sorted(statuses.split(", ")) == ["404", "502"] for statuses in lines), lines


def test_a_full_queue_is_answered_503_and_no_replica_is_left_out(tmp_path: Path) -> None:
    """Replicas whose queues are full answer 503 with Retry-After; the client gets exactly
    that. Were 503 passed to the next replica, each would count as a failure, every replica
    would soon be left out, and nginx would answer 502 "no live upstreams" instead."""
    requests = 12
    with (
        stand_in_replicas(2, lambda path: 503) as addresses,
        running_nginx(tmp_path, addresses) as proxy,
        httpx.Client(base_url=proxy.url, timeout=30) as client,
    ):
        answers = [client.post("/cls", files=photo_files(b"an image")) for _ in range(requests)]
    lines = proxy.access_log()
    assert [answer.status_code for answer in answers] == [503] * requests
    assert all(answer.headers.get("retry-after") == "1" for answer in answers)
    # Each request went to one replica, and both stayed in rotation.
    assert [line["upstream_status"] for line in lines] == ["503"] * requests
    assert {line["upstream"] for line in lines} == set(addresses)


def test_requests_reach_both_replicas(stack: Stack, photos: list[Path]) -> None:
    """Round robin over both replicas, each counting its share on its own /metrics; request
    ids and the client's host pass through; a task is found whichever replica holds it."""
    photo = photos[0].read_bytes()
    replicas = stack.replicas
    before = [cls_answered(replica) for replica in replicas]
    sent = 40
    with httpx.Client(base_url=stack.proxy.url, timeout=30) as client:
        statuses = Counter(
            client.post("/cls", files=photo_files(photo)).status_code for _ in range(sent - 2)
        )
        given = client.post(
            "/cls", files=photo_files(photo), headers={"X-Request-ID": "from-a-client-1"}
        )
        generated = client.post("/cls", files=photo_files(photo))
        statuses.update([given.status_code, generated.status_code])
        too_large = client.post(
            "/cls",
            content=b"x" * (DEFAULTS.max_upload_bytes + MULTIPART_OVERHEAD_BYTES + 1),
            headers={"Content-Type": "multipart/form-data; boundary=x"},
        )
        accepted = client.post("/tasks", files=photo_files(photo))
        assert accepted.status_code == 202, accepted.text
        status_url = accepted.json()["status_url"]
        lookups = [client.get(status_url.removeprefix(stack.proxy.url)) for _ in range(6)]
        # A task resent with its Idempotency-Key reaches the replica that stored it.
        resent = {}
        for n in range(6):
            key = {"Idempotency-Key": f"nginx-test-{n}"}
            first, again = (
                client.post("/tasks", files=photo_files(photo), headers=key) for _ in range(2)
            )
            resent[n] = (first.json()["task_id"], again.json()["task_id"])
            assert again.headers.get("idempotent-replayed") == "true", again.text

    def served_now() -> list[int]:
        return [cls_answered(r) - b for r, b in zip(replicas, before, strict=True)]

    eventually(lambda: sum(served_now()), sent)
    served = served_now()
    log = stack.proxy.access_log()
    nginx_ids = {line["request_id"] for line in log}
    task_lines = [line for line in log if line["uri"].startswith("/task-status/")]
    fell_back = sum(1 for line in task_lines if "," in line["upstream"])
    print(
        f"\nnginx round robin: {sent} requests, {dict(statuses)}; replica 1 served "
        f"{served[0]}, replica 2 {served[1]}; {len(lookups)} task lookups, {fell_back} "
        f"answered by the second replica asked"
    )
    assert all(first == again for first, again in resent.values()), resent
    assert statuses == Counter({200: sent})
    assert sum(served) == sent
    # Round robin: each replica gets about half; a quarter is a generous floor.
    assert min(served) >= sent // 4, served
    # The caller's id reaches the service and comes back; without one, nginx's own id is
    # the one the service uses, so the proxy's log line and the service's match.
    assert given.headers["x-request-id"] == "from-a-client-1"
    assert generated.headers["x-request-id"] in nginx_ids
    # Over the upload limit: refused by nginx, as JSON, before any replica reads it.
    assert too_large.status_code == 413
    assert "MAX_UPLOAD_BYTES" in too_large.json()["detail"]
    # The task's URL names the proxy (Host passed through), not the replica.
    assert status_url.startswith(f"{stack.proxy.url}/task-status/")
    assert accepted.headers["location"] == status_url
    # Each replica has its own task store; a lookup that reaches the other one first is
    # passed on (404 -> next replica), so every lookup finds the task.
    assert [lookup.status_code for lookup in lookups] == [200] * len(lookups)
    assert fell_back > 0, "round robin must have sent some lookups to the other replica first"


def test_an_http_1_0_request_without_a_host_passes_the_proxy(stack: Stack) -> None:
    """nginx speaks HTTP/1.1 to the replicas, which refuse such a request without a Host:
    a health checker speaking HTTP/1.0 sends none, and nginx names its own."""
    address = urllib.parse.urlsplit(stack.proxy.url)
    assert address.hostname is not None
    assert address.port is not None
    with socket.create_connection((address.hostname, address.port), timeout=10) as connection:
        connection.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:300]


def test_sigterm_to_one_replica_under_load_loses_no_request(
    stack: Stack, photos: list[Path]
) -> None:
    """CLIENTS callers post through nginx without pause; one replica gets SIGTERM, drains
    and exits. Every request sent gets 200, and the survivor carries on alone."""
    photo = photos[0].read_bytes()
    victim, survivor = stack.replicas
    survivor_before = cls_answered(survivor)
    outcomes: list[tuple[float, float, str]] = []  # (sent, answered, outcome)
    figures: dict[str, float] = {}

    async def callers(stop: asyncio.Event) -> None:
        limits = httpx.Limits(max_connections=CLIENTS, max_keepalive_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=stack.proxy.url, timeout=60, limits=limits) as client:

            async def caller() -> None:
                while not stop.is_set():
                    started = time.monotonic()
                    try:
                        response = await client.post("/cls", files=photo_files(photo))
                        outcome = str(response.status_code)
                    except httpx.TransportError as error:
                        outcome = f"connection error ({type(error).__name__})"
                    outcomes.append((started, time.monotonic(), outcome))

            await asyncio.gather(*(caller() for _ in range(CLIENTS)))

    async def stop_one_replica_under_load() -> None:
        stop = asyncio.Event()
        load = asyncio.create_task(callers(stop))
        await asyncio.sleep(LOAD_BEFORE_S)
        figures["victim_before_signal"] = await asyncio.to_thread(cls_answered, victim)
        victim.process.send_signal(signal.SIGTERM)
        figures["signalled"] = time.monotonic()
        figures["exit_code"] = await asyncio.to_thread(victim.process.wait, EXIT_TIMEOUT_S)
        figures["exited"] = time.monotonic()
        await asyncio.sleep(LOAD_AFTER_S)
        stop.set()
        await load

    asyncio.run(stop_one_replica_under_load())

    sent = len(outcomes)
    counts = Counter(outcome for _, _, outcome in outcomes)
    in_flight_at_signal = [
        outcome
        for started, answered, outcome in outcomes
        if started < figures["signalled"] < answered
    ]
    answered_after_exit = [
        outcome for _, answered, outcome in outcomes if answered > figures["exited"]
    ]
    # nginx logs a request just after answering it.
    eventually(lambda: len(cls_lines(stack.proxy)), sent)
    lines = cls_lines(stack.proxy)
    by_replica = Counter(final_upstream(line) for line in lines if line["status"] == 200)
    retried = [line for line in lines if "," in line["upstream"]]
    retry_kinds = Counter(line["upstream_status"] for line in retried)
    survivor_served = eventually(
        lambda: cls_answered(survivor) - survivor_before, by_replica[stack.address(survivor)]
    )
    errors = stack.proxy.error_log()
    reasons = {
        "refused": errors.count("(111: Connection refused)"),
        "reset": errors.count("(104: Connection reset by peer)"),
        "closed": errors.count("upstream prematurely closed connection"),
    }
    stopped_s = figures["exited"] - figures["signalled"]
    print(
        f"\nnginx, SIGTERM to one of two replicas under load: sent {sent}, {dict(counts)}; "
        f"served by the stopped replica {by_replica[stack.address(victim)]} "
        f"({figures['victim_before_signal']:.0f} before the signal), by the survivor "
        f"{by_replica[stack.address(survivor)]} (its /metrics: {survivor_served}); "
        f"{len(in_flight_at_signal)} in flight at the signal, "
        f"{len(answered_after_exit)} answered after the exit; the replica exited "
        f"{figures['exit_code']:.0f} {stopped_s:.1f} s after SIGTERM; nginx retried {len(retried)} "
        f"({dict(retry_kinds)}; error log: {reasons})"
    )
    # Load is what callers had in flight when the signal came, not a rate this machine may miss.
    assert len(in_flight_at_signal) >= CLIENTS // 2, in_flight_at_signal
    assert counts == Counter({"200": sent}), "every request sent through nginx must get 200"
    # Both replicas served under load before the signal.
    assert figures["victim_before_signal"] > 0
    assert by_replica[stack.address(survivor)] > 0
    # nginx saw exactly the requests the clients sent, and each answer came from a replica.
    assert len(lines) == sent
    assert sum(by_replica.values()) == sent
    # The survivor carried on alone (all those answered 200, as every request).
    assert answered_after_exit, "no request was answered after the replica exited"
    assert survivor_served == by_replica[stack.address(survivor)]
    # A clean drain, within gunicorn's graceful timeout (DRAIN_TIMEOUT_S + 10 s).
    assert figures["exit_code"] == 0
    assert stopped_s < DEFAULTS.drain_timeout_s + 10
    assert "Traceback" not in victim.log()
