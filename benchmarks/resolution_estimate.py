"""The half-set FRC resolution estimate against the true resolution, on simulated scans.

Run from the repository root, on any machine (NumPy):

    PYTHONPATH=. python benchmarks/resolution_estimate.py [--photons 300 3000] \
        [--iterations 10 30 100] [--json results.json]

For each photon level it simulates one jittered raster (zone-plate probe,
phantom object, Poisson noise), reconstructs it with one
:class:`~hxn_liveptycho.recon.iterative.StreamingSolver` on all frames and a
:class:`~hxn_liveptycho.recon.resolution.HalfSets` on the two interleaved
halves, and after each iteration count reports the half-set estimate
(:meth:`HalfSets.estimate`) and the true resolution, the full
reconstruction's FRC against the phantom over the well-lit region
(:func:`~hxn_liveptycho.recon.resolution.resolution_against_reference`),
both as half-periods at the half-bit threshold, and their ratio. An
estimate of "<= pixel" means the FRC never crossed the threshold below
Nyquist.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.recon.iterative import StreamingSolver
from hxn_liveptycho.recon.metrics import illuminated_mask
from hxn_liveptycho.recon.resolution import HalfSets, resolution_against_reference
from hxn_liveptycho.sim import optics, phantom


def simulate(photons: float, *, frame: int, side: int, step_px: float) -> dict[str, Any]:
    """One raster of ``side`` x ``side`` frames of ``frame``² at ``photons`` per frame."""
    lam = optics.wavelength_m(12.0)
    pixel_m = optics.sample_pixel_size_m(lam, 0.5, frame, 75e-6)
    probe = optics.make_probe(frame, pixel_size_m=pixel_m, wavelength_m=lam, rng=1)
    positions = phantom.scan_positions(side, side, step_px, jitter_px=0.5, rng=2) + 4
    top = positions.max(axis=0)
    canvas = (int(top[0]) + frame + 6, int(top[1]) + frame + 6)
    obj = phantom.make_object(canvas)
    intensities = phantom.simulate_diffraction(
        obj, probe, positions, photons_per_frame=photons, rng=3
    )
    return {
        "pixel_m": pixel_m,
        "probe": probe,
        "positions": positions,
        "canvas": canvas,
        "object": obj,
        "amplitudes": np.sqrt(intensities),
        "mask": illuminated_mask(positions, probe, canvas),
    }


def run_level(photons: float, iterations: list[int], args: argparse.Namespace) -> list[dict]:
    """Rows (one per iteration count) for one photon level."""
    scan = simulate(photons, frame=args.frame, side=args.side, step_px=args.step)
    full = StreamingSolver(probe=scan["probe"], canvas_shape=scan["canvas"])
    halves = HalfSets(probe=scan["probe"], canvas_shape=scan["canvas"])
    full.add(scan["amplitudes"], scan["positions"])
    counts = halves.add(scan["amplitudes"], scan["positions"])
    rows, done = [], 0
    for total in sorted(iterations):
        full.iterate(total - done)
        halves.iterate(total - done)
        done = total
        start = time.perf_counter()
        estimate = halves.estimate(scan["pixel_m"])
        seconds = time.perf_counter() - start
        truth = resolution_against_reference(
            scan["object"], full.object, scan["pixel_m"], scan["mask"]
        )
        est, true = estimate.half_period_nm, truth.half_period_nm
        rows.append(
            {
                "photons_per_frame": photons,
                "iterations": total,
                "estimate_half_period_nm": est,
                "true_half_period_nm": true,
                "ratio": None if est is None or true is None else est / true,
                "pixel_nm": scan["pixel_m"] * 1e9,
                "half_set_positions": list(counts),
                "estimate_seconds": seconds,
            }
        )
    return rows


def _nm(value: float | None) -> str:
    return "<= pixel" if value is None else f"{value:.1f}"


def print_table(rows: list[dict]) -> None:
    print("| photons/frame | iterations | half-set estimate nm | true nm | ratio |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        print(
            f"| {row['photons_per_frame']:.0e} | {row['iterations']} | "
            f"{_nm(row['estimate_half_period_nm'])} | {_nm(row['true_half_period_nm'])} | "
            f"{ratio} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photons", type=float, nargs="+", default=[1e2, 3e2, 1e3, 3e3, 1e4])
    parser.add_argument("--iterations", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--frame", type=int, default=64, help="frame side, pixels")
    parser.add_argument("--side", type=int, default=15, help="raster points per side")
    parser.add_argument("--step", type=float, default=5.0, help="raster step, pixels")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    rows = [row for photons in args.photons for row in run_level(photons, args.iterations, args)]
    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "device": f"CPU (NumPy), {platform.processor() or platform.machine()}",
        "frame_shape": [args.frame, args.frame],
        "positions": args.side * args.side,
        "step_px": args.step,
        "threshold": "half-bit (van Heel & Schatz 2005), both estimate and truth",
        "reported": "half-period 1 / (2 f) at the first crossing",
        "rows": rows,
    }
    print(f"date: {report['date']}\ncommand: {report['command']}\ndevice: {report['device']}")
    print(f"{report['positions']} positions of {args.frame}², step {args.step} px\n")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
