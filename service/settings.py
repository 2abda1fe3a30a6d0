"""Service configuration: read once from the environment into one typed, validated object."""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import ssl
import stat
import sys
import tempfile
from collections.abc import Mapping
from datetime import timedelta
from pathlib import Path
from typing import Literal, NoReturn

from pydantic import (
    Field,
    SecretStr,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

from batching import BatchConfig, BatchPolicy
from service import logs
from service.tasks import BUSY_TIMEOUT_MS, network_file_system_warning

# The exit status of a start refused for its configuration: gunicorn's for a worker that
# cannot boot, and the one on which uvicorn's --workers stops rather than start the worker
# again, for ever, to be refused the same way.
EXIT_REFUSED = 3


class StartRefused(SystemExit):
    """The start is refused with ``line``, written already; the process exits with
    ``EXIT_REFUSED``."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.code = EXIT_REFUSED


def refuse_to_start(message: str) -> NoReturn:
    """Stop start-up with ``message``, one line in ``LOG_FORMAT``, and ``EXIT_REFUSED``."""
    line = logs.unconfigured_line(message)
    print(line, file=sys.stderr, flush=True)
    raise StartRefused(line)


SQLITE_MAX_LENGTH = 1_000_000_000
# Room for the rest of a task image's row: its id, and SQLite's record header.
MAX_UPLOAD_BYTES_BOUND = SQLITE_MAX_LENGTH - 1_000_000
# A task's metadata is stored as JSON text with non-ASCII and control characters escaped, up
# to six bytes for one sent ("\u0001"), in the task's row beside a result of up to 1000
# predictions.
TASK_METADATA_MAX_BYTES_BOUND = (SQLITE_MAX_LENGTH - 1_000_000) // 6

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MAX_QUEUE = 256
DEFAULT_MAX_BATCH_FILES = 32
_INTEGER = TypeAdapter(int)


CGROUP_ROOT = Path("/sys/fs/cgroup")
# The files prometheus_client writes in multiprocess mode: "<type>_<pid>.db", a gauge's
# type with its mode ("gauge_livesum").
METRIC_FILE = re.compile(r"(counter|histogram|summary|gauge_[a-z]+)_\d+\.db")
# A host name or IPv4 address, as gunicorn reads the host of HOST:PORT.
_HOST_NAME = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?")
# An Origin header's parts: a scheme, a host (a name, or IPv6 in brackets), a port.
_ORIGIN = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://"
    r"(?P<host>[A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\])(:(?P<port>[0-9]{1,5}))?"
)
_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def browser_origin(origin: str) -> str:
    """``origin`` as a browser sends it in its Origin header: scheme and host in lower
    case, an IPv6 address in its short form, no default port.

    Raises:
        ValueError: No browser sends it (a path, no scheme, a port out of range, ...).
    """
    expected = (
        "expected scheme://host[:port] with no path or trailing slash, e.g. "
        "https://app.example.com, or *"
    )
    parts = _ORIGIN.fullmatch(origin)
    if parts is None:
        raise ValueError(f"{origin!r} is not an origin; {expected}")
    scheme, host = parts["scheme"].lower(), parts["host"].lower()
    if host.startswith("["):
        try:
            host = f"[{ipaddress.IPv6Address(host[1:-1]).compressed}]"
        except ValueError:
            raise ValueError(f"{origin!r} holds no IPv6 address in brackets; {expected}") from None
    if parts["port"] is None:
        return f"{scheme}://{host}"
    port = int(parts["port"])
    if not 1 <= port <= 65535:
        raise ValueError(f"{origin!r} has no port from 1 to 65535; {expected}")
    return (
        f"{scheme}://{host}" if _DEFAULT_PORTS.get(scheme) == port else f"{scheme}://{host}:{port}"
    )


def available_cores(cgroup_root: Path = CGROUP_ROOT) -> int:
    """CPU cores this process may use: its affinity mask (unlike os.cpu_count), capped by a
    container's CPU quota, which the mask does not show (a pod limited to 2 CPUs on a
    32-core node would otherwise start 32 threads and be throttled)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is None:
        return cores or 1
    return max(1, min(cores or 1, math.ceil(quota)))


