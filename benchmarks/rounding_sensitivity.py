"""How far float32 rounding alone moves each algorithm's object: the NumPy ⇄ CuPy gap to expect.

Run anywhere (NumPy), from the repository root:

    PYTHONPATH=. python benchmarks/rounding_sensitivity.py [--algorithms dm epie] [--modes 1 3]
        [--window 128 --photons 5e4] [--modulus-floor 0]

The GPU kernels add in another order than NumPy, so the two paths differ by
float32 rounding at every step; what matters is how much the algorithm
amplifies that. This runs one implementation (NumPy) twice on the parity data
of ``recon_gpu.py`` (by default ``--parity-window 256``: 144 positions of
256²; ``--window 128`` the demo scan; ``--photons`` as ``--parity-photons``),
once with the data scaled by 1 + 1e-7, and reports the relative object change
after 20 iterations next to both object errors. Where this change matches the
NumPy ⇄ CuPy difference, the GPU path adds nothing of its own.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.recon_gpu import error_of, make_solver, parity_sample
from hxn_liveptycho.recon.iterative import IterativeParams
from hxn_liveptycho.sim.sample import SimulatedSample


def sensitivity(
    sample: SimulatedSample, params: IterativeParams, iterations: int = 20
) -> tuple[float, float, float, float]:
    """Relative object change after ``iterations`` from data scaled by 1 + 1e-7, the same
    after removing the best global complex factor (a drift of scale or phase alone would
    vanish there), and the object errors of the two runs."""
    a, b = make_solver(sample, np, params), make_solver(sample, np, params)
    b._amps *= np.float32(1 + 1e-7)
    a.iterate(iterations)
    b.iterate(iterations)
    oa, ob = np.asarray(a.object), np.asarray(b.object)
    norm = np.linalg.norm(oa)
    moved = float(np.linalg.norm(oa - ob) / norm)
    factor = np.vdot(ob, oa) / np.vdot(ob, ob)
    beyond_factor = float(np.linalg.norm(oa - factor * ob) / norm)
    return moved, beyond_factor, error_of(sample, a), error_of(sample, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=["epie", "lsqml", "dm"])
    parser.add_argument("--modes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--window", type=int, choices=(128, 256), default=256)
    parser.add_argument("--photons", type=float, default=None, help="per frame (default 5e5)")
    parser.add_argument(
        "--modulus-floor", type=float, default=None, help="recon.modulus_floor (default: its own)"
    )
    parser.add_argument(
        "--dm-fourier-relax", type=float, default=None, help="DM's setting (default: its own)"
    )
    args = parser.parse_args()
    extra = {} if args.dm_fourier_relax is None else {"dm_fourier_relax": args.dm_fourier_relax}
    if args.modulus_floor is not None:
        extra["modulus_floor"] = args.modulus_floor
    sample = parity_sample(args.window, args.photons)
    print(
        f"| algorithm | modes | change after {args.iterations} it. "
        "| the same beyond a complex factor | object errors |"
    )
    print("|---|---|---|---|---|")
    for algorithm in args.algorithms:
        for modes in args.modes:
            params = IterativeParams(
                algorithm=algorithm, probe_modes=modes, batch_size=128, **extra
            )
            moved, beyond, err_a, err_b = sensitivity(sample, params, args.iterations)
            cells = f"{moved:.1e} | {beyond:.1e} | {err_a:.4f} / {err_b:.4f}"
            print(f"| {algorithm} | {modes} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
