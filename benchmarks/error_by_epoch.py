"""Our object error epoch by epoch, on the data and start of ``recon_vs_ptychi.py``.

Run from the repository root, on any machine (NumPy by default):

    PYTHONPATH=. python benchmarks/error_by_epoch.py --positions 4096 --algorithm dm \
        --epochs 15 [--target 0.415] [--xp cupy]

``recon_vs_ptychi.py`` compares the two solvers after the same number of
epochs. Where pty-chi ends lower, the question is how many more epochs ours
needs to reach its error: this prints the error after every epoch (the same
metric, the same simulated scan, the same starting probe and flat object,
the same batch size) and the first epoch at or below ``--target``. The
NumPy and CuPy paths are the same code (their parity is in
``docs/benchmarks.md``), so the count holds for both; the seconds it takes
on the GPU are the epochs times the per-epoch time measured there.
"""

from __future__ import annotations

import argparse
import json
import logging
import time

import numpy as np

from benchmarks.recon_vs_ptychi import error_against, simulate
from hxn_liveptycho.recon._modes import initial_modes
from hxn_liveptycho.recon.backend import to_host
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.recon.probe import initial_probe

log = logging.getLogger("error_by_epoch")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--positions", type=int, default=4096)
    parser.add_argument("--algorithm", default="dm")
    parser.add_argument("--modes", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch", type=int, default=96, help="as recon_vs_ptychi.py")
    parser.add_argument("--target", type=float, default=None, help="report the first epoch <=")
    parser.add_argument("--xp", choices=("numpy", "cupy"), default="numpy")
    parser.add_argument(
        "--momentum-gain",
        type=float,
        default=IterativeParams().momentum_gain,
        help="recon.momentum_gain (ePIE, LSQ-ML; DM has none)",
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.xp == "cupy":
        import cupy as xp
    else:
        xp = np
    sample = simulate(args.positions)
    amplitudes = np.sqrt(sample.intensities).astype(np.float32)
    guess = initial_probe(amplitudes, footprint_px=3 * sample.beamline.step_px)
    probe = np.ascontiguousarray(initial_modes(guess.astype(np.complex64), args.modes, np))
    params = IterativeParams(
        algorithm=args.algorithm,
        batch_size=args.batch,
        probe_modes=args.modes,
        momentum_gain=args.momentum_gain,
    )
    canvas = tuple(s + 8 for s in sample.object.shape)
    solver = StreamingSolver(probe=xp.asarray(probe), canvas_shape=canvas, params=params, xp=xp)
    solver.add(xp.asarray(amplitudes), sample.positions_px + 4)
    errors, reached = [], None
    for epoch in range(1, args.epochs + 1):
        began = time.perf_counter()
        solver.iterate(1)
        seconds = time.perf_counter() - began
        errors.append(error_against(sample, to_host(solver.object), 4))
        log.info("epoch %d: error %.4f (%.1f s)", epoch, errors[-1], seconds)
        if reached is None and args.target is not None and errors[-1] <= args.target:
            reached = epoch
    report = {
        "positions": sample.num_points,
        "algorithm": args.algorithm,
        "modes": args.modes,
        "batch": args.batch,
        "xp": args.xp,
        "momentum_gain": args.momentum_gain,
        "errors": errors,
        "target": args.target,
        "first_epoch_at_target": reached,
    }
    print(json.dumps(report))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