def cgroup_cpu_quota(cgroup_root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time the cgroup may use (cgroup v2 ``cpu.max`` or v1 CFS quota);
    None when unlimited or unknown."""
    try:
        quota_text, period_text = (cgroup_root / "cpu.max").read_text().split()
    except (OSError, ValueError):
        try:
            quota_text = (cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period_text = (cgroup_root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    if quota_text in ("max", "-1"):
        return None
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def refuse_metrics_path_of_a_file(path: Path) -> None:
    """Stop start-up with one line where ``path`` is a file: no worker could write there."""
    if path.exists() and not path.is_dir():
        refuse_to_start(
            f"invalid configuration: PROMETHEUS_MULTIPROC_DIR={path} cannot hold the "
            "metrics: it is a file, not a directory; point it at a directory, or unset it"
        )


def prepare_metrics_dir(path: Path, *, remove_stale: bool = False) -> None:
    """Make ``path`` for prometheus_client's multiprocess files and check that it takes
    them, or stop start-up with one line. ``remove_stale``: first delete the metric files
    an earlier run left (``counter_<pid>.db`` and the like), and nothing else: it may be a
    mount, or hold others' files, their own ``.db`` ones among them."""
    refuse_metrics_path_of_a_file(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        if remove_stale:
            for stale in path.glob("*.db"):
                if METRIC_FILE.fullmatch(stale.name):
                    stale.unlink()
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        refuse_to_start(
            f"invalid configuration: PROMETHEUS_MULTIPROC_DIR={path} cannot hold the "
            f"metrics: {error.strerror or error}; point it at a directory this user can "
            "write to, or unset it"
        )


class Settings(BaseSettings):
    """Every setting, with its environment variable (upper-case field name) and default."""

    # allow_inf_nan: "inf" would pass every lower bound below, then break what uses it.
    # env_ignore_empty: an empty variable means the default, as compose passes an unset
    # one (${VAR:-}).
    model_config = SettingsConfigDict(
        case_sensitive=False,
        extra="ignore",
        frozen=True,
        allow_inf_nan=False,
        env_ignore_empty=True,
    )

    port: int = Field(5001, ge=1, le=65535)
    # gunicorn's whole listening address; unset or empty: 0.0.0.0:PORT.
    bind: str | None = None
    workers: int = Field(1, ge=1, le=64)
    device: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    weights: str = Field("imagenet", min_length=1)
    labels_file: Path = PROJECT_ROOT / "imagenet_classes.txt"
    seed: int = Field(0, ge=0, le=2**63 - 1)
    channels_last: bool = True

    max_batch_size: int = Field(16, ge=1, le=1024)
    max_wait_ms: float = Field(5.0, ge=0, le=60_000)
    batch_policy: BatchPolicy = BatchPolicy.ADAPTIVE
    # Whether lower lanes (batch files, tasks) fill the spare slots of higher lanes' batches;
    # unset: on CUDA.
    fill_spare_slots: bool | None = None
    # Without filling, a lower lane kept from the model this long by higher lanes' batches
    # fills the spare slots of the next one.
    lower_lane_max_wait_ms: float = Field(1000, ge=0, le=86_400_000)
    max_queue: int = Field(DEFAULT_MAX_QUEUE, ge=1, le=1_000_000)
    request_timeout_ms: float = Field(10_000, gt=0, le=86_400_000)
    drain_timeout_s: float = Field(20.0, ge=0, le=86_400)
    # gunicorn: a worker silent for this long is restarted (model load and warm-up included).
    worker_timeout_s: int = Field(120, ge=10, le=86_400)
    # At least 1: a new connection has this long to send its first request.
    keepalive_s: int = Field(5, ge=1, le=86_400)
    stall_timeout_s: float = Field(60.0, gt=0, le=86_400)

    # A task stores its image in one SQLite row.
    max_upload_bytes: int = Field(10 * 1024 * 1024, ge=1, le=MAX_UPLOAD_BYTES_BOUND)
    max_image_pixels: int = Field(40_000_000, ge=1, le=10**12)
    # Large JPEGs decoded at 1/2, 1/4 or 1/8 scale: several times faster, answers a little
    # apart from a full decode's.
    reduced_jpeg_decode: bool = True
    max_batch_files: int = Field(DEFAULT_MAX_BATCH_FILES, ge=1, le=1000)
    max_uploads_in_flight_bytes: int = Field(2 * 2**30, ge=1, le=2**50)
    body_idle_timeout_s: float = Field(30.0, gt=0, le=86_400)
    body_min_bytes_per_s: float = Field(1024.0, ge=0, le=2**40)

    torch_threads: int | None = Field(None, ge=1, le=1024)
    decode_threads: int | None = Field(None, ge=1, le=1024)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    access_log: bool = True

    # Asynchronous tasks (POST /tasks) and their webhooks.
    data_dir: Path = Path("data")
    task_ttl: timedelta = Field(timedelta(days=7), gt=timedelta(0))
    task_max_queued: int = Field(10_000, ge=1, le=1_000_000_000)
    task_max_attempts: int = Field(3, ge=1, le=1000)
    # A lease shorter than a write can stall hands a live worker's tasks to others.
    task_lease_s: float = Field(30.0, ge=1, le=86_400)
    # Floors a little above nothing: shorter, an idle worker polls its store without a pause.
    task_poll_interval_s: float = Field(1.0, ge=0.01, le=3600)
    task_cleanup_interval_s: float = Field(600.0, ge=0.1, le=86_400)
    task_metadata_max_bytes: int = Field(16 * 1024, ge=2, le=TASK_METADATA_MAX_BYTES_BOUND)
    webhook_secret: SecretStr | None = None
    webhook_max_attempts: int = Field(15, ge=1, le=100)
    webhook_timeout_s: float = Field(10.0, gt=0, le=3600)
    webhook_backoff_s: float = Field(1.0, ge=0, le=86_400)
    webhook_backoff_max_s: float = Field(300.0, ge=0, le=86_400)
    webhook_allow_private: bool = False
    # CA certificates (PEM) that HTTPS callbacks trust besides the public ones: receivers
    # with certificates of a private CA.
    webhook_ca_file: Path | None = None

    # libgomp's own setting, read by the workers' OpenMP runtime (gunicorn_config.py sets
    # its default); checked here, since libgomp only warns of a value it cannot read, in
    # each worker, and spins for its default. Its syntax: a count (strtoull's, so a sign is
    # read, and -1 is the largest) with an optional k, M, G or T, or "infinite".
    gomp_spincount: str | None = None

    # Unset or empty: no authentication. Never echoed in errors or logs.
    api_key: SecretStr | None = None
    # Comma-separated origins allowed to call the API from a browser; empty: CORS off.
    cors_origins: str = ""

    @field_validator("bind")
    @classmethod
    def _an_address_gunicorn_can_bind(cls, value: str | None) -> str | None:
        # gunicorn would read a bare host as port 8000, and fail on a bad port with a
        # traceback.
        if value is None:
            return None
        expected = "expected HOST:PORT, [IPv6]:PORT or unix:PATH"
        if value.startswith("unix:"):
            if not value.removeprefix("unix:").strip():
                raise ValueError(f"names no socket path; {expected}")
            return value
        address = value.removeprefix("tcp://")
        host, colon, port = address.rpartition(":")
        if not colon or address.endswith("]"):  # "[::1]": the colons are the address's
            raise ValueError(f"has no port; {expected}")
        if host.startswith("["):
            try:
                ipaddress.IPv6Address(host.removeprefix("[").removesuffix("]"))
                if not host.endswith("]"):
                    raise ValueError
            except ValueError:
                raise ValueError(
                    f"{host!r} is not an IPv6 address in brackets; {expected}"
                ) from None
        elif not _HOST_NAME.fullmatch(host):
            # gunicorn splits on the first colon (a bare IPv6 address) and reads no scheme
            # but tcp://.
            raise ValueError(f"names no host name or IPv4 address; {expected}")
        if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"has no port from 1 to 65535; {expected}")
        return value

    @field_validator("cors_origins")
    @classmethod
    def _origins_a_browser_sends(cls, value: str) -> str:
        # "https://a.example/" or "a.example" would match no request's Origin, and CORS
        # would fail without a word.
        for origin in (entry.strip() for entry in value.split(",")):
            if origin == "null":
                raise ValueError(
                    "'null' is the Origin of sandboxed frames and local files of any site; "
                    "allowing it would allow them all"
                )
            if origin and origin != "*":
                browser_origin(origin)
        return value

    @field_validator("device")
    @classmethod
    def _a_device_torch_names(cls, value: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:(0|[1-9][0-9]*))?", value):
            raise ValueError("must be auto, cpu, cuda or cuda:N (N the GPU's index)")
        return value

    @field_validator("gomp_spincount")
    @classmethod
    def _a_count_libgomp_reads(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(
            r"\s*([+-]?[0-9]{1,19}\s*[kKmMgGtT]?|[iI][nN][fF][iI][nN][iI][tT][eEyY])\s*", value
        ):
            raise ValueError(
                "must be a count, with an optional k, M, G or T (1000000, 300k), or infinite"
            )
        return value

    @field_validator("data_dir", "labels_file", "weights", "webhook_secret", mode="before")
    @classmethod
    def _not_only_blanks(cls, value: object) -> object:
        # A value of blanks alone is a slip (a quoted space), not a name or a secret.
        if isinstance(value, str) and value and not value.strip():
            raise ValueError("is only blanks; leave it unset or empty for the default")
        return value

    @field_validator("data_dir", "labels_file", "webhook_ca_file")
    @classmethod
    def _home_directory_expanded(cls, value: Path | None) -> Path | None:
        # As a shell would: a ~ in a compose file's or a unit's environment, where none
        # expands it, is no folder named "~" under the working directory.
        return None if value is None else _home_expanded(value)

    # Checked here as well as where the file is read, so that gunicorn's master stops with
    # one line before it binds the port and boots workers that would each fail alike.
    @field_validator("weights")
    @classmethod
    def _weights_file_exists(cls, value: str) -> str:
        if value.strip().lower() not in ("imagenet", "random") and (
            problem := _not_a_file(_home_expanded(Path(value)))
        ):
            raise ValueError(f"{problem}; give a state-dict file, 'imagenet' or 'random'")
        return value

    @field_validator("data_dir")
    @classmethod
    def _data_dir_can_be_a_directory(cls, value: Path) -> Path:
        # Else gunicorn binds the port and every worker starts, to stop as it opens the task
        # store. A path that cannot be looked into (no permission) is left to the store,
        # which says so.
        advice = "set DATA_DIR to a writable directory on a local disk"
        for path in (value, *value.parents):
            try:
                is_directory = stat.S_ISDIR(path.stat().st_mode)
            except (FileNotFoundError, NotADirectoryError):
                if path.is_symlink():
                    where = "is" if path == value else f"is under {path},"
                    raise ValueError(f"{where} a symbolic link to nothing; {advice}") from None
                continue
            except OSError:
                return value
            if is_directory:
                return value
            where = "is not a directory" if path == value else f"is under {path}, not a directory"
            raise ValueError(f"{where}; {advice}")
        return value

    @field_validator("labels_file")
    @classmethod
    def _labels_file_exists(cls, value: Path) -> Path:
        if problem := _not_a_file(value):
            raise ValueError(f"{problem}; give a text file with one class name a line")
        return value

    @field_validator("api_key")
    @classmethod
    def _key_clients_can_send(cls, value: SecretStr | None) -> SecretStr | None:
        # HTTP drops the blanks around a header's value and allows no control characters
        # (a key read from a file often ends in a newline): no request could carry such a key.
        secret = value.get_secret_value() if value is not None else None
        if secret is not None and (
            secret != secret.strip() or not all(char.isprintable() for char in secret)
        ):
            raise ValueError(
                "starts or ends with a blank, or holds a control character such as a "
                "newline, which no request can send"
            )
        return value

    @field_validator("webhook_ca_file")
    @classmethod
    def _certificates_tls_can_trust(cls, value: Path | None) -> Path | None:
        if value is not None:
            try:
                ssl.create_default_context(cafile=value)
            except (OSError, ssl.SSLError) as error:
                reason = error.strerror if isinstance(error, OSError) and error.strerror else error
                raise ValueError(f"cannot be read as PEM CA certificates: {reason}") from None
        return value

    @field_validator("task_ttl", mode="before")
    @classmethod
    def _seconds_or_iso_8601(cls, value: object) -> object:
        # The two documented forms only: pydantic reads a string of digits as a clock time
        # ("invalid character in hour"), "10:00" as ten hours, and names neither form when
        # it refuses "1h".
        if not isinstance(value, str):
            return value
        try:
            return float(value)
        except ValueError:
            pass
        duration = value.strip().upper()
        if not duration.startswith("P"):
            raise ValueError("takes seconds (604800) or an ISO 8601 duration (P7D, PT12H, P1DT6H)")
        return duration

    @field_validator("log_level", "log_format", "dtype", "batch_policy", "device", mode="before")
    @classmethod
    def _keywords_in_any_case(cls, value: object) -> object:
        # As names are: DTYPE=FLOAT16 is as clear as float16; blanks around it, as WEIGHTS's.
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator(
        "channels_last",
        "fill_spare_slots",
        "reduced_jpeg_decode",
        "access_log",
        "webhook_allow_private",
        mode="before",
    )
    @classmethod
    def _switches_without_blanks(cls, value: object) -> object:
        return value.strip() if isinstance(value, str) else value

    @model_validator(mode="after")
    def _backoff_cap_covers_the_first_wait(self) -> Settings:
        if self.webhook_backoff_max_s < self.webhook_backoff_s:
            raise ValueError(
                f"WEBHOOK_BACKOFF_MAX_S ({self.webhook_backoff_max_s}) must be at least "
                f"WEBHOOK_BACKOFF_S ({self.webhook_backoff_s})"
            )
        return self

    @model_validator(mode="after")
    def _float16_needs_cuda(self) -> Settings:
        # Refused here, once, before a port is bound; the model's loader refuses it too,
        # and DEVICE=auto without CUDA, which only torch can tell.
        if self.dtype == "float16" and self.device == "cpu":
            raise ValueError(
                "DTYPE=float16 needs a CUDA device; on DEVICE=cpu use DTYPE=float32, or "
                "bfloat16 where the CPU has AMX"
            )
        return self

    @model_validator(mode="before")
    @classmethod
    def _batch_files_default_within_the_queue(cls, values: object) -> object:
        # A small MAX_QUEUE alone is a valid choice: the default number of a /cls/batch
        # request's files gives way to it; a number set is checked below.
        if not isinstance(values, dict) or values.get("max_batch_files") is not None:
            return values
        try:  # read as the field reads it: "8.0" is 8
            queue = max(1, _INTEGER.validate_python(values.get("max_queue", DEFAULT_MAX_QUEUE)))
        except ValidationError:
            return values  # refused as MAX_QUEUE
        return values | {"max_batch_files": min(queue, DEFAULT_MAX_BATCH_FILES)}

    @model_validator(mode="after")
    def _a_batch_request_fits_the_queue(self) -> Settings:
        # Each file of a /cls/batch request takes a place in the queue.
        if self.max_batch_files > self.max_queue:
            raise ValueError(
                f"MAX_BATCH_FILES ({self.max_batch_files}) must be at most MAX_QUEUE "
                f"({self.max_queue}), or a lone /cls/batch request could not queue all its files"
            )
        return self

    def torch_threads_on(self, device_type: str) -> int:
        """Intra-op threads per worker, for a model on ``device_type`` ("cpu", "cuda"):
        ``TORCH_THREADS``, else on a CPU the cores shared evenly among workers.

        On a GPU, one: the model's work runs there, and after any torch operation on the CPU
        each further thread would spin for a core (``GOMP_SPINCOUNT``) with nothing to do.
        """
        if self.torch_threads:
            return self.torch_threads
        return self._cores_per_worker() if device_type == "cpu" else 1

    @property
    def effective_decode_threads(self) -> int:
        """Threads decoding uploads, in each of the three pools (small `/cls` images, small
        `/cls/batch` files, large images); decoding overlaps inference, so one per core."""
        return self.decode_threads or self._cores_per_worker()

    def _cores_per_worker(self) -> int:
        return max(1, available_cores() // self.workers)

    @property
    def cors_origin_list(self) -> list[str]:
        """``CORS_ORIGINS`` split on commas, blanks dropped, each origin as a browser sends
        it (CORS compares them as strings)."""
        origins = (origin.strip() for origin in self.cors_origins.split(","))
        return [browser_origin(origin) if origin != "*" else "*" for origin in origins if origin]

    def batch_config(self, device_type: str) -> BatchConfig:
        """The batch processor's knobs, for a model on ``device_type`` ("cpu", "cuda")."""
        fill = self.fill_spare_slots
        return BatchConfig(
            max_batch_size=self.max_batch_size,
            max_wait_s=self.max_wait_ms / 1000,
            max_queue=self.max_queue,
            policy=self.batch_policy,
            # On a GPU a fuller batch costs about what a small one does; on a CPU it costs
            # in proportion, and the /cls requests in the batch would pay for the tasks.
            fill_from_lower_lanes=device_type == "cuda" if fill is None else fill,
            lower_lane_max_wait_s=self.lower_lane_max_wait_ms / 1000,
        )


# Never echoed, not even in the error that refuses them.
SECRET_SETTINGS = frozenset({"API_KEY", "WEBHOOK_SECRET"})


def misspelt_settings(environ: Mapping[str, str] = os.environ) -> list[str]:
    """A line for each environment variable whose name looks like a setting's misspelt
    (WORKER, MAX_BATCH, REQUEST_TIMEOUT_S): names that are no setting are ignored, so its
    setting would stay at its default, and nothing would say so."""
    names = sorted(name.upper() for name in Settings.model_fields)
    lines = []
    for key, value in sorted(environ.items()):
        upper = key.upper()
        if upper in names or not value or not re.fullmatch(r"[A-Z][A-Z0-9_]*", upper):
            continue
        near = difflib.get_close_matches(upper, names, n=1, cutoff=0.8) or [
            name for name in names if len(upper) >= 6 and name.startswith(f"{upper}_")
        ]
        if 0 < len(near) <= 3:  # a common prefix (WEBHOOK) is a name of the user's own
            lines.append(f"{key} is no setting, and is ignored: did you mean {' or '.join(near)}?")
        elif upper == "HOST" and (host := _listening_host(value)) is not None:
            # Other servers' word for it; a shell's HOST (tcsh) holds the machine's name.
            ports = (v.strip() for k, v in environ.items() if k.upper() == "PORT" and v.strip())
            port = next(ports, "5001")
            lines.append(
                f"{key} is no setting, and is ignored: the address to listen on is BIND under "
                f"gunicorn (BIND={host}:{port}), --host under uvicorn"
            )
    return lines


def settings_to_warn_of(settings: Settings, environ: Mapping[str, str] = os.environ) -> list[str]:
    """A line for each setting given whose value changes nothing, slows the service where
    its user would expect it to help, or puts tasks at risk: valid values, so they are not
    refused."""
    given = {key.upper() for key, value in environ.items() if value.strip()}
    lines = []
    if "MAX_WAIT_MS" in given and settings.batch_policy != BatchPolicy.TIMEOUT:
        lines.append(
            f"MAX_WAIT_MS applies to BATCH_POLICY=timeout only, and is ignored: the "
            f"{settings.batch_policy} policy never waits for a batch to fill"
        )
    if (
        settings.batch_policy == BatchPolicy.TIMEOUT
        and settings.max_wait_ms >= settings.request_timeout_ms
    ):
        lines.append(
            f"MAX_WAIT_MS={settings.max_wait_ms:g} is not shorter than REQUEST_TIMEOUT_MS="
            f"{settings.request_timeout_ms:g}: a lone request waits until just before its "
            "deadline, and gets a 504 whenever its batch runs slower than expected"
        )
    if settings.task_lease_s < BUSY_TIMEOUT_MS / 1000:
        lines.append(
            f"TASK_LEASE_S={settings.task_lease_s:g} is shorter than the "
            f"{BUSY_TIMEOUT_MS / 1000:g} s a write may wait for another process's lock on the "
            "task store: while the store is busy (large images submitted to several workers), "
            "a live worker's tasks may be taken over and run twice"
        )
    if (warning := network_file_system_warning(settings.data_dir)) is not None:
        lines.append(warning)
    threads = (settings.torch_threads or 0) * settings.workers
    if threads > (cores := available_cores()):
        lines.append(
            f"TORCH_THREADS={settings.torch_threads} in each of {settings.workers} worker(s) is "
            f"{threads} threads for the {cores} cores the service may use: they take turns on "
            "the cores, and every batch slows (left unset, the cores are shared out)"
        )
    return lines


def _listening_host(value: str) -> str | None:
    """``value`` as BIND's host part, if it is an address or localhost; else None."""
    text = value.strip()
    try:
        address = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        return text if text.lower() == "localhost" else None
    return f"[{address}]" if address.version == 6 else str(address)


def _home_expanded(path: Path) -> Path:
    """``path`` with a leading ``~`` or ``~user`` made that home directory."""
    try:
        return path.expanduser()
    except RuntimeError:  # no such user, or no home directory known
        raise ValueError(
            f"starts with {path.parts[0]}, a home directory not known here; give a full path"
        ) from None


def _not_a_file(path: Path) -> str | None:
    """What is wrong where ``path`` should be a file, if plainly so; None where it may be
    one (a permission error is left to the reader of the file, which says so)."""
    try:
        is_directory = path.is_dir()
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return "does not exist"
    except OSError:
        return None
    return "is a directory" if is_directory else None


def load_settings() -> Settings:
    """Read the environment, or exit with one line per invalid setting."""
    spellings: dict[str, list[str]] = {}
    for key, value in os.environ.items():
        # An empty value is no value (env_ignore_empty), as compose passes ${VAR:-}.
        if key.lower() in Settings.model_fields and value:
            spellings.setdefault(key.upper(), []).append(key)
    conflicts = [
        " and ".join(keys)
        for keys in spellings.values()
        if len({os.environ[key] for key in keys}) > 1
    ]
    if conflicts:
        # Names are read in any case; which of two values would win is an accident of
        # the environment's order.
        refuse_to_start(
            "invalid configuration: "
            + "; ".join(f"{names} are set to different values; set one" for names in conflicts)
        )
    try:
        settings = Settings()
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]).upper()
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "bool_parsing":  # pydantic names none of the words it reads
                message = "takes true or false (also 1 or 0, yes or no, on or off)"
            elif error["type"] in ("int_parsing", "int_from_float"):
                message = "takes a whole number in digits (10485760, not 1e7 or 10.5)"
            # As given, under the name given (any case is read): pydantic's input may be
            # converted already (TASK_TTL's seconds), and a secret's is not shown.
            name, given = next(
                ((key, value) for key, value in os.environ.items() if key.upper() == name),
                (name, error.get("input")),
            )
            if name.upper() in SECRET_SETTINGS:
                given = "***"
            # Errors about a combination of settings name them in the message itself.
            problems.append(f"{name}={given!r}: {message}" if name else message)
        refuse_to_start("invalid configuration: " + "; ".join(problems))
    temporary = os.environ.get("TMPDIR")
    if temporary and os.path.realpath(tempfile.gettempdir()) != os.path.realpath(temporary):
        # Python would spool uploads to /tmp instead, saying nothing.
        refuse_to_start(
            f"invalid configuration: TMPDIR={temporary!r}: not a directory this process "
            "can write to (uploads over 1 MiB are spooled there); create it, or unset TMPDIR"
        )
    return settings
