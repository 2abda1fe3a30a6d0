"""gunicorn settings for production: ``gunicorn main:app -c gunicorn_config.py``.

Everything comes from the same environment variables as the app (see README). The
settings are validated here, in the master, so a bad value stops start-up once, clearly.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import math
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gunicorn import glogging
from gunicorn import util as gunicorn_util

from service import logs, memory
from service.protocol import raise_open_file_limit
from service.settings import (
    Settings,
    available_cores,
    load_settings,
    misspelt_settings,
    prepare_metrics_dir,
    refuse_metrics_path_of_a_file,
    refuse_to_start,
    settings_to_warn_of,
)
from service.siblings import (
    RUN_DIRECTORY_PREFIX,
    SIBLINGS_DIR,
    Siblings,
    process_alive,
    run_directory,
)
from service.task_runner import STOP_AFTER_DRAIN_MAX_S

if TYPE_CHECKING:
    from gunicorn.arbiter import Arbiter
    from gunicorn.config import Config
    from gunicorn.workers.base import Worker

settings = load_settings()
# Read as this file loads, with the settings: the home directory (a ~ in a setting's path)
# and the temporary one (uploads spooled, the run directories), which Python keeps.
_READ_WITH_THE_SETTINGS = {name: os.environ.get(name) for name in ("HOME", "TMPDIR")}


def _setting_values() -> dict[str, str]:
    """The environment's values of settings, by field name (they are read in any case)."""
    return {
        key.lower(): value
        for key, value in os.environ.items()
        if key.lower() in Settings.model_fields
    }


_SETTINGS_AS_READ = _setting_values()

# Names the default metrics directory a master chose, so that a master started from its
# environment (USR2, after a SIGHUP made gunicorn copy it) chooses its own: the old one
# removes its directory as it exits.
_DEFAULTED = "SERVICE_DEFAULT_METRICS_DIR"


def _name_run_directories() -> None:
    """Name this master's directories by its pid (gunicorn may read this file more than
    once, so the names are derived, not random), in the environment its workers inherit.

    Workers write metric samples in ``PROMETHEUS_DIR`` and /metrics merges them: it must be
    set before any worker imports prometheus_client. In ``SIBLINGS``' directory they tell
    each other that they have started (service/siblings.py).
    """
    global _DEFAULT_METRICS_DIR, PROMETHEUS_DIR, SIBLINGS
    pid = os.getpid()
    _DEFAULT_METRICS_DIR = Path(tempfile.gettempdir()) / f"prometheus-multiproc-{pid}"
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "").strip()
    # Empty means unset: an empty path is the working directory, whose *.db files the
    # clean-up below would delete.
    if not given or given == os.environ.get(_DEFAULTED):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = os.environ[_DEFAULTED] = str(_DEFAULT_METRICS_DIR)
    else:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = given  # as the workers' metrics read it
    PROMETHEUS_DIR = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    os.environ[SIBLINGS_DIR] = str(run_directory(pid))
    SIBLINGS = Siblings(Path(os.environ[SIBLINGS_DIR]))


_name_run_directories()
_LOADED_BY = os.getpid()


def _remove_metrics_dir_of_no_run() -> None:
    """``gunicorn --check-config`` imports the app, whose metrics make the default
    directory, and exits without ``on_exit``. Only in the process that read this file
    (forked workers inherit the handler), and only if no run began: a master that serves
    has made its workers' directory (``when_ready``), and keeps it until ``on_exit``."""
    if (
        os.getpid() == _LOADED_BY
        and PROMETHEUS_DIR == _DEFAULT_METRICS_DIR
        and not SIBLINGS.directory.exists()
    ):
        shutil.rmtree(PROMETHEUS_DIR, ignore_errors=True)


atexit.register(_remove_metrics_dir_of_no_run)

# libgomp, torch's OpenMP runtime on CPU, reads this as a worker imports torch. Its threads
# then spin for about 20 ms after a forward pass before they sleep, instead of about 6, so
# a request arriving in that time does not wait for them to wake: a lone request's latency
# fell 3-10 % on a 2-core VM, with no change under load (docs/benchmarks/README.md).
# Settings are read in any case, libgomp reads only this one: pass a value given as
# gomp_spincount on under the name it reads.
os.environ["GOMP_SPINCOUNT"] = settings.gomp_spincount or "1000000"  # unset or empty

