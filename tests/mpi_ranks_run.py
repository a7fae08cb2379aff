"""One scan reconstructed by the ranks of ``mpiexec`` (or by one process): what
tests/test_mpi_ranks.py runs, and how it builds the scan and the solver.

    mpiexec -n 2 python tests/mpi_ranks_run.py --case epie --out result.json

(rank 0 also saves each case's object beside it, ``result.<case>.npy``.)

Every rank builds the same small simulated scan (sim.optics probe, sim.phantom object
and Poisson frames), takes its share of the positions (recon.ranks.assign_ranks) and
reconstructs it with the others; rank 0 writes the result as JSON. ``--stream``: the
frames arrive in acquisition order in chunks, each rank adding its share of every chunk
between passes, as a live scan feeds them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.recon import ranks as rk
from hxn_liveptycho.recon._positions import fraction_ramps
from hxn_liveptycho.recon.backend import to_host
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.recon.metrics import illuminated_mask, object_error
from hxn_liveptycho.sim import optics, phantom

N = 32
SIDE = 10
STEP = 3.0
PASSES = 30
CHUNKS = 5
#: The cases: solver settings per name.
CASES: dict[str, dict[str, Any]] = {
    "epie": dict(algorithm="epie"),
    "lsqml": dict(algorithm="lsqml"),
    "dm": dict(algorithm="dm"),
    "epie-modes2": dict(algorithm="epie", probe_modes=2),
    "dm-modes2": dict(algorithm="dm", probe_modes=2),
    "lsqml-positions": dict(
        algorithm="lsqml", position_refinement=True, position_refinement_start=5, batch_size=16
    ),
    "epie-positions-affine": dict(
        algorithm="epie",
        position_refinement=True,
        position_refinement_start=5,
        position_model="affine+drift",
        batch_size=16,
    ),
    "epie-opr": dict(algorithm="epie", opr_modes=2),
}


class Scan:
    """A 10 x 10 fly scan of a 32-pixel probe (about 70 % overlap), 1e5 photons a frame,
    Poisson noise; the probe guess without aberrations and at the wrong defocus."""

    def __init__(self, case: str = "epie") -> None:
        lam = optics.wavelength_m(12.0)
        dx = optics.sample_pixel_size_m(lam, 0.5, N, 75e-6)
        self.probe = optics.make_probe(N, pixel_size_m=dx, wavelength_m=lam, rng=1)
        self.probe_guess = optics.make_probe(N, pixel_size_m=dx, wavelength_m=lam, footprint_px=13)
        self.positions = phantom.scan_positions(SIDE, SIDE, STEP, jitter_px=0.4, rng=2) + 3
        top = self.positions.max(axis=0)
        self.canvas = (int(top[0]) + N + 4, int(top[1]) + N + 4)
        self.obj = phantom.make_object(self.canvas)
        # The variable probe's case: the probe drifts in scan order from one probe to
        # another of a smaller footprint (OPR's weights should follow ``drift``).
        self.drift = np.linspace(0.0, 1.0, len(self.positions)) if case.endswith("opr") else None
        if self.drift is None:
            frames = phantom.simulate_diffraction(
                self.obj, self.probe, self.positions, photons_per_frame=1e5, rng=3
            )
        else:
            last = optics.make_probe(N, pixel_size_m=dx, wavelength_m=lam, rng=7, footprint_px=8)
            last *= np.sqrt(np.sum(np.abs(self.probe) ** 2) / np.sum(np.abs(last) ** 2))
            t = self.drift[:, None, None]
            frames = _drifting_frames(self.obj, (1 - t) * self.probe + t * last, self.positions)
        self.amplitudes = np.sqrt(frames).astype(np.float32)
        self.mask = illuminated_mask(self.positions, self.probe, self.canvas)
        # Positions as the encoders reported them (the refinement cases start from them):
        # off by a smooth error, or (the global model's case) by a 3 % scale.
        centre = self.positions.mean(axis=0)
        if case.endswith("affine"):
            self.measured = centre + 1.03 * (self.positions - centre)
        elif "positions" in case:
            self.measured = self.positions + np.sin(self.positions[:, ::-1] / 7.0)
        else:
            self.measured = self.positions

    @property
    def extent(self) -> tuple[np.ndarray, np.ndarray]:
        """The scan's bounding box as the plan knows it before the frames."""
        return self.positions.min(axis=0), self.positions.max(axis=0)


