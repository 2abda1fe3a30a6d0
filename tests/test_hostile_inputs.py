"""Hostile and odd uploads (tests/corpus.py) each get their documented answer, cleanly.

Cleanly means: the documented status (never a 5xx), a JSON ``{"detail": ...}`` that names
the problem and nothing of the server's insides, no hang, and a service that still answers
a valid photo correctly afterwards, one at a time, all at once, and under fuzzed JPEGs.
"""

from __future__ import annotations

import asyncio
import random
import re
import resource
import socket
import sqlite3
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import ImageFile
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive, Scope, Send

from service.middleware import BodyLimitsMiddleware
from service.settings import Settings
from service.tasks import DATABASE_NAME
from tests import images
from tests.corpus import (
    BOUNDARY,
    MAX_UPLOAD_BYTES,
    Case,
    build_corpus,
    multipart,
    multipart_headers,
)
from tests.server import free_port, running_server, server_env, uvicorn_command
from tests.support import Reference, RunningApp, make_settings, photo_paths, running_app

PHOTO = photo_paths()[0]
CORPUS = build_corpus(PHOTO)
CASE_TIMEOUT_S = 10
# What an answer must never show: tracebacks, paths, module files, exception or type names.
LEAKS = re.compile(
    r"Traceback|/work|site-packages|\.py\b|<class|\b[A-Z]\w*(Error|Exception)\b|passwd|boot\.ini"
)
# One app for the whole module: model load and warm-up once, not once per case.
module_loop = pytest.mark.asyncio(loop_scope="module")


def corpus_settings(**overrides: object) -> Settings:
    return make_settings(max_upload_bytes=MAX_UPLOAD_BYTES, **overrides)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def served() -> AsyncIterator[RunningApp]:
    # A generous deadline: the concurrency test queues every case behind 40 photos.
    async with running_app(corpus_settings(request_timeout_ms=60_000)) as running:
        yield running


@pytest.fixture(scope="module")
def expected_top5(reference: Reference, photos: list[Path]) -> dict[Path, list[int]]:
    return {path: reference.top_k(images.photo(path), 5)[0] for path in photos}


def photo_upload(path: Path) -> dict[str, tuple[str, bytes, str]]:
    return {"file": (path.name, path.read_bytes(), "image/jpeg")}


def assert_clean(case: Case, response: httpx.Response) -> None:
    """The documented status; an error's detail names the problem and leaks nothing."""
    assert response.status_code == case.status, (case.name, response.text)
    assert LEAKS.search(response.text) is None, (case.name, response.text)
    body = response.json()
    if case.status == 200:
        assert len(body["prediction"]) == int(case.params.get("top_k", 5))
        return
    assert set(body) == {"detail"}, body
    assert isinstance(body["detail"], str)
    assert case.detail.lower() in body["detail"].lower(), (case.name, body["detail"])


async def send(client: httpx.AsyncClient, case: Case) -> httpx.Response:
    async with asyncio.timeout(CASE_TIMEOUT_S):
        return await client.send(case.request())


@module_loop
@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
async def test_each_case_gets_its_documented_answer(
    served: RunningApp, case: Case, expected_top5: dict[Path, list[int]]
) -> None:
    assert_clean(case, await send(served.client, case))
    after = await served.client.post("/cls", files=photo_upload(PHOTO))
    assert after.status_code == 200
    assert after.json()["prediction"][0]["index"] == expected_top5[PHOTO][0]


@module_loop
async def test_a_long_boundary_is_refused_only_where_a_body_is_read(served: RunningApp) -> None:
    """Where no route takes the request, its 404 or 405; with no body, nothing to parse."""
    body = multipart([("file", "photo.jpg", PHOTO.read_bytes(), "image/jpeg")], "b" * 300)
    headers = multipart_headers(body, boundary="b" * 300)
    for method, path, status in (("POST", "/nope", 404), ("POST", "/healthz", 405)):
        answer = await served.client.request(method, path, content=body, headers=headers)
        assert answer.status_code == status, (path, answer.text)
    content_type = {"Content-Type": headers["Content-Type"]}
    assert (await served.client.get("/healthz", headers=content_type)).status_code == 200
    refused = await served.client.post("/cls", content=body, headers=headers)
    assert refused.status_code == 400
    assert "the multipart boundary is 300 characters long" in refused.json()["detail"]


