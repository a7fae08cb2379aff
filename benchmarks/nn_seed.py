"""Does the NN mosaic, as the iterative solver's starting object, lower its early error?

From the repository root:

    PYTHONPATH=. python benchmarks/nn_seed.py [--json OUT.json] [--photons 5e5,2e4]

Each case simulates an unseen HXN-like scan at the shipped model's own crop
(128², 12 keV, 2.05 m, 75 µm; the tests' phantom, never in the training set;
step 9 px, 10 x 10 points by default), runs the shipped model over its frames
(ONNX Runtime on the CPU, the branch's own probe estimate and blending:
:class:`~hxn_liveptycho.nn.core.BranchCore`) and then the NumPy
:class:`~hxn_liveptycho.recon.iterative.StreamingSolver` (default ePIE, the
probe guessed from the data as a live run does) from different starting
objects. The score is :func:`~hxn_liveptycho.recon.metrics.object_error`
against the phantom on the well-lit region, after each pass; the time is
the solver's own (the seed's making included, the metric's excluded). The
network's time is reported apart: live, it runs beside the solver in its
own process. With ``--crop 256``: a 256² crop of the same beamline (same
zone plate and beam, step 18 px of the halved pixel), of which the model
sees the central 128² (the crop rule), its patches at twice the canvas
pixel.

All frames at once (``all``):

- ``flat``: the solver's default start, transmission 1;
- ``hard``: the scaled mosaic wherever it has any coverage, flat elsewhere;
- ``blend``: :func:`~hxn_liveptycho.recon.object_seed.seed_object`, the scaled mosaic
  weighted by its coverage up to ``full_coverage`` 1 (one patch centre);
- ``blend 3``: the same, full weight only at coverage 3;
- ``blend unscaled``: the blend of the raw mosaic (no fitted scale);
- ``unscaled x3``, ``unscaled 2 rad``: the same, of a mosaic 3 times too
  bright or 2 rad off in phase (a network normalised otherwise); fitted,
  either is ``blend`` exactly.

Streamed (``stream``): the positions arrive in chunks of ``--chunk``
frames, the solver runs ``--passes-per-chunk`` passes after each (the live
loop iterates between arrivals), then ``--tail`` passes after the last;
the mosaic is that of the frames seen so far (the branch keeps up with
the frame rate on its GPU):

- ``flat``: no seed;
- ``start``: seeded once, when the first chunk arrives;
- ``each chunk``: seeded when the first chunk arrives, then, at each
  chunk, in the region the solver has not yet lit (``current`` and
  ``solver_light`` of :func:`seed_object`);
- ``late M``: what a live run can do when the mosaic of a chunk arrives
  after the solver's first pass over it: flat at the start, then after
  each chunk's first pass the mosaic fills where the solver is still young,
  each position's light weighted by the passes it has had over ``M``
  (:func:`~hxn_liveptycho.recon.object_seed.reseed_young_region`; ``late 1``:
  only where it has had none, which after a pass is nowhere the chunk
  reached).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.config.nn_params import DEFAULT_MODEL
from hxn_liveptycho.nn.backends import OnnxRuntimeBackend
from hxn_liveptycho.nn.core import BranchCore
from hxn_liveptycho.nn.registry import ModelRegistry
from hxn_liveptycho.nn.resample import InputRule
from hxn_liveptycho.recon.backend import to_host
from hxn_liveptycho.recon.iterative import StreamingSolver
from hxn_liveptycho.recon.metrics import illuminated_mask, object_error
from hxn_liveptycho.recon.object_seed import reliability, reseed_young_region, seed_object
from hxn_liveptycho.recon.probe import initial_probe
from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample
from hxn_liveptycho.sim.optics import make_probe

MODEL_INPUT = 128  # the shipped model's crop


def footprint(crop: int) -> float:
    """The beam's footprint (canvas pixels) the run's config gives the probe guess."""
    return 0.28 * crop


def make_scan(photons: float, seed: int, points: int, crop: int) -> SimulatedSample:
    """An HXN-like scan at ``crop``: at 256², the 128² beamline's zone plate and beam (HXN's
    optics do not change with the crop), step 18 px of the halved pixel, so the same area
    as at 128² (benchmarks/nn_resample_quality.py's ``256 same optics``)."""
    if crop == MODEL_INPUT:
        beamline = SimulatedBeamline(
            x_num=points, y_num=points, seed=seed, photons_per_frame=photons
        )
        return SimulatedSample(beamline)
    factor = crop // MODEL_INPUT
    beamline = SimulatedBeamline.for_window(
        crop,
        x_num=points,
        y_num=points,
        step_px=9.0 * factor,
        jitter_px=0.6 * factor,
        seed=seed,
        photons_per_frame=photons,
    )
    sample = SimulatedSample(beamline)
    sample.probe = make_probe(
        crop,
        pixel_size_m=beamline.pixel_size_m,
        wavelength_m=beamline.wavelength_m,
        outer_radius_px=0.22 * MODEL_INPUT,
    )
    return sample


def nn_mosaics(
    sample: SimulatedSample, amplitudes: np.ndarray, chunk: int, threads: int
) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """The branch's (mosaic, coverage) after each chunk of frames, and its seconds; a larger
    crop than the model's is cropped to it (the rule ``auto`` takes for these optics)."""
    model = ModelRegistry(None).get(DEFAULT_MODEL)
    backend = OnnxRuntimeBackend(model.path, model.io(), threads=threads)
    crop = amplitudes.shape[-1]
    rule = InputRule(crop, MODEL_INPUT)
    core = BranchCore(backend, rule, canvas_shape=sample.object.shape, window=crop)
    began = time.perf_counter()
    core.probe = initial_probe(amplitudes[:chunk], footprint_px=footprint(crop))
    out = []
    for start in range(0, len(amplitudes), chunk):
        frames = rule.frames(amplitudes[start : start + chunk])
        core.process(frames, sample.positions_px[start : start + chunk])
        snap = core.snapshot()
        assert snap is not None
        out.append((snap["object"], snap["coverage"]))
    backend.close()
    return out, time.perf_counter() - began


class Trace:
    """Error against the phantom per pass, on the solver's own clock."""

    def __init__(self, sample: SimulatedSample) -> None:
        self.truth = sample.object
        self.mask = illuminated_mask(sample.positions_px, sample.probe, sample.object.shape)
        self.points: list[dict[str, Any]] = []
        self.solver_seconds = 0.0

    def timed(self, work: Callable[[], Any]) -> Any:
        began = time.perf_counter()
        result = work()
        self.solver_seconds += time.perf_counter() - began
        return result

    def record(self, solver: StreamingSolver, frames: int) -> None:
        error = object_error(self.truth, to_host(solver.object), self.mask)
        self.points.append(
            {
                "iteration": solver.iteration,
                "frames": frames,
                "seconds": round(self.solver_seconds, 3),
                "error": round(error, 4),
            }
        )


def start_object(
    variant: str, mosaic: np.ndarray, coverage: np.ndarray, shape: tuple[int, int]
) -> complex | np.ndarray:
    if variant == "flat":
        return 1.0
    if variant == "hard":
        return seed_object(mosaic, coverage, shape, full_coverage=1e-3)
    if variant == "blend":
        return seed_object(mosaic, coverage, shape, full_coverage=1.0)
    if variant == "blend 3":
        return seed_object(mosaic, coverage, shape, full_coverage=3.0)
    # A network whose scale is off: the fitted blend is the same for any complex factor
    # (seed_object undoes it), the raw one is not.
    off = {"blend unscaled": 1.0, "unscaled x3": 3.0, "unscaled 2 rad": np.exp(2j)}
    if variant in off:
        weight = reliability(coverage, 1.0)
        return (1 - weight) + weight * (off[variant] * mosaic)
    raise ValueError(variant)


def run_all(
    sample: SimulatedSample,
    amplitudes: np.ndarray,
    probe: np.ndarray,
    variant: str,
    mosaic: tuple[np.ndarray, np.ndarray],
    iterations: int,
) -> list[dict[str, Any]]:
    trace = Trace(sample)
    shape = sample.object.shape
    init = trace.timed(lambda: start_object(variant, mosaic[0], mosaic[1], shape))
    solver = trace.timed(lambda: StreamingSolver(probe=probe, canvas_shape=shape, object_init=init))
    trace.timed(lambda: solver.add(amplitudes, sample.positions_px))
    trace.record(solver, len(amplitudes))
    checkpoints = {1, 2, 3, 4, 6, 8, 12, 16, 24, 32, iterations}
    for it in range(1, iterations + 1):
        trace.timed(lambda: solver.iterate(1))
        if it in checkpoints:
            trace.record(solver, len(amplitudes))
    return trace.points


def run_stream(
    sample: SimulatedSample,
    amplitudes: np.ndarray,
    probe: np.ndarray,
    variant: str,
    mosaics: list[tuple[np.ndarray, np.ndarray]],
    chunk: int,
    passes_per_chunk: int,
    tail: int,
) -> list[dict[str, Any]]:
    trace = Trace(sample)
    shape = sample.object.shape
    positions = sample.positions_px
    late = variant.startswith("late")
    mature_passes = int(variant.split()[-1]) if late else 1
    first = "blend" if variant in ("start", "each chunk") else "flat"
    init = trace.timed(lambda: start_object(first, *mosaics[0], shape))
    solver = trace.timed(lambda: StreamingSolver(probe=probe, canvas_shape=shape, object_init=init))
    passes_seen = np.zeros(0)

    def fill_young_region(mosaic: tuple[np.ndarray, np.ndarray]) -> None:
        solver.object[...] = reseed_young_region(
            to_host(solver.object),
            *mosaic,
            positions[: len(passes_seen)],
            to_host(solver.probe),
            passes_seen,
            mature_passes=mature_passes,
        )

    def iterate(passes: int) -> None:
        nonlocal passes_seen
        trace.timed(lambda: solver.iterate(passes))
        passes_seen = passes_seen + passes

    for index, start in enumerate(range(0, len(amplitudes), chunk)):
        stop = min(start + chunk, len(amplitudes))
        if index > 0 and variant == "each chunk":
            # The mosaic of this chunk is there before the solver's next pass; fill what it
            # has not lit (its positions so far have all been iterated at least once).
            trace.timed(lambda: fill_young_region(mosaics[index]))  # noqa: B023
        trace.timed(lambda: solver.add(amplitudes[start:stop], positions[start:stop]))  # noqa: B023
        passes_seen = np.concatenate([passes_seen, np.zeros(stop - start)])
        if late:
            # The mosaic of this chunk arrives after the solver's first pass over it.
            iterate(1)
            trace.timed(lambda: fill_young_region(mosaics[index]))  # noqa: B023
            iterate(passes_per_chunk - 1)
        else:
            iterate(passes_per_chunk)
        trace.record(solver, stop)
    for it in range(1, tail + 1):
        iterate(1)
        if it in {1, 2, 4, 8, 12, 16, tail}:
            trace.record(solver, len(amplitudes))
    return trace.points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--photons", default="5e5,2e4")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--points", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=32)
    parser.add_argument("--chunk", type=int, default=20)
    parser.add_argument("--passes-per-chunk", type=int, default=2)
    parser.add_argument("--tail", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--crop", type=int, default=MODEL_INPUT, choices=(128, 256))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    cases = []
    for photons in (float(p) for p in args.photons.split(",")):
        sample = make_scan(photons, args.seed, args.points, args.crop)
        amplitudes = np.sqrt(sample.intensities)
        probe = initial_probe(amplitudes, footprint_px=footprint(args.crop))
        whole, nn_seconds = nn_mosaics(sample, amplitudes, len(amplitudes), args.threads)
        for variant in (
            "flat",
            "hard",
            "blend",
            "blend 3",
            "blend unscaled",
            "unscaled x3",
            "unscaled 2 rad",
        ):
            points = run_all(sample, amplitudes, probe, variant, whole[-1], args.iterations)
            cases.append({"photons": photons, "mode": "all", "variant": variant, "trace": points})
        mosaics, _ = nn_mosaics(sample, amplitudes, args.chunk, args.threads)
        first_probe = initial_probe(amplitudes[: args.chunk], footprint_px=footprint(args.crop))
        for variant in ("flat", "start", "each chunk", "late 1", "late 4", "late 8"):
            points = run_stream(
                sample,
                amplitudes,
                first_probe,
                variant,
                mosaics,
                args.chunk,
                args.passes_per_chunk,
                args.tail,
            )
            cases.append(
                {"photons": photons, "mode": "stream", "variant": variant, "trace": points}
            )
        cases[-1]["nn_seconds_all_frames"] = round(nn_seconds, 2)
    print_tables(cases)
    if args.json:
        report = {
            "benchmark": "nn_seed",
            "host": platform.node(),
            "date": time.strftime("%Y-%m-%d"),
            "model": DEFAULT_MODEL,
            "args": {k: v for k, v in vars(args).items() if k != "json"},
            "cases": cases,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def print_tables(cases: list[dict[str, Any]]) -> None:
    for case in cases:
        cells = ", ".join(
            f"{p['iteration']}it/{p['frames']}fr/{p['seconds']:.1f}s: {p['error']:.3f}"
            for p in case["trace"]
        )
        print(f"{case['photons']:.0e} {case['mode']:6s} {case['variant']:15s} {cells}")


if __name__ == "__main__":
    main()
