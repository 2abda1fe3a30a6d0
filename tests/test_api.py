"""The HTTP API in-process (httpx + ASGITransport, lifespan running)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import io
import json
import logging
import math
import re
import sqlite3
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
import torchvision
from PIL import Image, PngImagePlugin
from prometheus_client import REGISTRY
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.requests import Request
from starlette.types import ASGIApp

import main
import service.settings
from batching import BatchProcessor, DeadlineExceeded, Priority
from classification import DeviceFailed, ImageTooLarge, OutOfMemory, Prediction
from service import core, errors, logs, metrics
from service.protocol import UPLOAD_END_STATE
from service.settings import Settings
from service.siblings import Siblings
from service.tasks import DATABASE_NAME, TaskStoreFailed, WebhookStatus
from tests import images
from tests.corpus import BOUNDARY, multipart, multipart_headers
from tests.support import (
    GatedModel,
    HeldDecode,
    Reference,
    RunningApp,
    finished,
    make_settings,
    metric_value,
    running_app,
    submit,
    wait_for,
)


def http_scope(request: httpx.Request) -> dict[str, object]:
    """The ASGI scope of ``request``, for tests that drive the app directly."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": request.url.path,
        "raw_path": request.url.raw_path,
        "query_string": b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in request.headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
        "state": {},
    }


def noise_png(side: int) -> bytes:
    """A PNG of random pixels, which compresses to no less than its raw size (800 px: over
    1 MiB, spooled to disk; 300 px: over 128 KiB, decoded off the model's thread)."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side, 3), np.uint8)
    return images.encode(Image.fromarray(pixels), "PNG")


def upload(data: bytes, name: str = "image.jpg") -> dict[str, tuple[str, bytes, str]]:
    return {"file": (name, data, "application/octet-stream")}


async def test_predictions_match_torchvision_reference(
    served: RunningApp, photos: list[Path], reference: Reference
) -> None:
    for path in photos:
        response = await served.client.post("/cls", files=upload(path.read_bytes()))
        assert response.status_code == 200
        prediction = response.json()["prediction"]
        indices, scores = reference.top_k(images.photo(path), 5)
        assert [p["index"] for p in prediction] == indices
        assert [p["score"] for p in prediction] == pytest.approx(scores, rel=1e-3, abs=1e-6)
        assert all(isinstance(p["label"], str) and p["label"] for p in prediction)


@pytest.mark.parametrize("top_k", [1, 3, 1000])
async def test_top_k_sets_the_answer_length(
    served: RunningApp, photos: list[Path], top_k: int
) -> None:
    response = await served.client.post(
        "/cls", params={"top_k": top_k}, files=upload(photos[0].read_bytes())
    )
    prediction = response.json()["prediction"]
    assert len(prediction) == top_k
    scores = [p["score"] for p in prediction]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("top_k", ["0", "-1", "1001", "x", "2.5", "+3", "1_0", " 3", "3 "])
async def test_bad_top_k_is_422(served: RunningApp, photos: list[Path], top_k: str) -> None:
    response = await served.client.post(
        "/cls", params={"top_k": top_k}, files=upload(photos[0].read_bytes())
    )
    assert response.status_code == 422
    assert "top_k" in response.json()["detail"]


@pytest.mark.parametrize("route", ["/cls", "/cls/batch", "/tasks"])
async def test_a_repeated_top_k_is_422_not_the_last_one_taken(
    served: RunningApp, photos: list[Path], route: str
) -> None:
    response = await served.client.post(
        f"{route}?top_k=3&top_k=1", files=upload(photos[0].read_bytes())
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == "query.top_k: was sent 2 times; send it at most once"


@pytest.mark.parametrize("route", ["/cls", "/cls/batch", "/tasks"])
@pytest.mark.parametrize("name", ["TOP_K", "topk", "top-k", "Top_K", "top_k[]"])
async def test_top_k_misspelt_is_422_not_ignored(
    served: RunningApp, photos: list[Path], route: str, name: str
) -> None:
    """Ignored, it would give the default number of classes without a word. Query
    parameters that look like nothing of the API (a cache buster) are left alone."""
    data = photos[0].read_bytes()
    response = await served.client.post(f"{route}", params={name: "3"}, files=upload(data))
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == (
        f"query.{name}: is not a parameter of this route; did you mean top_k?"
    )
    assert (await served.client.post(f"{route}?_=17", files=upload(data))).status_code < 300


@pytest.mark.parametrize("route", ["/cls", "/cls/batch"])
async def test_top_k_sent_in_the_form_is_422_not_ignored(
    served: RunningApp, photos: list[Path], route: str
) -> None:
    """Ignored, it would give the default number of classes without a word. Other fields
    are left alone, as a browser's form sends its named buttons."""
    data = photos[0].read_bytes()
    response = await served.client.post(route, files=upload(data), data={"top_k": "3"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == (
        "top_k: sent in the form, where it is not read; send it in the URL (?top_k=3)"
    )
    button = await served.client.post(route, files=upload(data), data={"submit": "Classify"})
    assert button.status_code == 200, button.text


async def test_a_model_with_fewer_classes_than_the_default_top_k_answers_them_all(
    photos: list[Path], tmp_path: Path
) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\nbird\n")
    async with running_app(make_settings(labels_file=labels)) as served:
        data = photos[0].read_bytes()
        response = await served.client.post("/cls", files=upload(data))
        assert response.status_code == 200, response.text
        assert sorted(p["label"] for p in response.json()["prediction"]) == ["bird", "cat", "dog"]
        too_many = await served.client.post("/cls", params={"top_k": 4}, files=upload(data))
        assert too_many.status_code == 422
        assert "must be at most 3, the model's class count; got 4" in too_many.json()["detail"]
        task = await served.client.post("/tasks", files=upload(data))
        assert task.status_code == 202, task.text


async def test_missing_wrong_or_non_multipart_body_is_422(served: RunningApp) -> None:
    for path in ("/cls", "/tasks"):
        wrong_name = await served.client.post(path, files={"image": ("a.jpg", b"x", "image/jpeg")})
        assert wrong_name.status_code == 422
        assert wrong_name.json() == {
            "detail": "image: a file under another name than 'file'; send the image as a part "
            "named 'file'"
        }
    empty_part = await served.client.post("/cls", files={"image": ("", b"", "image/jpeg")})
    assert empty_part.json() == {"detail": "file: Field required"}
    # Not multipart at all: the answer says how to send an image. curl labels a raw body
    # (--data-binary @image.jpg) a URL-encoded form, whose "&" bytes make many fields.
    how = "send the image as a multipart/form-data part named 'file' (curl -F file=@image.jpg)"
    raw_image = b"\xff\xd8\xff" + b"&x=1" * 50
    urlencoded = "application/x-www-form-urlencoded"
    for response, sent_as in (
        (await served.client.post("/cls"), "(none)"),
        (await served.client.post("/cls", json={"file": "abc"}), "application/json"),
        *[
            (
                await served.client.post(
                    path, content=raw_image, headers={"Content-Type": urlencoded}
                ),
                urlencoded,
            )
            for path in ("/cls", "/cls/batch", "/tasks")
        ],
        (
            await served.client.post(
                "/cls/batch", content=b"\xff\xd8\xff", headers={"Content-Type": "image/jpeg"}
            ),
            "image/jpeg",
        ),
    ):
        assert response.status_code == 422
        assert response.json() == {
            "detail": f"file: Field required; {how}, not as a body of type {sent_as}"
        }


@pytest.mark.parametrize(
    ("content_type", "body", "says"),
    [
        ("multipart/form-data", b"--abc\r\n", "names no boundary"),
        ("multipart/form-data; boundary=", b"--\r\n", "names no boundary"),
        ('multipart/form-data; boundary=""', b"--\r\n", "names no boundary"),
        (
            "multipart/form-data; boundary=abc",
            b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nx\r\n--xyz--\r\n',
            "a part does not begin with the boundary its Content-Type names",
        ),
        (
            "multipart/form-data; boundary=abc",
            b"This is a multi-part message in MIME format.\r\n--abc\r\n"
            b'Content-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            b"\r\nx\r\n--abc--\r\n",
            "(nor may text come before the first one, a MIME preamble, which is not read)",
        ),
        (
            "multipart/form-data; boundary=abc",
            b"--abc\r\nContent-Disposition form-data\r\n\r\nx\r\n--abc--\r\n",
            "a part's header lines are malformed",
        ),
    ],
)
async def test_a_multipart_body_that_does_not_parse_is_400_saying_why(
    served: RunningApp, content_type: str, body: bytes, says: str
) -> None:
    """Not the parser's own "Invalid multipart data.", which tells a caller nothing."""
    response = await served.client.post(
        "/cls", content=body, headers={"Content-Type": content_type}
    )
    assert response.status_code == 400
    assert says in response.json()["detail"]


async def test_a_malformed_multipart_body_is_logged_once(
    served: RunningApp, caplog: pytest.LogCaptureFixture
) -> None:
    """Two parsers read each body (the app's, and one that bounds its parts): only the app's
    says what is malformed, not both the same line."""
    body = b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nx\r\n--xyz--\r\n'
    with caplog.at_level(logging.INFO, logger="python_multipart"):
        response = await served.client.post(
            "/cls", content=body, headers={"Content-Type": "multipart/form-data; boundary=abc"}
        )
    assert response.status_code == 400
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("python_multipart")]
    assert len(lines) == 1, lines
    assert "Expected boundary character" in lines[0]


async def test_a_method_a_route_does_not_take_is_405_naming_those_it_does(
    served: RunningApp,
) -> None:
    for response, detail in (
        (await served.client.get("/cls"), "GET is not allowed on /cls; it takes POST"),
        (
            await served.client.get("/tasks/7f3c"),
            "GET is not allowed on /tasks/7f3c; it takes DELETE; a task's status is at "
            "/task-status/7f3c",
        ),
        (
            await served.client.delete("/task-status/7f3c"),
            "DELETE is not allowed on /task-status/7f3c; it takes GET, HEAD",
        ),
        (await served.client.put("/healthz"), "PUT is not allowed on /healthz; it takes GET, HEAD"),
    ):
        assert response.status_code == 405
        assert response.json() == {"detail": detail}
        assert response.headers["Allow"] == detail.split("it takes ")[1].split(";")[0]


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"GIF89a but not really", "starts as a GIF image does, but its header is corrupt"),
        (b"just some text", "not a JPEG, PNG, GIF, WebP, BMP or TIFF image"),
        (images.png_bomb(), "30000x30000"),
        (images.encode(images.gradient(), "PPM"), "not a JPEG"),
    ],
)
async def test_bad_images_are_400_with_a_clear_message(
    served: RunningApp, data: bytes, fragment: str
) -> None:
    response = await served.client.post("/cls", files=upload(data, "../../etc/pass\x01wd.jpg"))
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert fragment in detail
    assert "Traceback" not in detail
    assert "/" not in detail


async def test_an_empty_upload_is_400_even_once_its_deadline_has_passed(
    served: RunningApp, photos: list[Path]
) -> None:
    """An empty file could never be served: a 504, or a 503, would have the client send it
    again. Its deadline passes before any decode here, as a photo's 504 shows."""
    passed = {"X-Request-Timeout-Ms": "0.000001"}
    photo = await served.client.post("/cls", files=upload(photos[0].read_bytes()), headers=passed)
    assert photo.status_code == 504, photo.text
    empty = await served.client.post("/cls", files=upload(b""), headers=passed)
    assert empty.status_code == 400, empty.text
    assert empty.json() == {"detail": "the uploaded file is empty"}
    files = [("file", ("a.jpg", b"", "image/jpeg")), ("file", ("b.jpg", b"x", "image/jpeg"))]
    batch = await served.client.post("/cls/batch", files=files, headers=passed)
    assert batch.status_code == 200, batch.text
    entries = batch.json()["results"]
    assert entries[0] == {"index": 0, "status": 400, "detail": "the uploaded file is empty"}
    assert entries[1]["status"] == 504


