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

    /work/venv/bin/python benchmarks/callback_overhead.py [--placement serve]

``--placement serve`` measures the other deployment: the RunEngine's process
holds only bluesky's 0MQ ``Publisher`` (what the timer wraps), and
``liveptycho serve`` runs in a subprocess behind ``bluesky-0MQ-proxy``,
receiving the same detector streams and reconstructing there.

Target: median < 1 ms and worst < 10 ms per document.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.config.settings import Settings
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class _ServeEngine:
    """``liveptycho serve`` in a subprocess; the RunEngine side is bluesky's Publisher."""

    def __init__(self, tmp: Path, eiger: Any, panda: Any, iterations: int) -> None:
        import httpx
        from bluesky.callbacks.zmq import Publisher

        port, proxy_in = _free_port(), f"tcp://127.0.0.1:{_free_port()}"
        env = {
            **os.environ,
            "LIVEPTYCHO_ARRAY_BACKEND": "numpy",
            "LIVEPTYCHO_OVERRIDES": json.dumps({"recon": {"iterations": iterations}}),
            "LIVEPTYCHO_STREAM_TIMEOUT_S": "2.0",
        }
        command = [
            *(sys.executable, "-m", "hxn_liveptycho.cli", "serve", "--port", str(port)),
            *("--proxy-in", proxy_in, "--documents", f"tcp://127.0.0.1:{_free_port()}"),
            *("--eiger", eiger.endpoint, "--panda", panda.endpoint, "--data-dir", str(tmp)),
        ]
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10.0)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if self.http.get("/api/health").status_code == 200:
                    break
            time.sleep(0.2)
        self.publisher = Publisher(proxy_in)
        while time.monotonic() < deadline:  # 0MQ's slow joiner: send until serve hears one
            self.publisher("start", {"uid": str(uuid.uuid4()), "time": time.time()})
            time.sleep(0.2)
            if self.status()["documents"]["counters"]["documents"] > 0:
                break

    def status(self) -> dict[str, Any]:
        reply = self.http.get("/api/status")
        reply.raise_for_status()
        return reply.json()

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            runs = [r for r in self.status()["runs"] if r.get("plan_name") != "ping"]
            if runs and all(r.get("finished") for r in runs):
                return
            time.sleep(0.5)

    def close(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        self.http.close()


@contextlib.contextmanager
def _engine(
    placement: str, tmp: Path, eiger: Any, panda: Any, iterations: int
) -> Iterator[tuple[Callable[[str, dict[str, Any]], Any], Callable[[], dict[str, Any]]]]:
    """(the callback the RunEngine calls, a function returning the engine's status at the end)."""
    if placement == "serve":
        serve = _ServeEngine(tmp, eiger, panda, iterations)
        try:
            eiger.publisher.wait_for_subscribers(1, timeout=10.0)
            panda.publisher.wait_for_subscribers(1, timeout=10.0)

            def finished() -> dict[str, Any]:
                serve.wait(timeout=180)
                return serve.status()

            yield serve.publisher, finished
        finally:
            serve.close()
        return
    settings = Settings(
        eiger_endpoint=eiger.endpoint,
        panda_endpoint=panda.endpoint,
        data_dir=tmp,
        array_backend="numpy",
        overrides={"recon": {"iterations": iterations}},
        stream_timeout_s=2.0,
    )
    live = LivePtycho(settings)
    try:
        assert live.tiled is not None
        live.tiled.client()  # a profile loaded a while ago: Tiled is up before the scans
        eiger.publisher.wait_for_subscribers(1, timeout=10.0)
        panda.publisher.wait_for_subscribers(1, timeout=10.0)

        def finished() -> dict[str, Any]:
            live.wait(timeout=120)
            return live.status()

        yield live, finished
    finally:
        live.close()


def run(fly_scans: int, points: int, count_events: int, iterations: int, placement: str) -> int:
    from bluesky import RunEngine
    from bluesky.plans import count
    from ophyd.sim import det

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with (
        tempfile.TemporaryDirectory(prefix="liveptycho-bench-") as tmp,
        contextlib.ExitStack() as stack,
    ):
        bl = SimulatedBeamline(x_num=points, y_num=points)
        sample = SimulatedSample(bl)
        eiger, panda = SimEiger(), SimPanda()
        stack.callback(panda.close)
        stack.callback(eiger.close)
        t0 = time.monotonic()
        callback, finished = stack.enter_context(
            _engine(placement, Path(tmp), eiger, panda, iterations)
        )
        print(f"{placement} engine, Tiled and receivers ready in {time.monotonic() - t0:.1f} s")
        RE = RunEngine({}, call_returns_result=True)
        try:
            timed_live, timed_noop = Timed(callback), Timed(noop)
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
            status = finished()
        finally:
            RE.loop.call_soon_threadsafe(RE.loop.stop)
            RE._th.join(timeout=10)

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
    runs = [r for r in status["runs"] if r.get("plan_name") != "ping"]
    print(f"placement: {placement}")
    print(
        "reconstructions: "
        + ", ".join(
            f"scan {r['scan_id']} {r['status']} ({r['positions']} positions, {r['iteration']} it)"
            for r in runs
        )
    )
    if "callback" in status:
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
    parser.add_argument(
        "--placement",
        choices=["in-process", "serve"],
        default="in-process",
        help="engine in the RunEngine's process, or `liveptycho serve` fed over 0MQ",
    )
    args = parser.parse_args(argv)
    return run(args.fly_scans, args.points, args.count_events, args.iterations, args.placement)


if __name__ == "__main__":
    sys.exit(main())
