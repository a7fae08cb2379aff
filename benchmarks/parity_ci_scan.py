"""NumPy ⇄ CuPy parity on the CI tests' scan, with and without ``recon.modulus_floor``.

Run on the lent GPU machine from the repository root:

    PYTHONPATH=.:tests python3 benchmarks/parity_ci_scan.py

The recon tests' scan (``tests/recon_helpers.py``: 15 x 15 positions of 64²,
10⁵ photons per frame) has detector pixels where the model is near zero but
photons were counted; there the plain modulus step hands float32 rounding on
to the object, and NumPy and CuPy drifted 1-2 % apart in 20 iterations
(docs/benchmarks-history.md). This runs both for 20 iterations per case and prints the
relative object difference and both object errors, for the floor at 0 and at
its default. ``--xp numpy`` runs NumPy on both sides (a CPU check of the script).
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from recon_helpers import SimulatedScan

from hxn_liveptycho.recon.backend import to_host
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.recon.metrics import object_error


def solved(scan: SimulatedScan, params: IterativeParams, xp: Any, iterations: int) -> np.ndarray:
    s = StreamingSolver(
        probe=xp.asarray(scan.probe_guess), canvas_shape=scan.canvas, params=params, xp=xp
    )
    s.add(xp.asarray(scan.amplitudes.astype(np.float32)), scan.positions)
    s.iterate(iterations)
    return np.array(to_host(s.object))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=["epie", "lsqml", "dm"])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--xp", choices=("cupy", "numpy"), default="cupy")
    args = parser.parse_args()
    if args.xp == "cupy":
        import cupy as other
    else:
        other = np
    scan = SimulatedScan(whole_pixels=True)
    default = IterativeParams().modulus_floor
    print("| algorithm | modulus_floor | NumPy ⇄ other | object errors |")
    print("|---|---|---|---|")
    for algorithm in args.algorithms:
        for floor in (0.0, default):
            params = IterativeParams(algorithm=algorithm, modulus_floor=floor)
            a = solved(scan, params, np, args.iterations)
            b = solved(scan, params, other, args.iterations)
            moved = np.linalg.norm(a - b) / np.linalg.norm(a)
            errors = [object_error(scan.obj, o, scan.mask) for o in (a, b)]
            cells = f"{moved:.1e} | {errors[0]:.4f} / {errors[1]:.4f}"
            print(f"| {algorithm} | {floor} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
