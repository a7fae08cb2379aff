"""One scan over several ranks: the communication of a pass against its compute, and the
2- and 4-GPU speed-up that follows (a projection).

Run from the repository root; it launches itself under ``mpiexec`` for each rank count:

    python benchmarks/multi_rank.py [--ranks 1 2 4] [--side 20] [--n 64] [--passes 5]
        [--backend numpy|cupy] [--comm mpi|nccl] [--out benchmarks/results/x.json]

Data: one simulated scan (``side``² positions of ``n``² frames, sim.optics probe, sim.phantom
object, Poisson noise), split over the ranks by :func:`~hxn_liveptycho.recon.ranks.assign_ranks`.
Per rank count and algorithm (ePIE, LSQ-ML, DM), after ``warm`` untimed passes, ``passes``
passes each timed alone between barriers (medians over the passes unless said):

* ``pass_s``: wall seconds per pass (the slowest rank's: the ranks wait for each other);
* ``comm_s``: seconds per pass inside the communicator's collectives (the slowest rank's;
  this includes waiting for a slower rank) and ``comm_bytes`` per pass;
* ``pass_s_min``: the fastest pass (the slowest rank's): on a shared machine other jobs
  only add time;
* ``collective_s``: the same collectives alone (one Allreduce of the pass's bytes, and a
  small gather, between barriers; the least of a few): the link's cost without imbalance.

The projection: a pass on R GPUs takes ``t1 / R + merge + comm(R)``, where ``t1`` is one
GPU's pass over the whole scan (``--gpu-pass-s``: measured on the lent GPU, e.g.
docs/benchmarks.md's H200 figures), ``merge`` the merge's own arithmetic on the object
(``merge_fraction`` of t1: one merge of the whole scan timed alone against the fastest
single-rank pass, both on the device measured) and ``comm(R)`` the bytes of a pass at
``--link-gbytes`` per second (an assumed allreduce bandwidth) plus ``--latency-s`` a
collective. With ``--project-canvas`` the canvas-sized part of the bytes (one object mode)
is that canvas's instead of this scan's; the probe's and the errors' part is kept. Each
``--link-gbytes`` value gives one projection row. It is a model with stated inputs, not a
measurement.

``--backend cupy``: the solver computes on CuPy; every rank uses ``--device`` (default 0:
ranks share one GPU; ``--device-per-rank`` gives rank r device r). ``--comm nccl``: the
object sums go through NCCL (one device per rank: NCCL refuses two ranks on one device).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ALGORITHMS = ("epie", "lsqml", "dm")


# ---------------------------------------------------------------------- one rank's work


def build_scan(side: int, n: int) -> dict[str, Any]:
    """The simulated scan every rank builds alike: probe guess, canvas, amplitudes, positions."""
    from hxn_liveptycho.sim import optics, phantom

    lam = optics.wavelength_m(12.0)
    dx = optics.sample_pixel_size_m(lam, 0.5, n, 75e-6)
    probe = optics.make_probe(n, pixel_size_m=dx, wavelength_m=lam, rng=1)
    guess = optics.make_probe(n, pixel_size_m=dx, wavelength_m=lam, footprint_px=0.4 * n)
    step = 0.1 * n
    positions = phantom.scan_positions(side, side, step, jitter_px=0.4, rng=2) + 3
    top = positions.max(axis=0)
    canvas = (int(top[0]) + n + 4, int(top[1]) + n + 4)
    obj = phantom.make_object(canvas)
    frames = phantom.simulate_diffraction(obj, probe, positions, photons_per_frame=1e5, rng=3)
    return {
        "guess": guess,
        "canvas": canvas,
        "amplitudes": np.sqrt(frames).astype(np.float32),
        "positions": positions,
    }


def rank_main(args: argparse.Namespace) -> None:
    """One rank: time the passes of every algorithm; rank 0 writes the JSON."""
    from mpi4py import MPI

    from hxn_liveptycho.recon import ranks as rk
    from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    gpus: list[int] = []
    if args.backend == "cupy":  # ranks share --device, or one GPU each
        gpus = list(range(size)) if args.device_per_rank else [args.device] * size
    settings = rk.RankSettings(gpus=gpus, comm=args.comm)
    scan = build_scan(args.side, args.n)
    labels = rk.assign_ranks(scan["positions"], size)
    out: dict[str, Any] = {}
    for algorithm in ALGORITHMS:
        group, xp = rk.join(settings, world)  # a fresh communicator: its counters start at 0
        comm = group.comm
        params = IterativeParams(algorithm=algorithm, seed=0, batch_size=args.batch)
        s = StreamingSolver(
            probe=xp.asarray(scan["guess"]),
            canvas_shape=scan["canvas"],
            params=params,
            ranks=group if size > 1 else None,
        )
        everything = np.arange(len(labels))
        amplitudes = xp.asarray(scan["amplitudes"])
        rk.add_share(s, amplitudes, scan["positions"], everything, labels)
        s.iterate(args.warm)
        spent = comm.spent  # type: ignore[attr-defined]
        walls, comms, nbytes, calls = [], [], [], []
        for _ in range(args.passes):  # each pass timed alone: the median shrugs off a hiccup
            before = (spent.seconds, spent.bytes, spent.calls)
            world.Barrier()
            began = time.perf_counter()
            s.iterate(1)
            float(s.error)  # the pass's work has finished (CuPy: its error came to the host)
            walls.append(time.perf_counter() - began)
            comms.append(spent.seconds - before[0])
            nbytes.append(spent.bytes - before[1])
            calls.append(spent.calls - before[2])
        per_pass = {
            "pass_s": float(np.median(walls)),
            "pass_s_min": float(np.min(walls)),
            "comm_s": float(np.median(comms)),
            "comm_bytes": float(np.median(nbytes)),
            "comm_calls": float(np.median(calls)),
        }
        if size == 1 and algorithm != "dm":
            per_pass["merge_s"] = _merge_alone(s, rk, args)
        every = world.gather(per_pass, root=0)
        collective = _collective_alone(world, comm, xp, int(per_pass["comm_bytes"]), args)
        if rank == 0:
            out[algorithm] = {
                "pass_s": max(e["pass_s"] for e in every),
                "pass_s_min": max(e["pass_s_min"] for e in every),
                "comm_s": max(e["comm_s"] for e in every),
                "comm_s_mean": float(np.mean([e["comm_s"] for e in every])),
                "comm_bytes": every[0]["comm_bytes"],
                "comm_calls": every[0]["comm_calls"],
                "collective_s": collective,
                "merge_s": every[0].get("merge_s", 0.0),
                "frames_per_rank": np.bincount(labels, minlength=size).tolist(),
                "final_error": float(s.error),
            }
    if rank == 0:
        Path(args.rank_out).write_text(json.dumps(out))


def _merge_alone(s: Any, rk: Any, args: Any) -> float:
    """Seconds of an ePIE / LSQ-ML merge's own arithmetic on one rank holding the whole scan
    (the illumination of every position scattered, the object's and probe's changes
    weighted and divided; its sum over ranks left out): the least of a few."""
    from hxn_liveptycho.recon import forward

    group = rk.RankGroup(rk.OneRank())
    times = []
    for _ in range(args.collective_repeats):
        batches = forward.batches(s, np.arange(s.n_positions))
        group._start = rk.PassStart(s._objects.copy(), s._probes.copy(), batches)
        began = time.perf_counter()
        group._merge(s, True)
        float(s._xp.sum(s._objects[0, 0, :1].real))  # CuPy: the merge's work has finished
        times.append(time.perf_counter() - began)
    return float(np.min(times))


def _collective_alone(world: Any, comm: Any, xp: Any, nbytes: int, args: Any) -> float:
    """Seconds of one pass's collectives with nothing else running: one sum of the pass's
    bytes (float32) and one small gather, between barriers; the least of a few (on a shared
    machine, other jobs only add)."""
    if world.Get_size() == 1 or nbytes <= 0:
        return 0.0
    buffer = xp.zeros(max(nbytes // 4, 1), dtype=xp.float32)
    times = []
    for _ in range(args.collective_repeats):
        world.Barrier()
        began = time.perf_counter()
        comm.sum(buffer)
        comm.gather_rows(np.zeros(2))
        times.append(time.perf_counter() - began)
    return float(np.min(times))


# ---------------------------------------------------------------------- the launcher


def launch(ranks: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Run this script as ``ranks`` MPI ranks; rank 0's figures."""
    out = tmp / f"ranks{ranks}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS="1")
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    launcher = shutil.which("mpiexec")
    if launcher is None:
        raise SystemExit("mpiexec not found: install OpenMPI (Debian: openmpi-bin)")
    command = [launcher, "-n", str(ranks), "--oversubscribe", sys.executable, __file__]
    command += [*sys.argv[1:], "--rank-out", str(out)]
    subprocess.run(command, env=env, check=True)
    return dict(json.loads(out.read_text()))


