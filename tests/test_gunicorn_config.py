"""gunicorn_config.py: every production setting comes from the environment, validated."""

from __future__ import annotations

import errno
import json
import os
import re
import runpy
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from gunicorn.config import Config
from prometheus_client.mmap_dict import MmapedDict

import service.settings
from service import memory, protocol
from service.settings import PROJECT_ROOT
from service.siblings import SIBLINGS_DIR, Siblings

CONFIG = PROJECT_ROOT / "gunicorn_config.py"


def load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> dict[str, object]:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path / "metrics"))
    # The config sets GOMP_SPINCOUNT by default: have the test's teardown remove it again.
    monkeypatch.setenv("GOMP_SPINCOUNT", "")
    monkeypatch.delenv("GOMP_SPINCOUNT")
    monkeypatch.setenv(SIBLINGS_DIR, "")  # which the config sets too
    monkeypatch.setenv("SERVICE_DEFAULT_METRICS_DIR", "")  # and this, with the default
    # The temporary directory a test chose (tempfile.tempdir), not a TMPDIR from outside.
    monkeypatch.setenv("TMPDIR", tempfile.gettempdir())
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # The test process's own limit is not the subject here (see the test of its own).
    monkeypatch.setattr(protocol, "raise_open_file_limit", lambda: None)
    return runpy.run_path(str(CONFIG))


def test_defaults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = load(monkeypatch, tmp_path)
    assert config["bind"] == "0.0.0.0:5001"
    assert config["workers"] == 1
    assert config["worker_class"] == "service.protocol.JsonErrorsUvicornWorker"
    assert config["preload_app"] is False  # each worker loads its model after the fork
    assert config["timeout"] == 120
    assert config["keepalive"] == 5
    assert config["graceful_timeout"] == 20 + 10  # covers DRAIN_TIMEOUT_S
    assert config["accesslog"] is None  # the service writes its own access lines


def test_openmp_threads_spin_longer_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    load(monkeypatch, tmp_path)
    assert os.environ["GOMP_SPINCOUNT"] == "1000000"  # inherited by the workers
    load(monkeypatch, tmp_path, GOMP_SPINCOUNT="300000")
    assert os.environ["GOMP_SPINCOUNT"] == "300000"
    load(monkeypatch, tmp_path, GOMP_SPINCOUNT="")  # empty means unset
    assert os.environ["GOMP_SPINCOUNT"] == "1000000"
    # Settings are read in any case; libgomp reads this name only.
    load(monkeypatch, tmp_path, gomp_spincount="infinite")
    assert os.environ["GOMP_SPINCOUNT"] == "infinite"


def test_the_allocator_is_set_as_gunicorn_starts_not_as_the_config_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """gunicorn puts its -e/raw_env values in the environment after loading the config and
    before on_starting: only then can a MALLOC_* among them count."""
    calls: list[str | None] = []
    monkeypatch.setattr(
        memory, "keep_freed_memory", lambda: calls.append(os.environ.get("MALLOC_ARENA_MAX"))
    )
    config = load(monkeypatch, tmp_path)
    assert calls == []
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # as gunicorn's -e sets it
    config["on_starting"](master(config))
    assert calls == ["4"]


def master(
    config: dict[str, object], log: object = None, **command_line: object
) -> SimpleNamespace:
    """gunicorn's arbiter, as the hooks use it, with the file's values in its configuration
    but for those given on the ``command_line`` (workers=2: -w 2), and no address to listen
    on (tried by a test of its own)."""
    cfg = {name: config[name] for name in ("workers", "timeout", "keepalive", "graceful_timeout")}
    cfg.update(
        worker_class_str=config["worker_class"],
        preload_app=config["preload_app"],
        loglevel=config["loglevel"],
        accesslog=config["accesslog"],
    )
    return SimpleNamespace(
        reap_workers=lambda: None,
        stop=lambda graceful=True: None,
        log=log or QuietLog(),
        cfg=SimpleNamespace(
            bind=[config["bind"]], address=[], reuse_port=False, **{**cfg, **command_line}
        ),
    )


