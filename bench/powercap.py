"""Benchmark 3, power cap tracking on the emulated car, at three caps and across a cap change.

The emulated module's compute power is driven by the worker's measured CPU time
(idle 4 W, full 30 W), so the governor closes its loop over real work. For each
cap: a long `burn` job runs while the worker's CPU time is sampled every 20 ms and
turned into the module's power by the emulator's own model; from that trace,
the share of 1-second windows more than 5 % above the cap, and the throughput
(rows/s) against the ideal: uncapped throughput scaled by the dynamic power the
cap allows, (cap - idle) / (full - idle). A separate run changes the cap mid-job
and measures how long until power stays within 5 % of the new cap.
"""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.daemon import Agent
from bench.agent_harness import Pusher, agent_with_pusher
from bench.common import RESULTS, write_result

SAMPLE_S = 0.02
# The emulated module (agent/vehicle/scenario.py CarModel defaults).
IDLE_W = 4.0
FULL_W = 30.0


def _set_cap(agent: Agent, cap_w: float) -> None:
    limits = agent.config.limits.model_copy(update={"power_cap_w": cap_w})
    agent.reload(agent.config.model_copy(update={"limits": limits}))


async def _run_job(
    agent: Agent, pusher: Pusher, rows: int, changes: dict[float, float] | None = None
) -> tuple[float, list[tuple[float, float, float]]]:
    """Run one burn job; returns (active seconds, trace of (t, power, cap))."""
    await pusher.burn_job(rows)
    while agent.status()["current_job"] is None:
        await asyncio.sleep(0.002)
    start = time.perf_counter()
    trace = []
    pending = dict(sorted((changes or {}).items()))
    while agent.status()["current_job"] is not None:
        t = time.perf_counter() - start
        for at in [a for a in pending if a <= t]:
            _set_cap(agent, pending.pop(at))
        cpu = agent.status()["worker"]["cpu_s"]
        if cpu is not None:
            trace.append((t, cpu, agent.config.limits.power_cap_w))
        await asyncio.sleep(SAMPLE_S)
    return time.perf_counter() - start, _to_power(trace)


def _to_power(cpu_trace: list[tuple[float, float, float]]) -> list[tuple[float, float, float]]:
    """CPU-time samples to the emulated module's power over each sample interval (exact
    averages: the same model the emulated car applies, P = idle + load * (full - idle))."""
    out = []
    for (t0, c0, _), (t1, c1, cap) in itertools.pairwise(cpu_trace):
        if t1 > t0:
            load = max(0.0, min(1.0, (c1 - c0) / (t1 - t0)))
            out.append((t1, IDLE_W + load * (FULL_W - IDLE_W), cap))
    return out


def _windows(trace: list[tuple[float, float, float]], skip_s: float) -> list[tuple[float, float]]:
    """Mean power and cap of each whole 1-second window after `skip_s`."""
    out = []
    t = skip_s
    end = trace[-1][0] if trace else 0.0
    while t + 1.0 <= end:
        window = [(p, c) for (ts, p, c) in trace if t <= ts < t + 1.0]
        if window:
            out.append((sum(p for p, _ in window) / len(window), window[-1][1]))
        t += 1.0
    return out


def _settle_s(
    trace: list[tuple[float, float, float]], change_at: float, cap: float
) -> float | None:
    """Seconds after `change_at` until the mean power since the change (over a trailing window
    of up to 1 s, at least 0.25 s) first comes within 5 % of `cap`."""
    after = [(t, p) for t, p, _ in trace if t >= change_at]
    for t, _ in after:
        if t < change_at + 0.25:
            continue
        window = [p for ts, p in after if max(change_at, t - 1.0) <= ts <= t]
        if abs(sum(window) / len(window) - cap) <= 0.05 * cap:
            return round(t - change_at, 3)
    return None


ROUNDS = 3


