"""The probe modes' orthogonalisation on the GPU: right, and what it costs.

Checks the fused unitary (``recon._fused.mode_unitary``, one launch) against the xp
path's (``orthogonalize_modes``: cuSOLVER's eigh) for 2 to 12 modes, equal powers
included; times both alone (host time to issue one call, and the time of one call when
calls run back to back); then times the three-mode cases with the solver's default
``orthogonalize_every`` (fused), with the xp path's orthogonalisation in its place, and
with none (``recon_gpu.timed``), on the same data in the same run.

    PYTHONPATH=. python3 benchmarks/mode_orthogonalisation.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import time
from dataclasses import replace
from typing import Any
from unittest import mock

import numpy as np

from benchmarks.recon_gpu import make_solver, timed
from hxn_liveptycho.recon import pass_end
from hxn_liveptycho.recon._fused import mix_modes, mode_unitary
from hxn_liveptycho.recon._modes import orthogonalize_modes
from hxn_liveptycho.recon.iterative import IterativeParams
from hxn_liveptycho.sim.sample import SimulatedBeamline, SimulatedSample

log = logging.getLogger(__name__)


def random_modes(modes: int, n: int, powers: np.ndarray | None = None) -> np.ndarray:
    """(modes, n, n) complex64, far from orthogonal; ``powers``: the relative powers of
    the orthogonal set they mix (default 1, 1/2, 1/3, ...)."""
    rng = np.random.default_rng(modes)
    flat = rng.normal(size=(modes, n * n)) + 1j * rng.normal(size=(modes, n * n))
    q, _ = np.linalg.qr(flat.T)  # orthonormal columns
    w = 1 / np.arange(1, modes + 1) if powers is None else powers
    mixing = np.linalg.qr(rng.normal(size=(modes, modes)) + 1j * rng.normal(size=(modes, modes)))[0]
    return (mixing @ (np.sqrt(w)[:, None] * q.T)).reshape(modes, n, n).astype(np.complex64)


def fused_orthogonalisation(modes: Any) -> tuple[Any, Any]:
    """The solver's fused path: the unitary in one launch, the modes mixed in place."""
    u = mode_unitary(modes)
    mix_modes(modes[None], u)
    return modes, u


def check(cp: Any, modes: int, n: int, powers: np.ndarray | None = None) -> dict[str, float]:
    """The fused result against the xp path's: the unitaries, the modes (relative), and,
    whatever the powers, how orthogonal the fused modes are and whether their incoherent
    sum is kept."""
    host = random_modes(modes, n, powers)
    ref, u_ref = orthogonalize_modes(cp.asarray(host), cp)
    new, u = fused_orthogonalisation(cp.asarray(host.copy()))  # mixed in place
    ref, u_ref, new, u = (cp.asnumpy(a) for a in (ref, u_ref, new, u))
    flat = new.reshape(modes, -1).astype(np.complex128)
    gram = flat @ flat.conj().T
    off = np.abs(gram - np.diag(np.diag(gram))).max() / np.abs(np.diag(gram)).max()
    power = np.diag(gram).real
    summed = np.sum(np.abs(host.astype(np.complex128)) ** 2, axis=0)
    return {
        "unitary_max_diff": float(np.abs(u - u_ref).max()),
        "modes_rel_diff": float(np.linalg.norm(new - ref) / np.linalg.norm(ref)),
        "off_diagonal": float(off),
        "sorted": bool(np.all(np.diff(power) <= 1e-6 * power[0])),
        "incoherent_sum_rel_diff": float(
            np.abs(np.sum(np.abs(flat) ** 2, axis=0) - summed.ravel()).max() / summed.max()
        ),
    }


def time_alone(cp: Any, modes: int, n: int, calls: int, fused: bool) -> dict[str, float]:
    """Host µs to issue one call, and µs a call of ``calls`` run back to back."""
    probes = cp.asarray(random_modes(modes, n))

    def once(p: Any) -> Any:
        return fused_orthogonalisation(p)[0] if fused else orthogonalize_modes(p, cp)[0]

    probes = once(probes)  # compile, plan, allocate
    cp.cuda.Device().synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        probes = once(probes)
    issued = time.perf_counter() - t0
    cp.cuda.Device().synchronize()
    total = time.perf_counter() - t0
    return {"host_us_per_call": 1e6 * issued / calls, "us_per_call": 1e6 * total / calls}


def previous_orthogonalisation(solver: Any) -> None:
    """The orthogonalisation before the fused unitary: cuSOLVER's eigh on the xp path, the
    momentum mixed by matmul, DM's waves by ``mix_modes`` (stands in for
    :func:`hxn_liveptycho.recon.pass_end.orthogonalize`)."""
    solver._probes, u = orthogonalize_modes(solver._probes, solver._xp)
    solver._probe_momentum.mix(u)
    if solver._dm_waves is not None and solver._dm_ready:
        mix_modes(solver._dm_waves[: solver._dm_ready], u)


def no_orthogonalisation(solver: Any) -> None:
    """The same schedule with nothing done."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=32, help="positions: side x side")
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--algorithms", nargs="+", default=["epie", "lsqml", "dm"])
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import cupy as cp

    report: dict[str, Any] = {"checks": [], "alone": [], "cases": []}
    for modes, powers in [(k, None) for k in (2, 3, 4, 5, 6, 12)] + [
        (3, np.array([1.0, 1.0, 0.5])),  # two of equal power: u is not unique, the rest is
        (2, np.array([1.0, 1e-6])),  # one mode all but empty
    ]:
        r = {"modes": modes, "powers": None if powers is None else powers.tolist()}
        r |= check(cp, modes, 256, powers)
        report["checks"].append(r)
        log.info("check %s", r)
    for modes in (2, 3, 6, 12):
        for fused in (False, True):
            r = {"modes": modes, "fused": fused} | time_alone(cp, modes, 256, 200, fused)
            report["alone"].append(r)
            log.info("alone %s", r)
    big = SimulatedBeamline.for_window(256, step_px=20.0, photons_per_frame=5e5)
    sample = SimulatedSample(replace(big, x_num=args.side, y_num=args.side))
    for algorithm in args.algorithms:
        for whole in (True, False):
            row: dict[str, Any] = {"algorithm": algorithm, "whole_pixel": whole}
            for label, change in (
                ("fused", None),
                ("previous", previous_orthogonalisation),
                ("off", no_orthogonalisation),
            ):
                params = IterativeParams(
                    algorithm=algorithm,
                    probe_modes=3,
                    batch_size=128,
                    subpixel_positions=not whole,
                )
                solver = make_solver(sample, cp, params)
                with contextlib.ExitStack() as stack:
                    if change is not None:
                        stack.enter_context(mock.patch.object(pass_end, "orthogonalize", change))
                    times = timed(cp, solver, args.iterations, args.rounds)
                row[label] = float(np.median(times))
                del solver
                cp.get_default_memory_pool().free_all_blocks()
            log.info("%s", row)
            report["cases"].append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
