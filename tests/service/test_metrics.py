from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batching import Outcome
from service import metrics
from service.settings import PROJECT_ROOT


def run_with_metrics_dir(
    metrics_dir: Path | str, code: str, cwd: Path = PROJECT_ROOT
) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new process, in ``cwd``, whose metrics go to ``metrics_dir`` as a
    worker's do."""
    env = {
        **os.environ,
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        "PYTHONPATH": str(PROJECT_ROOT),
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def import_metrics(metrics_dir: Path) -> subprocess.CompletedProcess[str]:
    """Import the metrics module in a new process, as a plain uvicorn run does."""
    return run_with_metrics_dir(metrics_dir, "import service.metrics")


def test_a_metrics_dir_named_but_missing_is_made_outside_gunicorn(tmp_path: Path) -> None:
    """The container image names one; gunicorn_config.py makes it, a plain uvicorn run too."""
    metrics_dir = tmp_path / "not" / "made"
    imported = import_metrics(metrics_dir)
    assert imported.returncode == 0, imported.stderr
    assert any(metrics_dir.glob("*.db"))


def test_a_metrics_dir_that_cannot_be_made_is_one_line_outside_gunicorn(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the directory should be")
    imported = import_metrics(tmp_path / "taken")
    assert imported.returncode != 0
    assert imported.stderr.strip().splitlines() == [
        f"invalid configuration: PROMETHEUS_MULTIPROC_DIR={tmp_path / 'taken'} cannot hold the "
        "metrics: it is a file, not a directory; point it at a directory, or unset it"
    ]


def test_a_metrics_dir_that_cannot_be_written_is_one_line_outside_gunicorn() -> None:
    # A directory that exists but takes no files, even from root: the kernel's.
    imported = import_metrics(Path("/sys/kernel"))
    assert imported.returncode != 0
    [line] = imported.stderr.strip().splitlines()
    assert line.startswith(
        "invalid configuration: PROMETHEUS_MULTIPROC_DIR=/sys/kernel cannot hold the metrics: "
    )
    assert line.endswith("; point it at a directory this user can write to, or unset it")


def test_methods_the_api_does_not_take_are_counted_as_other() -> None:
    """The parser passes some thirty methods on: each would be series of its own."""
    for method in ("PROPFIND", "MKCOL", "PURGE"):
        metrics.record_request("unmatched", method, 405, 0.001)
    text = metrics.render()[0].decode()
    assert 'method="PROPFIND"' not in text
    assert 'http_requests_total{method="other",route="unmatched",status="405"}' in text


@pytest.mark.parametrize("size", [*range(1, 17), 24, 100])
def test_a_batch_size_quantile_rounded_up_is_the_batch_size(size: int) -> None:
    """Prometheus interpolates a quantile within the bucket it falls in; up to 16, each size
    has a bucket of its own, so ceil() of the quantile of batches all of one size is it."""
    bounds = metrics.BATCH_SIZE_BUCKETS
    upper = next(bound for bound in bounds if size <= bound)
    lower = max((bound for bound in bounds if bound < upper), default=0)
    for quantile in (0.5, 0.95, 0.99):
        interpolated = lower + (upper - lower) * quantile
        if size <= 16:
            assert math.ceil(interpolated) == size
        else:
            assert lower < size <= upper  # coarser: within its bucket


@pytest.mark.parametrize("seconds", [0.0008, 0.0017, 0.004])
def test_a_gpus_forward_pass_is_timed_within_a_factor_of_three(seconds: float) -> None:
    """A quantile falls in the bucket of what was observed, which bounds it within three
    times either way: a GPU's passes of a few milliseconds or less, interpolated between 0
    and the first bound, would read as anything from nothing to it."""
    bounds = metrics.LATENCY_BUCKETS_S
    upper = next(bound for bound in bounds if seconds <= bound)
    lower = max((bound for bound in bounds if bound < upper), default=0)
    assert lower > 0
    assert upper / lower <= 3


def test_every_batch_outcome_is_a_series_from_the_start(tmp_path: Path) -> None:
    """A panel or a rate() over an outcome not seen yet would show no data, not 0."""
    render = "from service import metrics; print(metrics.render()[0].decode())"
    rendered = run_with_metrics_dir(tmp_path, render)
    assert rendered.returncode == 0, rendered.stderr
    text = rendered.stdout
    for outcome in Outcome:
        assert f'batch_requests_total{{outcome="{outcome.value}"}} 0.0' in text
    for outcome in ("ok", "failed"):
        assert f'batch_inference_seconds_count{{outcome="{outcome}"}} 0.0' in text
    for lane in ("interactive", "bulk", "background"):
        assert f'batch_queue_wait_seconds_count{{lane="{lane}"}} 0.0' in text
    for status in (200, 400, 413, 500, 503, 504):
        assert f'classify_batch_files_total{{status="{status}"}} 0.0' in text


def test_other_files_in_the_metrics_dir_leave_the_scrape_whole(tmp_path: Path) -> None:
    """A directory set by hand may hold others' files, ``.db`` ones too (a SQLite
    database, a copy of a metric file under another name): prometheus_client's collector
    reads every ``*.db`` and would fail the whole scrape on them, a 500 for every scrape."""
    (tmp_path / "cache.db").write_bytes(b"SQLite format 3\x00" + bytes(4080))
    (tmp_path / "notes.db").write_bytes(b"")
    record_and_render = (
        "import shutil; from pathlib import Path; from service import metrics; "
        "metrics.record_request('/cls', 'POST', 200, 0.02); "
        f"[shutil.copy(f, Path({str(tmp_path)!r}) / 'backup.db') "
        f"for f in Path({str(tmp_path)!r}).glob('counter_*.db')]; "
        "print(metrics.render()[0].decode())"
    )
    rendered = run_with_metrics_dir(tmp_path, record_and_render)
    assert rendered.returncode == 0, rendered.stderr
    assert 'http_requests_total{method="POST",route="/cls",status="200"} 1.0' in rendered.stdout
    assert (tmp_path / "backup.db").exists()


def test_a_metrics_dir_removed_under_the_server_fails_the_scrape(tmp_path: Path) -> None:
    """By a cleaner of /tmp, say: an empty 200 would leave Prometheus with the target up and
    every series gone, no alert able to fire."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    remove_and_render = (
        "import shutil; from service import metrics; "
        "metrics.record_request('/cls', 'POST', 200, 0.02); "
        f"shutil.rmtree({str(metrics_dir)!r}); metrics.render()"
    )
    rendered = run_with_metrics_dir(metrics_dir, remove_and_render)
    assert rendered.returncode != 0
    assert f"PROMETHEUS_MULTIPROC_DIR={metrics_dir} is not a directory" in rendered.stderr


def test_worker_files_deleted_or_just_created_during_a_scrape_leave_it_whole(
    tmp_path: Path,
) -> None:
    """gunicorn's master deletes the files of a worker that counted nothing as it exits,
    which may come between the scrape listing them and reading them; and a worker that
    has just created its file has not sized it yet. Neither fails the scrape."""
    code = f"""
import shutil
from pathlib import Path
from prometheus_client import multiprocess
from service import metrics

directory = Path({str(tmp_path)!r})
metrics.record_request("/cls", "POST", 200, 0.02)
[counter] = directory.glob("counter_*.db")
shutil.copy(counter, directory / "counter_999999.db")  # a worker about to exit
(directory / "histogram_999998.db").touch()  # a worker starting
read = multiprocess.MmapedDict.read_all_values_from_file

def read_after_the_exit(path):
    if path.endswith("counter_999999.db"):
        Path(path).unlink(missing_ok=True)
    return read(path)

multiprocess.MmapedDict.read_all_values_from_file = staticmethod(read_after_the_exit)
print(metrics.render()[0].decode())
"""
    rendered = run_with_metrics_dir(tmp_path, code)
    assert rendered.returncode == 0, rendered.stderr
    assert 'http_requests_total{method="POST",route="/cls",status="200"} 1.0' in rendered.stdout


@pytest.mark.parametrize("given", [" ", "  {}  "])
def test_a_metrics_dir_with_blanks_around_it_or_blank_is_read_without_them(
    tmp_path: Path, given: str
) -> None:
    """As gunicorn_config.py reads it: blank is unset, a path with blanks around it is the
    path, not a directory whose name begins with a blank."""
    code = (
        "import os; from service import metrics; "
        "metrics.record_request('/cls', 'POST', 200, 0.02); "
        "print(repr(os.environ.get('PROMETHEUS_MULTIPROC_DIR'))); "
        "print(metrics.render()[0].decode())"
    )
    rendered = run_with_metrics_dir(given.format(tmp_path), code, cwd=tmp_path)
    assert rendered.returncode == 0, rendered.stderr
    first, text = rendered.stdout.split("\n", 1)
    assert first == ("None" if given == " " else repr(str(tmp_path)))
    assert 'http_requests_total{method="POST",route="/cls",status="200"} 1.0' in text
    # Unset: nothing written; else written where the path without its blanks leads.
    assert bool(list(tmp_path.glob("counter_*.db"))) is (given != " ")


def test_a_process_outside_gunicorn_drops_its_live_gauges_as_it_stops(tmp_path: Path) -> None:
    """After uvicorn's --reload, say, the next process would report them beside its own."""
    code = (
        "from service import metrics; metrics.record_resident_memory(123); "
        "metrics.forget_this_process(); print(metrics.render()[0].decode())"
    )
    rendered = run_with_metrics_dir(tmp_path, code)
    assert rendered.returncode == 0, rendered.stderr
    assert "worker_resident_memory_bytes{" not in rendered.stdout
    assert not list(tmp_path.glob("gauge_live*"))
