"""The solver on the GPU: NumPy ⇄ CuPy parity, seconds per iteration, memory and the floor.

Run on a CUDA machine (the lent H200), from the repository root:

    PYTHONPATH=. python benchmarks/recon_gpu.py [--out results.json]

For each case (simulated HXN data: defocused zone-plate probe, phantom
object, jittered raster, Poisson noise; ePIE, LSQ-ML and DM with 1 and 3
probe modes at 1,024 and 4,096 positions of 256²) it times iterations of
``StreamingSolver`` on CuPy after a warm-up, with the fused kernels
(`StreamingSolver(fused=None)`) and, for one mode, without them; reports
CuPy's memory pool after the run (an upper bound of the peak), the peak of bytes in
use over a second, untimed run (:func:`peak_used_bytes`) and the solver's own
estimate, and the memory-traffic floors of one iteration at the
copy bandwidth measured in the same run (:func:`floor_bytes`). On the
demo-sized cases it also runs the same iterations on NumPy and reports the
relative difference between the two objects and both object errors. With
``--ptychi-epochs N`` it then runs ours and pty-chi 2.2.0 (its wheel carried) for N
epochs on each big case's own data, every algorithm and mode count, and reports both
seconds per epoch and both final errors (:func:`benchmarks.recon_vs_ptychi.compare_cases`).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import platform
import time
from dataclasses import replace
from typing import Any

import numpy as np

from benchmarks.recon_vs_ptychi import compare_cases, print_table
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


def save_report(
    cp: Any,
    bandwidth: float,
    results: list[dict],
    out: str | None,
    ptychi: list[dict] | None = None,
) -> dict:
    """The run's report (device, copy rate, versions, results and the pty-chi rows, if
    any), written to ``out`` as JSON when given; prints the device line."""
    report = {
        "device": cp.cuda.runtime.getDeviceProperties(0)["name"].decode(),
        "copy_bandwidth_bytes_per_s": bandwidth,
        "cupy": cp.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "results": results,
        "ptychi": ptychi or [],
    }
    if out:
        with open(out, "w") as f:
            json.dump(report, f, indent=2)
    print(f"\ndevice {report['device']}, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    return report


def make_solver(
    sample: SimulatedSample, xp: Any, params: IterativeParams, *, fused: bool | None = None
) -> StreamingSolver:
    bl = sample.beamline
    amplitudes = np.sqrt(sample.intensities).astype(np.float32)
    step = bl.step_px
    probe = initial_probe(amplitudes, footprint_px=3 * step)
    canvas = tuple(s + 8 for s in sample.object.shape)
    solver = StreamingSolver(
        probe=xp.asarray(probe), canvas_shape=canvas, params=params, xp=xp, fused=fused
    )
    solver.add(xp.asarray(amplitudes), sample.positions_px + 4)
    return solver


def parity_sample(window: int = 128, photons: float | None = None) -> SimulatedSample:
    """The parity cases' scan: the demo's (400 positions of 128²) or, ``window`` 256, 144
    positions of 256²; ``photons`` per frame replaces the sample's 5e5."""
    demo = SimulatedBeamline()
    beamline = (
        SimulatedBeamline.for_window(256, step_px=20.0, photons_per_frame=5e5, x_num=12, y_num=12)
        if window == 256
        else demo
    )
    if photons is not None:
        beamline = replace(beamline, photons_per_frame=photons)
    return SimulatedSample(beamline)


def error_of(sample: SimulatedSample, solver: StreamingSolver) -> float:
    obj = to_host(solver.object)
    h, w = sample.object.shape
    mask = illuminated_mask(sample.positions_px, sample.probe, sample.object.shape)
    return object_error(sample.object, obj[4 : 4 + h, 4 : 4 + w], mask)


