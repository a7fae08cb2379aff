"""The modulus step's intensity floor (``recon.modulus_floor``): rounding sensitivity and error.

Run anywhere (NumPy), from the repository root:

    PYTHONPATH=.:tests python benchmarks/modulus_floor.py [--floors 0 0.001 0.01 0.1] [--cases DM]

On the recon tests' scan (``tests/recon_helpers.py``, whole pixels, as in
``test_recon_algorithms.py``), per case and floor: how far a 1e-7 relative
change of the data moves the object after 20 iterations (float32 rounding is
of that size, so this is the NumPy ⇄ CuPy difference to expect), and the
object error after 20 and 60 iterations.
"""

from __future__ import annotations

import argparse

from test_recon_algorithms import Scan

from hxn_liveptycho.recon.iterative import IterativeParams

CASES = {
    "ePIE": {"algorithm": "epie"},
    "LSQ-ML": {"algorithm": "lsqml"},
    "ePIE, 3 modes": {"algorithm": "epie", "probe_modes": 3},
    "ePIE, position refinement": {"algorithm": "epie", "position_refinement": True},
    # DM's relaxed projection takes no floor: the case shows its rounding gap is its own.
    "DM": {"algorithm": "dm"},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--floors", type=float, nargs="+", default=[0.0, 0.001, 0.01, 0.1])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    args = parser.parse_args()
    scan = Scan()
    print("| case | floor | change from 1e-7 data change | error at 20 / 60 |")
    print("|---|---|---|---|")
    for name in args.cases:
        settings = CASES[name]
        for floor in args.floors:
            moved, solver = scan.rounding_change(IterativeParams(**settings, modulus_floor=floor))
            at_20 = scan.error(solver)
            solver.iterate(40)
            cells = f"{moved:.1e} | {at_20:.4f} / {scan.error(solver):.4f}"
            print(f"| {name} | {floor} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
