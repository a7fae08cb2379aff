"""Where a GPU iteration's time goes: per-kernel totals and per-step timings.

Run on a CUDA machine (the lent H100), from the repository root:

    PYTHONPATH=. python benchmarks/recon_profile.py [--side 64] [--out profile.json]

Two views of the same cases (simulated HXN data, 256² frames, batch 128):

* per kernel: PyTorch's profiler (CUPTI) records every kernel the process
  launches, CuPy's and cuFFT's included; kernels are grouped by name and
  their device time per iteration is set against the wall time per
  iteration, with and without the profiler (the difference is launch and
  host overhead). The moment the host has issued the last launch
  (``recon_gpu.enqueue_clock``: ``iterate`` then reads its errors back, its one
  sync) shows whether the host keeps ahead of the GPU: close to the wall time
  means the host's Python is the limit;
* per step: each building block of a batch (an FFT pass, the window cut,
  the fused kernels) timed alone with CUDA events on one batch, with the
  bytes it must move and the bandwidth that makes.

What it tells: which steps are far from the copy bandwidth and how much of
an iteration is FFTs, which no rewrite of ours removes.
"""

from __future__ import annotations

import argparse
import collections
import json
import time
from dataclasses import replace
from typing import Any

import numpy as np

from benchmarks.recon_gpu import copy_bandwidth, enqueue_clock, make_solver
from hxn_liveptycho.recon import _fused, _fused_sums
from hxn_liveptycho.recon.iterative import IterativeParams
from hxn_liveptycho.sim.sample import SimulatedBeamline, SimulatedSample


def event_time(cp: Any, fn: Any, repeats: int = 10) -> float:
    """Seconds per call of ``fn`` on the device (after two warm-up calls)."""
    fn()
    fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    for _ in range(repeats):
        fn()
    stop.record()
    stop.synchronize()
    return cp.cuda.get_elapsed_time(start, stop) / 1e3 / repeats


def step_timings(cp: Any, batch: int, n: int, modes: int, bandwidth: float) -> list[dict]:
    """Each building block of one batch alone: seconds, bytes moved, fraction of bandwidth."""
    rng = np.random.default_rng(0)
    shape = (batch, modes, n, n)
    waves = (cp.random.random(shape, dtype=cp.float32) + 1j).astype(cp.complex64)
    waves2 = waves.copy()
    probes = waves[0].copy()
    amps = cp.random.random((4 * batch, n, n), dtype=cp.float32)
    rows = cp.asarray(rng.permutation(4 * batch)[:batch].astype(np.int64))
    side = 1536
    canvas = cp.ones((side, side), dtype=cp.complex64)
    corners = cp.asarray(rng.integers(0, side - n, size=(batch, 2)).astype(np.int32))
    frac = cp.asarray(rng.random((batch, 2)).astype(np.float32))
    num = cp.zeros((side, side), dtype=cp.complex64)
    den = cp.zeros((side, side), dtype=cp.float32)
    px = batch * n * n
    wave_px = px * modes

    def fft() -> Any:
        return cp.fft.fft2(waves, axes=(-2, -1))

    table = _fused.ramp_table(frac, n)
    power = cp.zeros((n, n), dtype=cp.float32)
    steps = [
        ("fft2 (B,K,n,n) complex64", fft, wave_px * 16),
        (
            "fft2 in chunks of 16 positions",
            lambda: [cp.fft.fft2(waves[i : i + 16], axes=(-2, -1)) for i in range(0, batch, 16)],
            wave_px * 16,
        ),
        (
            "exit waves from the canvas",
            lambda: _fused.exit_waves(canvas, corners, probes),
            px * 8 + wave_px * 8,
        ),
        (
            "modulus residual + error",
            lambda: _fused_sums.modulus_residual(waves, amps, rows, None, 1e-24, 1.0),
            wave_px * 16 + px * 4,
        ),
        (
            "window sums: num/den",
            lambda: _fused.window_sums(waves, probes, canvas, corners, num=num, den=den),
            wave_px * 8 + px * 12,
        ),
        (
            "window sums: num/den + terms + power",
            lambda: _fused.window_sums(
                waves, waves, canvas, corners, num=num, den=den, terms_channels=modes, power=power
            ),
            wave_px * 24 + px * 20,
        ),
        ("shift spectra (table)", lambda: _fused.shift_spectra(probes, table, 1.0), wave_px * 8),
        ("unshift-sum spectra", lambda: _fused.unshift_sum_spectra(waves, table), wave_px * 8),
        ("batch sum", lambda: _fused.batch_sum(waves), wave_px * 8),
        (
            "lsqml step sums",
            lambda: _fused_sums.lsqml_step_sums(
                waves, waves, waves, canvas, num, den, corners, (0, 0)
            ),
            wave_px * 24 + px * 20,
        ),
        (
            "dm fourier step",
            lambda: _fused_sums.dm_fourier_step(waves, waves2, amps, rows, None, 0.05, 1.0, 1.0),
            wave_px * 48 + px * 8,
        ),
    ]
    out = []
    for name, fn, nbytes in steps:
        seconds = event_time(cp, fn)
        out.append(
            {
                "step": name,
                "modes": modes,
                "seconds": seconds,
                "bytes": nbytes,
                "fraction_of_copy_bandwidth": nbytes / seconds / bandwidth,
            }
        )
    return out


