"""The SQLite task store: its state changes, its leases, and claims shared by processes.

Every call takes ``now`` explicitly, so these tests move time by passing it, never by sleeping.
"""

from __future__ import annotations

import functools
import logging
import multiprocessing
import multiprocessing.queues
import multiprocessing.synchronize
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest

from service import settings, tasks
from service.tasks import (
    DATABASE_NAME,
    WAL_SIZE_LIMIT_BYTES,
    IdempotencyKeyReused,
    TaskNotCancellable,
    TaskQueueFull,
    TaskRecord,
    TaskStatus,
    TaskStore,
    TaskStoreBusy,
    TaskStoreFailed,
    TaskStoreUnavailable,
    WebhookStatus,
    check_room,
)

T0 = 1_700_000_000.0
LEASE_S = 10.0
MAX_ATTEMPTS = 3
CALLBACK = "https://hooks.example.com/done"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[TaskStore]:
    opened = TaskStore(tmp_path)
    yield opened
    opened.close()


def image_of(task_id: str) -> bytes:
    return f"jpeg bytes of {task_id}".encode()


def add(
    store: TaskStore,
    task_id: str,
    *,
    at: float = T0,
    callback_url: str | None = None,
    max_queued: int = 1_000,
    lock_deadline: float | None = None,
) -> TaskRecord:
    """A queued task created at ``at``; its image is ``image_of(task_id)``."""
    return store.create(
        task_id,
        image_of(task_id),
        top_k=5,
        metadata=None,
        callback_url=callback_url,
        now=at,
        max_queued=max_queued,
        lock_deadline=lock_deadline,
    )


def add_many(store: TaskStore, count: int, *, prefix: str = "t") -> list[str]:
    """``count`` queued tasks, one second apart, so "oldest first" has one answer."""
    ids = [f"{prefix}{i:03d}" for i in range(count)]
    for i, task_id in enumerate(ids):
        add(store, task_id, at=T0 + i)
    return ids


def claim(store: TaskStore, owner: str, *, limit: int = 1, at: float = T0) -> list[str]:
    """The ids ``owner`` claims at ``at``."""
    claimed = store.claim(owner, limit, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS, now=at)
    return [task.id for task in claimed]


def running(store: TaskStore, task_id: str, owner: str, *, at: float = T0) -> None:
    """Make ``owner`` hold ``task_id`` (the only queued task) from ``at``."""
    assert claim(store, owner, at=at) == [task_id]


def has_image(store: TaskStore, task_id: str) -> bool:
    with closing(sqlite3.connect(store.path)) as db:
        row = db.execute("SELECT 1 FROM task_images WHERE task_id = ?", (task_id,)).fetchone()
    return row is not None


def free_pages(store: TaskStore) -> int:
    with closing(sqlite3.connect(store.path)) as db:
        return int(db.execute("PRAGMA freelist_count").fetchone()[0])


def get(store: TaskStore, task_id: str) -> TaskRecord:
    record = store.get(task_id)
    assert record is not None, task_id
    return record


# --- Creating and reading ---------------------------------------------------------------------


