"""Asynchronous tasks in-process: submit, poll, cancel, errors, metrics and expiry."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import hashlib
import hmac
import itertools
import json
import logging
import math
import random
import shutil
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from classification import Prediction
from service import core, logs, task_runner, tasks
from service.settings import Settings, load_settings
from service.siblings import Siblings
from service.tasks import DATABASE_NAME
from tests import images
from tests.corpus import multipart, multipart_headers
from tests.server import free_port
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
from tests.webhook_receiver import STALL, receiving


def upload(data: bytes, name: str = "image.jpg") -> dict[str, tuple[str, bytes, str]]:
    return {"file": (name, data, "application/octet-stream")}


def stored_rows(served: RunningApp, table: str) -> int:
    with sqlite3.connect(served.service.settings.data_dir / DATABASE_NAME) as db:
        (count,) = db.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(count)


async def test_submit_answers_202_and_the_task_gets_the_reference_prediction(
    served: RunningApp, photos: list[Path], reference: Reference
) -> None:
    """The task's prediction is the same as /cls's and torchvision's for the same photo."""
    data = photos[0].read_bytes()
    response = await served.client.post(
        "/tasks", files=upload(data), data={"metadata": '{"order": 17, "tags": ["a"]}'}
    )
    assert response.status_code == 202, response.text
    accepted = response.json()
    assert accepted["status"] == "queued"
    assert accepted["status_url"] == f"http://test/task-status/{accepted['task_id']}"
    assert response.headers["location"] == accepted["status_url"]
    uuid.UUID(accepted["task_id"])

    task = await finished(served.client, accepted["task_id"])
    assert task["status"] == "succeeded", task
    assert "error" not in task
    assert task["metadata"] == {"order": 17, "tags": ["a"]}
    assert task["webhook"] is None
    assert task["created_at"] <= task["started_at"] <= task["finished_at"]

    interactive = (await served.client.post("/cls", files=upload(data))).json()["prediction"]
    assert task["prediction"] == interactive
    indices, _ = reference.top_k(images.photo(photos[0]), 5)
    assert [p["index"] for p in task["prediction"]] == indices


async def test_top_k_applies_to_tasks(served: RunningApp, photos: list[Path]) -> None:
    response = await served.client.post(
        "/tasks", params={"top_k": 3}, files=upload(photos[1].read_bytes())
    )
    task = await finished(served.client, response.json()["task_id"])
    assert len(task["prediction"]) == 3


async def test_the_image_is_deleted_once_the_task_finishes(
    served: RunningApp, photos: list[Path]
) -> None:
    accepted = await submit(served.client, photos[0].read_bytes())
    await finished(served.client, accepted["task_id"])
    assert stored_rows(served, "tasks") == 1
    assert stored_rows(served, "task_images") == 0


async def test_metadata_at_the_depth_limit_is_kept_and_read_back(
    served: RunningApp, photos: list[Path]
) -> None:
    deep: object = 1e300
    for _ in range(31):
        deep = [deep]
    accepted = await submit(served.client, photos[0].read_bytes(), metadata=json.dumps({"x": deep}))
    task = await finished(served.client, accepted["task_id"])
    assert task["metadata"] == {"x": deep}


async def test_metadata_allowed_beyond_the_upload_limit_is_not_cut_off_as_a_part(
    photos: list[Path],
) -> None:
    """A part is cut off past MAX_UPLOAD_BYTES + 64 KiB, or past TASK_METADATA_MAX_BYTES
    + 64 KiB where that is larger: the metadata it allows is taken."""
    data = photos[0].read_bytes()
    settings = make_settings(max_upload_bytes=len(data), task_metadata_max_bytes=len(data) * 4)
    async with running_app(settings) as served:
        metadata = json.dumps({"notes": "x" * (len(data) * 3)})
        accepted = await submit(served.client, data, metadata=metadata)
        task = await finished(served.client, accepted["task_id"])
    assert task["metadata"] == json.loads(metadata)


@pytest.mark.parametrize(
    ("fields", "status", "detail"),
    [
        ({"metadata": "[1, 2]"}, 422, "metadata must be a JSON object, received a JSON array"),
        ({"metadata": "null"}, 422, "metadata must be a JSON object, received a JSON null"),
        ({"metadata": "{not json"}, 422, "metadata must be a JSON object"),
        ({"metadata": '{"x": NaN}'}, 422, "metadata: NaN is not valid JSON"),
        ({"metadata": '{"x": 1e400}'}, 422, "metadata: 1e400 is out of the range"),
        ({"metadata": '{"x": ' + "9" * 400 + "}"}, 422, "(400 characters) is out of the range"),
        ({"metadata": '{"x": ' + "9" * 5000 + "}"}, 422, "(5000 characters) is out of the range"),
        ({"metadata": '{"x": "\\ud800"}'}, 422, "unpaired surrogate"),
        ({"metadata": '{"\\udfff": 1}'}, 422, "unpaired surrogate"),
        ({"metadata": '{"x": ' + "[" * 32 + "]" * 32 + "}"}, 422, "more than 32 levels deep"),
        ({"metadata": "[" * 5000 + "]" * 5000}, 422, "more than 32 levels deep"),
        ({"metadata": '{"x": "' + "y" * 20_000 + '"}'}, 422, "TASK_METADATA_MAX_BYTES allows"),
        ({"metadata": '{"x": "' + "y" * 1_200_000 + '"}'}, 422, "TASK_METADATA_MAX_BYTES allows"),
        ({"callback_url": "https://a.example/" + "y" * 1_200_000}, 422, "at most 2048"),
        ({"callback_url": "ftp://example.com/hook"}, 422, "http"),
        ({"callback_url": "http://127.0.0.1:8080/hook"}, 422, "WEBHOOK_ALLOW_PRIVATE"),
        ({"callback_url": "http://169.254.169.254/latest"}, 422, "WEBHOOK_ALLOW_PRIVATE"),
        ({"callback_url": "http://93.184.215.14\t/hook"}, 422, "control characters"),
        ({"callback_url": "http://example.com/\r\nX-Injected: 1"}, 422, "control characters"),
        ({"metadata": ['{"a": 1}', '{"b": 2}']}, 422, "metadata was sent 2 times"),
        ({"callback_url": ["https://a.example/", "https://b.example/"]}, 422, "sent 2 times"),
        # A misspelt field would leave the task without its webhook, unseen.
        (
            {"callback": "https://hooks.example/done"},
            422,
            "unknown form field 'callback'; a task takes file, callback_url, metadata",
        ),
        (
            {"top_k": "3"},
            422,
            "top_k: sent in the form, where it is not read; send it in the URL (?top_k=3)",
        ),
    ],
)
async def test_bad_fields_are_refused_before_anything_is_stored(
    served: RunningApp,
    photos: list[Path],
    fields: dict[str, str | list[str]],
    status: int,
    detail: str,
) -> None:
    response = await served.client.post("/tasks", files=upload(photos[0].read_bytes()), data=fields)
    assert response.status_code == status, response.text
    assert detail in response.json()["detail"]
    assert stored_rows(served, "tasks") == 0


async def test_a_callback_host_dns_cannot_look_up_for_now_is_a_503(
    served: RunningApp, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_answer(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_answer)
    response = await served.client.post(
        "/tasks",
        files=upload(photos[0].read_bytes()),
        data={"callback_url": "https://hooks.example/done"},
    )
    assert response.status_code == 503, response.text
    assert response.headers["Retry-After"] == "1"
    assert "could not be looked up just now" in response.json()["detail"]
    assert stored_rows(served, "tasks") == 0


@contextmanager
def a_resolver_that_never_answers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Host name lookups hang until the block ends, then fail as DNS that does not answer;
    the names looked up."""
    answers = threading.Event()
    looked_up: list[str] = []

    def hanging(host: str, *args: object, **kwargs: object) -> list[object]:
        looked_up.append(host)
        answers.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    try:
        yield looked_up
    finally:
        answers.set()


async def submit_with_callback(served: RunningApp, image: bytes, url: str) -> httpx.Response:
    return await served.client.post("/tasks", files=upload(image), data={"callback_url": url})


async def test_a_callback_lookup_that_hangs_is_a_503_within_the_webhook_timeout(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running_app(make_settings(webhook_timeout_s=0.3)) as served:
        with a_resolver_that_never_answers(monkeypatch):
            started = asyncio.get_running_loop().time()
            response = await submit_with_callback(
                served, photos[0].read_bytes(), "https://hooks.example/done"
            )
            elapsed = asyncio.get_running_loop().time() - started
            # The hung lookup's thread is not work in progress: the model counts as idle,
            # and memory may be trimmed, while it hangs.
            assert served.service._threads_working == 0
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "1"
        assert "within 0.3 s (WEBHOOK_TIMEOUT_S)" in response.json()["detail"]
        assert 0.25 < elapsed < 5
        assert stored_rows(served, "tasks") == 0


async def test_lookups_that_hang_hold_up_no_callback_written_as_an_address(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An address needs no lookup, and waits for no thread: with every lookup thread held
    by a resolver that never answers, such a callback_url is accepted at once."""
    monkeypatch.setattr(core, "CALLBACK_LOOKUP_THREADS", 1)
    settings = make_settings(webhook_timeout_s=0.5, webhook_allow_private=True)
    image = photos[0].read_bytes()
    async with running_app(settings) as served:
        with a_resolver_that_never_answers(monkeypatch):
            hung = await submit_with_callback(served, image, "https://hangs.example/done")
            assert hung.status_code == 503, hung.text
            by_address = await submit_with_callback(
                served, image, f"http://127.0.0.1:{free_port()}/done"
            )
        assert by_address.status_code == 202, by_address.text  # not waiting for the thread


async def test_with_every_lookup_thread_held_a_callback_is_taken_on_its_form(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Names whose DNS never answers, one a thread, would otherwise have every other
    callback submission wait for a thread and be refused: it is accepted on its form, as a
    resent submission is, and its delivery checks what it connects to."""
    monkeypatch.setattr(core, "CALLBACK_LOOKUP_THREADS", 1)
    image = photos[0].read_bytes()
    async with running_app(make_settings(webhook_timeout_s=0.3)) as served:
        with a_resolver_that_never_answers(monkeypatch) as looked_up:
            hung = await submit_with_callback(served, image, "https://hangs.example/done")
            assert hung.status_code == 503  # its lookup's thread is still held
            other = await submit_with_callback(served, image, "https://other.example/done")
        assert other.status_code == 202, other.text
        assert looked_up == ["hangs.example"]
        assert stored_rows(served, "tasks") == 1


async def test_a_lookup_thread_that_cannot_start_is_a_503_and_stores_nothing(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """At a limit of the worker's threads, the callback's lookup cannot run: the submission
    is refused for now, with an ERROR line, and the next one, threads free again, stored."""
    image = photos[0].read_bytes()
    async with running_app(make_settings(webhook_allow_private=True)) as served:

        def no_thread(*args: object, **kwargs: object) -> None:
            raise RuntimeError("can't start new thread")

        monkeypatch.setattr(served.service._lookup_pool, "submit", no_thread)
        with caplog.at_level(logging.ERROR):
            refused = await submit_with_callback(served, image, "https://somewhere.example/d")
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "1"
        assert refused.json() == {"detail": "the server could not start a thread for now; retry"}
        assert "a thread could not be started" in caplog.text
        assert stored_rows(served, "tasks") == 0
        monkeypatch.undo()
        stored = await submit_with_callback(served, image, f"http://localhost:{free_port()}/d")
        assert stored.status_code == 202, stored.text


async def test_submissions_naming_a_host_whose_lookup_hangs_share_one_lookup(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name whose DNS never answers, sent again and again, holds one lookup thread, not
    all of them: the submissions naming it while its lookup is under way wait for that one,
    and each is answered 503 at its own time limit."""
    image = photos[0].read_bytes()
    async with running_app(make_settings(webhook_timeout_s=0.5)) as served:
        with a_resolver_that_never_answers(monkeypatch) as looked_up:
            answers = await asyncio.gather(
                *(
                    submit_with_callback(served, image, f"https://hangs.example/done{i}")
                    for i in range(6)
                )
            )
        assert [answer.status_code for answer in answers] == [503] * 6
        assert looked_up == ["hangs.example"]
        assert stored_rows(served, "tasks") == 0


async def test_a_raw_surrogate_in_a_utf7_form_is_refused_too(
    served: RunningApp, photos: list[Path]
) -> None:
    """The form parser would decode fields with the body's charset: in UTF-7, "+2AA-" is a
    lone surrogate before the JSON is even parsed. A charset other than UTF-8 is refused
    before the body is read."""
    boundary = "b0undary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="metadata"\r\n\r\n'
            '{"x": "+2AA-"}\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + photos[0].read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    content_type = f"multipart/form-data; boundary={boundary}; charset=utf-7"
    response = await served.client.post(
        "/tasks", content=body, headers={"Content-Type": content_type}
    )
    assert response.status_code == 400, response.text
    assert "charset=utf-7 is not supported" in response.json()["detail"]
    assert stored_rows(served, "tasks") == 0


async def test_metadata_over_a_mebibyte_is_accepted_when_the_setting_allows_it(
    photos: list[Path],
) -> None:
    async with running_app(make_settings(task_metadata_max_bytes=1_500_000)) as served:
        data = photos[0].read_bytes()
        within = json.dumps({"notes": "x" * 1_400_000})
        accepted = await submit(served.client, data, metadata=within)
        task = await finished(served.client, accepted["task_id"])
        assert task["metadata"] == json.loads(within)

        over = json.dumps({"notes": "x" * 1_600_000})
        response = await served.client.post("/tasks", files=upload(data), data={"metadata": over})
        assert response.status_code == 422, response.text
        assert "TASK_METADATA_MAX_BYTES allows 1500000" in response.json()["detail"]


async def test_a_part_over_what_metadata_may_take_names_both_limits(photos: list[Path]) -> None:
    """With TASK_METADATA_MAX_BYTES above MAX_UPLOAD_BYTES, a part may be as large as the
    metadata; one larger is cut off as it arrives, and the 413 says which setting allows it."""
    settings = make_settings(max_upload_bytes=200_000, task_metadata_max_bytes=300_000)
    async with running_app(settings) as served:
        huge = json.dumps({"notes": "x" * 400_000})
        response = await served.client.post(
            "/tasks", files=upload(photos[0].read_bytes()), data={"metadata": huge}
        )
    assert response.status_code == 413, response.text
    assert response.json()["detail"].endswith(
        "MAX_UPLOAD_BYTES allows 200000 per file, TASK_METADATA_MAX_BYTES 300000 for a task's "
        "metadata"
    )


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"", 400),
        (b"not an image at all", 400),
        (images.encode(images.gradient(), "JPEG")[:300], 400),
        (images.png_bomb(), 400),
    ],
)
async def test_a_bad_image_gets_its_4xx_at_once_and_is_not_stored(
    served: RunningApp, data: bytes, status: int
) -> None:
    response = await served.client.post("/tasks", files=upload(data))
    assert response.status_code == status, response.text
    assert "detail" in response.json()
    assert stored_rows(served, "tasks") == 0


