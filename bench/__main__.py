"""Benchmark the service end to end against its in-process limits.

    python -m bench                 # quick mode, two to four minutes
    python -m bench --full          # every step, about seven minutes
    python -m bench --url http://host:5001   # drive a running server (no CPU/RSS figures)

Writes JSON, Markdown and PNG plots to docs/benchmarks/ (--out for another folder).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import numpy as np
import psutil
import pydantic
import torch
from tqdm import tqdm

from bench import limits, queueing, report
from bench.load import Payload, StepResult, closed_loop, encode_payloads, open_loop, spaced
from bench.report import MAX_PAIR_DRIFT
from bench.server import Server, ServerNotStarted, scrape, start
from classification import ImageTooLarge, InvalidImage, cpu_computes_bfloat16, preprocess
from service import memory as worker_memory
from service.settings import PROJECT_ROOT, Settings, available_cores

# Target 2 below this is no measurement of the server: in process, the same decode and
# forward without HTTP take longer only on a machine whose speed changed between the two.
MIN_PLAUSIBLE_LONE_RATIO = 0.9
# A server faster than its model alone (target 1) measured a machine whose speed changed.
MAX_PLAUSIBLE_SATURATED_RATIO = 1.05

# Target 4's open-loop step, as a fraction of the capacity the sweep measured.
TARGET_4_FRACTION = 0.75

# The machine's CPU is sampled this long before and after the run; busier than this (of
# all its cores) from other processes, the run's figures are flagged as unreliable.
BUSY_SAMPLE_S = 3.0
MAX_OTHER_LOAD = 0.15

# Requests this far apart find the model idle: its OpenMP threads sleep about 20 ms after a
# forward pass (GOMP_SPINCOUNT in gunicorn_config.py), and the worker returns freed memory
# only after a second (service/memory.py).
SPACED_GAP_S = 0.5

MODES: dict[str, dict[str, Any]] = {
    "quick": {
        "clients": [1, 4, 16, 64],
        "step_s": 4.0,
        "warmup_s": 1.0,
        "open_fractions": [0.5, 0.75],
        "open_s": 8.0,
        "spaced_requests": 12,
        "limit_s": 2.0,
    },
    "full": {
        "clients": [1, 2, 4, 8, 16, 32, 64],
        "step_s": 12.0,
        "warmup_s": 2.0,
        "open_fractions": [0.25, 0.5, 0.75, 0.9],
        "open_s": 20.0,
        "spaced_requests": 40,
        "limit_s": 5.0,
    },
}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "device": "cpu",
        "cpu": cpu,
        "cores": available_cores(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "os": platform.platform(),
    }


def other_load_warning(machine: dict[str, Any]) -> str | None:
    """What to say of a run that other processes' load made unreliable; None if none."""
    busy = max(machine["busy_before_run"], machine["busy_after_run"])
    if busy <= MAX_OTHER_LOAD:
        return None
    return (
        f"other processes kept the machine {busy:.0%} busy just before or after the run: "
        "its figures are unreliable; run it on a quiet machine"
    )


