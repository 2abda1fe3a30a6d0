"""The GPU benchmark: what the model, the decoding and the served path reach on a GPU.

    python -m bench.gpu                          # float16, batches up to 256, 4 and 8 workers
    python -m bench.gpu --dtype bfloat16 --workers 8 --max-batch-size 128

It measures, on this machine:

1. the served network (BatchNorm folded, channels_last) forward-only on the GPU in
   float16 and bfloat16 (and ``--dtype``, if float32) at batches 1, 2, 4, ... up to 256: the
   model limit is the best, in ``--dtype``, up to the served maximum batch;
2. decode + resize + crop of the images on every core, a process per core: the CPU decode
   limit, which bounds a service that decodes on the CPU, as this one does;
3. the same for JPEGs with torchvision's ``decode_jpeg`` on the GPU, batched, and the resize
   and crop there too: what decoding on the GPU would allow;
4. the service started with ``DEVICE``, ``DTYPE``, ``MAX_BATCH_SIZE`` and each ``WORKERS``
   of ``--workers`` (the workers share the GPU), driven by closed-loop clients spread over
   ``--loadgen-processes`` processes (one event loop sends a few thousand requests per
   second at most);
5. the same service with the most workers and a model that answers at once
   (``bench.null_model``), at the two largest client counts: the serving path's own limit.

Target: the best served throughput at least 0.8 of the smaller of the model limit and the
CPU decode limit. Writes ``gpu.json`` and ``gpu.md`` to docs/benchmarks/.
``--device cpu`` runs the same steps on the CPU, to try the benchmark where no GPU is.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import datetime
import itertools
import multiprocessing
import shlex
import signal
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import functional as tv

from bench import report
from bench.__main__ import (
    add_images_argument,
    commit,
    exit_interrupted,
    exit_on_signal,
    jpegs_in,
    machine,
)
from bench.limits import MAX_PIXELS, timed_runs
from bench.load import closed_loop_in_processes, encode_payloads, loadgen_pool
from bench.server import ServerNotStarted, start
from classification import build_network, fold_batchnorm, preprocess
from classification.model import use_full_float32_on_cuda
from classification.preprocess import CROP_SIZE, RESIZE_SIZE
from service.settings import PROJECT_ROOT, available_cores

SERVED_TARGET = 0.8


def _timed(work: Callable[[], object], device: torch.device, seconds: float) -> float:
    """Median seconds of one call of ``work``, run for about ``seconds`` after a warm-up."""

    def synchronised() -> None:
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(3):
        synchronised()
    return statistics.median(timed_runs(synchronised, seconds))


def forward_dtypes(device: torch.device, served: str) -> list[str]:
    """The dtypes the forward-only limit is measured in: both 16-bit ones on a GPU, and the
    served one."""
    measured = ["float16", "bfloat16"] if device.type == "cuda" else []
    return measured if served in measured else [*measured, served]


def forward_images_per_s(
    device: torch.device, dtype: torch.dtype, batch_sizes: list[int], seconds: float
) -> dict[int, float]:
    """The served network's forward-only throughput at each batch size."""
    if device.type == "cuda" and dtype == torch.float32:
        use_full_float32_on_cuda()  # as the service runs DTYPE=float32: not in TF32
    network, _ = build_network("random", 1000)
    served = fold_batchnorm(network).to(device, dtype, memory_format=torch.channels_last)
    served.eval()
    found: dict[int, float] = {}
    with torch.inference_mode():
        for size in batch_sizes:
            batch = torch.randn(size, 3, CROP_SIZE, CROP_SIZE, device=device, dtype=dtype)
            batch = batch.contiguous(memory_format=torch.channels_last)
            found[size] = size / _timed(lambda batch=batch: served(batch), device, seconds)
    return found