async def test_an_oversized_upload_is_413(photos: list[Path]) -> None:
    async with running_app(make_settings(max_upload_bytes=1000)) as served:
        response = await served.client.post("/tasks", files=upload(photos[0].read_bytes()))
        assert response.status_code == 413, response.text
        assert stored_rows(served, "tasks") == 0


async def test_missing_file_is_422(served: RunningApp) -> None:
    response = await served.client.post("/tasks", data={"metadata": "{}"})
    assert response.status_code == 422
    assert "file" in response.json()["detail"]


@pytest.mark.parametrize(
    "task_id",
    [
        str(uuid.uuid4()),
        "not-a-uuid",
        "1' OR '1'='1",
        "x" * 500,
        "-" * 5000 + "0" * 32,  # what uuid.UUID reads as a UUID
        f"urn:uuid:{uuid.uuid4()}",
        uuid.uuid4().hex,
    ],
)
async def test_unknown_or_malformed_ids_are_404(served: RunningApp, task_id: str) -> None:
    for response in (
        await served.client.get(f"/task-status/{task_id}"),
        await served.client.delete(f"/tasks/{task_id}"),
    ):
        assert response.status_code == 404, response.text
        assert response.json()["detail"].startswith("no task")
        assert len(response.content) < 200  # the id is not echoed whole


async def test_a_task_id_is_found_in_either_case_and_with_head(
    served: RunningApp, photos: list[Path]
) -> None:
    submitted = await served.client.post("/tasks", files=upload(photos[0].read_bytes()))
    task_id = submitted.json()["task_id"]
    shouted = await served.client.get(f"/task-status/{task_id.upper()}")
    assert shouted.status_code == 200
    assert shouted.json()["task_id"] == task_id
    head = await served.client.head(f"/task-status/{task_id}")
    assert head.status_code == 200
    assert head.content == b""


async def test_only_a_task_that_has_not_started_can_be_cancelled(photos: list[Path]) -> None:
    """With the model held, a worker holds two tasks (max batch 1); later ones stay queued."""
    async with running_app(make_settings(max_batch_size=1)) as served:
        model = GatedModel(served)
        data = photos[0].read_bytes()
        tasks = [(await submit(served.client, data))["task_id"] for _ in range(5)]
        await wait_for(model.entered.is_set)

        async def statuses() -> list[str]:
            return [
                (await served.client.get(f"/task-status/{task_id}")).json()["status"]
                for task_id in tasks
            ]

        # The second claim may land a moment after the first task reached the model.
        async with asyncio.timeout(10):
            while (await statuses()).count("running") < 2:
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        assert await statuses() == ["running", "running", "queued", "queued", "queued"]
        queued_id, running_id = tasks[3], tasks[0]

        cancelled = await served.client.delete(f"/tasks/{queued_id}")
        assert cancelled.status_code == 200, cancelled.text
        assert cancelled.json()["status"] == "cancelled"
        assert cancelled.json()["finished_at"] is not None
        again = await served.client.delete(f"/tasks/{queued_id}")
        assert again.status_code == 200
        assert again.json()["status"] == "cancelled"
        refused = await served.client.delete(f"/tasks/{running_id}")
        assert refused.status_code == 409
        assert refused.json()["detail"].startswith("the task is running;")

        model.release.set()
        results = {task_id: await finished(served.client, task_id) for task_id in tasks}
        assert results[queued_id]["status"] == "cancelled"
        assert "prediction" not in results[queued_id]
        assert all(results[t]["status"] == "succeeded" for t in tasks if t != queued_id)
        assert sum(model.batch_sizes) == 4, "the cancelled task never reached the model"

        finished_again = await served.client.delete(f"/tasks/{tasks[0]}")
        assert finished_again.status_code == 409
        assert finished_again.json()["detail"].startswith("the task has finished (succeeded);")


async def test_a_task_the_model_scores_with_nan_fails_and_its_status_reads(
    photos: list[Path],
) -> None:
    """Stored as a success, a NaN score would make every read of the task's status a 500."""
    async with running_app(make_settings()) as served:
        classifier = served.service.classifier
        assert classifier is not None
        real_classify = classifier.classify

        def scores_nan(
            pixels: Sequence[np.ndarray], top_k: Sequence[int]
        ) -> list[list[Prediction]]:
            return [
                [dataclasses.replace(p, score=math.nan) for p in each]
                for each in real_classify(pixels, top_k)
            ]

        classifier.classify = scores_nan  # type: ignore[method-assign]
        accepted = await submit(served.client, photos[0].read_bytes())
        task = await finished(served.client, accepted["task_id"])

        assert task["status"] == "failed"
        assert task["error"] == "inference failed; the error is logged on the server"


@pytest.mark.parametrize("unstorable", [np.float32(0.5), math.nan], ids=["a NumPy number", "NaN"])
async def test_a_result_that_is_no_json_fails_its_task_at_once(
    photos: list[Path], unstorable: object
) -> None:
    """Another model's result that JSON cannot hold fails its task at once: retried as if
    its worker had died, it would run up to TASK_MAX_ATTEMPTS times and fail as
    "interrupted"."""
    async with running_app(make_settings()) as served:
        runner = served.service.tasks
        assert runner is not None
        runs = 0

        async def unstorable_result(task: tasks.ClaimedTask) -> object:
            nonlocal runs
            runs += 1
            return [{"embedding": [unstorable]}]

        runner._execute = unstorable_result
        accepted = await submit(served.client, photos[0].read_bytes())
        task = await finished(served.client, accepted["task_id"])

        assert task["status"] == "failed"
        assert task["error"] == "internal server error"
        assert runs == 1


async def test_a_failing_batch_fails_the_task_with_a_public_error(
    photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """The task's error says the log has the cause: the log names the task there."""
    caplog.handler.addFilter(logs.RequestIdLogFilter())
    async with running_app(make_settings()) as served:
        before = (await served.client.get("/metrics")).text
        model = GatedModel(served)
        model.fail_next = True
        model.release.set()
        with caplog.at_level(logging.WARNING):
            accepted = await submit(served.client, photos[0].read_bytes())
            task = await finished(served.client, accepted["task_id"])

        assert task["status"] == "failed"
        assert task["error"] == "inference failed; the error is logged on the server"
        task_id = accepted["task_id"]
        messages = [(r.request_id, r.getMessage()) for r in caplog.records]  # type: ignore[attr-defined]
        assert (f"task:{task_id}", f"task {task_id} failed: {task['error']}") in messages
        tracebacks = [r for r in caplog.records if r.exc_info is not None]
        assert tracebacks
        assert {r.request_id for r in tracebacks} == {f"task:{task_id}"}  # type: ignore[attr-defined]
        assert "prediction" not in task
        assert stored_rows(served, "task_images") == 0
        after = (await served.client.get("/metrics")).text
        for sample, growth in (("image_task_failure_total", 1), ("image_task_success_total", 0)):
            assert metric_value(after, sample) - metric_value(before, sample) == growth


async def test_task_metrics_count_successes_latency_and_the_waiting_queue(
    photos: list[Path],
) -> None:
    """task_queue_depth counts tasks waiting, not running ones; counters count finishes."""
    settings = make_settings(max_batch_size=1, task_poll_interval_s=0.05)
    async with running_app(settings) as served:
        model = GatedModel(served)
        data = photos[0].read_bytes()
        before = (await served.client.get("/metrics")).text
        tasks = [(await submit(served.client, data))["task_id"] for _ in range(5)]
        await wait_for(model.entered.is_set)

        async def queue_depth() -> float:
            text = (await served.client.get("/metrics")).text
            return metric_value(text, "task_queue_depth")

        async with asyncio.timeout(10):
            while await queue_depth() != 3:  # 2 of 5 are running
                await asyncio.sleep(0.02)

        model.release.set()
        for task_id in tasks:
            await finished(served.client, task_id)
        async with asyncio.timeout(10):
            while await queue_depth() != 0:
                await asyncio.sleep(0.02)
        after = (await served.client.get("/metrics")).text

    def grew(sample: str) -> float:
        return metric_value(after, sample) - metric_value(before, sample)

    assert grew("image_task_success_total") == 5
    assert grew("image_task_failure_total") == 0
    assert grew("image_task_latency_seconds_count") == 5
    assert grew("image_task_latency_seconds_sum") > 0
    # Each ran in the background lane, behind any /cls request.
    assert grew('batch_queue_wait_seconds_count{lane="background"}') == 5
    assert grew('batch_queue_wait_seconds_count{lane="interactive"}') == 0


async def test_finished_tasks_expire_after_the_ttl(photos: list[Path]) -> None:
    settings = make_settings(task_ttl=1, task_cleanup_interval_s=0.1)
    async with running_app(settings) as served:
        accepted = await submit(served.client, photos[0].read_bytes())
        await finished(served.client, accepted["task_id"])
        async with asyncio.timeout(10):
            while (await served.client.get(accepted["status_url"])).status_code != 404:
                await asyncio.sleep(0.05)
            while stored_rows(served, "tasks"):  # the clean-up deletes it
                await asyncio.sleep(0.05)


async def test_the_clean_up_deletes_in_short_writes_with_the_lock_free_between_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Expired tasks go a few at a time, each write its own transaction, and the write lock
    is left free between writes for longer than SQLite's busy handler sleeps between its
    tries (100 ms at most): deleting a million in one write would take 28 s, in which every
    other process's submissions and lease renewals would wait or fail."""
    monkeypatch.setattr(task_runner, "DELETE_STEP_TASKS", 10)
    tasks.TaskStore(tmp_path).close()
    finished_at = time.time() - 3600
    with closing(sqlite3.connect(tmp_path / DATABASE_NAME)) as db, db:
        db.executemany(
            "INSERT INTO tasks (id, status, top_k, created_at, started_at, finished_at) "
            "VALUES (?, 'succeeded', 5, ?, ?, ?)",
            [(f"old{i}", finished_at, finished_at, finished_at) for i in range(25)],
        )
    writes: list[tuple[float, float, int]] = []  # start, end, tasks deleted
    real_delete = tasks.TaskStore.delete_expired

    def timed_delete(store: tasks.TaskStore, finished_before: float, *, most: int) -> int:
        start = time.monotonic()
        deleted = real_delete(store, finished_before, most=most)
        writes.append((start, time.monotonic(), deleted))
        return deleted

    monkeypatch.setattr(tasks.TaskStore, "delete_expired", timed_delete)
    settings = make_settings(data_dir=tmp_path, task_ttl=60, task_cleanup_interval_s=3600)
    async with running_app(settings) as served:
        async with asyncio.timeout(10):
            while stored_rows(served, "tasks"):
                await asyncio.sleep(0.05)
    assert [deleted for *_, deleted in writes] == [10, 10, 5]
    gaps = [later[0] - earlier[1] for earlier, later in itertools.pairwise(writes)]
    assert min(gaps) > 0.1


async def test_a_worker_whose_batch_is_stuck_claims_no_task_until_it_finishes(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past STALL_TIMEOUT_S the worker may never answer what it takes: a task submitted
    meanwhile is stored, and stays in the store, for another worker or for this one once
    its batch ends. A request to classify is refused at once."""
    settings = make_settings(task_poll_interval_s=0.05)
    async with running_app(settings) as served:
        monkeypatch.setattr(served.service, "liveness_problem", lambda: "stalled")
        accepted = await submit(served.client, photos[0].read_bytes())
        refused = await served.client.post("/cls", files=upload(photos[0].read_bytes()))
        assert refused.status_code == 503
        assert "a batch has run longer than STALL_TIMEOUT_S" in refused.json()["detail"]
        await asyncio.sleep(0.5)  # ten polls of the store
        polled = await served.client.get(accepted["status_url"])
        assert polled.json()["status"] == "queued"
        monkeypatch.setattr(served.service, "liveness_problem", lambda: None)
        assert (await finished(served.client, accepted["task_id"]))["status"] == "succeeded"


async def test_a_clean_up_that_fails_part_way_logs_what_it_deleted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each write of the clean-up commits: those before a failure are counted."""
    monkeypatch.setattr(task_runner, "DELETE_STEP_TASKS", 10)
    tasks.TaskStore(tmp_path).close()
    finished_at = time.time() - 3600
    with closing(sqlite3.connect(tmp_path / DATABASE_NAME)) as db, db:
        db.executemany(
            "INSERT INTO tasks (id, status, top_k, created_at, started_at, finished_at) "
            "VALUES (?, 'succeeded', 5, ?, ?, ?)",
            [(f"old{i}", finished_at, finished_at, finished_at) for i in range(25)],
        )
    real_delete = tasks.TaskStore.delete_expired
    calls = 0

    def failing_second(store: tasks.TaskStore, finished_before: float, *, most: int) -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise tasks.TaskStoreBusy("the task store is busy")
        return real_delete(store, finished_before, most=most)

    monkeypatch.setattr(tasks.TaskStore, "delete_expired", failing_second)
    caplog.set_level(logging.INFO, logger="service.task_runner")
    settings = make_settings(data_dir=tmp_path, task_ttl=60, task_cleanup_interval_s=3600)
    async with running_app(settings):
        await wait_for(
            lambda: any(
                record.getMessage().startswith("deleting expired tasks failed")
                for record in caplog.records
            )
        )
    assert "deleted 10 tasks older than TASK_TTL" in [r.getMessage() for r in caplog.records]


async def test_an_expired_task_is_gone_at_once_not_at_the_next_clean_up(
    photos: list[Path],
) -> None:
    """Past TASK_TTL a task reads as 404 and its Idempotency-Key makes a new task, though
    the hourly clean-up has not deleted it yet."""
    settings = make_settings(task_ttl=1, task_cleanup_interval_s=3600)
    async with running_app(settings) as served:
        data = photos[0].read_bytes()
        key = {"Idempotency-Key": "expiring"}
        first = await served.client.post("/tasks", files=upload(data), headers=key)
        task_id = first.json()["task_id"]
        await finished(served.client, task_id)
        async with asyncio.timeout(10):
            while (await served.client.get(f"/task-status/{task_id}")).status_code != 404:
                await asyncio.sleep(0.05)
        assert (await served.client.delete(f"/tasks/{task_id}")).status_code == 404
        assert stored_rows(served, "tasks") == 1, "the clean-up has not run"
        again = await served.client.post("/tasks", files=upload(data), headers=key)
        assert again.status_code == 202
        assert again.json()["task_id"] != task_id
        assert "idempotent-replayed" not in again.headers


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("604800", 604800), ("P7D", 604800), ("2.5", 2.5), ("PT12H", 43200), (" p1d ", 86400)],
)
def test_task_ttl_reads_seconds_or_iso_8601(
    monkeypatch: pytest.MonkeyPatch, value: str, seconds: float
) -> None:
    monkeypatch.setenv("TASK_TTL", value)
    assert load_settings().task_ttl.total_seconds() == seconds


