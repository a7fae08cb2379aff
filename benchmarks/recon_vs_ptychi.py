"""Our streaming solver against pty-chi 2.2.0, on the same simulated data, in the same run.

Run on the lent GPU machine from the repository root, with the ``ptychi`` and
``pydantic`` wheels carried (see docs/benchmarks-history.md):

    PYTHONPATH=. python3 benchmarks/recon_vs_ptychi.py --positions 1024 4096 --epochs 100

Data: :class:`~hxn_liveptycho.sim.sample.SimulatedSample` with 256² frames,
a jittered raster of step 20 px (±3 px jitter), 5·10⁵ photons per frame with
Poisson noise. Both solvers start from the same probe guess and a flat object,
see every position once per epoch, keep all data on the GPU, and are timed
after a warm-up with the device synchronised. The object error is the same
metric for both (:func:`hxn_liveptycho.recon.metrics.object_error` over the
well-lit region: sub-pixel registration, phase-ramp removal, best complex scale).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np

from hxn_liveptycho.recon._modes import initial_modes
from hxn_liveptycho.recon.backend import to_host
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.recon.metrics import illuminated_mask, object_error
from hxn_liveptycho.recon.probe import initial_probe
from hxn_liveptycho.sim.sample import SimulatedBeamline, SimulatedSample

#: Which pty-chi options class matches each of our algorithms.
PTYCHI_OPTIONS = {"epie": "EPIEOptions", "dm": "DMOptions", "lsqml": "LSQMLOptions"}


def simulate(positions: int, window: int = 256) -> SimulatedSample:
    """The comparison's scan: a jittered square raster of ``positions`` frames of ``window``²;
    the step (20 px at 256²) scales with the window, as the probe's footprint does, so a
    smaller window keeps the overlap."""
    side = round(float(np.sqrt(positions)))
    step = 20.0 * window / 256
    jitter = 3.0 * window / 256
    bl = SimulatedBeamline.for_window(
        window, step_px=step, jitter_px=jitter, x_num=side, y_num=side
    )
    return SimulatedSample(bl)


def error_against(sample: SimulatedSample, obj: np.ndarray, offset: int) -> float:
    h, w = sample.object.shape
    mask = illuminated_mask(sample.positions_px, sample.probe, sample.object.shape)
    return object_error(sample.object, obj[offset : offset + h, offset : offset + w], mask)


def our_solver(
    sample: SimulatedSample, probe: np.ndarray, algorithm: str, batch: int, momentum_gain: float
) -> StreamingSolver:
    """Our solver over all of ``sample`` on CuPy, its kernels compiled and cuFFT plans made
    on a throwaway solver over a few positions (past its first probe update), so a timed
    run pays for neither."""
    import cupy as cp

    params = IterativeParams(
        algorithm=algorithm,
        batch_size=batch,
        probe_modes=probe.shape[0],
        momentum_gain=momentum_gain,
    )
    amplitudes = cp.asarray(np.sqrt(sample.intensities))
    canvas = tuple(s + 8 for s in sample.object.shape)
    scratch = StreamingSolver(probe=cp.asarray(probe), canvas_shape=canvas, params=params, xp=cp)
    scratch.add(amplitudes[:batch], sample.positions_px[:batch] + 4)
    scratch.iterate(params.probe_update_start + params.orthogonalize_every + 1)
    del scratch
    solver = StreamingSolver(probe=cp.asarray(probe), canvas_shape=canvas, params=params, xp=cp)
    solver.add(amplitudes, sample.positions_px + 4)
    return solver


def run_ours(
    sample: SimulatedSample,
    probe: np.ndarray,
    algorithm: str,
    epochs: int,
    batch: int,
    momentum_gain: float,
) -> dict:
    import cupy as cp

    solver = our_solver(sample, probe, algorithm, batch, momentum_gain)
    solver.iterate(2)
    cp.cuda.Device().synchronize()
    began = time.perf_counter()
    solver.iterate(epochs - 2)
    cp.cuda.Device().synchronize()
    seconds = (time.perf_counter() - began) / (epochs - 2)
    return {"s_per_epoch": seconds, "error": error_against(sample, to_host(solver.object), 4)}


def ours_to_error(
    sample: SimulatedSample,
    probe: np.ndarray,
    algorithm: str,
    target: float,
    max_epochs: int,
    batch: int,
    momentum_gain: float,
) -> dict:
    """Epochs and seconds our solver takes to bring its error to ``target`` (pty-chi's
    final error) or below: timed epoch by epoch, the error measured between epochs
    outside the clock. ``reached`` False if ``max_epochs`` did not get there."""
    import cupy as cp

    solver = our_solver(sample, probe, algorithm, batch, momentum_gain)
    seconds, error, epochs = 0.0, float("inf"), 0
    while epochs < max_epochs and error > target:
        cp.cuda.Device().synchronize()
        began = time.perf_counter()
        solver.iterate(1)
        cp.cuda.Device().synchronize()
        seconds += time.perf_counter() - began
        epochs += 1
        error = error_against(sample, to_host(solver.object), 4)
    return {"epochs": epochs, "seconds": seconds, "error": error, "reached": error <= target}


def ptychi_task(
    sample: SimulatedSample,
    probe: np.ndarray,
    algorithm: str,
    epochs: int,
    batch: int,
    device: str = "cuda",
) -> Any:
    """A pty-chi ``PtychographyTask`` over ``sample`` from ``probe`` (K, n, n) and a flat
    object, positions fixed, data on the device, at most ``epochs`` epochs; ``device``
    "cpu" runs it on torch's CPU build (for comparisons on a machine without a GPU)."""
    import ptychi.api as api
    import torch
    from ptychi.api.task import PtychographyTask

    options = getattr(api, PTYCHI_OPTIONS[algorithm])()
    n = sample.beamline.window
    shape = sample.object.shape
    options.data_options.data = sample.intensities
    options.data_options.save_data_on_device = device != "cpu"
    if device == "cpu":
        options.reconstructor_options.default_device = api.enums.Devices.CPU
    options.object_options.initial_guess = torch.ones((1, *shape), dtype=torch.complex64)
    options.object_options.pixel_size_m = sample.beamline.pixel_size_m
    options.probe_options.initial_guess = torch.as_tensor(probe)[None]  # (1 OPR, K, n, n)
    origin = np.round(np.asarray(shape) / 2.0) - 0.5
    centres = sample.positions_px + n / 2.0 - 0.5
    options.probe_position_options.position_y_px = centres[:, 0] - origin[0]
    options.probe_position_options.position_x_px = centres[:, 1] - origin[1]
    options.probe_position_options.optimizable = False
    options.reconstructor_options.batch_size = batch
    options.reconstructor_options.num_epochs = epochs
    return PtychographyTask(options)