def _drifting_frames(obj: np.ndarray, probes: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Poisson frames (1e5 photons a frame on average) of each position's own probe,
    sub-pixel positions by a Fourier shift of the probe, as sim.phantom makes them."""
    corners = np.floor(positions).astype(int)
    ramps = fraction_ramps(positions - corners, N, np)
    shifted = np.fft.ifft2(np.fft.fft2(probes) * ramps)
    windows = np.stack([obj[y : y + N, x : x + N] for y, x in corners])
    expected = np.abs(np.fft.fftshift(np.fft.fft2(shifted * windows), axes=(-2, -1))) ** 2
    expected *= 1e5 / expected.sum(axis=(1, 2)).mean()
    return np.random.default_rng(3).poisson(expected).astype(np.float32)


def solve(
    scan: Scan,
    case: str,
    comm: rk.Ranks | None,
    *,
    stream: bool,
    passes: int = PASSES,
    merge_every: int = 0,
    xp: Any = np,
    batch_size: int | None = None,
) -> tuple[StreamingSolver, np.ndarray]:
    """Reconstruct ``scan`` with the settings of ``case`` on this rank's share (all of it
    with ``comm`` None), the ranks merging ePIE / LSQ-ML every ``merge_every`` batches (0:
    once a pass), on ``xp`` (NumPy or CuPy), with ``batch_size`` in place of the case's;
    returns the solver and the positions of every rank."""
    settings = dict(CASES[case], **({} if batch_size is None else {"batch_size": batch_size}))
    params = IterativeParams(seed=0, **settings)
    group = None if comm is None else rk.RankGroup(comm, merge_every=merge_every)
    s = StreamingSolver(
        probe=xp.asarray(scan.probe_guess), canvas_shape=scan.canvas, params=params, ranks=group
    )
    amplitudes = xp.asarray(scan.amplitudes)
    size = 1 if comm is None else comm.size
    positions = scan.measured if params.position_refinement else scan.positions
    everything = np.arange(len(positions))
    if not stream:
        labels = rk.assign_ranks(positions, size)
        rk.add_share(s, amplitudes, positions, everything, labels)
        s.iterate(passes)
        return s, rk.gather_positions(s)
    labels = rk.assign_ranks(positions, size, extent=scan.extent)
    chunks = np.array_split(everything, CHUNKS)
    for i, chunk in enumerate(chunks):
        part = amplitudes[xp.asarray(chunk)]
        rk.add_share(s, part, positions[chunk], chunk, labels[chunk])
        early = passes // (2 * CHUNKS)  # between chunks; the rest after the last one
        s.iterate(early if i < CHUNKS - 1 else passes - (CHUNKS - 1) * early)
    return s, rk.gather_positions(s)


def outcome(scan: Scan, s: StreamingSolver, positions: np.ndarray) -> dict[str, Any]:
    """What the tests compare: the state's data error (all ranks), the object's error
    against the phantom, the positions' error, the global position model's scales (1
    without one), and a digest of the object and probe."""
    digest = hashlib.sha256(
        np.ascontiguousarray(to_host(s.object_modes)).tobytes()
        + np.ascontiguousarray(to_host(s.probe_modes)).tobytes()
    ).hexdigest()
    snap = rk.snapshot(s, state_error=True)  # collective: every rank calls it
    extra = {}
    if "opr_weights" in snap and scan.drift is not None:  # every rank's, in scan order
        weights = snap["opr_weights"]
        extra["opr_rows"] = int(weights.shape[0])
        extra["opr_drift_correlation"] = float(abs(np.corrcoef(weights[:, 1], scan.drift)[0, 1]))
    return {
        **extra,
        "state_error": snap["state_error"],
        "object_error": object_error(scan.obj, snap["object"], scan.mask),
        "model_scale": [snap.get(f"position_model_scale_{a}", 1.0) for a in "yx"],
        "position_error_px": float(np.sqrt(np.mean((positions - scan.positions) ** 2))),
        "measured_position_error_px": float(
            np.sqrt(np.mean((scan.measured - scan.positions) ** 2))
        ),
        "errors": list(s.error_history),
        "digest": digest,
        "frames": s.n_positions,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), nargs="+", required=True)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--merge-every", type=int, default=0, help="batches; 0: each pass")
    parser.add_argument("--batch", type=int, default=None, help="batch size for every case")
    parser.add_argument("--passes", type=int, default=PASSES)
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    parser.add_argument("--comm", choices=["auto", "mpi", "nccl"], default="mpi")
    parser.add_argument("--device-per-rank", action="store_true", help="CuPy: rank r on GPU r")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    gpus = []
    if args.backend == "cupy":  # ranks share GPU 0, or one each
        from mpi4py import MPI

        size = MPI.COMM_WORLD.Get_size()
        gpus = list(range(size)) if args.device_per_rank else [0] * size
    settings = rk.RankSettings(gpus=gpus, comm=args.comm, merge_every=args.merge_every)
    group, xp = rk.join(settings)
    comm = group.comm
    results = {}
    for case in args.case:
        scan = Scan(case)
        s, positions = solve(
            scan,
            case,
            comm,
            stream=args.stream,
            passes=args.passes,
            merge_every=group.merge_every,
            xp=xp,
            batch_size=args.batch,
        )
        result = outcome(scan, s, positions)
        if comm.rank == 0:  # the object itself, for comparisons closer than its errors
            np.save(args.out.with_suffix(f".{case}.npy"), to_host(s.object))
        result["ranks"] = comm.comm.gather(
            {"digest": result["digest"], "frames": result["frames"]}, root=0
        )
        results[case] = result
    if comm.rank == 0:
        args.out.write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