bind = settings.bind or f"0.0.0.0:{settings.port}"
# Each worker's model on a CPU uses cores // WORKERS threads, at least one (TORCH_THREADS
# overrides), so up to one worker a core never oversubscribes them; see
# Settings.torch_threads_on.
workers = settings.workers
worker_class = "service.protocol.JsonErrorsUvicornWorker"
# Each worker loads its own model after the fork; a torch runtime forked from a parent
# that already used it is unsafe (OpenMP pools, CUDA contexts).
preload_app = False
# uvicorn workers serve requests on an event loop: gunicorn's `threads` does not apply.
# A worker that does not report for this long is restarted, from its start on: loading and
# warming up the model count (JsonErrorsUvicornWorker.init_process).
timeout = settings.worker_timeout_s
# SIGTERM: stop accepting, let accepted requests finish (DRAIN_TIMEOUT_S), hand running
# tasks back (up to 9 s with the task store locked by another process), then exit; the
# margin covers that and the worker's own exit.
SHUTDOWN_MARGIN_S = math.ceil(STOP_AFTER_DRAIN_MAX_S) + 1
graceful_timeout = math.ceil(settings.drain_timeout_s) + SHUTDOWN_MARGIN_S
# A reverse proxy's upstream keepalive timeout must be shorter than this, so the proxy
# never sends a request on a connection the service is closing.
keepalive = settings.keepalive_s
# The control socket (gunicornc) is not used; without it, several servers can share a host.
control_socket_disable = True
accesslog = None
errorlog = "-"
loglevel = settings.log_level


class MaskedEnvironmentLogger(glogging.Logger):
    """gunicorn's logger, but for the values of ``-e NAME=value`` (secrets among them),
    which its configuration dump at debug level would show."""

    def setup(self, cfg: Config) -> None:
        if cfg.errorlog != "-":
            # The service writes its lines (access lines among them) to standard error:
            # --error-logfile takes them all, and USR1 reopens it for them too.
            cfg.set("capture_output", True)
        super().setup(cfg)
        self.error_log.addFilter(logs.EnvironmentValuesMasked())


logger_class = MaskedEnvironmentLogger
if settings.log_format == "json":
    # gunicorn's own lines, and uvicorn's (its worker writes them through gunicorn's
    # handlers), in the service's JSON, so that a log collector reads every line.
    # Given a logging configuration, gunicorn merges it over its defaults section by
    # section: these loggers and root replace the defaults', which would also send every
    # line to the root logger (twice), turn the access log on, and let every library log
    # at INFO (httpx would log each webhook's URL).
    logconfig_dict = {
        "formatters": {"generic": {"()": "service.logs.json_formatter"}},
        "root": {"level": "WARNING", "handlers": ["error_console"]},
        "loggers": {
            "gunicorn.error": {
                "level": loglevel.upper(),
                "handlers": ["error_console"],
                "propagate": False,
                "qualname": "gunicorn.error",
            },
            "gunicorn.access": {"handlers": [], "propagate": False, "qualname": "gunicorn.access"},
        },
    }


def _refuse_addresses_not_free(cfg: Config) -> None:
    """Stop with one line when a TCP address cannot be listened on (another process holds
    the port, or the host is not this machine's), rather than gunicorn's five tries a
    second apart, two lines each, none naming the setting."""
    if os.environ.get("GUNICORN_FD") or os.environ.get("LISTEN_FDS"):
        return  # listening sockets inherited (USR2's new master, systemd): bound already
    if cfg.reuse_port:
        return  # --reuse-port: a port other processes listen on too is taken as well
    setting = "BIND" if settings.bind else "PORT"
    if cfg.bind != [bind]:
        setting = "gunicorn's --bind"
    for address in cfg.address:
        if not isinstance(address, tuple):
            continue  # a unix socket's path: gunicorn replaces a stale one
        host, port = address
        # As gunicorn binds it: SO_REUSEADDR, IPv6 only for an IPv6 address.
        family = socket.AF_INET6 if gunicorn_util.is_ipv6(host) else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                fix = f"another process listens there: stop it, or set {setting} to a free port"
            elif exc.errno == errno.EACCES:
                fix = f"a port under 1024 needs privileges: set {setting} to a higher one"
            else:
                fix = f"not an address of this host: set {setting} to one of its own (0.0.0.0: all)"
            shown = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            raise SystemExit(
                logs.unconfigured_line(
                    f"cannot start: cannot listen on {shown} ({exc.strerror or exc}); {fix}"
                )
            ) from None


