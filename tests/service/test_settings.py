"""Settings from the environment: empty values, blanks, and one-line refusals that say what
a setting takes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import trustme

import service.settings
from service.settings import (
    PROJECT_ROOT,
    Settings,
    load_settings,
    misspelt_settings,
    settings_to_warn_of,
)

SET_EMPTY = (
    "TORCH_THREADS",
    "DECODE_THREADS",
    "LABELS_FILE",
    "DATA_DIR",
    "WEBHOOK_SECRET",
    "PORT",
)


@pytest.fixture(autouse=True)
def no_settings_from_outside(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (*SET_EMPTY, "WEIGHTS", "DEVICE", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)


def refusal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """The line ``load_settings`` writes as it stops start-up, with uvicorn's and gunicorn's
    exit status for a worker that cannot start: uvicorn's --workers would start it again."""
    with pytest.raises(SystemExit) as stopped:
        load_settings()
    assert stopped.value.code == 3
    line = str(stopped.value)
    assert capsys.readouterr().err == line + "\n"
    assert "invalid configuration" in line
    return line


def test_empty_values_mean_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """As compose passes an unset variable (``${VAR:-}``)."""
    for name in SET_EMPTY:
        monkeypatch.setenv(name, "")
    settings = load_settings()
    assert settings.torch_threads is None
    assert settings.decode_threads is None
    assert settings.labels_file == PROJECT_ROOT / "imagenet_classes.txt"
    assert str(settings.data_dir) == "data"
    assert settings.webhook_secret is None
    assert settings.port == 5001