@module_loop
async def test_task_submission_refuses_the_corpus_as_cls_does_and_stores_nothing_bad(
    served: RunningApp,
) -> None:
    """POST /tasks validates like /cls: each bad case gets the same 4xx at once and leaves no
    task behind; each good one is accepted (202) and stored."""
    store = served.service.settings.data_dir / DATABASE_NAME
    with sqlite3.connect(store) as db:
        (before,) = db.execute("SELECT count(*) FROM tasks").fetchone()
    for case in CORPUS:
        async with asyncio.timeout(CASE_TIMEOUT_S):
            response = await served.client.send(case.request(path="/tasks"))
        if case.status == 200:
            assert response.status_code == 202, (case.name, response.text)
        else:
            assert_clean(case, response)
    with sqlite3.connect(store) as db:
        (after,) = db.execute("SELECT count(*) FROM tasks").fetchone()
    assert after - before == sum(case.status == 200 for case in CORPUS)

    # Let the accepted tasks finish, so they do not run during the module's later tests.
    async with asyncio.timeout(60):
        while True:
            with sqlite3.connect(store) as db:
                (unfinished,) = db.execute(
                    "SELECT count(*) FROM tasks WHERE status IN ('queued', 'running')"
                ).fetchone()
            if not unfinished:
                break
            await asyncio.sleep(0.05)


@contextmanager
def pixel_allocations() -> Iterator[list[tuple[int, int]]]:
    """Records the size of every pixel buffer Pillow prepares for a decode, in any thread."""
    sizes: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load_prepare

    def recording(self: ImageFile.ImageFile) -> None:
        sizes.append(self.size)
        original(self)

    ImageFile.ImageFile.load_prepare = recording  # type: ignore[method-assign]
    try:
        yield sizes
    finally:
        ImageFile.ImageFile.load_prepare = original  # type: ignore[method-assign]


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


@module_loop
@pytest.mark.parametrize(
    "name", ["png-bomb-30000x30000", "gif-bomb-30000x30000", "tiff-4x4-in-one-46336-pixel-tile"]
)
async def test_bombs_are_refused_before_pixels_are_allocated(served: RunningApp, name: str) -> None:
    """30000x30000 pixels would take 0.9 GB as greyscale, 2.7 GB as RGB, a 46336-pixel
    square tile 2 GB; none is allocated."""
    case = next(case for case in CORPUS if case.name == name)
    control = images.encode(images.gradient(64, 48), "PNG")
    rss_before = peak_rss_bytes()
    tracemalloc.start()
    try:
        with pixel_allocations() as sizes:
            response = await send(served.client, case)
            refused_sizes = list(sizes)
            accepted = await served.client.post("/cls", files={"file": ("c.png", control)})
        _, traced_peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_clean(case, response)
    assert refused_sizes == []
    # The spy does see real decodes, so its silence above means something.
    assert accepted.status_code == 200
    assert sizes == [(64, 48)]
    assert traced_peak_bytes < 50 * 2**20
    assert peak_rss_bytes() - rss_before < 200 * 2**20


@module_loop
async def test_the_whole_corpus_at_once_among_valid_requests(
    served: RunningApp, photos: list[Path], expected_top5: dict[Path, list[int]]
) -> None:
    """Every case and 40 photo requests, shuffled and concurrent: each gets its own answer."""
    valid = [photos[i % len(photos)] for i in range(40)]
    jobs: list[Case | Path] = [*CORPUS, *valid]
    random.Random(0).shuffle(jobs)

    async def one(job: Case | Path) -> httpx.Response:
        if isinstance(job, Case):
            return await send(served.client, job)
        return await served.client.post("/cls", files=photo_upload(job))

    async with asyncio.timeout(120):
        responses = await asyncio.gather(*(one(job) for job in jobs))
    for job, response in zip(jobs, responses, strict=True):
        if isinstance(job, Case):
            assert_clean(job, response)
        else:
            assert response.status_code == 200, response.text
            indices = [p["index"] for p in response.json()["prediction"]]
            assert indices == expected_top5[job], job.name


# Ways to damage a JPEG, applied in sequence: (kind, position as a fraction, value).
MUTATION = st.tuples(
    st.sampled_from(["flip", "truncate", "insert", "delete", "header"]),
    st.floats(0, 1),
    st.integers(0, 255),
)


def mutate(data: bytes, mutations: list[tuple[str, float, int]]) -> bytes:
    buffer = bytearray(data)
    for kind, where, value in mutations:
        if not buffer:
            break
        at = min(int(where * len(buffer)), len(buffer) - 1)
        if kind == "flip":
            buffer[at] ^= 1 << (value % 8)
        elif kind == "truncate":
            del buffer[at:]
        elif kind == "insert":
            buffer[at:at] = bytes([value]) * (1 + value % 16)
        elif kind == "delete":
            del buffer[at : at + 1 + value % 64]
        else:
            # Markers, frame and Huffman tables sit in the first few hundred bytes.
            buffer[int(where * min(len(buffer), 600)) % len(buffer)] = value
    return bytes(buffer)