def on_starting(server: Arbiter) -> None:
    # Named again in the master: with --daemon, gunicorn forked twice since it read this
    # file, and directories named by the pid of the process that did, which has exited,
    # would pass for a dead master's. And gunicorn's -e values are in the environment now.
    _name_run_directories()
    _refuse_settings_given_too_late()
    _refuse_flags_that_override_settings(server.cfg)
    _refuse_addresses_not_free(server.cfg)
    # Before the port is bound; whether the directory takes files is found in when_ready.
    refuse_metrics_path_of_a_file(PROMETHEUS_DIR)
    _halt_once_for_workers_that_cannot_start(server)
    _mark_stopping_as_the_server_stops(server)
    # gunicorn's -e values are in the environment by now.
    for line in [*misspelt_settings(), *settings_to_warn_of(settings)]:
        server.log.warning(line)
    # gunicorn's default worker count, which platforms set by machine size; not refused, so
    # that such a platform still starts, but this file's WORKERS is what runs.
    web_concurrency = os.environ.get("WEB_CONCURRENCY", "").strip()
    if web_concurrency and web_concurrency != str(settings.workers):
        server.log.warning(
            "WEB_CONCURRENCY=%s is ignored: the service runs WORKERS=%d workers; set WORKERS "
            "to change that",
            web_concurrency,
            settings.workers,
        )
    if settings.workers > (cores := available_cores()):
        server.log.warning(
            "WORKERS=%d is more than the %d cores the service may use: each worker's model "
            "gets one thread, and their threads take turns on the cores (on a CPU, one "
            "worker a core serves as much, in less memory)",
            settings.workers,
            cores,
        )
    # Inherited by the workers, which hold the connections.
    if (warning := raise_open_file_limit()) is not None:
        server.log.warning(warning)
    # glibc's allocator keeps freed memory for reuse in one arena (service/memory.py): set
    # before the workers are forked, so that none of their threads has an arena of its own,
    # and once gunicorn has put its -e/raw_env values in the environment, so they count.
    memory.keep_freed_memory()


def _refuse_settings_given_too_late() -> None:
    """Stop with one line where gunicorn's -e (or raw_env, or -e in GUNICORN_CMD_ARGS)
    changed a setting: gunicorn puts those values in the environment after it has read
    this file, so the master would run by the environment's (its workers, timeouts, port)
    and the workers, which read the settings again, by -e's. An invalid value is refused
    here, before the port is bound, as one from the environment is."""
    late = [
        name for name, value in _READ_WITH_THE_SETTINGS.items() if os.environ.get(name) != value
    ]
    if not late:
        given = load_settings()
        changed = [
            name
            for name, value in given
            # Only put in the environment, for libgomp: -e does that itself.
            if name != "gomp_spincount" and value != getattr(settings, name)
        ]
        # Those -e named: MAX_QUEUE changes MAX_BATCH_FILES, which follows it.
        named = [
            name for name in changed if _setting_values().get(name) != _SETTINGS_AS_READ.get(name)
        ]
        late = [name.upper() for name in named or changed]
    if late:
        refuse_to_start(
            f"invalid configuration: gunicorn's -e sets {', '.join(late)} after "
            "gunicorn_config.py has read the settings for gunicorn's master, which would "
            "run by the values before it: set them in the environment instead"
        )


def _refuse_flags_that_override_settings(cfg: Config) -> None:
    """Stop with one line where gunicorn's command line (or GUNICORN_CMD_ARGS) changed what
    this file sets from a setting: the workers size their threads, drain and messages by
    the setting, which would then be wrong (a --timeout 3 reported as WORKER_TIMEOUT_S=120).
    A --bind is taken: no worker depends on it (the container's probe reads BIND or PORT,
    which the README says to set there)."""
    checks = (
        ("--workers", cfg.workers, workers, "WORKERS", ""),
        ("--timeout", cfg.timeout, timeout, "WORKER_TIMEOUT_S", ""),
        ("--keep-alive", cfg.keepalive, keepalive, "KEEPALIVE_S", ""),
        ("--log-level", cfg.loglevel.lower(), loglevel, "LOG_LEVEL", ""),
        (
            "--graceful-timeout",
            cfg.graceful_timeout,
            graceful_timeout,
            "DRAIN_TIMEOUT_S",
            f" (the graceful timeout is DRAIN_TIMEOUT_S + {SHUTDOWN_MARGIN_S} s)",
        ),
    )
    overridden = [
        f"gunicorn's {flag} {given} overrides {setting}: set {setting} instead{how}"
        for flag, given, ours, setting, how in checks
        if given != ours
    ]
    if cfg.worker_class_str != worker_class:
        # uvicorn's own (FastAPI's docs name it) starts and serves, without them.
        overridden.append(
            f"gunicorn's --worker-class {cfg.worker_class_str} replaces the service's worker, "
            "which applies DRAIN_TIMEOUT_S, WORKER_TIMEOUT_S and STALL_TIMEOUT_S: remove it"
        )
    if cfg.accesslog is not None:
        overridden.append(
            f"gunicorn's --access-logfile {cfg.accesslog}: the service writes its access "
            "lines itself, with its other lines (ACCESS_LOG=false turns them off), to "
            "standard error or to gunicorn's --error-logfile: remove it"
        )
    if cfg.preload_app:
        # The app imported in the master: its log writer's thread, not forked, would leave
        # every worker's lines queued for ever.
        overridden.append(
            "gunicorn's --preload imports the app in the master, where each worker must "
            "start its own (its model, its threads, its log writer): remove it"
        )
    if overridden:
        refuse_to_start("invalid configuration: " + "; ".join(overridden))