@pytest.mark.parametrize("name", ["LABELS_FILE", "DATA_DIR", "WEIGHTS", "WEBHOOK_SECRET"])
def test_a_value_of_blanks_alone_is_refused(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(name, "  ")
    line = refusal(monkeypatch, capsys)
    assert f"{name}=" in line
    assert "is only blanks" in line


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("DEVICE", "gpu", "must be auto, cpu, cuda or cuda:N"),
        ("DEVICE", "cuda:01", "must be auto, cpu, cuda or cuda:N"),
        ("GOMP_SPINCOUNT", "lots", "must be a count, with an optional k, M, G or T"),
        ("CHANNELS_LAST", "maybe", "takes true or false (also 1 or 0, yes or no, on or off)"),
        ("FILL_SPARE_SLOTS", "2", "takes true or false (also 1 or 0, yes or no, on or off)"),
        ("MAX_UPLOAD_BYTES", "1e9", "takes a whole number in digits (10485760, not 1e7 or 10.5)"),
        ("WORKER_TIMEOUT_S", "5.5", "takes a whole number in digits (10485760, not 1e7 or 10.5)"),
    ],
)
def test_a_refusal_says_what_the_setting_takes_not_a_pattern(
    name: str,
    value: str,
    says: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(name, value)
    line = refusal(monkeypatch, capsys)
    assert f"{name}={value!r}: {says}" in line
    assert "pattern" not in line


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DEVICE", "cuda:1"),
        ("DEVICE", "cuda:10"),
        ("DEVICE", "cpu"),
        ("GOMP_SPINCOUNT", " 300k "),
        ("GOMP_SPINCOUNT", "INFINITE"),
    ],
)
def test_values_the_setting_takes_are_kept(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    assert getattr(load_settings(), name.lower()) == value


@pytest.mark.parametrize(
    ("name", "value", "read"),
    [
        ("DTYPE", "FLOAT16", "float16"),
        ("BATCH_POLICY", "Timeout", "timeout"),
        ("DEVICE", "CUDA:1", "cuda:1"),
        ("LOG_FORMAT", "JSON", "json"),
        ("LOG_LEVEL", "WARNING", "warning"),
        # Blanks around a keyword or a switch, as around WEIGHTS's words.
        ("DEVICE", " cpu ", "cpu"),
        ("DTYPE", " float32\n", "float32"),
        ("REDUCED_JPEG_DECODE", " off ", False),
        ("ACCESS_LOG", " yes", True),
    ],
)
def test_keywords_are_read_in_any_case_as_names_are(
    name: str, value: str, read: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    assert getattr(load_settings(), name.lower()) == read


def test_a_setting_given_in_lower_case_is_read_and_named_as_given(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Names are read whatever their case; an invalid one is quoted as it was set, with
    its value, rather than under its upper-case name with what pydantic made of it."""
    monkeypatch.setenv("max_batch_size", "8")
    assert load_settings().max_batch_size == 8
    monkeypatch.setenv("max_batch_size", "0")
    monkeypatch.setenv("api_key", " \t ")
    line = refusal(monkeypatch, capsys)
    assert "max_batch_size='0'" in line
    assert "api_key='***'" in line


def test_one_setting_under_two_spellings_with_different_values_is_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Which would win is an accident of the environment's order (and the refusal of one
    would quote the other): both are named, secrets' values never shown."""
    monkeypatch.setenv("WORKERS", "3")
    monkeypatch.setenv("workers", "3")
    assert load_settings().workers == 3
    monkeypatch.setenv("WORKERS", "")  # empty is unset, as compose passes ${WORKERS:-}
    assert load_settings().workers == 3
    monkeypatch.setenv("WORKERS", "3")
    monkeypatch.setenv("workers", "abc")
    monkeypatch.setenv("API_KEY", "first-secret")
    monkeypatch.setenv("Api_Key", "second-secret")
    line = refusal(monkeypatch, capsys)
    assert "are set to different values; set one" in line
    assert "WORKERS and workers" in line or "workers and WORKERS" in line
    assert "API_KEY and Api_Key" in line or "Api_Key and API_KEY" in line
    assert "secret" not in line.replace("set one", "")


def test_a_small_queue_alone_is_a_valid_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    """A /cls/batch request's files default to 32, or MAX_QUEUE if smaller; a number set
    above MAX_QUEUE is refused."""
    monkeypatch.setenv("MAX_QUEUE", "18")
    assert load_settings().max_batch_files == 18
    monkeypatch.setenv("MAX_QUEUE", "300")
    assert load_settings().max_batch_files == 32
    monkeypatch.setenv("MAX_QUEUE", "8.0")  # an integer as the setting reads it
    assert load_settings().max_batch_files == 8
    monkeypatch.setenv("MAX_QUEUE", "18")
    monkeypatch.setenv("MAX_BATCH_FILES", "20")
    with pytest.raises(SystemExit, match=r"MAX_BATCH_FILES \(20\) must be at most MAX_QUEUE"):
        load_settings()


def test_float16_on_the_cpu_is_refused_before_anything_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Once, in the master, not per worker once each has loaded the model."""
    monkeypatch.setenv("DEVICE", "CPU")
    monkeypatch.setenv("DTYPE", " Float16")
    line = refusal(monkeypatch, capsys)
    assert "DTYPE=float16 needs a CUDA device; on DEVICE=cpu use DTYPE=float32" in line
    monkeypatch.setenv("DTYPE", "bfloat16")
    assert load_settings().dtype == "bfloat16"  # the CPU's instructions decide, at load


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("TASK_POLL_INTERVAL_S", "0.000001", "greater than or equal to 0.01"),
        ("TASK_CLEANUP_INTERVAL_S", "0.000001", "greater than or equal to 0.1"),
        # Stored escaped, up to six bytes for one: more would not fit SQLite's row.
        ("TASK_METADATA_MAX_BYTES", str(2**30), "less than or equal to 166500000"),
    ],
)
def test_values_that_would_break_the_task_store_are_refused(
    name: str,
    value: str,
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(name, value)
    assert f"{name}='{value}': Input should be {message}" in refusal(monkeypatch, capsys)


def test_a_temporary_directory_that_cannot_be_used_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Python falls back to /tmp from a TMPDIR it cannot write to, saying nothing: large
    uploads would fill a disk the operator did not choose."""
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    line = refusal(monkeypatch, capsys)
    assert f"TMPDIR='{tmp_path / 'missing'}': not a directory this process can write to" in line

    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    load_settings()
    assert tempfile.gettempdir() == str(tmp_path)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "No such file or directory"),
        (b"", "cannot be read as PEM CA certificates"),
        (b"not a certificate\n", "cannot be read as PEM CA certificates"),
    ],
    ids=["missing", "empty", "not PEM"],
)
def test_a_webhook_ca_file_that_holds_no_certificates_is_refused(
    content: bytes | None,
    says: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setenv("WEBHOOK_CA_FILE", str(path))
    line = refusal(monkeypatch, capsys)
    assert "WEBHOOK_CA_FILE=" in line
    assert says in line
    assert len(line.strip().splitlines()) == 1


def test_a_webhook_ca_file_of_certificates_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    monkeypatch.setenv("WEBHOOK_CA_FILE", str(path))
    assert load_settings().webhook_ca_file == path


def test_names_close_to_a_settings_are_named_with_the_setting_meant() -> None:
    """Names that are no setting are ignored: WORKER=2 would start one worker, without a
    word of why."""
    environ = {
        "WORKER": "2",
        "max_batch": "8",
        "REQUEST_TIMEOUT_S": "2",
        "WORKERS": "1",  # a setting
        "WEIGHT": "",  # empty: no value, as compose passes an unset variable
        "WEBHOOK": "x",  # the prefix of seven settings: a name of the user's own
        "PATH": "/usr/bin",
        "KUBERNETES_SERVICE_PORT": "443",
    }
    assert misspelt_settings(environ) == [
        "REQUEST_TIMEOUT_S is no setting, and is ignored: did you mean REQUEST_TIMEOUT_MS?",
        "WORKER is no setting, and is ignored: did you mean WORKERS?",
        "max_batch is no setting, and is ignored: did you mean MAX_BATCH_FILES or MAX_BATCH_SIZE?",
    ]


@pytest.mark.parametrize(
    ("host", "port", "bind"),
    [
        ("127.0.0.1", None, "127.0.0.1:5001"),
        ("::1", "8000", "[::1]:8000"),
        ("localhost", None, "localhost:5001"),
    ],
)
def test_host_set_to_an_address_is_said_to_be_bind(host: str, port: str | None, bind: str) -> None:
    """Other servers listen on HOST; here it is ignored, and the server would listen on every
    interface without a word. A shell's HOST, the machine's name, is no such mistake."""
    environ = {"HOST": host} | ({"PORT": port} if port else {})
    assert misspelt_settings(environ) == [
        f"HOST is no setting, and is ignored: the address to listen on is BIND under gunicorn "
        f"(BIND={bind}), --host under uvicorn"
    ]
    assert misspelt_settings({"HOST": "build-box-7"}) == []


def test_the_host_hint_reads_the_port_in_any_case() -> None:
    [line] = misspelt_settings({"HOST": "127.0.0.1", "port": "6000"})
    assert "(BIND=127.0.0.1:6000)" in line


def test_a_refusal_is_json_for_log_format_set_in_any_case(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A log collector reading JSON lines must not miss why the server did not start."""
    monkeypatch.setenv("log_format", "json")
    monkeypatch.setenv("MAX_QUEUE", "0")
    line = refusal(monkeypatch, capsys)
    assert json.loads(line)["message"].startswith("invalid configuration: MAX_QUEUE='0'")


def test_a_worker_s_model_threads_share_the_cores_on_a_cpu_and_are_one_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On a GPU the model's work is not on the cores: threads idle beside it would spin."""
    monkeypatch.setattr(service.settings, "available_cores", lambda: 16)
    monkeypatch.setenv("WORKERS", "4")
    settings = load_settings()
    assert settings.torch_threads_on("cpu") == 4
    assert settings.torch_threads_on("cuda") == 1
    monkeypatch.setenv("TORCH_THREADS", "3")  # as given, on either
    settings = load_settings()
    assert settings.torch_threads_on("cpu") == settings.torch_threads_on("cuda") == 3


def test_valid_settings_that_change_nothing_or_slow_the_service_are_warned_of(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """MAX_WAIT_MS under the adaptive policy, which never waits for a batch to fill, and
    more torch threads than cores (1024 on 2: a batch of one took 488 ms against 18 ms)."""
    monkeypatch.setattr(service.settings, "available_cores", lambda: 2)
    lines = settings_to_warn_of(
        Settings(torch_threads=1024), {"MAX_WAIT_MS": "500", "TORCH_THREADS": "1024"}
    )
    assert lines == [
        "MAX_WAIT_MS applies to BATCH_POLICY=timeout only, and is ignored: the adaptive "
        "policy never waits for a batch to fill",
        "TORCH_THREADS=1024 in each of 1 worker(s) is 1024 threads for the 2 cores the service "
        "may use: they take turns on the cores, and every batch slows (left unset, the cores "
        "are shared out)",
    ]
    assert settings_to_warn_of(Settings(workers=2, torch_threads=2), {}) != []
    timeout = Settings(batch_policy="timeout", torch_threads=1, workers=2)
    assert settings_to_warn_of(timeout, {"max_wait_ms": "50"}) == []
    assert settings_to_warn_of(Settings(), {"MAX_WAIT_MS": " "}) == []


def test_a_batch_wait_as_long_as_the_deadline_is_warned_of() -> None:
    """Under the timeout policy a lone request then waits until just before its deadline:
    a batch slower than its estimate (threads gone cold over the wait) would make it a 504
    after the model had run it."""
    waits_out = Settings(batch_policy="timeout", max_wait_ms=2000, request_timeout_ms=600)
    assert settings_to_warn_of(waits_out, {"MAX_WAIT_MS": "2000"}) == [
        "MAX_WAIT_MS=2000 is not shorter than REQUEST_TIMEOUT_MS=600: a lone request waits "
        "until just before its deadline, and gets a 504 whenever its batch runs slower than "
        "expected"
    ]
    shorter = Settings(batch_policy="timeout", max_wait_ms=50, request_timeout_ms=600)
    assert settings_to_warn_of(shorter, {"MAX_WAIT_MS": "50"}) == []


@pytest.mark.parametrize(
    ("name", "path", "says"),
    [
        (
            "WEIGHTS",
            "missing.pth",
            "does not exist; give a state-dict file, 'imagenet' or 'random'",
        ),
        ("WEIGHTS", ".", "is a directory; give a state-dict file"),
        (
            "LABELS_FILE",
            "missing.txt",
            "does not exist; give a text file with one class name a line",
        ),
        ("LABELS_FILE", ".", "is a directory; give a text file"),
    ],
)
def test_a_file_setting_that_names_no_file_is_refused(
    name: str,
    path: str,
    says: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(name, str(tmp_path / path))
    line = refusal(monkeypatch, capsys)
    assert f"{name}='{tmp_path / path}': {says}" in line


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("file", "is not a directory; set DATA_DIR to a writable directory"),
        ("file/tasks", "is under {file}, not a directory; set DATA_DIR"),
        ("dangling", "is a symbolic link to nothing; set DATA_DIR"),
        ("dangling/tasks", "is under {dangling}, a symbolic link to nothing; set DATA_DIR"),
    ],
)
def test_a_data_dir_that_is_a_file_is_refused(
    path: str,
    says: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Refused as the settings are read, before gunicorn binds the port: every worker
    would load its model, then fail to open the task store."""
    (tmp_path / "file").write_text("")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / path))
    line = refusal(monkeypatch, capsys)
    said = says.format(file=tmp_path / "file", dangling=tmp_path / "dangling")
    assert f"DATA_DIR='{tmp_path / path}': {said}" in line


def test_a_data_dir_yet_to_be_made_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "not" / "yet"))
    assert load_settings().data_dir == tmp_path / "not" / "yet"
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "link"))
    assert load_settings().data_dir == tmp_path / "link"


def test_a_weights_file_that_exists_is_left_to_the_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whether it holds weights, and can be read, is the model loader's to say."""
    (tmp_path / "weights.pth").write_bytes(b"not checked here")
    monkeypatch.setenv("WEIGHTS", str(tmp_path / "weights.pth"))
    assert load_settings().weights == str(tmp_path / "weights.pth")


def test_a_leading_tilde_is_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As a shell would expand it: a compose file or a systemd unit passes ``~`` as is."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "labels.txt").write_text("cat\ndog\n")
    (tmp_path / "weights.pth").write_bytes(b"not checked here")
    monkeypatch.setenv("DATA_DIR", "~/tasks")
    monkeypatch.setenv("LABELS_FILE", "~/labels.txt")
    monkeypatch.setenv("WEIGHTS", "~/weights.pth")
    settings = load_settings()
    assert settings.data_dir == tmp_path / "tasks"
    assert settings.labels_file == tmp_path / "labels.txt"
    assert settings.weights == "~/weights.pth"  # the loader expands it alike


@pytest.mark.parametrize("name", ["DATA_DIR", "LABELS_FILE", "WEIGHTS", "WEBHOOK_CA_FILE"])
def test_a_home_directory_not_known_is_refused(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(name, "~no-such-user-here/file")
    line = refusal(monkeypatch, capsys)
    assert (
        f"{name}='~no-such-user-here/file': starts with ~no-such-user-here, a home directory "
        "not known here; give a full path"
    ) in line