def project(
    measured: dict[int, dict[str, Any]], measured_canvas: tuple[int, int], args: argparse.Namespace
) -> list[dict]:
    """The R-GPU speed-up per algorithm, for each assumed link bandwidth (a projection)."""
    rows = []
    one = measured[1]
    for algorithm in ALGORITHMS:
        t1_here = one[algorithm]["pass_s_min"]
        t1 = args.gpu_pass_s if args.gpu_pass_s else t1_here
        for ranks in (2, 4):
            # Bytes a pass sums: measured at this rank count, else at the largest measured.
            source = measured.get(ranks) or measured[max(measured)]
            nbytes = source[algorithm]["comm_bytes"]
            if args.project_canvas:  # the canvas-sized sums (one object mode: complex64 and
                # float32 a pixel) scale to the projected canvas; the rest (probe, errors) stays
                per_pixel = 12
                canvas_bytes = per_pixel * float(np.prod(measured_canvas))
                nbytes += per_pixel * float(np.prod(args.project_canvas)) - canvas_bytes
            calls = source[algorithm]["comm_calls"]
            # The merge's own arithmetic (ePIE, LSQ-ML), as a fraction of one rank's pass over
            # the whole scan on the device measured (each rank makes it for its share; taken
            # whole, an upper bound).
            merge = one[algorithm]["merge_s"] / t1_here
            for gbytes in args.link_gbytes:
                comm = nbytes / (gbytes * 1e9) + calls * args.latency_s
                pass_r = t1 / ranks + merge * t1 + comm
                rows.append(
                    {
                        "algorithm": algorithm,
                        "ranks": ranks,
                        "one_gpu_pass_s": t1,
                        "assumed_link_gbytes_per_s": gbytes,
                        "assumed_latency_s": args.latency_s,
                        "comm_bytes_per_pass": nbytes,
                        "merge_fraction": merge,
                        "projected_pass_s": pass_r,
                        "projected_speedup": t1 / pass_r,
                    }
                )
    return rows


