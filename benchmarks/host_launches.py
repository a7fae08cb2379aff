"""The solver's fused (CuPy) path on a machine without a GPU: its launches and host time.

Run from the repository root; no GPU and no CuPy are needed:

    PYTHONPATH=. python benchmarks/host_launches.py [--modes 1 3] [--record launches.txt]

A stand-in for CuPy (NumPy arrays; every kernel a recorded no-op; allocations served
from a cache, as CuPy's pool serves them) lets ``StreamingSolver`` take the fused path
it takes on a GPU, on 64² frames (the solver's own FFT path, as at 256²). Two uses:

- ``--record FILE`` writes every launch of two iterations of each path, in order: the
  kernel, grid, block and each argument's kind (an array's shape and dtype, a scalar's
  type and value). A host-side change that must not change what runs on the GPU is
  checked by recording before and after it and comparing the files.
- The host's time per batch: the solver's Python without the GPU's work. CuPy's own
  cost per launch (a few µs) comes on top; the NumPy arithmetic left outside the
  kernels here (the probe modes' orthogonalisation, once every few passes) is counted,
  so read it as an upper bound of the Python part. The GPU never waits while this stays
  under a batch's kernel time (``recon_profile.py``).
"""

from __future__ import annotations

import argparse
import statistics
import warnings
from collections import Counter

from hxn_liveptycho.devtools.cupy_stand_in import Launch, describe, install, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algorithms", nargs="+", default=["epie", "lsqml", "dm"])
    parser.add_argument("--modes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--record", default=None, help="write the launch sequence here")
    args = parser.parse_args()
    warnings.simplefilter("ignore", RuntimeWarning)  # no-op kernels leave garbage values
    launches: list[Launch] = []
    cp = install(launches)
    lines = []
    print("| path | host µs a batch (median, min) | launches a batch | kernels |")
    print("|---|---|---|---|")
    for algorithm in args.algorithms:
        for modes in args.modes:
            for subpixel in (False, True):
                path = f"{algorithm} K={modes} {'sub-pixel' if subpixel else 'whole-pixel'}"
                if args.record:
                    run(cp, launches, algorithm, modes, subpixel, 2)
                    lines += [
                        f"{path} {name} {grid} {block} " + " ".join(map(describe, call))
                        for name, grid, block, call in launches
                    ]
                per_batch = []
                for _ in range(args.rounds):
                    seconds, batches = run(cp, launches, algorithm, modes, subpixel, 10)
                    per_batch.append(seconds / batches * 1e6)
                count = len(launches) / 10 / batches
                kinds = Counter(
                    name.split("<")[0].removeprefix("liveptycho_") for name, *_ in launches
                )
                print(
                    f"| {path} | {statistics.median(per_batch):.0f}, {min(per_batch):.0f} "
                    f"| {count:.1f} | {', '.join(sorted(kinds))} |"
                )
    if args.record:
        with open(args.record, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"\n{len(lines)} launches written to {args.record}")


if __name__ == "__main__":
    main()