@pytest.mark.parametrize(
    ("command_line", "line"),
    [
        ({"workers": 2}, "gunicorn's --workers 2 overrides WORKERS: set WORKERS instead"),
        (
            {"timeout": 3},
            "gunicorn's --timeout 3 overrides WORKER_TIMEOUT_S: set WORKER_TIMEOUT_S instead",
        ),
        ({"keepalive": 2}, "gunicorn's --keep-alive 2 overrides KEEPALIVE_S: set KEEPALIVE_S"),
        (
            {"graceful_timeout": 15},
            "gunicorn's --graceful-timeout 15 overrides DRAIN_TIMEOUT_S: set DRAIN_TIMEOUT_S "
            "instead (the graceful timeout is DRAIN_TIMEOUT_S + 10 s)",
        ),
        (
            {"worker_class_str": "uvicorn.workers.UvicornWorker"},
            "gunicorn's --worker-class uvicorn.workers.UvicornWorker replaces the service's "
            "worker, which applies DRAIN_TIMEOUT_S, WORKER_TIMEOUT_S and STALL_TIMEOUT_S: "
            "remove it",
        ),
        (
            {"loglevel": "DEBUG"},
            "gunicorn's --log-level debug overrides LOG_LEVEL: set LOG_LEVEL instead",
        ),
        (
            {"accesslog": "access.log"},
            "gunicorn's --access-logfile access.log: the service writes its access lines "
            "itself, with its other lines (ACCESS_LOG=false turns them off), to standard "
            "error or to gunicorn's --error-logfile: remove it",
        ),
        (
            {"preload_app": True},
            "gunicorn's --preload imports the app in the master, where each worker must start "
            "its own (its model, its threads, its log writer): remove it",
        ),
    ],
)
def test_gunicorn_flags_that_override_a_setting_stop_the_start(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    command_line: dict[str, object],
    line: str,
) -> None:
    """The workers go by the settings: --timeout 3 would kill them at 3 s while the service
    says WORKER_TIMEOUT_S=120, and -w 2 leave each with every core's threads. uvicorn's own
    worker (-k) would serve without the drain's and the start's time limits, and --preload
    leave every worker without its log writer's thread, its lines queued for ever."""
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: None)
    config = load(monkeypatch, tmp_path)
    config["on_starting"](master(config))  # the file's own values
    with pytest.raises(SystemExit) as stopped:
        config["on_starting"](master(config, **command_line))
    assert line in str(stopped.value)
    assert "\n" not in str(stopped.value).strip()


def test_settings_given_with_gunicorns_e_stop_the_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """gunicorn puts -e values in the environment after it has read this file: the master
    would run one worker with a 30 s graceful timeout while that worker sized its threads as
    one of -e WORKERS=2 and planned -e DRAIN_TIMEOUT_S=100's drain."""
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: None)
    config = load(monkeypatch, tmp_path, DRAIN_TIMEOUT_S="30")
    monkeypatch.setenv("WORKERS", "2")  # as gunicorn's -e sets them, before on_starting
    monkeypatch.setenv("DRAIN_TIMEOUT_S", "100")
    with pytest.raises(SystemExit) as stopped:
        config["on_starting"](master(config))
    assert str(stopped.value).strip() == (
        "invalid configuration: gunicorn's -e sets WORKERS, DRAIN_TIMEOUT_S after "
        "gunicorn_config.py has read the settings for gunicorn's master, which would run by "
        "the values before it: set them in the environment instead"
    )

    # Only what -e names: MAX_BATCH_FILES follows MAX_QUEUE.
    monkeypatch.setenv("WORKERS", "1")
    monkeypatch.setenv("DRAIN_TIMEOUT_S", "30")
    monkeypatch.setenv("MAX_QUEUE", "5")
    with pytest.raises(SystemExit) as stopped:
        config["on_starting"](master(config))
    assert "gunicorn's -e sets MAX_QUEUE after" in str(stopped.value)
    monkeypatch.delenv("MAX_QUEUE")

    # The same values, or GOMP_SPINCOUNT, which the master only passes on to the workers
    # (as -e does itself), start.
    monkeypatch.setenv("WORKERS", "1")
    monkeypatch.setenv("DRAIN_TIMEOUT_S", "30")
    monkeypatch.setenv("GOMP_SPINCOUNT", "300000")
    config["on_starting"](master(config))

    # An invalid one is refused here, before the port is bound.
    monkeypatch.setenv("MAX_BATCH_SIZE", "0")
    with pytest.raises(SystemExit) as stopped:
        config["on_starting"](master(config))
    assert "MAX_BATCH_SIZE='0'" in str(stopped.value)
    monkeypatch.delenv("MAX_BATCH_SIZE")

    # As are the home directory (a ~ in a setting's path) and the temporary one, which
    # Python keeps as it first reads it: named themselves, not as what they change.
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    with pytest.raises(SystemExit) as stopped:
        config["on_starting"](master(config))
    assert "gunicorn's -e sets TMPDIR after gunicorn_config.py" in str(stopped.value)