def _decode_for(payloads: list[bytes], seconds: float) -> tuple[int, float]:
    """In one process: how many images it decoded, resized and cropped in how long."""
    started = time.perf_counter()
    for done, data in enumerate(itertools.cycle(payloads), start=1):
        preprocess(data, max_pixels=MAX_PIXELS)
        if time.perf_counter() - started >= seconds:
            return done, time.perf_counter() - started
    raise AssertionError("unreachable: the cycle is endless")


def cpu_decode_images_per_s(payloads: list[bytes], processes: int, seconds: float) -> float:
    """Decode + resize + crop on ``processes`` cores at once: their rates summed."""
    # Spawned, not forked: the parent may hold a CUDA context, which a fork cannot share.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        # A short round first, so every process has imported its libraries before timing.
        list(pool.map(_decode_for, [payloads] * processes, [0.2] * processes))
        counts = list(pool.map(_decode_for, [payloads] * processes, [seconds] * processes))
    return sum(done / elapsed for done, elapsed in counts)


def decode_on_device(encoded: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """JPEGs decoded as one batch by ``decode_jpeg`` on ``device``, resized (shorter side
    256, antialiased) and centre-cropped to 224 there: the service's crops, as (N, 224, 224,
    3) uint8, within a level or two of what ``preprocess`` makes on the CPU."""
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec's; this measures
        # torchvision's batched CUDA decoder, which the pinned release still ships.
        warnings.filterwarnings("ignore", "The image decoding", DeprecationWarning)
        images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    crops = [
        tv.center_crop(tv.resize(image, [RESIZE_SIZE], antialias=True), [CROP_SIZE])
        for image in images
    ]
    return torch.stack(crops).permute(0, 2, 3, 1)


def decodable_on_device(jpegs: list[bytes], device: torch.device) -> list[bytes]:
    """The JPEGs ``decode_on_device`` reads, each tried alone: a batched decode that meets
    one it cannot read (CMYK, 12-bit, arithmetic-coded) fails the whole batch."""
    decodable = []
    for data in jpegs:
        try:
            decode_on_device([torch.frombuffer(bytearray(data), dtype=torch.uint8)], device)
        except RuntimeError as exc:
            print(f"left out of the GPU decode: an image it cannot read ({exc})", file=sys.stderr)
        else:
            decodable.append(data)
    return decodable


def gpu_decode_images_per_s(
    jpegs: list[bytes], device: torch.device, batch_size: int, seconds: float
) -> float:
    """``decode_on_device`` throughput, in batches of ``batch_size``."""
    encoded = [
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        for data in itertools.islice(itertools.cycle(jpegs), batch_size)
    ]
    return batch_size / _timed(lambda: decode_on_device(encoded, device), device, seconds)


def served_steps(
    settings: dict[str, str],
    images: list[Path],
    clients: list[int],
    seconds: float,
    out: Path,
    loadgen_processes: int,
    app: str = "main:app",
) -> list[dict[str, Any]]:
    """The service (``app``) under closed-loop load, one step per client count."""
    payloads = encode_payloads(images)
    steps = []
    with (
        loadgen_pool(loadgen_processes) as pool,
        start(settings, out / "logs", app=app) as server,
    ):
        for count in clients:
            step = asyncio.run(
                closed_loop_in_processes(server, payloads, count, seconds, min(2.0, seconds), pool)
            )
            steps.append(asdict(step) | {"workers": int(settings["WORKERS"])})
            print(
                f"  {settings['WORKERS']} workers, {count} clients: "
                f"{step.throughput_per_s:.0f} images/s",
                file=sys.stderr,
            )
    return steps


def write_markdown(path: Path, results: dict[str, Any]) -> None:
    machine_info = results["machine"]
    limits = results["limits"]
    forward = limits["forward_images_per_s"]
    dtypes = list(forward)
    sizes = list(forward[dtypes[0]])
    forward_rows = [
        f"| {size} | " + " | ".join(f"{forward[dtype][size]:.0f}" for dtype in dtypes) + " |"
        for size in sizes
    ]
    target = results["target"]
    served_sections = []
    for workers in results["workers"]:
        steps = [step for step in results["steps"] if step["workers"] == workers]
        served_sections += [f"### {workers} workers", "", *report.step_rows(steps), ""]
    lines = [
        f"# GPU benchmark, {results['device']} ({results['dtype']})",
        "",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}; commit: {results['commit'] or 'unknown'}",
        f"- machine: {machine_info['gpu']}; {machine_info['cpu']}, {machine_info['cores']} "
        f"cores, {machine_info['memory_gib']} GiB; Python {machine_info['python']}, torch "
        f"{machine_info['torch']}",
        f"- server: {results['server_settings']}, WORKERS in {results['workers']}",
        f"- load generator: {results['loadgen_processes']} processes",
        "",
        "## Target",
        "",
        f"Best served throughput {target['served_images_per_s']:.0f} images/s against "
        f"{target['bound_images_per_s']:.0f} (the smaller of the model limit, "
        f"{limits['model_limit_images_per_s']:.0f}, and the CPU decode limit, "
        f"{limits['cpu_decode_images_per_s']:.0f}): {target['value']:.2f}, required >= "
        f"{SERVED_TARGET}: {'met' if target['met'] else 'not met'}.",
        "",
        "## In-process limits",
        "",
        f"- CPU decode + resize + crop, {limits['cpu_decode_processes']} processes: "
        f"{limits['cpu_decode_images_per_s']:.0f} images/s",
        f"- GPU decode (`decode_jpeg`, batches of {limits['gpu_decode_batch']}) + resize + "
        f"crop: {limits['gpu_decode_images_per_s']:.0f} images/s",
        "",
        "Forward-only images/s:",
        "",
        "| batch | " + " | ".join(dtypes) + " |",
        "| ---: |" + " ---: |" * len(dtypes),
        *forward_rows,
        "",
        "## Served",
        "",
        "Server CPU and load-generator CPU share the machine's cores.",
        "",
        *served_sections,
        "## Without the model",
        "",
        "The same server with the model answering at once (`bench.null_model`): what the "
        "rest of a request's path allows.",
        "",
        *report.step_rows(results["steps_without_model"]),
        "",
    ]
    path.write_text("\n".join(lines))


