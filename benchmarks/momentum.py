"""Object error against iterations with and without momentum (``recon.momentum_gain``).

Run anywhere (NumPy), from the repository root:

    PYTHONPATH=. python benchmarks/momentum.py [--algorithms epie lsqml] [--photons 5e5 5e4]

On the simulated demo scan (400 positions of 128²) for each photon level, all
frames at once and streamed (50 frames at a time, two iterations after each,
as a live scan feeds the solver), the object error after 5, 10, 20, 40 and 60
iterations for each (gain, friction) setting, other settings at their
defaults; gain 0 is momentum off. Streamed rows have no figure (—) at the
checkpoints the stream was still running at; their last column is the error
when the last frame has arrived (iteration 16), the live image at the end of
the scan. The question it answers: how much sooner a usable image appears,
and what momentum costs at the end.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np

from benchmarks.recon_gpu import error_of, make_solver
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.recon.probe import initial_probe
from hxn_liveptycho.sim.sample import SimulatedBeamline, SimulatedSample

CHECKPOINTS = (5, 10, 20, 40, 60)
#: (gain, friction) pairs; gain 0 is momentum off.
SETTINGS = ((0.0, 0.9), (0.1, 0.9), (0.3, 0.9), (0.5, 0.7))
CHUNK, ITERATIONS_PER_CHUNK = 50, 2


def streamed_solver(sample: SimulatedSample, params: IterativeParams) -> StreamingSolver:
    """A solver fed ``sample`` in chunks, iterating between them (as ``make_solver``'s
    probe guess and canvas)."""
    amplitudes = np.sqrt(sample.intensities).astype(np.float32)
    probe = initial_probe(amplitudes, footprint_px=3 * sample.beamline.step_px)
    canvas = tuple(s + 8 for s in sample.object.shape)
    solver = StreamingSolver(probe=probe, canvas_shape=canvas, params=params, xp=np)
    for start in range(0, sample.num_points, CHUNK):
        stop = start + CHUNK
        solver.add(amplitudes[start:stop], sample.positions_px[start:stop] + 4)
        solver.iterate(ITERATIONS_PER_CHUNK)
    return solver


def errors_at_checkpoints(sample: SimulatedSample, solver: StreamingSolver) -> list[str]:
    """The object error at each checkpoint the solver has not yet passed ('—' for those it
    has: a streamed run iterates while its frames arrive)."""
    cells = []
    for checkpoint in CHECKPOINTS:
        if checkpoint < solver.iteration:
            cells.append("—")
            continue
        solver.iterate(checkpoint - solver.iteration)
        cells.append(f"{error_of(sample, solver):.4f}")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=["epie", "lsqml"])
    parser.add_argument("--photons", type=float, nargs="+", default=[5e5, 5e4])
    parser.add_argument("--modes", type=int, default=1)
    parser.add_argument(
        "--feeds", nargs="+", choices=("all", "streamed"), default=["all", "streamed"]
    )
    args = parser.parse_args()
    marks = " / ".join(str(c) for c in CHECKPOINTS)
    print(
        f"| photons | feed | algorithm | gain, friction | error at {marks} iterations "
        "| at the last frame | s |"
    )
    print("|---|---|---|---|---|---|---|")
    for photons in args.photons:
        sample = SimulatedSample(replace(SimulatedBeamline(), photons_per_frame=photons))
        for feed in args.feeds:
            for algorithm in args.algorithms:
                for gain, friction in SETTINGS:
                    params = IterativeParams(
                        algorithm=algorithm,
                        probe_modes=args.modes,
                        momentum_gain=gain,
                        momentum_friction=friction,
                    )
                    began = time.perf_counter()
                    if feed == "all":
                        solver, last_frame = make_solver(sample, np, params), "—"
                    else:
                        solver = streamed_solver(sample, params)
                        last_frame = f"{error_of(sample, solver):.4f}"
                    cells = " / ".join(errors_at_checkpoints(sample, solver))
                    seconds = time.perf_counter() - began
                    print(
                        f"| {photons:.0e} | {feed} | {algorithm} | {gain}, {friction} | {cells} "
                        f"| {last_frame} | {seconds:.0f} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