def test_the_master_marks_the_server_stopping_before_it_stops_the_workers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A worker stopped while it starts answers the requests waiting for it only as the
    server stops: by a reload (SIGHUP) or TTOU, the worker replacing it serves them."""
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: None)
    config = load(monkeypatch, tmp_path)
    stopped: list[bool] = []
    server = master(config)
    server.stop = lambda graceful=True: stopped.append(siblings.server_stopping())
    config["on_starting"](server)
    siblings = config["SIBLINGS"]
    assert isinstance(siblings, Siblings)
    siblings.directory.mkdir()  # as when_ready makes it
    assert not siblings.server_stopping()
    server.stop(graceful=True)
    assert stopped == [True]


class QuietLog:
    """gunicorn's logger, as the hooks use it: keeps the warnings."""

    def __init__(self) -> None:
        self.warnings: list[str] = []

    def warning(self, message: str, *args: object) -> None:
        self.warnings.append(message % args)


def test_misspelt_setting_names_are_warned_of_once_by_the_master(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: None)
    config = load(monkeypatch, tmp_path, WORKER="2")
    log = QuietLog()
    config["on_starting"](master(config, log))
    assert "WORKER is no setting, and is ignored: did you mean WORKERS?" in log.warnings


def test_a_web_concurrency_that_is_not_the_workers_setting_is_warned_of(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """gunicorn's default worker count, which WORKERS replaces here."""
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: None)
    monkeypatch.setattr(service.settings, "available_cores", lambda: 4)

    def warnings_as_it_starts(**environ: str) -> list[str]:
        log = QuietLog()
        config = load(monkeypatch, tmp_path, **environ)
        config["on_starting"](master(config, log))
        return log.warnings

    assert warnings_as_it_starts(WORKERS="2", WEB_CONCURRENCY="2") == []
    (warning,) = warnings_as_it_starts(WORKERS="1", WEB_CONCURRENCY="4")
    assert warning == (
        "WEB_CONCURRENCY=4 is ignored: the service runs WORKERS=1 workers; set WORKERS to "
        "change that"
    )