def when_ready(server: Arbiter) -> None:
    """Once the master holds its sockets, before any worker starts: remove the metric
    files of an earlier run, so their samples do not leak in, find out now, in one line,
    if the workers cannot create theirs, and make the workers' directory. Not before: a
    start that cannot bind its port (a server already runs there) must neither wipe that
    server's metrics nor leave directories behind, since it exits without ``on_exit``."""
    if PROMETHEUS_DIR == _DEFAULT_METRICS_DIR:
        _claim_private_directory(PROMETHEUS_DIR)
    prepare_metrics_dir(PROMETHEUS_DIR, remove_stale=True)
    _claim_private_directory(SIBLINGS.directory)
    for mark in SIBLINGS.directory.iterdir():  # an earlier master's of the same pid
        mark.unlink()
    _remove_directories_of_dead_masters()


def _claim_private_directory(path: Path) -> None:
    """Make ``path``, named by the master's pid in the shared temporary directory, for this
    user alone, or stop start-up with one line if another user made it first (its name can
    be guessed): the workers' files in it could be read and forged, or be links of theirs
    that the workers would write through."""
    try:
        path.mkdir(mode=0o700)
        return
    except FileExistsError:
        found = path.lstat()
    if stat.S_ISDIR(found.st_mode) and found.st_uid == os.geteuid():
        path.chmod(0o700)  # left by this user's earlier run, perhaps with a looser umask
        return
    what = "a link" if stat.S_ISLNK(found.st_mode) else f"owned by uid {found.st_uid}"
    refuse_to_start(
        f"{path} exists and is {what}, not a directory of this user's, who could read "
        "or forge what the workers write there: remove it, or set TMPDIR to a "
        "directory only this user can write to"
    )


# The directories a master names by its pid in the temporary directory, removed by its
# on_exit.
_MASTER_DIRECTORY_PREFIXES = ("prometheus-multiproc-", RUN_DIRECTORY_PREFIX)


def _remove_directories_of_dead_masters() -> None:
    """A master killed outright (SIGKILL, the out-of-memory killer) runs no ``on_exit``:
    remove the directories it left, this user's whose master is no longer alive, so that
    they do not pile up across such restarts."""
    for prefix in _MASTER_DIRECTORY_PREFIXES:
        for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
            pid = path.name.removeprefix(prefix)
            try:
                ours = path.is_dir() and path.stat().st_uid == os.getuid()
            except OSError:
                continue
            if ours and pid.isdigit() and not process_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _halt_once_for_workers_that_cannot_start(server: Arbiter) -> None:
    """A worker that cannot start (its one line says why) halts the master; its siblings
    fail the same way while the master stops them, and gunicorn would raise its halt again
    from inside the first, with two tracebacks, exit status 1 and no ``on_exit``."""
    from gunicorn.errors import HaltServer

    reap_workers = server.reap_workers
    halting = False

    def reap_workers_halting_once() -> None:
        nonlocal halting
        try:
            reap_workers()
        except HaltServer:
            if halting:
                return
            halting = True
            raise

    server.reap_workers = reap_workers_halting_once


def _mark_stopping_as_the_server_stops(server: Arbiter) -> None:
    """Tell the workers, before they get their signal, that the server stops: one stopped
    while it starts then answers the requests waiting for it (service/protocol.py), which no
    other worker will serve, where one stopped by a reload or TTOU leaves them to the worker
    that replaces it."""
    stop = server.stop

    def stop_marking_it(graceful: bool = True) -> None:
        SIBLINGS.mark_stopping()
        stop(graceful)

    server.stop = stop_marking_it  # type: ignore[method-assign]


def post_fork(server: Arbiter, worker: Worker) -> None:
    """Have the kernel send the worker SIGTERM when the master dies, even by SIGKILL.

    uvicorn's worker does not watch its parent: orphaned, it would keep the port and serve
    unsupervised, and a restarted server could not bind. SIGTERM lets it drain first.
    """
    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != server.pid:  # the master died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


