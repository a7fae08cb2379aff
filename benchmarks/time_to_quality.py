"""Time to a trustworthy image: seconds from the first frame to an object error of 0.05 and 0.03,
our candidate schedules (frames all at once and streamed) and pty-chi 2.2.0 LSQML, one run.

Run on the lent GPU machine from the repository root, the ``ptychi`` and ``pydantic`` wheels
carried (see docs/benchmarks-history.md):

    PYTHONPATH=. python benchmarks/time_to_quality.py \
        --json benchmarks/results/time_to_quality_h200.json

Dry run on any machine (NumPy, tiny sizes, pty-chi skipped when it is not importable):

    PYTHONPATH=. python benchmarks/time_to_quality.py --backend numpy --quick --json /tmp/ttq.json

Data: :func:`benchmarks.recon_vs_ptychi.simulate`, the pty-chi comparison's scan (jittered
raster, 5·10⁵ photons per frame, Poisson noise), and its starting probe
(:func:`~benchmarks.recon_vs_ptychi.starting_probe`) and flat object for both tools. The
error is the comparison's metric (:func:`~benchmarks.recon_vs_ptychi.error_against`:
:func:`hxn_liveptycho.recon.metrics.object_error` over the well-lit region).

What is timed: from the first frame to each iteration's end, with the device synchronised
after every timed step. Ours: the solver's construction, every ``add`` (the amplitudes'
upload from the host included) and every ``iterate``. Frames arrive either all at once, or
streamed: ``--frame-rate`` frames per second in chunks of ``--chunk`` (a chunk is added once
its last frame has arrived); the solver iterates between arrivals, and waits (the wait
counted) only before the first chunk. pty-chi: its task's construction (the data handed to
it and uploaded) and every epoch. Not timed, for either tool: a warm-up before the clock
starts (a throwaway solver or task over the same data, so CUDA kernels are compiled and FFT
plans made once per process, as in a running service) and the copies of the object taken
after every iteration or epoch. The object error of those copies is evaluated after all
timed work, in a process pool (it is a host computation of seconds per copy), first on a
coarse grid of iterations and then refined between the last iteration above each target and
the first at or below it: the time to a target is the time of the first iteration found at
or below it (an earlier dip between grid points could be missed; the error falls nearly
monotonically in these runs, the curve in the JSON shows it).

The same run also records, for issue 25's "done means", the data error after
``--data-error-iterations`` iterations of ours (LSQ-ML, ``state_error()``: the returned
state's error) and of pty-chi LSQML, one and three probe modes, same data and starting
probe, both scored by one evaluator (:func:`data_error`, our forward model; pty-chi's state
at the best of a few global sub-pixel offsets, since its patch convention is its own).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import logging
import math
import multiprocessing
import os
import platform
import shlex
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from benchmarks.recon_vs_ptychi import error_against, ptychi_task, simulate, starting_probe
from hxn_liveptycho.recon.backend import to_host
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.sim.sample import SimulatedSample

log = logging.getLogger("time_to_quality")

TARGETS = (0.05, 0.03)
#: Candidate schedules of ours: name -> the IterativeParams fields (``dm-lsqml``'s schedule
#: is filled in from ``--dm-epochs`` and the run's length).
SCHEDULES: dict[str, dict[str, Any]] = {
    "epie": {"algorithm": "epie"},
    "lsqml": {"algorithm": "lsqml"},
    "dm-lsqml": {},
}
DEFAULT_CASES = ["epie:96", "epie:256", "lsqml:96", "lsqml:256", "dm-lsqml:96"]


@dataclass
class Device:
    """The array module ours runs on and how to wait for it."""

    xp: types.ModuleType
    name: str

    def sync(self) -> None:
        if self.xp is not np:
            self.xp.cuda.Device().synchronize()


@dataclass
class Trace:
    """One timed run: after each iteration, the seconds since the first frame, the
    iteration count, the frames in the solver and a host copy of the object."""

    label: str
    offset: int  # where the phantom sits in the object copies
    seconds: list[float] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)
    objects: list[np.ndarray] = field(default_factory=list)
    errors: dict[int, float] = field(default_factory=dict)  # index -> object error

    def record(self, seconds: float, frames: int, obj: np.ndarray) -> None:
        self.seconds.append(seconds)
        self.frames.append(frames)
        self.objects.append(obj)


# ---------------------------------------------------------------- the object error, in a pool
_SAMPLE: Any = None


def _pool_init(obj: np.ndarray, positions_px: np.ndarray, probe: np.ndarray) -> None:
    """A worker's read-only copy of what the metric reads of the sample (not its frames)."""
    global _SAMPLE
    _SAMPLE = types.SimpleNamespace(object=obj, positions_px=positions_px, probe=probe)