def run_ptychi(
    sample: SimulatedSample, probe: np.ndarray, algorithm: str, epochs: int, batch: int
) -> dict:
    import torch

    task = ptychi_task(sample, probe, algorithm, epochs, batch)
    task.run(2)
    torch.cuda.synchronize()
    began = time.perf_counter()
    task.run(epochs - 2)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - began) / (epochs - 2)
    obj = task.get_data_to_cpu("object", as_numpy=True)[0]
    return {"s_per_epoch": seconds, "error": error_against(sample, obj, 0)}


def starting_probe(sample: SimulatedSample, modes: int) -> np.ndarray:
    """One (K, n, n) starting probe for both solvers: the modes our solver would make."""
    guess = initial_probe(np.sqrt(sample.intensities), footprint_px=3 * sample.beamline.step_px)
    return np.ascontiguousarray(initial_modes(guess.astype(np.complex64), modes, np))


def compare(
    sample: SimulatedSample,
    probe: np.ndarray,
    algorithm: str,
    epochs: int,
    batch: int,
    momentum_gain: float,
    match_error: bool = False,
) -> dict[str, Any]:
    """One row: ours and pty-chi on ``sample`` from ``probe``, seconds per epoch, final
    errors, the speed-up and, with ``match_error``, ours timed to pty-chi's final error.
    pty-chi's failure is reported in the row, our figures kept."""
    row: dict[str, Any] = {
        "positions": sample.num_points,
        "algorithm": algorithm,
        "modes": probe.shape[0],
        "batch": batch,
        "epochs": epochs,
        "momentum_gain": momentum_gain,
    }
    row["ours"] = run_ours(sample, probe, algorithm, epochs, batch, momentum_gain)
    try:
        row["ptychi"] = run_ptychi(sample, probe, algorithm, epochs, batch)
    except Exception as exc:
        row["ptychi"] = {"failed": f"{type(exc).__name__}: {exc}"}
        return row
    row["speedup"] = row["ptychi"]["s_per_epoch"] / row["ours"]["s_per_epoch"]
    if match_error:
        target = row["ptychi"]["error"]
        matched = ours_to_error(sample, probe, algorithm, target, 3 * epochs, batch, momentum_gain)
        # pty-chi's time to its final error: all its epochs.
        matched["speedup_to_equal_error"] = (
            row["ptychi"]["s_per_epoch"] * epochs / matched["seconds"]
        )
        row["ours_to_ptychi_error"] = matched
    return row