async def run(rows: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        async with agent_with_pusher(Path(tmp), limits="power_cap_w = 2000") as (agent, pusher):
            await _run_job(agent, pusher, 2_000)  # start the worker and its session
            uncapped_s, trace = await _run_job(agent, pusher, rows)
            full_w = sum(p for t, p, _ in trace if t > 0.5) / max(
                1, len([t for t, *_ in trace if t > 0.5])
            )
            idle_w = agent.governor.idle_w
            uncapped_rate = rows / uncapped_s
            caps = {}
            traces = {}
            # This VM's speed drifts by 20-30 % within minutes: each cap is measured in ROUNDS
            # short capped jobs, each right after a short uncapped one, and compared with the
            # uncapped jobs of the same rounds, so drift hits both sides alike.
            short = rows // ROUNDS
            for fraction in (0.35, 0.5, 0.75):
                cap = round(idle_w + fraction * (full_w - idle_w), 2)
                ref_s = capped_s = 0.0
                windows: list[tuple[float, float]] = []
                trace: list[tuple[float, float, float]] = []
                for _ in range(ROUNDS):
                    _set_cap(agent, 2000.0)
                    seconds, _ = await _run_job(agent, pusher, short)
                    ref_s += seconds
                    _set_cap(agent, cap)
                    seconds, part = await _run_job(agent, pusher, short)
                    capped_s += seconds
                    windows += _windows(part, skip_s=1.0)
                    offset = trace[-1][0] if trace else 0.0
                    trace += [(t + offset, w, c) for t, w, c in part]
                reference = short * ROUNDS / ref_s
                over = sum(1 for mean, c in windows if mean > 1.05 * c)
                ideal = reference * (cap - idle_w) / (full_w - idle_w)
                caps[f"{fraction:.2f}"] = {
                    "cap_w": cap,
                    "mean_power_w": round(sum(m for m, _ in windows) / max(1, len(windows)), 3),
                    "windows": len(windows),
                    "windows_over_5pct": over,
                    "share_over_5pct": round(over / max(1, len(windows)), 4),
                    "rows_per_s": round(short * ROUNDS / capped_s, 1),
                    "uncapped_reference_rows_per_s": round(reference, 1),
                    "ideal_rows_per_s": round(ideal, 1),
                    "throughput_vs_ideal": round(short * ROUNDS / capped_s / ideal, 4),
                }
                traces[f"{fraction:.2f}"] = trace
            _set_cap(agent, 2000.0)
            half = round(idle_w + 0.5 * (full_w - idle_w), 2)
            low = round(idle_w + 0.3 * (full_w - idle_w), 2)
            _set_cap(agent, half)
            _, step_trace = await _run_job(agent, pusher, rows, changes={6.0: low, 12.0: half})
            settle = {
                "down": _settle_s([x for x in step_trace if x[0] < 12.0], 6.0, low),
                "up": _settle_s(step_trace, 12.0, half),
            }
    _plot(traces, step_trace)
    return {
        "idle_w": round(idle_w, 3),
        "full_w": round(full_w, 3),
        "uncapped_rows_per_s": round(uncapped_rate, 1),
        "rows_per_job": rows,
        "caps": caps,
        "cap_change": {
            "from_w": half,
            "to_w": low,
            "back_w": half,
            "seconds_to_within_5pct": settle,
        },
        "targets": {
            "share_over_5pct": "< 0.01",
            "seconds_to_within_5pct": "< 2",
            "throughput_vs_ideal": ">= 0.90",
        },
    }


def _plot(
    traces: dict[str, list[tuple[float, float, float]]], step: list[tuple[float, float, float]]
) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e '.[bench]')")
        return
    fig, axes = plt.subplots(len(traces) + 1, 1, figsize=(9, 2.2 * (len(traces) + 1)), sharex=False)
    for ax, (name, trace) in zip(axes, [*traces.items(), ("cap change", step)], strict=True):
        ax.plot(
            [t for t, *_ in trace],
            [p for _, p, _ in trace],
            lw=0.3,
            color="0.7",
            label="power, 20 ms samples",
        )
        rolling = [
            (
                t,
                sum(p for ts, p, _ in trace if t - 1.0 < ts <= t)
                / max(1, sum(1 for ts, *_ in trace if t - 1.0 < ts <= t)),
            )
            for t, *_ in trace[::5]
            if t >= 1.0
        ]
        ax.plot([t for t, _ in rolling], [p for _, p in rolling], lw=1.2, label="1 s mean")
        ax.plot([t for t, *_ in trace], [c for *_, c in trace], "r--", lw=1, label="cap")
        ax.set_ylabel("W")
        ax.set_title(
            f"cap at {name} of dynamic power" if name != "cap change" else name, fontsize=9
        )
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper right", fontsize=8)
    axes[-1].set_xlabel("seconds into the job")
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    fig.savefig(RESULTS / "powercap.png", dpi=90)


def main(rows: int = 250_000) -> dict[str, Any]:
    data = asyncio.run(run(rows))
    write_result("powercap", data)
    print(
        f"\npower cap tracking (idle {data['idle_w']} W, full {data['full_w']} W, "
        f"uncapped {data['uncapped_rows_per_s']} rows/s)"
    )
    print(f"{'cap':>8}{'mean W':>9}{'windows':>9}{'>5% over':>10}{'vs ideal':>10}")
    for r in data["caps"].values():
        print(
            f"{r['cap_w']:>8.2f}{r['mean_power_w']:>9.2f}{r['windows']:>9}"
            f"{r['share_over_5pct']:>10.3f}{r['throughput_vs_ideal']:>10.3f}"
        )
    s = data["cap_change"]["seconds_to_within_5pct"]
    print(f"cap change: within 5 % of the new cap after {s['down']} s (down), {s['up']} s (up)")
    return data


if __name__ == "__main__":
    main()
