"""LSQ-ML's Poisson step with and without the intensity floor (``recon.poisson_floor``).

Run anywhere (NumPy), from the repository root:

    PYTHONPATH=. python benchmarks/poisson_floor.py

On the simulated demo scan (400 positions of 128²) at two photon levels, for
Gaussian LSQ-ML and Poisson LSQ-ML with floor 0 (none) and 1 count: the object
error after 20, 40 and 60 iterations, and how far a 1e-7 relative change of
the data moves the object after 20 iterations (float32 rounding is of that
size, so this is the NumPy ⇄ CuPy difference to expect).
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np

from benchmarks.recon_gpu import error_of, make_solver
from benchmarks.rounding_sensitivity import sensitivity
from hxn_liveptycho.recon.iterative import IterativeParams
from hxn_liveptycho.sim.sample import SimulatedBeamline, SimulatedSample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photons", type=float, nargs="+", default=[5e5, 5e4])
    args = parser.parse_args()
    cases = {
        "gaussian": IterativeParams(algorithm="lsqml", batch_size=128),
        "poisson, no floor": IterativeParams(
            algorithm="lsqml", noise="poisson", poisson_floor=0.0, batch_size=128
        ),
        "poisson, floor 1": IterativeParams(algorithm="lsqml", noise="poisson", batch_size=128),
    }
    print("| photons/frame | case | error at 20 / 40 / 60 | change from 1e-7 data change |")
    print("|---|---|---|---|")
    for photons in args.photons:
        sample = SimulatedSample(replace(SimulatedBeamline(), photons_per_frame=photons))
        for name, params in cases.items():
            solver = make_solver(sample, np, params)
            errors = []
            for _ in range(3):
                solver.iterate(20)
                errors.append(error_of(sample, solver))
            moved = sensitivity(sample, params)[0]
            cells = " / ".join(f"{e:.3f}" for e in errors)
            print(f"| {photons:.0e} | {name} | {cells} | {moved:.1e} |", flush=True)


if __name__ == "__main__":
    main()