def compare_cases(
    sample: SimulatedSample,
    mode_counts: list[int],
    algorithms: list[str],
    epochs: int,
    batch: int,
    momentum_gain: float,
    match_error: bool = False,
) -> Iterator[dict[str, Any]]:
    """:func:`compare`'s rows for every mode count and algorithm on ``sample``, each as it
    ends (one starting probe per mode count, shared by the algorithms)."""
    for modes in mode_counts:
        probe = starting_probe(sample, modes)
        for algorithm in algorithms:
            yield compare(sample, probe, algorithm, epochs, batch, momentum_gain, match_error)


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as a Markdown table (and the equal-error lines, where measured)."""
    header = ["positions", "algorithm", "modes", "ours s/epoch", "pty-chi s/epoch", "speed-up"]
    print("\n| " + " | ".join([*header, "ours error", "pty-chi error"]) + " |")
    print("|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in rows:
        p = r["ptychi"]
        print(
            f"| {r['positions']} | {r['algorithm']} | {r['modes']} "
            f"| {r['ours']['s_per_epoch']:.4f} "
            f"| {p.get('s_per_epoch', nan):.4f} | {r.get('speedup', nan):.1f}x "
            f"| {r['ours']['error']:.3f} | {p.get('error', nan):.3f} |"
        )
        if "failed" in p:
            print(f"  pty-chi failed: {p['failed'][:160]}")
        if "ours_to_ptychi_error" in r:
            m = r["ours_to_ptychi_error"]
            print(
                f"  to pty-chi's error {p['error']:.3f}: ours in {m['epochs']} epochs, "
                f"{m['seconds']:.3f} s (error {m['error']:.3f}, reached {m['reached']}); "
                f"pty-chi {p['s_per_epoch'] * r['epochs']:.1f} s: "
                f"{m['speedup_to_equal_error']:.0f}x"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--algorithms", nargs="+", default=["epie"])
    parser.add_argument(
        "--epochs", type=int, default=100, help="2 warm-up epochs included, so at least 3"
    )
    parser.add_argument("--modes", type=int, nargs="+", default=[1])
    parser.add_argument("--batch", type=int, default=96)
    parser.add_argument(
        "--momentum-gain",
        type=float,
        default=IterativeParams().momentum_gain,
        help="ours (ePIE, LSQ-ML): recon.momentum_gain; 0 as before 2026-12-02",
    )
    parser.add_argument("--out", default=None, help="JSON lines, one row per case as it ends")
    parser.add_argument(
        "--match-error",
        action="store_true",
        help="also run ours until its error is pty-chi's final error or lower (at most 3x the "
        "epochs) and compare the times to that error",
    )
    args = parser.parse_args()
    if args.epochs < 3:  # two warm-up epochs, then at least one timed
        parser.error(f"--epochs must be at least 3 (2 warm-up + 1 timed), got {args.epochs}")
    rows: list[dict[str, Any]] = []
    for positions in args.positions:
        sample = simulate(positions)
        for row in compare_cases(
            sample,
            args.modes,
            args.algorithms,
            args.epochs,
            args.batch,
            args.momentum_gain,
            args.match_error,
        ):
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
    print_table(rows)


if __name__ == "__main__":
    main()