def _pool_error(obj: np.ndarray, offset: int) -> float:
    return error_against(_SAMPLE, obj, offset)


def grid(count: int, points: int) -> list[int]:
    """About ``points`` indices of ``count`` copies, denser early (where the error falls fast),
    the first and last always in."""
    if count <= points:
        return list(range(count))
    picks = np.unique(np.rint(np.geomspace(1, count, points)).astype(int) - 1)
    return sorted({0, count - 1, *picks.tolist()})


def first_crossings(trace: Trace) -> dict[float, tuple[int | None, int | None]]:
    """Per target, ``(last index known above, first index known at or below)``."""
    known = sorted(trace.errors.items())
    out: dict[float, tuple[int | None, int | None]] = {}
    for target in TARGETS:
        below = next((i for i, e in known if e <= target), None)
        above = max(
            (i for i, e in known if e > target and (below is None or i < below)), default=None
        )
        out[target] = (above, below)
    return out


def evaluate(traces: list[Trace], pool: Any, coarse_points: int, per_round: int) -> None:
    """Fill each trace's ``errors``: the coarse grid, then rounds of ``per_round`` evenly
    spaced copies inside each target's bracket until every bracket is one step wide."""
    wanted = {id(t): set(grid(len(t.objects), coarse_points)) for t in traces}
    while any(wanted.values()):
        jobs = {
            (id(t), i): pool.submit(_pool_error, t.objects[i], t.offset)
            for t in traces
            for i in sorted(wanted[id(t)] - set(t.errors))
        }
        for t in traces:
            for i in list(wanted[id(t)]):
                if (id(t), i) in jobs:
                    t.errors[i] = jobs[(id(t), i)].result()
        for t in traces:
            more: set[int] = set()
            for above, below in first_crossings(t).values():
                if above is not None and below is not None and below - above > 1:
                    inner = np.linspace(above, below, per_round + 2)[1:-1]
                    more.update(round(float(x)) for x in inner)
            wanted[id(t)] = more - set(t.errors)
        log.info("evaluated %d copies", sum(len(t.errors) for t in traces))


def summary(trace: Trace) -> dict[str, Any]:
    """Seconds (and iterations) to each target, the reason where one is null, and the curve."""
    out: dict[str, Any] = {}
    crossings = first_crossings(trace)
    for target in TARGETS:
        below = crossings[target][1]
        key = f"seconds_to_{target:g}"
        if below is None:
            lowest = min(trace.errors.values()) if trace.errors else float("nan")
            out[key] = None
            out[f"reason_{target:g}"] = (
                f"not reached in {len(trace.seconds)} iterations "
                f"({trace.seconds[-1] if trace.seconds else 0.0:.3f} s); lowest error {lowest:.4f}"
            )
        else:
            out[key] = trace.seconds[below]
            out[f"iterations_to_{target:g}"] = below + 1
    out["iterations"] = len(trace.seconds)
    out["seconds_total"] = trace.seconds[-1] if trace.seconds else 0.0
    out["final_error"] = trace.errors.get(len(trace.objects) - 1)
    out["curve"] = [
        {"iteration": i + 1, "seconds": trace.seconds[i], "frames": trace.frames[i], "error": e}
        for i, e in sorted(trace.errors.items())
    ]
    return out