@pytest.mark.parametrize("value", ["10:00", "1h", "1 day", "7d"])
def test_task_ttl_in_another_form_is_refused_naming_the_forms_it_takes(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """Rather than read as something else ("10:00" as ten hours)."""
    monkeypatch.setenv("TASK_TTL", value)
    with pytest.raises(SystemExit) as stopped:
        load_settings()
    line = str(stopped.value)
    assert f"TASK_TTL={value!r}: takes seconds (604800) or an ISO 8601 duration" in line


async def test_the_task_queue_limit_is_503_with_retry_after(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    counted = HeldDecode(monkeypatch)
    counted.release.set()
    lookups: list[object] = []

    def looked_up(host: object, *args: object, **kwargs: object) -> list[object]:
        lookups.append(host)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", looked_up)
    async with running_app(make_settings(max_batch_size=1, task_max_queued=2)) as served:
        model = GatedModel(served)
        data = photos[0].read_bytes()
        # Two are held by the worker (running), two more fill the queue.
        for _ in range(2):
            await submit(served.client, data)
        await wait_for(model.entered.is_set)
        await wait_for_running(served, 2)
        await submit(served.client, data)
        key = {"Idempotency-Key": "order-17"}
        stored = await served.client.post("/tasks", files=upload(data), headers=key)
        assert stored.status_code == 202, stored.text
        decodes = counted.calls
        for refused in (
            await served.client.post("/tasks", files=upload(data)),
            await served.client.post(
                "/tasks", files=upload(data), headers={"Idempotency-Key": "order-18"}
            ),
            await served.client.post(
                "/tasks", files=upload(data), data={"callback_url": "https://hooks.example/"}
            ),
        ):
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert "TASK_MAX_QUEUED allows 2" in refused.json()["detail"]
        assert counted.calls == decodes, "refused only after decoding the image"
        assert lookups == [], "refused only after looking up the callback's host"
        # A resent request stores nothing: the client that lost its answer gets it.
        resent = await served.client.post("/tasks", files=upload(data), headers=key)
        assert resent.status_code == 202, resent.text
        assert resent.json()["task_id"] == stored.json()["task_id"]
        assert resent.headers["idempotent-replayed"] == "true"
        model.release.set()


async def test_submissions_stop_before_the_disk_fills_so_accepted_tasks_can_finish(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a full disk, tasks accepted already could not store their results: they would show
    as running until space was freed by hand. Submissions stop while a reserve is left."""
    free = {"bytes": 10 * tasks.DISK_RESERVE_BYTES}
    real_disk_usage = shutil.disk_usage

    def disk_usage(path: object) -> Any:
        return real_disk_usage(path)._replace(free=free["bytes"])  # type: ignore[arg-type]

    monkeypatch.setattr(tasks.shutil, "disk_usage", disk_usage)
    async with running_app(make_settings(max_batch_size=1)) as served:
        model = GatedModel(served)
        data = photos[0].read_bytes()
        key = {"Idempotency-Key": "order-17"}
        accepted = await served.client.post("/tasks", files=upload(data), headers=key)
        assert accepted.status_code == 202, accepted.text
        await wait_for(model.entered.is_set)

        free["bytes"] = tasks.DISK_RESERVE_BYTES + len(data) // 2
        refused = await served.client.post("/tasks", files=upload(data))
        assert refused.status_code == 503
        # Space comes back when freed, not a second later as a place in the queue does.
        assert refused.headers["retry-after"] == str(tasks.DISK_FULL_RETRY_AFTER_S) == "60"
        left = (free["bytes"] - len(data)) / 2**20
        assert refused.json()["detail"].startswith(
            f"the disk holding DATA_DIR has {free['bytes'] / 2**20:.1f} MiB free, {left:.1f} "
            "MiB once this image is stored; new tasks are taken while 64 MiB would stay free"
        )
        free["bytes"] = tasks.DISK_RESERVE_BYTES - 1  # refused before its image is decoded
        assert (await served.client.post("/tasks", files=upload(data))).status_code == 503
        # A resent request stores nothing: the client that lost its answer gets it.
        resent = await served.client.post("/tasks", files=upload(data), headers=key)
        assert resent.status_code == 202, resent.text
        assert resent.json()["task_id"] == accepted.json()["task_id"]
        model.release.set()
        assert (await finished(served.client, accepted.json()["task_id"]))["status"] == (
            "succeeded"
        )
        free["bytes"] = 10 * tasks.DISK_RESERVE_BYTES
        assert (await served.client.post("/tasks", files=upload(data))).status_code == 202


async def test_attempts_a_failing_disk_cannot_count_are_one_line_and_the_task_runs(
    photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    async with running_app(make_settings()) as served:
        runner = served.service.tasks
        assert runner is not None

        def disk_full(*args: object) -> None:
            raise tasks.TaskStoreFailed("the task store could not be written: disk is full")

        runner.store.count_attempts = disk_full  # type: ignore[method-assign]
        with caplog.at_level(logging.ERROR):
            accepted = await submit(served.client, photos[0].read_bytes())
            task = await finished(served.client, accepted["task_id"])
        assert task["status"] == "succeeded"
        lines = [r for r in caplog.records if "counting the attempts" in r.getMessage()]
        assert len(lines) == 1
        assert (
            lines[0]
            .getMessage()
            .endswith("failed: the task store could not be written: disk is full")
        )
        assert lines[0].exc_info is None


async def test_submissions_beyond_max_queue_are_503_before_decoding(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Submissions waiting for the tasks' decode thread hold their uploads: MAX_QUEUE
    bounds them as it bounds /cls requests."""
    held = HeldDecode(monkeypatch)
    settings = make_settings(max_queue=2, max_batch_files=2, drain_timeout_s=2)
    async with running_app(settings) as served:
        data = photos[0].read_bytes()
        try:
            waiting = [
                asyncio.create_task(served.client.post("/tasks", files=upload(data)))
                for _ in range(2)
            ]
            await wait_for(held.started.is_set)
            await wait_for(lambda: served.service._submissions_in_progress == 2)
            refused = await served.client.post("/tasks", files=upload(data))
            assert refused.status_code == 503, refused.text
            assert refused.headers["retry-after"] == "1"
            assert "MAX_QUEUE allows 2" in refused.json()["detail"]
            assert held.calls == 1, "the refused submission was decoded"
        finally:
            held.release.set()
        assert [(await response).status_code for response in waiting] == [202, 202]
        # The places are free again.
        assert (await served.client.post("/tasks", files=upload(data))).status_code == 202


async def test_a_submission_that_stop_overtakes_is_refused_not_failed(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submission with an Idempotency-Key hashes its request off the event loop first:
    ``stop`` may run meanwhile. The runner refuses it then, as it refuses any request once
    stopping, rather than write on a closed store."""
    hashing, release = threading.Event(), threading.Event()
    real_hash = task_runner._request_hash

    def slow_hash(*args: Any) -> str:
        hashing.set()
        release.wait(10)
        return real_hash(*args)

    monkeypatch.setattr(task_runner, "_request_hash", slow_hash)
    async with running_app(make_settings()) as served:
        runner = served.service.task_runner()
        submitting = asyncio.ensure_future(
            runner.submit(
                photos[0].read_bytes(),
                top_k=5,
                metadata=None,
                callback_url=None,
                idempotency_key="overtaken",
            )
        )
        await asyncio.to_thread(hashing.wait, 10)
        stopping = asyncio.ensure_future(served.service.stop())
        await wait_for(lambda: runner._stopped)
        release.set()
        with pytest.raises(task_runner.RunnerStopped):
            await submitting
        await stopping


async def test_a_room_check_that_stop_overtakes_is_refused_not_failed() -> None:
    """A keyed submission's room check reads the store twice (its key, then the count):
    ``stop`` may close the store in between, and the second read is refused."""
    async with running_app(make_settings()) as served:
        runner = served.service.task_runner()
        reading, release = threading.Event(), threading.Event()
        real_holds_key = runner.reader.holds_key

        def slow_holds_key(*args: Any, **kwargs: Any) -> bool:
            reading.set()
            release.wait(10)
            return real_holds_key(*args, **kwargs)

        runner.reader.holds_key = slow_holds_key  # type: ignore[method-assign]
        checking = asyncio.ensure_future(runner.check_room(idempotency_key="new"))
        await asyncio.to_thread(reading.wait, 10)
        stopping = asyncio.ensure_future(served.service.stop())
        # The store's closing waits on the read thread, behind the count.
        await wait_for(lambda: runner._read_thread._work_queue.qsize() > 0)
        release.set()
        with pytest.raises(task_runner.RunnerStopped):
            await checking
        await stopping


async def test_submissions_waiting_for_the_store_count_against_max_queue(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A submission holds its upload until the task is stored: those waiting for the
    store's write lock (another process holds it) count against MAX_QUEUE too."""
    decodes = HeldDecode(monkeypatch)
    decodes.release.set()
    data = photos[0].read_bytes()
    async with running_app(make_settings(max_queue=2, max_batch_files=2)) as served:
        lock = sqlite3.connect(served.service.settings.data_dir / DATABASE_NAME)
        lock.isolation_level = None
        lock.execute("BEGIN IMMEDIATE")
        try:
            waiting = [
                asyncio.create_task(served.client.post("/tasks", files=upload(data)))
                for _ in range(2)
            ]
            # Both decoded, and waiting for the lock.
            await wait_for(lambda: decodes.calls == 2 and served.service._threads_working == 0)
            assert served.service._submissions_in_progress == 2
            refused = await served.client.post("/tasks", files=upload(data))
            assert refused.status_code == 503, refused.text
            assert "MAX_QUEUE allows 2" in refused.json()["detail"]
            assert decodes.calls == 2, "the refused submission was decoded"
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        assert [(await response).status_code for response in waiting] == [202, 202]


async def wait_for_running(served: RunningApp, count: int) -> None:
    async with asyncio.timeout(10):
        while True:
            with sqlite3.connect(served.service.settings.data_dir / DATABASE_NAME) as db:
                (running,) = db.execute(
                    "SELECT count(*) FROM tasks WHERE status = 'running'"
                ).fetchone()
            if running == count:
                return
            await asyncio.sleep(0.02)


async def test_tasks_survive_a_restart_of_the_app(photos: list[Path]) -> None:
    """Queued tasks and finished results are still there when the app starts again."""
    settings = make_settings(max_batch_size=1, drain_timeout_s=0)
    data = photos[0].read_bytes()
    async with running_app(settings) as served:
        done = await submit(served.client, data)
        await finished(served.client, done["task_id"])
        model = GatedModel(served)
        pending = [(await submit(served.client, data))["task_id"] for _ in range(4)]
        await wait_for(model.entered.is_set)
    model.release.set()  # the model's thread, stuck as the app stopped, may go now

    with sqlite3.connect(settings.data_dir / DATABASE_NAME) as db:
        statuses = sorted(row[0] for row in db.execute("SELECT status FROM tasks"))
    assert statuses == ["queued"] * 4 + ["succeeded"]
    async with running_app(settings) as served:
        first = await finished(served.client, done["task_id"])
        assert first["status"] == "succeeded"
        for task_id in pending:
            assert (await finished(served.client, task_id))["status"] == "succeeded"


# --- Webhooks -------------------------------------------------------------------------------

WEBHOOK_SETTINGS = {
    "webhook_allow_private": True,
    "webhook_backoff_s": 0.01,
    "webhook_backoff_max_s": 0.05,
    "webhook_timeout_s": 0.5,
    "task_poll_interval_s": 0.05,
}


def delivered_after(attempts: int) -> dict[str, object]:
    """A task's ``webhook`` once delivered, at the given attempt."""
    return {
        "status": "delivered",
        "attempts": attempts,
        "last_error": None,
        "next_attempt_at": None,
    }


async def webhook_done(client: httpx.AsyncClient, task_id: str) -> dict:
    """Poll until the task's webhook is delivered or given up."""
    async with asyncio.timeout(30):
        while True:
            task: dict = (await client.get(f"/task-status/{task_id}")).json()
            if task["webhook"] and task["webhook"]["status"] in {"delivered", "failed"}:
                return task
            await asyncio.sleep(0.02)


async def metrics_once_counted(client: httpx.AsyncClient, sample: str, value: float) -> str:
    """The exposition once ``sample`` has reached ``value``: a delivery's end is stored (and
    seen by polls) a moment before it is counted."""
    async with asyncio.timeout(10):
        while True:
            text = (await client.get("/metrics")).text
            if metric_value(text, sample) >= value:
                return text
            await asyncio.sleep(0.02)


async def test_a_callback_url_with_blanks_around_it_is_trimmed_and_an_empty_one_means_none(
    photos: list[Path],
) -> None:
    """A form field filled from an unset variable is empty: no webhook, as if not sent."""
    async with receiving() as receiver, running_app(make_settings(**WEBHOOK_SETTINGS)) as served:
        data = photos[0].read_bytes()
        padded = await submit(served.client, data, callback_url=f"  {receiver.url}\t")
        empty = [await submit(served.client, data, callback_url=value) for value in ("", "  ")]
        delivered = await webhook_done(served.client, padded["task_id"])
        for accepted in empty:
            task = await finished(served.client, accepted["task_id"])
            assert task["status"] == "succeeded"
            assert task["webhook"] is None

    assert delivered["webhook"] == delivered_after(1)
    assert [json.loads(r.body)["task_id"] for r in receiver.received] == [padded["task_id"]]


async def test_a_signed_webhook_carries_the_result(photos: list[Path]) -> None:
    settings = make_settings(webhook_secret="s3cret", **WEBHOOK_SETTINGS)
    async with receiving() as receiver, running_app(settings) as served:
        before = (await served.client.get("/metrics")).text
        accepted = await submit(
            served.client,
            photos[0].read_bytes(),
            callback_url=receiver.url,
            metadata='{"batch": "nightly"}',
        )
        waiting = (await served.client.get(accepted["status_url"])).json()["webhook"]
        assert waiting["status"] in {"waiting", "pending", "delivered"}
        task = await webhook_done(served.client, accepted["task_id"])
        after = await metrics_once_counted(
            served.client,
            "webhook_success_total",
            metric_value(before, "webhook_success_total") + 1,
        )

    assert task["webhook"] == delivered_after(1)
    assert len(receiver.received) == 1
    delivery = receiver.received[0]
    assert delivery.headers["Content-Type"] == "application/json"
    expected = "sha256=" + hmac.new(b"s3cret", delivery.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(delivery.headers["X-Signature-256"], expected)
    assert json.loads(delivery.body) == {
        "task_id": accepted["task_id"],
        "status": "succeeded",
        "prediction": task["prediction"],
        "metadata": {"batch": "nightly"},
    }
    assert (
        metric_value(after, "webhook_success_total") - metric_value(before, "webhook_success_total")
        == 1
    )
    assert (
        metric_value(after, "webhook_latency_seconds_count")
        - metric_value(before, "webhook_latency_seconds_count")
        == 1
    )


async def test_a_shutdown_lets_a_webhook_in_flight_finish(photos: list[Path]) -> None:
    """Cut off, a delivery the receiver may already have would be sent again at the next
    start: shutdown waits for it (within the tasks' grace time)."""
    settings = make_settings(**WEBHOOK_SETTINGS | {"webhook_timeout_s": 5.0})
    async with receiving() as receiver:
        receiver.script = [STALL]
        async with running_app(settings) as served:
            await submit(served.client, photos[0].read_bytes(), callback_url=receiver.url)
            await asyncio.wait_for(receiver.arrived.wait(), 10)
            asyncio.get_running_loop().call_later(0.5, receiver.release.set)
        assert len(receiver.received) == 1
    with sqlite3.connect(settings.data_dir / DATABASE_NAME) as db:
        row = db.execute("SELECT webhook_status, webhook_attempts, lease_owner FROM tasks")
        assert row.fetchall() == [("delivered", 1, None)]


@pytest.mark.parametrize(
    ("answers", "posts"), [([], 1), ([503], 2)], ids=["accepted", "refused-once"]
)
async def test_a_task_that_finishes_in_the_drain_has_its_webhook_sent_before_the_exit(
    photos: list[Path], answers: list[int | str], posts: int
) -> None:
    """The claim loop goes on delivering after task claims stop: a task the drain finishes
    has its webhook delivered, a retry included, within the tasks' grace, not left for the
    next start."""
    settings = make_settings(**WEBHOOK_SETTINGS)
    async with receiving() as receiver, running_app(settings) as served:
        receiver.script = list(answers)
        model = GatedModel(served)
        await submit(served.client, photos[0].read_bytes(), callback_url=receiver.url)
        await asyncio.to_thread(model.entered.wait, 10)
        served.service.begin_shutdown()
        model.release.set()
        await served.service.stop()
        assert len(receiver.received) == posts
    assert json.loads(receiver.received[-1].body)["status"] == "succeeded"
    with sqlite3.connect(settings.data_dir / DATABASE_NAME) as db:
        row = db.execute("SELECT status, webhook_status, webhook_attempts, lease_owner FROM tasks")
        assert row.fetchall() == [("succeeded", "delivered", posts, None)]


async def test_a_retry_that_falls_due_in_the_grace_is_made_before_the_exit(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A delivery waiting for its next attempt when the worker stops, due within the tasks'
    grace, is tried then, not left for the next start."""
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    settings = make_settings(
        **WEBHOOK_SETTINGS | {"webhook_backoff_s": 1.0, "webhook_backoff_max_s": 1.0}
    )
    async with receiving() as receiver, running_app(settings) as served:
        receiver.script = [503]
        accepted = await submit(served.client, photos[0].read_bytes(), callback_url=receiver.url)
        await wait_for(lambda: pending_delivery(settings, accepted["task_id"])[3] == 1)
        served.service.begin_shutdown()
        await served.service.stop()
        assert len(receiver.received) == 2
    assert pending_delivery(settings, accepted["task_id"])[:2] == ("delivered", None)


async def test_a_retry_due_late_in_the_grace_is_left_for_later_not_begun_and_cut_off(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deliveries are claimed in the first half of the grace only: an attempt begun near its
    end would be cut off, counted, perhaps never sent."""
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    monkeypatch.setattr(core, "TASK_STOP_GRACE_S", 2.0)
    settings = make_settings(
        **WEBHOOK_SETTINGS | {"webhook_backoff_s": 3.0, "webhook_backoff_max_s": 3.0}
    )
    async with receiving() as receiver, running_app(settings) as served:
        receiver.script = [503, STALL]
        accepted = await submit(served.client, photos[0].read_bytes(), callback_url=receiver.url)
        await wait_for(lambda: pending_delivery(settings, accepted["task_id"])[3] == 1)
        await asyncio.sleep(1.5)  # the retry is due 1.5 s into the grace: in its second half
        served.service.begin_shutdown()
        await served.service.stop()
        assert len(receiver.received) == 1

    status, owner, _, attempts, error = pending_delivery(settings, accepted["task_id"])
    assert (status, owner, attempts, error) == ("pending", None, 1, "callback answered 503")


def hold_write_lock(database: Path, after_s: float, for_s: float) -> None:
    """Another process's write transaction: from ``after_s`` from now, for ``for_s``."""
    time.sleep(after_s)
    with closing(sqlite3.connect(database, isolation_level=None)) as db:
        db.execute("BEGIN IMMEDIATE")
        time.sleep(for_s)
        db.execute("COMMIT")


async def test_a_stop_while_another_process_holds_the_write_lock_ends_in_time(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Results waiting for a write lock another process holds wait no later than shortly
    after the stop's grace, and the hand-back after them its own short while: the stop
    ends before gunicorn's graceful_timeout would kill the worker, however many writes
    queued, and says what it could not hand back. (Each waiting its full busy timeout in
    turn, four results and the hand-back would take 15 s here, the worker killed
    silently.)"""
    monkeypatch.setattr(tasks, "BUSY_TIMEOUT_MS", 3000)
    monkeypatch.setattr(core, "TASK_STOP_GRACE_S", 0.5)
    monkeypatch.setattr(task_runner, "WRITES_AFTER_GRACE_S", 0.3)
    monkeypatch.setattr(task_runner, "HAND_BACK_LOCK_WAIT_S", 0.3)
    data = photos[0].read_bytes()
    async with running_app(make_settings(drain_timeout_s=1)) as served:
        model = GatedModel(served)
        for _ in range(4):
            await submit(served.client, data)
        await asyncio.to_thread(model.entered.wait, 10)
        lock = sqlite3.connect(served.service.settings.data_dir / DATABASE_NAME)
        lock.isolation_level = None
        lock.execute("BEGIN IMMEDIATE")
        try:
            with caplog.at_level(logging.INFO, logger="service.task_runner"):
                served.service.begin_shutdown()
                model.release.set()
                started = time.monotonic()
                await served.service.stop()
                took_s = time.monotonic() - started
                await asyncio.sleep(0.1)  # the abandoned writes' ends are logged
        finally:
            lock.execute("ROLLBACK")
            lock.close()
    gc.collect()  # an exception nobody retrieved is logged as its future is collected
    assert took_s < 1 + 0.5 + 0.3 + 0.3 + 1.0, took_s
    assert "could not hand back this worker's tasks at shutdown" in caplog.text
    assert "failed as the worker stopped: the task store is busy" in caplog.text
    assert "never retrieved" not in caplog.text


async def test_a_submission_during_a_shutdown_waits_for_a_held_lock_only_until_the_grace(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the shutdown has begun, a request's write waits for another process's lock no
    longer than the task runner's own writes: the stop waits for its thread, and a wait of
    the full busy timeout would take the worker past graceful_timeout."""
    monkeypatch.setattr(tasks, "BUSY_TIMEOUT_MS", 5000)
    monkeypatch.setattr(core, "TASK_STOP_GRACE_S", 0.5)
    monkeypatch.setattr(task_runner, "WRITES_AFTER_GRACE_S", 0.3)
    data = photos[0].read_bytes()
    async with running_app(make_settings(drain_timeout_s=0)) as served:
        await submit(served.client, data)  # the store exists
        lock = sqlite3.connect(served.service.settings.data_dir / DATABASE_NAME)
        lock.isolation_level = None
        lock.execute("BEGIN IMMEDIATE")
        try:
            served.service.begin_shutdown()
            started = time.monotonic()
            refused = await served.client.post("/tasks", files=upload(data))
            took_s = time.monotonic() - started
        finally:
            lock.execute("ROLLBACK")
            lock.close()
    assert refused.status_code == 503, refused.text
    assert took_s < 0.5 + 0.3 + 1.0, took_s


async def test_a_delivery_claim_that_ends_late_in_the_grace_begins_no_attempt(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A claim begun in the first half of the grace that waits for another process's lock
    into the second half hands back what it took, rather than begin attempts there."""
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    monkeypatch.setattr(core, "TASK_STOP_GRACE_S", 2.0)
    settings = make_settings(
        **WEBHOOK_SETTINGS
        | {
            "webhook_backoff_s": 2.5,
            "webhook_backoff_max_s": 2.5,
            "webhook_timeout_s": 30.0,
            # The claim loop wakes as the retry falls due, and its claim meets the lock.
            "task_poll_interval_s": 5.0,
        }
    )
    async with receiving() as receiver, running_app(settings) as served:
        receiver.script = [503, STALL]
        accepted = await submit(served.client, photos[0].read_bytes(), callback_url=receiver.url)
        await wait_for(lambda: pending_delivery(settings, accepted["task_id"])[3] == 1)
        await asyncio.sleep(2.0)  # the retry is due 0.5 s into the grace
        served.service.begin_shutdown()
        locking = asyncio.to_thread(hold_write_lock, settings.data_dir / DATABASE_NAME, 0.3, 1.0)
        await asyncio.gather(locking, served.service.stop())
        assert len(receiver.received) == 1

    status, owner, _, attempts, error = pending_delivery(settings, accepted["task_id"])
    assert (status, owner, attempts, error) == ("pending", None, 1, "callback answered 503")


async def test_an_attempt_whose_record_waits_for_the_store_at_the_cut_off_is_still_stored(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attempts timed out, but their records wait for another process's lock when the
    grace runs out: written all the same, before the hand-back, so they count."""
    monkeypatch.setattr(core, "TASK_STOP_GRACE_S", 2.0)
    settings = make_settings(
        **WEBHOOK_SETTINGS | {"webhook_timeout_s": 1.2, "webhook_max_attempts": 1}
    )
    async with receiving() as receiver, running_app(settings) as served:
        receiver.script = [STALL, STALL]
        task_ids = [
            (await submit(served.client, photo.read_bytes(), callback_url=receiver.url))["task_id"]
            for photo in photos[:2]
        ]
        await wait_for(lambda: len(receiver.received) == 2)
        served.service.begin_shutdown()
        locking = asyncio.to_thread(hold_write_lock, settings.data_dir / DATABASE_NAME, 0.5, 2.5)
        await asyncio.gather(locking, served.service.stop())

    for task_id in task_ids:
        status, owner, _, attempts, error = pending_delivery(settings, task_id)
        assert (status, owner, attempts) == ("failed", None, 1)
        assert error == "timed out after 1.2 s"


async def test_an_attempt_cut_off_at_the_end_of_the_grace_is_counted(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver may have it: counted, so that a receiver gets no more POSTs than
    WEBHOOK_MAX_ATTEMPTS, and tried again after a backoff, not at once."""
    monkeypatch.setattr(core, "TASK_STOP_GRACE_S", 0.5)
    settings = make_settings(**WEBHOOK_SETTINGS | {"webhook_timeout_s": 30.0})
    async with receiving() as receiver, running_app(settings) as served:
        receiver.script = [STALL]
        accepted = await submit(served.client, photos[0].read_bytes(), callback_url=receiver.url)
        await asyncio.wait_for(receiver.arrived.wait(), 10)
        served.service.begin_shutdown()
        await served.service.stop()
        stopped_at = time.time()

    status, owner, retry_at, attempts, error = pending_delivery(settings, accepted["task_id"])
    assert (status, owner, attempts) == ("pending", None, 1)
    assert error == "cut off by a shutdown before the callback answered"
    assert isinstance(retry_at, float)
    assert retry_at <= stopped_at + WEBHOOK_SETTINGS["webhook_backoff_s"]


async def test_the_last_allowed_attempt_cut_off_is_counted_and_made_again_after_a_restart(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With WEBHOOK_MAX_ATTEMPTS=1, an attempt cut off by a stop is counted (the receiver
    may have it) and made again by the next worker (it may not): ``attempts`` is always
    the number of POSTs the receiver may have had."""
    monkeypatch.setattr(core, "TASK_STOP_GRACE_S", 0.5)
    settings = make_settings(
        **WEBHOOK_SETTINGS | {"webhook_timeout_s": 30.0, "webhook_max_attempts": 1}
    )
    async with receiving() as receiver:
        receiver.script = [STALL]
        async with running_app(settings) as served:
            accepted = await submit(
                served.client, photos[0].read_bytes(), callback_url=receiver.url
            )
            await asyncio.wait_for(receiver.arrived.wait(), 10)
            served.service.begin_shutdown()
            await served.service.stop()
        status, owner, _, attempts, error = pending_delivery(settings, accepted["task_id"])
        assert (status, owner, attempts) == ("pending", None, 1)
        assert error == "cut off by a shutdown before the callback answered"

        async with running_app(settings) as served:
            task = await webhook_done(served.client, accepted["task_id"])
        assert len(receiver.received) == 2
    assert task["webhook"] == {
        "status": "delivered",
        "attempts": 2,
        "last_error": None,
        "next_attempt_at": None,
    }


async def test_a_failed_task_is_reported_to_its_webhook_too(photos: list[Path]) -> None:
    async with receiving() as receiver, running_app(make_settings(**WEBHOOK_SETTINGS)) as served:
        model = GatedModel(served)
        model.fail_next = True
        model.release.set()
        accepted = await submit(served.client, photos[0].read_bytes(), callback_url=receiver.url)
        task = await webhook_done(served.client, accepted["task_id"])

    assert task["status"] == "failed"
    body = json.loads(receiver.received[0].body)
    assert body == {
        "task_id": accepted["task_id"],
        "status": "failed",
        "error": task["error"],
        "metadata": None,
    }
    assert "X-Signature-256" not in receiver.received[0].headers  # no WEBHOOK_SECRET


async def test_webhook_retries_through_errors_and_timeouts(
    photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    async with receiving() as receiver, running_app(make_settings(**WEBHOOK_SETTINGS)) as served:
        receiver.script = [500, STALL, 503]
        accepted = await submit(served.client, photos[0].read_bytes(), callback_url=receiver.url)
        with caplog.at_level(logging.INFO, logger="service.task_runner"):
            task = await webhook_done(served.client, accepted["task_id"])

    failures = [r.getMessage() for r in caplog.records if "attempt" in r.getMessage()]
    assert [message.split(": ", 1)[1].split(";")[0] for message in failures] == [
        "attempt 1 failed (callback answered 500)",
        f"attempt 2 failed (timed out after {WEBHOOK_SETTINGS['webhook_timeout_s']} s)",
        "attempt 3 failed (callback answered 503)",
    ]

    assert task["webhook"] == delivered_after(4)
    assert len(receiver.received) == 4
    assert len({r.body for r in receiver.received}) == 1, "every attempt sends the same body"


async def test_webhook_gives_up_after_the_attempt_limit(
    photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(webhook_max_attempts=3, **WEBHOOK_SETTINGS)
    async with receiving() as receiver, running_app(settings) as served:
        receiver.then = 500
        before = (await served.client.get("/metrics")).text
        accepted = await submit(served.client, photos[0].read_bytes(), callback_url=receiver.url)
        task = await webhook_done(served.client, accepted["task_id"])
        after = await metrics_once_counted(
            served.client,
            "webhook_failure_total",
            metric_value(before, "webhook_failure_total") + 1,
        )

    assert task["status"] == "succeeded", "a failed delivery does not fail the task"
    assert task["webhook"] == {
        "status": "failed",
        "attempts": 3,
        "last_error": "callback answered 500",
        "next_attempt_at": None,
    }
    assert len(receiver.received) == 3
    for sample, growth in (("webhook_failure_total", 1), ("webhook_success_total", 0)):
        assert metric_value(after, sample) - metric_value(before, sample) == growth
    given_up = f"webhook for task {accepted['task_id']} given up after 3 attempts: callback"
    assert given_up in caplog.text


async def test_a_store_that_fails_at_shutdown_still_releases_everything(
    photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A hand-back that fails (the store unwritable as the worker stops) is logged; the
    shutdown goes on: connections, webhook client and threads are closed all the same,
    and the tasks return when their leases run out."""
    settings = make_settings(max_batch_size=1, drain_timeout_s=0)
    async with running_app(settings) as served:
        runner = served.service.tasks
        assert runner is not None
        model = GatedModel(served)
        await submit(served.client, photos[0].read_bytes())
        await wait_for(model.entered.is_set)

        def release(owner: str, **kwargs: object) -> int:
            raise tasks.TaskStoreFailed("disk I/O error")

        store = runner.store
        store.release = release  # type: ignore[method-assign]
    model.release.set()
    assert "could not hand back this worker's tasks at shutdown (disk I/O error)" in caplog.text
    assert not [record for record in caplog.records if record.exc_info], "a known failure"
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        store.count_queued()
    with pytest.raises(sqlite3.ProgrammingError, match="closed"):
        runner.reader.count_queued()
    assert runner._db_thread._shutdown
    assert runner._read_thread._shutdown
    assert served.service._inference_pool._shutdown


async def test_shutdown_hands_unfinished_tasks_back_to_the_queue(photos: list[Path]) -> None:
    """A shutdown that cannot wait (no drain time, the model stuck) leaves the tasks it held
    queued again, unclaimed; only the one the model was stuck on has used an attempt. The
    next start runs each of them once more."""
    settings = make_settings(max_batch_size=1, drain_timeout_s=0)
    data = photos[0].read_bytes()
    async with running_app(settings) as served:
        model = GatedModel(served)
        task_ids = [(await submit(served.client, data))["task_id"] for _ in range(4)]
        await wait_for(model.entered.is_set)
        await wait_for_running(served, 2)
    model.release.set()  # let the stuck inference thread go

    with sqlite3.connect(settings.data_dir / DATABASE_NAME) as db:
        rows = db.execute("SELECT status, attempts, lease_owner FROM tasks").fetchall()
    assert sorted(rows) == [("queued", 0, None)] * 3 + [("queued", 1, None)]

    async with running_app(settings) as served:
        for task_id in task_ids:
            assert (await finished(served.client, task_id))["status"] == "succeeded"
    with sqlite3.connect(settings.data_dir / DATABASE_NAME) as db:
        attempts = sorted(row[0] for row in db.execute("SELECT attempts FROM tasks"))
    assert attempts == [1, 1, 1, 2]


async def test_tasks_that_the_drain_runs_count_their_attempt(photos: list[Path]) -> None:
    settings = make_settings(max_batch_size=1, drain_timeout_s=10)
    data = photos[0].read_bytes()
    async with running_app(settings) as served:
        model = GatedModel(served)
        for _ in range(2):
            await submit(served.client, data)
        await wait_for(model.entered.is_set)
        processor = served.service.processor
        assert processor is not None
        await wait_for(lambda: processor.queue_depth == 1)  # the second, in the batcher
        drain = processor.stop

        async def release_the_model_then_drain(drain_timeout_s: float) -> None:
            model.release.set()  # the second task enters the model during the drain
            await drain(drain_timeout_s)

        processor.stop = release_the_model_then_drain  # type: ignore[method-assign]

    assert model.batch_sizes == [1, 1]
    with sqlite3.connect(settings.data_dir / DATABASE_NAME) as db:
        rows = db.execute("SELECT status, attempts FROM tasks").fetchall()
    assert rows == [("succeeded", 1)] * 2


# --- Idempotency keys -------------------------------------------------------------------------


async def test_a_resent_request_with_its_idempotency_key_returns_the_same_task(
    served: RunningApp, photos: list[Path]
) -> None:
    """A client that never got its answer sends again with the same key: one task, not two."""
    data = photos[0].read_bytes()
    key = {"Idempotency-Key": str(uuid.uuid4())}
    first = await served.client.post("/tasks", files=upload(data), headers=key)
    again = await served.client.post("/tasks", files=upload(data), headers=key)
    other = await served.client.post(
        "/tasks", files=upload(data), headers={"Idempotency-Key": str(uuid.uuid4())}
    )

    assert (first.status_code, again.status_code, other.status_code) == (202, 202, 202)
    assert again.json()["task_id"] == first.json()["task_id"]
    assert again.headers["location"] == first.headers["location"]
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert other.json()["task_id"] != first.json()["task_id"]
    assert stored_rows(served, "tasks") == 2


@pytest.mark.parametrize("lookup_error", [socket.EAI_AGAIN, socket.EAI_NONAME])
async def test_a_resend_is_its_task_though_the_callback_host_no_longer_resolves(
    served: RunningApp, photos: list[Path], monkeypatch: pytest.MonkeyPatch, lookup_error: int
) -> None:
    """The URL was checked as the task was stored: DNS failing now (a 503) or the name gone
    (a 422) must not turn the replay the client relies on into an error."""
    public = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 443))]
    monkeypatch.setattr(socket, "getaddrinfo", lambda *args, **kwargs: public)
    data = photos[0].read_bytes()
    key = {"Idempotency-Key": str(uuid.uuid4())}
    fields = {"callback_url": "https://hooks.example/done"}
    first = await served.client.post("/tasks", files=upload(data), data=fields, headers=key)
    assert first.status_code == 202, first.text

    def failing(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(lookup_error, "the name cannot be looked up")

    monkeypatch.setattr(socket, "getaddrinfo", failing)
    again = await served.client.post("/tasks", files=upload(data), data=fields, headers=key)
    assert again.status_code == 202, again.text
    assert again.json()["task_id"] == first.json()["task_id"]
    assert again.headers["idempotent-replayed"] == "true"
    # A new request with that URL is still looked up, and refused.
    other = await served.client.post("/tasks", files=upload(data), data=fields)
    assert other.status_code in (422, 503), other.text
    # A resend's URL is not looked up, but its form is checked: were the task to expire
    # meanwhile, the resend would be stored as a new task.
    malformed = {"callback_url": "ftp://hooks.example/done"}
    bad = await served.client.post("/tasks", files=upload(data), data=malformed, headers=key)
    assert bad.status_code == 422, bad.text
    assert bad.json()["detail"] == "callback_url scheme is 'ftp'; expected http or https"
    assert stored_rows(served, "tasks") == 1


async def test_an_idempotency_key_reused_for_another_request_is_422(
    served: RunningApp, photos: list[Path]
) -> None:
    key = {"Idempotency-Key": "order-17"}
    first = await served.client.post("/tasks", files=upload(photos[0].read_bytes()), headers=key)
    assert first.status_code == 202
    for files, data in (
        (upload(photos[1].read_bytes()), {}),  # another image
        (upload(photos[0].read_bytes()), {"metadata": '{"x": 1}'}),  # other fields
    ):
        response = await served.client.post("/tasks", files=files, data=data, headers=key)
        assert response.status_code == 422, response.text
        assert "different request" in response.json()["detail"]
    assert stored_rows(served, "tasks") == 1


@pytest.mark.parametrize("key", [b"has space", b"x" * 256, b"tab\there", "ünï".encode()])
async def test_a_malformed_idempotency_key_is_422(
    served: RunningApp, photos: list[Path], key: bytes
) -> None:
    response = await served.client.post(
        "/tasks", files=upload(photos[0].read_bytes()), headers={"Idempotency-Key": key}
    )
    assert response.status_code == 422, response.text
    assert "Idempotency-Key" in response.json()["detail"]
    assert stored_rows(served, "tasks") == 0


async def test_blanks_around_an_idempotency_key_are_not_part_of_it(
    served: RunningApp, photos: list[Path]
) -> None:
    """As for any header (RFC 9110 5.5); the ASGI server drops leading ones only."""
    data = photos[0].read_bytes()
    first = await served.client.post(
        "/tasks", files=upload(data), headers={"Idempotency-Key": "order-18"}
    )
    for sent in ("order-18 ", "order-18\t", " \torder-18 \t"):
        again = await served.client.post(
            "/tasks", files=upload(data), headers={"Idempotency-Key": sent}
        )
        assert again.status_code == 202, again.text
        assert again.json()["task_id"] == first.json()["task_id"]
    assert stored_rows(served, "tasks") == 1


async def test_an_idempotency_key_sent_twice_is_422(served: RunningApp, photos: list[Path]) -> None:
    """One of them would be dropped without a word, and a resend with it make a second task."""
    response = await served.client.post(
        "/tasks",
        files=upload(photos[0].read_bytes()),
        headers=[("Idempotency-Key", "order-19"), ("Idempotency-Key", "order-20")],
    )
    assert response.status_code == 422
    assert response.json()["detail"] == "Idempotency-Key was sent 2 times; send it at most once"
    assert stored_rows(served, "tasks") == 0


# --- Store faults -----------------------------------------------------------------------------


async def test_a_result_that_could_not_be_stored_is_computed_again_after_the_lease(
    photos: list[Path],
) -> None:
    """If storing a result fails (a locked or full disk), the task is not left "running"
    for ever: its lease is no longer renewed, runs out, and the task runs again."""
    settings = make_settings(task_lease_s=1.0, task_poll_interval_s=0.05)
    async with running_app(settings) as served:
        store = served.service.task_runner().store
        real_finish = store.finish
        failures = []

        def finish_failing_once(*args: object, **kwargs: object) -> object:
            if not failures:
                failures.append(args[0])
                raise sqlite3.OperationalError("database is locked")
            return real_finish(*args, **kwargs)  # type: ignore[arg-type]

        store.finish = finish_failing_once  # type: ignore[method-assign]
        accepted = await submit(served.client, photos[0].read_bytes())
        task = await finished(served.client, accepted["task_id"])

    assert failures == [accepted["task_id"]]
    assert task["status"] == "succeeded"
    with sqlite3.connect(settings.data_dir / DATABASE_NAME) as db:
        assert db.execute("SELECT attempts FROM tasks").fetchall() == [(2,)]


async def test_leases_are_renewed_while_the_workers_other_store_work_waits(
    photos: list[Path],
) -> None:
    """Queued behind the worker's claims, results and clean-up (seconds, once large images
    are freed), renewals would come after their lease ran out, and another worker run the
    task again beside this one: they have a connection and thread of their own."""
    lease_s = 1.0
    settings = make_settings(task_lease_s=lease_s, task_poll_interval_s=0.05)
    async with running_app(settings) as served:
        model = GatedModel(served)
        await submit(served.client, photos[0].read_bytes())
        await asyncio.to_thread(model.entered.wait, 10)
        runner = served.service.task_runner()
        loop = asyncio.get_running_loop()
        busy = loop.run_in_executor(runner._db_thread, time.sleep, 3 * lease_s)
        leases = []
        for _ in range(6):
            await asyncio.sleep(lease_s / 2)
            with sqlite3.connect(settings.data_dir / DATABASE_NAME) as db:
                (lease_until,) = db.execute("SELECT lease_until FROM tasks").fetchone()
            leases.append(lease_until - time.time())
        await busy
        model.release.set()
    assert min(leases) > 0, leases  # never ran out while the other work waited


@pytest.mark.parametrize(
    "error",
    [
        tasks.TaskStoreFailed("the task store could not be written (disk full)"),
        tasks.TaskStoreBusy("the task store is busy: its write lock was not free in time"),
    ],
)
async def test_after_its_store_fails_a_worker_takes_no_work_over_for_a_lease(
    error: Exception,
) -> None:
    """A full or failing disk fails every worker's writes, the lease renewals of the worker
    holding a task too, and so does a write lock held past the busy timeout. Once it mends,
    the first claim would take over work whose lease ran out meanwhile from a holder alive
    and renewing: run twice, its webhook sent twice. A worker whose own store failed takes
    none over for a lease's length (queued tasks it still claims)."""
    lease_s = 1.0
    settings = make_settings(task_lease_s=lease_s, task_poll_interval_s=0.05)
    async with running_app(settings) as served:
        store = served.service.task_runner().store
        real_claim, real_count = store.claim, store.count_queued
        claims: list[tuple[float, bool]] = []
        failed_at: list[float] = []

        def recording_claim(*args: Any, **kwargs: Any) -> Any:
            claims.append((time.monotonic(), kwargs["take_over"]))
            return real_claim(*args, **kwargs)

        def failing_once(*args: Any, **kwargs: Any) -> Any:
            if not failed_at:
                failed_at.append(time.monotonic())
                raise error
            return real_count(*args, **kwargs)

        store.claim = recording_claim  # type: ignore[method-assign]
        await asyncio.sleep(0.3)
        store.count_queued = failing_once  # type: ignore[method-assign]
        await asyncio.sleep(lease_s + 0.5)

    assert failed_at
    before = [take_over for at, take_over in claims if at < failed_at[0]]
    within = [take_over for at, take_over in claims if failed_at[0] < at < failed_at[0] + lease_s]
    after = [take_over for at, take_over in claims if at > failed_at[0] + lease_s + 0.1]
    assert before == [True] * len(before) != []
    assert within == [False] * len(within) != []
    assert after == [True] * len(after) != []


@pytest.mark.parametrize(
    "error",
    [
        tasks.TaskStoreBusy("the task store is busy: another process held its write lock"),
        tasks.TaskStoreFailed("the task store could not be written (database or disk is full)"),
    ],
)
async def test_a_result_the_store_refuses_for_now_is_stored_once_it_can_be(
    photos: list[Path], error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holding the lock past the busy timeout, or a full disk, does not
    throw the model's answer away: the write is tried again (the lease kept meanwhile),
    and the task runs once."""
    async with running_app(make_settings(task_poll_interval_s=0.05)) as served:
        store = served.service.task_runner().store
        real_finish = store.finish
        refusals = []

        def finish_refused_twice(*args: object, **kwargs: object) -> object:
            if len(refusals) < 2:
                refusals.append(args[0])
                raise error
            return real_finish(*args, **kwargs)  # type: ignore[arg-type]

        store.finish = finish_refused_twice  # type: ignore[method-assign]
        model = GatedModel(served)
        model.release.set()
        accepted = await submit(served.client, photos[0].read_bytes())
        with caplog.at_level(logging.WARNING):
            task = await finished(served.client, accepted["task_id"])

    assert refusals == [accepted["task_id"]] * 2
    assert task["status"] == "succeeded"
    assert model.batch_sizes == [1], "the model ran the task again"
    assert f"storing the result of task {accepted['task_id']} failed" in caplog.text
    # Refused twice, logged once: with a full disk every result fails so, again and again.
    assert caplog.text.count("it is retried until the store takes it") == 1
    with sqlite3.connect(served.service.settings.data_dir / DATABASE_NAME) as db:
        assert db.execute("SELECT attempts FROM tasks").fetchall() == [(1,)]


async def test_an_attempt_the_store_refuses_for_now_is_stored_when_it_can_be(
    photos: list[Path],
) -> None:
    """A failed attempt's record, which sets when the next one is due, is written again
    while the store refuses it; the delivery goes on and ends with the full count."""
    async with receiving() as receiver, running_app(make_settings(**WEBHOOK_SETTINGS)) as served:
        receiver.script = [503, 503]
        store = served.service.task_runner().store
        defer = store.defer_webhook
        refused = 0

        def defer_refused_once(*args: Any, **kwargs: Any) -> bool:
            nonlocal refused
            if not refused:
                refused += 1
                raise tasks.TaskStoreFailed("the disk is full")
            return defer(*args, **kwargs)

        store.defer_webhook = defer_refused_once  # type: ignore[method-assign]
        accepted = await submit(served.client, photos[0].read_bytes(), callback_url=receiver.url)
        task = await webhook_done(served.client, accepted["task_id"])

    assert refused == 1
    assert task["webhook"] == delivered_after(3)
    assert len(receiver.received) == 3


async def test_a_delivery_whose_end_the_store_refuses_for_now_is_not_sent_again(
    photos: list[Path],
) -> None:
    """The receiver has it: the end is written again until stored, not the webhook sent
    again."""
    async with receiving() as receiver, running_app(make_settings(**WEBHOOK_SETTINGS)) as served:
        store = served.service.task_runner().store
        finish = store.finish_webhook
        finishes = 0

        def finish_refused_once(*args: Any, **kwargs: Any) -> bool:
            nonlocal finishes
            finishes += 1
            if finishes == 1:
                raise tasks.TaskStoreBusy("another process holds the lock")
            return finish(*args, **kwargs)

        store.finish_webhook = finish_refused_once  # type: ignore[method-assign]
        accepted = await submit(served.client, photos[0].read_bytes(), callback_url=receiver.url)
        task = await webhook_done(served.client, accepted["task_id"])

    assert finishes == 2
    assert task["webhook"] == delivered_after(1)
    assert len(receiver.received) == 1


@pytest.mark.parametrize("answer", [200, 503])
async def test_an_attempt_whose_delivery_another_worker_took_over_is_not_counted(
    photos: list[Path], caplog: pytest.LogCaptureFixture, answer: int
) -> None:
    """A worker whose delivery lease ran out while it sent (it stalled) and which another
    worker claimed neither stores nor counts its attempt's outcome: the other one's
    attempts are the ones that count, and each delivery's end is counted once."""
    async with receiving() as receiver, running_app(make_settings(**WEBHOOK_SETTINGS)) as served:
        receiver.script = [answer]
        store = served.service.task_runner().store
        name = "finish_webhook" if answer == 200 else "defer_webhook"
        write = getattr(store, name)
        outcomes: list[bool] = []

        def write_after_a_take_over(task_id: str, *args: Any, **kwargs: Any) -> bool:
            with closing(sqlite3.connect(store.path)) as db, db:
                db.execute(
                    "UPDATE tasks SET lease_owner = 'another-worker', lease_until = ? WHERE id = ?",
                    (time.time() + 3600, task_id),
                )
            outcomes.append(write(task_id, *args, **kwargs))
            return outcomes[-1]

        setattr(store, name, write_after_a_take_over)
        before = (await served.client.get("/metrics")).text
        with caplog.at_level(logging.INFO, logger="service.task_runner"):
            accepted = await submit(
                served.client, photos[0].read_bytes(), callback_url=receiver.url
            )
            await wait_for(lambda: outcomes)
            await wait_for(lambda: "taken over by another worker" in caplog.text)
        after = (await served.client.get("/metrics")).text
        task = (await served.client.get(accepted["status_url"])).json()

    assert outcomes == [False]
    assert len(receiver.received) == 1
    assert "next in" not in caplog.text
    assert task["webhook"]["status"] == "pending"
    assert task["webhook"]["attempts"] == 0
    for sample in ("webhook_success_total", "webhook_failure_total"):
        assert metric_value(after, sample) == metric_value(before, sample)


def pending_delivery(settings: Settings, task_id: str) -> tuple[object, ...]:
    """A delivery's state in the store: who holds it, until when, its count and error."""
    with sqlite3.connect(settings.data_dir / DATABASE_NAME) as db:
        row = db.execute(
            "SELECT webhook_status, lease_owner, lease_until, webhook_attempts, "
            "webhook_last_error FROM tasks WHERE id = ?",
            (task_id,),
        ).fetchone()
    return tuple(row)


async def test_a_delivery_waiting_to_retry_holds_no_slot_of_its_worker(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A receiver that is down must not hold up the webhooks of other receivers: between
    attempts the delivery waits in the store, held by no worker, so with a single delivery
    slot another task's webhook goes out at once."""
    monkeypatch.setattr(core, "RunnerConfig", partial(task_runner.RunnerConfig, webhook_capacity=1))
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    settings = make_settings(
        **WEBHOOK_SETTINGS | {"webhook_backoff_s": 30.0, "webhook_backoff_max_s": 30.0}
    )
    async with (
        receiving() as down,
        receiving() as up,
        running_app(settings) as served,
    ):
        down.then = 503
        failing = await submit(served.client, photos[0].read_bytes(), callback_url=down.url)
        await asyncio.wait_for(down.arrived.wait(), 10)
        await wait_for(lambda: pending_delivery(settings, failing["task_id"])[3] == 1)
        waiting_since = time.time()

        healthy = await submit(served.client, photos[1].read_bytes(), callback_url=up.url)
        async with asyncio.timeout(10):
            task = await webhook_done(served.client, healthy["task_id"])
        status = (await served.client.get(failing["status_url"])).json()

    assert task["webhook"] == delivered_after(1)
    assert len(down.received) == 1
    webhook_status, owner, retry_at, attempts, error = pending_delivery(
        settings, failing["task_id"]
    )
    assert (webhook_status, owner, attempts, error) == ("pending", None, 1, "callback answered 503")
    assert isinstance(retry_at, float)
    assert waiting_since + 20 < retry_at < waiting_since + 31
    assert status["webhook"] == {
        "status": "pending",
        "attempts": 1,
        "last_error": "callback answered 503",
        "next_attempt_at": datetime.fromtimestamp(retry_at, UTC).isoformat().replace("+00:00", "Z"),
    }


async def test_a_retry_goes_out_when_due_not_at_the_next_poll(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    settings = make_settings(**WEBHOOK_SETTINGS | {"task_poll_interval_s": 60.0})
    async with receiving() as receiver, running_app(settings) as served:
        receiver.script = [503]
        accepted = await submit(served.client, photos[0].read_bytes(), callback_url=receiver.url)
        async with asyncio.timeout(10):
            task = await webhook_done(served.client, accepted["task_id"])

    assert task["webhook"] == delivered_after(2)


async def test_a_delivery_waiting_at_shutdown_is_retried_when_due_after_the_restart(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its wait, beyond the tasks' grace at the shutdown, is stored: the next start neither
    sends it early nor starts its count over."""
    monkeypatch.setattr(random, "uniform", lambda low, high: high)
    monkeypatch.setattr(core, "TASK_STOP_GRACE_S", 0.2)
    settings = make_settings(
        **WEBHOOK_SETTINGS | {"webhook_backoff_s": 1.5, "webhook_backoff_max_s": 1.5}
    )
    async with receiving() as receiver:
        receiver.script = [503]
        async with running_app(settings) as served:
            accepted = await submit(
                served.client, photos[0].read_bytes(), callback_url=receiver.url
            )
            await wait_for(lambda: pending_delivery(settings, accepted["task_id"])[3] == 1)
        retry_at = pending_delivery(settings, accepted["task_id"])[2]
        assert isinstance(retry_at, float)

        async with running_app(settings) as served:
            task = await webhook_done(served.client, accepted["task_id"])

    assert task["webhook"] == delivered_after(2)
    assert len(receiver.received) == 2
    assert receiver.received[1].at >= retry_at


async def test_a_cancelled_task_reports_no_webhook(photos: list[Path]) -> None:
    async with running_app(make_settings(max_batch_size=1, **WEBHOOK_SETTINGS)) as served:
        model = GatedModel(served)
        data = photos[0].read_bytes()
        tasks = [
            (await submit(served.client, data, callback_url="http://127.0.0.1:9/hook"))["task_id"]
            for _ in range(3)
        ]
        await wait_for_running(served, 2)
        cancelled = await served.client.delete(f"/tasks/{tasks[2]}")
        model.release.set()
    assert cancelled.json()["status"] == "cancelled"
    assert cancelled.json()["webhook"] is None


async def test_a_short_queue_limits_how_many_tasks_a_worker_holds(photos: list[Path]) -> None:
    """With MAX_QUEUE below two batches, a worker claims no more tasks than the background
    lane holds, so none bounces off it (no refusals) and all finish."""
    settings = make_settings(max_batch_size=4, max_queue=2, max_batch_files=2)
    async with running_app(settings) as served:
        before = (await served.client.get("/metrics")).text
        data = photos[0].read_bytes()
        task_ids = [(await submit(served.client, data))["task_id"] for _ in range(6)]
        results = [await finished(served.client, task_id) for task_id in task_ids]
        after = (await served.client.get("/metrics")).text

    assert [task["status"] for task in results] == ["succeeded"] * 6
    sample = 'batch_requests_total{outcome="rejected"}'
    assert metric_value(after, sample) - metric_value(before, sample) == 0


async def test_a_tasks_attempt_is_on_disk_before_the_model_runs_it(photos: list[Path]) -> None:
    """So that a task that kills its worker is charged even though nothing after that runs."""
    async with running_app(make_settings()) as served:
        model = GatedModel(served)
        await submit(served.client, photos[0].read_bytes())
        await asyncio.to_thread(model.entered.wait, 10)
        with sqlite3.connect(served.service.settings.data_dir / DATABASE_NAME) as db:
            assert db.execute("SELECT status, attempts FROM tasks").fetchall() == [("running", 1)]
        model.release.set()


async def test_a_task_whose_worker_died_in_the_model_runs_in_a_batch_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Tasks taken over from a worker that died while the model ran them are each run alone,
    so that the one that killed it, should it do so again, charges nothing to the others
    (run together again, they would all reach TASK_MAX_ATTEMPTS with it). Tasks a graceful
    stop handed back with an attempt counted are no suspects: they are batched as usual."""
    settings = make_settings(max_batch_size=16)
    store = tasks.TaskStore(settings.data_dir)
    data = images.encode(images.gradient(), "JPEG")  # decoded faster than a batch runs
    # top_k tells the model's calls apart: 3 taken over, 2 handed back, 4 fresh.
    kinds: dict[int, list[str]] = {3: [], 2: [], 4: []}
    for index in range(12):
        top_k = (3, 2, 4)[index % 3]
        task_id = str(uuid.uuid4())
        store.create(task_id, data, top_k=top_k, metadata=None, callback_url=None, max_queued=100)
        kinds[top_k].append(task_id)
    with sqlite3.connect(settings.data_dir / DATABASE_NAME) as db:
        for top_k, status in ((3, "running"), (2, "queued")):
            marks = ",".join("?" * len(kinds[top_k]))
            db.execute(
                f"UPDATE tasks SET attempts = 1, status = ?, lease_owner = ?, lease_until = ? "
                f"WHERE id IN ({marks})",
                (
                    status,
                    "dead-worker" if status == "running" else None,
                    0 if status == "running" else None,
                    *kinds[top_k],
                ),
            )
    store.close()

    batches: list[list[int]] = []
    real_classify = core.Classifier.classify

    def recording(self: core.Classifier, pixels: Any, top_k: Sequence[int]) -> Any:
        if set(top_k) != {1}:  # not a warm-up's
            batches.append(list(top_k))
        time.sleep(0.02)  # long enough for the next tasks to queue behind each batch
        return real_classify(self, pixels, top_k)

    monkeypatch.setattr(core.Classifier, "classify", recording)
    async with running_app(settings) as served:
        everything = [task_id for ids in kinds.values() for task_id in ids]
        results = [await finished(served.client, task_id) for task_id in everything]

    assert [task["status"] for task in results] == ["succeeded"] * 12
    assert sorted(k for batch in batches for k in batch) == [2] * 4 + [3] * 4 + [4] * 4
    assert [batch for batch in batches if 3 in batch] == [[3]] * 4
    assert any(2 in batch and len(batch) > 1 for batch in batches), batches
    with sqlite3.connect(settings.data_dir / DATABASE_NAME) as db:
        attempts = dict(db.execute("SELECT id, attempts FROM tasks").fetchall())
    assert {top_k: [attempts[i] for i in ids] for top_k, ids in kinds.items()} == {
        3: [2] * 4,
        2: [2] * 4,
        4: [1] * 4,
    }


async def test_tasks_taken_over_from_a_dead_worker_are_logged_with_those_run_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Work taken from a worker whose lease ran out is said in the log, naming the tasks
    that had entered the model: they run twice, and their callers may hear twice."""
    settings = make_settings()
    store = tasks.TaskStore(settings.data_dir)
    data = images.encode(images.gradient(), "JPEG")
    ids = {name: str(uuid.uuid4()) for name in ("in_model", "waiting", "queued")}
    for task_id in ids.values():
        store.create(task_id, data, top_k=3, metadata=None, callback_url=None, max_queued=100)
    store.close()
    with sqlite3.connect(settings.data_dir / DATABASE_NAME) as db:
        for name, attempts in (("in_model", 1), ("waiting", 0)):
            db.execute(
                "UPDATE tasks SET attempts = ?, status = 'running', lease_owner = 'dead-worker', "
                "lease_until = 0 WHERE id = ?",
                (attempts, ids[name]),
            )

    with caplog.at_level(logging.WARNING, logger="service.task_runner"):
        async with running_app(settings) as served:
            results = [await finished(served.client, task_id) for task_id in ids.values()]

    assert [task["status"] for task in results] == ["succeeded"] * 3
    [line] = [r.getMessage() for r in caplog.records if "took over" in r.getMessage()]
    taken, rerun = line.split("run again after entering the model before: ")
    assert ids["in_model"] in taken
    assert ids["waiting"] in taken
    assert ids["queued"] not in line
    assert rerun == ids["in_model"]


def test_a_log_line_lists_at_most_sixteen_task_ids() -> None:
    """A line written to a pipe stays whole up to 4 KiB: a take-over of 128 tasks would not."""
    ids = [str(uuid.uuid4()) for _ in range(128)]
    line = logs.listed(ids)
    assert line == ", ".join(ids[:16]) + " and 112 more"
    assert len(line) < 1024
    assert logs.listed(ids[:16]) == ", ".join(ids[:16])


async def test_a_locked_task_store_never_holds_up_cls(photos: list[Path]) -> None:
    """A task's batch charges its attempt without waiting on the database, so while another
    process holds the store's write lock, /cls requests behind that batch are served."""
    async with running_app(make_settings()) as served:
        model = GatedModel(served)
        data = photos[0].read_bytes()
        first = asyncio.create_task(served.client.post("/cls", files=upload(data)))
        await asyncio.to_thread(model.entered.wait, 10)
        accepted = await submit(served.client, data)
        processor = served.service.processor
        assert processor is not None
        await wait_for(lambda: processor.queue_depth == 1)  # the task, waiting behind /cls

        lock = sqlite3.connect(served.service.settings.data_dir / DATABASE_NAME)
        lock.isolation_level = None
        lock.execute("BEGIN IMMEDIATE")
        try:
            model.release.set()
            assert (await first).status_code == 200
            # The task's batch is the one running or done now; /cls comes after it.
            async with asyncio.timeout(5):
                behind = await served.client.post("/cls", files=upload(data))
            assert behind.status_code == 200, behind.text
            assert model.batch_sizes == [1, 1, 1]
        finally:
            lock.execute("ROLLBACK")
            lock.close()

        task = await finished(served.client, accepted["task_id"])
        assert task["status"] == "succeeded"
    with sqlite3.connect(served.service.settings.data_dir / DATABASE_NAME) as db:
        assert db.execute("SELECT attempts FROM tasks").fetchall() == [(1,)]


async def test_waiting_for_an_attempt_record_is_not_counted_as_model_time(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait for a task's attempt record (a store slow to write) comes before the forward
    pass, outside it: neither `batch_inference_seconds` nor the run times the batcher plans
    deadlines with count it."""
    record_s = 0.2  # the most the batch waits for the record (ATTEMPT_RECORD_WAIT_S 0.25)
    real_count = tasks.TaskStore.count_attempts

    def slow_count(self: tasks.TaskStore, owner: str, task_ids: list[str]) -> None:
        time.sleep(record_s)
        real_count(self, owner, task_ids)

    monkeypatch.setattr(tasks.TaskStore, "count_attempts", slow_count)
    inference = 'batch_inference_seconds_sum{outcome="ok"}'
    async with running_app(make_settings()) as served:
        classifier = served.service.classifier
        assert classifier is not None
        classify = classifier.classify
        classify_s: list[float] = []

        def timed_classify(*args: Any) -> Any:
            began = time.monotonic()
            try:
                return classify(*args)
            finally:
                classify_s.append(time.monotonic() - began)

        monkeypatch.setattr(classifier, "classify", timed_classify)
        before = metric_value((await served.client.get("/metrics")).text, inference)
        accepted = await submit(served.client, photos[0].read_bytes())
        assert (await finished(served.client, accepted["task_id"]))["status"] == "succeeded"
        after = metric_value((await served.client.get("/metrics")).text, inference)

    assert len(classify_s) == 1
    # What the metric adds over the model's own call is the hand-off to its thread.
    assert after - before < classify_s[0] + record_s / 2, (after - before, classify_s)


async def test_an_attempt_write_that_outlasts_its_wait_is_still_reported(
    served: RunningApp, caplog: pytest.LogCaptureFixture
) -> None:
    """The batch goes on after the wait; the write's failure, when it comes, is logged
    with the task ids once."""
    runner = served.service.task_runner()
    released = threading.Event()

    def slow_then_failing(*args: object) -> None:
        released.wait(5)
        raise sqlite3.OperationalError("disk I/O error")

    runner.store.count_attempts = slow_then_failing  # type: ignore[method-assign]
    with caplog.at_level(logging.WARNING, logger="service.task_runner"):
        async with asyncio.timeout(2):
            await runner.count_attempts(["t-1", "t-2"], wait_s=0.05)
        assert "has not recorded the attempts of tasks ['t-1', 't-2']" in caplog.text
        released.set()
        await wait_for(lambda: "counting the attempts" in caplog.text)
    failures = [r for r in caplog.records if r.getMessage().startswith("counting the attempts")]
    assert len(failures) == 1
    assert "['t-1', 't-2']" in failures[0].getMessage()


async def test_writes_that_outwait_another_process_lock_are_503_and_retryable(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write lock held elsewhere past the busy timeout refuses submissions and cancels
    with 503 and Retry-After, not a 500; once it is released they succeed."""
    monkeypatch.setattr(tasks, "BUSY_TIMEOUT_MS", 200)
    data = photos[0].read_bytes()
    async with running_app(make_settings()) as served:
        accepted = await submit(served.client, data)
        lock = sqlite3.connect(served.service.settings.data_dir / DATABASE_NAME)
        lock.isolation_level = None
        lock.execute("BEGIN IMMEDIATE")
        try:
            refused = [
                await served.client.post("/tasks", files=upload(data)),
                await served.client.delete(f"/tasks/{accepted['task_id']}"),
            ]
            polled = await served.client.get(f"/task-status/{accepted['task_id']}")
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        for response in refused:
            assert response.status_code == 503, response.text
            assert response.headers["Retry-After"] == "1"
            assert "task store is busy" in response.json()["detail"]
        assert polled.status_code == 200
        await submit(served.client, data)


async def test_submissions_wait_for_a_held_lock_no_longer_than_the_busy_timeout(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another process holds the write lock, the worker's own writes (claims, every
    poll here) each wait out the busy timeout. Submissions sent together still each get
    their 503 within about one busy timeout, not after the waits queued before them."""
    monkeypatch.setattr(tasks, "BUSY_TIMEOUT_MS", 1000)
    data = photos[0].read_bytes()
    async with running_app(make_settings(task_poll_interval_s=0.05)) as served:
        await submit(served.client, data)
        lock = sqlite3.connect(served.service.settings.data_dir / DATABASE_NAME)
        lock.isolation_level = None
        lock.execute("BEGIN IMMEDIATE")
        try:
            await asyncio.sleep(0.3)  # the claim loop is waiting for the lock by now

            async def timed_submission() -> tuple[int, float]:
                started = time.monotonic()
                response = await served.client.post("/tasks", files=upload(data))
                return response.status_code, time.monotonic() - started

            answers = await asyncio.gather(*(timed_submission() for _ in range(3)))
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        await submit(served.client, data)
    print(f"\nanswered after {sorted(round(seconds, 2) for _, seconds in answers)} s")
    assert [status for status, _ in answers] == [503] * 3
    assert max(seconds for _, seconds in answers) < 1.6, answers


async def test_a_write_held_by_a_stalled_disk_is_answered_503_in_time(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A frozen or failing block device holds a write past any lock wait: the submission
    gets its 503 within the busy timeout and a second, and the one queued behind it is
    refused in time too; once the disk answers, submissions are stored again."""
    monkeypatch.setattr(tasks, "BUSY_TIMEOUT_MS", 500)
    monkeypatch.setattr(task_runner, "WRITE_ANSWER_MARGIN_S", 0.5)
    data = photos[0].read_bytes()
    thawed = threading.Event()
    async with running_app(make_settings()) as served:
        writer = served.service.task_runner().request_writer
        create = writer.create

        def stalled_create(*args: Any, **kwargs: Any) -> tasks.TaskRecord:
            thawed.wait(10)
            return create(*args, **kwargs)

        monkeypatch.setattr(writer, "create", stalled_create)
        try:

            async def timed_submission() -> tuple[httpx.Response, float]:
                started = time.monotonic()
                response = await served.client.post("/tasks", files=upload(data))
                return response, time.monotonic() - started

            answers = await asyncio.gather(*(timed_submission() for _ in range(2)))
        finally:
            thawed.set()
        monkeypatch.setattr(writer, "create", create)
        await submit(served.client, data)
    for response, seconds in answers:
        assert response.status_code == 503, response.text
        assert response.headers["Retry-After"] == "1"
        assert "did not answer within 1 s" in response.json()["detail"]
        assert seconds < 5, answers


async def test_a_store_that_cannot_be_written_is_503_and_cls_goes_on(photos: list[Path]) -> None:
    """A full disk (here, SQLite's own page limit: the same "database or disk is full") makes
    a submission 503 with Retry-After and a detail naming DATA_DIR, not a bare 500."""
    data = photos[0].read_bytes()
    async with running_app(make_settings()) as served:
        runner = served.service.task_runner()

        async def limit_pages(pages: int | None) -> None:
            # The connection that stores submissions, on its own thread, the only one
            # that uses it.
            connection = runner.request_writer._db

            def limit() -> None:
                current = connection.execute("PRAGMA page_count").fetchone()[0]
                connection.execute(f"PRAGMA max_page_count = {pages or current}")

            await asyncio.get_running_loop().run_in_executor(runner._request_thread, limit)

        await limit_pages(None)
        try:
            refused = await served.client.post("/tasks", files=upload(data))
            assert (await served.client.post("/cls", files=upload(data))).status_code == 200
        finally:
            await limit_pages(1_073_741_823)
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "1"
        detail = refused.json()["detail"]
        assert "could not be written (database or disk is full)" in detail
        assert "DATA_DIR" in detail
        await submit(served.client, data)


class FailingConnection:
    """Stands in for a store's connection: every statement fails with ``error``."""

    def __init__(self, error: sqlite3.OperationalError) -> None:
        self.error = error

    def execute(self, *args: object) -> None:
        raise self.error


def sqlite_error(message: str, code: int) -> sqlite3.OperationalError:
    error = sqlite3.OperationalError(message)
    error.sqlite_errorcode = code  # type: ignore[attr-defined]
    return error


@pytest.mark.parametrize(
    ("error", "detail"),
    [
        (sqlite_error("disk I/O error", sqlite3.SQLITE_IOERR_READ), "could not be read"),
        (sqlite_error("database is locked", sqlite3.SQLITE_BUSY), "the task store is busy"),
    ],
)
async def test_a_status_read_that_fails_is_503_not_500(
    photos: list[Path], error: sqlite3.OperationalError, detail: str
) -> None:
    """Reads fail like writes: a failing disk or a lock is 503 with Retry-After, and a
    submission's early queue check reports it the same way."""
    async with running_app(make_settings()) as served:
        task_id = (await submit(served.client, photos[0].read_bytes()))["task_id"]
        reader = served.service.task_runner().reader
        connection, reader._db = reader._db, FailingConnection(error)  # type: ignore[assignment]
        try:
            polled = await served.client.get(f"/task-status/{task_id}")
            submitted = await served.client.post("/tasks", files=upload(b"not read"))
        finally:
            reader._db = connection
        for refused in (polled, submitted):
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "1"
            assert detail in refused.json()["detail"]
        assert (await served.client.get(f"/task-status/{task_id}")).status_code == 200


async def test_a_store_file_with_damaged_pages_is_503_with_the_reason_not_500(
    photos: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """A damaged file (a failing disk, a bad copy) is a store that cannot be read: each task
    route says so with 503, /cls goes on, and the claim loop logs one line at each turn."""
    settings = make_settings(task_poll_interval_s=0.05)
    data = photos[0].read_bytes()
    task_ids = [str(uuid.uuid4()) for _ in range(12)]
    with closing(tasks.TaskStore(settings.data_dir)) as store:
        for task_id in task_ids:
            store.create(
                task_id,
                data,
                top_k=5,
                metadata=None,
                callback_url=None,
                now=time.time(),
                max_queued=100,
            )
    path = settings.data_dir / DATABASE_NAME
    page_bytes = 4096
    noise = random.Random(0)
    with path.open("r+b") as file:
        size = file.seek(0, 2)
        assert size > 8 * page_bytes
        # Every page after the first two: the schema stays readable, the tables do not.
        for offset in range(2 * page_bytes, size, page_bytes):
            file.seek(offset)
            file.write(noise.randbytes(page_bytes))
    async with running_app(settings) as served:
        with caplog.at_level(logging.ERROR, logger="service.task_runner"):
            await wait_for(lambda: "claiming tasks failed" in caplog.text)
            assert (await served.client.post("/cls", files=upload(data))).status_code == 200
            refusals = (
                await served.client.get(f"/task-status/{task_ids[0]}"),
                await served.client.delete(f"/tasks/{task_ids[1]}"),
                await served.client.post("/tasks", files=upload(data)),
            )
    for refused in refusals:
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "1"
        assert "malformed" in refused.json()["detail"]
    claim_failures = [r for r in caplog.records if "claiming tasks failed" in r.getMessage()]
    assert all(r.exc_info is None and "malformed" in r.getMessage() for r in claim_failures)


def test_a_loop_failing_the_same_way_logs_it_once_then_with_a_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With DATA_DIR deleted, every worker's claim loop fails each second: one line, then
    one line a minute with how many times it failed since, not a line each second."""
    failures = task_runner._LoopFailures()
    gone = tasks.TaskStoreFailed("the task store's file was deleted")
    message = "claiming tasks failed; retrying in 1 s"
    with caplog.at_level(logging.ERROR, logger="service.task_runner"):
        for _ in range(5):
            failures.log(gone, message)
        assert [r.getMessage() for r in caplog.records] == [f"{message}: {gone}"]
        monkeypatch.setattr(task_runner, "REPEATED_FAILURE_LOG_S", 0.0)
        failures.log(gone, message)
        failures.log(tasks.TaskStoreBusy("busy"), message)
        failures.log(gone, "renewing task leases failed")
    assert [r.getMessage() for r in caplog.records][1:] == [
        f"{message}: {gone} (4 more times since the last such line)",
        f"{message}: busy",
        f"renewing task leases failed: {gone}",
    ]


async def test_a_store_that_fails_for_now_at_a_restart_leaves_cls_serving(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker restarting while the disk is full or read-only: its exit would stop the
    whole server. It serves /cls instead, answers 503 for tasks, and opens the store
    once it can."""
    settings = make_settings()
    data = photos[0].read_bytes()
    async with running_app(settings) as served:
        task_id = (await submit(served.client, data))["task_id"]
        await finished(served.client, task_id)

    disk_full = [True]
    real_store = task_runner.TaskStore

    class StoreOnAFullDisk(real_store):  # type: ignore[valid-type,misc]
        def __init__(self, data_dir: Path, **options: Any) -> None:
            if disk_full[0]:
                raise tasks.TaskStoreUnavailable(
                    "cannot open the task store: database or disk is full", for_now=True
                )
            super().__init__(data_dir, **options)

    monkeypatch.setattr(task_runner, "TaskStore", StoreOnAFullDisk)
    monkeypatch.setattr(core, "TASK_STORE_RETRY_S", 0.05)
    async with running_app(settings) as served:
        assert (await served.client.get("/readyz")).status_code == 200
        assert (await served.client.post("/cls", files=upload(data))).status_code == 200
        for refused in (
            await served.client.post("/tasks", files=upload(data)),
            await served.client.get(f"/task-status/{task_id}"),
        ):
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "1"
            assert "database or disk is full" in refused.json()["detail"]

        disk_full[0] = False
        await wait_for(lambda: served.service.tasks is not None)
        assert (await finished(served.client, task_id))["status"] == "succeeded"
        assert (await finished(served.client, (await submit(served.client, data))["task_id"]))[
            "status"
        ] == "succeeded"


async def test_a_data_dir_deleted_under_the_server_is_503_with_what_mends_it(
    photos: list[Path],
) -> None:
    """Submissions into the deleted file would be lost at the next start, and a worker
    started since would answer 404 for them from a new file: task routes refuse with 503
    and say to restart; /cls goes on."""
    settings = make_settings()
    data = photos[0].read_bytes()
    async with running_app(settings) as served:
        task_id = (await submit(served.client, data))["task_id"]
        await finished(served.client, task_id)
        shutil.rmtree(settings.data_dir)
        refusals = [
            await served.client.post("/tasks", files=upload(data)),
            await served.client.get(f"/task-status/{task_id}"),
        ]
        assert (await served.client.post("/cls", files=upload(data))).status_code == 200
    for refused in refusals:
        assert refused.status_code == 503, refused.text
        assert refused.headers["Retry-After"] == "1"
        assert "was deleted or replaced" in refused.json()["detail"]
        assert "restart the server" in refused.json()["detail"]
        # Where the operator keeps it is the logs' to say, not a client's to learn.
        assert "DATA_DIR's tasks.sqlite3" in refused.json()["detail"]
        assert str(settings.data_dir) not in refused.json()["detail"]


async def test_a_worker_replacing_another_makes_no_new_store_beside_a_deleted_one(
    photos: list[Path], tmp_path: Path
) -> None:
    """DATA_DIR deleted under the server, then a worker replaced: the new worker would
    create an empty store that its siblings, holding the deleted one, never see (status
    reads alternating 503 and 404). It serves /cls and refuses tasks with 503 saying what
    mends it, as its siblings do, and creates nothing."""
    settings = make_settings()
    data = photos[0].read_bytes()
    siblings = Siblings(tmp_path)
    async with running_app(settings, siblings=siblings):  # the first worker made the store
        pass
    assert siblings.server_started()
    shutil.rmtree(settings.data_dir)
    async with running_app(settings, siblings=siblings) as served:
        refusals = [
            await served.client.post("/tasks", files=upload(data)),
            await served.client.get(f"/task-status/{uuid.uuid4()}"),
        ]
        assert (await served.client.post("/cls", files=upload(data))).status_code == 200
    for refused in refusals:
        assert refused.status_code == 503, refused.text
        assert "is gone: DATA_DIR was deleted" in refused.json()["detail"]
        assert "restart the server" in refused.json()["detail"]
        assert str(settings.data_dir) not in refused.json()["detail"]
    assert not settings.data_dir.exists()


async def test_a_worker_of_a_server_that_never_started_creates_the_store(
    photos: list[Path], tmp_path: Path
) -> None:
    """The first worker of a fresh install killed before it was ready (WORKER_TIMEOUT_S, on a
    slow first download): its replacement creates the store, as the first start would."""
    settings = make_settings()
    async with running_app(settings, siblings=Siblings(tmp_path)) as served:
        await submit(served.client, photos[0].read_bytes())


async def test_a_worker_restarting_on_a_store_whose_schema_is_damaged_serves_cls(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Its exit would stop the whole server, the workers still serving included (gunicorn
    halts on a worker that fails to boot): it serves /cls, refuses tasks with the reason,
    says at CRITICAL what mends it, and opens the store once the file is moved away."""
    settings = make_settings()
    data = photos[0].read_bytes()
    async with running_app(settings) as served:
        await finished(served.client, (await submit(served.client, data))["task_id"])
    path = settings.data_dir / DATABASE_NAME
    with path.open("r+b") as file:
        file.seek(100)  # past the file's header: the schema's table
        file.write(bytes(range(256)) * 15)

    monkeypatch.setattr(core, "TASK_STORE_RETRY_S", 0.05)
    with caplog.at_level(logging.CRITICAL, logger="main"):
        async with running_app(settings) as served:
            assert (await served.client.get("/readyz")).status_code == 200
            assert (await served.client.post("/cls", files=upload(data))).status_code == 200
            refused = await served.client.post("/tasks", files=upload(data))
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"] == "1"
            assert "malformed" in refused.json()["detail"]

            for damaged in settings.data_dir.glob(DATABASE_NAME + "*"):
                damaged.rename(damaged.with_name(damaged.name + ".damaged"))
            await wait_for(lambda: served.service.tasks is not None)
            accepted = await submit(served.client, data)
            assert (await finished(served.client, accepted["task_id"]))["status"] == "succeeded"
    critical = [r.getMessage() for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1
    assert "restore the file from a backup, or move it away" in critical[0]


@pytest.mark.parametrize("retry_started", [True, False])
async def test_a_shutdown_while_the_store_cannot_open_closes_the_runner_it_was_starting(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch, retry_started: bool
) -> None:
    """The retry that reopens the store is cancelled as the server's shutdown begins,
    waiting or not started yet: the runner it was starting is closed all the same, its
    threads and HTTP client with it."""
    real_store = task_runner.TaskStore

    class StoreOnAFullDisk(real_store):  # type: ignore[valid-type,misc]
        def __init__(self, data_dir: Path, **options: Any) -> None:
            raise tasks.TaskStoreUnavailable("cannot open: disk full", for_now=True)

    real_stop = task_runner.TaskRunner.stop
    closed = []

    async def stop(runner: task_runner.TaskRunner, grace_s: float) -> None:
        await real_stop(runner, grace_s)
        closed.append(runner)

    settings = make_settings()
    async with running_app(settings) as served:  # the store exists: a restart
        await submit(served.client, photos[0].read_bytes())
    monkeypatch.setattr(task_runner, "TaskStore", StoreOnAFullDisk)
    monkeypatch.setattr(task_runner.TaskRunner, "stop", stop)
    monkeypatch.setattr(core, "TASK_STORE_RETRY_S", 0.05)
    async with running_app(settings) as served:
        service = served.service
        assert service._store_reopener is not None
        if retry_started:
            await wait_for(lambda: "cannot open" in service._task_store_problem)
            service._task_store_problem = ""
            await wait_for(lambda: "cannot open" in service._task_store_problem)  # it retried
        service.begin_shutdown()
        await service.stop()
        assert len(closed) == 1
        assert closed[0]._sender._client.is_closed


async def test_a_store_retry_that_fails_unexpectedly_is_logged_and_stop_still_runs(
    photos: list[Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_store = task_runner.TaskStore
    opens = []

    class StoreThatBreaks(real_store):  # type: ignore[valid-type,misc]
        def __init__(self, data_dir: Path, **options: Any) -> None:
            opens.append(data_dir)
            if len(opens) == 1:
                raise tasks.TaskStoreUnavailable("cannot open: disk full", for_now=True)
            raise RuntimeError("a bug in the store")

    settings = make_settings()
    async with running_app(settings) as served:  # the store exists: a restart
        await submit(served.client, photos[0].read_bytes())
    monkeypatch.setattr(task_runner, "TaskStore", StoreThatBreaks)
    monkeypatch.setattr(core, "TASK_STORE_RETRY_S", 0.05)
    async with running_app(settings) as served:
        await wait_for(lambda: "reopening the task store stopped" in caplog.text)
        assert "a bug in the store" in caplog.text
        await served.service.stop()
        refused = await served.client.post("/cls", files=upload(photos[0].read_bytes()))
        assert refused.status_code == 503  # stopped: the batcher and threads too


async def test_status_reads_are_answered_while_writes_wait_for_a_lock(
    served: RunningApp, photos: list[Path]
) -> None:
    """Another process holding the store's write lock holds up submissions, not polls."""
    data = photos[0].read_bytes()
    accepted = await submit(served.client, data)
    await finished(served.client, accepted["task_id"])
    store = served.service.task_runner().request_writer
    real_create = store.create
    creating = threading.Event()

    def create(*args: object, **kwargs: object) -> object:
        creating.set()
        return real_create(*args, **kwargs)  # type: ignore[arg-type]

    store.create = create  # type: ignore[method-assign]
    lock = sqlite3.connect(served.service.settings.data_dir / DATABASE_NAME)
    lock.isolation_level = None
    lock.execute("BEGIN IMMEDIATE")
    try:
        waiting = asyncio.create_task(served.client.post("/tasks", files=upload(data)))
        await asyncio.to_thread(creating.wait, 10)  # the writer's thread now waits for the lock
        async with asyncio.timeout(2):
            polled = await served.client.get(f"/task-status/{accepted['task_id']}")
        assert polled.status_code == 200
        assert polled.json()["status"] == "succeeded"
        assert not waiting.done()
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert (await waiting).status_code == 202


async def test_a_form_field_that_is_not_utf8_is_400_not_read_as_latin1(photos: list[Path]) -> None:
    """The multipart parser reads a field it cannot decode as Latin-1, without a word: the
    metadata stored would not be what was sent. UTF-8 beyond ASCII is kept as sent."""
    data = photos[0].read_bytes()
    async with running_app(make_settings()) as served:
        for field, value in (("metadata", b'{"a": "\xff"}'), ("callback_url", b"http://\xe9.com/")):
            body = multipart([("file", "a.jpg", data, "image/jpeg"), (field, None, value, None)])
            response = await served.client.post(
                "/tasks", content=body, headers=multipart_headers(body)
            )
            assert response.status_code == 400, response.text
            assert response.json()["detail"] == (
                f"the form field '{field}' is not UTF-8 text; send form fields as UTF-8, and "
                "the image as a file part named 'file' (curl -F file=@photo.jpg)"
            )
        accepted = await submit(served.client, data, metadata='{"a": "é ✓"}')
        task = (await served.client.get(accepted["status_url"])).json()
        assert task["metadata"] == {"a": "é ✓"}
        # /cls reads no other field, but is told the same rather than left to guess.
        body = multipart([("file", "a.jpg", data, "image/jpeg"), ("note", None, b"\xff", None)])
        response = await served.client.post("/cls", content=body, headers=multipart_headers(body))
        assert response.status_code == 400, response.text
        # The image itself sent as a plain field under another name (curl -F "image=<a.jpg"):
        # the answer says where an image goes.
        body = multipart([("image", None, data, None)])
        response = await served.client.post("/cls", content=body, headers=multipart_headers(body))
        assert response.status_code == 400, response.text
        assert "the image as a file part named 'file'" in response.json()["detail"]


@pytest.mark.parametrize("reduced", [False, True])
async def test_reduced_jpeg_decode_reaches_every_decode(
    reduced: bool, photos: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``REDUCED_JPEG_DECODE`` holds for small and large uploads of /cls and /cls/batch,
    and for a task's check at submission and its decode when it runs."""
    seen: list[bool] = []
    real_preprocess = core.preprocess

    def recording(data: bytes, *, max_pixels: int, reduced_jpeg: bool) -> np.ndarray:
        seen.append(reduced_jpeg)
        return real_preprocess(data, max_pixels=max_pixels, reduced_jpeg=reduced_jpeg)

    monkeypatch.setattr(core, "preprocess", recording)
    small = photos[0].read_bytes()
    large = images.encode(images.photo(photos[0]).resize((1200, 900)), "PNG")
    assert len(large) > core.SMALL_UPLOAD_MAX_BYTES
    async with running_app(make_settings(reduced_jpeg_decode=reduced)) as served:
        for data in (small, large):
            response = await served.client.post("/cls", files=upload(data))
            assert response.status_code == 200, response.text
        batch = await served.client.post(
            "/cls/batch", files=[("file", ("a.jpg", small)), ("file", ("b.png", large))]
        )
        assert [entry["status"] for entry in batch.json()["results"]] == [200, 200]
        accepted = await submit(served.client, large)
        assert (await finished(served.client, accepted["task_id"]))["status"] == "succeeded"
    assert len(seen) == 6
    assert set(seen) == {reduced}
