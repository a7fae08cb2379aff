"""ePIE from the estimated starting probe, against the six footprint/sign guesses and the
true probe.

Run anywhere (NumPy), from the repository root:

    PYTHONPATH=. python benchmarks/probe_estimate.py [--side 12] [--iterations 100]
        [--json benchmarks/results/probe_estimate_cpu.json]

On the simulated HXN beamline (128² frames, 5·10⁵ photons a frame, the demo's
zone-plate probe, its beam about four steps wide) over a ``side`` x ``side``
jittered fly scan, once with the sample downstream of the focus and once
upstream (the same probe, defocus negated): the data error (``state_error``)
and the object error after ``iterations`` ePIE iterations (default settings)
started from the true probe, from the probe estimated from the data alone
(:func:`~hxn_liveptycho.recon.probe_estimate.estimate_probe`, which is given
neither footprint nor sign) and from the guess
(:func:`~hxn_liveptycho.recon.probe.initial_probe`) with a footprint of 2, 3
or 4 scan steps and either sign: the six pairs a user without the beam's
footprint and the focus's side picks from.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.recon_gpu import error_of
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.recon.probe import initial_probe
from hxn_liveptycho.recon.probe_estimate import FarFieldGeometry, estimate_probe
from hxn_liveptycho.sim.optics import make_probe
from hxn_liveptycho.sim.sample import SimulatedBeamline, SimulatedSample

FOOTPRINT_STEPS = (2.0, 3.0, 4.0)


def sample_with_sign(side: int, sign: int) -> SimulatedSample:
    """The demo sample on a ``side`` x ``side`` scan, its probe's defocus times ``sign``."""
    sample = SimulatedSample(SimulatedBeamline(x_num=side, y_num=side))
    if sign < 0:
        bl = sample.beamline
        n = bl.window
        footprint, radius = 0.28 * n, 0.22 * n  # make_probe's defaults
        defocus = footprint * n * bl.pixel_size_m**2 / (2.0 * bl.wavelength_m * radius)
        sample.probe = make_probe(
            n, pixel_size_m=bl.pixel_size_m, wavelength_m=bl.wavelength_m, defocus_m=-defocus
        )
    return sample


def errors_after(
    sample: SimulatedSample, amplitudes: np.ndarray, probe: Any, iterations: int
) -> dict[str, float]:
    canvas = tuple(s + 8 for s in sample.object.shape)
    solver = StreamingSolver(probe=probe, canvas_shape=canvas, params=IterativeParams(), xp=np)
    solver.add(amplitudes, sample.positions_px + 4)
    solver.iterate(iterations)
    return {"data_error": solver.state_error(), "object_error": error_of(sample, solver)}


def measure(side: int, iterations: int) -> list[dict[str, Any]]:
    rows = []
    for sign in (1, -1):
        sample = sample_with_sign(side, sign)
        bl = sample.beamline
        amplitudes = np.sqrt(sample.intensities).astype(np.float32)
        geometry = FarFieldGeometry(bl.wavelength_m, bl.distance_m, bl.detector_pixel_m)
        started = time.perf_counter()
        estimate = estimate_probe(amplitudes, sample.positions_px, geometry=geometry)
        seconds = time.perf_counter() - started
        row: dict[str, Any] = {
            "true_defocus_sign": sign,
            "true_footprint_px": 0.28 * bl.window,
            "step_px": bl.step_px,
            "estimate": {
                "footprint_px": estimate.footprint_px,
                "defocus_sign": estimate.defocus_sign,
                "disc_radius_px": estimate.support.radius_px,
                "true_disc_radius_px": 0.22 * bl.window,
                "trials": len(estimate.trials),
                "frames": estimate.frames_used,
                "seconds": seconds,
                **errors_after(sample, amplitudes, estimate.probe, iterations),
            },
            "true_probe": errors_after(sample, amplitudes, sample.probe, iterations),
            "guesses": {},
        }
        for steps in FOOTPRINT_STEPS:
            for guess_sign in (1, -1):
                probe = initial_probe(
                    amplitudes, footprint_px=steps * bl.step_px, defocus_sign=guess_sign
                )
                key = f"{steps:g} steps, sign {guess_sign:+d}"
                row["guesses"][key] = errors_after(sample, amplitudes, probe, iterations)
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=12, help="positions per scan row/column")
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()
    rows = measure(args.side, args.iterations)
    if args.json is not None:
        record = {
            "command": "PYTHONPATH=. python benchmarks/probe_estimate.py "
            f"--side {args.side} --iterations {args.iterations} --json {args.json}",
            "date": datetime.date.today().isoformat(),
            "device": f"CPU (NumPy {np.__version__}), {platform.machine()}",
            "frame_shape": [128, 128],
            "positions": args.side**2,
            "photons_per_frame": 5e5,
            "iterations": args.iterations,
            "rows": rows,
        }
        args.json.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