# ---------------------------------------------------------------- ours
def solver_params(
    schedule: str, batch: int, modes: int, epochs: int, dm_epochs: int
) -> IterativeParams:
    fields = dict(SCHEDULES[schedule])
    if schedule == "dm-lsqml":
        dm = min(dm_epochs, epochs - 1) / epochs
        fields["schedule"] = (("dm", dm), ("lsqml", 1.0 - dm))
        fields["iterations"] = epochs
    return IterativeParams(batch_size=batch, probe_modes=modes, **fields)


def new_solver(
    sample: SimulatedSample, probe: np.ndarray, params: IterativeParams, dev: Device
) -> StreamingSolver:
    canvas = (sample.object.shape[0] + 8, sample.object.shape[1] + 8)
    return StreamingSolver(
        probe=dev.xp.asarray(probe), canvas_shape=canvas, params=params, xp=dev.xp
    )


def warm_up(
    sample: SimulatedSample,
    amplitudes: np.ndarray,
    probe: np.ndarray,
    params: IterativeParams,
    dev: Device,
) -> None:
    """Throwaway solvers over all the data, one per algorithm of ``params``, past the first
    probe update and orthogonalisation (kernels compiled, FFT plans made): what a running
    service has done before a scan starts."""
    for algorithm in sorted(params.algorithms):
        only = params.model_copy(update={"schedule": None, "algorithm": algorithm})
        scratch = new_solver(sample, probe, only, dev)
        scratch.add(amplitudes, sample.positions_px + 4)
        scratch.iterate(only.probe_update_start + only.orthogonalize_every + 3)
        dev.sync()
        del scratch


def run_ours(
    sample: SimulatedSample,
    amplitudes: np.ndarray,
    probe: np.ndarray,
    params: IterativeParams,
    dev: Device,
    *,
    epochs: int,
    max_seconds: float,
    streamed: bool,
    frame_rate: float,
    chunk: int,
    label: str,
) -> Trace:
    """Ours from the first frame, all frames at once or streamed; one copy per iteration."""
    warm_up(sample, amplitudes, probe, params, dev)
    positions = sample.positions_px + 4
    total = len(positions)
    ends = [*range(chunk, total, chunk), total] if streamed else [total]
    arrival = [(end - 1) / frame_rate if streamed else 0.0 for end in ends]
    trace = Trace(label, offset=4)
    clock = arrival[0]  # the first chunk is complete; the first frame came at 0
    began = time.perf_counter()
    solver = new_solver(sample, probe, params, dev)
    added = after_all = 0
    while after_all < epochs and not (added == len(ends) and clock >= max_seconds):
        while added < len(ends) and arrival[added] <= clock:
            start = ends[added - 1] if added else 0
            solver.add(amplitudes[start : ends[added]], positions[start : ends[added]])
            added += 1
        solver.iterate(1)
        dev.sync()
        clock += time.perf_counter() - began
        trace.record(clock, solver.n_positions, to_host(solver.object).copy())
        after_all += added == len(ends)
        began = time.perf_counter()
    return trace


