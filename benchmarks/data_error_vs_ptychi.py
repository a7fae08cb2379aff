"""Depth of convergence: the data error of the returned state after N iterations, ours (LSQ-ML
with and without ``step_decay``) against pty-chi 2.2.0 LSQML, same data, same starting probe,
one evaluator, one run.

On the lent GPU (pty-chi on CUDA, ours on CuPy):

    PYTHONPATH=. python benchmarks/data_error_vs_ptychi.py --backend cupy \\
        --json benchmarks/results/data_error_vs_ptychi_h200.json

On a machine without a GPU, pty-chi on torch's CPU build and ours on NumPy (small sizes):

    PYTHONPATH=. python benchmarks/data_error_vs_ptychi.py --backend numpy \\
        --size 100:64:32 --size 256:128:96 --json benchmarks/results/data_error_vs_ptychi_cpu.json

Data: :func:`benchmarks.recon_vs_ptychi.simulate` (jittered raster, Poisson noise), the
starting probe :func:`~benchmarks.recon_vs_ptychi.starting_probe` (guessed from the data, not
the simulator's probe) and a flat object for both tools. The data error is
:func:`benchmarks.time_to_quality.data_error`, ``sum (|Psi| - A)^2 / sum A^2`` under our
forward model, for both tools' states (pty-chi's at the best of a few half-pixel global
offsets); ``truth`` is the phantom and the simulator's probe under the same model (the noise
floor: a state below it fits noise). The object error is the comparison's metric over the
well-lit region. No time is measured here (time_to_quality.py does that).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import platform
import shlex
import sys
import time
from typing import Any

import numpy as np

from benchmarks.recon_vs_ptychi import error_against, ptychi_task, simulate, starting_probe
from benchmarks.time_to_quality import Device, data_error, device, new_solver, ptychi_data_error
from hxn_liveptycho.recon.backend import to_host
from hxn_liveptycho.recon.params import IterativeParams

log = logging.getLogger("data_error_vs_ptychi")


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        positions, window, batch = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected POSITIONS:WINDOW:BATCH, got {text!r}") from None
    return positions, window, batch


def ours(
    sample: Any,
    amps: np.ndarray,
    fft_amps: Any,
    probe: np.ndarray,
    dev: Device,
    iterations: int,
    **fields: Any,
) -> dict[str, Any]:
    params = IterativeParams(algorithm="lsqml", **fields)
    solver = new_solver(sample, probe, params, dev)
    solver.add(amps, sample.positions_px + 4)
    began = time.perf_counter()
    solver.iterate(iterations)
    dev.sync()
    return {
        "state_error": solver.state_error(),
        "data_error": data_error(
            dev.xp, solver.object, solver.probe_modes, solver.positions_px, fft_amps
        ),
        "object_error": error_against(sample, to_host(solver.object), 4),
        "final_step_scale": solver.step_scale,
        "seconds": time.perf_counter() - began,
    }


def ptychi(
    sample: Any, fft_amps: Any, probe: np.ndarray, dev: Device, iterations: int, batch: int
) -> dict[str, Any]:
    task = ptychi_task(
        sample, probe, "lsqml", iterations, batch, device="cpu" if dev.xp is np else "cuda"
    )
    began = time.perf_counter()
    task.run(iterations)
    seconds = time.perf_counter() - began
    obj = task.get_data_to_cpu("object", as_numpy=True)[0]
    modes = task.get_data_to_cpu("probe", as_numpy=True)[0]
    row = ptychi_data_error(dev.xp, sample, obj, modes, fft_amps)
    row["object_error"] = error_against(sample, obj, 0)
    row["seconds"] = seconds
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        type=parse_size,
        action="append",
        help="POSITIONS:WINDOW:BATCH (repeatable; default 1024:256:96)",
    )
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--modes", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--backend", choices=("cupy", "numpy"), default="cupy")
    parser.add_argument("--no-ptychi", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    dev = device(args.backend)
    rows = []
    for positions, window, batch in args.size or [(1024, 256, 96)]:
        sample = simulate(positions, window)
        amps = np.sqrt(sample.intensities).astype(np.float32)
        fft_amps = dev.xp.asarray(np.fft.ifftshift(amps, axes=(-2, -1)))
        truth = data_error(
            dev.xp,
            sample.object,
            sample.probe[None],
            sample.positions_px,
            fft_amps,
            best_scale=True,
        )
        for modes in args.modes:
            probe = starting_probe(sample, modes)
            row: dict[str, Any] = {
                "positions": sample.num_points,
                "frame_shape": [window, window],
                "batch": batch,
                "modes": modes,
                "iterations": args.iterations,
                "truth_data_error": truth,
            }
            for name, decay in (("ours_step_decay_off", 1.0), ("ours", 0.7)):
                row[name] = ours(
                    sample,
                    amps,
                    fft_amps,
                    probe,
                    dev,
                    args.iterations,
                    batch_size=batch,
                    probe_modes=modes,
                    step_decay=decay,
                )
                log.info("%d x %d², %d modes, %s: %s", positions, window, modes, name, row[name])
            if not args.no_ptychi:
                row["ptychi_lsqml"] = ptychi(sample, fft_amps, probe, dev, args.iterations, batch)
                log.info("pty-chi: %s", row["ptychi_lsqml"])
                row["ratio_ours_to_ptychi"] = (
                    row["ours"]["data_error"] / row["ptychi_lsqml"]["data_error"]
                )
            rows.append(row)
    report = {
        "command": shlex.join([sys.executable, *sys.argv]),
        "device": dev.name,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
