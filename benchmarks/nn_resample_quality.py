"""The NN mosaic at a crop larger than the model's: crop against bin, against the native crop.

From the repository root:

    PYTHONPATH=. python benchmarks/nn_resample_quality.py [--json OUT.json] [--seeds 11,5]

Each case simulates an unseen scan (the tests' phantom: camera amplitude,
astronaut phase, never in the training set) of the same physical area,
runs the shipped 128² model through the branch (ONNX Runtime on the CPU, the
same probe estimate and blending as a live run) and scores the mosaic
against the phantom on the canvas grid: Pearson r of phase and amplitude on
the well-lit region after the one global phase offset (the card's and the
CI test's measure). Cases:

- ``128 native``: the model's own crop (14 x 14 points, step 9 px).
- ``256 same optics``: a 256² crop of the same beamline (same zone plate, so
  the bright-field disc covers the same detector pixels; same probe size on
  the sample; step 18 px of the halved pixel): what a real HXN 256² run is.
- ``256 simulator default``: ``SimulatedBeamline.for_window(256)``, whose
  zone plate scales with the crop (the disc is twice as wide in detector
  pixels: twice the numerical aperture of the 128² beamline).

each with ``crop`` (central 128², the model's object pixel), ``bin`` (2x2,
the run's pixel) and ``auto`` (what a run does: the rule whose bright-field
disc, measured on the first frames, is closest to the card's; ``bin`` says
which it took). ``band-limited r`` scores against the phantom with the
spatial frequencies beyond the model's pixel removed: the best a picture at
the model's pixel could do.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.config.nn_params import DEFAULT_MODEL
from hxn_liveptycho.nn.backends import OnnxRuntimeBackend
from hxn_liveptycho.nn.branch import NNBranch
from hxn_liveptycho.nn.registry import ModelRegistry
from hxn_liveptycho.nn.resample import InputRule
from hxn_liveptycho.recon.metrics import illuminated_mask
from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample
from hxn_liveptycho.sim.optics import make_probe


def sample_for(case: str, seed: int, points: int) -> SimulatedSample:
    if case == "128 native":
        return SimulatedSample(SimulatedBeamline(x_num=points, y_num=points, seed=seed))
    beamline = SimulatedBeamline.for_window(
        256, x_num=points, y_num=points, step_px=18.0, jitter_px=1.2, seed=seed
    )
    sample = SimulatedSample(beamline)
    if case == "256 same optics":
        # The 128² beamline's zone plate (outer radius 0.22 x 128 detector pixels) and the
        # same beam diameter on the sample (0.28 of the window, which is the same size).
        sample.probe = make_probe(
            256,
            pixel_size_m=beamline.pixel_size_m,
            wavelength_m=beamline.wavelength_m,
            outer_radius_px=0.22 * 128,
        )
    return sample


def band_limited(obj: np.ndarray, scale: int) -> np.ndarray:
    """``obj`` without the spatial frequencies a pixel ``scale`` times coarser cannot hold."""
    if scale == 1:
        return obj
    f = np.fft.fft2(obj)
    fy = np.abs(np.fft.fftfreq(obj.shape[0]))[:, None]
    fx = np.abs(np.fft.fftfreq(obj.shape[1]))[None, :]
    f[(fy > 0.5 / scale) | (fx > 0.5 / scale)] = 0
    return np.fft.ifft2(f).astype(np.complex64)


def correlations(mosaic: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    offset = np.angle(np.vdot(mosaic[mask], truth[mask]))
    phase = np.angle(mosaic * np.exp(1j * offset))[mask]
    r_phase = float(np.corrcoef(phase, np.angle(truth)[mask])[0, 1])
    r_amp = float(np.corrcoef(np.abs(mosaic)[mask], np.abs(truth)[mask])[0, 1])
    return r_phase, r_amp


def run_case(case: str, rule_name: str, seed: int, points: int, threads: int) -> dict[str, Any]:
    sample = sample_for(case, seed, points)
    n = sample.beamline.window
    model = ModelRegistry(None).get(DEFAULT_MODEL)
    rule = InputRule(n, 128, n // 128 if rule_name == "bin" else 1)
    began = time.perf_counter()
    branch = NNBranch(
        model,
        OnnxRuntimeBackend(model.path, model.io(), threads=threads),
        canvas_shape=sample.object.shape,
        window=n,
        batch_size=64,
        max_queued_frames=10_000,
        publish=lambda snapshot: None,
        interval_s=3600.0,
        footprint_px=0.28 * n,
        rule=rule,
        fit="auto" if rule_name == "auto" else None,  # auto: from the first frames' disc
    )
    branch.submit(np.sqrt(sample.intensities), sample.positions_px)
    final = branch.close(timeout=600)
    seconds = time.perf_counter() - began
    assert final is not None and final["frames"] == sample.num_points
    rule = branch.rule
    truth = sample.object
    mask = illuminated_mask(sample.positions_px, sample.probe, truth.shape)
    r_phase, r_amp = correlations(final["object"], truth, mask)
    bl_phase, bl_amp = correlations(final["object"], band_limited(truth, rule.scale), mask)
    return {
        "case": case,
        "rule": "native" if rule.identity else rule_name,
        "bin": rule.bin,
        "seed": seed,
        "frames": sample.num_points,
        "crop": n,
        "object_pixel_nm": round(sample.beamline.pixel_size_m * rule.scale * 1e9, 2),
        "phase_r": round(r_phase, 4),
        "amplitude_r": round(r_amp, 4),
        "phase_r_band_limited": round(bl_phase, 4),
        "amplitude_r_band_limited": round(bl_amp, 4),
        "mask_pixels": int(mask.sum()),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="11,5")
    parser.add_argument("--points", type=int, default=14)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        rows.append(run_case("128 native", "crop", seed, args.points, args.threads))
        for case in ("256 same optics", "256 simulator default"):
            for rule in ("crop", "bin", "auto"):
                rows.append(run_case(case, rule, seed, args.points, args.threads))
    print(
        "| case | rule | seed | object pixel (nm) | phase r | amplitude r | "
        "phase r (band-limited) | amplitude r (band-limited) |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['case']} | {r['rule']} (bin {r['bin']}) | {r['seed']} | "
            f"{r['object_pixel_nm']} | "
            f"{r['phase_r']:.3f} | {r['amplitude_r']:.3f} | {r['phase_r_band_limited']:.3f} | "
            f"{r['amplitude_r_band_limited']:.3f} |"
        )
    if args.json:
        report = {
            "benchmark": "nn_resample_quality",
            "host": platform.node(),
            "date": time.strftime("%Y-%m-%d"),
            "model": DEFAULT_MODEL,
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