def test_more_workers_than_cores_are_warned_of(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each then has one thread, and their threads take turns on the cores."""
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: None)
    monkeypatch.setattr(service.settings, "available_cores", lambda: 2)

    def warnings_as_it_starts(workers: str) -> list[str]:
        log = QuietLog()
        config = load(monkeypatch, tmp_path, WORKERS=workers)
        config["on_starting"](master(config, log))
        return log.warnings

    assert warnings_as_it_starts("2") == []
    (warning,) = warnings_as_it_starts("3")
    assert warning.startswith("WORKERS=3 is more than the 2 cores the service may use")


def test_everything_comes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = load(
        monkeypatch,
        tmp_path,
        PORT="8080",
        WORKERS="3",
        WORKER_TIMEOUT_S="300",
        KEEPALIVE_S="20",
        DRAIN_TIMEOUT_S="45",
        LOG_LEVEL="warning",
    )
    assert config["bind"] == "0.0.0.0:8080"
    assert config["workers"] == 3
    assert config["timeout"] == 300
    assert config["keepalive"] == 20
    assert config["graceful_timeout"] == 55
    # Rounded up: a fraction of a second of the drain is not taken from the margin.
    assert load(monkeypatch, tmp_path, DRAIN_TIMEOUT_S="5.1")["graceful_timeout"] == 16
    assert config["loglevel"] == "warning"
    assert load(monkeypatch, tmp_path, BIND="127.0.0.1:9000")["bind"] == "127.0.0.1:9000"
    for address in (
        "[::1]:9000",
        "unix:/run/service.sock",
        "localhost:1",
        "api_1.internal:80",
        "host.example.com.:80",
        "tcp://127.0.0.1:9000",
    ):
        assert load(monkeypatch, tmp_path, BIND=address)["bind"] == address
    # Each as a browser sends it: CORS compares origins as strings.
    origins = "HTTPS://A.example:443, http://[0:0::1]:8080,chrome-extension://abcdef, *"
    assert load(monkeypatch, tmp_path, CORS_ORIGINS=origins)["settings"].cors_origin_list == [
        "https://a.example",
        "http://[::1]:8080",
        "chrome-extension://abcdef",
        "*",
    ]
    for spin_count in ("0", "300000", "10M", " 2 k ", "-1", "INFINITE", "infinity"):
        assert load(monkeypatch, tmp_path, GOMP_SPINCOUNT=spin_count)["settings"].gomp_spincount
    # Empty means unset, as for the other settings.
    assert load(monkeypatch, tmp_path, BIND="", PORT="8080")["bind"] == "0.0.0.0:8080"
    assert load(monkeypatch, tmp_path, DATA_DIR="")["settings"].data_dir == Path("data")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WORKER_TIMEOUT_S", "5"),
        ("DRAIN_TIMEOUT_S", "inf"),
        ("DRAIN_TIMEOUT_S", "1e400"),
        ("REQUEST_TIMEOUT_MS", "nan"),
        ("SEED", "99999999999999999999999"),
        ("SEED", "-1"),
        ("TORCH_THREADS", "99999999999999999999999"),
        ("DECODE_THREADS", "100000"),
        ("TASK_MAX_ATTEMPTS", str(10**19)),
        ("TASK_MAX_QUEUED", str(10**19)),
        ("KEEPALIVE_S", "0"),
        # Accepted, this would reach file.read() as an index too large: every /tasks a 500.
        ("MAX_UPLOAD_BYTES", str(2**63 - 1)),
        ("WEBHOOK_TIMEOUT_S", "1e30"),
        # A lease shorter than a write can stall hands a live worker's tasks to others.
        ("TASK_LEASE_S", "0.2"),
        ("TASK_TTL", "-5"),  # named as given, not as the duration it was read as
        # gunicorn would bind port 8000 for a bare host, and fail with a traceback on
        # a port out of range.
        ("BIND", "nonsense"),
        ("BIND", " "),
        ("BIND", "127.0.0.1:99999"),
        ("BIND", "127.0.0.1:"),
        ("BIND", ":5001"),
        ("BIND", "unix:"),
        # gunicorn finds no port in the first two and in the URL (it reads '' or
        # '//127.0.0.1'), binds port 8000 for the third; brackets hold IPv6 only, and a
        # host name has no blank.
        ("BIND", "::1:5001"),
        ("BIND", "[::1:5001"),
        ("BIND", "[::1]x:5001"),
        ("BIND", "[127.0.0.1]:5001"),
        ("BIND", "http://127.0.0.1:5001"),
        ("BIND", "host name:5001"),
        # No browser sends these as its Origin: CORS would fail without a word.
        ("CORS_ORIGINS", "https://a.example/"),
        ("CORS_ORIGINS", "https://a.example, b.example"),
        ("CORS_ORIGINS", "https://a.example/app"),
        ("CORS_ORIGINS", "http://a.example:99999"),
        ("CORS_ORIGINS", "http://[1.2.3.4]"),
        ("CORS_ORIGINS", "null"),
        # libgomp would warn in each worker and spin for its default.
        ("GOMP_SPINCOUNT", "abc"),
        ("GOMP_SPINCOUNT", "10x"),
        ("GOMP_SPINCOUNT", "\uff11\uff12"),  # full-width digits
        ("GOMP_SPINCOUNT", "9" * 20),  # past an unsigned 64-bit integer
    ],
)
def test_an_invalid_value_stops_start_up_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str, value: str
) -> None:
    with pytest.raises(SystemExit, match=re.escape(f"{name}='{value}'")) as stopped:
        load(monkeypatch, tmp_path, **{name: value})
    assert "\n" not in str(stopped.value)


@pytest.mark.parametrize("value", ["localhost", "127.0.0.1", "nonsense", "[::1]", "tcp://[::1]"])
def test_a_bind_address_without_a_port_says_so(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, value: str
) -> None:
    with pytest.raises(SystemExit, match=re.escape(f"BIND={value!r}: has no port; expected")):
        load(monkeypatch, tmp_path, BIND=value)


@pytest.mark.parametrize("key", [" ", "s3cret ", "\ts3cret", "s3cret\n", "s3\x1bcret"])
def test_an_api_key_no_request_can_send_stops_start_up_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, key: str
) -> None:
    with pytest.raises(SystemExit, match="API_KEY='\\*\\*\\*': starts or ends with a blank"):
        load(monkeypatch, tmp_path, API_KEY=key)
    assert load(monkeypatch, tmp_path, API_KEY="s3 cret")["workers"] == 1


def test_metrics_hooks_start_clean_and_forget_dead_workers(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = load(monkeypatch, tmp_path)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    for stale in ("counter_123.db", "histogram_123.db", "gauge_livesum_123.db"):
        (metrics_dir / stale).write_bytes(b"stale")
    # The directory may be a mount, or shared: only the metric files go.
    others = ["notes.txt", "orders.db", "counter_backup.db"]
    for name in others:
        (metrics_dir / name).write_text("not ours")
    when_ready = config["when_ready"]
    assert callable(when_ready)
    when_ready(SimpleNamespace())
    assert sorted(path.name for path in metrics_dir.iterdir()) == sorted(others)
    assert callable(config["child_exit"])


def test_a_worker_that_counted_nothing_leaves_no_metric_files(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A worker failing to start every 30 s would leave three files each time: a day of that
    and a scrape would take 0.76 s instead of 5 ms. One that counted anything keeps its
    counts, whether or not its ready mark is still there (a cleaner may empty the temporary
    directory)."""
    config = load(monkeypatch, tmp_path)
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()

    def metric_file(name: str, value: float) -> None:
        values = MmapedDict(str(metrics_dir / name))
        values.write_value('["http_requests", "http_requests_total", {}, "help"]', value, 0.0)
        values.close()

    metric_file("counter_123.db", 0.0)  # started, or not, and served nothing
    metric_file("histogram_123.db", 0.0)
    metric_file("gauge_mostrecent_123.db", 1.0)
    metric_file("counter_456.db", 3.0)  # served: no ready mark
    metric_file("histogram_456.db", 0.0)
    metric_file("counter_1123.db", 0.0)  # alive
    child_exit = config["child_exit"]
    assert callable(child_exit)
    for pid in (123, 456):
        child_exit(SimpleNamespace(), SimpleNamespace(pid=pid, aborted=False, forked_at=0.0))
    assert sorted(path.name for path in metrics_dir.iterdir()) == [
        "counter_1123.db",
        "counter_456.db",
        "histogram_456.db",
    ]


def test_the_directories_of_a_master_killed_outright_are_removed_at_the_next_start(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A SIGKILLed master runs no on_exit: its default metrics and siblings directories
    would stay in the temporary directory for good, one pair per such restart."""
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    alive = str(os.getppid())  # the runner, alive (this process has directories of its own)
    for name in (
        f"prometheus-multiproc-{gone}",
        f"service-siblings-{gone}",
        f"prometheus-multiproc-{alive}",
        f"service-siblings-{alive}",
        "prometheus-multiproc-mine",
    ):
        (temporary / name).mkdir()
        (temporary / name / "counter_1.db").write_bytes(b"")
    config = load(monkeypatch, tmp_path)
    when_ready = config["when_ready"]
    assert callable(when_ready)
    when_ready(SimpleNamespace())

    assert not (temporary / f"prometheus-multiproc-{gone}").exists()
    assert not (temporary / f"service-siblings-{gone}").exists()
    for kept in (
        f"prometheus-multiproc-{alive}",
        f"service-siblings-{alive}",
        "prometheus-multiproc-mine",
    ):
        assert (temporary / kept / "counter_1.db").exists(), kept


def _start_in_own_temporary_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> tuple[Path, dict[str, object]]:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    return temporary, load(monkeypatch, tmp_path, PROMETHEUS_MULTIPROC_DIR="")


@pytest.mark.parametrize("prefix", ["prometheus-multiproc-", "service-siblings-"])
@pytest.mark.parametrize("planted", ["another user's directory", "a link"])
def test_a_directory_named_by_the_masters_pid_that_another_user_made_stops_start_up(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prefix: str, planted: str
) -> None:
    """The default directories are named by the master's pid in the shared temporary
    directory, where anyone may make them first, to read or forge the workers' files, or
    to hold links that the workers would write through."""
    temporary, config = _start_in_own_temporary_dir(monkeypatch, tmp_path)
    planted_at = temporary / f"{prefix}{os.getpid()}"
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    if planted == "a link":
        planted_at.symlink_to(theirs)
    else:
        planted_at.mkdir(mode=0o777)
        monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)  # made by someone else
    when_ready = config["when_ready"]
    assert callable(when_ready)

    with pytest.raises(SystemExit) as stopped:
        when_ready(SimpleNamespace())

    expected = "a link" if planted == "a link" else f"owned by uid {os.getuid()}"
    assert str(stopped.value) == (
        f"{planted_at} exists and is {expected}, not a directory of this user's, who could "
        "read or forge what the workers write there: remove it, or set TMPDIR to a "
        "directory only this user can write to"
    )
    assert list(theirs.iterdir()) == []


def test_the_directories_named_by_the_masters_pid_are_this_users_alone(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    temporary, config = _start_in_own_temporary_dir(monkeypatch, tmp_path)
    left_by_an_earlier_run = temporary / f"service-siblings-{os.getpid()}"
    left_by_an_earlier_run.mkdir(mode=0o777)
    left_by_an_earlier_run.chmod(0o777)
    (left_by_an_earlier_run / "started").touch()
    when_ready, on_exit = config["when_ready"], config["on_exit"]
    assert callable(when_ready)
    assert callable(on_exit)

    when_ready(SimpleNamespace())
    try:
        for prefix in ("prometheus-multiproc-", "service-siblings-"):
            made = temporary / f"{prefix}{os.getpid()}"
            assert made.stat().st_mode & 0o777 == 0o700, prefix
        assert list(left_by_an_earlier_run.iterdir()) == []  # its marks are not this run's
    finally:
        on_exit(None)


@pytest.mark.parametrize("empty", ["", " "])
def test_an_empty_metrics_dir_means_the_default_not_the_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, empty: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "important.db").write_text("not a metric file")
    load(monkeypatch, tmp_path)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", empty)
    config = runpy.run_path(str(CONFIG))
    when_ready, on_exit = config["when_ready"], config["on_exit"]
    assert callable(when_ready)
    assert callable(on_exit)
    when_ready(SimpleNamespace())
    try:
        assert (tmp_path / "important.db").read_text() == "not a metric file"
        assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(config["PROMETHEUS_DIR"])
        assert config["PROMETHEUS_DIR"] != Path(empty)
    finally:
        on_exit(None)


def test_a_master_started_from_another_masters_environment_has_its_own_metrics_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """USR2 starts a new master with the old one's environment, which holds the default
    directory the old one chose (after a SIGHUP, when gunicorn copies it): sharing it, the
    new master would wipe the old workers' files, and lose its own as the old one exits."""
    old_default = str(tmp_path / "prometheus-multiproc-999")
    config = load(
        monkeypatch,
        tmp_path,
        PROMETHEUS_MULTIPROC_DIR=old_default,
        SERVICE_DEFAULT_METRICS_DIR=old_default,
    )
    assert config["PROMETHEUS_DIR"] == config["_DEFAULT_METRICS_DIR"]
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(config["_DEFAULT_METRICS_DIR"])
    assert str(config["PROMETHEUS_DIR"]) != old_default
    # One given by hand is kept, whatever the master.
    given = str(tmp_path / "metrics")
    assert (
        str(load(monkeypatch, tmp_path, PROMETHEUS_MULTIPROC_DIR=given)["PROMETHEUS_DIR"]) == given
    )
    # Blanks around it are not part of it, for the master or its workers' metrics.
    padded = load(monkeypatch, tmp_path, PROMETHEUS_MULTIPROC_DIR=f"  {given} ")
    assert str(padded["PROMETHEUS_DIR"]) == os.environ["PROMETHEUS_MULTIPROC_DIR"] == given


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_metrics_dir_that_cannot_be_made_stops_start_up_with_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, log_format: str
) -> None:
    config = load(monkeypatch, tmp_path, LOG_FORMAT=log_format)
    (tmp_path / "metrics").write_text("a file where the directory should be")
    when_ready = config["when_ready"]
    assert callable(when_ready)
    with pytest.raises(SystemExit) as stopped:
        when_ready(SimpleNamespace())
    line = str(stopped.value)
    assert "\n" not in line
    message = json.loads(line)["message"] if log_format == "json" else line
    assert re.match(
        r"invalid configuration: PROMETHEUS_MULTIPROC_DIR=.+ cannot hold the metrics: it is a "
        r"file, not a directory; point it at a directory",
        message,
    )


def test_a_batch_request_must_fit_the_queue(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with pytest.raises(
        SystemExit, match=r"MAX_BATCH_FILES \(32\) must be at most MAX_QUEUE \(16\)"
    ):
        load(monkeypatch, tmp_path, MAX_QUEUE="16", MAX_BATCH_FILES="32")
    assert load(monkeypatch, tmp_path, MAX_QUEUE="16", MAX_BATCH_FILES="16")["workers"] == 1
    assert load(monkeypatch, tmp_path, MAX_QUEUE="16")["workers"] == 1


def test_checking_the_configuration_leaves_no_directory_behind(tmp_path: Path) -> None:
    """``gunicorn --check-config`` imports the app, whose metrics make the default
    directory, and exits without on_exit: one directory left per check."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("PROMETHEUS_MULTIPROC_DIR", "SERVICE_DEFAULT_METRICS_DIR", SIBLINGS_DIR)
    }
    checked = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--check-config", "main:app", "-c", str(CONFIG)],
        cwd=PROJECT_ROOT,
        env=env | {"TMPDIR": str(tmp_path), "WEIGHTS": "random"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr
    assert not list(tmp_path.glob("prometheus-multiproc-*"))


@pytest.mark.parametrize(
    ("soft", "hard", "raised_to", "warned"),
    [(1024, 8192, 8192, False), (1024, 1024, 1024, True), (512, 2048, 2048, True)],
)
def test_the_open_file_limit_is_raised_to_the_hard_one_and_a_low_one_warned_of(
    soft: int, hard: int, raised_to: int, warned: bool
) -> None:
    """Each connection holds a descriptor, and past the limit the event loop closes the
    connections waiting to be accepted, unanswered: 1,024, a common default, is about
    1,000 clients a worker."""
    script = (
        "import resource\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard}))\n"
        "from service.protocol import raise_open_file_limit\n"
        "print(raise_open_file_limit())\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    ran = subprocess.run(
        [sys.executable, "-c", script],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    warning, limit = ran.stdout.strip().split("\n")
    assert int(limit) == raised_to
    if warned:
        assert warning.startswith(f"the open-file limit is {raised_to} (its hard limit {hard})")
        assert "ulimit -n" in warning
    else:
        assert warning == "None"


def test_the_master_raises_the_open_file_limit_its_workers_inherit(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(memory, "keep_freed_memory", lambda: None)
    load(monkeypatch, tmp_path)  # the environment the file needs
    monkeypatch.setattr(protocol, "raise_open_file_limit", lambda: "the open-file limit is 1024")
    config = runpy.run_path(str(CONFIG))
    log = QuietLog()
    config["on_starting"](master(config, log))
    assert log.warnings == ["the open-file limit is 1024"]


def test_under_an_unlimited_hard_limit_the_open_file_limit_is_raised_below_the_kernels_ceiling(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """macOS: the hard limit reads unlimited, and setrlimit refuses more than OPEN_MAX."""
    import resource

    unlimited = resource.RLIM_INFINITY
    limits = {"soft": 256}
    tried: list[int] = []

    def setrlimit(kind: int, values: tuple[int, int]) -> None:
        tried.append(values[0])
        if values[0] > protocol.MACOS_OPEN_MAX:
            raise ValueError("current limit exceeds maximum limit")
        limits["soft"] = values[0]

    monkeypatch.setattr(resource, "getrlimit", lambda kind: (limits["soft"], unlimited))
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    assert protocol.raise_open_file_limit() is None
    assert tried == [protocol.UNLIMITED_FILES_TRY, protocol.MACOS_OPEN_MAX]
    assert limits["soft"] == protocol.MACOS_OPEN_MAX
    # Unlimited already: left alone.
    monkeypatch.setattr(resource, "getrlimit", lambda kind: (unlimited, unlimited))
    tried.clear()
    assert protocol.raise_open_file_limit() is None
    assert tried == []


def test_the_configuration_gunicorn_logs_at_debug_level_leaves_out_environment_values(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-e API_KEY=...`` (refused at start where the environment holds another value)
    is in gunicorn's dump of its configuration at debug level, written before: it must not
    write the key to the log."""
    config = load(monkeypatch, tmp_path, LOG_LEVEL="debug")
    cfg = Config()
    cfg.set("loglevel", config["loglevel"])
    cfg.set("raw_env", ["API_KEY=leaked-key", "WEBHOOK_SECRET=it's leaked"])
    logger_class = config["logger_class"]
    assert isinstance(logger_class, type)
    logger = logger_class(cfg)
    # As gunicorn's arbiter writes it as it starts.
    settings = sorted(cfg.settings.items(), key=lambda item: item[1])
    lines = [f"  {name}: {setting.value}" for name, setting in settings]
    logger.debug("Current configuration:\n" + "\n".join(lines))
    logged = capsys.readouterr().err
    assert "raw_env: [API_KEY, WEBHOOK_SECRET] (values not logged)" in logged
    assert "leaked" not in logged
    assert "loglevel: debug" in logged


def test_an_address_that_cannot_be_listened_on_stops_the_start_in_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Rather than gunicorn's five tries a second apart, two lines each, none naming the
    setting; sockets inherited (a USR2 re-exec, systemd) are not tried."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = load(monkeypatch, tmp_path, PORT=str(port))
        refuse = config["_refuse_addresses_not_free"]

        def gunicorn_cfg(*addresses: str, reuse_port: bool = False) -> Config:
            cfg = Config()
            cfg.set("bind", list(addresses or [config["bind"]]))
            cfg.set("reuse_port", reuse_port)
            return cfg

        with pytest.raises(SystemExit) as in_use:
            refuse(gunicorn_cfg())
        assert str(in_use.value) == (
            f"cannot start: cannot listen on 0.0.0.0:{port} (Address already in use); "
            "another process listens there: stop it, or set PORT to a free port"
        )
        with pytest.raises(SystemExit) as by_flag:
            refuse(gunicorn_cfg(f"127.0.0.1:{port}", "unix:/tmp/unix.sock"))
        assert str(by_flag.value).endswith("set gunicorn's --bind to a free port")
        refuse(gunicorn_cfg(reuse_port=True))  # shared on purpose: gunicorn's to bind
        monkeypatch.setenv("LISTEN_FDS", "1")
        refuse(gunicorn_cfg())
        monkeypatch.delenv("LISTEN_FDS")
    refuse(gunicorn_cfg())  # free again
    config = load(monkeypatch, tmp_path, BIND=f"192.0.2.1:{port}")  # TEST-NET-1: no host's
    with pytest.raises(SystemExit) as elsewhere:
        config["_refuse_addresses_not_free"](gunicorn_cfg(config["bind"]))
    assert "; not an address of this host: set BIND to one of its own" in str(elsewhere.value)
    refuse = config["_refuse_addresses_not_free"]

    def refused_to_the_unprivileged(self: socket.socket, address: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(socket.socket, "bind", refused_to_the_unprivileged)
    with pytest.raises(SystemExit) as privileged:
        refuse(gunicorn_cfg(config["bind"]))
    assert str(privileged.value).endswith(
        "(Permission denied); a port under 1024 needs privileges: set BIND to a higher one"
    )