def commit() -> str | None:
    """The code measured: its git commit, marked "+changes" with uncommitted edits."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True
        ).stdout.strip()
        # The results this benchmark writes by default are no change to the code.
        dirty = subprocess.run(
            [
                "git",
                "status",
                "--porcelain",
                "--untracked-files=no",
                "--",
                ".",
                ":!docs/benchmarks",
            ],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:  # no git
        return None
    return (commit + ("+changes" if dirty else "")) or None


def bare_rss_bytes(max_batch_size: int, threads: int, dtype: str) -> int:
    output = subprocess.run(
        [sys.executable, "-m", "bench.bare", str(max_batch_size), str(threads), dtype],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return int(output.stdout.strip().splitlines()[-1])


def run_sweep(
    server: Server, payloads: list[Payload], mode: dict[str, Any], progress: tqdm
) -> list[StepResult]:
    steps = []
    for clients in mode["clients"]:
        progress.set_description(f"closed loop, {clients} clients")
        steps.append(
            asyncio.run(closed_loop(server, payloads, clients, mode["step_s"], mode["warmup_s"]))
        )
        progress.update()
    capacity = max(step.throughput_per_s for step in steps)
    if capacity <= 0:
        answered = {status: n for step in steps for status, n in step.statuses.items()}
        raise SystemExit(f"error: the server answered no request with 200 ({answered}); stopped")
    # Target 4's step last, between two idle measurements (A-B-A).
    fractions = sorted(mode["open_fractions"], key=lambda f: (f == TARGET_4_FRACTION, f))
    for fraction in fractions:
        if fraction == TARGET_4_FRACTION:
            progress.set_description("closed loop, 1 client, before the next open-loop step")
            steps.append(idle_step(server, payloads, mode, "closed-1-before-open"))
            progress.update()
        progress.set_description(f"open loop, {fraction:.0%} of capacity")
        steps.append(
            asyncio.run(
                open_loop(
                    server,
                    payloads,
                    capacity * fraction,
                    mode["open_s"],
                    mode["warmup_s"],
                    seed=1,
                    label=f"{fraction:.0%}",
                )
            )
        )
        progress.update()
    progress.set_description("closed loop, 1 client again")
    steps.append(idle_step(server, payloads, mode, "closed-1-after"))
    progress.update()
    progress.set_description(f"one request every {SPACED_GAP_S:g} s after the last answer")
    steps.append(asyncio.run(spaced(server, payloads, SPACED_GAP_S, mode["spaced_requests"])))
    progress.update()
    return steps


def idle_step(
    server: Server, payloads: list[Payload], mode: dict[str, Any], name: str
) -> StepResult:
    step = asyncio.run(closed_loop(server, payloads, 1, mode["step_s"], mode["warmup_s"]))
    step.name = name
    return step


def _saturating_clients(
    sweep: list[StepResult], max_batch_size: int, *, by_url: bool = False
) -> tuple[int, str | None]:
    """The fewest clients of the sweep that kept every batch full: the server saturated at
    the maximum batch, as the forward-only limit is measured. (The best throughput of the
    sweep may come from fewer clients and half-full batches, by the minute's drift.) And a
    warning where no step filled them."""
    closed = sorted((s for s in sweep if s.kind == "closed"), key=lambda s: s.offered)
    full = [s for s in closed if s.mean_batch_size >= max_batch_size - 0.5]
    largest = max(s.mean_batch_size for s in closed)
    if largest > max_batch_size + 0.5:
        # Only a server given by --url can: one started here runs --max-batch-size.
        return int(full[0].offered), (
            f"the server ran batches of {largest:.1f} on average, more than --max-batch-size "
            f"{max_batch_size}; target 1 compares with the forward-only limit at "
            f"{max_batch_size}: give the server's MAX_BATCH_SIZE as --max-batch-size"
        )
    if full:
        return int(full[0].offered), None
    advice = (
        "give the server's MAX_BATCH_SIZE as --max-batch-size"
        if by_url
        else f"the sweep's {closed[-1].offered:g} clients did not fill them, so its "
        "throughput is that of smaller batches"
    )
    warning = (
        f"no step kept batches of {max_batch_size} full (the largest mean batch was "
        f"{largest:.1f}); target 1 compares with the forward-only limit at {max_batch_size}: "
        f"{advice}"
    )
    return int(closed[-1].offered), warning


def run_paired(
    server: Server,
    payloads: list[Payload],
    lim: limits.Limits,
    mode: dict[str, Any],
    saturating_clients: int,
    max_batch_size: int,
    progress: tqdm,
) -> dict[str, Any]:
    """Targets 1 and 2 as A-B-A: the in-process limit just before and just after the served
    measurement, so the machine's drift from minute to minute cancels out of the ratio."""
    seconds = mode["limit_s"]
    progress.set_description("paired: pipeline / lone request / pipeline")
    pipeline_before = lim.pipeline_ms(seconds)
    lone = idle_step(server, payloads, mode, "closed-1-paired")
    pipeline_after = lim.pipeline_ms(seconds)
    progress.update()
    progress.set_description("paired: forward / saturated server / forward")
    forward_before = lim.forward_limit(max_batch_size, seconds)
    saturated = asyncio.run(
        closed_loop(server, payloads, saturating_clients, mode["step_s"], mode["warmup_s"])
    )
    saturated.name += "-paired"
    forward_after = lim.forward_limit(max_batch_size, seconds, served_first=True)
    progress.update()
    return {
        "single_image_pipeline_ms": [pipeline_before, pipeline_after],
        "lone_request": asdict(lone),
        "forward": [forward_before, forward_after],
        "saturated": asdict(saturated),
    }


def _drift(before: float, after: float, resolution: float = 0.0) -> float:
    """How far the machine drifted across an A-B-A pair, as a fraction of the mean of A;
    a difference within ``resolution``, the finest the two measure, is none."""
    return max(0.0, abs(before - after) - resolution) / statistics.mean([before, after])


def _drift_note(drift: float, beyond: str = "") -> str:
    verdict = "; unreliable, run again" if drift > MAX_PAIR_DRIFT else ""
    return f"; A drifted {drift:.1%} across the pair{beyond}{verdict}"


def ideal_open_loop_ratio(
    limit_figures: dict[str, float], rate_per_s: float, max_batch_size: int
) -> tuple[float | None, str]:
    """Target 4 for a server with no overhead at all (bench/queueing.py): the part of the
    ratio that queueing alone imposes on this machine, and a note saying so. None where the
    rate is more than such a server serves: its queue, and so its p99, grow without bound,
    as long as arrivals last."""
    forward_ms_by_batch = {
        int(name.removeprefix(limits.FORWARD_MS_PREFIX)): value
        for name, value in limit_figures.items()
        if name.startswith(limits.FORWARD_MS_PREFIX)
    }
    capacity = queueing.capacity_per_s(forward_ms_by_batch, max_batch_size)
    if rate_per_s >= capacity:
        return None, (
            f"no figure for a server with no overhead: with the forward times measured in "
            f"process it serves at most {capacity:.1f} images/s a worker, under the "
            f"{rate_per_s:.1f} offered, so its queue grows for as long as arrivals last"
        )
    decode_ms = limit_figures["preprocess_ms_per_image"]
    latencies = queueing.ideal_latencies_ms(
        rate_per_s, forward_ms_by_batch, decode_ms, max_batch_size
    )
    idle_p50 = decode_ms + forward_ms_by_batch[1]
    ideal = float(np.percentile(latencies, 99)) / idle_p50
    return ideal, (
        f"a server with no overhead, batching greedily with this machine's forward times, "
        f"would reach {ideal:.1f}"
    )


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    """None where a step had no answer to time."""
    return None if numerator is None or not denominator else numerator / denominator


def _ms(value: float | None) -> str:
    return "no answer" if value is None else f"{value:.1f}"


TARGET_3 = "3. saturated throughput / batching-off throughput"
TARGET_5 = "5. worker RSS at rest / bare model process"


def _not_measured(name: str, bound: str, why: str) -> dict[str, Any]:
    return {
        "name": name,
        "value": None,
        "bound": bound,
        "note": why,
        "not_measured": True,
        "met": None,
    }


def targets(
    results: dict[str, Any], max_batch_size: int, workers: int | None
) -> list[dict[str, Any]]:
    """The five targets; ``workers`` is None for a server given by URL. A target whose step
    had no successful answer has no value, and is not met."""
    steps = {step["name"]: step for step in results["steps"]}
    paired = results["paired"]
    saturated = paired["saturated"]["throughput_per_s"]
    forward_limits = [f["forward_limit_images_per_s"] for f in paired["forward"]]
    forward_eager = statistics.mean(
        f.get("forward_eager_limit_images_per_s", f["forward_limit_images_per_s"])
        for f in paired["forward"]
    )
    # Measured in one process with a worker's share of the cores: each worker has one.
    # More workers than cores share them: the machine runs no more than a worker a core.
    copies = min(workers or 1, available_cores())
    forward_limit = statistics.mean(forward_limits) * copies
    forward_eager *= copies
    each = f" ({workers} workers, each its share of the cores)" if (workers or 1) > 1 else ""
    # The in-process limits are this machine's; a server given by URL may run on another.
    elsewhere = "" if workers else "; limits measured here, where the server may not run"
    pipeline_ms = statistics.mean(paired["single_image_pipeline_ms"])
    lone_p50 = paired["lone_request"]["latency_ms"]["p50"]
    forward_drift = _drift(*forward_limits)
    pipeline_drift = _drift(*paired["single_image_pipeline_ms"])
    found: list[dict[str, Any]] = [
        {
            "name": "1. saturated throughput / forward-only limit",
            "steps": [paired["saturated"]],
            "value": saturated / forward_limit,
            "bound": ">= 0.90",
            "note": f"{saturated:.1f} / {forward_limit:.1f} images/s{each}, the best of "
            f"the network plain, channels_last and as served (BatchNorm folded); "
            f"{saturated / forward_eager:.2f} of the unfolded network's best, "
            f"{forward_eager:.1f} images/s" + _drift_note(forward_drift) + elsewhere,
            "pair_drift": forward_drift,
        },
        {
            "name": "2. lone request p50 / in-process single-image pipeline",
            "steps": [paired["lone_request"]],
            "value": _ratio(lone_p50, pipeline_ms),
            "bound": "<= 1.10",
            "note": f"{_ms(lone_p50)} / {pipeline_ms:.1f} ms"
            + _drift_note(pipeline_drift)
            + elsewhere,
            "pair_drift": pipeline_drift,
        },
    ]
    by_url = "not measured: with --url, no server is started here"
    if workers is None:
        found.append(_not_measured(TARGET_3, ">= 1.15", f"{by_url} with batching off"))
    if results.get("baseline"):
        baseline = results["baseline"][0]["throughput_per_s"]
        batching_steps = [paired[key] for key in ("saturated", "saturated_after_baseline")]
        batching = [step["throughput_per_s"] for step in batching_steps]
        # Answers come a full batch at a time: a step's throughput moves in steps of one
        # batch per window (4 images/s in a quick run's 4 s), which is no drift.
        windows = [step.get("duration_s") for step in batching_steps]
        resolution = max_batch_size / min(windows) if None not in windows else 0.0
        drift = _drift(*batching, resolution) if any(batching) else 0.0
        found.append(
            {
                "name": TARGET_3,
                "steps": [*batching_steps, results["baseline"][0]],
                "value": _ratio(statistics.mean(batching), baseline),
                "bound": ">= 1.15",
                "note": f"{statistics.mean(batching):.1f} / {baseline:.1f} images/s"
                + _drift_note(drift, " beyond one batch per window" if resolution else ""),
                "pair_drift": drift,
            }
        )
    at_75 = steps.get(f"open-{TARGET_4_FRACTION:.0%}")
    idle = [steps.get(name) for name in ("closed-1-before-open", "closed-1-after")]
    if at_75 is not None and None not in idle:
        idle_p50s = [step["latency_ms"]["p50"] for step in idle if step is not None]
        idle_p50 = None if None in idle_p50s else statistics.mean(idle_p50s)
        drift = 0.0 if idle_p50 is None else _drift(*idle_p50s)
        target: dict[str, Any] = {
            "name": f"4. open-loop p99 at {TARGET_4_FRACTION:.0%} capacity / idle p50",
            "steps": [at_75, *idle],
            "value": _ratio(at_75["latency_ms"]["p99"], idle_p50),
            "bound": "<= 4",
            "note": f"{_ms(at_75['latency_ms']['p99'])} / {_ms(idle_p50)} ms" + _drift_note(drift),
            "pair_drift": drift,
        }
        # Only for a server started here: its workers' model is the one measured in process.
        if workers is not None:
            # Each worker's model sees its share of the arrivals.
            ideal, note = ideal_open_loop_ratio(
                results["limits"], at_75["offered"] / workers, max_batch_size
            )
            target["note"] += "; " + note
            target["ideal_server_value"] = ideal
        found.append(target)
    memory = results["memory"]
    if workers is None:
        found.append(_not_measured(TARGET_5, "<= 1.3", f"{by_url}, whose workers it can watch"))
    if memory.get("worker_rss_at_rest_after_load"):
        found.append(
            {
                "name": TARGET_5,
                "value": memory["worker_rss_at_rest_after_load"] / memory["bare_model_process_rss"],
                "bound": "<= 1.3",
                "note": f"{memory['worker_rss_at_rest_after_load'] / 2**20:.0f} / "
                f"{memory['bare_model_process_rss'] / 2**20:.0f} MiB",
            }
        )
    saturated_target, lone = found[0], found[1]
    # The limits are this machine's: a server given by URL may well run faster elsewhere.
    measured_here = workers is not None
    if measured_here and saturated_target["value"] > MAX_PLAUSIBLE_SATURATED_RATIO + forward_drift:
        # Served, the model's work plus decoding cannot outrun the model alone.
        saturated_target["note"] += (
            "; implausible, the server faster than its model alone: the machine's speed "
            "changed during the run, run it again"
        )
        saturated_target["implausible"] = True
    if (
        measured_here
        and lone["value"] is not None
        and lone["value"] < MIN_PLAUSIBLE_LONE_RATIO - pipeline_drift
    ):
        # Served, the same work plus HTTP cannot be faster than in process.
        lone["note"] += (
            "; implausible, a served request faster than the model alone: the machine's "
            "speed changed during the run, run it again"
        )
        lone["implausible"] = True
    busy = other_load_warning(results["machine"]) is not None
    for target in found:
        if target.get("not_measured"):
            continue
        # A throughput counts 200s only, and latencies time them only: requests answered
        # otherwise, or not at all, would leave the figures better than the service was.
        failed = _failed_requests(target.pop("steps", []))
        if failed:
            target["failed_requests"] = failed
            target["note"] += (
                f"; {sum(failed.values())} requests of its steps not answered 200 ("
                + ", ".join(f"{count} {_status_name(status)}" for status, count in failed.items())
                + ")"
            )
        bound = target["bound"]
        limit = float(bound.split()[1])
        value = target["value"]
        target["within_bound"] = value is not None and (
            value >= limit if bound.startswith(">=") else value <= limit
        )
        # A ratio whose A moved more than the drift allowed says too little to count as
        # met: the run is to be made again.
        # Other processes' load shifts A and B alike, which no pair shows.
        target["unreliable"] = busy or target.get("pair_drift", 0.0) > MAX_PAIR_DRIFT
        target["met"] = (
            target["within_bound"]
            and not target.get("implausible")
            and not target["unreliable"]
            and not failed
        )
    return found


def _failed_requests(steps: list[dict[str, Any]]) -> dict[str, int]:
    """The statuses other than 200 the steps were answered with, and their counts; "0"
    for requests that got no answer (a timeout, a closed connection)."""
    failed: Counter[str] = Counter()
    for step in steps:
        failed.update({status: n for status, n in step["statuses"].items() if status != "200"})
    return dict(sorted(failed.items()))


def _status_name(status: str) -> str:
    return "unanswered" if status == "0" else status


DEFAULT_MAX_IMAGE_PIXELS: int = Settings.model_fields["max_image_pixels"].default
DEFAULT_MAX_UPLOAD_BYTES: int = Settings.model_fields["max_upload_bytes"].default
# What the service accepts (classification.preprocess), by file name.
JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
IMAGE_SUFFIXES = (
    *JPEG_SUFFIXES,
    *(".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"),
)


def _files_under(folder: Path) -> Iterator[Path]:
    """The files under ``folder``, through links to folders too (which ``Path.rglob``
    does not follow before Python 3.13), each folder once, a link loop included."""
    seen = set()
    for root, folders, names in os.walk(folder, followlinks=True):
        if (real := os.path.realpath(root)) in seen:
            folders.clear()
            continue
        seen.add(real)
        yield from (Path(root) / name for name in names)


def images_in(folder: Path) -> list[Path]:
    """The images under ``folder``, each checked to be one the service classifies.

    Raises:
        ValueError: The folder does not exist, holds no image, or an image is refused.
    """
    if not folder.is_dir():
        raise ValueError(f"--images {folder} is not a folder")
    images = sorted(
        path
        for path in _files_under(folder)
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    )
    if not images:
        raise ValueError(f"no images in {folder} ({', '.join(IMAGE_SUFFIXES)})")
    for path in images:
        data = path.read_bytes()
        if len(data) > DEFAULT_MAX_UPLOAD_BYTES:
            raise ValueError(
                f"{path}: {len(data)} bytes, over the service's MAX_UPLOAD_BYTES "
                f"({DEFAULT_MAX_UPLOAD_BYTES}): every request would be refused with 413"
            )
        try:
            preprocess(data, max_pixels=DEFAULT_MAX_IMAGE_PIXELS)
        except (InvalidImage, ImageTooLarge) as exc:
            raise ValueError(f"{path}: {exc}") from None
    return images


def jpegs_in(folder: Path) -> list[Path]:
    """The JPEGs among ``images_in(folder)``, for a benchmark that decodes JPEG only.

    Raises:
        ValueError: As ``images_in``, or the folder holds no JPEG.
    """
    jpegs = [path for path in images_in(folder) if path.suffix.lower() in JPEG_SUFFIXES]
    if not jpegs:
        raise ValueError(f"no JPEG images in {folder} ({', '.join(JPEG_SUFFIXES)})")
    return jpegs


def add_images_argument(parser: argparse.ArgumentParser) -> None:
    """``--images``, as every benchmark that sends photos takes it (read by ``images_in``
    or ``jpegs_in``)."""
    parser.add_argument(
        "--images",
        type=Path,
        default=PROJECT_ROOT.parent / "shared" / "images",
        help="a folder of images the service accepts, searched with its subfolders "
        "(default: %(default)s)",
    )


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def cpu_dtype(text: str) -> str:
    """``--dtype``, in any case, as the service reads ``DTYPE``."""
    dtype = text.strip().lower()
    if dtype == "float16":
        raise argparse.ArgumentTypeError(
            "float16 runs on a GPU only (python -m bench.gpu); on the CPU, float32 or bfloat16"
        )
    if dtype not in ("float32", "bfloat16"):
        raise argparse.ArgumentTypeError(f"must be float32 or bfloat16, not {text!r}")
    return dtype


def recorded_command(module: str, argv: list[str]) -> str:
    """The command line as the report shows it, an API key or a password in a URL in it
    masked: reports are kept."""
    shown, hide_next = [], False
    for argument in argv:
        if hide_next:
            argument, hide_next = "***", False
        elif argument == "--api-key":
            hide_next = True
        elif argument.startswith("--api-key="):
            argument = "--api-key=***"
        shown.append(without_password(argument))
    return shlex.join(["python", "-m", module, *shown])


def without_password(text: str) -> str:
    """``text`` with the password of a URL in it (``http://user:password@host``) masked."""
    return re.sub(r"(://[^/@:\s]*:)[^/\s]*@", r"\1***@", text)  # up to the host's @


def check_url(
    parser: argparse.ArgumentParser, url: str, headers: dict[str, str], image: Path, dtype: str
) -> None:
    """Refuse, before any measurement, a server that is not ready or would refuse every
    request (the sweep would measure nothing but its errors), or that serves in another
    dtype than the in-process limits would be measured in."""
    try:
        ready = httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        if not ready:
            parser.error(f"--url {url} is not ready (/readyz)")
        metrics = httpx.get(f"{url}/metrics", timeout=10).status_code
        if metrics != 200:
            # The proxy in deploy/nginx hides it: each replica's is its own.
            parser.error(
                f"--url {url} answers {metrics} for /metrics, where the benchmark reads the "
                "batch sizes: give one server's own address, not a proxy's"
            )
        served = {
            match.group(1)
            for name in scrape(url)
            if (match := re.match(r'model_info\{.*\bdtype="([^"]+)"', name))
        }
        if served and dtype not in served:
            parser.error(
                f"--url {url} serves in {', '.join(sorted(served))} (model_info on its "
                f"/metrics), not --dtype {dtype}: give its DTYPE as --dtype"
            )
        answer = httpx.post(
            f"{url}/cls",
            files={"file": (image.name, image.read_bytes())},
            headers=headers,
            timeout=60,
        )
    except httpx.HTTPError as exc:
        parser.error(f"--url {url} cannot be reached: {exc}")
    if answer.status_code == 401:
        parser.error(
            f"--url {url} answers 401: give its API_KEY with --api-key"
            if not headers
            else f"--url {url} answers 401: --api-key is not its API_KEY"
        )
    if answer.status_code != 200:
        parser.error(
            f"--url {url} answers {answer.status_code} to {image.name}: {answer.text[:300]}"
        )


class StoppedBySignal(KeyboardInterrupt):
    """SIGTERM or SIGHUP: the run stops as on Ctrl-C, what it started stopped on the way out,
    and exits with the signal's status (128 + its number)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.exit_status = 128 + signum


def exit_on_signal(signum: int, frame: object) -> None:
    raise StoppedBySignal(signum)


def exit_interrupted(interruption: KeyboardInterrupt, message: str) -> NoReturn:
    """Say ``message`` and exit as the interruption asks (1 for Ctrl-C)."""
    print(message, file=sys.stderr)
    sys.exit(interruption.exit_status if isinstance(interruption, StoppedBySignal) else 1)


def main() -> None:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,  # an abbreviated --api-key would escape its masking
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--full", action="store_true", help="every step, longer (default: quick)")
    add_images_argument(parser)
    parser.add_argument("--url", help="benchmark a running server instead of starting one")
    parser.add_argument(
        "--api-key", help="with --url, the server's API_KEY (sent as X-API-Key)", default=None
    )
    parser.add_argument(
        "--max-batch-size",
        type=positive,
        default=Settings.model_fields["max_batch_size"].default,
        help="the server's MAX_BATCH_SIZE (with --url, give the running server's; "
        "default: %(default)s)",
    )
    parser.add_argument(
        "--dtype",
        type=cpu_dtype,
        default="float32",
        help="the server's DTYPE, and the one the in-process limits are measured in "
        "(bfloat16 needs a CPU with AMX; with --url, give the running "
        "server's; default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=positive,
        default=1,
        help="gunicorn workers of the server it starts, each with its share of the cores "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=PROJECT_ROOT / "docs" / "benchmarks",
        help="the folder the JSON, Markdown and plots are written to (default: %(default)s)",
    )
    args = parser.parse_args()
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is a file, not a folder")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=args.out).close()
    except OSError as exc:
        parser.error(f"--out {args.out} cannot hold the results: {exc.strerror or exc}")
    # Stopped by a signal (its terminal closed too), the servers it started are stopped too
    # (ExitStack below).
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGHUP, exit_on_signal)
    try:
        run(parser, args)
    except KeyboardInterrupt as interruption:
        stopped = "" if args.url else "the servers it started are stopped; "
        exit_interrupted(interruption, f"interrupted; {stopped}no results written")
    except httpx.HTTPError as exc:
        sys.exit(f"the server stopped answering as it should ({exc}); no results written")
    except ServerNotStarted as exc:
        sys.exit(f"{exc}\nno results written")


def run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:

    mode_name = "full" if args.full else "quick"
    mode = MODES[mode_name]
    try:
        images = images_in(args.images)
    except ValueError as exc:
        default = args.images == parser.get_default("images")
        parser.error(f"{exc}" + (" (the default; give a folder with --images)" if default else ""))
    settings = {
        "WEIGHTS": "random",
        # What the in-process limits are measured on: left at auto, a GPU would serve.
        "DEVICE": "cpu",
        "WORKERS": str(args.workers),
        "MAX_BATCH_SIZE": str(args.max_batch_size),
        "DTYPE": args.dtype,
    }
    # Against the service's own bounds, and nothing else: the server it starts takes no
    # setting from this environment.
    for name, value in (("workers", args.workers), ("max_batch_size", args.max_batch_size)):
        field = Settings.model_fields[name]
        try:
            pydantic.TypeAdapter(Annotated[field.annotation, field]).validate_python(value)
        except pydantic.ValidationError as exc:
            option = "--" + name.replace("_", "-")
            message = exc.errors()[0]["msg"].lower()
            parser.error(f"{option} {value}: {message}, as the service allows")
    if args.url and args.workers != parser.get_default("workers"):
        parser.error(
            "--workers sets the server it starts; with --url none is started, and the limits "
            "are measured for one worker"
        )
    if args.dtype == "bfloat16" and not cpu_computes_bfloat16():
        parser.error("--dtype bfloat16 needs a CPU with AMX, which this one lacks")
    if args.api_key is not None and not args.url:
        parser.error("--api-key is for a server given by --url; the one it starts has no key")
    headers = {} if args.api_key is None else {"X-API-Key": args.api_key}
    if args.url:
        args.url = args.url.rstrip("/")
        check_url(parser, args.url, headers, images[0], args.dtype)
    threads = max(1, available_cores() // args.workers)
    payloads = encode_payloads(images)
    # Start-up 3, the sweep (closed, open, idle twice, spaced), paired 2, batching off 1.
    total_steps = 3 + len(mode["clients"]) + len(mode["open_fractions"]) + 3 + 3
    results: dict[str, Any] = {
        "mode": mode_name,
        "command": recorded_command("bench", sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "machine": machine(),
        # For a server at --url, what it was said to run with.
        "server_settings": (
            settings
            if not args.url
            else {
                "url": without_password(args.url),
                "MAX_BATCH_SIZE": str(args.max_batch_size),
                "DTYPE": args.dtype,
            }
        ),
        "images": [p.name for p in images],
    }
    warnings: list[str] = []  # written into the report as well as to stderr
    # Other processes' load slows A and B alike for the whole run, which no pair shows.
    results["machine"]["busy_before_run"] = psutil.cpu_percent(interval=BUSY_SAMPLE_S) / 100
    with tqdm(total=total_steps, unit="step") as progress, contextlib.ExitStack() as servers:
        progress.set_description("in-process limits")
        lim = limits.Limits(images, threads, args.dtype)
        results["limits"] = lim.measure(args.max_batch_size, mode["limit_s"])
        progress.update()
        progress.set_description("bare model process")
        memory: dict[str, float] = {
            "bare_model_process_rss": bare_rss_bytes(args.max_batch_size, threads, args.dtype)
        }
        progress.update()

        progress.set_description("starting servers")
        if args.url:
            server, baseline_server = Server(args.url, headers=headers), None
        else:
            server = servers.enter_context(start(settings, args.out / "logs"))
            memory["worker_rss_at_rest_after_start"] = server.worker_rss_bytes()
            # Batching off, started now and idle until its turn, so it can be measured
            # between two measurements of the batching server.
            baseline_server = servers.enter_context(
                start({**settings, "MAX_BATCH_SIZE": "1"}, args.out / "logs")
            )
        progress.update()

        sweep = run_sweep(server, payloads, mode, progress)
        results["steps"] = [asdict(s) for s in sweep]
        # Right after the spaced step, the same in process: back to back, then with its gap.
        progress.set_description("in-process pipeline, back to back and spaced")
        results["low_traffic"] = {
            "pipeline_ms": lim.pipeline_ms(mode["limit_s"]),
            "spaced_pipeline_ms": lim.spaced_pipeline_ms(SPACED_GAP_S, mode["spaced_requests"]),
        }
        if not args.url:
            # At rest: idle long enough for the worker to return a burst's freed memory.
            progress.set_description("worker at rest")
            time.sleep(worker_memory.IDLE_S + 2)
            memory["worker_rss_at_rest_after_load"] = server.worker_rss_bytes()
        saturating_clients, warning = _saturating_clients(
            sweep, args.max_batch_size, by_url=bool(args.url)
        )
        if warning is not None:
            print(f"warning: {warning}", file=sys.stderr)
            warnings.append(warning)
        results["paired"] = run_paired(
            server, payloads, lim, mode, saturating_clients, args.max_batch_size, progress
        )

        if baseline_server is not None:
            progress.set_description("batching off (MAX_BATCH_SIZE=1), then on again")
            off = asyncio.run(
                closed_loop(
                    baseline_server, payloads, saturating_clients, mode["step_s"], mode["warmup_s"]
                )
            )
            off.name = f"batch-off-{saturating_clients}"
            on_again = asyncio.run(
                closed_loop(server, payloads, saturating_clients, mode["step_s"], mode["warmup_s"])
            )
            on_again.name += "-after-batch-off"
            results["baseline"] = [asdict(off)]
            results["paired"]["saturated_after_baseline"] = asdict(on_again)
        progress.update()
    results["machine"]["busy_after_run"] = psutil.cpu_percent(interval=BUSY_SAMPLE_S) / 100
    results["memory"] = memory
    results["targets"] = targets(results, args.max_batch_size, None if args.url else args.workers)
    busy = other_load_warning(results["machine"])
    if busy is not None:
        warnings.append(busy)
    results["warnings"] = warnings

    # float32, the default, is named without a dtype part: cpu-quick, cpu-full.
    dtype_part = "" if args.dtype == "float32" else f"-{args.dtype}"
    prefix = args.out / f"{results['machine']['device']}{dtype_part}-{mode_name}"
    write_results(prefix, results)
    for target in results["targets"]:
        verdict = report.verdict(target, {True: "ok", False: "NO", None: "--"}, "??")
        unreliable = target.get("unreliable", False)
        value = (
            target["note"]
            if target.get("not_measured")
            else "no answer"
            if target["value"] is None
            else f"{target['value']:.3f}"
        )
        why = (
            f"A drifted {target['pair_drift']:.1%}"
            if target.get("pair_drift", 0.0) > MAX_PAIR_DRIFT
            else "the machine was busy"
        )
        print(
            f"{verdict:3} {target['name']}: {value} ({target['bound']})"
            + (f"; unreliable, {why}" if unreliable else "")
        )
    print(f"wrote {prefix}.json, {prefix}.md and plots")
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)  # last, where it is seen


def write_results(prefix: Path, results: dict[str, Any]) -> None:
    """The JSON, the Markdown report and the plots, named from ``prefix``. Written aside,
    then renamed in together: a run stopped as it writes (the plots take a second or two)
    leaves the previous results whole, as it says."""
    with tempfile.TemporaryDirectory(dir=prefix.parent, prefix=".writing-") as staging:
        staged = Path(staging) / prefix.name
        report.write_json(staged.with_suffix(".json"), results)
        plots = report.write_plots(staged, results)
        report.write_markdown(staged.with_suffix(".md"), results, plots)
        for written in sorted(Path(staging).iterdir()):
            written.replace(prefix.parent / written.name)


if __name__ == "__main__":
    main()