def data_error(
    xp: types.ModuleType,
    obj: Any,
    probes: Any,
    positions: np.ndarray,
    amplitudes: Any,
    batch: int = 64,
    *,
    best_scale: bool = False,
) -> float:
    """``sum (|Psi| - A)^2 / sum A^2`` of one object and probe modes (K, n, n) at ``positions``
    (top-left, sub-pixel), against ``amplitudes`` (N, n, n) in FFT order: the window cut at
    the whole pixel below, the probe shifted by the fraction with a Fourier phase ramp, the
    modes summed incoherently in the unnormalised far field. Written here, not taken from
    the solver, so that it scores both tools the same way. ``best_scale``: the model's
    amplitudes first scaled by the least-squares factor (for the phantom's probe, whose
    flux the simulator set)."""
    obj = xp.asarray(obj, dtype=xp.complex64)
    spectra = xp.fft.fft2(xp.asarray(probes, dtype=xp.complex64).reshape(-1, *probes.shape[-2:]))
    n = spectra.shape[-1]
    freq = xp.fft.fftfreq(n).astype(xp.float32)
    misfit = power = model_power = overlap = 0.0
    for start in range(0, len(positions), batch):
        pos = positions[start : start + batch]
        corners = np.floor(pos).astype(int)
        frac = xp.asarray((pos - corners).astype(np.float32))
        ramps = xp.exp(
            -2j
            * math.pi
            * (
                frac[:, 0, None, None] * freq[None, :, None]
                + frac[:, 1, None, None] * freq[None, None, :]
            )
        ).astype(xp.complex64)
        probes_j = xp.fft.ifft2(spectra[None] * ramps[:, None])
        windows = xp.stack([obj[y : y + n, x : x + n] for y, x in corners])
        far = xp.fft.fft2(windows[:, None] * probes_j)
        model = xp.sqrt(xp.sum(far.real**2 + far.imag**2, axis=1))
        measured = amplitudes[start : start + batch]
        misfit += float(xp.sum((model - measured) ** 2))
        power += float(xp.sum(measured**2))
        model_power += float(xp.sum(model**2))
        overlap += float(xp.sum(model * measured))
    if best_scale:
        return (power - overlap**2 / model_power) / power
    return misfit / power


def ours_data_error(
    sample: SimulatedSample,
    amplitudes: np.ndarray,
    fft_amplitudes: Any,
    modes: int,
    dev: Device,
    iterations: int,
    batch: int,
) -> dict[str, Any]:
    probe = starting_probe(sample, modes)
    params = IterativeParams(algorithm="lsqml", batch_size=batch, probe_modes=modes)
    solver = new_solver(sample, probe, params, dev)
    solver.add(amplitudes, sample.positions_px + 4)
    solver.iterate(iterations)
    return {
        "modes": modes,
        "iterations": iterations,
        "ours_schedule": f"lsqml:{batch}, step_decay {params.step_decay:g}",
        "ours_state_error": solver.state_error(),
        "ours_running_error": solver.error,
        "ours_data_error": data_error(
            dev.xp, solver.object, solver.probe_modes, solver.positions_px, fft_amplitudes
        ),
        "ours_object_error": error_against(sample, to_host(solver.object), 4),
    }


# ---------------------------------------------------------------- pty-chi
def ptychi_available() -> str | None:
    """None if pty-chi can run here, else why not."""
    try:
        import ptychi  # noqa: F401
        import torch
    except ImportError as exc:
        return f"pty-chi not importable ({exc})"
    if not torch.cuda.is_available():
        return "pty-chi needs CUDA here (torch sees no GPU)"
    return None


def ptychi_state(task: Any) -> tuple[np.ndarray, np.ndarray]:
    obj = task.get_data_to_cpu("object", as_numpy=True)[0]
    probe = task.get_data_to_cpu("probe", as_numpy=True)[0]
    return obj, probe


def ptychi_data_error(
    xp: types.ModuleType,
    sample: SimulatedSample,
    obj: np.ndarray,
    probe: np.ndarray,
    fft_amplitudes: Any,
) -> dict[str, float]:
    """pty-chi's state under :func:`data_error`, at the best of a 3 x 3 grid of half-pixel global
    offsets of the positions (pty-chi cuts its patches by its own convention)."""
    best = (math.inf, 0.0, 0.0)
    for dy in (-0.5, 0.0, 0.5):
        for dx in (-0.5, 0.0, 0.5):
            e = data_error(xp, obj, probe, sample.positions_px + np.array([dy, dx]), fft_amplitudes)
            best = min(best, (e, dy, dx))
    return {"data_error": best[0], "offset_y_px": best[1], "offset_x_px": best[2]}


