"""Benchmark outputs: JSON, a Markdown report and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use(): the backend must be chosen first

# The measurements either side of a served one may differ by this much before the ratio
# between them is flagged as unreliable.
MAX_PAIR_DRIFT = 0.05


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2) + "\n")


def _figure(value: float | None, scale: float = 1.0, places: int = 1) -> str:
    """A figure of the table; "n/a" where there is none (no answer to time, or a server given
    by URL, whose CPU and memory are out of sight)."""
    return "n/a" if value is None else f"{value / scale:.{places}f}"


def step_rows(steps: list[dict[str, Any]]) -> list[str]:
    rows = [
        "| step | offered | throughput/s | p50 ms | p90 ms | p99 ms | max ms | mean batch "
        "| errors | server CPU cores | peak worker RSS MiB | load-gen CPU cores |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    for step in steps:
        latency = step["latency_ms"]
        # Status 0: no answer at all (a connection refused or reset, or a timeout).
        errors = {
            ("no answer" if k == "0" else k): v for k, v in step["statuses"].items() if k != "200"
        }
        offered = {
            "closed": f"{step['offered']:.0f} clients",
            "spaced": f"{step['offered'] * 1000:.0f} ms apart",
        }.get(step["kind"], f"{step['offered']:.1f}/s")
        if "sent_per_s" in step["extra"]:
            # Poisson arrivals over a few seconds stray from their rate; each is sent, and
            # a load generator that falls behind sends late.
            offered += (
                f" (arrivals {step['extra']['sent_per_s']:.1f}/s, the latest sent "
                f"{step['extra']['latest_send_ms']:.0f} ms late)"
            )
        rows.append(
            f"| {step['name']} | {offered} | {step['throughput_per_s']:.1f} "
            + "".join(f"| {_figure(latency[name])} " for name in ("p50", "p90", "p99", "max"))
            + f"| {step['mean_batch_size']:.2f} "
            f"| {errors or 'none'} | {_figure(step['server_cpu_cores'], places=2)} "
            f"| {_figure(step['peak_worker_rss_bytes'], 2**20, 0)} "
            f"| {step['loadgen_cpu_cores']:.2f} |"
        )
    return rows


def verdict(target: dict[str, Any], verdicts: dict[bool | None, str], unreliable: str) -> str:
    """Met, not met or not measured; ``unreliable`` for a ratio within its bound whose A
    drifted past MAX_PAIR_DRIFT, which does not count as met."""
    if target.get("within_bound") and target.get("unreliable") and not target.get("implausible"):
        return unreliable
    return verdicts[target["met"]]


def target_rows(targets: list[dict[str, Any]]) -> list[str]:
    verdicts = {True: "yes", False: "**no**", None: "not measured"}
    return [
        f"| {target['name']} | {_figure(target['value'], places=3)} | {target['bound']} "
        f"| {verdict(target, verdicts, 'unreliable')} | {target['note']} |"
        for target in targets
    ]


def write_markdown(path: Path, results: dict[str, Any], plots: list[Path]) -> None:
    machine = results["machine"]
    limits = results["limits"]
    lines = [
        f"# Benchmark: {results['mode']} run, {machine['device']}",
        "",
        f"- command: `{results['command']}`",
        f"- date: {results['date']}",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
        f"Python {machine['python']}, torch {machine['torch']}",
        f"- server: {results['server_settings']}",
        f"- code: {results.get('commit') or 'unknown'}",
        f"- other processes' load: {_busy(machine)}",
        *(f"- **warning: {warning}**" for warning in results.get("warnings", [])),
        "",
        "## Targets",
        "",
        "Targets 1 to 4 each compare B with the mean of two measurements of A taken just",
        "before and just after it (A-B-A, see below; for target 3, A is the batching server and",
        "B the server with batching off): a drift of the machine's speed that is steady",
        "across the three cancels out; the note says how far A moved, and calls the ratio",
        f"unreliable past {MAX_PAIR_DRIFT:.0%}.",
        "",
        "| target | measured | required | met | from |",
        "| --- | ---: | ---: | --- | --- |",
    ]
    lines += target_rows(results["targets"])
    lines += [
        "",
        "## In-process limits",
        "",
        "| measure | value |",
        "| --- | ---: |",
    ]
    lines += [f"| {name} | {value:.2f} |" for name, value in limits.items()]
    lines += [
        "",
        "## Memory",
        "",
        "| measure | MiB |",
        "| --- | ---: |",
    ]
    lines += [f"| {name} | {value / 2**20:.0f} |" for name, value in results["memory"].items()]
    lines += ["", "## Load steps", "", *step_rows(results["steps"]), ""]
    lines += _low_traffic_lines(results)
    paired = results["paired"]
    pipeline_ms = paired["single_image_pipeline_ms"]
    forward = [f["forward_limit_images_per_s"] for f in paired["forward"]]
    served = [f["forward_served_images_per_s"] for f in paired["forward"]]
    paired_steps = [paired["lone_request"], paired["saturated"]]
    if "saturated_after_baseline" in paired:
        paired_steps.append(paired["saturated_after_baseline"])
    lines += [
        "## Paired measurements (A-B-A)",
        "",
        f"- in-process single-image pipeline before / after the lone-request step: "
        f"{pipeline_ms[0]:.1f} / {pipeline_ms[1]:.1f} ms",
        f"- forward-only limit (the best of plain, channels_last and served) before / after "
        f"the saturated step: {forward[0]:.1f} / {forward[1]:.1f} images/s (served network, "
        f"BatchNorm folded: {served[0]:.1f} / {served[1]:.1f})",
        "",
        *step_rows(paired_steps),
        "",
    ]
    if results.get("baseline"):
        lines += ["## Batching off (MAX_BATCH_SIZE=1)", "", *step_rows(results["baseline"]), ""]
    lines += [f"![{plot.stem}]({plot.name})" for plot in plots]
    path.write_text("\n".join(lines) + "\n")


def _busy(machine: dict[str, Any]) -> str:
    if "busy_before_run" not in machine:
        return "not measured"
    return (
        f"{machine['busy_before_run']:.0%} of the CPU busy just before the run, "
        f"{machine['busy_after_run']:.0%} just after"
    )


def _low_traffic_lines(results: dict[str, Any]) -> list[str]:
    """The spaced step beside its neighbours in time: the lone step just before it, and the
    in-process pipeline measured just after it, back to back and with the same gap."""
    steps = {step["name"]: step for step in results["steps"]}
    spaced = next((s for s in results["steps"] if s["kind"] == "spaced"), None)
    in_process = results.get("low_traffic")
    if spaced is None or in_process is None or "closed-1-after" not in steps:
        return []
    served = (
        f"{spaced['latency_ms']['p50']:.1f} ms"
        if spaced["ok"]
        else f"no answer ({spaced['statuses']})"
    )
    return [
        "## Low traffic",
        "",
        f"One request at a time, each {spaced['offered'] * 1000:.0f} ms after the previous "
        "answer, finds the model idle.",
        "",
        f"- served p50: {served} "
        "(back to back, the step before: "
        f"{_figure(steps['closed-1-after']['latency_ms']['p50'])} ms)",
        f"- in-process pipeline after the same gap: {in_process['spaced_pipeline_ms']:.1f} ms "
        f"(back to back, just before: {in_process['pipeline_ms']:.1f} ms)",
        "",
    ]


def write_plots(prefix: Path, results: dict[str, Any]) -> list[Path]:
    # The sweep's own steps, not the idle ones measured again beside others.
    closed = [s for s in results["steps"] if s["kind"] == "closed" and s["name"].count("-") == 1]
    opened = [s for s in results["steps"] if s["kind"] == "open"]

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for steps, label, marker in ((closed, "closed loop", "o"), (opened, "open loop", "s")):
        if steps:
            for quantile, line in (("p50", "-"), ("p99", "--")):
                timed = [s for s in steps if s["latency_ms"][quantile] is not None]
                axis.plot(
                    [s["throughput_per_s"] for s in timed],
                    [s["latency_ms"][quantile] for s in timed],
                    marker,
                    ls=line,
                    label=f"{label} {quantile}",
                )
    axis.set_xlabel("throughput (images/s)")
    axis.set_ylabel("latency (ms)")
    axis.set_yscale("log")
    axis.set_title("Latency versus throughput")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    latency_plot = prefix.with_name(prefix.name + "-latency.png")
    figure.tight_layout()
    figure.savefig(latency_plot, dpi=100)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(7, 4.5))
    axis.plot([s["offered"] for s in closed], [s["mean_batch_size"] for s in closed], "o-")
    axis.set_xscale("log", base=2)
    axis.set_xlabel("concurrent clients (closed loop)")
    axis.set_ylabel("mean batch size")
    axis.set_title("Batch size versus load")
    axis.grid(True, alpha=0.3)
    batch_plot = prefix.with_name(prefix.name + "-batch.png")
    figure.tight_layout()
    figure.savefig(batch_plot, dpi=100)
    plt.close(figure)
    return [latency_plot, batch_plot]
