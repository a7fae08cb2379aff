"""The whole live path, with clocks: what the scientist gets, against the solver alone.

One case: a real RunEngine runs ``fly2dpd`` over the simulated HXN Eiger and
PandA (each publishing from its own process at ``--feed-hz``, pre-encoded), a
``LivePtycho`` is subscribed (the solver in its own process, the embedded Tiled
server in its own), and this script watches:

- frames published (the simulators' counters), received and used (the session),
  dropped (published but never used);
- the solver's passes (end time and positions covered, from the solver process):
  iterations/s and position-updates/s during acquisition (first frame -> stop
  document) and after it, each against the same solver alone on the same frames,
  run after the live part in this process on the same device;
- first frame published -> first live image readable in Tiled, and last pass ->
  final result readable in Tiled (Tiled is polled over HTTP every 20 ms);
- frames behind the publisher when the scan's ``stop`` document is emitted;
- GPU busy fraction and peak GPU memory (``nvidia-smi``), peak host memory.

    PYTHONPATH=. python benchmarks/live_pipeline.py --points 64 --window 256 \
        --feed-hz 2000 500 --json live.json

Figures go to docs/benchmarks.md; ``--json`` writes one record per case.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

FINAL = {"complete", "failed", "aborted"}


class StallProbe:
    """How long a thread of this (the RunEngine's) process waits to run again after a 1 ms
    sleep: long waits mean other threads hold the GIL (or the cores are taken)."""

    def __init__(self) -> None:
        self.stalls: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stall-probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            time.sleep(0.001)
            late = time.monotonic() - t - 0.001
            if late > 0.002:
                self.stalls.append((t, late))

    def window(self, t0: float, t1: float) -> dict[str, float]:
        """Stalls between ``t0`` and ``t1``: their total and the longest (s)."""
        inside = [late for t, late in self.stalls if t0 <= t < t1]
        return {"total_s": round(sum(inside), 3), "longest_s": round(max(inside, default=0.0), 3)}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)


class GpuSampler:
    """``nvidia-smi`` every 100 ms in the background: busy fraction and memory used."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self._proc: subprocess.Popen[str] | None = None
        self._thread: threading.Thread | None = None
        if shutil.which("nvidia-smi") is None:
            return
        self._proc = subprocess.Popen(
            [
                "nvidia-smi",
                "--query-gpu=utilization.gpu,memory.used",
                "--format=csv,noheader,nounits",
                "-lms",
                "100",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            with contextlib.suppress(ValueError):
                busy, used = (float(v) for v in line.split(",")[:2])
                self.samples.append((time.monotonic(), busy, used))

    def busy(self, t0: float, t1: float) -> float | None:
        values = [b for t, b, _ in self.samples if t0 <= t <= t1]
        return round(float(np.mean(values)) / 100.0, 3) if values else None

    def peak_mib(self) -> float | None:
        return max((u for _, _, u in self.samples), default=None)

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(5)


class TiledWatcher:
    """Polls one container's metadata: when the first live image and the final result land."""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        import httpx

        self._client = httpx.Client(
            base_url=base_url,
            headers={"Authorization": f"Apikey {api_key}"} if api_key else {},
            trust_env=False,
            timeout=5.0,
        )
        self.path: str | None = None
        self.first_live: float | None = None
        self.first_nn: float | None = None
        self.final: float | None = None
        self.live_writes: list[float] = []
        self.metadata: dict[str, Any] = {}
        self._last_live_updated: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            if self.path is not None:
                with contextlib.suppress(Exception):
                    reply = self._client.get(f"/api/v1/metadata/{self.path}")
                    if reply.status_code == 200:
                        self._seen(reply.json()["data"]["attributes"]["metadata"])
            self._stop.wait(0.02)

    def _seen(self, md: dict[str, Any]) -> None:
        now = time.monotonic()
        self.metadata = md
        if md.get("nn_updated") is not None and self.first_nn is None:
            self.first_nn = now
        updated = md.get("live_updated")
        if updated is not None and updated != self._last_live_updated:
            self._last_live_updated = updated
            self.live_writes.append(now)
            if self.first_live is None:
                self.first_live = now
        if md.get("status") in FINAL and "finished" in md and self.final is None:
            self.final = now

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._client.close()


def _rates(passes: list[tuple[float, int]], t0: float, t1: float) -> dict[str, float | None]:
    inside = [(t, n) for t, n in passes if t0 < t <= t1]
    if not inside or t1 <= t0:
        return {"it_per_s": None, "positions_per_s": None, "passes": 0}
    span = t1 - t0
    return {
        "it_per_s": round(len(inside) / span, 2),
        "positions_per_s": round(sum(n for _, n in inside) / span, 1),
        "passes": len(inside),
    }


def solver_alone(capture: dict[str, Any], backend: str, seconds: float, workdir: Path) -> Any:
    """The same solver on the same frames in a fresh process of its own: passes/s at the full
    scan, with nothing else in that process (the live run's threads are not in its way)."""
    import multiprocessing

    path = workdir / "alone.npz"
    np.savez(
        path,
        amplitudes=np.concatenate(capture["amplitudes"]),
        positions=np.concatenate(capture["positions"]),
        probe=capture["probe"],
        canvas_shape=np.asarray(capture["canvas_shape"]),
    )
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(1) as pool:
        result = pool.apply(
            _solver_alone_in_process,
            (str(path), capture["params"].model_dump(mode="json"), backend, seconds),
        )
    path.unlink()
    return result


def _solver_alone_in_process(
    path: str, params: dict[str, Any], backend: str, seconds: float
) -> dict[str, Any]:
    from hxn_liveptycho.recon.backend import get_array_module
    from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver

    xp = get_array_module(backend)  # type: ignore[arg-type]
    data = np.load(path)
    amplitudes, positions = data["amplitudes"], data["positions"]
    capture = {
        "probe": data["probe"],
        "canvas_shape": tuple(int(v) for v in data["canvas_shape"]),
        "params": IterativeParams(**params),
    }
    solver = StreamingSolver(
        probe=capture["probe"],
        canvas_shape=capture["canvas_shape"],
        params=capture["params"],
        xp=xp,
        expected_positions=len(amplitudes),
    )
    solver.add(amplitudes, positions)
    solver.iterate(3)  # warm: every kernel of the pass compiled or loaded, plans made
    began = time.perf_counter()
    passes = 0
    while time.perf_counter() - began < seconds:
        solver.iterate(1)  # iterate() ends with a host sync: the pass is done
        passes += 1
    elapsed = time.perf_counter() - began
    return {
        "it_per_s": round(passes / elapsed, 2),
        "positions_per_s": round(passes * len(amplitudes) / elapsed, 1),
        "positions": len(amplitudes),
    }


def run_case(args: argparse.Namespace, feed_hz: float, mode: str, workdir: Path) -> dict[str, Any]:
    from bluesky import RunEngine

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

    beamline = SimulatedBeamline.for_window(
        args.window, x_num=args.points, y_num=args.points, photons_per_frame=args.photons
    )
    sample = SimulatedSample(beamline)
    pull = args.decode_processes > 0  # worker processes need PUSH -> PULL, as a real Eiger
    eiger = SimEiger(name="eiger2", encoding=args.encoding, socket_type="push" if pull else "pub")
    panda = SimPanda(name="panda1")
    flyer = SimHXNFlyer(eiger, panda, sample, dwell=1.0 / feed_hz)
    settings = Settings(
        eiger_endpoint=eiger.endpoint,
        panda_endpoint=panda.endpoint,
        eiger_socket="pull" if pull else "sub",
        eiger_decode_processes=args.decode_processes,
        data_dir=workdir / f"data-{int(feed_hz)}-{mode}",
        array_backend=args.backend,
        live_interval_s=args.live_interval,
        overrides={
            "roi": {"size": args.window},
            "mode": mode,
            "recon": {"algorithm": args.algorithm, "iterations": args.iterations},
        },
    )
    gpu = GpuSampler()
    stalls = StallProbe()
    began = time.monotonic()
    live = LivePtycho(settings)
    assert live.tiled is not None
    ready_s: dict[str, Any] = {}
    with contextlib.suppress(Exception):
        info = live.engine.solver_worker.info(timeout=600)
        ready_s["solver"] = round(time.monotonic() - began, 2)
        ready_s["solver_kernels_compiled_s"] = round(info.warm_s, 2)
    with contextlib.suppress(Exception):
        live.tiled.client()
        ready_s["tiled"] = round(time.monotonic() - began, 2)

    capture: dict[str, Any] = {"amplitudes": [], "positions": []}
    worker = live.engine.solver_worker
    open_run = worker.open_run

    def capturing_open_run(run_id: str, **kw: Any) -> Any:
        capture.update(probe=kw["probe"], canvas_shape=kw["canvas_shape"], params=kw["params"])
        remote = open_run(run_id, **kw)
        add = remote.add

        def capturing_add(amplitudes: np.ndarray, positions: np.ndarray) -> None:
            # By reference: the session makes a new array per batch and never changes it,
            # and a copy here would load the live path with work it does not do.
            capture["amplitudes"].append(amplitudes)
            capture["positions"].append(positions)
            add(amplitudes, positions)

        remote.add = capturing_add  # type: ignore[method-assign]
        return remote

    worker.open_run = capturing_open_run  # type: ignore[method-assign]

    RE = RunEngine({})
    RE.subscribe(live)
    stop_seen: dict[str, Any] = {}

    def on_stop(name: str, doc: dict[str, Any]) -> None:
        if name == "stop":
            stop_seen["t"] = time.monotonic()
            session = live.engine.sessions()[-1] if live.engine.sessions() else None
            if session is not None:
                passes = session.solver_passes
                stop_seen["solver_positions"] = passes[-1][1] if passes else 0
                stop_seen["frames_used"] = session.counters.get("frames_used")

    RE.subscribe(on_stop)
    assert eiger.wait_for_subscribers(max(1, args.decode_processes), timeout=30)
    assert panda.wait_for_subscribers(1, timeout=10)
    api_key = live.tiled.settings.tiled_api_key
    uri = live.tiled.uri or ""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(uri)
    key = parse_qs(parts.query).get("api_key", [None])[0] or (
        api_key.get_secret_value() if api_key else None
    )
    watcher = TiledWatcher(f"{parts.scheme}://{parts.netloc}", key)
    flyer.prepare().wait(timeout=900)  # frames simulated and encoded before the run opens

    def find_container() -> None:
        while watcher.path is None:
            for session in live.engine.sessions():
                path = session.summary().get("container_path")
                if path:
                    watcher.path = path
            time.sleep(0.01)

    threading.Thread(target=find_container, daemon=True).start()
    (uid,) = RE(fly2dpd(flyer, baseline=baseline_motors(beamline.energy_kev)))
    live.wait(timeout=args.timeout)
    deadline = time.monotonic() + 30
    while watcher.final is None and time.monotonic() < deadline:
        time.sleep(0.02)
    session = live.engine.session(uid)
    assert session is not None
    summary = session.summary()
    passes = session.solver_passes
    timeline = summary["timeline"]
    report = flyer.report.get("eiger", {})
    counters = flyer.counters["eiger"]
    published = int(report.get("frames_published", counters.get("frames_published", 0)))
    first_sent = counters.get("first_sent") or timeline.get("first_frame")
    last_sent = counters.get("last_sent")
    t_stop = stop_seen.get("t", timeline.get("data_complete", 0.0))
    t_data = timeline.get("data_complete", t_stop)
    last_pass = passes[-1][0] if passes else None
    status = live.status()
    watcher.close()
    live.close()
    for close in (eiger.close, panda.close):
        with contextlib.suppress(Exception):
            close()
    gpu_busy_during = gpu.busy(first_sent or began, t_stop)
    gpu_busy_after = gpu.busy(t_data, last_pass or t_data)
    alone = (
        solver_alone(capture, args.backend, args.alone_seconds, workdir)
        if mode != "nn" and capture["amplitudes"]
        else None
    )
    gpu.close()
    stalls.close()
    during = _rates(passes, first_sent or began, t_stop)
    after = _rates(passes, t_data, last_pass or t_data)
    frames_used = summary["counters"].get("frames_used", 0)
    nn = watcher.metadata.get("nn") or summary.get("nn") or {}
    record: dict[str, Any] = {
        "frames": published,
        "frame_shape": [args.window, args.window],
        "detector_shape": list(beamline.detector_shape),
        "feed_hz": feed_hz,
        "feed_hz_achieved": report.get("rate_hz")
        or (
            round((published - 1) / (last_sent - first_sent), 1)
            if last_sent and first_sent and published > 1
            else None
        ),
        "mode": mode,
        "algorithm": args.algorithm,
        "status": summary["status"],
        "frames_used": frames_used,
        "frames_dropped": published - frames_used,
        "frames_behind_at_stop": (
            published - stop_seen["solver_positions"] if "solver_positions" in stop_seen else None
        ),
        "first_live_image_s": (
            round(watcher.first_live - first_sent, 3) if watcher.first_live and first_sent else None
        ),
        "first_nn_image_s": (
            round(watcher.first_nn - first_sent, 3) if watcher.first_nn and first_sent else None
        ),
        "live_images_before_stop": sum(1 for t in watcher.live_writes if t <= t_stop),
        "final_after_last_iteration_s": (
            round(watcher.final - last_pass, 3) if watcher.final and last_pass else None
        ),
        "final_after_stop_s": round(watcher.final - t_stop, 3) if watcher.final else None,
        "iterations": summary["iteration"],
        "error_metric": summary["error_metric"],
        "live_during": during,
        "live_after": after,
        "alone": alone,
        "live_vs_alone_during": (
            round(during["positions_per_s"] / alone["positions_per_s"], 3)
            if alone and during["positions_per_s"]
            else None
        ),
        "live_vs_alone_after": (
            round(after["it_per_s"] / alone["it_per_s"], 3) if alone and after["it_per_s"] else None
        ),
        "gpu_busy_during": gpu_busy_during,
        "gpu_busy_after": gpu_busy_after,
        "peak_gpu_mib": gpu.peak_mib(),
        "peak_host_mib_self": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_host_mib_children": round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1
        ),
        "engine_ready_s": ready_s,
        "re_process_stalls": (
            {
                "first_2s": stalls.window(first_sent, first_sent + 2.0),
                "after_scan": stalls.window(t_data, (last_pass or t_data) + 2.0),
            }
            if first_sent
            else None
        ),
        "timeline_s": {
            k: round(v - first_sent, 3) for k, v in timeline.items() if first_sent is not None
        }
        | ({"stop_document": round(t_stop - first_sent, 3)} if first_sent else {})
        | (
            {"last_frame_published": round(last_sent - first_sent, 3)}
            if last_sent and first_sent
            else {}
        ),
        "solver_process": status.get("solver_process"),
        "nn": nn or None,
        "device": args.device or _device(),
        "date": dt.date.today().isoformat(),
    }
    return record


def _device() -> str:
    with contextlib.suppress(Exception):
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        if out:
            return f"{out.splitlines()[0]}, {os.cpu_count()} CPU cores"
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores, no GPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=64, help="scan points per side")
    parser.add_argument("--window", type=int, default=256, help="ROI edge (px)")
    parser.add_argument("--feed-hz", type=float, nargs="+", default=[2000.0, 500.0])
    parser.add_argument(
        "--mode", nargs="+", default=["iterative"], choices=["iterative", "nn", "both"]
    )
    parser.add_argument("--algorithm", default="epie", choices=["epie", "lsqml", "dm"])
    parser.add_argument("--iterations", type=int, default=100, help="passes after the scan")
    parser.add_argument("--backend", default="auto", choices=["auto", "numpy", "cupy"])
    parser.add_argument("--encoding", default="bs32-lz4<", help="Eiger v1 encoding")
    parser.add_argument(
        "--decode-processes",
        type=int,
        default=4,
        help="Eiger receiver worker processes (PUSH -> PULL); 0: one receiver in the RE process",
    )
    parser.add_argument("--photons", type=float, default=5e5)
    parser.add_argument("--live-interval", type=float, default=1.0)
    parser.add_argument("--alone-seconds", type=float, default=5.0)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--device", default=None, help="device name for the record")
    parser.add_argument("--json", type=Path, default=None, help="write the cases here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    records = []
    with tempfile.TemporaryDirectory(prefix="live-pipeline-") as tmp:
        for mode in args.mode:
            for hz in args.feed_hz:
                record = run_case(args, hz, mode, Path(tmp))
                records.append(record)
                print(json.dumps(record), flush=True)
                if args.json:
                    args.json.write_text(json.dumps(records, indent=1))
    print(
        f"\n{'mode':9} {'feed Hz':>8} {'frames':>7} {'dropped':>7} {'behind':>6} "
        f"{'1st img s':>9} {'final s':>8} {'during':>7} {'after':>6} {'it/s':>6} {'alone':>6}"
    )
    for r in records:
        alone = r["alone"] or {}
        print(
            f"{r['mode']:9} {r['feed_hz']:8.0f} {r['frames']:7d} {r['frames_dropped']:7d} "
            f"{r['frames_behind_at_stop'] if r['frames_behind_at_stop'] is not None else '-':>6} "
            f"{r['first_live_image_s'] or '-':>9} {r['final_after_last_iteration_s'] or '-':>8} "
            f"{r['live_vs_alone_during'] or '-':>7} {r['live_vs_alone_after'] or '-':>6} "
            f"{r['live_after']['it_per_s'] or '-':>6} {alone.get('it_per_s', '-'):>6}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