@pytest.fixture(scope="module")
def small_jpeg() -> bytes:
    """A small JPEG of a real photo: fuzzing hits its headers more often than a large one's."""
    return images.encode(images.photo(PHOTO).resize((192, 128)), "JPEG", quality=85)


@pytest.fixture(scope="module")
def fuzz_client() -> Iterator[tuple[asyncio.Runner, httpx.AsyncClient]]:
    """One app on one event loop for every Hypothesis example (Hypothesis calls sync tests).

    The loop factory keeps the runner from replacing the thread's current event loop,
    which pytest-asyncio's module loop relies on.
    """
    with asyncio.Runner(loop_factory=asyncio.new_event_loop) as runner:
        stack = AsyncExitStack()
        running = runner.run(stack.enter_async_context(running_app(corpus_settings())))
        try:
            yield runner, running.client
        finally:
            runner.run(stack.aclose())


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_mutated_jpegs_are_answered_200_or_4xx_quickly(
    fuzz_client: tuple[asyncio.Runner, httpx.AsyncClient],
    small_jpeg: bytes,
    mutations: list[tuple[str, float, int]],
) -> None:
    runner, client = fuzz_client
    data = mutate(small_jpeg, mutations)

    async def classify() -> httpx.Response:
        async with asyncio.timeout(CASE_TIMEOUT_S):
            return await client.post("/cls", files={"file": ("fuzz.jpg", data, "image/jpeg")})

    response = runner.run(classify())
    event(f"status {response.status_code}")  # --hypothesis-show-statistics shows the mix
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text
    assert LEAKS.search(response.text) is None, response.text
    if response.status_code != 200:
        assert set(response.json()) == {"detail"}


def test_fuzzed_service_still_answers_a_photo(
    fuzz_client: tuple[asyncio.Runner, httpx.AsyncClient],
    reference: Reference,
) -> None:
    runner, client = fuzz_client
    response = runner.run(client.post("/cls", files=photo_upload(PHOTO)))
    assert response.status_code == 200
    assert [p["index"] for p in response.json()["prediction"]] == reference.top_k(
        images.photo(PHOTO), 5
    )[0]


def exchange(port: int, body: bytes, declared_length: int, half_close: bool) -> bytes:
    """Send one raw request with a chosen Content-Length; what comes back before the close."""
    headers = {**multipart_headers(body), "Content-Length": str(declared_length)}
    head = "POST /cls HTTP/1.1\r\nHost: test\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=CASE_TIMEOUT_S) as connection:
        connection.sendall(head.encode() + b"\r\n" + body)
        if half_close:
            connection.shutdown(socket.SHUT_WR)
        received = b""
        started = time.monotonic()
        while chunk := connection.recv(65536):
            received += chunk
        assert time.monotonic() - started < CASE_TIMEOUT_S
        return received