def run_ptychi(
    sample: SimulatedSample,
    probe: np.ndarray,
    epochs: int,
    batch: int,
    on_epoch: Callable[[int, Any], None] | None = None,
) -> tuple[Trace, float]:
    """pty-chi LSQML from the first frame (its task's construction timed), one copy of the
    object per epoch; ``on_epoch(epoch, task)`` runs outside the clock. Returns the trace
    and the seconds its construction took."""
    import torch

    warm = ptychi_task(sample, probe, "lsqml", 2, batch)
    warm.run(2)
    torch.cuda.synchronize()
    del warm
    trace = Trace("pty-chi lsqml", offset=0)
    began = time.perf_counter()
    task = ptychi_task(sample, probe, "lsqml", epochs, batch)
    torch.cuda.synchronize()
    clock = setup = time.perf_counter() - began
    for epoch in range(1, epochs + 1):
        began = time.perf_counter()
        task.run(1)
        torch.cuda.synchronize()
        clock += time.perf_counter() - began
        trace.record(clock, sample.num_points, task.get_data_to_cpu("object", as_numpy=True)[0])
        if on_epoch is not None:
            on_epoch(epoch, task)
    return trace, setup


def build_report(
    args: argparse.Namespace,
    common: dict[str, Any],
    runs: list[tuple[dict[str, Any], Trace]],
    ptychi_trace: Trace | None,
    ptychi_info: dict[str, Any],
    ptychi_reason: str | None,
    comparison: list[dict[str, Any]],
    scored: bool,
) -> dict[str, Any]:
    """The run's report; before the object errors are ``scored``, the timed runs' lengths only
    (written first, so that a run cut short in the scoring still leaves its timings)."""
    ptychi_summary = summary(ptychi_trace) if ptychi_trace and scored else {}
    results = []
    for case, trace in runs:
        if not scored:
            results.append({**common, **case, "iterations": len(trace.seconds)})
            results[-1]["seconds_total"] = trace.seconds[-1]
            continue
        row = {**common, **case, **summary(trace)}
        row["ptychi_seconds_to_0.03"] = ptychi_summary.get("seconds_to_0.03")
        if ptychi_trace is None:
            row["reason_ptychi"] = ptychi_reason
        elif row["ptychi_seconds_to_0.03"] is None:
            row["reason_ptychi"] = ptychi_summary.get("reason_0.03")
        elif row["seconds_to_0.03"]:
            row["ptychi_over_ours_to_0.03"] = row["ptychi_seconds_to_0.03"] / row["seconds_to_0.03"]
        results.append(row)
    ptychi = {**ptychi_info, **ptychi_summary}
    if ptychi_reason:
        ptychi["reason"] = ptychi_reason
    else:
        ptychi.update(algorithm="lsqml", batch=args.ptychi_batch, epochs=args.ptychi_epochs)
    return {
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        **common,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "timing": "from the first frame, the device synchronised after each timed step; the object "
        "copies and their error evaluation are outside the timed time, for both tools; a warm-up "
        "(kernels compiled, FFT plans made) precedes each clock",
        "object_errors_scored": scored,
        "cases": results,
        "ptychi": ptychi,
        "data_error_comparison": comparison,
    }


# ---------------------------------------------------------------- driver
def device(backend: str) -> Device:
    if backend == "numpy":
        return Device(np, f"CPU ({platform.processor() or platform.machine()}, NumPy)")
    import cupy as cp

    return Device(cp, cp.cuda.runtime.getDeviceProperties(0)["name"].decode())


