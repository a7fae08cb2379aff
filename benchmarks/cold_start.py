"""Cold start on the GPU: how long a fresh process takes to its first iterations.

Run on a CUDA machine, from the repository root:

    PYTHONPATH=. python benchmarks/cold_start.py [--cold-cache] [--rounds 12]

A live reconstruction is judged by how soon the first image appears, and
earlier runs saw the first case of a fresh process run slower than the same
case later. This splits a fresh process's start into: importing CuPy, making
the solver (upload), the first iteration (kernel compiles, cuFFT plans), and
then ``--rounds`` timed rounds of 5 iterations each, printed one by one, on
the same solver and then on a second solver over the same data, so a ramp
(clocks, memory pool, compile) shows as it happens. ``--cold-cache`` points
CuPy's kernel cache at an empty folder first, as on a freshly lent machine.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from typing import Any


def rounds_of(cp: Any, solver: Any, rounds: int, iterations: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        solver.iterate(iterations)
        cp.cuda.Device().synchronize()
        times.append((time.perf_counter() - t0) / iterations)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold-cache", action="store_true", help="start with no kernel cache")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--algorithm", default="epie")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.cold_cache:
        os.environ["CUPY_CACHE_DIR"] = tempfile.mkdtemp(prefix="cupy-cache-")
    report: dict[str, Any] = {"cold_cache": args.cold_cache, "algorithm": args.algorithm}
    t0 = time.perf_counter()
    import cupy as cp

    cp.cuda.Device().synchronize()  # the context is made here
    report["import_and_context_s"] = time.perf_counter() - t0

    from benchmarks.recon_gpu import make_solver
    from hxn_liveptycho.recon.iterative import IterativeParams
    from hxn_liveptycho.sim.sample import SimulatedSample

    sample = SimulatedSample()  # the demo scan: 400 positions of 128²
    params = IterativeParams(algorithm=args.algorithm, batch_size=128)
    t0 = time.perf_counter()
    solver = make_solver(sample, cp, params)
    cp.cuda.Device().synchronize()
    report["make_solver_s"] = time.perf_counter() - t0
    warm = max(3, params.probe_update_start + params.orthogonalize_every + 1)
    t0 = time.perf_counter()
    solver.iterate(1)
    cp.cuda.Device().synchronize()
    report["first_iteration_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    solver.iterate(warm)
    cp.cuda.Device().synchronize()
    report["warm_up_s"] = time.perf_counter() - t0
    report["first_solver_s_per_iteration"] = rounds_of(cp, solver, args.rounds, 5)
    second = make_solver(sample, cp, params)
    second.iterate(warm)
    cp.cuda.Device().synchronize()
    report["second_solver_s_per_iteration"] = rounds_of(cp, second, args.rounds, 5)
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
