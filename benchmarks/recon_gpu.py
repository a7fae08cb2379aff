"""Streaming ePIE on the GPU: NumPy ⇄ CuPy parity, seconds per iteration, and the memory floor.

Run on a CUDA machine (the lent H100), from the repository root:

    PYTHONPATH=. python benchmarks/recon_gpu.py [--out results.json]

For each case (simulated HXN data: defocused zone-plate probe, phantom
object, jittered raster, Poisson noise) it times iterations of
``StreamingSolver`` on CuPy after a warm-up, reports the peak GPU memory of
the solver, and the memory-traffic floor of one iteration (each frame read
once plus the object and probe patches read and written once, at the copy
bandwidth measured in the same run). On the demo-sized case it also runs the
same iterations on NumPy and reports the relative difference between the two
objects and both object errors against the phantom.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from typing import Any

import numpy as np

from hxn_liveptycho.recon.backend import to_host
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.recon.metrics import illuminated_mask, object_error
from hxn_liveptycho.recon.probe import initial_probe
from hxn_liveptycho.sim.sample import SimulatedBeamline, SimulatedSample


def copy_bandwidth(cp: Any) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = cp.random.random(256 * 1024 * 1024 // 8)  # 256 MiB of float64
    dst = cp.empty_like(src)
    for _ in range(3):
        dst[...] = src
    cp.cuda.Device().synchronize()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    repeats = 20
    for _ in range(repeats):
        dst[...] = src
    stop.record()
    stop.synchronize()
    seconds = cp.cuda.get_elapsed_time(start, stop) / 1e3
    return 2 * src.nbytes * repeats / seconds


def make_solver(sample: SimulatedSample, xp: Any, params: IterativeParams) -> StreamingSolver:
    bl = sample.beamline
    amplitudes = np.sqrt(sample.intensities).astype(np.float32)
    step = bl.step_px
    probe = initial_probe(amplitudes, footprint_px=3 * step)
    canvas = tuple(s + 8 for s in sample.object.shape)
    solver = StreamingSolver(probe=xp.asarray(probe), canvas_shape=canvas, params=params, xp=xp)
    solver.add(xp.asarray(amplitudes), sample.positions_px + 4)
    return solver


def error_of(sample: SimulatedSample, solver: StreamingSolver) -> float:
    obj = to_host(solver.object)
    h, w = sample.object.shape
    mask = illuminated_mask(sample.positions_px, sample.probe, sample.object.shape)
    return object_error(sample.object, obj[4 : 4 + h, 4 : 4 + w], mask)


def floor_bytes(n_frames: int, window: int) -> int:
    """Fewest bytes one iteration moves: frames read once; object+probe patches read and written."""
    frames = n_frames * window * window * 4
    patches = n_frames * window * window * 8 * 2
    return frames + patches


def run_case(cp: Any, name: str, bl: SimulatedBeamline, iterations: int, parity: bool) -> dict:
    began = time.perf_counter()
    sample = SimulatedSample(bl)
    simulated_s = time.perf_counter() - began
    params = IterativeParams(batch_size=256 if bl.window <= 128 else 128)
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    cp.cuda.Device().synchronize()
    solver = make_solver(sample, cp, params)
    solver.iterate(3)  # warm-up: kernels compiled, cuFFT plans made
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    solver.iterate(iterations)
    cp.cuda.Device().synchronize()
    per_iteration = (time.perf_counter() - t0) / iterations
    result = {
        "case": name,
        "frames": sample.num_points,
        "window": bl.window,
        "canvas": list(solver.object.shape),
        "simulate_s": round(simulated_s, 1),
        "gpu_s_per_iteration": per_iteration,
        "gpu_peak_pool_bytes": int(pool.total_bytes()),
        "floor_bytes": floor_bytes(sample.num_points, bl.window),
    }
    solver.iterate(max(0, 100 - iterations - 3))
    result["gpu_object_error_100"] = error_of(sample, solver)
    if parity:
        cpu = make_solver(sample, np, params)
        gpu = make_solver(sample, cp, params)
        t0 = time.perf_counter()
        cpu.iterate(20)
        result["cpu_s_per_iteration"] = (time.perf_counter() - t0) / 20
        gpu.iterate(20)
        a, b = to_host(cpu.object), to_host(gpu.object)
        result["parity_rel_diff_20"] = float(np.linalg.norm(a - b) / np.linalg.norm(a))
        result["parity_error_numpy_20"] = error_of(sample, cpu)
        result["parity_error_cupy_20"] = error_of(sample, gpu)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    import cupy as cp

    bandwidth = copy_bandwidth(cp)
    demo = SimulatedBeamline()
    big = replace(demo, window=256, step_px=20.0, photons_per_frame=5e5)
    cases = [
        ("demo 20x20, 128^2", demo, True),
        ("1024 frames, 256^2", replace(big, x_num=32, y_num=32), True),
        ("4096 frames, 256^2", replace(big, x_num=64, y_num=64), False),
    ]
    results = []
    for name, bl, parity in cases:
        r = run_case(cp, name, bl, args.iterations, parity)
        r["floor_s"] = r["floor_bytes"] / bandwidth
        r["ratio_to_floor"] = r["gpu_s_per_iteration"] / r["floor_s"]
        results.append(r)
        print(json.dumps(r), flush=True)
    props = cp.cuda.runtime.getDeviceProperties(0)
    report = {
        "device": props["name"].decode(),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "cupy": cp.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "results": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\ndevice {report['device']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print("| case | GPU s/iter | CPU s/iter | floor s | ratio | peak pool GiB | err@100 | parity |")
    print("|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in results:
        cells = [
            r["case"],
            f"{r['gpu_s_per_iteration']:.4f}",
            f"{r.get('cpu_s_per_iteration', nan):.3f}",
            f"{r['floor_s']:.5f}",
            f"{r['ratio_to_floor']:.0f}x",
            f"{r['gpu_peak_pool_bytes'] / 2**30:.2f}",
            f"{r['gpu_object_error_100']:.3f}",
            f"{r.get('parity_rel_diff_20', nan):.1e}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