def kernel_profile(cp: Any, solver: Any, iterations: int) -> dict:
    """Per-kernel device seconds per iteration (PyTorch profiler) and wall seconds per iteration."""
    from torch.profiler import ProfilerActivity, profile

    solver.iterate(3)
    cp.cuda.Device().synchronize()
    plain = host = 0.0
    for _ in range(3):  # the best of three: the machine's own noise inflates, never deflates
        marks: list[float] = []
        with enqueue_clock(marks):
            t0 = time.perf_counter()
            solver.iterate(iterations)
            cp.cuda.Device().synchronize()
            t2 = time.perf_counter()
        if not plain or t2 - t0 < plain * iterations:
            plain, host = (t2 - t0) / iterations, (marks[-1] - t0) / iterations
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        solver.iterate(iterations)
        cp.cuda.Device().synchronize()
        wall = (time.perf_counter() - t0) / iterations
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for evt in prof.key_averages():
        if not str(evt.device_type).endswith("CUDA"):
            continue
        micros = getattr(evt, "device_time_total", None)
        if micros is None:
            micros = getattr(evt, "cuda_time_total", 0.0)
        totals[evt.key[:90]][0] += micros / 1e6
        totals[evt.key[:90]][1] += evt.count
    kernels = sorted(
        (
            {"kernel": k, "s_per_iteration": v[0] / iterations, "calls": v[1] // iterations}
            for k, v in totals.items()
        ),
        key=lambda r: -r["s_per_iteration"],
    )
    return {
        "wall_s_per_iteration": wall,
        "unprofiled_wall_s_per_iteration": plain,
        "host_issued_s_per_iteration": host,
        "kernel_s_per_iteration": sum(k["s_per_iteration"] for k in kernels),
        "kernels": kernels[:25],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64, help="raster side: side² positions")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--algorithms", nargs="+", default=["epie", "lsqml", "dm"])
    parser.add_argument("--modes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--whole-pixel", action="store_true", help="also subpixel off")
    parser.add_argument("--no-steps", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import cupy as cp

    bandwidth = copy_bandwidth(cp)
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    report: dict[str, Any] = {"copy_bandwidth_bytes_per_s": bandwidth, "steps": [], "cases": []}
    if not args.no_steps:
        for modes in args.modes:
            for s in step_timings(cp, 128, 256, modes, bandwidth):
                report["steps"].append(s)
                print(
                    f"K={modes} {s['step']:44s} {s['seconds'] * 1e3:8.3f} ms "
                    f"{s['fraction_of_copy_bandwidth']:6.2f} of copy bw",
                    flush=True,
                )
    big = SimulatedBeamline.for_window(256, step_px=20.0, photons_per_frame=5e5)
    sample = SimulatedSample(replace(big, x_num=args.side, y_num=args.side))
    cases = [(a, m, True) for a in args.algorithms for m in args.modes]
    if args.whole_pixel:
        cases += [(a, m, False) for a in args.algorithms for m in args.modes]
    for algorithm, modes, subpixel in cases:
        params = IterativeParams(
            algorithm=algorithm, probe_modes=modes, batch_size=128, subpixel_positions=subpixel
        )
        solver = make_solver(sample, cp, params)
        prof = kernel_profile(cp, solver, args.iterations)
        prof.update(algorithm=algorithm, modes=modes, subpixel=subpixel)
        report["cases"].append(prof)
        del solver
        cp.get_default_memory_pool().free_all_blocks()
        print(
            f"\n{algorithm} K={modes} subpixel={subpixel}: wall {prof['wall_s_per_iteration']:.4f}"
            f" s/it profiled, {prof['unprofiled_wall_s_per_iteration']:.4f} s/it unprofiled"
            f" (host issued all by {prof['host_issued_s_per_iteration']:.4f}),"
            f" kernels {prof['kernel_s_per_iteration']:.4f} s/it",
            flush=True,
        )
        for k in prof["kernels"][:18]:
            print(f"  {k['s_per_iteration'] * 1e3:8.3f} ms {k['calls']:6d}x  {k['kernel']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