# Rounds of workers aborted for their silence before any worker of the server started:
# a worker started after the first abort of a round begins a new one. One round may have met a
# passing slowness (every worker warming up at once on shared cores); this many, a start
# that cannot fit in WORKER_TIMEOUT_S.
MAX_START_TIMEOUT_ROUNDS = 3


@dataclass
class _StartTimeouts:
    rounds: int = 0
    round_began_at: float = -math.inf  # the first abort of the latest round
    halting: bool = False


def pre_fork(server: Arbiter, worker: Worker) -> None:
    worker.forked_at = time.monotonic()


def _start_timeouts(server: Arbiter) -> _StartTimeouts:
    # Kept on the arbiter: a reload (HUP) runs this file again, and would count anew.
    if not hasattr(server, "service_start_timeouts"):
        server.service_start_timeouts = _StartTimeouts()
    timeouts: _StartTimeouts = server.service_start_timeouts
    return timeouts


def _counted_anything(pid: int) -> bool:
    """Whether worker ``pid``'s counters or histograms hold a value other than zero (or
    cannot be read: then they are kept)."""
    from prometheus_client.mmap_dict import MmapedDict

    for kind in ("counter", "histogram"):
        path = PROMETHEUS_DIR / f"{kind}_{pid}.db"
        try:
            if path.exists() and any(
                value for _, value, _, _ in MmapedDict.read_all_values_from_file(str(path))
            ):
                return True
        except Exception:  # a damaged file: not this hook's to judge
            return True
    return False


def child_exit(server: Arbiter, worker: Worker) -> None:
    """Drop the live gauges of a worker that exited, crashed or was killed (and every metric
    file of one that counted nothing), and say which setting applies when the master killed
    it for its silence."""
    from gunicorn.errors import HaltServer
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
    if not _counted_anything(worker.pid):
        # A worker that never served (failing to start every 30 s, say) would otherwise
        # leave files of zeros, thousands a day, for each scrape to read.
        for file in PROMETHEUS_DIR.glob(f"*_{worker.pid}.db"):
            file.unlink(missing_ok=True)
    starting = not SIBLINGS.was_ready(worker.pid)
    SIBLINGS.forget(worker.pid)
    if worker.aborted and starting and not SIBLINGS.server_started():
        timeouts = _start_timeouts(server)
        if worker.forked_at > timeouts.round_began_at:
            timeouts.rounds += 1
            timeouts.round_began_at = time.monotonic()
        if timeouts.rounds >= MAX_START_TIMEOUT_ROUNDS:
            # Each worker started again would time out the same way, for as long as the
            # master ran: stop, as for a worker that cannot start.
            if not timeouts.halting:
                timeouts.halting = True
                server.log.critical(
                    "workers were started %d times and each time timed out before they "
                    "started, at WORKER_TIMEOUT_S=%s s (the last line of each says how far it "
                    "got: a download of the weights "
                    "over a slow link, or a warm-up of batches of MAX_BATCH_SIZE=%s on a "
                    "slow device, needs a larger WORKER_TIMEOUT_S), and none of this server "
                    "has started: stopping",
                    timeouts.rounds,
                    settings.worker_timeout_s,
                    settings.max_batch_size,
                )
            raise HaltServer("no worker started within WORKER_TIMEOUT_S", server.WORKER_BOOT_ERROR)
    if worker.aborted and starting:
        server.log.critical(
            "worker %s was silent for WORKER_TIMEOUT_S=%s s while it started and was "
            "restarted: its last line says how far it got (a download of the weights over a "
            "slow link, or a warm-up of batches of MAX_BATCH_SIZE=%s on a slow device, needs "
            "a larger WORKER_TIMEOUT_S)",
            worker.pid,
            settings.worker_timeout_s,
            settings.max_batch_size,
        )
    elif worker.aborted:
        server.log.critical(
            "worker %s was silent for WORKER_TIMEOUT_S=%s s while it served and was "
            "restarted: it could not serve (its model stuck past STALL_TIMEOUT_S, out of "
            "memory, or its device or batch processor failed: its line before says which), "
            "its event loop was blocked, or the process was stopped",
            worker.pid,
            settings.worker_timeout_s,
        )


def on_exit(server: Arbiter) -> None:
    """Remove the metrics directory if it is the default one, made for this run, and the
    workers' directory."""
    if PROMETHEUS_DIR == _DEFAULT_METRICS_DIR:
        shutil.rmtree(PROMETHEUS_DIR, ignore_errors=True)
    shutil.rmtree(SIBLINGS.directory, ignore_errors=True)
