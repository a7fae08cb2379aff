"""Time LivePtycho spends per document in the RunEngine's thread, next to a no-op callback.

A real RunEngine runs two kinds of scan with a real LivePtycho subscribed
(embedded Tiled, real ZMQ receivers, the reconstruction running in the same
process while the scans go on):

1. simulated HXN fly scans (``fly2dpd`` with the simulated Eiger and PandA,
   as ``liveptycho demo`` runs them): start, baseline, one event per point, stop;
2. ``bluesky.plans.count`` of an ophyd.sim detector with many events, forced
   in with ``md={"ptychography": True}`` and HXN scan metadata so that a
   session is configured for it.

Each callback is wrapped in a timer (``time.perf_counter_ns`` around the
call); a no-op callback wrapped the same way, subscribed to the same
RunEngine, is the reference. Run::

    /work/venv/bin/python benchmarks/callback_overhead.py

Target: median < 1 ms and worst < 10 ms per document.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.settings import Settings
from hxn_liveptycho.sim import (
    SimEiger,
    SimHXNFlyer,
    SimPanda,
    SimulatedBeamline,
    SimulatedSample,
    baseline_motors,
    fly2dpd,
)

TARGET_MEDIAN_MS = 1.0
TARGET_WORST_MS = 10.0


class Timed:
    """Calls ``callback`` and records the wall time of each call by (scan kind, document name)."""

    def __init__(self, callback: Callable[[str, dict[str, Any]], Any]) -> None:
        self.callback = callback
        self.phase = ""
        self.ns: dict[tuple[str, str], list[int]] = defaultdict(list)

    def __call__(self, name: str, doc: dict[str, Any]) -> None:
        began = time.perf_counter_ns()
        self.callback(name, doc)
        self.ns[(self.phase, name)].append(time.perf_counter_ns() - began)

    def all_ns(self) -> list[int]:
        return [t for times in self.ns.values() for t in times]


def cpu_name() -> str:
    """platform.processor(), or the model name from /proc/cpuinfo where that is empty (Linux)."""
    name = platform.processor()
    if not name and Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return name or "?"


def noop(name: str, doc: dict[str, Any]) -> None:
    """The reference: a callback that does nothing."""


def _stats(ns: list[int]) -> tuple[int, float, float, float]:
    """count, median, p99, max in microseconds."""
    us = np.asarray(ns, dtype=np.float64) / 1e3
    return len(ns), float(np.median(us)), float(np.percentile(us, 99)), float(us.max())


def table(live: Timed, reference: Timed) -> str:
    """A Markdown table: per document type, LivePtycho vs the no-op callback (µs)."""
    lines = [
        "| scan | document | count | LivePtycho median µs | p99 µs | max µs "
        "| no-op median µs | no-op p99 µs | no-op max µs | median ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [
        (phase, name, live.ns[(phase, name)], reference.ns.get((phase, name), []))
        for phase, name in sorted(live.ns)
    ]
    rows.append(("**all**", "**all**", live.all_ns(), reference.all_ns()))
    for phase, name, ours, theirs in rows:
        n, med, p99, worst = _stats(ours)
        _, rmed, rp99, rworst = _stats(theirs)
        lines.append(
            f"| {phase} | {name} | {n} | {med:.1f} | {p99:.1f} | {worst:.1f} "
            f"| {rmed:.2f} | {rp99:.2f} | {rworst:.2f} | {med / rmed:.0f}x |"
        )
    return "\n".join(lines)


def run(fly_scans: int, points: int, count_events: int, iterations: int) -> int:
    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd.sim import det

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="liveptycho-bench-") as tmp:
        bl = SimulatedBeamline(x_num=points, y_num=points)
        sample = SimulatedSample(bl)
        eiger, panda = SimEiger(), SimPanda()
        settings = Settings(
            eiger_endpoint=eiger.endpoint,
            panda_endpoint=panda.endpoint,
            data_dir=Path(tmp),
            array_backend="numpy",
            overrides={"recon": {"iterations": iterations}},
            stream_timeout_s=2.0,
        )
        live = LivePtycho(settings)
        RE = RunEngine({}, call_returns_result=True)
        try:
            assert live.tiled is not None
            t0 = time.monotonic()
            live.tiled.client()  # a profile loaded a while ago: Tiled is up before the scans
            eiger.publisher.wait_for_subscribers(1, timeout=10.0)
            panda.publisher.wait_for_subscribers(1, timeout=10.0)
            print(f"embedded Tiled and receivers ready in {time.monotonic() - t0:.1f} s")
            timed_live, timed_noop = Timed(live), Timed(noop)
            RE.subscribe(timed_noop)
            RE.subscribe(timed_live)
            began = time.monotonic()
            statuses = []
            for timed in (timed_live, timed_noop):
                timed.phase = f"fly2dpd {points}x{points}"
            for _ in range(fly_scans):
                flyer = SimHXNFlyer(eiger, panda, sample, dwell=0.005)
                result = RE(fly2dpd(flyer, baseline=baseline_motors(bl.energy_kev)))
                statuses.append(result.exit_status)
            count_md = {
                "ptychography": True,
                "motors": ["zpssx", "zpssy"],
                "scan": {
                    "type": "2D_FLY_PANDA",
                    "detector_distance": bl.distance_m,
                    "scan_input": [*bl.scan_input(), 0.0],
                    "detectors": ["eiger2"],
                    "energy": bl.energy_kev,
                },
            }
            for timed in (timed_live, timed_noop):
                timed.phase = f"count({count_events})"
            result = RE(count([det], num=count_events, md=count_md))
            statuses.append(result.exit_status)
            scans_s = time.monotonic() - began
            live.wait(timeout=120)
            status = live.status()
        finally:
            RE.loop.call_soon_threadsafe(RE.loop.stop)
            RE._th.join(timeout=10)
            live.close()
            eiger.close()
            panda.close()

    print()
    print(f"date: {datetime.date.today().isoformat()}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        f"device: {platform.machine()} {cpu_name()}, "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(
        f"scans: {fly_scans} x fly2dpd {points}x{points} + count({count_events}), "
        f"exit statuses {statuses}, {scans_s:.1f} s"
    )
    runs = status["runs"]
    print(
        "reconstructions: "
        + ", ".join(
            f"scan {r['scan_id']} {r['status']} ({r['positions']} positions, {r['iteration']} it)"
            for r in runs
        )
    )
    print(
        f"LivePtycho's own worst call: {status['callback']['worst_call_ms']} ms, "
        f"callback errors: {status['callback']['callback_errors']}"
    )
    print()
    print(table(timed_live, timed_noop))
    everything = timed_live.all_ns()
    median_ms = statistics.median(everything) / 1e6
    worst_ms = max(everything) / 1e6
    ok = median_ms < TARGET_MEDIAN_MS and worst_ms < TARGET_WORST_MS
    print()
    print(
        f"overall: median {median_ms * 1e3:.1f} µs (target < {TARGET_MEDIAN_MS} ms), "
        f"worst {worst_ms:.2f} ms (target < {TARGET_WORST_MS} ms): {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok and all(s == "success" for s in statuses) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fly-scans", type=int, default=3, help="simulated HXN fly scans")
    parser.add_argument("--points", type=int, default=20, help="points per axis of a fly scan")
    parser.add_argument("--count-events", type=int, default=2000, help="events of the count scan")
    parser.add_argument("--iterations", type=int, default=10, help="solver iterations after a scan")
    args = parser.parse_args(argv)
    return run(args.fly_scans, args.points, args.count_events, args.iterations)


if __name__ == "__main__":
    sys.exit(main())