def _cpu_name() -> str:
    """The CPU's model name (Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--side", type=int, default=20, help="positions per side")
    parser.add_argument("--n", type=int, default=64, help="frame side, pixels")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--warm", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    parser.add_argument("--collective-repeats", type=int, default=7)
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    parser.add_argument("--comm", choices=["auto", "mpi", "nccl"], default="mpi")
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--device-per-rank", action="store_true")
    parser.add_argument(
        "--gpu-pass-s",
        type=float,
        default=None,
        help="one GPU's seconds per pass over the whole scan, for the projection "
        "(default: this run's single-rank pass)",
    )
    parser.add_argument(
        "--project-canvas",
        type=int,
        nargs=2,
        default=None,
        help="the projected scan's canvas (H W): the pass's bytes scale with its area",
    )
    parser.add_argument("--link-gbytes", type=float, nargs="+", default=[10.0, 100.0])
    parser.add_argument("--latency-s", type=float, default=50e-6)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--rank-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_out is not None:
        rank_main(args)
        return
    measured: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in sorted(set(args.ranks) | {1}):
            measured[ranks] = launch(ranks, args, Path(tmp))
            for algorithm, r in measured[ranks].items():
                print(
                    f"{ranks} rank(s) {algorithm:6s} pass {r['pass_s'] * 1e3:8.1f} ms  "
                    f"comm {r['comm_s'] * 1e3:7.2f} ms ({r['comm_bytes'] / 1e6:.2f} MB, "
                    f"alone {r['collective_s'] * 1e3:.2f} ms)"
                )
    canvas = build_scan(args.side, args.n)["canvas"]
    rows = project(measured, canvas, args)
    for row in rows:
        print(
            f"projection {row['algorithm']:6s} {row['ranks']} GPUs at "
            f"{row['assumed_link_gbytes_per_s']:g} GB/s: x{row['projected_speedup']:.2f}"
        )
    result = {
        "command": "python " + " ".join([sys.argv[0], *sys.argv[1:]]),
        "device": f"{_cpu_name()}, {os.cpu_count()} cores"
        + (", CuPy on the GPU" if args.backend == "cupy" else ""),
        "backend": args.backend,
        "comm": args.comm,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "scan": {
            "positions": args.side**2,
            "frame": args.n,
            "batch": args.batch,
            "canvas": list(canvas),
        },
        "projected_canvas": args.project_canvas,
        "measured": {str(k): v for k, v in measured.items()},
        "projection": rows,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