def floor_bytes(
    n_frames: int, window: int, modes: int, algorithm: str = "epie", subpixel: bool = False
) -> dict[str, int]:
    """Memory-traffic floors of one iteration, in bytes.

    ``data``: each frame read once, object and probe patches read and written
    once (complex64). ``with_ffts``: plus each exit wave (per mode) written
    once, and read and written once by each of the two FFTs (what any FFT-based
    ptychography iteration moves at least). ``algorithm``: ``with_ffts`` plus the
    passes this algorithm cannot do without, each FFT again counted as one read
    and one write of its input: with sub-pixel positions the per-position probe
    shift (its spectra written, one inverse FFT) and, for the probe update, the
    shift back (the terms written, one FFT); LSQ-ML's step-length fit and
    weighted object sum (the exit-wave update read twice more) and, sub-pixel,
    the shift of its probe step; DM's stored waves (read and written) and its
    probe pass (the waves read, one inverse FFT; sub-pixel, K + 1 terms
    written and transformed).
    """
    pix = n_frames * window * window
    data = pix * 4 + pix * 8 * 2
    wave = pix * modes * 8
    with_ffts = data + wave * (1 + 2 + 2)
    extra = 0
    if subpixel:
        extra += 3 * wave  # shifted spectra written, one inverse FFT
    if algorithm in ("epie", "lsqml") and subpixel:
        extra += 3 * wave  # probe terms written, one FFT, for the shift back
    if algorithm == "lsqml":
        extra += 2 * wave + (3 * wave if subpixel else 0)
    if algorithm == "dm":
        extra += 2 * wave + 3 * wave
        if subpixel:
            extra += 3 * pix * (modes + 1) * 8
    return {"data": data, "with_ffts": with_ffts, "algorithm": with_ffts + extra}


def peak_used_bytes(cp: Any, solver: StreamingSolver, iterations: int) -> tuple[int, int]:
    """``(resident, peak)``: the bytes ``solver``'s arrays hold in CuPy's pool before it
    iterates, and the most its arrays and temporaries held at once over ``iterations``
    iterations (a memory hook counting every allocation from the pool and every return
    to it). The pool's own size also counts freed blocks it keeps; this does not."""

    class UsedBytes(cp.cuda.MemoryHook):  # type: ignore[misc, name-defined]
        name = "liveptycho_used_bytes"

        def __init__(self, start: int) -> None:
            self.used = self.peak = start

        def malloc_postprocess(self, **kwargs: Any) -> None:
            self.used += kwargs["mem_size"]
            self.peak = max(self.peak, self.used)

        def free_postprocess(self, **kwargs: Any) -> None:
            self.used -= kwargs["mem_size"]

    cp.cuda.Device().synchronize()
    resident = int(cp.get_default_memory_pool().used_bytes())
    hook = UsedBytes(resident)
    with hook:
        solver.iterate(iterations)
        cp.cuda.Device().synchronize()
    return resident, int(hook.peak)


def timed(
    cp: Any,
    solver: StreamingSolver,
    iterations: int,
    rounds: int = 3,
) -> list[float]:
    """Seconds per iteration of each of ``rounds`` rounds of ``iterations`` iterations;
    the cases report their median (the lent machines are shared) and the spread."""
    # Warm-up past the first probe update and orthogonalisation, so every kernel is
    # compiled and every cuFFT plan made before the clock starts.
    solver.iterate(max(3, solver.params.probe_update_start + solver.params.orthogonalize_every + 1))
    cp.cuda.Device().synchronize()
    seconds = []
    collecting = gc.isenabled()
    gc.disable()  # as timeit does: a collector pause is a large share of a short round
    try:
        for _ in range(rounds):
            t0 = time.perf_counter()
            solver.iterate(iterations)
            cp.cuda.Device().synchronize()
            seconds.append((time.perf_counter() - t0) / iterations)
    finally:
        if collecting:
            gc.enable()
    return seconds