@pytest.mark.slow
def test_lying_content_length_on_the_wire(tmp_path: Path, photos: list[Path]) -> None:
    """What the real stack (uvicorn's parser, as under gunicorn) does with a lying length.

    Shorter: the rest of the body is read as the next request, which does not parse, so
    the server answers 400 and closes. Longer: the server waits for the promised bytes, as
    HTTP says it must, for at most BODY_IDLE_TIMEOUT_S, then answers 408; a client that
    half-closes instead gets its connection closed. Never a 5xx.
    """
    port = free_port()
    command = uvicorn_command(port)
    env = server_env(
        tmp_path, PORT=str(port), MAX_UPLOAD_BYTES=str(MAX_UPLOAD_BYTES), BODY_IDLE_TIMEOUT_S="1"
    )
    body = multipart([("file", "photo.jpg", PHOTO.read_bytes(), "image/jpeg")])
    with running_server(tmp_path, command, env) as server:
        for declared in (len(body) // 2, len(body) - 10, 0):
            answer = exchange(port, body, declared, half_close=False)
            assert re.match(rb"HTTP/1\.1 4\d\d ", answer), (declared, answer[:200])
            assert b"text/plain" not in answer, (declared, answer[:400])
        longer = exchange(port, body, len(body) + 1000, half_close=True)
        assert longer == b"" or re.match(rb"HTTP/1\.1 4\d\d ", longer), longer[:200]
        started = time.monotonic()
        stalled = exchange(port, body, len(body) + 1000, half_close=False)
        assert stalled.startswith(b"HTTP/1.1 408 "), stalled[:200]
        assert b"BODY_IDLE_TIMEOUT_S" in stalled
        assert 0.9 < time.monotonic() - started < CASE_TIMEOUT_S
        valid = httpx.post(f"{server.url}/cls", files=photo_upload(photos[0]), timeout=30)
        assert valid.status_code == 200
        log = server.log()
    assert "Traceback" not in log
    assert " 500 " not in log
    assert "answered 5" not in log


async def read_in_two_chunks(
    body: bytes, cut: int, part_limit_bytes: int = 1 << 20, boundary: str = BOUNDARY
) -> list[Message]:
    """What an app reading ``body`` through BodyLimitsMiddleware receives, when the body
    arrives in two chunks split at ``cut``."""
    arriving = iter(
        [
            {"type": "http.request", "body": body[:cut], "more_body": True},
            {"type": "http.request", "body": body[cut:], "more_body": False},
        ]
    )
    received: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while not received or received[-1].get("more_body"):
            received.append(await receive())

    async def receive() -> Message:
        return next(arriving)

    async def send(message: Message) -> None:
        raise AssertionError("nothing is answered while the body is read")

    content_type = f'multipart/form-data; boundary="{boundary}"'.encode()
    scope = {"type": "http", "path": "/cls", "headers": [(b"content-type", content_type)]}
    limits = BodyLimitsMiddleware(
        app,
        {},
        default_limit_bytes=1 << 20,
        describe=str,
        part_limit_bytes=part_limit_bytes,
        describe_part=lambda limit: f"a part is over {limit} bytes",
        idle_timeout_s=5.0,
        routed=lambda scope: True,
        in_flight_limit_bytes=1 << 30,
    )
    await limits(scope, receive, send)
    return received


async def read_dripped(
    chunk_bytes: int,
    every_s: float,
    chunks: int,
    min_bytes_per_s: float,
    app_pause_s: float = 0.0,
    burst_bytes: int = 0,
) -> tuple[float, int]:
    """Read through BodyLimitsMiddleware (idle timeout 0.3 s) a body of ``chunks`` chunks
    arriving ``every_s`` apart (the first ``burst_bytes`` long, if given), the app pausing
    ``app_pause_s`` after each: the seconds it took, and the bytes the app received."""
    received = 0

    async def receive() -> Message:
        nonlocal received
        await asyncio.sleep(every_s)
        size = burst_bytes if burst_bytes and not received else chunk_bytes
        received += size
        return {"type": "http.request", "body": b"x" * size, "more_body": True}

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        for _ in range(chunks):
            await receive()
            await asyncio.sleep(app_pause_s)

    async def send(message: Message) -> None:
        raise AssertionError("nothing is answered while the body is read")

    limits = BodyLimitsMiddleware(
        app,
        {},
        default_limit_bytes=1 << 20,
        describe=str,
        part_limit_bytes=1 << 20,
        describe_part=str,
        idle_timeout_s=0.3,
        routed=lambda scope: True,
        in_flight_limit_bytes=1 << 30,
        min_bytes_per_s=min_bytes_per_s,
    )
    started = time.monotonic()
    await limits({"type": "http", "path": "/cls", "headers": []}, receive, send)
    return time.monotonic() - started, received


async def test_a_body_that_arrives_too_slowly_is_cut_off() -> None:
    """A byte now and then resets the idle timeout for ever: one client holding hundreds of
    such uploads would use up the worker's file descriptors, and every other request fail.
    Past the idle timeout, the body must keep up BODY_MIN_BYTES_PER_S, with at most the
    idle timeout's worth of waiting in hand."""
    started = time.monotonic()
    with pytest.raises(HTTPException) as refused:
        await read_dripped(10, 0.05, 40, min_bytes_per_s=1000)  # 200 bytes/s for 2 s
    # Allowed 0.3 s and 1 ms a byte: cut off at about 0.4 s, after about 80 bytes.
    assert time.monotonic() - started < 1.5
    assert refused.value.status_code == 408
    assert refused.value.detail == (
        "the request body fell more than 0.3 s (BODY_IDLE_TIMEOUT_S) behind 1000 bytes/s "
        "(BODY_MIN_BYTES_PER_S)"
    )
    # A burst earns no more than the idle timeout ahead: 100,000 bytes first would have
    # bought 100 s of a trickle, holding their share of the uploads' memory all along.
    with pytest.raises(HTTPException, match=r"behind 1000 bytes/s \(BODY_MIN_BYTES_PER_S\)"):
        await read_dripped(10, 0.05, 40, min_bytes_per_s=1000, burst_bytes=100_000)
    took_s, received = await read_dripped(100, 0.01, 40, min_bytes_per_s=1000, burst_bytes=10_000)
    assert received == 10_000 + 39 * 100  # after the burst, a body that keeps up goes on
    took_s, received = await read_dripped(10, 0.05, 40, min_bytes_per_s=0)  # no minimum
    assert received == 400
    assert took_s > 1.9
    took_s, received = await read_dripped(100, 0.05, 40, min_bytes_per_s=1000)  # 2000/s
    assert received == 4000
    assert took_s > 1.9
    # The app's own pauses between reads (a busy loop, a slow disk) are not the client's.
    took_s, received = await read_dripped(10, 0.001, 40, min_bytes_per_s=1000, app_pause_s=0.05)
    assert received == 400
    assert took_s > 1.9
    with pytest.raises(HTTPException, match=r"stalled for 0\.3 s; BODY_IDLE_TIMEOUT_S allows"):
        await read_dripped(10_000, 0.5, 2, min_bytes_per_s=1000)


@pytest.mark.parametrize("offset", range(len(BOUNDARY) + 8))
async def test_a_closing_boundary_split_between_chunks_is_found(offset: int) -> None:
    body = multipart([("file", "a.jpg", b"x" * 100, "image/jpeg")])
    cut = body.rindex(f"\r\n--{BOUNDARY}--".encode()) + offset
    assert len(await read_in_two_chunks(body, cut)) == 2
    with pytest.raises(HTTPException, match="does not end with its closing boundary"):
        await read_in_two_chunks(body[: len(body) - 5], min(cut, len(body) - 6))


def with_header_line(body: bytes, line: bytes) -> bytes:
    """``body`` with ``line`` added to its first part's headers."""
    end_of_headers = body.index(b"\r\n\r\n")
    return body[:end_of_headers] + b"\r\n" + line + body[end_of_headers:]


@pytest.mark.parametrize(
    "case",
    [
        # The parser takes these lines for part data: the part goes on past them.
        "lines-like-a-boundary-in-the-data",
        # A header line: the parser is reading headers, not looking for a boundary.
        "a-header-line-like-the-closing-boundary",
        # An empty boundary, which the parser takes ("--" alone delimits the parts).
        "an-empty-boundary",
    ],
)
async def test_parts_are_measured_as_the_apps_parser_finds_them(case: str) -> None:
    """Part sizes and the body's end are found by a parser of the app's kind, not by looking
    for the boundary's text: what merely resembles a boundary neither starts a new part
    (which would reset the count, so one part could fill the body's whole limit) nor closes
    the body (which would turn both checks off)."""
    boundary = "" if case == "an-empty-boundary" else BOUNDARY
    like_a_boundary = f"\r\n--{BOUNDARY}X".encode()
    data = b"x" * 400 + like_a_boundary + b"y" * 400 + like_a_boundary + b"z" * 400
    body = multipart([("file", "a.jpg", data, "image/jpeg")])
    if case == "a-header-line-like-the-closing-boundary":
        body = with_header_line(body, f"--{BOUNDARY}--: x".encode())
    if case == "an-empty-boundary":
        body = body.replace(f"--{BOUNDARY}".encode(), b"--")
    cut = len(body) // 3
    assert len(await read_in_two_chunks(body, cut, part_limit_bytes=1300, boundary=boundary)) == 2
    with pytest.raises(HTTPException, match="a part is over 1000 bytes"):
        await read_in_two_chunks(body, cut, part_limit_bytes=1000, boundary=boundary)
    with pytest.raises(HTTPException, match="does not end with its closing boundary"):
        await read_in_two_chunks(body[: len(body) // 2], cut, boundary=boundary)


@pytest.mark.parametrize("offset", range(len(BOUNDARY) + 6))
async def test_a_part_boundary_split_between_chunks_starts_the_next_part(offset: int) -> None:
    """Two parts each within the part limit, but not together, whichever byte of the
    delimiter between them the chunks split at."""
    body = multipart([("file", "a.jpg", b"x" * 600, None), ("file", "b.jpg", b"y" * 600, None)])
    cut = body.index(f"\r\n--{BOUNDARY}\r\n".encode()) + offset
    assert len(await read_in_two_chunks(body, cut, part_limit_bytes=1000)) == 2
    with pytest.raises(HTTPException, match="a part is over 1000 bytes"):
        await read_in_two_chunks(body.replace(b"y" * 600, b"y" * 1001), cut, part_limit_bytes=1000)
