"""Persistent asynchronous tasks: an SQLite store that several worker processes share.

Every state change is one short transaction, so the database is the only coordination
between workers. A worker claims tasks by writing its id and a lease expiry on them in one
``BEGIN IMMEDIATE`` transaction, which SQLite serialises across processes: each task is
claimed by exactly one worker. A worker that dies stops renewing its leases, and when they
expire its tasks (and its pending webhook deliveries) are claimed again by whoever is alive.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random

from service import logs

logger = logging.getLogger(__name__)

# Raised only for a change that servers of the version before cannot work with: columns
# added with a default are not one, so that a server rolled back, or one still serving
# beside its successor during an upgrade, keeps its tasks.
SCHEMA_VERSION = 1
DATABASE_NAME = "tasks.sqlite3"
# Waits for another process's write transaction instead of failing at once.
BUSY_TIMEOUT_MS = 10_000
# Pages the clean-up returns to the file system per write (8 MiB of 4 KiB pages).
VACUUM_STEP_PAGES = 2048
# Expired tasks the clean-up deletes per write, tens of milliseconds of holding the write
# lock: a million deleted in one took 28 s, in which every other write waited or failed.
DELETE_STEP_TASKS = 1000
# What the write-ahead log is cut back to once a checkpoint has emptied it: a burst of
# large uploads would otherwise leave it on disk at its largest until the server stops.
WAL_SIZE_LIMIT_BYTES = 16 * 2**20
# Submissions stop while storing one would leave less free on DATA_DIR's disk: the tasks
# accepted already still need room for their results, and their writes for the journal.
# On a full disk they would wait, shown as running, until space was freed by hand.
DISK_RESERVE_BYTES = 64 * 2**20
# Room comes back when someone frees space, or the clean-up deletes expired tasks: not
# within the second a full queue takes to free a place. A client that waits as told does
# not send its upload again each second meanwhile.
DISK_FULL_RETRY_AFTER_S = 60

# Image bytes live apart from the rows, so status reads never page through them. A lease
# is who holds a running task or a delivery, and until when. A pending delivery that
# nobody holds has its lease's time all the same: when it fell due (its task finished), or
# when its next attempt is due; claims take them in that order, along the partial index.
# One handed back at a shutdown has none: it is due at once, first of all.
# ``interrupted``: a worker died while the model ran the task, so the task may be what
# killed it; the mark outlives a graceful shutdown that hands the task back.
# ``webhook_ended_at``: when its delivery ended (delivered or failed); a task is kept for
# TASK_TTL after that too, so that its status shows how a long delivery ended.
_SCHEMA = """
CREATE TABLE tasks (
    id                  TEXT PRIMARY KEY,
    status              TEXT NOT NULL,
    top_k               INTEGER NOT NULL,
    metadata            TEXT,
    callback_url        TEXT,
    prediction          TEXT,
    error               TEXT,
    created_at          REAL NOT NULL,
    started_at          REAL,
    finished_at         REAL,
    attempts            INTEGER NOT NULL DEFAULT 0,
    interrupted         INTEGER NOT NULL DEFAULT 0,
    lease_owner         TEXT,
    lease_until         REAL,
    webhook_status      TEXT,
    webhook_attempts    INTEGER NOT NULL DEFAULT 0,
    webhook_last_error  TEXT,
    webhook_ended_at    REAL,
    idempotency_key     TEXT,
    request_hash        TEXT
);
CREATE TABLE task_images (
    task_id  TEXT PRIMARY KEY REFERENCES tasks (id) ON DELETE CASCADE,
    data     BLOB NOT NULL
);
CREATE INDEX tasks_by_status ON tasks (status, created_at);
CREATE INDEX tasks_by_finish ON tasks (finished_at);
CREATE INDEX tasks_webhooks_pending ON tasks (lease_until) WHERE webhook_status = 'pending';
CREATE UNIQUE INDEX tasks_by_idempotency_key ON tasks (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
"""


class TaskStatus(enum.StrEnum):
    """Where a task is in its life."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


class WebhookStatus(enum.StrEnum):
    """Where a task's callback delivery is; tasks without a callback have none."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class TaskStoreUnavailable(RuntimeError):
    """The task database cannot be opened; the message names the file and what to change.

    ``for_now`` is true when the cause may pass (a disk full, read-only or failing, a lock
    held too long) rather than lie in the setting (a path that is no directory, a file
    that is no task store).
    """

    def __init__(self, message: str, *, for_now: bool = False) -> None:
        super().__init__(message)
        self.for_now = for_now


class TaskQueueFull(Exception):
    """``TASK_MAX_QUEUED`` tasks are already waiting, or the disk has no room for another.

    Attributes:
        retry_after_s: When to try again, for the answer's ``Retry-After``.
    """

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def check_room(queued: int, max_queued: int) -> None:
    """Raise ``TaskQueueFull`` when ``queued`` tasks leave no room for another."""
    if queued >= max_queued:
        waiting = "1 task is" if queued == 1 else f"{queued} tasks are"
        raise TaskQueueFull(f"{waiting} already waiting; TASK_MAX_QUEUED allows {max_queued}")


# File systems whose locks SQLite cannot rely on: processes sharing a store on one may
# both write, or delete the write-ahead log under each other.
NETWORK_FILE_SYSTEMS = frozenset(
    {
        *("nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "afs"),
        *("fuse.sshfs", "fuse.s3fs", "fuse.gcsfuse", "fuse.glusterfs", "fuse.rclone"),
    }
)


def network_file_system_warning(
    data_dir: Path, mountinfo: Path = Path("/proc/self/mountinfo")
) -> str | None:
    """A line to warn with where ``data_dir`` (or, before it is made, the nearest folder
    above it) is on a network file system; None elsewhere, or where Linux does not say."""
    existing = data_dir.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        device = existing.stat().st_dev
        mounts = mountinfo.read_text().splitlines()
    except OSError:
        return None
    wanted = f"{os.major(device)}:{os.minor(device)}"
    for mount in mounts:
        fields, _, described = mount.partition(" - ")
        if fields.split()[2:3] == [wanted] and described:
            file_system = described.split()[0]
            if file_system in NETWORK_FILE_SYSTEMS:
                return (
                    f"DATA_DIR={data_dir} is on a network file system ({file_system}), whose locks "
                    "SQLite cannot rely on: tasks may be lost or run twice; use a local disk"
                )
    return None


def check_disk_room(directory: Path, incoming_bytes: int = 0) -> None:
    """Raise ``TaskQueueFull`` when storing ``incoming_bytes`` would leave less than
    ``DISK_RESERVE_BYTES`` free on the disk holding ``directory``."""
    free = shutil.disk_usage(directory).free
    if free - incoming_bytes < DISK_RESERVE_BYTES:
        left = (
            f", {(free - incoming_bytes) / 2**20:.1f} MiB once this image is stored"
            if incoming_bytes
            else ""
        )
        raise TaskQueueFull(
            f"the disk holding DATA_DIR has {free / 2**20:.1f} MiB free{left}; new tasks are "
            f"taken while {DISK_RESERVE_BYTES // 2**20} MiB would stay free, room for the "
            "results of the tasks already taken: free some space",
            retry_after_s=DISK_FULL_RETRY_AFTER_S,
        )


class IdempotencyKeyReused(Exception):
    """An ``Idempotency-Key`` already names a task submitted with a different request."""


class TaskNotCancellable(Exception):
    """The task has started or finished, so it can no longer be cancelled."""


class TaskStoreBusy(Exception):
    """Another connection (another worker's, or this one's other writer) held the store's
    write lock past the time this write could wait: the busy timeout, or what was left of
    it for a request's write."""


class TaskStoreFailed(Exception):
    """A read or write of the store failed: the disk is full, failing or read-only."""


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """One task as stored, without its image."""

    id: str
    status: TaskStatus
    top_k: int
    metadata: dict[str, object] | None
    callback_url: str | None
    prediction: object
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int
    webhook_status: WebhookStatus | None
    webhook_attempts: int
    webhook_last_error: str | None
    # When a pending delivery that failed will be tried again; None while one is in flight.
    webhook_next_attempt_at: float | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> TaskRecord:
        """The task a row of the ``tasks`` table holds."""
        return cls(
            id=row["id"],
            status=TaskStatus(row["status"]),
            top_k=row["top_k"],
            metadata=None if row["metadata"] is None else json.loads(row["metadata"]),
            callback_url=row["callback_url"],
            prediction=None if row["prediction"] is None else json.loads(row["prediction"]),
            error=row["error"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            attempts=row["attempts"],
            webhook_status=(
                None if row["webhook_status"] is None else WebhookStatus(row["webhook_status"])
            ),
            webhook_attempts=row["webhook_attempts"],
            webhook_last_error=row["webhook_last_error"],
            webhook_next_attempt_at=(
                row["lease_until"]
                if row["webhook_status"] == WebhookStatus.PENDING
                and row["webhook_last_error"] is not None
                and row["lease_owner"] is None
                else None
            ),
        )


@dataclass(frozen=True, slots=True)
class Deferral:
    """A delivery's failed attempt, and when its next one is due."""

    task_id: str
    attempts: int
    error: str
    retry_at: float


@dataclass(frozen=True, slots=True)
class ClaimedTask:
    """A task this worker now runs: what the model needs."""

    id: str
    top_k: int
    image: bytes
    # Its worker died while the model ran it (the lease ran out with an attempt counted):
    # the model may be what killed it.
    interrupted: bool
    # Claimed from a worker whose lease ran out (it died or stalled), not from the queue.
    taken_over: bool = False
    attempts: int = 0  # counted before this claim


# SQLite's primary result codes for a disk that is full, failing or read-only.
# A damaged file (or one that is no database) fails the reads and writes that touch it as a
# failing disk does, but does not mend by itself.
_DAMAGED_FILE = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_DISK_FAILURES = (
    frozenset(
        {
            sqlite3.SQLITE_IOERR,
            sqlite3.SQLITE_FULL,
            sqlite3.SQLITE_READONLY,
            sqlite3.SQLITE_CANTOPEN,
        }
    )
    | _DAMAGED_FILE
)


def _is_disk_failure(error: BaseException, codes: frozenset[int] = _DISK_FAILURES) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    return isinstance(error, sqlite3.Error) and code is not None and code & 0xFF in codes


def _is_damaged_file(error: BaseException | None) -> bool:
    """Whether ``error``, or what it was raised from, is a damaged file's."""
    while error is not None:
        if _is_disk_failure(error, _DAMAGED_FILE):
            return True
        error = error.__cause__
    return False


def _failed(error: BaseException, *, writing: bool = True) -> TaskStoreFailed:
    action = "written" if writing else "read"
    return TaskStoreFailed(
        f"the task store could not be {action} ({error}); the disk that holds DATA_DIR may "
        "be full, failing or read-only, or the file damaged"
    )


def _file_identity(path: Path) -> tuple[int, int]:
    status = path.stat()
    return status.st_dev, status.st_ino


def _leads_to_a_directory(link: Path) -> bool:
    """Whether the file symbolic ``link`` names (which does not exist) could be made: its
    directory exists."""
    try:
        return link.resolve().parent.is_dir()
    except (OSError, RuntimeError):  # a loop (RuntimeError before Python 3.13)
        return False


def _is_locked(error: BaseException) -> bool:
    return isinstance(error, sqlite3.OperationalError) and "locked" in str(error)


class TaskStore:
    """The task table in ``<data_dir>/tasks.sqlite3``, in WAL mode.

    Not thread-safe: use one store per thread (a worker keeps three, each on a thread of
    its own: for its claims and results, for requests' submissions and cancels, and for
    status reads). All times are wall-clock
    ``time.time()`` seconds, because they are compared across processes and restarts.
    """

    def __init__(self, data_dir: Path, *, create: bool = True) -> None:
        """Open the store, creating it unless ``create`` is False.

        Raises:
            TaskStoreUnavailable: It cannot be opened, or does not exist and ``create`` is
                False.
        """
        self.path = data_dir / DATABASE_NAME
        if not create and not self.path.exists():
            raise TaskStoreUnavailable(
                f"the task store {self.path} is gone: DATA_DIR was deleted or emptied since "
                "the server started; restore it, or restart the server to start an empty one",
                for_now=False,
            )
        # Set as the worker stops (``time.monotonic()``): a write with no deadline of its
        # own waits for another process's write lock no later than this.
        self.writes_due_by: float | None = None
        try:
            data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            existed = self.path.exists()
            # SQLite says only that it cannot open it, as of a disk that may mend.
            if existed and not self.path.is_file():
                problem = "it is not a file"
            elif not existed and self.path.is_symlink() and not _leads_to_a_directory(self.path):
                problem = "it is a symbolic link to a directory that does not exist, or a loop"
            else:
                problem = None
            if problem is not None:
                raise TaskStoreUnavailable(
                    f"cannot open the task store {self.path}: {problem}; move it away to "
                    "start an empty store, or set DATA_DIR to another directory",
                    for_now=False,
                )
            # Autocommit mode: transactions are explicit ``BEGIN IMMEDIATE`` blocks below.
            self._db = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                isolation_level=None,
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as exc:
            raise self._unavailable(exc) from None
        if not existed:
            # The store holds uploads, results, metadata and callback URLs (tokens in their
            # queries): readable by this user only, whatever the umask. Made so before its
            # first write, as SQLite gives its -wal and -shm files the database's mode. A
            # directory or file that exists keeps the mode it has. Not by opening the file
            # here: closing any descriptor of it drops the locks this process's connections
            # hold on it (POSIX), and another process, finding itself the last one
            # connected, would then delete the write-ahead log these still write to.
            with suppress(OSError):
                os.chmod(self.path, 0o600)
        try:
            self._refuse_another_programs_database()
            self._configure()
            self._file = _file_identity(self.path)
            self._migrate()
        except (OSError, sqlite3.Error, TaskStoreBusy, TaskStoreFailed) as exc:
            self._db.close()
            raise self._unavailable(exc) from None
        except BaseException:
            self._db.close()
            raise

    def _unavailable(self, cause: BaseException) -> TaskStoreUnavailable:
        advice = (
            "restore the file from a backup, or move it away to start an empty store"
            if _is_damaged_file(cause)
            else "set DATA_DIR to a writable directory on a local disk"
        )
        return TaskStoreUnavailable(
            f"cannot open the task store {self.path}: {cause}; {advice}",
            # A damaged file is the operator's to mend, as one that is no task store is: it
            # does not pass by itself.
            for_now=(
                isinstance(cause, TaskStoreBusy | TaskStoreFailed)
                or _is_disk_failure(cause)
                or _is_locked(cause)
            )
            and not _is_damaged_file(cause),
        )

    def _refuse_another_programs_database(self) -> None:
        """Refuse, before anything changes it (its journal mode, tables of this schema
        added), a database that another program wrote: one with tables, views or the like
        but no schema version, or a version but no task table. This schema's tables come
        with its version, in one transaction; both are read in one statement, one
        snapshot, as another worker may be creating them."""
        version, names = self._db.execute(
            "SELECT (SELECT user_version FROM pragma_user_version), "
            "(SELECT json_group_array(name) FROM "
            "(SELECT name FROM sqlite_master WHERE substr(name, 1, 7) <> 'sqlite_' "
            "ORDER BY name))"
        ).fetchone()
        schema = json.loads(names)
        if version == 0 and schema:
            named = logs.listed([repr(name) for name in schema], most=4)
            problem = f"it holds another program's tables or views ({named})"
        elif version != 0 and "tasks" not in schema:
            problem = f"it has a schema version ({version}) but no tasks table"
        else:
            return
        raise TaskStoreUnavailable(
            f"{self.path} is not a task store of this service: {problem}; move it away, or "
            "set DATA_DIR to another directory"
        )

    def _configure(self) -> None:
        self._db.row_factory = sqlite3.Row
        # Before anything creates the file: freed pages (deleted images) go back to the
        # file system on clean-up. A no-op on an existing database.
        self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        # Workers opening a new file at once may each hold a read lock that the switch to WAL
        # must upgrade: SQLite answers "database is locked" at once, not after its busy
        # timeout, to the one it cannot wait for.
        for attempt in Retrying(
            retry=retry_if_exception(_is_locked),
            wait=wait_random(0.005, 0.05),
            stop=stop_after_delay(BUSY_TIMEOUT_MS / 1000),
            reraise=True,
        ):
            with attempt:
                self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT_BYTES}")
        # FULL: a task acknowledged with 202 survives a power cut, not only a crash.
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA foreign_keys = ON")

    def close(self) -> None:
        """Close this connection to the store (its file and other connections stay)."""
        self._db.close()

    def _check_file(self) -> None:
        """Refuse to go on with a file that is no longer at the store's path (deleted, or
        replaced by another): what is written to it would be seen by no worker started
        since, and lost at the next start."""
        try:
            current = _file_identity(self.path)
        except OSError:
            current = None
        if current != self._file:
            raise TaskStoreFailed(
                f"the task store's file {self.path} was deleted or replaced while this worker "
                "had it open; restart the server, so that every worker uses the same file"
            )

    def _migrate(self) -> None:
        with self._transaction():
            version = self._db.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                # Statement by statement: executescript would commit the open transaction.
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                return
            if version != SCHEMA_VERSION:
                raise TaskStoreUnavailable(
                    f"{self.path} has task schema version {version}, which a later server "
                    f"version wrote; this one knows {SCHEMA_VERSION}. Run that version or a "
                    "later one: its tasks and results are in this file (a new DATA_DIR would "
                    "start without them)"
                )
            # Columns added since version 1, to a store written before them. The version
            # stays 1: a server that knows none of them still opens the store.
            columns = {row["name"] for row in self._db.execute("PRAGMA table_info(tasks)")}
            if "interrupted" not in columns:
                self._db.execute(
                    "ALTER TABLE tasks ADD COLUMN interrupted INTEGER NOT NULL DEFAULT 0"
                )
            if "webhook_ended_at" not in columns:
                self._db.execute("ALTER TABLE tasks ADD COLUMN webhook_ended_at REAL")

    @contextmanager
    def _transaction(self, lock_deadline: float | None = None) -> Iterator[sqlite3.Connection]:
        """A write transaction. ``lock_deadline`` (``time.monotonic()``) bounds the wait for
        the write lock when that is sooner than the busy timeout: a request's write that
        queued behind others gets its answer in time, not after their waits too."""
        self._check_file()
        wait_ms = BUSY_TIMEOUT_MS
        if lock_deadline is None:
            lock_deadline = self.writes_due_by
        if lock_deadline is not None:
            # One try at least, however late: the lock may well be free.
            wait_ms = max(0, min(wait_ms, int((lock_deadline - time.monotonic()) * 1000)))
        busy = TaskStoreBusy(
            "the task store is busy: its write lock was not free in time (this write waited "
            f"{wait_ms / 1000:g} s for it); retry shortly"
        )
        # IMMEDIATE takes the write lock up front, so two workers never both read "queued"
        # and then both write "running".
        try:
            if wait_ms != BUSY_TIMEOUT_MS:
                self._db.execute(f"PRAGMA busy_timeout = {wait_ms}")
            try:
                self._db.execute("BEGIN IMMEDIATE")
            finally:
                if wait_ms != BUSY_TIMEOUT_MS:
                    self._db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        except BaseException as exc:
            if self._db.in_transaction:  # begun, then the busy timeout's restore failed
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError) and _is_locked(exc):
                raise busy from None
            if _is_disk_failure(exc):
                raise _failed(exc) from exc
            raise
        try:
            yield self._db
            self._db.execute("COMMIT")
        except BaseException as exc:
            if self._db.in_transaction:  # a failed COMMIT may have rolled back already
                self._db.execute("ROLLBACK")
            if _is_disk_failure(exc):
                raise _failed(exc) from exc
            raise

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """A read outside any transaction, its failures told apart as a write's are."""
        self._check_file()
        try:
            yield self._db
        except sqlite3.Error as exc:  # a damaged file's is a DatabaseError
            if _is_locked(exc):
                raise TaskStoreBusy(f"the task store is busy ({exc}); retry shortly") from None
            if _is_disk_failure(exc):
                raise _failed(exc, writing=False) from exc
            raise

    # --- Submitting, reading, cancelling ------------------------------------------------------

    def create(
        self,
        task_id: str,
        image: bytes,
        *,
        top_k: int,
        metadata: dict[str, object] | None,
        callback_url: str | None,
        max_queued: int,
        now: float | None = None,
        idempotency_key: str | None = None,
        request_hash: str | None = None,
        expired_before: float | None = None,
        lock_deadline: float | None = None,
    ) -> TaskRecord:
        """Store a new queued task with its image.

        With an ``idempotency_key`` that names an existing task, that task is returned and
        nothing is stored (its id differs from ``task_id``): a client may resend a request
        whose answer it never got without creating the task twice. A task that finished
        before ``expired_before`` no longer holds its key. ``created_at`` is ``now``, by
        default the time the write lock was taken (see ``_stamp``).

        Raises:
            TaskQueueFull: ``max_queued`` tasks are already waiting.
            IdempotencyKeyReused: The key names a task made from a different request
                (``request_hash`` differs).
            TaskStoreBusy: The write lock was not free by ``lock_deadline`` (see
                ``_transaction``) or within the busy timeout.
        """
        with self._transaction(lock_deadline) as db:
            if idempotency_key is not None:
                row = _keyed_task(db, idempotency_key)
                if row is not None and _expired(row, expired_before):
                    # Kept until the clean-up deletes it (its webhook may still be due).
                    db.execute("UPDATE tasks SET idempotency_key = NULL WHERE id = ?", (row["id"],))
                    row = None
                if row is not None:
                    if row["request_hash"] != request_hash:
                        raise IdempotencyKeyReused(
                            "this Idempotency-Key was used for a different request; "
                            "use a new key for a new task"
                        )
                    return self._get(row["id"])
            check_room(self.count_queued(), max_queued)
            check_disk_room(self.path.parent, len(image))
            now = _stamp(now)
            db.execute(
                "INSERT INTO tasks (id, status, top_k, metadata, callback_url, created_at, "
                "idempotency_key, request_hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    task_id,
                    TaskStatus.QUEUED,
                    top_k,
                    None if metadata is None else json.dumps(metadata),
                    callback_url,
                    now,
                    idempotency_key,
                    request_hash,
                ),
            )
            db.execute("INSERT INTO task_images (task_id, data) VALUES (?, ?)", (task_id, image))
            return self._get(task_id)

    def holds_key(self, idempotency_key: str, *, expired_before: float | None = None) -> bool:
        """Whether a task stored with this ``Idempotency-Key`` still holds it (see ``create``)."""
        with self._reading() as db:
            row = _keyed_task(db, idempotency_key)
        return row is not None and not _expired(row, expired_before)

    def get(self, task_id: str, *, expired_before: float | None = None) -> TaskRecord | None:
        """The task, or None if there is no such task (never submitted, deleted, or expired,
        though the clean-up has not deleted it yet: see ``_expired``)."""
        with self._reading() as db:
            row = db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
        if row is None or _expired(row, expired_before):
            return None
        return TaskRecord.from_row(row)

    def _get(self, task_id: str) -> TaskRecord:
        record = self.get(task_id)
        assert record is not None, task_id
        return record

    def cancel(
        self,
        task_id: str,
        *,
        now: float | None = None,
        expired_before: float | None = None,
        lock_deadline: float | None = None,
    ) -> TaskRecord | None:
        """Cancel a queued task; None if there is no such task (see ``get``).

        Cancelling a cancelled task again is a no-op that returns it.

        Raises:
            TaskNotCancellable: The task is running or finished.
            TaskStoreBusy: As for ``create``.
        """
        with self._transaction(lock_deadline) as db:
            record = self.get(task_id, expired_before=expired_before)
            if record is None or record.status is TaskStatus.CANCELLED:
                return record
            if record.status is not TaskStatus.QUEUED:
                state = (
                    "is running"
                    if record.status == TaskStatus.RUNNING
                    else f"has finished ({record.status})"
                )
                raise TaskNotCancellable(f"the task {state}; only queued tasks can be cancelled")
            db.execute(
                "UPDATE tasks SET status = ?, finished_at = ? WHERE id = ?",
                (TaskStatus.CANCELLED, _stamp(now), task_id),
            )
            db.execute("DELETE FROM task_images WHERE task_id = ?", (task_id,))
            return self._get(task_id)

    def count_queued(self) -> int:
        """Tasks waiting to be claimed (not the running ones)."""
        with self._reading() as db:
            (count,) = db.execute(
                "SELECT count(*) FROM tasks WHERE status = ?", (TaskStatus.QUEUED,)
            ).fetchone()
        return int(count)

    # --- Running ------------------------------------------------------------------------------

    def claim(
        self,
        owner: str,
        limit: int,
        *,
        lease_s: float,
        max_attempts: int,
        now: float | None = None,
        take_over: bool = True,
    ) -> list[ClaimedTask]:
        """Take up to ``limit`` tasks, oldest first: queued ones, and (with ``take_over``)
        running ones whose owner's lease has expired (the owner died) with attempts left. A
        claim is not an attempt: ``count_attempts`` is, as the task enters the model."""
        if limit < 1:
            return []
        with self._transaction() as db:
            now = _stamp(now)
            rows = db.execute(
                "SELECT id, top_k, attempts, status, interrupted FROM tasks WHERE attempts < ? "
                "AND (status = ? OR (? AND status = ? AND lease_until < ?)) "
                "ORDER BY created_at, rowid LIMIT ?",
                (max_attempts, TaskStatus.QUEUED, take_over, TaskStatus.RUNNING, now, limit),
            ).fetchall()
            taken = []
            for row in rows:
                # Taken over from a worker that died, not handed back by one that stopped;
                # or marked so on an earlier claim.
                interrupted = bool(row["interrupted"]) or (
                    row["status"] == TaskStatus.RUNNING and row["attempts"] > 0
                )
                db.execute(
                    "UPDATE tasks SET status = ?, started_at = ?, lease_owner = ?, "
                    "lease_until = ?, interrupted = ? WHERE id = ?",
                    (TaskStatus.RUNNING, now, owner, now + lease_s, interrupted, row["id"]),
                )
                taken_over = row["status"] == TaskStatus.RUNNING
                taken.append((row["id"], row["top_k"], interrupted, taken_over, row["attempts"]))
        # The images are read once the claim is committed, with the write lock free: tens
        # of MiB read under it would hold up every other worker's writes, their lease
        # renewals among them. The tasks are this owner's now: none deletes their images.
        # (Should the read fail, their leases run out unrenewed, and they are claimed again.)
        claimed = []
        with self._reading() as db:
            for task_id, top_k, interrupted, taken_over, attempts in taken:
                (image,) = db.execute(
                    "SELECT data FROM task_images WHERE task_id = ?", (task_id,)
                ).fetchone()
                claimed.append(
                    ClaimedTask(task_id, top_k, bytes(image), interrupted, taken_over, attempts)
                )
        return claimed

    def count_attempts(self, owner: str, task_ids: Collection[str]) -> None:
        """Count an attempt for each of ``task_ids`` that ``owner`` holds: they are entering
        the model. Should the worker die now, these are the tasks that may have killed it;
        the others it holds were only waiting, and go back without a charge."""
        if not task_ids:
            return
        marks = ",".join("?" * len(task_ids))
        with self._transaction() as db:
            db.execute(
                f"UPDATE tasks SET attempts = attempts + 1 "
                f"WHERE lease_owner = ? AND status = ? AND id IN ({marks})",
                (owner, TaskStatus.RUNNING, *task_ids),
            )

    def fail_abandoned(
        self, max_attempts: int, *, now: float, take_over: bool = True
    ) -> list[TaskRecord]:
        """Fail tasks out of attempts: (with ``take_over``) running ones whose lease expired
        after ``max_attempts`` attempts, and queued ones a shutdown cut off in the model on
        their last attempt.

        A task that takes its worker down every time it runs must not take down every
        worker in turn, forever.
        """
        error = (
            f"the task was interrupted {max_attempts} time{'s' if max_attempts > 1 else ''} "
            "(its worker stopped while the model ran it); TASK_MAX_ATTEMPTS allows that many"
        )
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id FROM tasks WHERE attempts >= ? "
                "AND (status = ? OR (? AND status = ? AND lease_until < ?))",
                (max_attempts, TaskStatus.QUEUED, take_over, TaskStatus.RUNNING, now),
            ).fetchall()
            for row in rows:
                self._finish(db, row["id"], TaskStatus.FAILED, None, error, now)
            return [self._get(row["id"]) for row in rows]

    def renew_leases(
        self, owner: str, task_ids: Collection[str], *, lease_s: float, now: float
    ) -> int:
        """Extend ``owner``'s leases on ``task_ids``: the runs and deliveries it is working
        on. A lease it holds on anything else runs out, and others take that work over."""
        if not task_ids:
            return 0
        marks = ",".join("?" * len(task_ids))
        with self._transaction() as db:
            return db.execute(
                f"UPDATE tasks SET lease_until = ? WHERE lease_owner = ? AND id IN ({marks})",
                (now + lease_s, owner, *task_ids),
            ).rowcount

    def finish(
        self,
        task_id: str,
        owner: str,
        *,
        prediction: object = None,
        error: str | None = None,
        now: float,
    ) -> TaskRecord | None:
        """Record a running task's result (a prediction, or an error) and drop its image.

        A callback's delivery becomes pending, free for any worker to claim.
        Returns None if ``owner`` no longer holds the task (its lease expired and another
        worker claimed it); that worker's result is the one that counts.
        """
        status = TaskStatus.FAILED if error is not None else TaskStatus.SUCCEEDED
        with self._transaction() as db:
            held = db.execute(
                "SELECT 1 FROM tasks WHERE id = ? AND status = ? AND lease_owner = ?",
                (task_id, TaskStatus.RUNNING, owner),
            ).fetchone()
            if held is None:
                return None
            self._finish(db, task_id, status, prediction, error, now)
            return self._get(task_id)

    @staticmethod
    def _finish(
        db: sqlite3.Connection,
        task_id: str,
        status: TaskStatus,
        prediction: object,
        error: str | None,
        now: float,
    ) -> None:
        db.execute(
            "UPDATE tasks SET status = ?, prediction = ?, error = ?, finished_at = ?, "
            "webhook_status = CASE WHEN callback_url IS NULL THEN NULL ELSE ? END, "
            # A delivery is due from now: claims take the longest due first.
            "lease_owner = NULL, lease_until = CASE WHEN callback_url IS NULL THEN NULL ELSE ? END "
            "WHERE id = ?",
            (
                status,
                None if prediction is None else json.dumps(prediction, allow_nan=False),
                error,
                now,
                WebhookStatus.PENDING,
                now,
                task_id,
            ),
        )
        db.execute("DELETE FROM task_images WHERE task_id = ?", (task_id,))

    def requeue(self, task_id: str, owner: str, *, attempts: int = 0) -> None:
        """Put a task ``owner`` holds back in the queue, as if this claim never happened;
        charged at least ``attempts`` attempts (those it is known to have made, should
        their count have failed to land)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE tasks SET status = ?, started_at = NULL, "
                "lease_owner = NULL, lease_until = NULL, attempts = max(attempts, ?) "
                "WHERE id = ? AND lease_owner = ? AND status = ?",
                (TaskStatus.QUEUED, attempts, task_id, owner, TaskStatus.RUNNING),
            )

    def release(
        self,
        owner: str,
        *,
        cut_off: Collection[Deferral] = (),
        lock_deadline: float | None = None,
    ) -> int:
        """Hand back everything ``owner`` holds, at a graceful shutdown: its running tasks
        go back to the queue and its pending deliveries become free to claim at once, but
        for those whose attempt was ``cut_off``, due again as each says."""
        with self._transaction(lock_deadline) as db:
            for deferral in cut_off:
                self._defer(db, owner, deferral)
            requeued = db.execute(
                "UPDATE tasks SET status = ?, started_at = NULL, "
                "lease_owner = NULL, lease_until = NULL WHERE lease_owner = ? AND status = ?",
                (TaskStatus.QUEUED, owner, TaskStatus.RUNNING),
            ).rowcount
            released = db.execute(
                "UPDATE tasks SET lease_owner = NULL, lease_until = NULL "
                "WHERE lease_owner = ? AND webhook_status = ?",
                (owner, WebhookStatus.PENDING),
            ).rowcount
            return requeued + released + len(cut_off)

    # --- Webhooks -----------------------------------------------------------------------------

    def claim_webhooks(
        self, owner: str, limit: int, *, lease_s: float, now: float, take_over: bool = True
    ) -> list[TaskRecord]:
        """Take up to ``limit`` pending deliveries that are due: nobody holds them (or, with
        ``take_over``, their holder died) and their wait after a failed attempt is over;
        those due longest first (a new one from when its task finished, one handed back at a
        shutdown first of all).
        """
        if limit < 1:
            return []
        with self._transaction() as db:
            # Two searches of the partial index, each stopping at the limit: one condition
            # with OR would scan every pending delivery, those not yet due included.
            due = db.execute(
                "SELECT id FROM tasks WHERE webhook_status = ? AND lease_until IS NULL LIMIT ?",
                (WebhookStatus.PENDING, limit),
            ).fetchall()
            expired = db.execute(
                "SELECT id, lease_owner FROM tasks WHERE webhook_status = ? AND lease_until <= ? "
                "AND (? OR lease_owner IS NULL) ORDER BY lease_until LIMIT ?",
                (WebhookStatus.PENDING, now, take_over, limit - len(due)),
            ).fetchall()
            due += expired
            chosen = [row["id"] for row in due]
            # Held by a worker whose lease ran out: it may have begun an attempt.
            taken = [row["id"] for row in expired if row["lease_owner"] is not None]
            if chosen:
                marks = ",".join("?" * len(chosen))
                db.execute(
                    f"UPDATE tasks SET lease_owner = ?, lease_until = ? WHERE id IN ({marks})",
                    (owner, now + lease_s, *chosen),
                )
            claimed = [self._get(task_id) for task_id in chosen]
        if taken:
            logger.warning(
                "took over the webhook deliveries of %d task(s) from a worker whose lease ran "
                "out (TASK_LEASE_S): %s; an attempt it had begun may reach its receiver again",
                len(taken),
                logs.listed(taken),
            )
        return claimed

    def has_delivery_due_by(self, when: float) -> bool:
        """Whether a pending delivery that nobody holds is due by ``when``."""
        with self._reading() as db:
            # Two searches of the partial index, as in ``claim_webhooks``.
            for condition, args in (
                ("lease_until IS NULL", ()),
                ("lease_until <= ? AND lease_owner IS NULL", (when,)),
            ):
                due = db.execute(
                    f"SELECT 1 FROM tasks WHERE webhook_status = ? AND {condition} LIMIT 1",
                    (WebhookStatus.PENDING, *args),
                ).fetchone()
                if due is not None:
                    return True
        return False

    def next_delivery_due(self, *, now: float) -> float | None:
        """When the next pending delivery falls due (a wait or a lease runs out), if any."""
        with self._reading() as db:
            (due,) = db.execute(
                "SELECT min(lease_until) FROM tasks WHERE webhook_status = ? AND lease_until > ?",
                (WebhookStatus.PENDING, now),
            ).fetchone()
        return None if due is None else float(due)

    def defer_webhook(
        self, task_id: str, owner: str, *, attempts: int, error: str, retry_at: float
    ) -> bool:
        """Store a failed attempt and give the delivery up until ``retry_at``: a lease held
        by nobody, so that no worker holds a slot while it waits and any may claim it when
        it is due, a restarted one included.

        Returns False if ``owner`` no longer holds the delivery (its lease expired and
        another worker claimed it): that worker's attempts are the ones that count.
        """
        with self._transaction() as db:
            return self._defer(db, owner, Deferral(task_id, attempts, error, retry_at))

    @staticmethod
    def _defer(db: sqlite3.Connection, owner: str, deferral: Deferral) -> bool:
        return (
            db.execute(
                "UPDATE tasks SET webhook_attempts = ?, webhook_last_error = ?, "
                "lease_owner = NULL, lease_until = ? WHERE id = ? AND lease_owner = ?",
                (deferral.attempts, deferral.error, deferral.retry_at, deferral.task_id, owner),
            ).rowcount
            > 0
        )

    def finish_webhook(
        self,
        task_id: str,
        owner: str,
        *,
        delivered: bool,
        attempts: int,
        error: str | None,
        now: float | None = None,
    ) -> bool:
        """Record the delivery's end and give up its lease; False if ``owner`` no longer
        holds it (as for ``defer_webhook``)."""
        status = WebhookStatus.DELIVERED if delivered else WebhookStatus.FAILED
        with self._transaction() as db:
            return (
                db.execute(
                    "UPDATE tasks SET webhook_status = ?, webhook_attempts = ?, "
                    "webhook_last_error = ?, webhook_ended_at = ?, lease_owner = NULL, "
                    "lease_until = NULL WHERE id = ? AND lease_owner = ? AND webhook_status = ?",
                    (status, attempts, error, _stamp(now), task_id, owner, WebhookStatus.PENDING),
                ).rowcount
                > 0
            )

    # --- Housekeeping -------------------------------------------------------------------------

    def delete_expired(self, finished_before: float, *, most: int = DELETE_STEP_TASKS) -> int:
        """Delete up to ``most`` tasks that finished before ``finished_before`` (their
        results expired), except those whose webhook is still being delivered or whose
        delivery ended since; how many were deleted. One short write: call again while it
        deletes ``most``."""
        with self._transaction() as db:
            return db.execute(
                "DELETE FROM tasks WHERE rowid IN (SELECT rowid FROM tasks WHERE finished_at < ? "
                "AND (webhook_status IS NULL OR webhook_status != ?) "
                "AND (webhook_ended_at IS NULL OR webhook_ended_at < ?) LIMIT ?)",
                (finished_before, WebhookStatus.PENDING, finished_before, most),
            ).rowcount

    def return_free_pages(self) -> bool:
        """Give up to ``VACUUM_STEP_PAGES`` of the pages that deleted images and tasks freed
        back to the file system, in one short write; whether more are left to give back."""
        before = self._free_pages()
        if not before:
            return False
        # executescript runs the pragma to the end; execute() would free one page.
        self._db.executescript(f"PRAGMA incremental_vacuum({VACUUM_STEP_PAGES});")
        after = self._free_pages()
        return 0 < after < before  # not shrinking: a store made without incremental vacuum

    def _free_pages(self) -> int:
        return int(self._db.execute("PRAGMA freelist_count").fetchone()[0])


def _stamp(now: float | None) -> float:
    """``now``, or the time of day: read once the write lock is held, so that writes are
    stamped in the order they commit. Read before the wait for the lock, a claim could
    stamp ``started_at`` before the ``created_at`` of a task committed while it waited."""
    return time.time() if now is None else now


def _keyed_task(db: sqlite3.Connection, idempotency_key: str) -> sqlite3.Row | None:
    row: sqlite3.Row | None = db.execute(
        "SELECT id, request_hash, finished_at, webhook_status, webhook_ended_at FROM tasks "
        "WHERE idempotency_key = ?",
        (idempotency_key,),
    ).fetchone()
    return row


def _expired(row: sqlite3.Row, expired_before: float | None) -> bool:
    """Whether the task finished before ``expired_before`` and its webhook, if any, is no
    longer being delivered and ended its delivery before then too: as ``delete_expired``
    keeps such a task, its status (with the delivery's attempts) and its Idempotency-Key
    are kept too."""
    finished_at = row["finished_at"]
    webhook_ended_at = row["webhook_ended_at"]
    return (
        finished_at is not None
        and expired_before is not None
        and finished_at < expired_before
        and row["webhook_status"] != WebhookStatus.PENDING
        and (webhook_ended_at is None or webhook_ended_at < expired_before)
    )