async def test_truncated_jpeg_is_400(served: RunningApp, photos: list[Path]) -> None:
    data = photos[0].read_bytes()
    response = await served.client.post("/cls", files=upload(data[: len(data) // 2]))
    assert response.status_code == 400
    assert response.json()["detail"] == "the image data is corrupt or truncated"


async def test_the_start_says_when_the_warm_up_begins_and_what_it_measured(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A warm-up that outlasts WORKER_TIMEOUT_S is killed without a word of its own: the
    line before it says that the worker was warming up, and with which batches."""
    with caplog.at_level(logging.INFO, logger="service"):
        async with running_app(make_settings(max_batch_size=4)):
            pass
    lines = [record.getMessage() for record in caplog.records]
    assert "warming up with batches of 1 and 4" in lines
    warm = next(line for line in lines if line.startswith("warm: "))
    assert re.fullmatch(r"warm: a batch of 1 takes \d+ ms, a batch of 4 takes \d+ ms", warm)


async def warnings_at_start(caplog: pytest.LogCaptureFixture, settings: Settings) -> list[str]:
    """The WARNING lines of an app's start with ``settings``."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="service"):
        async with running_app(settings):
            pass
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


async def test_random_weights_are_warned_of(
    caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A smoke-run setting left in a deployment would answer every request with a
    meaningless label, and nothing else would say so."""
    weights_file = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights_file)
    for weights, warned in (("random", True), (str(weights_file), False)):
        lines = await warnings_at_start(caplog, make_settings(weights=weights))
        assert (
            "WEIGHTS=random: the model's weights are random (seeded), so its answers are "
            "meaningless; for tests and smoke runs only" in lines
        ) is warned


async def test_misspelt_setting_names_are_warned_of_outside_gunicorn(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under uvicorn alone (make dev), where no gunicorn master says it."""
    monkeypatch.setenv("MAX_BATCHSIZE", "32")
    lines = await warnings_at_start(caplog, make_settings())
    assert "MAX_BATCHSIZE is no setting, and is ignored: did you mean MAX_BATCH_SIZE?" in lines


@pytest.mark.parametrize(
    ("argv", "environ", "workers"),
    [
        (["uvicorn", "main:app", "--workers", "4"], {}, 4),
        (["uvicorn", "main:app", "--workers=3"], {}, 3),
        (["uvicorn", "main:app"], {"WEB_CONCURRENCY": "2"}, 2),  # uvicorn's default
        (["uvicorn", "main:app"], {"UVICORN_WORKERS": "3", "WEB_CONCURRENCY": "2"}, 3),
        (["uvicorn", "main:app", "--workers", "1"], {"WEB_CONCURRENCY": "8"}, 1),
        (["uvicorn", "main:app"], {"WEB_CONCURRENCY": "0"}, 1),  # the cores divide by it
        (["uvicorn", "main:app", "--reload"], {"WEB_CONCURRENCY": "8"}, 1),  # runs one
        (["uvicorn", "main:app"], {"UVICORN_RELOAD": "true", "WEB_CONCURRENCY": "8"}, 1),
    ],
)
def test_uvicorns_own_workers_are_counted_from_its_command_line(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], environ: dict[str, str], workers: int
) -> None:
    """uvicorn --workers starts workers that share no metrics: the start warns of it,
    pointing to gunicorn; they share the cores among themselves."""
    monkeypatch.setattr(main.sys, "argv", argv)
    for name in ("WEB_CONCURRENCY", "UVICORN_WORKERS", "UVICORN_RELOAD"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert main.uvicorn_workers() == 1  # a process of its own: whatever the command line
    monkeypatch.setattr(main.multiprocessing, "parent_process", lambda: object())
    assert main.uvicorn_workers() == workers


async def test_a_task_lease_shorter_than_a_write_may_wait_is_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 1 s lease is valid, but with large images submitted to two workers it can hand a
    live worker's tasks to the other, which runs them again (3 to 15 of 60 tasks of 9 MiB):
    the start says so."""
    for lease_s, warned in ((2.0, True), (30.0, False)):
        lines = await warnings_at_start(caplog, make_settings(task_lease_s=lease_s))
        assert (
            f"TASK_LEASE_S={lease_s:g} is shorter than the 10 s a write may wait for another "
            "process's lock on the task store: while the store is busy (large images "
            "submitted to several workers), a live worker's tasks may be taken over and run "
            "twice" in lines
        ) is warned


async def test_a_stall_timeout_close_to_a_full_batchs_time_is_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """STALL_TIMEOUT_S=0.1 against batches of 200 ms is valid, but /healthz would answer 503
    to a third of the probes of a worker serving under load: the start says so."""
    for stall_s, warned in ((0.001, True), (60.0, False)):
        lines = await warnings_at_start(
            caplog, make_settings(stall_timeout_s=stall_s, max_batch_size=4)
        )
        assert (
            any(
                re.fullmatch(
                    f"STALL_TIMEOUT_S={stall_s:g} is less than 3 times what a full batch "
                    r"takes \(\d+ ms\): under load /healthz may answer 503 while the worker "
                    "serves",
                    line,
                )
                for line in lines
            )
            is warned
        ), lines


async def test_a_request_timeout_shorter_than_a_batch_of_one_is_warned_of(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """REQUEST_TIMEOUT_MS=10 meant as seconds is valid, and every request would be a 504:
    the start says so, once it knows how long a batch of one takes."""
    for timeout_ms, warned in ((0.5, True), (10_000, False)):
        lines = await warnings_at_start(caplog, make_settings(request_timeout_ms=timeout_ms))
        assert (
            any(
                line.startswith(f"REQUEST_TIMEOUT_MS={timeout_ms:g} is shorter than a batch of one")
                for line in lines
            )
            is warned
        ), lines


async def test_uploads_over_the_limit_are_413() -> None:
    """Just over the limit (caught per file) and far over it (refused from its declared
    length, before the body is read, on a connection then closed)."""
    async with running_app(make_settings(max_upload_bytes=50_000)) as served:
        for size in (50_001, 2_000_000):
            response = await served.client.post("/cls", files=upload(b"\xff" * size))
            assert response.status_code == 413
            assert "MAX_UPLOAD_BYTES allows 50000" in response.json()["detail"]
        assert response.headers["connection"] == "close"
        small = images.encode(images.gradient(64, 64), "PNG")
        assert (await served.client.post("/cls", files=upload(small))).status_code == 200


async def test_an_upload_of_exactly_the_limit_is_accepted(photos: list[Path]) -> None:
    data = photos[0].read_bytes()
    async with running_app(make_settings(max_upload_bytes=len(data))) as served:
        assert (await served.client.post("/cls", files=upload(data))).status_code == 200
        response = await served.client.post("/cls", files=upload(data + b"\0"))
        assert response.status_code == 413


def test_reading_an_upload_sets_aside_its_size_not_the_limit() -> None:
    """An upload over 1 MiB is spooled to disk; read back with read(limit + 1), Python would
    set aside the whole limit first: with a large MAX_UPLOAD_BYTES, a MemoryError (500) for
    every such upload."""
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    data = images.encode(Image.fromarray(noise), "PNG")
    with tempfile.SpooledTemporaryFile(max_size=1024 * 1024) as spooled:
        spooled.write(data)
        assert spooled._rolled  # type: ignore[attr-defined]  # on disk, as a large upload is
        tracemalloc.start()
        try:
            read, crop = core._read_and_preprocess(spooled, 1_000_000_000, 40_000_000, True)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert read == data
    assert crop.shape == (224, 224, 3)
    assert peak < 100 * 2**20, peak


async def send_streamed(
    served: RunningApp, request: httpx.Request, chunk_bytes: int = 40_000
) -> tuple[int, dict[str, object]]:
    """Send ``request``'s body without a declared length (chunked), ``chunk_bytes`` a chunk;
    how many chunks the app read, and the start of its answer."""
    scope = http_scope(request)
    scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
    body = request.read()
    chunks = [body[start : start + chunk_bytes] for start in range(0, len(body), chunk_bytes)]
    read = 0
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        nonlocal read
        read += 1
        if not chunks:
            await asyncio.Event().wait()  # only a disconnect would come now
        return {"type": "http.request", "body": chunks.pop(0), "more_body": True}

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    await asyncio.wait_for(served.app(scope, receive, send), 10)
    return read, next(m for m in sent if m["type"] == "http.response.start")


async def test_a_streamed_body_is_cut_off_as_it_passes_the_limit() -> None:
    """A body without a declared length (chunked) is refused as the chunk that passes the
    route's limit arrives: the rest is never read, and the connection is closed."""
    async with running_app(make_settings(max_upload_bytes=50_000)) as served:
        # 400 KB in 11 chunks, past the 50 KB + 64 KiB the route allows.
        request = httpx.Request("POST", "http://test/cls", files=upload(b"\xff" * 400_000))
        read, start = await send_streamed(served, request)
    assert start["status"] == 413
    assert (b"connection", b"close") in start["headers"]  # type: ignore[operator]
    assert read < 5, "the body was read on past the limit"


async def test_a_batch_part_is_cut_off_as_it_passes_the_upload_limit(photos: list[Path]) -> None:
    """The multipart parser spools a file to disk whatever its size, and a /cls/batch body
    may hold MAX_BATCH_FILES uploads: a file far over MAX_UPLOAD_BYTES is refused as it
    passes the limit, not once the whole body is on disk. Files up to the limit pass."""
    data = photos[0].read_bytes()
    async with running_app(make_settings(max_upload_bytes=len(data), max_batch_files=32)) as served:
        fitting = await served.client.post("/cls/batch", files=[("file", ("a.jpg", data))] * 3)
        assert [entry["status"] for entry in fitting.json()["results"]] == [200] * 3
        huge = data + b"\0" * (20 * len(data))
        files = [("file", ("a.jpg", data)), ("file", ("b.jpg", huge))]
        request = httpx.Request("POST", "http://test/cls/batch", files=files)
        read, start = await send_streamed(served, request)
        assert start["status"] == 413
        assert (b"connection", b"close") in start["headers"]  # type: ignore[operator]
        # The first file, the second up to its limit, and the chunk that passed it.
        body_bytes = len(request.read())
        assert read * 40_000 < 3 * len(data) + 4 * main.MULTIPART_OVERHEAD_BYTES < body_bytes
        # With a declared length within the body's limit, the part is refused all the same.
        declared = await served.client.post("/cls/batch", files=files)
        assert declared.status_code == 413
        # The limit the README gives: MAX_UPLOAD_BYTES + 64 KiB.
        assert declared.json()["detail"] == (
            f"a part of the request body is over {len(data) + 64 * 1024} bytes; "
            f"MAX_UPLOAD_BYTES allows {len(data)} per file"
        )
        after = await served.client.post("/cls/batch", files=[("file", ("a.jpg", data))])
        assert after.status_code == 200


async def test_batch_answers_each_file_in_order(served: RunningApp, photos: list[Path]) -> None:
    good = photos[0].read_bytes()
    body = multipart(
        [
            ("file", "a.jpg", good, "image/jpeg"),
            ("file", "b.txt", b"not an image", "text/plain"),
            # What a browser sends for a file input left empty: it keeps its place.
            ("file", "", b"", "application/octet-stream"),
            ("file", "c.png", images.png_bomb(), "image/png"),
            ("file", "d.jpg", photos[1].read_bytes(), "image/jpeg"),
        ]
    )
    files = ('classify_batch_files_total{status="200"}', 'classify_batch_files_total{status="400"}')
    before = (await served.client.get("/metrics")).text
    response = await served.client.post(
        "/cls/batch", params={"top_k": 2}, content=body, headers=multipart_headers(body)
    )
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3, 4]
    assert [r["status"] for r in results] == [200, 400, 400, 400, 200]
    # The request is one 200; its files are counted by their own statuses.
    after = (await served.client.get("/metrics")).text
    assert [metric_value(after, f) - metric_value(before, f) for f in files] == [2, 3]
    assert "prediction" not in results[1]
    assert "not a JPEG" in results[1]["detail"]
    assert "empty" in results[2]["detail"]
    assert "MAX_IMAGE_PIXELS" in results[3]["detail"]
    # Each photo's entry holds its own answer, as sent alone.
    for result, photo in ((results[0], photos[0]), (results[4], photos[1])):
        single = await served.client.post(
            "/cls", params={"top_k": 2}, files=upload(photo.read_bytes())
        )
        expected = single.json()["prediction"]
        assert [p["index"] for p in result["prediction"]] == [p["index"] for p in expected]
        assert [p["score"] for p in result["prediction"]] == pytest.approx(
            [p["score"] for p in expected], rel=1e-4
        )


async def test_a_batch_of_only_an_empty_file_input_gets_its_entry(served: RunningApp) -> None:
    """A form whose one file input was left empty is answered like any empty part, not as a
    form without files; a form with no file part at all still is 422."""
    body = multipart([("file", "", b"", "application/octet-stream")])
    response = await served.client.post("/cls/batch", content=body, headers=multipart_headers(body))
    assert response.status_code == 200, response.text
    [entry] = response.json()["results"]
    assert (entry["index"], entry["status"]) == (0, 400)
    assert "empty" in entry["detail"]
    body = multipart([("other", "a.jpg", b"x", "image/jpeg")])
    response = await served.client.post("/cls/batch", content=body, headers=multipart_headers(body))
    assert response.status_code == 422
    assert response.json()["detail"].startswith("other: a file under another name than 'file'")
    body = multipart([("other", "", b"", "application/octet-stream")])
    response = await served.client.post("/cls/batch", content=body, headers=multipart_headers(body))
    assert response.status_code == 422
    assert response.json()["detail"] == "file: Field required"


async def test_a_batch_file_under_another_field_name_is_422_not_left_out(
    served: RunningApp, photos: list[Path]
) -> None:
    data = photos[0].read_bytes()
    body = multipart(
        [("file", "a.jpg", data, "image/jpeg"), ("files", "b.jpg", data, "image/jpeg")]
    )
    response = await served.client.post("/cls/batch", content=body, headers=multipart_headers(body))
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == (
        "files: a file under another name than 'file'; send each image as a part named 'file'"
    )
    # A long name is quoted short, on either route.
    for route in ("/cls", "/cls/batch"):
        body = multipart([("n" * 4000, "a.jpg", data, "image/jpeg")])
        response = await served.client.post(route, content=body, headers=multipart_headers(body))
        assert response.status_code == 422, response.text
        assert response.json()["detail"].startswith("n" * 64 + "...: a file under another name")
    # An empty one (a browser's other file input, left empty) holds no image to miss.
    body = multipart([("file", "a.jpg", data, "image/jpeg"), ("extra", "", b"", "text/plain")])
    response = await served.client.post("/cls/batch", content=body, headers=multipart_headers(body))
    assert response.status_code == 200, response.text
    assert [entry["status"] for entry in response.json()["results"]] == [200]


@pytest.mark.parametrize(("route", "accepted"), [("/cls", 200), ("/tasks", 202)])
async def test_one_image_beside_an_empty_file_input_is_served_and_a_second_image_refused(
    served: RunningApp, photos: list[Path], route: str, accepted: int
) -> None:
    """A browser form with a second file input, left empty, sends it as an empty file part:
    there is still one image. An image under another name beside ``file`` is a second one."""
    data = photos[0].read_bytes()
    body = multipart([("file", "a.jpg", data, "image/jpeg"), ("extra", "", b"", "text/plain")])
    response = await served.client.post(route, content=body, headers=multipart_headers(body))
    assert response.status_code == accepted, response.text
    body = multipart(
        [("file", "a.jpg", data, "image/jpeg"), ("extra", "b.jpg", data, "image/jpeg")]
    )
    response = await served.client.post(route, content=body, headers=multipart_headers(body))
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith(f"{route} takes one file")
    # The one image under another name, beside an empty "file": that is what to say.
    body = multipart([("image", "a.jpg", data, "image/jpeg"), ("file", "", b"", "text/plain")])
    response = await served.client.post(route, content=body, headers=multipart_headers(body))
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("image: a file under another name than 'file'")
    # Past the form's limit of file parts, empty ones count: the answer says so.
    empty = [(f"extra{i}", "", b"", "text/plain") for i in range(8)]
    body = multipart([("file", "a.jpg", data, "image/jpeg"), *empty])
    response = await served.client.post(route, content=body, headers=multipart_headers(body))
    assert response.status_code == 400, response.text
    assert response.json()["detail"].startswith(
        f"more than 8 file parts, empty ones included; {route} takes one file"
    )


async def test_task_fields_sent_as_files_even_empty_are_told_to_be_plain_fields(
    served: RunningApp, photos: list[Path]
) -> None:
    data = photos[0].read_bytes()
    for field in ("metadata", "callback_url"):
        body = multipart([("file", "a.jpg", data, "image/jpeg"), (field, "m.json", b"", None)])
        response = await served.client.post("/tasks", content=body, headers=multipart_headers(body))
        assert response.status_code == 400, response.text
        assert "send `metadata` and `callback_url` as plain fields" in response.json()["detail"]


async def test_batch_file_count_is_limited(photos: list[Path]) -> None:
    async with running_app(make_settings(max_batch_files=2)) as served:
        data = photos[0].read_bytes()
        files = [("file", (f"{i}.jpg", data, "image/jpeg")) for i in range(3)]
        response = await served.client.post("/cls/batch", files=files)
        assert response.status_code == 400
        assert response.json()["detail"] == (
            "more than 2 files; /cls/batch takes at most MAX_BATCH_FILES (2) per request"
        )
        two = files[:2]
        response = await served.client.post("/cls", files=two)
        assert response.status_code == 400
        assert response.json()["detail"] == "/cls takes one file; send several to /cls/batch"
        response = await served.client.post("/tasks", files=two)
        assert response.status_code == 400
        assert response.json()["detail"].startswith(
            "/tasks takes one file, the `file` part (submit a task for each image); send "
            "`metadata` and `callback_url` as plain fields, not files"
        )


async def send_while_the_model_is_held(
    served: RunningApp, data: list[bytes], queued: int
) -> tuple[GatedModel, list[httpx.Response]]:
    """Hold the model on a first request, queue ``queued`` more behind it, then release it;
    the responses of all of them, first first."""
    model = GatedModel(served)
    first = asyncio.create_task(served.client.post("/cls", files=upload(data[0])))
    await asyncio.to_thread(model.entered.wait, 10)
    rest = [
        asyncio.create_task(served.client.post("/cls", files=upload(data[i % len(data)])))
        for i in range(queued)
    ]
    processor = served.service.processor
    assert processor is not None
    await wait_for(lambda: processor.queue_depth == queued)
    model.release.set()
    return model, list(await asyncio.gather(first, *rest))


async def test_concurrent_requests_share_batches(photos: list[Path]) -> None:
    async with running_app(make_settings(drain_timeout_s=2)) as served:
        data = [p.read_bytes() for p in photos]
        model, responses = await send_while_the_model_is_held(served, data, queued=12)
        assert all(r.status_code == 200 for r in responses)
        assert model.batch_sizes[0] == 1
        assert max(model.batch_sizes) > 1
        assert sum(model.batch_sizes) == 13


async def test_an_idle_model_wakes_its_threads_and_decodes_on_its_own_thread(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request to an idle model wakes the model's OpenMP threads and decodes its image on
    the model's thread (a torch call on any other thread would start a second set of
    threads); requests that find the model busy decode on the decode threads and wake
    nothing."""
    async with running_app(make_settings(drain_timeout_s=2)) as served:
        classifier = served.service.classifier
        assert classifier is not None
        calls: list[tuple[str, str]] = []
        real_classify = classifier.classify
        real_preprocess = core._preprocess

        def wake_threads() -> None:
            calls.append(("wake", threading.current_thread().name))

        def preprocess(data: bytes, max_pixels: int, reduced_jpeg: bool = True) -> np.ndarray:
            calls.append(("decode", threading.current_thread().name))
            return real_preprocess(data, max_pixels, reduced_jpeg)

        def classify(pixels: Sequence[np.ndarray], top_k: Sequence[int]) -> list[list[Prediction]]:
            calls.append(("classify", threading.current_thread().name))
            return real_classify(pixels, top_k)

        classifier.wake_threads = wake_threads  # type: ignore[method-assign]
        classifier.classify = classify  # type: ignore[method-assign]
        monkeypatch.setattr(core, "_preprocess", preprocess)
        data = [p.read_bytes() for p in photos]
        response = await served.client.post("/cls", files=upload(data[0]))
        assert response.status_code == 200
        assert [call for call, _ in calls] == ["wake", "decode", "classify"]
        assert len({thread for _, thread in calls}) == 1
        assert calls[0][1].startswith("inference")

        calls.clear()
        _, responses = await send_while_the_model_is_held(served, data, queued=3)
        assert all(r.status_code == 200 for r in responses)
        assert [call for call, _ in calls].count("wake") == 1  # the first request's only
        decodes = [thread for call, thread in calls if call == "decode"]
        assert len(decodes) == 4
        assert decodes[0].startswith("inference")
        assert all(thread.startswith("decode") for thread in decodes[1:])


async def test_an_idle_model_leaves_a_long_file_to_the_decode_threads(
    served: RunningApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file over SMALL_UPLOAD_MAX_BYTES may declare few pixels and still take long
    to read (thousands of PNG chunks, a TIFF strip table): the model's thread never opens it."""
    padding = [(f"note{i}", "x" * 100) for i in range(core.SMALL_UPLOAD_MAX_BYTES // 100)]
    info = PngImagePlugin.PngInfo()
    for key, value in padding:
        info.add_text(key, value)
    data = images.encode(images.gradient(64, 48), "PNG", pnginfo=info)
    assert len(data) > core.SMALL_UPLOAD_MAX_BYTES
    threads: list[str] = []
    real_preprocess = core._preprocess

    def preprocess(data: bytes, max_pixels: int, reduced_jpeg: bool = True) -> np.ndarray:
        threads.append(threading.current_thread().name.split("_")[0])
        return real_preprocess(data, max_pixels, reduced_jpeg)

    monkeypatch.setattr(core, "_preprocess", preprocess)
    response = await served.client.post("/cls", files=upload(data))
    assert response.status_code == 200, response.text
    assert threads == ["decode-large"]


async def test_an_idle_model_leaves_a_large_image_to_the_decode_threads(
    served: RunningApp, photos: list[Path], reference: Reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding an image over SMALL_IMAGE_MAX_PIXELS would hold the model from the
    requests arriving meanwhile: only its header is read on the model's thread, and it
    decodes on a decode thread with the configured limit, answered as any other."""
    side = math.isqrt(core.SMALL_IMAGE_MAX_PIXELS) + 1
    data = images.encode(images.photo(photos[0]).resize((side, side)), "JPEG", quality=80)
    assert len(data) <= core.SMALL_UPLOAD_MAX_BYTES
    decodes: list[tuple[str, int, bool]] = []
    real_preprocess = core._preprocess

    def preprocess(data: bytes, max_pixels: int, reduced_jpeg: bool = True) -> np.ndarray:
        try:
            pixels = real_preprocess(data, max_pixels, reduced_jpeg)
        except ImageTooLarge:
            decodes.append((threading.current_thread().name, max_pixels, False))
            raise
        decodes.append((threading.current_thread().name, max_pixels, True))
        return pixels

    monkeypatch.setattr(core, "_preprocess", preprocess)
    response = await served.client.post("/cls", files=upload(data))
    assert response.status_code == 200
    limit = served.service.settings.max_image_pixels
    assert [(thread.split("_")[0], pixels, ok) for thread, pixels, ok in decodes] == [
        ("inference", core.SMALL_IMAGE_MAX_PIXELS, False),
        ("decode-large", limit, True),
    ]
    indices, _ = reference.top_k(Image.open(io.BytesIO(data)).convert("RGB"), 5)
    assert [p["index"] for p in response.json()["prediction"]] == indices


async def test_a_model_packages_own_image_too_large_error_needs_no_pixel_count(
    served: RunningApp, photos: list[Path], reference: Reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another model package may define its own ImageTooLarge, without ``pixels_needed``:
    a small upload over SMALL_IMAGE_MAX_PIXELS is then decoded by the threads for large
    images, with the configured limit, as with classification's, not answered 500."""

    class OwnImageTooLarge(ValueError):
        pass

    real_preprocess = core._preprocess

    decodes: list[tuple[str, int]] = []

    def preprocess(data: bytes, max_pixels: int, reduced_jpeg: bool = True) -> np.ndarray:
        decodes.append((threading.current_thread().name.split("_")[0], max_pixels))
        try:
            return real_preprocess(data, max_pixels, reduced_jpeg)
        except ImageTooLarge as exc:
            raise OwnImageTooLarge(str(exc)) from None

    monkeypatch.setattr(core, "ImageTooLarge", OwnImageTooLarge)
    monkeypatch.setattr(core, "_preprocess", preprocess)
    side = math.isqrt(core.SMALL_IMAGE_MAX_PIXELS) + 1
    data = images.encode(images.photo(photos[0]).resize((side, side)), "JPEG", quality=80)
    assert len(data) <= core.SMALL_UPLOAD_MAX_BYTES
    response = await served.client.post("/cls", files=upload(data))
    assert response.status_code == 200, response.text
    indices, _ = reference.top_k(Image.open(io.BytesIO(data)).convert("RGB"), 5)
    assert [p["index"] for p in response.json()["prediction"]] == indices
    limit = served.service.settings.max_image_pixels
    assert decodes == [("inference", core.SMALL_IMAGE_MAX_PIXELS), ("decode-large", limit)]


async def test_a_small_upload_over_the_pixel_limit_does_not_wait_behind_large_decodes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its header refuses it under any limit: a 400 at once, with the message for
    MAX_IMAGE_PIXELS, not a 504 at its deadline from the queue for large images' decodes."""
    large_decode_started = threading.Event()
    release = threading.Event()
    real_read_and_preprocess = core._read_and_preprocess

    def held(*args: Any) -> tuple[bytes, np.ndarray]:
        large_decode_started.set()
        release.wait(10)
        return real_read_and_preprocess(*args)

    monkeypatch.setattr(core, "_read_and_preprocess", held)
    side = math.isqrt(core.SMALL_IMAGE_MAX_PIXELS) + 1
    limit = 2 * side * side
    within = images.encode(Image.new("RGB", (side, side), (90, 120, 200)), "PNG")
    over = images.encode(Image.new("RGB", (2 * side, side + 1), (90, 120, 200)), "PNG")
    assert max(len(within), len(over)) <= core.SMALL_UPLOAD_MAX_BYTES
    settings = make_settings(max_image_pixels=limit, decode_threads=1, drain_timeout_s=2)
    async with running_app(settings) as served:
        waiting = asyncio.create_task(served.client.post("/cls", files=upload(within)))
        try:
            await asyncio.to_thread(large_decode_started.wait, 10)
            async with asyncio.timeout(5):
                refused = await served.client.post("/cls", files=upload(over))
            assert refused.status_code == 400
            assert refused.json()["detail"] == (
                f"image is {2 * side}x{side + 1} = {2 * side * (side + 1)} pixels; "
                f"MAX_IMAGE_PIXELS allows {limit}"
            )
        finally:
            release.set()
        assert (await waiting).status_code == 200


async def hold_model_with_queue(
    served: RunningApp, data: bytes, queued: int
) -> tuple[GatedModel, asyncio.Task[httpx.Response], list[asyncio.Task[httpx.Response]]]:
    """One request inside the gated model and ``queued`` more waiting behind it."""
    model = GatedModel(served)
    running = asyncio.create_task(served.client.post("/cls", files=upload(data)))
    await asyncio.to_thread(model.entered.wait, 10)
    waiting = [
        asyncio.create_task(served.client.post("/cls", files=upload(data))) for _ in range(queued)
    ]
    processor = served.service.processor
    assert processor is not None
    await wait_for(lambda: processor.queue_depth == queued)
    return model, running, waiting


async def test_full_queue_is_503_with_retry_after(photos: list[Path]) -> None:
    """/cls, and a /cls/batch with no file taken in, are refused whole."""
    async with running_app(
        make_settings(max_queue=2, max_batch_files=2, drain_timeout_s=2)
    ) as served:
        data = photos[0].read_bytes()
        model, running, queued = await hold_model_with_queue(served, data, queued=2)
        rejected = 'batch_requests_total{outcome="rejected"}'
        before = metric_value((await served.client.get("/metrics")).text, rejected)
        refused = await served.client.post("/cls", files=upload(data))
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "MAX_QUEUE allows 2" in refused.json()["detail"]
        # A /cls/batch none of whose files found room is refused whole, as /cls is: a 200
        # would tell a client or proxy that reads only the status that it was served.
        files = [("file", ("a.jpg", data, "image/jpeg")), ("file", ("b.jpg", data, "image/jpeg"))]
        refused_batch = await served.client.post("/cls/batch", files=files)
        assert refused_batch.status_code == 503, refused_batch.text
        assert refused_batch.headers["retry-after"] == "1"
        assert "MAX_QUEUE allows 2" in refused_batch.json()["detail"]
        # Refused before its files were read: not known to the batcher's count.
        after = metric_value((await served.client.get("/metrics")).text, rejected)
        assert after == before + 1
        model.release.set()
        assert [r.status_code for r in await asyncio.gather(running, *queued)] == [200] * 3


@pytest.mark.parametrize("path", ["/cls", "/cls/batch"])
async def test_a_full_queue_refuses_an_upload_before_reading_it(
    photos: list[Path], path: str
) -> None:
    """A client on a slow link is not made to send its image only to be told to retry: the
    503 comes while the body is still on its way, and closes the connection."""
    settings = make_settings(max_queue=1, max_batch_files=1, drain_timeout_s=2)
    async with running_app(settings) as served:
        data = photos[0].read_bytes()
        model, running, queued = await hold_model_with_queue(served, data, queued=1)
        body = multipart([("file", "photo.jpg", data, "image/jpeg")])
        never_sent = asyncio.Event()

        async def stalled_body() -> AsyncIterator[bytes]:
            yield body[:200]
            await never_sent.wait()

        async with asyncio.timeout(5):
            refused = await served.client.post(
                path, content=stalled_body(), headers=multipart_headers(body)
            )
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["connection"] == "close"  # 68 KB, over the 64 KiB read
        assert refused.json()["detail"] == "the queue is full; MAX_QUEUE allows 1"
        # A short body, sent whole, is read and dropped: the connection is kept.
        short = multipart([("file", "photo.jpg", data[:100], "image/jpeg")])
        kept = await served.client.post(path, content=short, headers=multipart_headers(short))
        assert kept.status_code == 503, kept.text
        assert "connection" not in kept.headers
        model.release.set()
        assert [r.status_code for r in await asyncio.gather(running, *queued)] == [200, 200]


async def test_a_batch_with_refused_entries_says_when_to_retry(photos: list[Path]) -> None:
    """Entries refused because the queue is full get 503 inside a 200 answer, which then
    carries ``Retry-After`` for them; an answer without such entries carries none."""
    async with running_app(
        make_settings(max_queue=2, max_batch_files=2, drain_timeout_s=2)
    ) as served:
        data = photos[0].read_bytes()
        model, running, queued = await hold_model_with_queue(served, data, queued=1)
        processor = served.service.processor
        assert processor is not None
        files = [("file", ("a.jpg", data, "image/jpeg")), ("file", ("b.jpg", data, "image/jpeg"))]
        crowded = asyncio.create_task(served.client.post("/cls/batch", files=files))
        await wait_for(lambda: processor.queue_depth == 2)
        model.release.set()
        answer = await crowded
        assert [r.status_code for r in await asyncio.gather(running, *queued)] == [200, 200]

        assert answer.status_code == 200
        assert sorted(entry["status"] for entry in answer.json()["results"]) == [200, 503]
        assert answer.headers["retry-after"] == "1"
        calm = await served.client.post("/cls/batch", files=files)
        assert [entry["status"] for entry in calm.json()["results"]] == [200, 200]
        assert "retry-after" not in calm.headers


async def test_single_images_go_ahead_of_queued_batch_files(photos: list[Path]) -> None:
    """A /cls request rides the next batch however many /cls/batch files wait: they are
    bulk work, and one client's 32 files must not hold up everyone's single images."""
    # The files wait on however slow the machine is, never long enough to be let ahead.
    settings = make_settings(max_batch_size=4, lower_lane_max_wait_ms=60_000)
    async with running_app(settings) as served:
        data = photos[0].read_bytes()
        model = GatedModel(served)
        processor = served.service.processor
        assert processor is not None
        running = asyncio.create_task(served.client.post("/cls", files=upload(data)))
        await asyncio.to_thread(model.entered.wait, 10)
        files = [("file", (f"{index}.jpg", data, "image/jpeg")) for index in range(4)]
        bulk = asyncio.create_task(served.client.post("/cls/batch", files=files))
        await wait_for(lambda: processor.waiting(Priority.BULK) == 4)
        single = asyncio.create_task(served.client.post("/cls", files=upload(data)))
        await wait_for(lambda: processor.waiting(Priority.INTERACTIVE) == 1)
        model.release.set()
        answers = await asyncio.gather(running, bulk, single)

    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert [entry["status"] for entry in answers[1].json()["results"]] == [200] * 4
    assert model.batch_sizes == [1, 1, 4]


async def test_uploads_read_back_from_disk_are_held_to_the_queue_limit(photos: list[Path]) -> None:
    """An upload over 1 MiB is spooled to disk, and reading it back yields to other requests;
    they must still find it counted, and be refused before they decode."""
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    large = images.encode(Image.fromarray(noise), "PNG")
    assert len(large) > 1024 * 1024
    async with running_app(make_settings(max_queue=2, max_batch_files=2)) as served:
        model = GatedModel(served)
        running = asyncio.create_task(
            served.client.post("/cls", files=upload(photos[0].read_bytes()))
        )
        await asyncio.to_thread(model.entered.wait, 10)
        burst = [
            asyncio.create_task(served.client.post("/cls", files=upload(large))) for _ in range(8)
        ]
        await wait_for(lambda: sum(task.done() for task in burst) == 6)
        refusals = [task.result().json()["detail"] for task in burst if task.done()]
        assert all(detail.startswith("the queue is full") for detail in refusals), refusals
        model.release.set()
        statuses = [r.status_code for r in await asyncio.gather(running, *burst)]
        assert sorted(statuses) == [200] * 3 + [503] * 6


@pytest.mark.parametrize("timeout_ms", [86_400_000, 1_234_567, 2.5])
def test_a_504_names_the_request_timeout_as_set(timeout_ms: float) -> None:
    settings = make_settings(request_timeout_ms=timeout_ms)
    status, detail = errors.status_and_detail(DeadlineExceeded("late"), settings)
    assert (status, detail) == (
        504,
        f"the request was not served within REQUEST_TIMEOUT_MS ({timeout_ms} ms)",
    )
    own = errors.status_and_detail(DeadlineExceeded("late"), settings, own_timeout="0.5")
    assert own == (504, "the request was not served within its X-Request-Timeout-Ms (0.5 ms)")


async def test_deadline_is_504_while_the_model_is_busy(
    photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    # Long enough for the request after it to be served on a busy machine.
    async with running_app(make_settings(request_timeout_ms=1500, drain_timeout_s=2)) as served:
        model = GatedModel(served)
        data = photos[0].read_bytes()
        try:
            started = asyncio.get_running_loop().time()
            with caplog.at_level(logging.INFO, logger=logs.ACCESS_LOGGER):
                response = await served.client.post("/cls", files=upload(data))
            elapsed = asyncio.get_running_loop().time() - started
            assert response.status_code == 504
            assert "REQUEST_TIMEOUT_MS (1500 ms)" in response.json()["detail"]
            assert 1.4 < elapsed < 10
        finally:
            model.release.set()
        # Its deadline passed in the model: the access line names the batch it was in.
        [line] = [r for r in caplog.records if r.name == logs.ACCESS_LOGGER]
        assert (line.status, line.batch_size) == (504, 1)
        assert (await served.client.post("/cls", files=upload(data))).status_code == 200


async def test_a_request_s_own_shorter_time_limit_is_its_deadline(photos: list[Path]) -> None:
    """X-Request-Timeout-Ms: a client with a deadline of its own gets its 504 then, naming
    the header, rather than at REQUEST_TIMEOUT_MS; the request beside it, without one, waits
    for the model and is served."""
    async with running_app(make_settings(request_timeout_ms=20_000, drain_timeout_s=2)) as served:
        model = GatedModel(served)
        data = photos[0].read_bytes()
        try:
            patient = asyncio.create_task(served.client.post("/cls", files=upload(data)))
            started = asyncio.get_running_loop().time()
            hurried = await served.client.post(
                "/cls", files=upload(data), headers={"X-Request-Timeout-Ms": "400"}
            )
            elapsed = asyncio.get_running_loop().time() - started
            assert hurried.status_code == 504
            assert hurried.json()["detail"] == (
                "the request was not served within its X-Request-Timeout-Ms (400 ms)"
            )
            assert 0.35 < elapsed < 5
            batch = multipart([("file", "a.jpg", data, "image/jpeg")])
            hurried_batch = await served.client.post(
                "/cls/batch",
                content=batch,
                headers={**multipart_headers(batch), "X-Request-Timeout-Ms": "300"},
            )
            [entry] = hurried_batch.json()["results"]
            assert (entry["status"], entry["detail"]) == (
                504,
                "the request was not served within its X-Request-Timeout-Ms (300 ms)",
            )
            # Named in plain digits, not as a float prints it (1e-09).
            tiny = await served.client.post(
                "/cls", files=upload(data), headers={"X-Request-Timeout-Ms": " 0000.000000001"}
            )
            assert tiny.json()["detail"] == (
                "the request was not served within its X-Request-Timeout-Ms (0.000000001 ms)"
            )
            assert not patient.done()
        finally:
            model.release.set()
        assert (await patient).status_code == 200


NOT_MILLISECONDS = (
    "must be a number of milliseconds above 0, in digits (250 or 12.5; at most 12 before the "
    "point and 9 after); got "
)


@pytest.mark.parametrize(
    ("values", "says"),
    [
        (["0"], f"{NOT_MILLISECONDS}'0'"),
        (["0.000"], f"{NOT_MILLISECONDS}'0.000'"),
        (["-5"], f"{NOT_MILLISECONDS}'-5'"),
        (["+50"], f"{NOT_MILLISECONDS}'+50'"),
        (["1_000"], f"{NOT_MILLISECONDS}'1_000'"),
        (["1e3"], f"{NOT_MILLISECONDS}'1e3'"),
        (["soon"], f"{NOT_MILLISECONDS}'soon'"),
        (["inf"], f"{NOT_MILLISECONDS}'inf'"),
        (["9" * 400], f"{NOT_MILLISECONDS}'{'9' * 20}...'"),
        (["1.0000000001"], f"{NOT_MILLISECONDS}'1.0000000001'"),
        ([".5"], f"{NOT_MILLISECONDS}'.5'"),
        (["100", "5000"], "was sent 2 times; send it at most once"),
        # As written, in UTF-8, not as the Latin-1 the header's bytes are read as.
        (["\u0661\u0662"], f"{NOT_MILLISECONDS}'\u0661\u0662'"),
    ],
)
async def test_a_time_limit_that_is_no_positive_number_or_sent_twice_is_422(
    values: list[str], says: str, served: RunningApp, photos: list[Path]
) -> None:
    headers = [("X-Request-Timeout-Ms", value.encode()) for value in values]
    response = await served.client.post(
        "/cls", files=upload(photos[0].read_bytes()), headers=headers
    )
    assert response.status_code == 422
    assert response.json()["detail"] == f"header.X-Request-Timeout-Ms: {says}"


async def test_a_cls_decode_never_waits_behind_batch_files_decodes(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files of /cls/batch requests decode on threads of their own: a single image is
    decoded at once, however many files wait (here held) for a decode."""
    slow = photos[1].read_bytes()
    release = threading.Event()
    held: list[int] = []
    real_preprocess = core.preprocess

    def preprocess(data: bytes, max_pixels: int, reduced_jpeg: bool = True) -> np.ndarray:
        if data == slow:
            held.append(1)
            release.wait(10)
        return real_preprocess(data, max_pixels=max_pixels, reduced_jpeg=reduced_jpeg)

    monkeypatch.setattr(core, "preprocess", preprocess)
    async with running_app(make_settings(decode_threads=2, drain_timeout_s=2)) as served:
        files = [("file", (f"{i}.jpg", slow, "image/jpeg")) for i in range(6)]
        batch = asyncio.create_task(served.client.post("/cls/batch", files=files))
        try:
            await wait_for(lambda: len(held) == 2)
            async with asyncio.timeout(5):
                alone = await served.client.post("/cls", files=upload(photos[0].read_bytes()))
            assert alone.status_code == 200
            assert not batch.done()
        finally:
            release.set()
        answered = await batch
    assert [entry["status"] for entry in answered.json()["results"]] == [200] * 6


async def test_uploads_waiting_for_a_decode_thread_are_not_held_in_memory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upload is read from its spooled file (on disk past 1 MiB) by the thread that
    decodes it: requests queued behind a slow decode do not each hold a copy."""
    noise = np.random.default_rng(0).integers(0, 256, (700, 1000, 3), dtype=np.uint8)
    data = images.encode(Image.fromarray(noise), "PNG")
    assert len(data) > 2**21
    held = HeldDecode(monkeypatch)
    settings = make_settings(decode_threads=1, drain_timeout_s=2)
    async with running_app(settings) as served:
        tracemalloc.start()
        try:
            waiting = [
                asyncio.create_task(served.client.post("/cls", files=upload(data)))
                for _ in range(8)
            ]
            await wait_for(held.started.is_set)
            await wait_for(lambda: served.service._decodes_in_progress == 8)
            large = [
                stat.size
                for stat in tracemalloc.take_snapshot().statistics("lineno")
                if stat.size >= len(data)
            ]
        finally:
            tracemalloc.stop()
            held.release.set()
        assert [(await response).status_code for response in waiting] == [200] * 8
    # At most one copy, the upload being decoded: the requests waiting for the thread hold none.
    assert sum(large) < 2 * len(data), large


async def test_uploads_under_way_are_bounded_together(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each upload has its limit; MAX_UPLOADS_IN_FLIGHT_BYTES bounds what they hold
    together (spooled files past 1 MiB, unlinked, which a disk quota that sums the files
    it sees does not count): past it a request is refused with 503 and Retry-After, never
    one that is alone."""
    data = photos[0].read_bytes()
    held = HeldDecode(monkeypatch)
    async with running_app(make_settings(max_uploads_in_flight_bytes=len(data) // 2)) as served:
        holding = asyncio.create_task(served.client.post("/cls", files=upload(data)))
        await wait_for(held.started.is_set)  # its body read, and held until it is answered
        refused = await served.client.post("/cls", files=upload(data))
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "1"
        assert refused.json()["detail"].startswith("uploads under way in this worker hold ")
        limit = f"MAX_UPLOADS_IN_FLIGHT_BYTES allows {len(data) // 2:,}"
        assert refused.json()["detail"].endswith(limit)
        held.release.set()
        assert (await holding).status_code == 200  # alone, though over the bound itself
        assert (await served.client.post("/cls", files=upload(data))).status_code == 200


async def test_a_small_image_never_waits_behind_large_decodes(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large images (a 40-megapixel decode takes up to a second) have decode threads of
    their own: a small one arriving meanwhile is decoded at once."""
    large_decoding = threading.Event()
    release_large = threading.Event()
    real_preprocess = core.preprocess

    def preprocess(data: bytes, max_pixels: int, reduced_jpeg: bool = True) -> np.ndarray:
        if len(data) > core.SMALL_UPLOAD_MAX_BYTES:
            large_decoding.set()
            release_large.wait(10)
        return real_preprocess(data, max_pixels=max_pixels, reduced_jpeg=reduced_jpeg)

    monkeypatch.setattr(core, "preprocess", preprocess)
    noise = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    large = images.encode(Image.fromarray(noise), "PNG")
    small = photos[0].read_bytes()
    assert len(small) <= core.SMALL_UPLOAD_MAX_BYTES < len(large)
    async with running_app(make_settings(decode_threads=1, drain_timeout_s=2)) as served:
        try:
            waiting = [
                asyncio.create_task(served.client.post("/cls", files=upload(large)))
                for _ in range(2)
            ]
            await wait_for(large_decoding.is_set)
            answered = await asyncio.wait_for(
                served.client.post("/cls", files=upload(small)), timeout=5
            )
            assert answered.status_code == 200
            assert not any(response.done() for response in waiting)
        finally:
            release_large.set()
        assert [(await response).status_code for response in waiting] == [200, 200]


async def test_a_decode_that_outlives_its_request_keeps_the_worker_busy(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The memory trimmer runs once the worker is idle; a decode still running for a
    request that got its 504 is work too, whose memory is freed only as it ends."""
    held = HeldDecode(monkeypatch)
    async with running_app(make_settings(request_timeout_ms=300, drain_timeout_s=2)) as served:
        service = served.service
        try:
            response = await served.client.post("/cls", files=upload(photos[0].read_bytes()))
            assert response.status_code == 504
            assert held.started.is_set()
            assert service._idle_for_s() == 0
        finally:
            held.release.set()
        await wait_for(lambda: service._idle_for_s() > 0)


async def test_a_batch_file_whose_decode_is_cancelled_is_503_not_500(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A decode still waiting for its thread is cancelled as the server shuts its pools
    down: that file's entry is a 503, as for a request refused while stopping, not a 500
    with a logged "unexpected error"."""
    held = HeldDecode(monkeypatch)
    async with running_app(make_settings(decode_threads=1, drain_timeout_s=2)) as served:
        data = photos[0].read_bytes()
        body = multipart([("file", f"{i}.jpg", data, "image/jpeg") for i in range(3)])
        answer = asyncio.create_task(
            served.client.post("/cls/batch", content=body, headers=multipart_headers(body))
        )
        try:
            await wait_for(lambda: served.service._threads_working == 3)
            served.service._bulk_decode_pool.shutdown(wait=False, cancel_futures=True)
        finally:
            held.release.set()
        with caplog.at_level(logging.ERROR):
            response = await answer
    assert response.status_code == 200
    # One decode thread for batch files: the file it took first decodes, the two behind it
    # are cancelled (which file that is depends on the order their uploads were handed over).
    assert sorted(entry["status"] for entry in response.json()["results"]) == [200, 503, 503]
    assert "unexpected error" not in caplog.text


async def test_deadline_covers_a_slow_decode(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An image that takes longer to decode than the deadline gets its 504 on time."""
    held = HeldDecode(monkeypatch)
    decoding, finish_decode = held.started, held.release
    # Time enough for the request after it, decode and model, on a busy machine.
    async with running_app(make_settings(request_timeout_ms=1000, drain_timeout_s=2)) as served:
        data = photos[0].read_bytes()
        expired = 'batch_requests_total{outcome="expired"}'
        before = metric_value((await served.client.get("/metrics")).text, expired)
        try:
            started = asyncio.get_running_loop().time()
            response = await served.client.post("/cls", files=upload(data))
            elapsed = asyncio.get_running_loop().time() - started
            assert decoding.is_set()
            assert response.status_code == 504
            assert "REQUEST_TIMEOUT_MS (1000 ms)" in response.json()["detail"]
            assert 0.95 < elapsed < 5
        finally:
            finish_decode.set()
        processor = served.service.processor
        assert processor is not None
        assert processor.queue_depth == 0
        assert metric_value((await served.client.get("/metrics")).text, expired) == before + 1
        # Released: decodes pass again.
        assert (await served.client.post("/cls", files=upload(data))).status_code == 200


async def test_model_failure_is_500_for_that_batch_only(photos: list[Path]) -> None:
    async with running_app(make_settings(drain_timeout_s=2)) as served:
        model = GatedModel(served)
        model.release.set()
        model.fail_next = True
        data = photos[0].read_bytes()
        failed = await served.client.post("/cls", files=upload(data))
        assert failed.status_code == 500
        assert failed.json() == {"detail": "inference failed; the error is logged on the server"}
        assert (await served.client.post("/cls", files=upload(data))).status_code == 200


def assert_same_prediction(batched: httpx.Response, alone: httpx.Response) -> None:
    """The same classes in the same order, and the same scores up to float rounding: a
    batch's convolutions may add up in another order than a lone image's."""
    batched_top, alone_top = (r.json()["prediction"] for r in (batched, alone))
    assert [p["index"] for p in batched_top] == [p["index"] for p in alone_top]
    assert [p["score"] for p in batched_top] == pytest.approx(
        [p["score"] for p in alone_top], abs=1e-5
    )


@pytest.mark.parametrize(
    "error", [RuntimeError, StopIteration, GeneratorExit, SystemExit, KeyboardInterrupt]
)
async def test_an_image_the_model_fails_on_fails_alone_in_its_batch(
    photos: list[Path], error: type[BaseException]
) -> None:
    """One image in a batch makes the model raise: it alone gets the 500, and the photos
    batched with it get the answers they get alone. Even what asyncio treats as control
    flow: a StopIteration (a ``next()`` of an empty iterator), which a future cannot hold,
    or a GeneratorExit, which would read as the batcher's task closing and fail the batch
    whole."""
    async with running_app(make_settings(drain_timeout_s=2, request_timeout_ms=20_000)) as served:
        classifier = served.service.classifier
        assert classifier is not None
        real_classify = classifier.classify

        failed_calls: list[bool] = []

        def fail_on_black(
            pixels: Sequence[np.ndarray], top_k: Sequence[int]
        ) -> list[list[Prediction]]:
            failed_calls.append(any(not crop.any() for crop in pixels))
            if failed_calls[-1]:
                raise error("the model cannot take a black image")
            return real_classify(pixels, top_k)

        classifier.classify = fail_on_black  # type: ignore[method-assign]
        black = images.encode(Image.new("RGB", (64, 64)), "PNG")
        first, second = (p.read_bytes() for p in photos[:2])
        counted = (
            "batch_size_count",
            "batch_size_sum",
            'batch_inference_seconds_count{outcome="ok"}',
            'batch_inference_seconds_count{outcome="failed"}',
        )
        before = (await served.client.get("/metrics")).text
        # The held request, then the same photo, the black image and another photo queued.
        model, responses = await send_while_the_model_is_held(
            served, [first, black, second], queued=3
        )
        assert model.batch_sizes[:2] == [1, 3]
        assert sum(model.batch_sizes) > 4, "the failed batch's halves ran again"
        assert [r.status_code for r in responses] == [200, 200, 500, 200]
        # Every forward pass is in the metrics, the halves run again included; which
        # half the black image lands in depends on the order the three were decoded in.
        after = (await served.client.get("/metrics")).text
        growth = [metric_value(after, s) - metric_value(before, s) for s in counted]
        failed = sum(failed_calls)
        assert failed >= 2, "the batch of 3 and the black image alone"
        assert growth == [
            len(model.batch_sizes),
            sum(model.batch_sizes),
            len(failed_calls) - failed,
            failed,
        ]
        for image, response in ((first, responses[1]), (second, responses[3])):
            alone = await served.client.post("/cls", files=upload(image))
            assert_same_prediction(response, alone)


async def test_an_image_the_model_scores_with_nan_fails_alone_in_its_batch(
    photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A score of NaN or infinity (a float16 overflow, a broken model) has no JSON number:
    that image gets a 500, not a 200 with a null score, and its batch's other images
    their answers, without running again."""
    async with running_app(make_settings(drain_timeout_s=2)) as served:
        classifier = served.service.classifier
        assert classifier is not None
        real_classify = classifier.classify

        def nan_for_black(
            pixels: Sequence[np.ndarray], top_k: Sequence[int]
        ) -> list[list[Prediction]]:
            results = real_classify(pixels, top_k)
            return [
                [
                    Prediction(p.index, p.label, math.nan if not crop.any() else p.score)
                    for p in each
                ]
                for crop, each in zip(pixels, results, strict=True)
            ]

        classifier.classify = nan_for_black  # type: ignore[method-assign]
        black = images.encode(Image.new("RGB", (64, 64)), "PNG")
        first, second = (p.read_bytes() for p in photos[:2])
        with caplog.at_level(logging.INFO, logger=logs.ACCESS_LOGGER):
            model, responses = await send_while_the_model_is_held(
                served, [first, black, second], queued=3
            )
        assert model.batch_sizes == [1, 3], "the images batched with it ran once"
        assert [r.status_code for r in responses] == [200, 200, 500, 200]
        # The model ran it: its access line names the batch it failed in, as a 200's does.
        access = {
            r.request_id: r.batch_size for r in caplog.records if r.name == logs.ACCESS_LOGGER
        }
        assert [access[r.headers["x-request-id"]] for r in responses] == [1, 3, 3, 3]
        assert responses[2].json() == {
            "detail": "inference failed; the error is logged on the server"
        }
        [failure] = [r for r in caplog.records if "NaN or infinity" in r.getMessage()]
        assert failure.getMessage() == (
            "the model scored the image with NaN or infinity (in a batch of 3); it fails"
        )
        assert failure.request_id == responses[2].headers["x-request-id"]
        for image, response in ((first, responses[1]), (second, responses[3])):
            alone = await served.client.post("/cls", files=upload(image))
            assert_same_prediction(response, alone)


async def test_a_model_answering_for_fewer_images_than_its_batch_fails_it_and_it_is_split(
    photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Another model package's bug: a batch answered short is split, and said as it is."""
    async with running_app(make_settings(drain_timeout_s=2)) as served:
        classifier = served.service.classifier
        assert classifier is not None
        real_classify = classifier.classify

        def one_short(pixels: Sequence[np.ndarray], top_k: Sequence[int]) -> list[list[Prediction]]:
            results = real_classify(pixels, top_k)
            return results[:-1] if len(results) > 1 else results

        classifier.classify = one_short  # type: ignore[method-assign]
        data = [p.read_bytes() for p in photos[:2]]
        model, responses = await send_while_the_model_is_held(served, data, queued=3)
        assert [r.status_code for r in responses] == [200] * 4
        assert model.batch_sizes[:2] == [1, 3]
        assert "batch of 3 failed (RuntimeError('the model answered 2 of 3 images'))" in caplog.text
        assert "NaN" not in caplog.text


@pytest.mark.parametrize(
    "error",
    [
        StopIteration,
        SystemExit,
        KeyboardInterrupt,
        GeneratorExit,
        asyncio.CancelledError,
        concurrent.futures.CancelledError,
        TimeoutError,
    ],
)
async def test_a_decode_raising_what_asyncio_treats_as_control_flow_answers_500_at_once(
    served: RunningApp,
    photos: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    error: type[BaseException],
) -> None:
    """A model package's preprocess raising what asyncio treats as control flow: a
    StopIteration, which a future cannot hold (never answered); SystemExit or
    KeyboardInterrupt, which would stop the event loop; a cancellation, which would read as
    the server's (503 "not ready"); a TimeoutError, as the deadline (504). Each is the
    decode's error: a 500 at once for /cls and /tasks, and the server serves on."""
    real_preprocess = core._preprocess

    def preprocess(data: bytes, max_pixels: int, reduced_jpeg: bool = True) -> np.ndarray:
        if data.startswith(b"\x89PNG"):
            raise error("a bug in the model package")
        return real_preprocess(data, max_pixels, reduced_jpeg)

    monkeypatch.setattr(core, "_preprocess", preprocess)
    png = images.encode(images.gradient(64, 48), "PNG")
    async with asyncio.timeout(10):
        answers = [
            await served.client.post("/cls", files=upload(png)),
            await served.client.post("/tasks", files=upload(png)),
            await served.client.post("/cls", files=upload(photos[0].read_bytes())),
        ]
    assert [a.status_code for a in answers] == [500, 500, 200]
    assert answers[0].json() == answers[1].json()
    assert (await served.client.get("/healthz")).status_code == 200


@pytest.mark.parametrize(
    "bad",
    [
        Prediction(1, "\udcff", 0.5),
        Prediction(1, None, 0.5),  # type: ignore[arg-type]
        Prediction("first", "tench", 0.5),  # type: ignore[arg-type]
        Prediction(1, "tench", "high"),  # type: ignore[arg-type]
        None,
    ],
    ids=["a lone surrogate", "no label", "a word for an index", "a word for a score", "None"],
)
async def test_an_answer_that_cannot_be_sent_fails_its_image_alone(
    photos: list[Path], caplog: pytest.LogCaptureFixture, bad: Prediction | None
) -> None:
    """Another model package's answer that the response cannot hold would fail the whole
    /cls/batch request, or be stored as a task's result that every read of its status
    then failed on: that image alone fails, the others of its batch are answered."""
    async with running_app(make_settings(drain_timeout_s=2)) as served:
        classifier = served.service.classifier
        assert classifier is not None
        real_classify = classifier.classify

        def bad_for_black(
            pixels: Sequence[np.ndarray], top_k: Sequence[int]
        ) -> list[list[Prediction]]:
            results = real_classify(pixels, top_k)
            return [
                [bad] if not crop.any() else each  # type: ignore[list-item]
                for crop, each in zip(pixels, results, strict=True)
            ]

        classifier.classify = bad_for_black  # type: ignore[method-assign]
        black = images.encode(Image.new("RGB", (64, 64)), "PNG")
        first, second = (p.read_bytes() for p in photos[:2])
        model, responses = await send_while_the_model_is_held(
            served, [first, black, second], queued=3
        )
        assert model.batch_sizes == [1, 3], "the images batched with it ran once"
        assert [r.status_code for r in responses] == [200, 200, 500, 200]
        [failure] = [r for r in caplog.records if "cannot be sent" in r.getMessage()]
        assert failure.request_id == responses[2].headers["x-request-id"]

        files = [("file", ("a.jpg", first, "image/jpeg")), ("file", ("b.png", black, "image/png"))]
        with caplog.at_level(logging.INFO, logger=logs.ACCESS_LOGGER):
            batch = await served.client.post("/cls/batch", files=files)
        assert batch.status_code == 200, batch.text
        assert [entry["status"] for entry in batch.json()["results"]] == [200, 500]
        [line] = [
            r
            for r in caplog.records
            if r.name == logs.ACCESS_LOGGER and r.request_id == batch.headers["x-request-id"]
        ]
        assert len(line.batch_sizes) == 2, "both files reached the model"

        task = await finished(served.client, (await submit(served.client, black))["task_id"])
        assert task["status"] == "failed"
        assert (await served.client.get(f"/task-status/{task['task_id']}")).status_code == 200


async def test_a_model_answering_with_generators_is_answered_whole(served: RunningApp) -> None:
    """A generator for each image's answer is read once only: checked first and then sent,
    the response would hold no predictions."""
    classifier = served.service.classifier
    assert classifier is not None
    real_classify = classifier.classify

    def generators(pixels: Sequence[np.ndarray], top_k: Sequence[int]) -> list[Any]:
        return [(p for p in each) for each in real_classify(pixels, top_k)]

    classifier.classify = generators  # type: ignore[method-assign]
    png = images.encode(images.gradient(64, 48), "PNG")
    response = await served.client.post("/cls", files=upload(png))
    assert response.status_code == 200, response.text
    assert len(response.json()["prediction"]) == 5


async def test_a_batch_processor_that_stopped_turns_healthz_unhealthy(
    photos: list[Path], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing would be classified again: the orchestrator must restart the process, the
    load balancer stop sending here, and requests get a 503 at once, before their upload is
    decoded, rather than a 504 at their deadline. No more tasks are claimed."""
    async with running_app(make_settings(drain_timeout_s=2)) as served:
        processor = served.service.processor
        tasks = served.service.tasks
        assert processor is not None
        assert tasks is not None

        async def broken() -> list[object]:
            raise RuntimeError("bug in collecting a batch")

        # Called for the batch after the one the loop is collecting now.
        processor._collect_batch = broken  # type: ignore[assignment,method-assign]
        data = photos[0].read_bytes()
        with caplog.at_level(logging.CRITICAL):
            assert (await served.client.post("/cls", files=upload(data))).status_code == 200
            await wait_for(lambda: processor.failure is not None)
        health = await served.client.get("/healthz")
        assert health.status_code == 503
        assert health.json() == {
            "status": "batching stopped",
            "detail": "the worker cannot serve: batching stopped",
        }
        ready = await served.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["detail"] == "the batch processor stopped"
        assert tasks._claiming is False
        decodes: list[int] = []
        real_preprocess = core.preprocess

        def counted(data: bytes, max_pixels: int, reduced_jpeg: bool = True) -> np.ndarray:
            decodes.append(len(data))
            return real_preprocess(data, max_pixels=max_pixels, reduced_jpeg=reduced_jpeg)

        monkeypatch.setattr(core, "preprocess", counted)
        refused = [
            await served.client.post("/cls", files=upload(data)),
            await served.client.post("/cls/batch", files=[("file", ("a.jpg", data))] * 2),
        ]
        for response in refused:
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "1"
            assert response.json()["detail"] == (
                "the batch processor stopped; retry (this worker is to be restarted)"
            )
        assert decodes == []


async def test_a_batch_processor_that_stops_while_the_worker_starts_leaves_it_not_ready(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The batcher starts before the task store opens; one that dies meanwhile must not
    be covered by the worker turning ready at the end of its start."""

    async def broken(self: object) -> list[object]:
        raise RuntimeError("bug in collecting a batch")

    monkeypatch.setattr(BatchProcessor, "_collect_batch", broken)
    with caplog.at_level(logging.CRITICAL):
        async with running_app(make_settings()) as served:
            assert served.service.processor is not None
            assert served.service.processor.failure is not None
            ready = await served.client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["detail"] == "the batch processor stopped"
            assert served.service.tasks is not None
            assert served.service.tasks._claiming is False


class FailingDevice:
    """Stands in for the model on a GPU that fails: each call, the first held until
    ``release``, raises the CUDA error after which the device can run nothing more."""

    def __init__(self, served: RunningApp) -> None:
        classifier = served.service.classifier
        assert classifier is not None
        self.entered, self.release = threading.Event(), threading.Event()
        self.calls: list[int] = []  # the size of each batch that reached the device
        classifier.classify = self.classify  # type: ignore[method-assign]

    def classify(
        self, pixels: Sequence[np.ndarray], top_k: Sequence[int]
    ) -> list[list[Prediction]]:
        self.calls.append(len(pixels))
        self.entered.set()
        self.release.wait(10)
        raise DeviceFailed("cuda:0 failed: CUDA error: an illegal memory access\nhints")


async def test_a_failed_device_turns_the_worker_unhealthy_and_refuses_new_work(
    photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """After a CUDA error that leaves the device unusable, every batch would fail: the
    batch that met it and the requests queued get a 503 to retry elsewhere (a /cls/batch
    too, as a whole), without touching the device again; queued tasks go back to the
    store; the worker fails its probes (so it is replaced) and claims no more tasks."""
    async with running_app(make_settings(drain_timeout_s=2)) as served:
        tasks = served.service.tasks
        processor = served.service.processor
        assert tasks is not None
        assert processor is not None
        device = FailingDevice(served)
        data = photos[0].read_bytes()
        first = asyncio.create_task(served.client.post("/cls", files=upload(data)))
        await asyncio.to_thread(device.entered.wait, 10)
        queued = [
            asyncio.create_task(served.client.post("/cls", files=upload(data))) for _ in range(3)
        ]
        batch = asyncio.create_task(
            served.client.post("/cls/batch", files=[("file", ("a.jpg", data))] * 2)
        )
        task = await served.client.post("/tasks", files=upload(data))
        assert task.status_code == 202
        # Three requests, the batch's two files and the task.
        await wait_for(lambda: processor.queue_depth == 6)
        with caplog.at_level(logging.CRITICAL):
            device.release.set()
            responses = await asyncio.gather(first, *queued, batch)
        assert device.calls == [1]
        for response in responses:
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "1"
            assert response.json()["detail"] == (
                "the model's device failed; retry (this worker is to be restarted)"
            )
        assert "cuda:0 failed: CUDA error: an illegal memory access; this worker takes no " in (
            caplog.text
        )
        task_id = task.json()["task_id"]
        await wait_for(lambda: tasks._claiming is False)

        async def requeued() -> bool:
            status = await served.client.get(f"/task-status/{task_id}")
            return bool(status.json()["status"] == "queued")

        deadline = asyncio.get_running_loop().time() + 10
        while not await requeued():
            assert asyncio.get_running_loop().time() < deadline, "the task was not requeued"
            await asyncio.sleep(0.05)
        health = await served.client.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "device failed"
        ready = await served.client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["detail"] == (
            "the model's device failed: cuda:0 failed: CUDA error: an illegal memory access"
        )
        refused = await served.client.post("/cls", files=upload(data))
        assert refused.status_code == 503
        assert device.calls == [1]


async def test_a_task_queued_behind_a_failed_device_is_charged_no_attempt(
    photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A task's attempts count the runs that may have killed a worker; one that waited in
    the queue while the device failed never ran, and with one attempt allowed it must still
    go back to the store rather than be failed as interrupted."""
    settings = make_settings(drain_timeout_s=2, task_max_attempts=1)
    async with running_app(settings) as served:
        processor = served.service.processor
        assert processor is not None
        device = FailingDevice(served)
        data = photos[0].read_bytes()
        first = asyncio.create_task(served.client.post("/cls", files=upload(data)))
        await asyncio.to_thread(device.entered.wait, 10)
        task_id = (await submit(served.client, data))["task_id"]
        await wait_for(lambda: processor.queue_depth == 1)
        with caplog.at_level(logging.CRITICAL):
            device.release.set()
            assert (await first).status_code == 503
        query = "SELECT status, attempts FROM tasks WHERE id = ?"
        with contextlib.closing(sqlite3.connect(settings.data_dir / DATABASE_NAME)) as store:

            def stored() -> tuple[str, int]:
                row: tuple[str, int] = store.execute(query, (task_id,)).fetchone()
                return row

            await wait_for(lambda: stored()[0] != "running")
            assert stored() == ("queued", 0)


class TightMemory:
    """Stands in for the model at its memory limit: a batch of more than ``fits`` images
    raises ``OutOfMemory`` as torch's allocator would, smaller ones run on the real model.
    With ``held``, the first call waits for ``release``."""

    def __init__(self, served: RunningApp, fits: int, *, held: bool = False) -> None:
        classifier = served.service.classifier
        assert classifier is not None
        self.real = classifier.classify
        self.fits = fits
        self.calls: list[int] = []  # the size of each batch that reached the model
        self.entered, self.release = threading.Event(), threading.Event()
        if not held:
            self.release.set()
        classifier.classify = self.classify  # type: ignore[method-assign]

    def classify(
        self, pixels: Sequence[np.ndarray], top_k: Sequence[int]
    ) -> list[list[Prediction]]:
        self.calls.append(len(pixels))
        self.entered.set()
        self.release.wait(10)
        if len(pixels) > self.fits:
            raise OutOfMemory(
                f"cpu ran out of memory for a batch of {len(pixels)}: DefaultCPUAllocator: "
                "can't allocate memory"
            )
        return self.real(pixels, top_k)


NO_MEMORY = "the server had no memory for the request for now; retry"
TASK_NO_MEMORY = "the server had no memory for the task's image; submit it again later"


async def test_a_worker_that_can_start_no_more_threads_still_serves_every_route(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At a limit of threads or memory reached after start-up, no decode pool is left
    without its threads: each is started as the worker starts, where one started on first
    use would refuse every /cls/batch or task for good while the worker looked healthy."""
    settings = make_settings(task_poll_interval_s=0.05)
    async with running_app(settings) as served:

        def no_thread(self: threading.Thread) -> None:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(threading.Thread, "start", no_thread)
        try:
            data = [path.read_bytes() for path in photos[:2]]
            batch = await served.client.post(
                "/cls/batch", files=[("file", ("a.jpg", each)) for each in data]
            )
            assert batch.status_code == 200, batch.text
            assert [entry["status"] for entry in batch.json()["results"]] == [200, 200]
            # Over SMALL_IMAGE_MAX_PIXELS (the large-image threads), under the 1 MiB past
            # which an upload is spooled to disk on a thread that Starlette starts on demand.
            large = io.BytesIO()
            Image.open(photos[0]).convert("RGB").resize((1000, 800)).save(large, "JPEG")
            assert len(large.getvalue()) < 2**20
            answer = await served.client.post("/cls", files=upload(large.getvalue()))
            assert answer.status_code == 200, answer.text
            task_id = (await submit(served.client, data[0]))["task_id"]
            record = await finished(served.client, task_id)
            assert record["status"] == "succeeded", record
        finally:
            monkeypatch.undo()


def test_the_deadline_counts_from_the_end_of_the_upload_where_the_protocol_says() -> None:
    """As REQUEST_TIMEOUT_MS is documented: from the upload's last byte, which the HTTP
    protocol notes; a handler a busy event loop reached late would otherwise give its
    request that much more time, and its 504 would come that much late. Without the note
    (an in-process transport), from now."""
    service = core.Service(make_settings(request_timeout_ms=10_000))
    ended_at = time.monotonic() - 4.0
    noted = Request({"type": "http", "headers": [], "state": {UPLOAD_END_STATE: ended_at}})
    assert main._deadline(noted, service) == pytest.approx(ended_at + 10.0)
    before = time.monotonic()
    unnoted = main._deadline(Request({"type": "http", "headers": []}), service)
    assert before + 10.0 <= unnoted <= time.monotonic() + 10.0
    # A request's own time limit counts from the same point, where it is the shorter.
    assert main._deadline(noted, service, "2500") == pytest.approx(ended_at + 2.5)
    assert main._deadline(noted, service, "12.5") == pytest.approx(ended_at + 0.0125)
    assert main._deadline(noted, service, "12.5000 ") == pytest.approx(ended_at + 0.0125)
    assert main._deadline(noted, service, "60000") == pytest.approx(ended_at + 10.0)


async def test_a_start_that_fails_by_a_bug_outside_gunicorn_raises_with_its_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under uvicorn, or in a test, the error is raised for what runs the app to show: a
    worker's exit to be restarted is gunicorn's, and in a test it would end the run
    silently."""

    async def bug(self: core.Service) -> None:
        raise RuntimeError("a bug in the start-up")

    monkeypatch.setattr(core.Service, "start", bug)
    app = main.create_app(make_settings())
    with pytest.raises(RuntimeError, match="a bug in the start-up"):
        async with app.router.lifespan_context(app):
            pass


def test_a_worker_that_cannot_start_its_decode_threads_stops_with_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    started = threading.Thread.start
    pools_started: list[str] = []

    def limited(self: threading.Thread) -> None:
        if self.name.startswith("decode-bulk"):
            raise RuntimeError("can't start new thread")
        pools_started.append(self.name)
        started(self)

    async def start() -> None:
        service = core.Service(make_settings())
        monkeypatch.setattr(threading.Thread, "start", limited)
        try:
            with pytest.raises(errors.ThreadsUnavailable) as refused:
                await service._start_decode_threads()
        finally:
            monkeypatch.undo()
            await service.stop()
        assert str(refused.value) == (
            "the worker's decode threads could not be started (can't start new thread); "
            "raise the limit on threads or memory (ulimit -u, -v, a container's pids.max)"
        )

    asyncio.run(start())


async def test_a_batch_out_of_memory_is_split_and_every_request_answered(
    photos: list[Path],
) -> None:
    """A batch the model has no memory for is no request's fault: its halves run, and fit."""
    async with running_app(make_settings()) as served:
        processor = served.service.processor
        assert processor is not None
        model = TightMemory(served, fits=2, held=True)
        out_of_memory = "model_out_of_memory_total"
        before = metric_value((await served.client.get("/metrics")).text, out_of_memory)
        data = [path.read_bytes() for path in photos]
        first = asyncio.create_task(served.client.post("/cls", files=upload(data[0])))
        await asyncio.to_thread(model.entered.wait, 10)
        queued = [
            asyncio.create_task(served.client.post("/cls", files=upload(data[i % len(data)])))
            for i in range(4)
        ]
        await wait_for(lambda: processor.queue_depth == 4)
        model.release.set()
        responses = await asyncio.gather(first, *queued)
        assert [response.status_code for response in responses] == [200] * 5
        assert model.calls == [1, 4, 2, 2]
        assert (await served.client.get("/healthz")).json() == {"status": "ok"}
        after = metric_value((await served.client.get("/metrics")).text, out_of_memory)
        assert after - before == 1  # the batch of 4; its halves fitted


async def test_a_lone_image_the_model_has_no_memory_for_is_a_503_to_retry(
    photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Not a 500 ("inference failed"), as though the image were at fault: the worker is at
    its memory limit, and the same request may pass later, or on another worker."""
    async with running_app(make_settings()) as served:
        model = TightMemory(served, fits=0)
        data = photos[0].read_bytes()
        with caplog.at_level(logging.ERROR):
            refused = await served.client.post("/cls", files=upload(data))
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json() == {"detail": NO_MEMORY}
        assert "no memory for a request: cpu ran out of memory for a batch of 1" in caplog.text
        assert "inference failed" not in caplog.text
        batch = await served.client.post("/cls/batch", files=[("file", ("a.jpg", data))] * 3)
        assert batch.status_code == 503, batch.text
        assert batch.headers["retry-after"] == "1"
        assert batch.json() == {"detail": NO_MEMORY}
        model.fits = 16
        assert (await served.client.post("/cls", files=upload(data))).status_code == 200
        assert (await served.client.get("/healthz")).json() == {"status": "ok"}


async def test_a_model_that_stays_out_of_memory_has_its_worker_replaced(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Lone images failing for memory, again and again with nothing run between, mean the
    worker's memory will not come back (a leak, a fragmented heap): it fails liveness, so
    it is replaced, rather than answer 503 for ever. A batch that runs between failures
    starts the count again, and so does a short spell of them."""
    monkeypatch.setattr(core, "OUT_OF_MEMORY_PERSISTS_S", 1.5)
    async with running_app(make_settings(drain_timeout_s=1)) as served:
        model = TightMemory(served, fits=0)
        data = photos[0].read_bytes()

        async def status() -> int:
            return (await served.client.post("/cls", files=upload(data))).status_code

        assert [await status() for _ in range(2)] == [503, 503]
        model.fits = 1
        assert await status() == 200
        model.fits = 0
        assert [await status() for _ in range(4)] == [503] * 4  # within 1.5 s
        assert (await served.client.get("/healthz")).json() == {"status": "ok"}
        await asyncio.sleep(1.5)
        with caplog.at_level(logging.CRITICAL):
            assert await status() == 503
        health = await served.client.get("/healthz")
        assert health.status_code == 503
        assert health.json()["status"] == "out of memory"
        ready = (await served.client.get("/readyz")).json()
        assert re.fullmatch(
            r"the model runs out of memory: cpu ran out of memory for a batch of 1: "
            r"DefaultCPUAllocator: can't allocate memory \(the model has run out of memory on "
            r"5 images in a row, each alone, for \d+\.\d s\)",
            ready["detail"],
        ), ready
        assert "this worker takes no more work until it is restarted" in caplog.text
        calls = len(model.calls)
        refused = await served.client.post("/cls", files=upload(data))
        assert refused.status_code == 503
        assert refused.json()["detail"] == (
            "the model runs out of memory; retry (this worker is to be restarted)"
        )
        assert len(model.calls) == calls  # refused before the model


def stored_task(settings: Settings, task_id: str) -> tuple[str, int]:
    with contextlib.closing(sqlite3.connect(settings.data_dir / DATABASE_NAME)) as store:
        row: tuple[str, int] = store.execute(
            "SELECT status, attempts FROM tasks WHERE id = ?", (task_id,)
        ).fetchone()
        return row


async def test_a_task_the_model_had_no_memory_for_is_run_again_after_a_pause(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A task is not failed for the worker's memory: it goes back to the queue, charged the
    attempt, after a pause that gives the memory time to come back (an immediate retry
    would spend its attempts within milliseconds), and runs again."""
    monkeypatch.setattr(core, "OUT_OF_MEMORY_RETRY_PAUSE_S", 0.3)
    settings = make_settings(task_poll_interval_s=0.05)
    async with running_app(settings) as served:
        model = TightMemory(served, fits=0)
        with caplog.at_level(logging.WARNING):
            task_id = (await submit(served.client, photos[0].read_bytes()))["task_id"]
            await wait_for(lambda: len(model.calls) == 1)
            failed_at = time.monotonic()
            model.fits = 16
            record = await finished(served.client, task_id)
        assert time.monotonic() - failed_at >= 0.3
        assert record["status"] == "succeeded", record
        assert len(record["prediction"]) == 5
        assert model.calls == [1, 1]
        assert stored_task(settings, task_id) == ("succeeded", 2)
        assert (
            f"task {task_id}: cpu ran out of memory for a batch of 1: DefaultCPUAllocator: can't "
            "allocate memory; it goes back to the queue in 0.3 s (attempt 1 of 3)"
        ) in caplog.text


async def test_a_task_with_no_memory_to_decode_is_charged_and_run_again_after_a_pause(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """As for the model's memory; the attempt is charged though the image never reached the
    model, so that one this worker can never decode fails in the end, not retried for
    ever."""
    monkeypatch.setattr(core, "OUT_OF_MEMORY_RETRY_PAUSE_S", 0.2)
    decoded = core._preprocess
    calls: list[float] = []

    def no_memory_at_first(*args: Any) -> np.ndarray:
        calls.append(time.monotonic())
        if len(calls) == 2:  # the first run's, after the submission's check
            raise MemoryError
        return decoded(*args)

    monkeypatch.setattr(core, "_preprocess", no_memory_at_first)
    settings = make_settings(task_poll_interval_s=0.05)
    async with running_app(settings) as served:
        with caplog.at_level(logging.WARNING):
            task_id = (await submit(served.client, photos[0].read_bytes()))["task_id"]
            record = await finished(served.client, task_id)
        assert record["status"] == "succeeded", record
        assert len(calls) == 3  # the submission's check, then the two runs
        assert calls[2] - calls[1] >= 0.2
        assert stored_task(settings, task_id) == ("succeeded", 2)
        assert (
            f"task {task_id}: MemoryError; it goes back to the queue in 0.2 s (attempt 1 of 3)"
        ) in caplog.text


@pytest.mark.parametrize("count_lost", [False, True], ids=["counted", "count lost"])
async def test_a_task_the_model_never_has_memory_for_fails_on_its_last_attempt(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch, count_lost: bool
) -> None:
    """Also where the attempts charged as the task enters the model fail to land (a store
    failing for now): the requeue charges them, so the task still fails on its last
    attempt."""
    monkeypatch.setattr(core, "OUT_OF_MEMORY_RETRY_PAUSE_S", 0.05)
    settings = make_settings(task_poll_interval_s=0.05, task_max_attempts=2)
    async with running_app(settings) as served:
        runner = served.service.tasks
        assert runner is not None
        if count_lost:

            def lost(*args: object) -> None:
                raise TaskStoreFailed("the disk is full")

            monkeypatch.setattr(runner.store, "count_attempts", lost)
        model = TightMemory(served, fits=0)
        task_id = (await submit(served.client, photos[0].read_bytes()))["task_id"]
        record = await finished(served.client, task_id)
        assert record["status"] == "failed", record
        assert record["error"] == f"{TASK_NO_MEMORY} (attempt 2 of 2)"
        assert model.calls == [1, 1]
        # Lost, the last attempt's count is never charged: the task fails without a requeue.
        assert stored_task(settings, task_id) == ("failed", 1 if count_lost else 2)


async def test_a_batch_refused_whole_as_its_worker_fails_says_so(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some files found no memory, and the worker then failed for it, refusing the rest:
    the answer says the worker is to be restarted (retry elsewhere), not just "no memory"."""
    monkeypatch.setattr(core, "OUT_OF_MEMORY_PERSISTS_S", 0.0)
    async with running_app(make_settings(drain_timeout_s=1)) as served:
        TightMemory(served, fits=0)
        data = photos[0].read_bytes()
        batch = await served.client.post("/cls/batch", files=[("file", ("a.jpg", data))] * 5)
        assert batch.status_code == 503, batch.text
        assert batch.json() == {
            "detail": "the model runs out of memory; retry (this worker is to be restarted)"
        }


async def test_a_task_waiting_to_be_retried_goes_back_at_once_when_its_worker_stops_claiming(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker about to be replaced (or stopping) does not sit on a task through its
    pause: the task goes back to the queue for the other workers."""
    monkeypatch.setattr(core, "OUT_OF_MEMORY_RETRY_PAUSE_S", 60.0)
    settings = make_settings(task_poll_interval_s=0.05)
    async with running_app(settings) as served:
        runner = served.service.tasks
        assert runner is not None
        model = TightMemory(served, fits=0)
        task_id = (await submit(served.client, photos[0].read_bytes()))["task_id"]
        await wait_for(lambda: len(model.calls) == 1)
        # Its failed attempt is stored, and it stays claimed for the pause.
        await wait_for(lambda: stored_task(settings, task_id) == ("running", 1), timeout_s=5)
        await asyncio.sleep(0.2)
        assert stored_task(settings, task_id) == ("running", 1)
        runner.stop_claiming()
        await wait_for(lambda: stored_task(settings, task_id) == ("queued", 1), timeout_s=2)
        assert model.calls == [1]


async def test_stuck_model_turns_healthz_unhealthy_and_readyz_not_ready(
    photos: list[Path],
) -> None:
    """A load balancer stops sending requests that could only wait behind the stuck batch,
    until the orchestrator restarts the worker or the batch ends."""
    settings = make_settings(stall_timeout_s=0.2, request_timeout_ms=10_000, drain_timeout_s=1)
    async with running_app(settings) as served:
        model = GatedModel(served)
        request = asyncio.create_task(
            served.client.post("/cls", files=upload(photos[0].read_bytes()))
        )
        try:
            await asyncio.to_thread(model.entered.wait, 10)
            await asyncio.sleep(0.3)
            assert (await served.client.get("/healthz")).status_code == 503
            ready = await served.client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json() == {
                "status": "not ready",
                "detail": "a batch has run for more than STALL_TIMEOUT_S=0.2 s",
            }
        finally:
            model.release.set()
        assert (await request).status_code == 200
        assert (await served.client.get("/healthz")).json() == {"status": "ok"}
        assert (await served.client.get("/readyz")).json() == {"status": "ready"}


async def test_a_draining_server_is_not_ready_but_serves_until_it_stops(
    served: RunningApp, photos: list[Path]
) -> None:
    """Requests reach the app during the drain only on connections the server accepted
    before its shutdown began: a proxy has already sent them here, so they are served.
    /readyz turns 503 at once; requests are refused only once the app has stopped."""
    assert (await served.client.get("/readyz")).status_code == 200
    data = photos[0].read_bytes()
    served.service.begin_shutdown()  # as the server's shutdown begins: draining
    ready = await served.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.headers["retry-after"] == "1"
    assert ready.json() == {"status": "not ready", "detail": "the server is shutting down"}
    assert (await served.client.post("/cls", files=upload(data))).status_code == 200
    assert (await served.client.post("/tasks", files=upload(data))).status_code == 202
    assert (await served.client.get("/healthz")).status_code == 200

    await served.service.stop()
    assert (await served.client.get("/readyz")).status_code == 503
    twice = [("file", ("a.jpg", data, "image/jpeg"))] * 2
    for path, files, fields in (
        ("/cls", upload(data), None),
        ("/cls/batch", twice, None),  # whole: a 200 of refused entries looks like success
        ("/tasks", upload(data), None),
        # Before the callback's host is looked up, on threads that have stopped.
        ("/tasks", upload(data), {"callback_url": "http://93.184.216.34/"}),
    ):
        refused = await served.client.post(path, files=files, data=fields)
        assert refused.status_code == 503, (path, refused.text)
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["detail"] == "the server is shutting down; retry"
    assert (await served.client.get(f"/task-status/{uuid.UUID(int=0)}")).status_code == 503
    assert (await served.client.get("/healthz")).status_code == 200


async def test_task_submissions_under_way_as_the_server_stops_get_503(
    served: RunningApp, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One submission decoding and one waiting for the decode thread as ``stop`` runs: the
    first finds the task store closed, the second its decode dropped. Both are told to
    retry, not answered 500."""
    data = photos[0].read_bytes()
    held = HeldDecode(monkeypatch)
    decoding = asyncio.ensure_future(served.client.post("/tasks", files=upload(data)))
    await asyncio.to_thread(held.started.wait, 10)
    waiting = asyncio.ensure_future(served.client.post("/tasks", files=upload(data)))
    await wait_for(lambda: served.service._threads_working == 2)
    await served.service.stop()
    held.release.set()
    for response in (await decoding, await waiting):
        assert response.status_code == 503, response.text
        assert response.json()["detail"] == "the server is shutting down; retry"
    assert held.calls == 1


async def test_a_cancellation_that_is_not_the_requests_own_is_a_logged_500(
    served: RunningApp, photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Only the server's cancellation of a request (its drain time is up) is answered as a
    shutdown: a future cancelled under a handler is a bug, logged with its traceback."""

    async def cancelled_under_it(*args: object) -> None:
        future = asyncio.get_running_loop().create_future()
        future.cancel()
        await future

    served.service.classify = cancelled_under_it  # type: ignore[method-assign]
    response = await served.client.post("/cls", files=upload(photos[0].read_bytes()))
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert "a cancellation escaped the request's handler" in caplog.text
    assert (await served.client.get("/healthz")).status_code == 200


async def test_the_drain_counts_from_the_servers_shutdown_not_the_apps(
    photos: list[Path],
) -> None:
    """The server waits for open requests (up to DRAIN_TIMEOUT_S) before the app's shutdown:
    what it waited is taken from the drain, so the two together stay within one drain time
    and gunicorn's graceful_timeout. Readiness turns 503 as the server's shutdown begins."""
    app = running_app(make_settings(drain_timeout_s=2))
    served = await app.__aenter__()
    model = GatedModel(served)
    data = photos[0].read_bytes()
    running = asyncio.create_task(served.client.post("/cls", files=upload(data)))
    await asyncio.to_thread(model.entered.wait, 10)
    queued = asyncio.create_task(served.client.post("/cls", files=upload(data)))
    processor = served.service.processor
    assert processor is not None
    await wait_for(lambda: processor.queue_depth == 1)
    served.service.begin_shutdown()
    served.service.begin_shutdown()  # once per open connection: only the first counts
    assert (await served.client.get("/readyz")).status_code == 503
    await asyncio.sleep(2.0)  # the server's wait for open requests used the drain time
    try:
        started = time.monotonic()
        await asyncio.wait_for(served.service.stop(), 10)
        stopped_in_s = time.monotonic() - started
    finally:
        model.release.set()
        await app.__aexit__(None, None, None)
    assert stopped_in_s < 1.5  # not another DRAIN_TIMEOUT_S
    assert (await queued).status_code == 503
    await running


async def test_what_the_batcher_holds_when_the_drain_time_is_up_is_stopped_not_cancelled(
    photos: list[Path],
) -> None:
    """Once DRAIN_TIMEOUT_S is up the batcher stops itself: a running and a queued request
    get the 503 of a stopped server and count as stopped. The server's cancellation of what
    is still open comes later, so they are not cut off by it and counted as clients gone."""
    async with running_app(make_settings(drain_timeout_s=0.5)) as served:
        model = GatedModel(served)
        data = photos[0].read_bytes()
        processor = served.service.processor
        assert processor is not None
        before = (await served.client.get("/metrics")).text
        try:
            running = asyncio.create_task(served.client.post("/cls", files=upload(data)))
            await asyncio.to_thread(model.entered.wait, 10)
            queued = asyncio.create_task(served.client.post("/cls", files=upload(data)))
            queued_batch = asyncio.create_task(
                served.client.post("/cls/batch", files=[("file", ("a.jpg", data))] * 2)
            )
            await wait_for(lambda: processor.queue_depth == 3)
            served.service.begin_shutdown()
            started = time.monotonic()
            responses = await asyncio.wait_for(asyncio.gather(running, queued, queued_batch), 10)
            answered_in_s = time.monotonic() - started
            late = await served.client.post("/cls/batch", files=[("file", ("a.jpg", data))])
        finally:
            model.release.set()
        # /cls/batch too: refused whole, where a 200 of refused entries looks like success.
        assert [r.status_code for r in responses] == [503, 503, 503]
        for response in responses:
            assert response.json()["detail"] == "the server is shutting down; retry"
            assert response.headers["retry-after"] == "1"
        assert 0.4 < answered_in_s < 5
        assert late.status_code == 503  # refused whole once the drain is over
        after = (await served.client.get("/metrics")).text
        growth = {
            outcome: metric_value(after, f'batch_requests_total{{outcome="{outcome}"}}')
            - metric_value(before, f'batch_requests_total{{outcome="{outcome}"}}')
            for outcome in ("stopped", "cancelled")
        }
        assert growth == {"stopped": 4, "cancelled": 0}


async def test_request_ids_are_echoed_or_generated(served: RunningApp) -> None:
    echoed = await served.client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    generated = await served.client.get("/healthz")
    assert len(generated.headers["x-request-id"]) == 32
    for unsafe_id in ("a b\tc", "-", "..", "x" * 129):
        unsafe = await served.client.get("/healthz", headers={"X-Request-ID": unsafe_id})
        assert len(unsafe.headers["x-request-id"]) == 32, unsafe_id


async def test_server_errors_are_logged_with_the_request_id(
    photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    async with running_app(make_settings(drain_timeout_s=2)) as served:
        model = GatedModel(served)
        model.release.set()
        model.fail_next = True
        with caplog.at_level(logging.WARNING):
            failed = await served.client.post(
                "/cls", files=upload(photos[0].read_bytes()), headers={"X-Request-ID": "trace-77"}
            )
    assert failed.status_code == 500
    lines = [r for r in caplog.records if getattr(r, "request_id", None) == "trace-77"]
    assert any("answered 500" in r.getMessage() for r in lines)
    # The model's traceback too, though the batch processor's task logs it.
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert [(r.getMessage(), getattr(r, "request_id", None)) for r in tracebacks] == [
        ("batch of 1 failed", "trace-77")
    ]


async def test_a_full_temporary_directory_is_the_servers_503_not_the_clients_400(
    served: RunningApp, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An upload's part that cannot be spooled to disk is no fault of the request: 503 with
    Retry-After and the reason, and an ERROR line naming the directory for the operator."""
    data = noise_png(800)
    assert len(data) > 1024 * 1024  # past what the parser keeps in memory

    async def disk_full(self: object, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(StarletteUploadFile, "write", disk_full)
    with caplog.at_level(logging.ERROR, logger="main"):
        refused = [
            await served.client.post("/cls", files=upload(data)),
            await served.client.post("/cls/batch", files=[("file", ("a.png", data))]),
            await served.client.post("/tasks", files=upload(data)),
        ]
    for response in refused:
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "1"
        assert response.json()["detail"] == (
            "the server could not store the upload for now (No space left on device); retry"
        )
    logged = [r.getMessage() for r in caplog.records if "temporary directory" in r.getMessage()]
    assert len(logged) == 3
    assert tempfile.gettempdir() in logged[0]
    monkeypatch.undo()
    assert (await served.client.post("/cls", files=upload(data))).status_code == 200


@pytest.mark.parametrize("error", [RuntimeError("can't start new thread"), MemoryError()])
async def test_an_upload_the_server_has_no_thread_or_memory_to_read_is_its_503(
    error: BaseException,
    served: RunningApp,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A large part is spooled on a worker thread: at a limit of threads (ulimit -u, a
    container's pids.max) or of memory, that fails, which FastAPI answers as the client's
    400. It is the server's 503, with an ERROR line."""
    data = noise_png(800)

    async def fails(self: object, data: bytes) -> None:
        raise error

    monkeypatch.setattr(StarletteUploadFile, "write", fails)
    with caplog.at_level(logging.ERROR, logger="main"):
        refused = await served.client.post("/cls", files=upload(data))
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.json() == {"detail": "the server could not read the upload for now; retry"}
    assert f"an upload could not be read: {type(error).__name__}" in caplog.text
    monkeypatch.undo()
    assert (await served.client.post("/cls", files=upload(data))).status_code == 200


async def test_no_memory_to_decode_an_upload_is_the_servers_503(
    served: RunningApp,
    photos: list[Path],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At the worker's memory limit a good image gets a 503 to retry, with an ERROR line,
    not a 400 ("corrupt") or a 500; a /cls/batch whose every file found no memory too,
    whole (a 200 of refused entries would look like success)."""

    def no_memory(*args: object) -> None:
        raise MemoryError

    monkeypatch.setattr(core, "_preprocess", no_memory)
    data = photos[0].read_bytes()
    with caplog.at_level(logging.ERROR):
        refused = await served.client.post("/cls", files=upload(data))
        batch = await served.client.post("/cls/batch", files=[("file", ("a.jpg", data))])
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.json() == {"detail": "the server had no memory for the request for now; retry"}
    assert batch.status_code == 503, batch.text
    assert batch.headers["retry-after"] == "1"
    assert batch.json() == refused.json()
    assert "no memory for a request" in caplog.text
    monkeypatch.undo()
    assert (await served.client.post("/cls", files=upload(data))).status_code == 200


async def test_another_error_reading_the_upload_stays_the_parsers_400(
    served: RunningApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a thread that could not start, or memory, is the server's 503 to retry."""

    async def fails(self: object, data: bytes) -> None:
        raise RuntimeError("Stream consumed")

    monkeypatch.setattr(StarletteUploadFile, "write", fails)
    data = noise_png(800)
    refused = await served.client.post("/cls", files=upload(data))
    assert refused.status_code == 400, refused.text


async def test_a_decode_thread_that_cannot_start_is_the_servers_503(
    served: RunningApp,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """At a limit of threads, a pool that must start one to decode fails: a 503 that says
    so and an ERROR line, not the 503 of a model that is not ready. The pool keeps the
    refused decode queued: the thread it starts next does not run it ahead of the next
    request."""
    service = served.service
    pools = [ThreadPoolExecutor(1, thread_name_prefix="no-thread-yet") for _ in range(3)]
    names = ("_decode_pool", "_large_decode_pool", "_bulk_decode_pool")
    for name, pool in zip(names, pools, strict=True):
        monkeypatch.setattr(service, name, pool)
    real_start = threading.Thread.start
    threads_start = True

    def start(thread: threading.Thread) -> None:
        if not threads_start and thread.name.startswith("no-thread-yet"):
            raise RuntimeError("can't start new thread")
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", start)
    decodes: list[object] = []
    real_decode = core._read_and_preprocess

    def counted_decode(*args: Any) -> Any:
        decodes.append(args)
        return real_decode(*args)

    monkeypatch.setattr(core, "_read_and_preprocess", counted_decode)
    # Over 128 KiB: not decoded on the model's thread, as a small one finding it idle is.
    data = noise_png(300)
    assert len(data) > 128 * 1024
    try:
        threads_start = False
        with caplog.at_level(logging.ERROR, logger="main"):
            refused = await served.client.post("/cls", files=upload(data))
            entries = await served.client.post("/cls/batch", files=[("file", ("a.jpg", data))])
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json() == {"detail": "the server could not start a thread for now; retry"}
        assert entries.status_code == 503, entries.text
        assert "a thread could not be started (at a limit of the worker's threads" in caplog.text
        assert "): can't start new thread" in caplog.text
        assert (await served.client.get("/readyz")).status_code == 200
        threads_start = True
        assert (await served.client.post("/cls", files=upload(data))).status_code == 200
        assert len(decodes) == 1, "the refused request's decode ran"
    finally:
        for pool in pools:
            pool.shutdown()


async def test_an_unexpected_error_is_a_generic_500_with_its_request_id(
    served: RunningApp,
    photos: list[Path],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A bug's 500 says nothing of it; the answer and the traceback's log line carry the
    request's id, so a caller's report leads to the traceback."""

    def fail() -> int:
        raise RuntimeError("bug at /srv/secret/path.py")

    monkeypatch.setattr(served.service, "num_classes", fail)
    # The client raises what the app raises: nothing reaches the server, which would log
    # the traceback a second time, without the request's id.
    with caplog.at_level(logging.ERROR):
        response = await served.client.post(
            "/cls", files=upload(photos[0].read_bytes()), headers={"X-Request-ID": "trace-88"}
        )
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert response.headers["X-Request-ID"] == "trace-88"
    tracebacks = [r for r in caplog.records if r.exc_info is not None]
    assert [getattr(r, "request_id", None) for r in tracebacks] == ["trace-88"]


async def test_a_worker_reports_its_memory_while_its_model_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Another worker's /metrics shows this one from its start: a resident size of 0 would
    read as a worker with no memory, on the dashboard and to any alert on it."""
    loading, loaded = threading.Event(), threading.Event()
    real_load = core.load_classifier

    def slow_load(**options: Any) -> object:
        loading.set()
        loaded.wait(30)
        return real_load(**options)

    monkeypatch.setattr(core, "load_classifier", slow_load)
    metrics.WORKER_RESIDENT.set(0)
    service = core.Service(make_settings(data_dir=tmp_path))
    starting = asyncio.create_task(service.start())
    try:
        assert await asyncio.to_thread(loading.wait, 30)
        resident = REGISTRY.get_sample_value("worker_resident_memory_bytes")
        assert (resident or 0) > 50 * 2**20
    finally:
        loaded.set()
        await starting
        await service.stop()


async def test_a_worker_with_its_model_on_a_gpu_runs_one_torch_thread(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Set before the model loads, for the device DEVICE resolves to (here ``auto``, taken
    for a GPU): threads idle beside a GPU's forward would spin for a core each."""
    real_load = core.load_classifier
    loaded_with: dict[str, object] = {}

    def load_as_on_a_gpu(**options: Any) -> object:
        loaded_with.update(device=options["device"], threads=torch.get_num_threads())
        return real_load(**(options | {"device": "cpu"}))

    monkeypatch.setattr(core, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.setattr(core, "load_classifier", load_as_on_a_gpu)
    threads = torch.get_num_threads()
    service = core.Service(make_settings(data_dir=tmp_path, device="auto", torch_threads=None))
    try:
        await service.start()
        assert loaded_with == {"device": "cuda", "threads": 1}
    finally:
        await service.stop()
        torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("under_gunicorn", "uvicorn_workers", "threads_each"),
    [(True, 1, 2), (False, 1, 4), (False, 4, 1)],
    ids=["gunicorn", "uvicorn", "uvicorn-workers-4"],
)
async def test_workers_share_the_cores_only_under_gunicorn(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    under_gunicorn: bool,
    uvicorn_workers: int,
    threads_each: int,
) -> None:
    """WORKERS (2 here) is gunicorn's setting: under uvicorn (make dev) it divides nothing,
    but the workers of uvicorn --workers share the cores."""
    monkeypatch.setattr(service.settings, "available_cores", lambda: 4)
    monkeypatch.setattr(main, "uvicorn_workers", lambda: uvicorn_workers)
    real_load = core.load_classifier
    threads_at_load: list[int] = []

    def load_counting_threads(**options: Any) -> object:
        threads_at_load.append(torch.get_num_threads())
        return real_load(**options)

    monkeypatch.setattr(core, "load_classifier", load_counting_threads)
    siblings = Siblings(tmp_path / "siblings") if under_gunicorn else None
    if siblings is not None:
        siblings.directory.mkdir()
    threads = torch.get_num_threads()
    settings = make_settings(data_dir=tmp_path / "tasks", workers=2, torch_threads=None)
    try:
        async with running_app(settings, siblings=siblings) as served:
            assert served.service.settings.effective_decode_threads == threads_each
    finally:
        torch.set_num_threads(threads)
    assert threads_at_load == [threads_each]


async def test_metrics_report_requests_batches_and_model(
    served: RunningApp, photos: list[Path]
) -> None:
    counted = (
        'http_requests_total{method="POST",route="/cls",status="200"}',
        'http_requests_total{method="POST",route="/cls",status="400"}',
        'http_request_duration_seconds_count{method="POST",route="/cls",status_class="2xx"}',
        'http_request_duration_seconds_count{method="POST",route="/cls",status_class="4xx"}',
        "batch_size_count",
        "batch_size_sum",
        'batch_queue_wait_seconds_count{lane="interactive"}',
        'batch_inference_seconds_count{outcome="ok"}',
        'batch_requests_total{outcome="ok"}',
    )
    before = (await served.client.get("/metrics")).text
    await served.client.post("/cls", files=upload(photos[0].read_bytes()))
    await served.client.post("/cls", files=upload(b"nope"))
    text = (await served.client.get("/metrics")).text
    # Read as the worker starts: it holds the model, a few hundred MB at least.
    assert metric_value(text, "worker_resident_memory_bytes") > 200 * 2**20
    # One request answered, one refused before the queue: one batch of one.
    growth = {
        sample: metric_value(text, sample) - metric_value(before, sample) for sample in counted
    }
    assert growth == {
        'http_requests_total{method="POST",route="/cls",status="200"}': 1,
        'http_requests_total{method="POST",route="/cls",status="400"}': 1,
        'http_request_duration_seconds_count{method="POST",route="/cls",status_class="2xx"}': 1,
        'http_request_duration_seconds_count{method="POST",route="/cls",status_class="4xx"}': 1,
        "batch_size_count": 1,
        "batch_size_sum": 1,
        'batch_queue_wait_seconds_count{lane="interactive"}': 1,
        'batch_inference_seconds_count{outcome="ok"}': 1,
        'batch_requests_total{outcome="ok"}': 1,
    }
    assert "batch_queue_depth 0.0" in text
    model = 'model_info{device="cpu",dtype="float32",model="resnet18",weights="random(seed=0)"}'
    assert f"{model} 1.0" in text


async def test_a_slow_metrics_render_holds_up_no_other_request(
    served: RunningApp, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Merging many workers' files (dead workers' counters pile up over restarts) takes a
    while; the worker goes on serving meanwhile."""
    render = main.metrics.render
    started, release = threading.Event(), threading.Event()

    def slow_render() -> tuple[bytes, str]:
        started.set()
        release.wait(5)
        return render()

    monkeypatch.setattr(main.metrics, "render", slow_render)
    scrape = asyncio.create_task(served.client.get("/metrics"))
    try:
        assert await asyncio.to_thread(started.wait, 5)
        assert (await served.client.get("/healthz")).status_code == 200
        assert not scrape.done()
    finally:
        release.set()
    assert (await scrape).status_code == 200


async def test_unknown_paths_are_json_404_with_one_metrics_label(served: RunningApp) -> None:
    response = await served.client.get("/no/such/path")
    assert response.status_code == 404
    assert response.json() == {"detail": "no route /no/such/path"}
    text = (await served.client.get("/metrics")).text
    assert 'route="unmatched"' in text
    assert "/no/such/path" not in text


async def test_requests_refused_before_routing_are_counted_under_their_route() -> None:
    """A 413 from a declared length never reaches the router; it is still a /cls request."""
    samples = (
        'http_requests_total{method="POST",route="/cls",status="413"}',
        'http_requests_total{method="GET",route="/docs",status="200"}',
    )
    async with running_app(make_settings(max_upload_bytes=50_000)) as served:
        text = (await served.client.get("/metrics")).text
        before = [metric_value(text, sample) for sample in samples]
        response = await served.client.post(
            "/cls", content=b"x" * 10, headers={"content-length": "5000000"}
        )
        assert response.status_code == 413
        assert (await served.client.get("/docs")).status_code == 200
        text = (await served.client.get("/metrics")).text
        assert [metric_value(text, sample) for sample in samples] == [n + 1 for n in before]


async def test_a_trailing_slash_is_a_404_that_names_the_route(photos: list[Path]) -> None:
    """Not a redirect, whose empty body a client that does not follow it would get; nor a
    413 for an upload over an unknown path's limit."""
    async with running_app(make_settings()) as served:
        data = max((photo.read_bytes() for photo in photos), key=len)
        assert len(data) > main.MAX_OTHER_BODY_BYTES
        response = await served.client.post("/cls/", files=upload(data))
        assert response.status_code == 404
        assert response.json()["detail"] == (
            "no route /cls/; the route is /cls, without the trailing slash"
        )
        task_id = uuid.UUID(int=0)
        response = await served.client.get(f"/task-status/{task_id}/")
        assert response.status_code == 404
        assert response.json()["detail"].endswith(
            f"the route is /task-status/{task_id}, without the trailing slash"
        )
        response = await served.client.get("/task-status/")
        assert response.status_code == 404
        assert response.json() == {
            "detail": "no route /task-status/; the route is /task-status/{task_id}"
        }
        response = await served.client.get("/nowhere")
        assert response.json() == {"detail": "no route /nowhere"}
        response = await served.client.get(f"/task-status/{'a' * 60_000}/")
        assert response.status_code == 404
        assert len(response.content) < 300  # the path is not echoed whole


async def test_openapi_documents_the_routes(served: RunningApp) -> None:
    assert (await served.client.get("/docs")).status_code == 200
    schema = (await served.client.get("/openapi.json")).json()
    assert {"/cls", "/cls/batch", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
    error = {"$ref": "#/components/schemas/ErrorOut"}
    for probe in ("/healthz", "/readyz", "/metrics"):
        answers = schema["paths"][probe]["get"]["responses"]
        assert {"200", "default"} <= set(answers), probe
        # A probe's 405 or 413 too is {"detail": ...}, in JSON.
        assert answers["default"]["content"] == {"application/json": {"schema": error}}, probe
    for probe in ("/healthz", "/readyz"):
        assert "503" in schema["paths"][probe]["get"]["responses"], probe
    exposition = schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(exposition) == {"text/plain"}
    idempotency_key = next(
        p for p in schema["paths"]["/tasks"]["post"]["parameters"] if p["name"] == "idempotency-key"
    )
    assert idempotency_key["schema"]["maxLength"] == 255
    # Uploads are files to a client generator (format: binary; a string alone is sent as a
    # plain field), and /cls/batch's files are required in its form's own schema.
    forms = schema["components"]["schemas"]
    for path in ("/cls", "/cls/batch", "/tasks"):
        body = schema["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        reference = body["content"]["multipart/form-data"]["schema"]
        assert set(reference) == {"$ref"}, path
        form = forms[reference["$ref"].rsplit("/", 1)[-1]]
        assert form["required"] == ["file"], path
        file = form["properties"]["file"]
        upload = file["items"] if path == "/cls/batch" else file
        assert upload["format"] == "binary", path
    assert forms["Body_classify_batch_cls_batch_post"]["properties"]["file"]["minItems"] == 1
    assert "anyOf" not in forms["Body_classify_batch_cls_batch_post"]["properties"]["file"]
    assert set(schema["paths"]["/readyz"]["get"]["responses"]["503"]["headers"]) == {"Retry-After"}
    # Every error is {"detail": "..."}, 422 included, and each route lists its own.
    assert "HTTPValidationError" not in json.dumps(schema)
    assert schema["components"]["schemas"]["ErrorOut"]["required"] == ["detail"]
    routes = {  # no 401: API_KEY is not set here
        ("/cls", "post"): {"400", "413", "422", "503", "504", "default"},
        ("/cls/batch", "post"): {"400", "413", "422", "503", "default"},
        ("/tasks", "post"): {"400", "413", "422", "503", "default"},
        ("/task-status/{task_id}", "get"): {"404", "503", "default"},
        ("/tasks/{task_id}", "delete"): {"404", "409", "503", "default"},
    }
    for (path, method), statuses in routes.items():
        responses = schema["paths"][path][method]["responses"]
        assert set(responses) - {"200", "202"} == statuses, path
        for status in statuses:
            assert responses[status]["content"]["application/json"]["schema"] == error
        assert set(responses["503"]["headers"]) == {"Retry-After"}, path
    assert "securitySchemes" not in schema["components"]
    # The headers a client acts on, on successful answers too.
    accepted = schema["paths"]["/tasks"]["post"]["responses"]["202"]
    assert set(accepted["headers"]) == {"Location", "Idempotent-Replayed"}
    assert "TaskAccepted" in json.dumps(accepted["content"])
    batch_answer = schema["paths"]["/cls/batch"]["post"]["responses"]["200"]
    assert set(batch_answer["headers"]) == {"Retry-After"}
    assert "BatchResponse" in json.dumps(batch_answer["content"])
    # Every state a task's webhook can be in, as the store names them, and no other.
    webhook_states = schema["components"]["schemas"]["WebhookOut"]["properties"]["status"]
    assert set(webhook_states["enum"]) == {"waiting", *(state.value for state in WebhookStatus)}


async def test_health_and_readiness(served: RunningApp) -> None:
    assert (await served.client.get("/healthz")).json() == {"status": "ok"}
    assert (await served.client.get("/readyz")).json() == {"status": "ready"}
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await served.client.head(path)).status_code == 200, path


async def test_a_large_body_to_a_route_without_uploads_is_413_saying_so(
    served: RunningApp,
) -> None:
    large = b"x" * (main.MAX_OTHER_BODY_BYTES + 1)
    for method, path in (("GET", "/healthz"), ("DELETE", f"/tasks/{uuid.uuid4()}")):
        response = await served.client.request(method, path, content=large)
        assert response.status_code == 413
        assert response.json()["detail"] == (
            f"request body is over {main.MAX_OTHER_BODY_BYTES} bytes; this route takes no upload"
        )


async def test_a_large_body_to_a_path_or_method_no_route_takes_gets_its_404_or_405(
    served: RunningApp,
) -> None:
    """A mistyped URL is the answer to give, not the body's size; and the body, left
    unread, closes the connection."""
    large = b"x" * (main.MAX_OTHER_BODY_BYTES + 1)
    unknown = await served.client.post("/nope", content=large)
    assert unknown.status_code == 404
    assert unknown.json()["detail"].startswith("no route /nope")
    assert unknown.headers["connection"] == "close"
    wrong_method = await served.client.put("/cls", content=large)
    assert wrong_method.status_code == 405
    assert wrong_method.headers["allow"] == "POST"
    assert wrong_method.headers["connection"] == "close"
    # A body that may never come closes it too; a short one, unread, or none, leaves it open.
    expecting = await served.client.put("/cls", content=b"x", headers={"Expect": "100-continue"})
    assert expecting.headers["connection"] == "close"

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x"

    streamed = await served.client.put("/cls", content=chunks())  # chunked
    assert streamed.headers["connection"] == "close"
    assert "connection" not in (await served.client.put("/cls", content=b"{}")).headers
    healthz = await served.client.request("GET", "/healthz", content=b"{}")
    assert "connection" not in healthz.headers
    assert "connection" not in (await served.client.put("/cls")).headers
    assert "connection" not in (await served.client.get("/nope")).headers


@pytest.mark.parametrize(
    ("name", "headers", "status"),
    [
        ("gzip", {"Content-Encoding": "gzip"}, 415),
        (
            "charset",
            {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}; charset=latin-1"},
            400,
        ),
        ("no boundary", {"Content-Type": "multipart/form-data; boundary="}, 400),
        ("long boundary", {"Content-Type": "multipart/form-data; boundary=" + "b" * 300}, 400),
    ],
)
async def test_a_short_body_refused_before_it_is_read_keeps_the_connection(
    served: RunningApp, name: str, headers: dict[str, str], status: int
) -> None:
    """As for a 404: the server reads a short body and drops it, and the connection serves
    the next request; a long one, left unread, closes it."""
    short = multipart([("file", "a.jpg", b"x" * 100, "image/jpeg")])
    refused = await served.client.post(
        "/cls", content=short, headers={**multipart_headers(short), **headers}
    )
    assert refused.status_code == status, (name, refused.text)
    assert "connection" not in refused.headers, name
    long = multipart([("file", "a.jpg", b"x" * (main.MAX_OTHER_BODY_BYTES + 1), "image/jpeg")])
    refused = await served.client.post(
        "/cls", content=long, headers={**multipart_headers(long), **headers}
    )
    assert refused.status_code == status, (name, refused.text)
    assert refused.headers["connection"] == "close", name


@pytest.mark.parametrize(
    ("http_version", "hosts", "status"),
    [("1.1", 0, 400), ("1.1", 2, 400), ("1.0", 2, 400), ("1.1", 1, 200), ("1.0", 0, 200)],
)
async def test_an_http_1_1_request_carries_exactly_one_host(
    served: RunningApp, http_version: str, hosts: int, status: int
) -> None:
    """Two may name different hosts to a proxy and to the service, which builds the URLs it
    answers with (``status_url``, ``Location``) from the one it reads; HTTP/1.1 requires
    one (RFC 9112), where HTTP/1.0 may send none."""
    request = httpx.Request("GET", "http://test/healthz")
    scope = {**http_scope(request), "method": "GET", "http_version": http_version}
    headers = [(name, value) for name, value in scope["headers"] if name != b"host"]  # type: ignore[attr-defined]
    scope["headers"] = headers + [(b"host", f"h{n}.example".encode()) for n in range(hosts)]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await served.app(scope, receive, send)
    assert sent[0]["status"] == status
    if status == 400:
        assert json.loads(sent[1]["body"])["detail"] == (
            f"a request carries one Host header; this one has {hosts}"
            if hosts
            else "an HTTP/1.1 request carries a Host header; this one has none"
        )
        assert (b"connection", b"close") in sent[0]["headers"]


async def test_a_request_with_two_content_types_is_refused(served: RunningApp) -> None:
    """A proxy reading the last one and the service the first would see other parts."""
    body = multipart([("file", "a.jpg", b"x" * 100, "image/jpeg")])
    request = httpx.Request("POST", "http://test/cls", content=body)
    scope = {**http_scope(request), "method": "POST"}
    scope["headers"] = [
        *scope["headers"],  # type: ignore[misc]
        (b"content-type", f"multipart/form-data; boundary={BOUNDARY}".encode()),
        (b"content-type", b"multipart/form-data; boundary=other"),
    ]
    sent: list[dict[str, Any]] = []
    messages = iter([{"type": "http.request", "body": body, "more_body": False}])

    async def receive() -> dict[str, object]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await served.app(scope, receive, send)
    assert sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["detail"] == (
        "a request carries at most one Content-Type header; this one has 2"
    )


class LeavingClient:
    """A /cls request driven at the ASGI level: its whole upload, then a disconnect at a
    moment the test chooses (``disconnect``)."""

    def __init__(self, data: bytes) -> None:
        self.request = httpx.Request("POST", "http://test/cls", files=upload(data))
        self.disconnect = asyncio.Event()
        self.sent: list[dict[str, object]] = []
        self._body: bytes | None = self.request.read()

    def send_to(self, app: ASGIApp) -> asyncio.Future[None]:
        return asyncio.ensure_future(app(http_scope(self.request), self._receive, self._send))

    async def _receive(self) -> dict[str, object]:
        if self._body is not None:
            body, self._body = self._body, None
            return {"type": "http.request", "body": body, "more_body": False}
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def _send(self, message: dict[str, object]) -> None:
        self.sent.append(message)


async def test_client_that_disconnects_while_queued_never_reaches_the_model(
    photos: list[Path],
) -> None:
    """Driven at the ASGI level, to disconnect at a moment the test chooses."""
    async with running_app(make_settings(drain_timeout_s=2)) as served:
        model = GatedModel(served)
        data = photos[0].read_bytes()
        busy = asyncio.create_task(served.client.post("/cls", files=upload(data)))
        await asyncio.to_thread(model.entered.wait, 10)

        client = LeavingClient(data)
        gone = client.send_to(served.app)
        processor = served.service.processor
        assert processor is not None
        await wait_for(lambda: processor.queue_depth == 1)
        client.disconnect.set()
        await asyncio.wait_for(gone, 10)
        assert processor.queue_depth == 0
        assert client.sent[0]["status"] == 499

        model.release.set()
        assert (await busy).status_code == 200
        assert (await served.client.post("/cls", files=upload(data))).status_code == 200
        assert model.batch_sizes == [1, 1]


async def test_a_client_gone_while_its_image_decodes_is_counted_as_cancelled(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every request that reaches the decode leaves with an outcome: one whose client
    disconnects meanwhile counts as cancelled, as it would in the queue."""
    held = HeldDecode(monkeypatch)
    decoding, finish_decode = held.started, held.release
    async with running_app(make_settings(drain_timeout_s=2)) as served:
        client = LeavingClient(photos[0].read_bytes())
        cancelled = 'batch_requests_total{outcome="cancelled"}'
        before = metric_value((await served.client.get("/metrics")).text, cancelled)
        gone = client.send_to(served.app)
        try:
            await asyncio.to_thread(decoding.wait, 10)
            client.disconnect.set()
            await asyncio.wait_for(gone, 10)
        finally:
            finish_decode.set()
        assert client.sent[0]["status"] == 499
        after = metric_value((await served.client.get("/metrics")).text, cancelled)
        assert after == before + 1


@pytest.mark.parametrize("path", ["/cls", "/tasks"])
async def test_client_that_disconnects_mid_upload_costs_nothing(
    path: str, photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Half a body, then the client is gone: no decode, no queue entry, no task stored, no
    error logged, and it is counted as a disconnect (499), not as a malformed body (400)."""
    async with running_app(make_settings()) as served:
        encoded = httpx.Request("POST", f"http://test{path}", files=upload(photos[0].read_bytes()))
        body = encoded.read()
        messages = [
            {"type": "http.request", "body": body[: len(body) // 2], "more_body": True},
            {"type": "http.disconnect"},
        ]

        async def receive() -> dict[str, object]:
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        sent: list[dict[str, object]] = []

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = http_scope(encoded)
        processor = served.service.processor
        assert processor is not None
        counted = f'http_requests_total{{method="POST",route="{path}",status="499"}}'
        before = metric_value((await served.client.get("/metrics")).text, counted)
        with caplog.at_level(logging.ERROR):
            await asyncio.wait_for(served.app(scope, receive, send), 10)
        assert processor.queue_depth == 0
        assert processor.in_flight == 0
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert sent[0]["status"] == 499
        after = metric_value((await served.client.get("/metrics")).text, counted)
        assert after == before + 1
        with sqlite3.connect(served.service.settings.data_dir / DATABASE_NAME) as db:
            assert db.execute("SELECT count(*) FROM tasks").fetchone() == (0,)
        response = await served.client.post(path, files=upload(photos[0].read_bytes()))
        assert response.status_code == (200 if path == "/cls" else 202)