def run_case(
    cp: Any,
    name: str,
    sample: SimulatedSample,
    params: IterativeParams,
    iterations: int,
    *,
    parity: bool,
    reference: bool,
    error_at: int,
    timing_rounds: int = 3,
) -> dict:
    bl = sample.beamline
    pool = cp.get_default_memory_pool()
    pool.free_all_blocks()
    cp.cuda.Device().synchronize()
    solver = make_solver(sample, cp, params)
    rounds = timed(cp, solver, iterations, timing_rounds)
    result: dict[str, Any] = {
        "case": name,
        "algorithm": params.algorithm,
        "modes": params.probe_modes,
        "batch": params.batch_size,
        "frames": sample.num_points,
        "window": bl.window,
        "canvas": list(solver.object.shape),
        "gpu_s_per_iteration": float(np.median(rounds)),
        "gpu_rounds_s_per_iteration": rounds,
        "gpu_pool_bytes": int(pool.total_bytes()),
        "solver_peak_estimate_bytes": solver.peak_bytes(),
        "floor_bytes": floor_bytes(
            sample.num_points,
            bl.window,
            # An exit wave per probe-object pair (the object's own M reads left out).
            params.probe_modes * params.object_modes,
            params.algorithm,
            params.position_refinement or bool(np.any(sample.positions_px % 1)),
        ),
    }
    del solver
    # Outside the clock (the hook runs Python on every allocation): a fresh solver
    # through the warm-up's probe update and orthogonalisation and two iterations more.
    solver = make_solver(sample, cp, params)
    p = solver.params
    resident, peak = peak_used_bytes(cp, solver, p.probe_update_start + p.orthogonalize_every + 3)
    result["gpu_resident_bytes"] = resident
    result["gpu_peak_used_bytes"] = peak
    if error_at:
        solver.iterate(max(0, error_at - len(solver.error_history)))
        result[f"gpu_object_error_{error_at}"] = error_of(sample, solver)
    del solver
    if reference:  # the same solver with the fused kernels off: the xp expressions on CuPy
        ref = make_solver(sample, cp, params, fused=False)
        result["gpu_unfused_s_per_iteration"] = float(np.median(timed(cp, ref, iterations)))
        del ref
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
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="timed rounds of --iterations per case: the median is reported, and the spread",
    )
    parser.add_argument("--quick", action="store_true", help="the small parity cases only")
    parser.add_argument(
        "--no-parity",
        action="store_true",
        help="the big timed cases only (the parity cases' NumPy runs take minutes)",
    )
    parser.add_argument("--error-at", type=int, default=0, help="object error after N its")
    parser.add_argument("--algorithms", nargs="+", default=["epie", "lsqml", "dm"])
    parser.add_argument("--modes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--sides", type=int, nargs="+", default=[32, 64], help="big-case grids")
    parser.add_argument("--no-reference", action="store_true", help="skip the unfused timings")
    parser.add_argument(
        "--whole-pixel-big",
        action="store_true",
        help="time the big cases with subpixel_positions=False as well",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="parity also on whole-pixel data, LSQ-ML Poisson, ePIE with position refinement "
        "and ePIE with the object clamp",
    )
    parser.add_argument(
        "--batches", type=int, nargs="+", default=[128], help="batch sizes of the big cases"
    )
    parser.add_argument(
        "--whole-pixel-parity",
        action="store_true",
        help="the parity cases on whole-pixel data only",
    )
    parser.add_argument(
        "--object-modes",
        type=int,
        default=1,
        help="recon.object_modes of every case (more than 1: the solver's reference path, "
        "on CuPy too)",
    )
    parser.add_argument(
        "--parity-window",
        type=int,
        choices=(128, 256),
        default=128,
        help="frame size of the parity cases (256: 144 positions, the solver's own FFT)",
    )
    parser.add_argument(
        "--parity-photons",
        type=float,
        default=None,
        help="photons per frame of the parity cases (default 5e5)",
    )
    parser.add_argument(
        "--momentum-gains",
        type=float,
        nargs="+",
        default=None,
        help="time each big ePIE and LSQ-ML case once per recon.momentum_gain (0: momentum "
        "off), in the same run, to isolate momentum's own cost",
    )
    parser.add_argument(
        "--ptychi-epochs",
        type=int,
        default=0,
        help="after the timings, run ours and pty-chi 2.2.0 for this many epochs (2 of them "
        "warm-up) on each big case's data, every algorithm and mode count: s/epoch and final "
        "errors (benchmarks/recon_vs_ptychi.py; 0: not run)",
    )
    parser.add_argument(
        "--ptychi-batch", type=int, default=96, help="batch of both solvers in those runs"
    )
    args = parser.parse_args()
    import cupy as cp

    bandwidth = copy_bandwidth(cp)
    big = SimulatedBeamline.for_window(256, step_px=20.0, photons_per_frame=5e5)
    small = parity_sample(args.parity_window, args.parity_photons)
    label = f"{small.num_points}x{small.beamline.window}^2"
    plans: list[tuple[str, SimulatedSample, IterativeParams, bool, bool, int | None]] = []
    reference = not args.no_reference
    objects = f" M={args.object_modes}" if args.object_modes > 1 else ""
    if args.no_parity and args.quick:
        parser.error("--no-parity with --quick leaves nothing to run")
    for algorithm in [] if args.no_parity else args.algorithms:
        for modes in args.modes:
            params = IterativeParams(
                algorithm=algorithm,
                probe_modes=modes,
                batch_size=128,
                object_modes=args.object_modes,
            )
            name = f"demo {label} {algorithm} K={modes}" + objects
            if not args.whole_pixel_parity:
                plans.append((name, small, params, True, reference))
            if args.variants or args.whole_pixel_parity:  # the whole-pixel fused path
                params = params.model_copy(update={"subpixel_positions": False})
                plans.append((f"{name} whole-pixel", small, params, True, False))
    if args.variants:  # paths that stay on the xp reference on CuPy
        for name, params in (
            ("lsqml poisson", IterativeParams(algorithm="lsqml", noise="poisson", batch_size=128)),
            # The fused end of a pass with the clamp acting (the phantom's amplitude
            # reaches 1.0; the default is no clamp).
            ("epie clamp 0.95", IterativeParams(algorithm="epie", object_amplitude_max=0.95)),
            (
                "epie refine",
                IterativeParams(
                    algorithm="epie", position_refinement=True, position_refinement_start=2
                ),
            ),
        ):
            plans.append((f"demo {label} {name}", small, params, True, False))
    if 0 < args.ptychi_epochs < 3:
        parser.error(
            f"--ptychi-epochs must be at least 3 (2 warm-up + 1 timed), got {args.ptychi_epochs}"
        )
    big_samples: list[SimulatedSample] = []
    if not args.quick:
        for side in args.sides:
            sample = SimulatedSample(replace(big, x_num=side, y_num=side))
            big_samples.append(sample)
            for algorithm, modes, batch in itertools.product(
                args.algorithms, args.modes, args.batches
            ):
                base = IterativeParams(
                    algorithm=algorithm,
                    probe_modes=modes,
                    batch_size=batch,
                    object_modes=args.object_modes,
                )
                gains = [None] if algorithm == "dm" else args.momentum_gains or [None]
                for gain in gains:
                    params = base
                    name = f"{side * side}x256^2 {algorithm} K={modes}" + objects
                    if batch != 128:
                        name += f" batch {batch}"
                    if gain is not None:
                        params = base.model_copy(update={"momentum_gain": gain})
                        name += f" momentum {gain:g}"
                    plans.append((name, sample, params, False, reference and modes == 1))
                    if args.whole_pixel_big:
                        whole = params.model_copy(update={"subpixel_positions": False})
                        plans.append((f"{name} whole-pixel", sample, whole, False, False))
    results = []
    for name, sample, params, parity, reference in plans:
        try:
            r = run_case(
                cp,
                name,
                sample,
                params,
                args.iterations,
                parity=parity,
                reference=reference,
                error_at=args.error_at,
                timing_rounds=args.rounds,
            )
        except Exception as exc:  # keep the other cases' figures
            r = {"case": name, "failed": f"{type(exc).__name__}: {exc}"}
            print(json.dumps(r), flush=True)
            results.append(r)
            continue
        floors = {k: v / bandwidth for k, v in r["floor_bytes"].items()}
        r["floor_s"] = floors
        r["ratio_to_floor"] = {k: r["gpu_s_per_iteration"] / v for k, v in floors.items()}
        results.append(r)
        print(json.dumps(r), flush=True)
    comparisons = []
    for sample in big_samples if args.ptychi_epochs else []:
        gain = IterativeParams().momentum_gain
        for row in compare_cases(
            sample, args.modes, args.algorithms, args.ptychi_epochs, args.ptychi_batch, gain
        ):
            comparisons.append(row)
            print(json.dumps(row), flush=True)
    save_report(cp, bandwidth, results, args.out, comparisons)
    print(
        "| case | GPU s/it (rounds' range) | unfused s/it | CPU s/it "
        "| floor s (data / +FFTs / algorithm) | ratio | pool / peak used / estimate GiB "
        "| parity |"
    )
    print("|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in results:
        if "failed" in r:
            print(f"| {r['case']} | failed: {r['failed'][:80]} |")
            continue
        cells = [
            r["case"],
            f"{r['gpu_s_per_iteration']:.4f} ({min(r['gpu_rounds_s_per_iteration']):.4f}-"
            f"{max(r['gpu_rounds_s_per_iteration']):.4f})",
            f"{r.get('gpu_unfused_s_per_iteration', nan):.4f}",
            f"{r.get('cpu_s_per_iteration', nan):.3f}",
            f"{r['floor_s']['data']:.5f} / {r['floor_s']['with_ffts']:.5f} / "
            f"{r['floor_s']['algorithm']:.5f}",
            f"{r['ratio_to_floor']['data']:.0f}x / {r['ratio_to_floor']['with_ffts']:.1f}x / "
            f"{r['ratio_to_floor']['algorithm']:.1f}x",
            f"{r['gpu_pool_bytes'] / 2**30:.2f} / {r['gpu_peak_used_bytes'] / 2**30:.2f} / "
            f"{r['solver_peak_estimate_bytes'] / 2**30:.2f}",
            f"{r.get('parity_rel_diff_20', nan):.1e}",
        ]
        print("| " + " | ".join(cells) + " |")
    if comparisons:
        print_table(comparisons)


if __name__ == "__main__":
    main()
