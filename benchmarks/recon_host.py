"""Host (Python) time of a GPU iteration: where the launches' overhead goes.

Run on a CUDA machine, from the repository root:

    PYTHONPATH=. python benchmarks/recon_host.py [--side 64] [--batch 128]

``recon_profile.py`` shows kernels summing to less than the wall time for
ePIE and LSQ-ML: the GPU waits for Python. This runs ``iterate`` under
cProfile (after a warm-up) and splits the wall time into the wait for the
GPU at the pass's one sync (``StreamingSolver.iterate`` reads the errors
back once) and the host's own time, then lists the functions that cost the
host most. If host time is close to the wall time, the iteration is bound
by launches, not by the GPU.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from dataclasses import replace

from benchmarks.recon_gpu import make_solver
from hxn_liveptycho.recon.iterative import IterativeParams
from hxn_liveptycho.sim.sample import SimulatedBeamline, SimulatedSample

#: Functions that only wait for the GPU (the pass's sync reads the errors back).
_WAITS = ("to_host", "synchronize", "'get' of", "asnumpy")


def host_profile(cp: object, solver: object, iterations: int, top: int) -> dict:
    solver.iterate(max(3, solver.params.probe_update_start + solver.params.orthogonalize_every + 1))
    cp.cuda.Device().synchronize()
    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    solver.iterate(iterations)
    cp.cuda.Device().synchronize()
    profiler.disable()
    wall = (time.perf_counter() - t0) / iterations
    stats = pstats.Stats(profiler)
    rows = []
    wait = 0.0
    for (file, line, name), (_, calls, tottime, cumtime, _) in stats.stats.items():
        label = f"{file.rsplit('/', 1)[-1]}:{line}({name})"
        if any(w in label for w in _WAITS):
            wait += tottime
        rows.append((tottime, calls, cumtime, label))
    rows.sort(reverse=True)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(12)
    return {
        "wall_s_per_iteration": wall,
        "gpu_wait_s_per_iteration": wait / iterations,
        "host_s_per_iteration": wall - wait / iterations,
        "top": [
            {
                "function": label,
                "calls_per_iteration": calls / iterations,
                "s_per_iteration": tottime / iterations,
            }
            for tottime, calls, _, label in rows[:top]
        ],
        "cumulative": text.getvalue(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64, help="raster side: side² positions")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--algorithms", nargs="+", default=["epie", "lsqml", "dm"])
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import cupy as cp

    big = SimulatedBeamline.for_window(256, step_px=20.0, photons_per_frame=5e5)
    sample = SimulatedSample(replace(big, x_num=args.side, y_num=args.side))
    report = []
    for algorithm in args.algorithms:
        for subpixel in (True, False):
            params = IterativeParams(
                algorithm=algorithm, batch_size=args.batch, subpixel_positions=subpixel
            )
            solver = make_solver(sample, cp, params)
            r = host_profile(cp, solver, args.iterations, args.top)
            r.update(algorithm=algorithm, subpixel=subpixel, batch=args.batch)
            report.append(r)
            del solver
            print(
                f"\n{algorithm} subpixel={subpixel}: wall {r['wall_s_per_iteration']:.4f} s/it, "
                f"host {r['host_s_per_iteration']:.4f}, waiting on the GPU "
                f"{r['gpu_wait_s_per_iteration']:.4f}",
                flush=True,
            )
            for f in r["top"]:
                print(
                    f"  {f['s_per_iteration'] * 1e3:7.3f} ms {f['calls_per_iteration']:7.1f}x "
                    f"{f['function']}"
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