def _counts(text: str) -> list[int]:
    """``"4,8"`` as ``[4, 8]``, for argparse: each a positive whole number."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        message = f"{text!r} is not a comma-separated list of numbers"
        raise argparse.ArgumentTypeError(message) from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: each number must be 1 or more")
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu to try it out")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--served-batch-size", type=int, default=64, help="MAX_BATCH_SIZE")
    parser.add_argument(
        "--workers", type=_counts, default=[4, 8], help="WORKERS on the GPU, one server each"
    )
    parser.add_argument("--clients", type=_counts, default=[64, 128, 256, 512])
    parser.add_argument(
        "--loadgen-processes",
        type=int,
        default=max(1, available_cores() // 4),
        help="processes the clients are spread over (default: a quarter of the cores)",
    )
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each step")
    add_images_argument(parser)
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "docs" / "benchmarks")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; --device cpu runs the steps on the CPU")
    if device.type == "cpu" and args.dtype != "float32":
        parser.error(
            "on the CPU this benchmark runs float32: add --dtype float32 (python -m bench "
            "--dtype bfloat16 measures a CPU server in bfloat16)"
        )
    if args.loadgen_processes < 1:
        parser.error("--loadgen-processes must be 1 or more")
    try:
        images = jpegs_in(args.images)
    except ValueError as exc:
        parser.error(str(exc))
    payloads = [path.read_bytes() for path in images]
    processes = available_cores()
    batch_sizes = [2**power for power in range(args.max_batch_size.bit_length())]
    if batch_sizes[-1] != args.max_batch_size:
        batch_sizes.append(args.max_batch_size)

    print("CPU decode limit ...", file=sys.stderr)
    cpu_decode = cpu_decode_images_per_s(payloads, processes, args.seconds)
    forward = {}
    for dtype in forward_dtypes(device, args.dtype):
        print(f"forward-only limit, {dtype} ...", file=sys.stderr)
        forward[dtype] = forward_images_per_s(
            device, getattr(torch, dtype), batch_sizes, args.seconds / 8
        )
    print("GPU decode ...", file=sys.stderr)
    gpu_decode_batch = min(64, args.max_batch_size)
    decodable = decodable_on_device(payloads, device)
    if not decodable:
        parser.error(f"none of the JPEGs in {args.images} decodes on {device}")
    gpu_decode = gpu_decode_images_per_s(decodable, device, gpu_decode_batch, args.seconds)
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the served step's workers share the GPU's memory
    settings = {
        "WEIGHTS": "random",
        "DEVICE": args.device,
        "DTYPE": args.dtype,
        "MAX_BATCH_SIZE": str(args.served_batch_size),
        "MAX_QUEUE": str(max(256, 2 * max(args.clients))),
    }
    steps = []
    for workers in args.workers:
        print(f"served, {workers} workers ...", file=sys.stderr)
        steps += served_steps(
            settings | {"WORKERS": str(workers)},
            images,
            args.clients,
            args.seconds,
            args.out,
            args.loadgen_processes,
        )

    # The serving path's own limit: the same server with the model answering at once.
    print(f"served without the model, {max(args.workers)} workers ...", file=sys.stderr)
    without_model = served_steps(
        settings | {"WORKERS": str(max(args.workers))},
        images,
        sorted(args.clients)[-2:],
        args.seconds,
        args.out,
        args.loadgen_processes,
        app="bench.null_model:app",
    )

    # At the served maximum batch at most, as the service runs the model.
    model_limit = max(
        rate for size, rate in forward[args.dtype].items() if size <= args.served_batch_size
    )
    bound = min(model_limit, cpu_decode)
    served = max(step["throughput_per_s"] for step in steps)
    info = machine()
    info["device"] = str(device)
    info["gpu"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    results: dict[str, Any] = {
        "command": "python -m bench.gpu " + shlex.join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "commit": commit(),
        "device": str(device),
        "dtype": args.dtype,
        "machine": info,
        "server_settings": settings,
        "workers": args.workers,
        "loadgen_processes": args.loadgen_processes,
        "limits": {
            "forward_images_per_s": forward,
            "model_limit_images_per_s": model_limit,
            "cpu_decode_processes": processes,
            "cpu_decode_images_per_s": cpu_decode,
            "gpu_decode_batch": gpu_decode_batch,
            "gpu_decode_images_per_s": gpu_decode,
        },
        "steps": steps,
        "steps_without_model": without_model,
        "target": {
            "served_images_per_s": served,
            "bound_images_per_s": bound,
            "value": served / bound,
            "met": served / bound >= SERVED_TARGET,
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "gpu" if device.type == "cuda" else "gpu-bench-on-cpu"
    report.write_json(args.out / f"{name}.json", results)
    write_markdown(args.out / f"{name}.md", results)
    verdict = "ok" if results["target"]["met"] else "NO"
    print(f"{verdict} served / min(model, CPU decode): {served / bound:.2f} (>= {SERVED_TARGET})")
    print(f"wrote {args.out / name}.json and .md")


if __name__ == "__main__":
    # Stopped by a signal (its terminal closed too), the servers and load-generator
    # processes it started are stopped too (their context managers).
    signal.signal(signal.SIGTERM, exit_on_signal)
    signal.signal(signal.SIGHUP, exit_on_signal)
    try:
        main()
    except KeyboardInterrupt as interruption:
        exit_interrupted(
            interruption, "interrupted; the servers it started are stopped; no results written"
        )
    except ServerNotStarted as exc:
        sys.exit(f"{exc}\nno results written")