def parse_case(text: str) -> tuple[str, int]:
    name, _, batch = text.partition(":")
    if name not in SCHEDULES or not batch.isdigit():
        raise argparse.ArgumentTypeError(
            f"case {text!r}: want SCHEDULE:BATCH, SCHEDULE one of {sorted(SCHEDULES)}"
        )
    return name, int(batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=1024, help="frames (a square raster)")
    parser.add_argument("--window", type=int, default=256, help="frame side in pixels")
    parser.add_argument(
        "--cases",
        type=parse_case,
        nargs="+",
        default=None,
        help=f"SCHEDULE:BATCH, SCHEDULE one of {sorted(SCHEDULES)} "
        f"(default {' '.join(DEFAULT_CASES)})",
    )
    parser.add_argument(
        "--arrivals", nargs="+", choices=("all", "streamed"), default=["all", "streamed"]
    )
    parser.add_argument(
        "--frame-rate", type=float, default=2048.0, help="streamed: frames per second"
    )
    parser.add_argument("--chunk", type=int, default=64, help="streamed: frames per arrival")
    parser.add_argument(
        "--epochs",
        type=int,
        default=400,
        help="ours: most iterations per case once every frame is in",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=3.0,
        help="ours: stop a case after this much timed time (all frames in)",
    )
    parser.add_argument(
        "--dm-epochs", type=int, default=10, help="dm-lsqml: DM's iterations before LSQ-ML"
    )
    parser.add_argument("--modes", type=int, default=1, help="probe modes of the timed cases")
    parser.add_argument(
        "--ptychi-epochs",
        type=int,
        default=150,
        help="pty-chi LSQML epochs of the timed run (0: none)",
    )
    parser.add_argument("--ptychi-batch", type=int, default=96)
    parser.add_argument(
        "--data-error-iterations",
        type=int,
        default=100,
        help="iterations of the data-error comparison (0: none)",
    )
    parser.add_argument("--data-error-modes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--eval-workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    parser.add_argument("--backend", choices=("cupy", "numpy"), default="cupy")
    parser.add_argument("--json", default=None, help="write the report here")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: 64 frames of 64², a few iterations"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.quick:
        args.positions, args.window, args.epochs, args.max_seconds = 64, 64, 20, 30.0
        args.eval_workers = min(args.eval_workers, 2)
        args.chunk, args.frame_rate = 16, 1000.0
        args.ptychi_epochs = min(args.ptychi_epochs, 8)
        args.data_error_iterations = min(args.data_error_iterations, 3)
    cases = args.cases or [parse_case(c) for c in DEFAULT_CASES]
    if args.quick and args.cases is None:
        cases = [("epie", 16), ("dm-lsqml", 16)]
    dev = device(args.backend)
    date = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    wall = time.perf_counter()

    sample = simulate(args.positions, args.window)
    amplitudes = np.sqrt(sample.intensities).astype(np.float32)
    fft_amplitudes = dev.xp.asarray(np.fft.ifftshift(amplitudes, axes=(-2, -1)))
    probe = starting_probe(sample, args.modes)
    log.info(
        "simulated %d frames of %d² in %.1f s",
        sample.num_points,
        args.window,
        time.perf_counter() - wall,
    )

    runs: list[tuple[dict[str, Any], Trace]] = []
    for schedule, batch in cases:
        params = solver_params(schedule, batch, args.modes, args.epochs, args.dm_epochs)
        for arrival in args.arrivals:
            streamed = arrival == "streamed"
            label = f"{schedule}:{batch} {arrival}"
            trace = run_ours(
                sample,
                amplitudes,
                probe,
                params,
                dev,
                epochs=args.epochs,
                max_seconds=args.max_seconds,
                streamed=streamed,
                frame_rate=args.frame_rate,
                chunk=args.chunk,
                label=label,
            )
            case = {
                "schedule": (
                    f"{schedule}, batch {batch}, momentum_gain {params.momentum_gain:g}, "
                    f"step_decay {params.step_decay:g} (floor {params.step_decay_floor:g})"
                ),
                "algorithm": schedule,
                "batch": batch,
                "modes": args.modes,
                "arrival": (
                    f"streamed: {args.frame_rate:g} frames/s in chunks of {args.chunk}"
                    if streamed
                    else "all at once"
                ),
            }
            runs.append((case, trace))
            log.info(
                "%s: %d iterations, %.3f s timed", label, len(trace.seconds), trace.seconds[-1]
            )

    comparison: list[dict[str, Any]] = []
    for modes in args.data_error_modes if args.data_error_iterations else []:
        row = ours_data_error(
            sample,
            amplitudes,
            fft_amplitudes,
            modes,
            dev,
            args.data_error_iterations,
            args.ptychi_batch,
        )
        row["truth_data_error"] = data_error(
            dev.xp,
            sample.object,
            sample.probe[None],
            sample.positions_px,
            fft_amplitudes,
            best_scale=True,
        )
        comparison.append(row)

    ptychi_reason = (
        ptychi_available() if args.ptychi_epochs else "not asked for (--ptychi-epochs 0)"
    )
    ptychi_trace: Trace | None = None
    ptychi_info: dict[str, Any] = {}
    if ptychi_reason is None:

        def record_data_error(modes: int) -> Callable[[int, Any], None]:
            def hook(epoch: int, task: Any) -> None:
                if epoch == args.data_error_iterations:
                    obj, p = ptychi_state(task)
                    row = next(r for r in comparison if r["modes"] == modes)
                    row["ptychi"] = ptychi_data_error(dev.xp, sample, obj, p, fft_amplitudes)
                    row["ptychi"]["object_error"] = error_against(sample, obj, 0)

            return hook

        try:
            ptychi_trace, setup = run_ptychi(
                sample,
                probe,
                args.ptychi_epochs,
                args.ptychi_batch,
                record_data_error(args.modes)
                if any(r["modes"] == args.modes for r in comparison)
                else None,
            )
            ptychi_info["setup_seconds"] = setup
            for row in comparison:
                if "ptychi" in row:
                    continue
                start = starting_probe(sample, row["modes"])
                run_ptychi(
                    sample,
                    start,
                    args.data_error_iterations,
                    args.ptychi_batch,
                    record_data_error(row["modes"]),
                )
        except Exception as exc:  # keep our figures
            ptychi_reason = f"pty-chi failed: {type(exc).__name__}: {exc}"
            log.exception("pty-chi failed")
    if ptychi_reason:
        log.info("pty-chi part skipped: %s", ptychi_reason)

    common: dict[str, Any] = {
        "positions": sample.num_points,
        "frame_shape": [args.window, args.window],
        "device": dev.name,
        "date": date,
    }
    if args.backend == "cupy":
        common["cupy"] = dev.xp.__version__
    for row in comparison:
        log.info(
            "data error after %d iterations, %d modes: %s",
            row["iterations"],
            row["modes"],
            json.dumps({k: v for k, v in row.items() if k not in ("iterations", "modes")}),
        )
    if args.json:
        with open(args.json, "w") as f:
            partial = build_report(
                args, common, runs, ptychi_trace, ptychi_info, ptychi_reason, comparison, False
            )
            json.dump(partial, f, indent=2)
    traces = [t for _, t in runs] + ([ptychi_trace] if ptychi_trace else [])
    log.info("timed work done at %.1f s; evaluating object errors", time.perf_counter() - wall)
    # One thread per worker: the workers fill the cores, a BLAS thread pool each would
    # oversubscribe them (the spawned workers read this at their start).
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    context = multiprocessing.get_context("spawn")
    scoring = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(
        args.eval_workers,
        mp_context=context,
        initializer=_pool_init,
        initargs=(sample.object, sample.positions_px, sample.probe),
    ) as pool:
        evaluate(
            traces,
            pool,
            coarse_points=6 if args.quick else 10,
            # Bisection where the brackets already fill the workers (the fewest copies
            # scored in all), wider rounds where they do not.
            per_round=max(1, args.eval_workers // (len(TARGETS) * max(1, len(traces)))),
        )

    report = build_report(
        args, common, runs, ptychi_trace, ptychi_info, ptychi_reason, comparison, scored=True
    )
    report["copies_scored"] = sum(len(t.errors) for t in traces)
    report["scoring_seconds"] = time.perf_counter() - scoring
    report["benchmark_wall_seconds"] = time.perf_counter() - wall
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    for row in report["cases"]:
        log.info(
            "%s | %s | to 0.05: %s s | to 0.03: %s s | pty-chi to 0.03: %s s",
            row["schedule"],
            row["arrival"],
            row["seconds_to_0.05"],
            row["seconds_to_0.03"],
            row["ptychi_seconds_to_0.03"],
        )
    log.info("done in %.1f s", report["benchmark_wall_seconds"])


if __name__ == "__main__":
    main()