def test_a_store_not_to_be_created_is_refused_when_missing(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with pytest.raises(TaskStoreUnavailable, match="is gone: DATA_DIR was deleted"):
        TaskStore(data_dir, create=False)
    assert not data_dir.exists()
    TaskStore(data_dir).close()
    TaskStore(data_dir, create=False).close()


def test_a_new_store_is_readable_by_its_user_only(tmp_path: Path) -> None:
    """It holds uploads, results and callback URLs: not for other users of the machine,
    whatever the umask; a directory that exists keeps its mode."""
    previous = os.umask(0o022)
    try:
        data_dir = tmp_path / "new" / "data"
        store = TaskStore(data_dir)
        store.create("a", b"image", top_k=5, metadata=None, callback_url=None, max_queued=10)
        (tmp_path / "shared").mkdir()
        (tmp_path / "shared").chmod(0o755)  # as an operator left it
        existing = TaskStore(tmp_path / "shared")
    finally:
        os.umask(previous)
    try:
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        names = ("tasks.sqlite3", "tasks.sqlite3-wal", "tasks.sqlite3-shm")
        modes = {name: stat.S_IMODE((data_dir / name).stat().st_mode) for name in names}
        assert modes == dict.fromkeys(names, 0o600)
        assert stat.S_IMODE((tmp_path / "shared").stat().st_mode) == 0o755
    finally:
        store.close()
        existing.close()


def test_create_then_get_round_trips_every_field(store: TaskStore) -> None:
    """What create stores, get returns: metadata as a dict, the callback, top_k, the time."""
    metadata: dict[str, object] = {"user": "ada", "tags": ["a", "b"], "n": 3, "note": "ünï"}
    created = store.create(
        "t1",
        b"\x89PNG...",
        top_k=3,
        metadata=metadata,
        callback_url=CALLBACK,
        now=T0 + 0.25,
        max_queued=10,
    )

    fetched = get(store, "t1")
    assert fetched == created
    assert fetched.id == "t1"
    assert fetched.status is TaskStatus.QUEUED
    assert fetched.top_k == 3
    assert fetched.metadata == metadata
    assert fetched.callback_url == CALLBACK
    assert fetched.created_at == T0 + 0.25
    assert fetched.prediction is None
    assert fetched.error is None
    assert fetched.started_at is None
    assert fetched.finished_at is None
    assert fetched.attempts == 0
    assert fetched.webhook_status is None
    assert fetched.webhook_attempts == 0
    assert fetched.webhook_last_error is None
    assert has_image(store, "t1")


def test_create_without_metadata_or_callback_stores_none(store: TaskStore) -> None:
    """Optional fields left out come back as None."""
    add(store, "t1")

    fetched = get(store, "t1")
    assert fetched.metadata is None
    assert fetched.callback_url is None


def test_get_of_unknown_id_is_none(store: TaskStore) -> None:
    """A task never submitted reads as None, not as an error."""
    add(store, "t1")

    assert store.get("nope") is None


def test_database_is_wal_with_incremental_auto_vacuum(store: TaskStore) -> None:
    """The file is in WAL mode and gives freed pages back incrementally, for any reader."""
    with closing(sqlite3.connect(store.path)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA auto_vacuum").fetchone()[0] == 2


class LockedForTheFirstSwitches(sqlite3.Connection):
    """Answers the first two switches to WAL as SQLite does when another worker opening the
    same new file holds the read lock the switch needs."""

    refusals = 2

    def execute(self, sql: str, *args: object) -> sqlite3.Cursor:  # type: ignore[override]
        if sql.startswith("PRAGMA journal_mode") and LockedForTheFirstSwitches.refusals:
            LockedForTheFirstSwitches.refusals -= 1
            raise sqlite3.OperationalError("database is locked")
        return super().execute(sql, *args)  # type: ignore[arg-type]


def test_a_new_store_opened_by_several_workers_at_once_waits_its_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_connect = sqlite3.connect

    def connect(*args: object, **kwargs: object) -> sqlite3.Connection:
        return real_connect(*args, factory=LockedForTheFirstSwitches, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(sqlite3, "connect", connect)
    with closing(TaskStore(tmp_path)) as store:
        assert LockedForTheFirstSwitches.refusals == 0
        assert store.count_queued() == 0
    with closing(real_connect(tmp_path / DATABASE_NAME)) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize("damage", ["no database", "damaged pages"])
def test_a_file_that_is_no_store_or_is_damaged_is_refused_as_not_mending_by_itself(
    tmp_path: Path, damage: str
) -> None:
    """Unlike a full or failing disk, a damaged file does not mend by itself, and the error
    says so: the worker logs it at CRITICAL, with what mends it."""
    path = tmp_path / DATABASE_NAME
    if damage == "no database":
        path.write_bytes(b"not a database at all, " * 1000)
    else:
        with closing(TaskStore(tmp_path)):
            pass
        with path.open("r+b") as file:
            file.seek(100)  # past the file's header: the schema's table
            file.write(bytes(range(256)) * 15)
    with pytest.raises(TaskStoreUnavailable, match="cannot open the task store") as refused:
        TaskStore(tmp_path)
    assert refused.value.for_now is False


@pytest.mark.parametrize(
    ("in_its_place", "problem"),
    [
        ("directory", "it is not a file"),
        ("link to nowhere", "it is a symbolic link to a directory that does not exist, or a loop"),
        ("link loop", "it is a symbolic link to a directory that does not exist, or a loop"),
    ],
)
def test_what_cannot_be_the_store_in_its_place_is_refused_as_not_mending_by_itself(
    tmp_path: Path, in_its_place: str, problem: str
) -> None:
    """SQLite's "unable to open database file" is also what a failing disk gives, which
    may mend; a directory in the file's place, or a link no file can be made at, will not."""
    path = tmp_path / DATABASE_NAME
    if in_its_place == "directory":
        path.mkdir()
    elif in_its_place == "link to nowhere":
        path.symlink_to(tmp_path / "missing" / "tasks.db")
    else:
        path.symlink_to(path)
    with pytest.raises(TaskStoreUnavailable) as refused:
        TaskStore(tmp_path)
    assert str(refused.value) == (
        f"cannot open the task store {path}: {problem}; move it away to start an empty "
        "store, or set DATA_DIR to another directory"
    )
    assert refused.value.for_now is False


def test_a_store_made_through_a_symbolic_link_opens(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / DATABASE_NAME).symlink_to(tmp_path / "elsewhere" / "tasks.db")
    with closing(TaskStore(tmp_path)) as store:
        assert store.count_queued() == 0
    assert (tmp_path / "elsewhere" / "tasks.db").is_file()


@pytest.mark.parametrize("change", ["deleted", "replaced"])
def test_a_file_deleted_or_replaced_under_an_open_store_is_refused(
    tmp_path: Path, change: str
) -> None:
    """Writes to a deleted file would be lost at the next start, and a worker started since
    would use another file: each read and write is refused with what mends it."""
    data_dir = tmp_path / "data"
    with closing(TaskStore(data_dir)) as store:
        add(store, "t1")
        if change == "deleted":
            shutil.rmtree(data_dir)
        else:
            (data_dir / DATABASE_NAME).rename(tmp_path / "elsewhere.sqlite3")
            with closing(TaskStore(data_dir)):
                pass  # as a worker started since makes a new one
        for operation in (lambda: add(store, "t2"), lambda: store.get("t1")):
            with pytest.raises(TaskStoreFailed, match="was deleted or replaced") as refused:
                operation()
            assert "restart the server" in str(refused.value)


def open_with_file_size_limit(data_dir: str, limit: int, answers: multiprocessing.Queue) -> None:
    """In a child process: open a new store where no file may grow past ``limit`` bytes."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    try:
        TaskStore(Path(data_dir)).close()
        answers.put("opened")
    except Exception as exc:
        answers.put(f"{type(exc).__name__}: {exc}")


def test_a_disk_that_cannot_take_a_new_store_is_the_one_line_start_up_error(
    tmp_path: Path,
) -> None:
    answers: multiprocessing.Queue[str] = multiprocessing.get_context("spawn").Queue()
    child = multiprocessing.get_context("spawn").Process(
        target=open_with_file_size_limit, args=(str(tmp_path), 16 * 1024, answers)
    )
    child.start()
    child.join(60)
    answer = answers.get(timeout=5)
    assert answer.startswith("TaskStoreUnavailable: cannot open the task store"), answer
    assert "set DATA_DIR" in answer


def test_create_refuses_once_max_queued_tasks_wait(store: TaskStore) -> None:
    """The queued limit is enforced, and the error names the setting to change."""
    add(store, "t1", max_queued=2)
    add(store, "t2", max_queued=2)

    with pytest.raises(TaskQueueFull, match="TASK_MAX_QUEUED"):
        add(store, "t3", max_queued=2)
    assert store.get("t3") is None
    assert store.count_queued() == 2


def test_running_and_finished_tasks_do_not_count_toward_max_queued(store: TaskStore) -> None:
    """Only waiting tasks fill the queue: claimed and finished ones leave room."""
    add(store, "done", at=T0)
    add(store, "busy", at=T0 + 1)
    claim(store, "A", limit=2, at=T0 + 2)
    assert store.finish("done", "A", prediction=[], now=T0 + 3) is not None

    add(store, "q1", at=T0 + 4, max_queued=2)
    add(store, "q2", at=T0 + 5, max_queued=2)
    with pytest.raises(TaskQueueFull):
        add(store, "q3", at=T0 + 6, max_queued=2)


# --- Claiming ---------------------------------------------------------------------------------


def test_claim_takes_oldest_first_up_to_limit(store: TaskStore) -> None:
    """A claim returns the oldest queued tasks, at most ``limit``, with their images, and
    marks them running."""
    # Created out of order, so the order claimed comes from created_at, not insertion.
    add(store, "second", at=T0 + 2)
    add(store, "first", at=T0 + 1)
    add(store, "third", at=T0 + 3)

    claimed = store.claim("A", 2, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS, now=T0 + 10)

    assert [task.id for task in claimed] == ["first", "second"]
    assert [task.image for task in claimed] == [image_of("first"), image_of("second")]
    assert [task.top_k for task in claimed] == [5, 5]
    for task_id in ("first", "second"):
        record = get(store, task_id)
        assert record.status is TaskStatus.RUNNING
        assert record.started_at == T0 + 10
        assert record.attempts == 0, "a claim is not an attempt"
    assert get(store, "third").status is TaskStatus.QUEUED


def test_second_owner_claims_the_next_tasks_never_the_same(store: TaskStore) -> None:
    """Tasks one owner holds are not handed to another while the lease lasts."""
    ids = add_many(store, 5)

    first = claim(store, "A", limit=2, at=T0 + 10)
    second = claim(store, "B", limit=2, at=T0 + 10)
    third = claim(store, "C", limit=5, at=T0 + 10)

    assert first == ids[0:2]
    assert second == ids[2:4]
    assert third == ids[4:5]
    assert claim(store, "D", limit=5, at=T0 + 10) == []


def test_a_claim_reads_the_images_with_the_write_lock_free(store: TaskStore) -> None:
    """Tens of MiB of images read under the write lock would hold up every other worker's
    writes, their lease renewals among them, until another took their work over."""
    add_many(store, 3)
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)

    claimed = store.claim("A", 3, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS, now=T0 + 10)

    assert len(claimed) == 3
    commit = statements.index("COMMIT")
    reads = [i for i, sql in enumerate(statements) if "FROM task_images" in sql]
    assert len(reads) == 3
    assert min(reads) > commit
    assert statements.index("BEGIN IMMEDIATE") < commit


def test_claim_with_limit_zero_takes_nothing(store: TaskStore) -> None:
    """A worker with no free capacity claims nothing, and the queue is untouched."""
    add(store, "t1")

    assert store.claim("A", 0, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS, now=T0) == []
    assert get(store, "t1").status is TaskStatus.QUEUED


def _claim_until_empty(
    data_dir: Path,
    owner: str,
    rounds: multiprocessing.synchronize.Barrier,
    results: multiprocessing.queues.Queue[tuple[str, list[str]]],
) -> None:
    """One worker process with its own store (a spawn target), claiming until the queue is
    empty.

    The workers claim in lockstep rounds: left to run freely, the first one started takes
    all 200 tasks before the others wake, and no two claims ever overlap.
    """
    store = TaskStore(data_dir)
    got: list[str] = []
    try:
        while True:
            rounds.wait(timeout=30)
            claimed = store.claim(owner, 7, lease_s=60, max_attempts=3, now=time.time())
            got.extend(task.id for task in claimed)
            # Every claim of this round has committed, so all workers see the same count
            # and stop together.
            rounds.wait(timeout=30)
            if store.count_queued() == 0:
                break
    finally:
        store.close()
        results.put((owner, got))


def test_each_task_is_claimed_exactly_once_across_processes(tmp_path: Path) -> None:
    """Four processes claiming from one database at the same time share the tasks out:
    every task is claimed, and none twice."""
    with closing(TaskStore(tmp_path)) as store:
        for i in range(200):
            store.create(
                f"t{i:03d}",
                image_of(f"t{i:03d}"),
                top_k=1,
                metadata=None,
                callback_url=None,
                now=time.time(),
                max_queued=1_000,
            )
    expected = {f"t{i:03d}" for i in range(200)}

    context = multiprocessing.get_context("spawn")
    owners = [f"worker-{n}" for n in range(4)]
    rounds = context.Barrier(len(owners))
    results = context.Queue()
    processes = [
        context.Process(target=_claim_until_empty, args=(tmp_path, owner, rounds, results))
        for owner in owners
    ]
    for process in processes:
        process.start()
    try:
        claimed_by = dict(results.get(timeout=60) for _ in owners)
    finally:
        for process in processes:
            process.join(timeout=30)
    assert [process.exitcode for process in processes] == [0] * len(owners)

    all_claimed = [task_id for got in claimed_by.values() for task_id in got]
    assert len(all_claimed) == len(set(all_claimed)), "a task was claimed twice"
    assert set(all_claimed) == expected
    # 7 each per round while 28 or more wait, so every worker claimed in the early rounds.
    assert all(len(got) >= 7 for got in claimed_by.values()), claimed_by
    with closing(TaskStore(tmp_path)) as store:
        assert store.count_queued() == 0
        assert all(store.get(task_id).status is TaskStatus.RUNNING for task_id in expected)


# --- Leases -----------------------------------------------------------------------------------


def test_expired_lease_lets_another_owner_take_the_task(store: TaskStore) -> None:
    """While A's lease lasts B cannot claim the task; once it expires B can, with the
    attempt A's model made counted."""
    add(store, "t1")
    running(store, "t1", "A", at=T0)
    store.count_attempts("A", ["t1"])

    assert claim(store, "B", at=T0 + 5) == []
    claimed = store.claim("B", 1, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS, now=T0 + 11)

    assert [task.id for task in claimed] == ["t1"]
    assert get(store, "t1").attempts == 1
    assert claimed[0].image == image_of("t1")
    assert get(store, "t1").started_at == T0 + 11


def test_without_take_over_expired_work_stays_with_its_holder(store: TaskStore) -> None:
    """A worker whose own store writes failed lately does not take work over: the holder
    could not renew its leases either. Queued tasks and free deliveries are still claimed;
    nothing is failed for its attempts."""
    add(store, "held", at=T0, callback_url=CALLBACK)
    running(store, "held", "A", at=T0)
    store.count_attempts("A", ["held"])
    add(store, "delivery", at=T0 + 1, callback_url=CALLBACK)
    running(store, "delivery", "A", at=T0 + 1)
    store.finish("delivery", "A", prediction=[], now=T0 + 2)
    assert [r.id for r in store.claim_webhooks("A", 1, lease_s=LEASE_S, now=T0 + 2)] == ["delivery"]
    add(store, "queued", at=T0 + 3)

    later = T0 + 30
    claimed = store.claim("B", 5, lease_s=LEASE_S, max_attempts=1, now=later, take_over=False)
    assert [task.id for task in claimed] == ["queued"]
    assert store.claim_webhooks("B", 5, lease_s=LEASE_S, now=later, take_over=False) == []
    assert store.fail_abandoned(1, now=later, take_over=False) == []
    with closing(sqlite3.connect(store.path)) as db:
        owners = db.execute("SELECT DISTINCT lease_owner FROM tasks WHERE id != 'queued'")
        assert owners.fetchall() == [("A",)]

    assert [r.id for r in store.fail_abandoned(1, now=later)] == ["held"]
    deliveries = store.claim_webhooks("B", 5, lease_s=LEASE_S, now=later)
    assert sorted(r.id for r in deliveries) == ["delivery", "held"]


def test_deliveries_taken_over_from_a_holder_whose_lease_ran_out_are_logged(
    store: TaskStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Its holder may have begun an attempt: the receiver may hear twice, and the log says
    which deliveries. One waiting after a failed attempt, held by nobody, is not named."""
    for task_id in ("taken", "waiting", "new"):
        add(store, task_id, at=T0, callback_url=CALLBACK)
        running(store, task_id, "A", at=T0)
        store.finish(task_id, "A", prediction=[], now=T0 + 1)
    assert {r.id for r in store.claim_webhooks("A", 2, lease_s=LEASE_S, now=T0 + 1)} == {
        "taken",
        "waiting",
    }
    store.defer_webhook("waiting", "A", attempts=1, error="callback answered 500", retry_at=T0 + 2)

    with caplog.at_level(logging.WARNING, logger="service.tasks"):
        claimed = store.claim_webhooks("B", 5, lease_s=LEASE_S, now=T0 + 1 + LEASE_S + 1)
    assert sorted(r.id for r in claimed) == ["new", "taken", "waiting"]
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("took over the webhook deliveries of 1 task(s)")
    assert ": taken; an attempt it had begun may reach its receiver again" in line


def test_renewed_lease_keeps_the_task(store: TaskStore) -> None:
    """A worker that renews its leases keeps its tasks past the first expiry."""
    add(store, "t1")
    running(store, "t1", "A", at=T0)

    assert store.renew_leases("A", ["t1"], lease_s=LEASE_S, now=T0 + 5) == 1

    assert claim(store, "B", at=T0 + 11) == []
    assert claim(store, "B", at=T0 + 16) == ["t1"]


def test_renew_leases_keeps_only_the_work_named(store: TaskStore) -> None:
    """A lease the owner holds but no longer works on (its run ended without a result) is
    not renewed, so it runs out and another worker takes the task over."""
    add(store, "working", at=T0)
    add(store, "orphaned", at=T0 + 1)
    claim(store, "A", limit=2, at=T0)

    assert store.renew_leases("A", ["working"], lease_s=LEASE_S, now=T0 + 5) == 1
    assert store.renew_leases("A", [], lease_s=LEASE_S, now=T0 + 5) == 0

    assert claim(store, "B", limit=2, at=T0 + 11) == ["orphaned"]


def test_renew_leases_touches_only_the_owners_tasks(store: TaskStore) -> None:
    """Renewing A's leases does not keep B's tasks alive."""
    add(store, "a", at=T0)
    add(store, "b", at=T0 + 1)
    running(store, "a", "A", at=T0)
    running(store, "b", "B", at=T0)

    assert store.renew_leases("A", ["a", "b"], lease_s=LEASE_S, now=T0 + 5) == 1

    assert claim(store, "C", limit=2, at=T0 + 11) == ["b"]


def test_only_a_task_whose_worker_died_in_the_model_is_claimed_as_interrupted(
    store: TaskStore,
) -> None:
    """Taken over with an attempt counted: its worker died while the model ran it. Not one
    that only waited beside it, nor one a graceful stop handed back."""
    for task_id in ("in-model", "waiting", "handed-back", "fresh"):
        add(store, task_id)
    store.claim("A", 2, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS, now=T0)
    store.count_attempts("A", ["in-model"])
    store.claim("B", 1, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS, now=T0)
    store.count_attempts("B", ["handed-back"])
    store.release("B")

    claimed = store.claim("C", 4, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS, now=T0 + 11)

    assert [(task.id, task.interrupted) for task in claimed] == [
        ("in-model", True),
        ("waiting", False),
        ("handed-back", False),
        ("fresh", False),
    ]
    assert [task.image for task in claimed] == [image_of(task.id) for task in claimed]


def test_a_task_claimed_as_interrupted_stays_so_when_a_graceful_stop_hands_it_back(
    store: TaskStore,
) -> None:
    """Taken over from a dead worker, then handed back by a stopping one before it ran
    again: the next claim still knows it may be what killed the first worker."""
    add(store, "suspect")
    add(store, "beside", at=T0 + 1)
    store.claim("A", 2, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS, now=T0)
    store.count_attempts("A", ["suspect"])
    taken_over = store.claim("B", 2, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS, now=T0 + 11)
    assert [(task.id, task.interrupted) for task in taken_over] == [
        ("suspect", True),
        ("beside", False),
    ]
    store.release("B")

    claimed = store.claim("C", 2, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS, now=T0 + 12)

    assert [(task.id, task.interrupted) for task in claimed] == [
        ("suspect", True),
        ("beside", False),
    ]


def test_task_out_of_attempts_is_failed_not_reclaimed(store: TaskStore) -> None:
    """A task whose worker died on its last attempt is not run again: fail_abandoned fails
    it, naming TASK_MAX_ATTEMPTS, and drops its image."""
    add(store, "t1")
    store.claim("A", 1, lease_s=LEASE_S, max_attempts=1, now=T0)
    store.count_attempts("A", ["t1"])

    assert store.claim("B", 1, lease_s=LEASE_S, max_attempts=1, now=T0 + 11) == []
    assert store.fail_abandoned(1, now=T0 + 5) == [], "the lease has not expired yet"
    failed = store.fail_abandoned(1, now=T0 + 11)

    assert [record.id for record in failed] == ["t1"]
    assert failed[0] == get(store, "t1")
    assert failed[0].status is TaskStatus.FAILED
    assert failed[0].error is not None
    assert "TASK_MAX_ATTEMPTS" in failed[0].error
    assert failed[0].finished_at == T0 + 11
    assert failed[0].webhook_status is None
    assert not has_image(store, "t1")
    assert store.fail_abandoned(1, now=T0 + 12) == []


def test_a_task_handed_back_on_its_last_attempt_is_failed_not_run_again(
    store: TaskStore,
) -> None:
    """A graceful shutdown that cuts a task off in the model charges the attempt, and hands
    the task back to the queue: out of attempts, it fails rather than run again. (Else
    restarts with DRAIN_TIMEOUT_S=0 would run tasks up to twice TASK_MAX_ATTEMPTS.)"""
    add(store, "spent", at=T0)
    add(store, "fresh", at=T0 + 1)
    claim(store, "A", limit=2, at=T0 + 2)
    store.count_attempts("A", ["spent"])
    assert store.release("A") == 2

    claimed = store.claim("B", 2, lease_s=LEASE_S, max_attempts=1, now=T0 + 3)
    assert [task.id for task in claimed] == ["fresh"]
    failed = store.fail_abandoned(1, now=T0 + 3)
    assert [record.id for record in failed] == ["spent"]
    assert failed[0].status is TaskStatus.FAILED
    assert "TASK_MAX_ATTEMPTS" in (failed[0].error or "")


def test_a_dead_worker_charges_only_the_tasks_its_model_was_running(store: TaskStore) -> None:
    """Of the tasks a worker held when it died, only those that had entered the model use up
    an attempt; the ones still waiting are taken over as they were, and never fail for it."""
    add_many(store, 4)
    claim(store, "A", limit=4, at=T0 + 10)
    store.count_attempts("A", ["t000", "t001"])
    store.count_attempts("B", ["t002"])  # not B's: no charge

    failed = store.fail_abandoned(1, now=T0 + 21)
    assert sorted(record.id for record in failed) == ["t000", "t001"]
    assert [get(store, task_id).status for task_id in ("t002", "t003")] == [TaskStatus.RUNNING] * 2
    assert claim(store, "C", limit=4, at=T0 + 21) == ["t002", "t003"]
    assert [get(store, task_id).attempts for task_id in ("t002", "t003")] == [0, 0]


def test_fail_abandoned_leaves_tasks_with_attempts_left(store: TaskStore) -> None:
    """An expired task with attempts left is for claim to retry, not for fail_abandoned."""
    add(store, "t1")
    running(store, "t1", "A", at=T0)

    assert store.fail_abandoned(MAX_ATTEMPTS, now=T0 + 11) == []
    assert get(store, "t1").status is TaskStatus.RUNNING


def test_abandoned_task_with_callback_gets_its_webhook(store: TaskStore) -> None:
    """A task failed for running out of attempts still tells its callback: its delivery is
    pending and free for any live worker at once (its holder is dead)."""
    add(store, "t1", callback_url=CALLBACK)
    store.claim("A", 1, lease_s=LEASE_S, max_attempts=1, now=T0)
    store.count_attempts("A", ["t1"])

    [failed] = store.fail_abandoned(1, now=T0 + 11)

    assert failed.status is TaskStatus.FAILED
    assert failed.webhook_status is WebhookStatus.PENDING
    deliveries = store.claim_webhooks("B", 10, lease_s=LEASE_S, now=T0 + 11)
    assert [record.id for record in deliveries] == ["t1"]


# --- Finishing --------------------------------------------------------------------------------


def test_finish_stores_the_prediction_and_drops_the_image(store: TaskStore) -> None:
    """The owner's result is stored as JSON and read back equal; the task is done."""
    prediction = [{"label": "tabby cat", "score": 0.875}, {"label": "tiger cat", "score": 0.1}]
    add(store, "t1")
    running(store, "t1", "A", at=T0)

    finished = store.finish("t1", "A", prediction=prediction, now=T0 + 2)

    assert finished is not None
    assert finished == get(store, "t1")
    assert finished.status is TaskStatus.SUCCEEDED
    assert finished.prediction == prediction
    assert finished.error is None
    assert finished.finished_at == T0 + 2
    assert finished.webhook_status is None
    assert not has_image(store, "t1")


def test_finish_with_error_fails_the_task(store: TaskStore) -> None:
    """An error instead of a prediction makes the task failed, with that error."""
    add(store, "t1")
    running(store, "t1", "A", at=T0)

    finished = store.finish("t1", "A", error="the image could not be decoded", now=T0 + 2)

    assert finished is not None
    assert finished.status is TaskStatus.FAILED
    assert finished.error == "the image could not be decoded"
    assert finished.prediction is None
    assert finished.finished_at == T0 + 2
    assert not has_image(store, "t1")


def test_finish_without_callback_clears_the_lease(store: TaskStore) -> None:
    """A finished task without a callback holds no lease, so renewing it finds nothing."""
    add(store, "t1")
    running(store, "t1", "A", at=T0)
    assert store.finish("t1", "A", prediction=[], now=T0 + 2) is not None

    assert store.renew_leases("A", ["t1"], lease_s=LEASE_S, now=T0 + 3) == 0
    assert store.claim_webhooks("B", 10, lease_s=LEASE_S, now=T0 + 100) == []


def test_finish_by_a_worker_that_lost_the_task_changes_nothing(store: TaskStore) -> None:
    """After B took over A's expired task, A's late result is refused: B's counts."""
    add(store, "t1")
    running(store, "t1", "A", at=T0)
    assert claim(store, "B", at=T0 + 11) == ["t1"]
    before = get(store, "t1")

    assert store.finish("t1", "A", prediction=["late"], now=T0 + 12) is None

    assert get(store, "t1") == before
    assert before.status is TaskStatus.RUNNING
    assert has_image(store, "t1")
    finished = store.finish("t1", "B", prediction=["on time"], now=T0 + 13)
    assert finished is not None
    assert finished.prediction == ["on time"]


def test_finish_with_callback_makes_the_delivery_claimable(store: TaskStore) -> None:
    """With a callback the delivery becomes pending and free: any worker may claim it at
    once; once claimed, it is held like a task until its lease runs out."""
    add(store, "t1", callback_url=CALLBACK)
    running(store, "t1", "A", at=T0)

    finished = store.finish("t1", "A", prediction=[], now=T0 + 2)

    assert finished is not None
    assert finished.status is TaskStatus.SUCCEEDED
    assert finished.webhook_status is WebhookStatus.PENDING
    assert [r.id for r in store.claim_webhooks("B", 10, lease_s=LEASE_S, now=T0 + 3)] == ["t1"]
    assert store.claim_webhooks("C", 10, lease_s=LEASE_S, now=T0 + 5) == []
    assert store.renew_leases("B", ["t1"], lease_s=LEASE_S, now=T0 + 5) == 1
    assert store.claim_webhooks("C", 10, lease_s=LEASE_S, now=T0 + 14) == []
    deliveries = store.claim_webhooks("C", 10, lease_s=LEASE_S, now=T0 + 16)
    assert [record.id for record in deliveries] == ["t1"]


def test_only_a_delivery_waiting_after_a_failed_attempt_has_a_next_attempt_time(
    store: TaskStore,
) -> None:
    """Not a new one, nor one in flight; but one whose attempt was cut off uncounted (the
    last allowed one, made again) has, though its count is still 0."""
    delivery(store, "t1", "A")
    assert get(store, "t1").webhook_next_attempt_at is None  # in flight
    store.release("A", cut_off=[tasks.Deferral("t1", 0, "cut off", T0 + 5)])
    assert get(store, "t1").webhook_next_attempt_at == T0 + 5
    add(store, "t2", callback_url=CALLBACK)
    running(store, "t2", "B", at=T0)
    store.finish("t2", "B", prediction=[], now=T0)
    assert get(store, "t2").webhook_next_attempt_at is None  # new: due at once


def test_a_delivery_due_by_a_time_is_one_nobody_holds_by_then(store: TaskStore) -> None:
    """What a stopping worker waits for within its grace: a pending delivery that nobody
    holds and that is due, or falls due, before the grace runs out."""
    assert not store.has_delivery_due_by(T0 + 100)
    delivery(store, "t1", "A")
    assert not store.has_delivery_due_by(T0 + 100)  # A holds it, and delivers it

    assert store.defer_webhook("t1", "A", attempts=1, error="HTTP 503", retry_at=T0 + 30)

    assert not store.has_delivery_due_by(T0 + 29)
    assert store.has_delivery_due_by(T0 + 30)
    add(store, "t2", callback_url=CALLBACK)
    running(store, "t2", "B", at=T0)
    store.finish("t2", "B", prediction=[], now=T0)
    store.claim_webhooks("B", 1, lease_s=LEASE_S, now=T0)
    store.release("B")  # handed back at a shutdown: due at once
    assert store.has_delivery_due_by(T0)


# --- Handing back -----------------------------------------------------------------------------


def test_requeue_undoes_the_claim(store: TaskStore) -> None:
    """A requeued task is queued again, with the attempts its model runs made."""
    add(store, "t1")
    running(store, "t1", "A", at=T0)
    store.count_attempts("A", ["t1"])

    store.requeue("t1", "A")

    record = get(store, "t1")
    assert record.status is TaskStatus.QUEUED
    assert record.attempts == 1
    assert record.started_at is None
    assert store.count_queued() == 1
    assert claim(store, "B", at=T0 + 1) == ["t1"]
    assert get(store, "t1").attempts == 1


def test_requeue_charges_at_least_the_attempts_known_to_have_been_made(store: TaskStore) -> None:
    """Should an attempt's count not have landed, the requeue charges it: a task retried
    for want of memory cannot go past TASK_MAX_ATTEMPTS, attempt 1 of 3 for ever."""
    add(store, "t1")
    running(store, "t1", "A", at=T0)
    store.requeue("t1", "A", attempts=2)
    assert get(store, "t1").attempts == 2
    claim(store, "A", at=T0 + 1)
    store.count_attempts("A", ["t1"])
    store.count_attempts("A", ["t1"])
    store.requeue("t1", "A", attempts=1)  # never lowers the count
    assert get(store, "t1").attempts == 4


def test_requeue_by_a_non_owner_changes_nothing(store: TaskStore) -> None:
    """Only the worker holding a task can put it back."""
    add(store, "t1")
    running(store, "t1", "A", at=T0)
    before = get(store, "t1")

    store.requeue("t1", "B")

    assert get(store, "t1") == before


def test_release_hands_back_everything_the_owner_holds(store: TaskStore) -> None:
    """At shutdown, A's running tasks return to the queue and its pending deliveries are
    free for another worker at once; B's tasks are untouched."""
    add(store, "a-delivery", at=T0, callback_url=CALLBACK)
    add(store, "a-running", at=T0 + 1)
    add(store, "b-running", at=T0 + 2)
    assert claim(store, "A", limit=2, at=T0 + 3) == ["a-delivery", "a-running"]
    assert claim(store, "B", limit=1, at=T0 + 3) == ["b-running"]
    assert store.finish("a-delivery", "A", prediction=[], now=T0 + 4) is not None
    assert [r.id for r in store.claim_webhooks("A", 1, lease_s=LEASE_S, now=T0 + 4)] == [
        "a-delivery"
    ]
    b_before = get(store, "b-running")

    assert store.release("A") == 2

    requeued = get(store, "a-running")
    assert requeued.status is TaskStatus.QUEUED
    assert requeued.attempts == 0
    assert get(store, "b-running") == b_before
    deliveries = store.claim_webhooks("C", 10, lease_s=LEASE_S, now=T0 + 5)
    assert [record.id for record in deliveries] == ["a-delivery"]
    assert claim(store, "C", limit=10, at=T0 + 5) == ["a-running"]


# --- Cancelling -------------------------------------------------------------------------------


def test_cancel_of_a_queued_task(store: TaskStore) -> None:
    """A queued task cancels: it is finished, its image is dropped, nobody claims it."""
    add(store, "t1")

    cancelled = store.cancel("t1", now=T0 + 3)

    assert cancelled is not None
    assert cancelled == get(store, "t1")
    assert cancelled.status is TaskStatus.CANCELLED
    assert cancelled.finished_at == T0 + 3
    assert not has_image(store, "t1")
    assert store.count_queued() == 0
    assert claim(store, "A", limit=10, at=T0 + 4) == []


def test_cancel_again_returns_the_cancelled_task(store: TaskStore) -> None:
    """Cancelling twice is not an error, and the first cancellation's time stays."""
    add(store, "t1")
    first = store.cancel("t1", now=T0 + 3)

    again = store.cancel("t1", now=T0 + 9)

    assert again == first


def test_cancel_of_a_running_task_is_refused(store: TaskStore) -> None:
    """A task that has started can no longer be cancelled, and is left running."""
    add(store, "t1")
    running(store, "t1", "A", at=T0)

    with pytest.raises(TaskNotCancellable):
        store.cancel("t1", now=T0 + 1)
    assert get(store, "t1").status is TaskStatus.RUNNING
    assert has_image(store, "t1")


def test_cancel_of_a_succeeded_task_is_refused(store: TaskStore) -> None:
    """A finished task keeps its result when someone tries to cancel it."""
    add(store, "t1")
    running(store, "t1", "A", at=T0)
    store.finish("t1", "A", prediction=["cat"], now=T0 + 1)

    with pytest.raises(TaskNotCancellable):
        store.cancel("t1", now=T0 + 2)
    record = get(store, "t1")
    assert record.status is TaskStatus.SUCCEEDED
    assert record.prediction == ["cat"]


def test_cancel_of_an_unknown_task_is_none(store: TaskStore) -> None:
    """Cancelling a task that does not exist reports it as missing."""
    assert store.cancel("nope", now=T0) is None


# --- Webhook deliveries -----------------------------------------------------------------------


def delivery(store: TaskStore, task_id: str, owner: str) -> None:
    """A finished ``task_id`` whose pending delivery ``owner`` holds (from T0, for LEASE_S)."""
    add(store, task_id, callback_url=CALLBACK)
    running(store, task_id, owner, at=T0)
    assert store.finish(task_id, owner, prediction=["cat"], now=T0) is not None
    claimed = store.claim_webhooks(owner, 1, lease_s=LEASE_S, now=T0)
    assert [record.id for record in claimed] == [task_id]


def test_a_deferred_delivery_is_held_by_nobody_until_it_is_due(store: TaskStore) -> None:
    """A failed attempt is stored with its count and error, and the delivery waits in the
    store, not with its worker: no worker can claim it before its next attempt is due, and
    any worker can after, the one that deferred it no longer holding it."""
    delivery(store, "t1", "A")

    store.defer_webhook("t1", "A", attempts=2, error="HTTP 503", retry_at=T0 + 30)

    record = get(store, "t1")
    assert (record.webhook_attempts, record.webhook_last_error) == (2, "HTTP 503")
    assert record.webhook_status is WebhookStatus.PENDING
    assert record.webhook_next_attempt_at == T0 + 30
    assert store.renew_leases("A", ["t1"], lease_s=LEASE_S, now=T0 + 1) == 0
    assert store.release("A") == 0
    assert store.claim_webhooks("B", 10, lease_s=LEASE_S, now=T0 + 29) == []
    [claimed] = store.claim_webhooks("B", 10, lease_s=LEASE_S, now=T0 + 31)
    assert (claimed.id, claimed.webhook_attempts) == ("t1", 2)


def test_deliveries_due_longest_are_claimed_first(store: TaskStore) -> None:
    """New deliveries and retries are claimed in the order they fell due (a new one when its
    task finished), so that retries are not put off for as long as new deliveries come."""
    for task_id, retry_at in (("t1", T0 + 20), ("t2", T0 + 10), ("t3", T0 + 30)):
        delivery(store, task_id, "A")
        store.defer_webhook(task_id, "A", attempts=1, error="HTTP 503", retry_at=retry_at)
    add(store, "new", callback_url=CALLBACK)
    running(store, "new", "A", at=T0 + 25)
    assert store.finish("new", "A", prediction=["cat"], now=T0 + 25) is not None

    first = store.claim_webhooks("B", 2, lease_s=LEASE_S, now=T0 + 40)
    second = store.claim_webhooks("B", 1, lease_s=LEASE_S, now=T0 + 40)

    assert sorted(record.id for record in first) == ["t1", "t2"]
    assert [record.id for record in second] == ["new"]


def test_delivered_webhook_ends_and_frees_the_lease(store: TaskStore) -> None:
    """A delivered webhook is marked so, keeps its count, and is never claimed again."""
    delivery(store, "t1", "A")

    assert store.finish_webhook("t1", "A", delivered=True, attempts=3, error=None)

    record = get(store, "t1")
    assert record.webhook_status is WebhookStatus.DELIVERED
    assert record.webhook_attempts == 3
    assert record.webhook_last_error is None
    assert store.renew_leases("A", ["t1"], lease_s=LEASE_S, now=T0 + 1) == 0
    assert store.claim_webhooks("B", 10, lease_s=LEASE_S, now=T0 + 100) == []


def test_failed_webhook_ends_with_its_last_error(store: TaskStore) -> None:
    """A delivery that gives up is marked failed with its last error, and not retried."""
    delivery(store, "t1", "A")

    store.finish_webhook("t1", "A", delivered=False, attempts=5, error="HTTP 500")

    record = get(store, "t1")
    assert record.webhook_status is WebhookStatus.FAILED
    assert (record.webhook_attempts, record.webhook_last_error) == (5, "HTTP 500")
    assert store.claim_webhooks("B", 10, lease_s=LEASE_S, now=T0 + 100) == []


def test_non_owner_cannot_defer_or_finish_a_delivery(store: TaskStore) -> None:
    """A worker that does not hold the delivery changes nothing about it."""
    delivery(store, "t1", "A")
    before = get(store, "t1")

    assert not store.defer_webhook("t1", "B", attempts=4, error="HTTP 503", retry_at=T0 + 1)
    assert not store.finish_webhook("t1", "B", delivered=True, attempts=4, error=None)

    assert get(store, "t1") == before
    assert store.renew_leases("A", ["t1"], lease_s=LEASE_S, now=T0 + 1) == 1


def test_claim_webhooks_takes_at_most_limit(store: TaskStore) -> None:
    """Deliveries are shared out like tasks: at most ``limit``, never to two owners."""
    for task_id in ("t1", "t2", "t3"):
        add(store, task_id, callback_url=CALLBACK)
    claim(store, "A", limit=3, at=T0)
    for task_id in ("t1", "t2", "t3"):
        store.finish(task_id, "A", prediction=[], now=T0)
    store.release("A")

    first = store.claim_webhooks("B", 2, lease_s=LEASE_S, now=T0 + 1)
    second = store.claim_webhooks("C", 2, lease_s=LEASE_S, now=T0 + 1)

    assert len(first) == 2
    assert len(second) == 1
    assert {record.id for record in first + second} == {"t1", "t2", "t3"}
    assert store.claim_webhooks("D", 0, lease_s=LEASE_S, now=T0 + 100) == []


# --- Housekeeping -----------------------------------------------------------------------------


def test_delete_expired_removes_only_old_finished_tasks(store: TaskStore) -> None:
    """Old succeeded, failed and cancelled tasks go; queued, running, recent ones, and those
    still delivering a webhook stay."""
    add(store, "old-succeeded", at=T0)
    add(store, "old-failed", at=T0 + 1)
    add(store, "old-pending-webhook", at=T0 + 2, callback_url=CALLBACK)
    add(store, "old-delivered", at=T0 + 3, callback_url=CALLBACK)
    add(store, "recent", at=T0 + 4)
    add(store, "old-running", at=T0 + 5)
    add(store, "old-cancelled", at=T0 + 6)
    add(store, "old-queued", at=T0 + 7)
    assert store.cancel("old-cancelled", now=T0 + 10) is not None
    # All within A's lease (until T0 + 20), so nothing is taken over meanwhile.
    assert len(claim(store, "A", limit=6, at=T0 + 10)) == 6
    store.finish("old-succeeded", "A", prediction=[], now=T0 + 10)
    store.finish("old-failed", "A", error="boom", now=T0 + 10)
    store.finish("old-pending-webhook", "A", prediction=[], now=T0 + 10)
    store.finish("old-delivered", "A", prediction=[], now=T0 + 10)
    store.claim_webhooks("A", 2, lease_s=LEASE_S, now=T0 + 10)
    store.finish_webhook("old-delivered", "A", delivered=True, attempts=1, error=None, now=T0 + 11)
    store.finish("recent", "A", prediction=[], now=T0 + 15)

    # At most as many as asked each time, in order to keep each write short.
    assert [store.delete_expired(T0 + 12, most=3) for _ in range(3)] == [3, 1, 0]

    for gone in ("old-succeeded", "old-failed", "old-delivered", "old-cancelled"):
        assert store.get(gone) is None, gone
    for kept in ("old-pending-webhook", "old-running", "old-queued", "recent"):
        assert store.get(kept) is not None, kept
    assert store.delete_expired(T0 + 12) == 0


def add_large(store: TaskStore, count: int) -> None:
    """``count`` queued tasks with a 3 MiB image each, ``big0`` onwards, a second apart."""
    for i in range(count):
        store.create(
            f"big{i}",
            bytes(3 * 2**20),
            top_k=5,
            metadata=None,
            callback_url=None,
            now=T0 + i,
            max_queued=100,
        )


def finish_all(store: TaskStore, count: int) -> None:
    """Claim the ``count`` tasks of ``add_large`` and finish them: their images go."""
    assert len(claim(store, "A", limit=count, at=T0 + count)) == count
    for i in range(count):
        store.finish(f"big{i}", "A", prediction=[], now=T0 + count + 1)


def test_the_clean_up_returns_the_space_of_finished_images_at_once(store: TaskStore) -> None:
    """A task's image is deleted as it finishes; the clean-up gives its pages back to the
    file system whether or not any task has expired yet, in steps."""
    add_large(store, 6)
    grown = store.path.stat().st_size
    finish_all(store, 6)
    assert free_pages(store) * 4096 > 5 * 3 * 2**20

    assert store.delete_expired(T0) == 0  # nothing has expired
    steps = 0
    while store.return_free_pages():
        steps += 1
    assert steps >= 1  # over 15 MiB freed, 8 MiB a write: more than one write
    assert free_pages(store) == 0
    assert store.path.stat().st_size < grown / 4
    assert store.return_free_pages() is False


def test_the_clean_up_cuts_the_write_ahead_log_back_after_a_burst(store: TaskStore) -> None:
    """While a reader holds an old snapshot, no checkpoint can empty the log, and a burst
    of uploads grows it past their size; once the reader is gone, the clean-up's writes
    cut it back to its limit instead of keeping it at its largest until the server stops."""
    wal = store.path.with_name(store.path.name + "-wal")
    with closing(sqlite3.connect(store.path)) as reader:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM tasks").fetchone()
        add_large(store, 12)
        finish_all(store, 12)
        reader.rollback()
    assert wal.stat().st_size > 2 * WAL_SIZE_LIMIT_BYTES

    while store.return_free_pages():
        pass
    assert wal.stat().st_size <= WAL_SIZE_LIMIT_BYTES


def test_count_queued_counts_only_waiting_tasks(store: TaskStore) -> None:
    """Running, finished and cancelled tasks are not queued."""
    add_many(store, 5)
    claim(store, "A", limit=2, at=T0 + 10)
    store.finish("t000", "A", prediction=[], now=T0 + 11)
    store.cancel("t004", now=T0 + 11)

    assert store.count_queued() == 2


# --- Opening ----------------------------------------------------------------------------------


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    """A database written by another server version is not touched; the error says to
    point DATA_DIR elsewhere."""
    TaskStore(tmp_path).close()
    with closing(sqlite3.connect(tmp_path / "tasks.sqlite3")) as db:
        db.execute("PRAGMA user_version = 7")

    with pytest.raises(TaskStoreUnavailable) as error:
        TaskStore(tmp_path)

    assert str(error.value) == (
        f"{tmp_path / DATABASE_NAME} has task schema version 7, which a later server version "
        "wrote; this one knows 1. Run that version or a later one: its tasks and results are "
        "in this file (a new DATA_DIR would start without them)"
    )


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        (["CREATE TABLE tasks (id INTEGER PRIMARY KEY, foo TEXT)"], "('tasks')"),
        (
            ["CREATE TABLE a (x)", "CREATE VIEW b AS SELECT x FROM a", 'CREATE TABLE "c\nd" (y)'],
            "('a', 'b', 'c\\nd')",
        ),
        (["CREATE VIEW only_a_view AS SELECT 1"], "('only_a_view')"),
        (["CREATE TABLE SQLiteBackup (x)"], "('SQLiteBackup')"),
        (
            ["CREATE TABLE accounts (id)", "PRAGMA user_version = 1"],
            "it has a schema version (1) but no tasks table",
        ),
        (["PRAGMA user_version = 1"], "it has a schema version (1) but no tasks table"),
    ],
)
def test_another_programs_database_is_refused_untouched(
    schema: list[str], problem: str, tmp_path: Path
) -> None:
    """A database at the store's path with another schema, and no version or no task
    table, is not taken for a new store: not switched to WAL, nothing added."""
    path = tmp_path / DATABASE_NAME
    with closing(sqlite3.connect(path)) as db:
        for statement in schema:
            db.execute(statement)
        db.commit()
    before = path.read_bytes()

    with pytest.raises(TaskStoreUnavailable) as error:
        TaskStore(tmp_path)

    if problem.startswith("("):
        problem = f"it holds another program's tables or views {problem}"
    assert str(error.value) == (
        f"{path} is not a task store of this service: {problem}; move it away, or set "
        "DATA_DIR to another directory"
    )
    assert not error.value.for_now
    assert path.read_bytes() == before
    assert not (tmp_path / f"{DATABASE_NAME}-wal").exists()


def test_a_store_written_before_tasks_carried_their_mark_gains_it_in_place(
    tmp_path: Path,
) -> None:
    """A task store written by a server version before (no "interrupted" column, nor
    "webhook_ended_at") opens with its tasks, which are claimed as before; the schema
    version stays, so that a server of that version can still open the store (rolled
    back, or beside this one during an upgrade)."""
    with closing(TaskStore(tmp_path)) as store:
        add(store, "in-model")
        add(store, "queued", at=T0 + 1)
        store.claim("A", 1, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS, now=T0)
        store.count_attempts("A", ["in-model"])
    with closing(sqlite3.connect(tmp_path / DATABASE_NAME)) as db:
        db.execute("ALTER TABLE tasks DROP COLUMN interrupted")
        db.execute("ALTER TABLE tasks DROP COLUMN webhook_ended_at")
        db.commit()

    with closing(TaskStore(tmp_path)) as store:
        claimed = store.claim("B", 2, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS, now=T0 + 11)
        assert [(task.id, task.interrupted) for task in claimed] == [
            ("in-model", True),
            ("queued", False),
        ]
        assert get(store, "in-model").attempts == 1
        add(store, "delivering", at=T0 + 12, callback_url=CALLBACK)
        store.claim("B", 1, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS, now=T0 + 12)
        store.finish("delivering", "B", prediction=[], now=T0 + 12)
        store.claim_webhooks("B", 1, lease_s=LEASE_S, now=T0 + 12)
        assert store.finish_webhook(
            "delivering", "B", delivered=True, attempts=1, error=None, now=T0 + 13
        )
        assert store.get("delivering", expired_before=T0 + 13) is not None
        assert store.get("delivering", expired_before=T0 + 14) is None
    with closing(sqlite3.connect(tmp_path / DATABASE_NAME)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1


def test_reopening_keeps_the_tasks(tmp_path: Path) -> None:
    """A restarted worker finds the tasks a previous one stored."""
    with closing(TaskStore(tmp_path)) as store:
        add(store, "t1")

    with closing(TaskStore(tmp_path)) as store:
        assert get(store, "t1").status is TaskStatus.QUEUED


def run_while_the_lock_is_held(path: Path, writes: list[Callable[[], object]]) -> float:
    """Start ``writes``, each on a thread of its own 0.1 s after the one before, while
    another connection holds the write lock; free it, wait for them, and return when it
    was freed."""
    errors: list[BaseException] = []

    def write(call: Callable[[], object]) -> None:
        try:
            call()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(call,)) for call in writes]
    with closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")
        for thread in threads:
            thread.start()
            time.sleep(0.1)
        released_at = time.time()
        other.execute("COMMIT")
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    return released_at


def test_writes_that_waited_for_the_lock_are_stamped_once_they_hold_it(tmp_path: Path) -> None:
    """Two workers, one claiming and then one submitting while another process holds the
    write lock, stamp their times once they hold it, in the order they commit: whichever
    goes first once the lock is free, no task starts before it was created."""
    claimer, submitter = TaskStore(tmp_path), TaskStore(tmp_path)
    try:
        for round_ in range(5):
            task_id = f"new{round_}"
            released_at = run_while_the_lock_is_held(
                claimer.path,
                [
                    lambda: claimer.claim("A", 10, lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS),
                    functools.partial(
                        submitter.create,
                        task_id,
                        b"jpeg",
                        top_k=5,
                        metadata=None,
                        callback_url=None,
                        max_queued=10,
                    ),
                ],
            )
            created = get(claimer, task_id)
            assert created.created_at >= released_at
            if created.started_at is not None:  # the claim went after the submission
                assert created.started_at >= created.created_at
        # The same for a cancel.
        add(submitter, "to cancel", at=time.time())
        released_at = run_while_the_lock_is_held(
            claimer.path, [lambda: submitter.cancel("to cancel")]
        )
        cancelled = get(claimer, "to cancel")
        assert cancelled.finished_at is not None
        assert cancelled.finished_at >= released_at
    finally:
        claimer.close()
        submitter.close()


def test_stores_opened_together_on_new_directories_are_never_taken_for_anothers(
    tmp_path: Path,
) -> None:
    """A worker that reads a new store while another creates its tables sees both the
    tables and their schema version, or neither: never tables without a version, which
    it would refuse as another program's database."""
    refused: list[str] = []
    for index in range(100):
        directory = tmp_path / str(index)
        start = threading.Barrier(2)

        def open_store(directory: Path = directory, start: threading.Barrier = start) -> None:
            start.wait(timeout=10)
            try:
                TaskStore(directory).close()
            except TaskStoreUnavailable as error:
                refused.append(str(error))

        threads = [threading.Thread(target=open_store) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
    assert refused == []


def test_two_stores_opened_together_on_one_directory_both_work(tmp_path: Path) -> None:
    """Two workers starting at the same moment on a fresh directory both open the store,
    and each sees what the other writes."""
    start = threading.Barrier(2)
    opened: list[TaskStore] = []
    errors: list[BaseException] = []

    def open_store() -> None:
        start.wait(timeout=10)
        try:
            opened.append(TaskStore(tmp_path))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=open_store) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    try:
        assert errors == []
        first, second = opened

        add(first, "t1", at=T0)
        add(second, "t2", at=T0 + 1)

        assert claim(second, "B", at=T0 + 2) == ["t1"]
        assert get(first, "t1").status is TaskStatus.RUNNING
        assert claim(first, "A", at=T0 + 2) == ["t2"]
        assert second.count_queued() == 0
    finally:
        for store in opened:
            store.close()


def test_an_idempotency_key_returns_the_task_it_created(tmp_path: Path) -> None:
    """The same key and request hash give back the first task; nothing new is stored."""
    with closing(TaskStore(tmp_path)) as store:
        options = {"top_k": 5, "metadata": None, "callback_url": None, "max_queued": 10}
        first = store.create(
            "a", b"img", now=1.0, idempotency_key="k1", request_hash="h", **options
        )
        again = store.create(
            "b", b"img", now=2.0, idempotency_key="k1", request_hash="h", **options
        )
        assert again.id == first.id == "a"
        assert store.get("b") is None
        with pytest.raises(IdempotencyKeyReused, match="different request"):
            store.create("c", b"other", now=3.0, idempotency_key="k1", request_hash="h2", **options)
        assert store.get("c") is None
        unkeyed = [store.create(f"u{i}", b"img", now=4.0, **options).id for i in range(2)]
        assert unkeyed == ["u0", "u1"], "without a key every submission is a new task"


def test_an_expired_task_is_gone_before_the_clean_up_deletes_it(store: TaskStore) -> None:
    """Past its TTL a finished task reads as absent; unfinished tasks never expire, nor do
    those still delivering their webhook (the clean-up keeps them too)."""
    add(store, "done", at=T0)
    add(store, "delivering", at=T0 + 1, callback_url=CALLBACK)
    add(store, "running", at=T0 + 2)
    add(store, "queued", at=T0 + 3)
    claim(store, "A", limit=3, at=T0 + 4)
    store.finish("done", "A", prediction=[], now=T0 + 5)
    store.finish("delivering", "A", prediction=[], now=T0 + 5)
    assert store.get("done", expired_before=T0 + 5) is not None
    assert store.get("done", expired_before=T0 + 6) is None
    assert store.cancel("done", now=T0 + 7, expired_before=T0 + 6) is None
    for unfinished in ("running", "queued", "delivering"):
        assert store.get(unfinished, expired_before=T0 + 100) is not None, unfinished
    assert store.get("done") is not None, "still stored until the clean-up runs"
    store.claim_webhooks("A", 1, lease_s=LEASE_S, now=T0 + 10)
    store.finish_webhook("delivering", "A", delivered=False, attempts=15, error="500", now=T0 + 10)
    assert store.get("delivering", expired_before=T0 + 10) is not None
    assert store.get("delivering", expired_before=T0 + 11) is None


def test_a_task_whose_delivery_ended_after_its_ttl_is_kept_for_a_ttl_after_that(
    store: TaskStore,
) -> None:
    """A delivery that fails for longer than TASK_TTL: once it ends, the task's status
    still shows how, for as long as any finished task's would."""
    add(store, "t1", callback_url=CALLBACK)
    claim(store, "A", at=T0 + 1)
    store.finish("t1", "A", prediction=[], now=T0 + 2)
    store.claim_webhooks("A", 1, lease_s=LEASE_S, now=T0 + 3)
    store.finish_webhook("t1", "A", delivered=False, attempts=15, error="500", now=T0 + 100)

    # TASK_TTL of 10 s: expired 10 s after it finished, but kept 10 s after its delivery.
    assert get(store, "t1").webhook_status is WebhookStatus.FAILED
    assert store.get("t1", expired_before=T0 + 90) is not None
    assert store.delete_expired(T0 + 90) == 0
    assert store.get("t1", expired_before=T0 + 101) is None
    assert store.delete_expired(T0 + 101) == 1


def submit_keyed(
    store: TaskStore,
    task_id: str,
    *,
    at: float,
    expired_before: float,
    request_hash: str = "h",
    callback_url: str | None = None,
) -> str:
    """Submit a task with the Idempotency-Key "k1"; the id of the task the key names."""
    return store.create(
        task_id,
        b"img",
        top_k=5,
        metadata=None,
        callback_url=callback_url,
        now=at,
        max_queued=10,
        idempotency_key="k1",
        request_hash=request_hash,
        expired_before=expired_before,
    ).id


def test_an_expired_task_frees_its_idempotency_key(store: TaskStore) -> None:
    """Reusing the key of a task past its TTL makes a new task, even for the same request."""
    assert submit_keyed(store, "a", at=T0, expired_before=T0 - 1) == "a"
    claim(store, "A", at=T0 + 1)
    store.finish("a", "A", prediction=[], now=T0 + 2)
    replayed = submit_keyed(store, "b", at=T0 + 3, expired_before=T0 + 1)
    assert replayed == "a", "not expired: replayed"
    new = submit_keyed(store, "c", at=T0 + 4, expired_before=T0 + 3, request_hash="h2")
    assert new == "c", "expired: a new task"
    again = submit_keyed(store, "d", at=T0 + 5, expired_before=T0 + 3, request_hash="h2")
    assert again == "c", "the key is now c's"


def test_a_task_still_delivering_its_webhook_keeps_its_idempotency_key(store: TaskStore) -> None:
    """Past its TTL, such a task is still shown and kept: a resend with its key replays it
    rather than making a second task, and a second webhook."""

    def submit(task_id: str, at: float, expired_before: float) -> str:
        return submit_keyed(
            store, task_id, at=at, expired_before=expired_before, callback_url=CALLBACK
        )

    assert submit("a", at=T0, expired_before=T0 - 1) == "a"
    claim(store, "A", at=T0 + 1)
    store.finish("a", "A", prediction=[], now=T0 + 2)
    assert store.holds_key("k1", expired_before=T0 + 3)
    assert submit("b", at=T0 + 4, expired_before=T0 + 3) == "a"
    store.claim_webhooks("A", 1, lease_s=LEASE_S, now=T0 + 5)
    store.finish_webhook("a", "A", delivered=True, attempts=1, error=None, now=T0 + 5)
    assert store.holds_key("k1", expired_before=T0 + 5)
    assert not store.holds_key("k1", expired_before=T0 + 6)
    assert submit("c", at=T0 + 7, expired_before=T0 + 6) == "c"


def test_a_write_past_its_lock_deadline_still_tries_the_lock_once(
    store: TaskStore, tmp_path: Path
) -> None:
    """A request's write that waited its whole time in the queue gets one try: the lock is
    often free. Held by another connection, it is refused at once; either way the busy
    timeout is back to normal afterwards."""
    late = time.monotonic() - 1
    add(store, "free", lock_deadline=late)
    other = sqlite3.connect(tmp_path / DATABASE_NAME, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(TaskStoreBusy):
            add(store, "held", lock_deadline=late)
        assert time.monotonic() - started < 1
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert store._db.execute("PRAGMA busy_timeout").fetchone()[0] == tasks.BUSY_TIMEOUT_MS
    assert store.get("free") is not None
    assert store.get("held") is None


def test_the_largest_upload_allowed_fits_in_a_task_row(store: TaskStore) -> None:
    """SQLite bounds a whole row, the task's id included: MAX_UPLOAD_BYTES's bound leaves
    room for it. Checked with the row limit scaled down; the room left is the same."""
    row_limit = 2_000_000
    store._db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, row_limit)
    room = settings.SQLITE_MAX_LENGTH - settings.MAX_UPLOAD_BYTES_BOUND
    task_id = "a" * 36  # as long as the uuid4 a submission gets

    def create(image: bytes) -> TaskRecord:
        return store.create(
            task_id, image, top_k=5, metadata=None, callback_url=None, now=T0, max_queued=10
        )

    with pytest.raises(sqlite3.DataError):
        create(b"x" * row_limit)  # the limit does bite
    assert create(b"x" * (row_limit - room)).id == task_id


@pytest.mark.parametrize(
    ("queued", "said"), [(1, "1 task is already waiting"), (3, "3 tasks are already waiting")]
)
def test_a_full_task_queue_says_how_many_wait_and_the_setting(queued: int, said: str) -> None:
    with pytest.raises(TaskQueueFull) as full:
        check_room(queued, queued)
    assert str(full.value) == f"{said}; TASK_MAX_QUEUED allows {queued}"
    check_room(queued - 1, queued)


def count_from_another_process(path: Path) -> int:
    """The tasks a process of its own counts, connecting and closing as an operator's
    query does. Not in this one: SQLite shares one set of locks per file among a process's
    connections, which would not show the locks this process lost."""
    query = (
        "import sqlite3, sys; db = sqlite3.connect(sys.argv[1]); "
        "print(db.execute('SELECT count(*) FROM tasks').fetchone()[0]); db.close()"
    )
    counted = subprocess.run(
        [sys.executable, "-c", query, str(path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return int(counted.stdout)


def test_another_process_closing_the_store_leaves_the_write_ahead_log_to_those_open(
    tmp_path: Path,
) -> None:
    """Each worker opens several stores, and an operator may query the file (sqlite3, a
    backup): none of that may cost a task. A store that opened the file beside SQLite,
    closing it again, would drop every lock this process's connections held on it; the
    next other process to close its connection, finding no one else connected, would
    checkpoint the write-ahead log and delete it while the open stores went on writing to
    the deleted file: tasks acknowledged after that would be gone at the next start."""
    first = TaskStore(tmp_path)
    second = TaskStore(tmp_path)  # as a worker's runner and its API each open one
    try:
        add(first, "before")
        assert count_from_another_process(first.path) == 1
        assert (tmp_path / "tasks.sqlite3-wal").exists(), "the log was deleted under the stores"
        add(second, "after")
        assert count_from_another_process(first.path) == 2, "an acknowledged task is lost"
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize(("file_system", "warned"), [("nfs4", True), ("ext4", False)])
def test_a_data_dir_on_a_network_file_system_is_warned_of(
    tmp_path: Path, file_system: str, warned: bool
) -> None:
    """SQLite's locks do not hold there: processes sharing the store could lose tasks. The
    folder need not exist yet: the one above it says where it will be."""
    device = tmp_path.stat().st_dev
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        "22 1 0:21 / /proc rw,nosuid - proc proc rw\n"
        f"36 35 {os.major(device)}:{os.minor(device)} / /srv rw,relatime shared:1 - "
        f"{file_system} server:/export rw,vers=4.2\n"
    )
    data_dir = tmp_path / "not" / "made"
    warning = tasks.network_file_system_warning(data_dir, mountinfo)
    if warned:
        assert warning == (
            f"DATA_DIR={data_dir} is on a network file system (nfs4), whose locks SQLite "
            "cannot rely on: tasks may be lost or run twice; use a local disk"
        )
    else:
        assert warning is None
    assert tasks.network_file_system_warning(data_dir, tmp_path / "no-mountinfo") is None
