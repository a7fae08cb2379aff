"""A live scan over several ranks: the solver process becomes rank 0 and starts the others.

With ``ranks.count`` (or ``ranks.gpus``) above one, the engine's solver process
(:mod:`~hxn_liveptycho.recon.worker_child`) calls :func:`start_ranks`: it initialises
MPI as a singleton (no ``mpiexec`` needed) and spawns the other ranks with
``MPI.COMM_SELF.Spawn`` (OpenMPI starts them through the ``orted`` it runs for the
singleton, and kills them when the singleton dies); each runs
:mod:`~hxn_liveptycho.recon.rank_child`. The parent and its children merge into one
communicator, and every rank joins it as :func:`~hxn_liveptycho.recon.ranks.join` says
(its GPU, MPI or NCCL).

Rank 0 drives: for each open run, a :class:`RankedSolver` stands where the solver
process keeps its :class:`~hxn_liveptycho.recon.iterative.StreamingSolver`, with the
same face. Each arriving chunk of frames is split by position
(:func:`~hxn_liveptycho.recon.ranks.assign_ranks`, equal cuts of the canvas, so a frame's
rank follows from its own position whenever it arrives) and each rank is sent its share
only; every collective step (a pass, a snapshot) is first sent to the other ranks as a
command, so that all of them enter it together. The other ranks wait for commands by
polling (:mod:`~hxn_liveptycho.recon.rank_child`): one that loses rank 0 exits.

A rank that fails writes its reason to ``reason_dir`` and exits; the solver process's
owner (:class:`~hxn_liveptycho.recon.worker.SolverWorker`) watches the ranks' process ids
and ends the solver process, and with it its runs, with that reason: MPI itself would
leave the others waiting in a collective for ever.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, PositiveFloat, PositiveInt, model_validator

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.recon import ranks as rk

__all__ = [
    "COMMAND_TAG",
    "LiveRanks",
    "RankHub",
    "RankedSolver",
    "failed_ranks",
    "rank_reason",
    "start_ranks",
]

logger = logging.getLogger(__name__)

#: The MPI tag of rank 0's commands to the other ranks.
COMMAND_TAG = 7


class LiveRanks(rk.RankSettings):
    """How many ranks reconstruct each live scan, and how (one rank: the solver process
    alone, as without this setting)."""

    count: PositiveInt | None = Field(
        default=None,
        description="Ranks that reconstruct each scan, the solver process being rank 0 and "
        "starting the others itself (MPI); unset: one per GPU named in gpus, or one.",
    )
    start_timeout_s: PositiveFloat = Field(
        default=120.0,
        description="Seconds the solver process waits for its other ranks to start and "
        "join before it gives up with the reason.",
    )

    @model_validator(mode="after")
    def _count_matches_gpus(self) -> LiveRanks:
        if self.count is not None and self.gpus and self.count != len(self.gpus):
            raise ValueError(
                f"ranks.count is {self.count} but ranks.gpus names {len(self.gpus)} GPU(s): "
                "name one per rank, or leave count unset"
            )
        return self

    @property
    def size(self) -> int:
        """How many ranks: ``count``, else one per GPU in ``gpus``, else one."""
        return self.count or len(self.gpus) or 1


def rank_reason(reason_dir: str | Path, rank: int | str) -> Path:
    """Where rank ``rank`` writes why it failed (a rank that failed before it knew its
    number: ``"new"``)."""
    return Path(reason_dir) / f"rank-{rank}.txt"


def failed_ranks(reason_dir: str | Path) -> str | None:
    """The reasons the ranks wrote in ``reason_dir``, one line (None: none failed)."""
    found = sorted(Path(reason_dir).glob("rank-*.txt"))
    reasons = []
    for path in found:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text:
            reasons.append(f"{path.stem.replace('-', ' ')}: {text}")
    return "; ".join(reasons) or None


@dataclass
class RankHub:
    """Rank 0's side of the ranks: the merged communicator, the group every run's solver
    joins, the array module of this rank, the ranks' process ids."""

    comm: Any
    group: rk.RankGroup
    xp: Any
    pids: tuple[int, ...]
    #: The intercommunicator of the spawn (to disconnect from the ranks at the end).
    inter: Any = None

    @property
    def size(self) -> int:
        return int(self.comm.Get_size())

    def send(self, rank: int, message: tuple[Any, ...]) -> None:
        """One command to one rank."""
        self.comm.send(message, dest=rank, tag=COMMAND_TAG)

    def command(self, message: tuple[Any, ...]) -> None:
        """One command to every other rank (before rank 0 enters the same step)."""
        for rank in range(1, self.size):
            self.send(rank, message)

    def close(self) -> None:
        """Tell the other ranks to leave, and leave MPI with them (an orderly end: MPI's
        daemon reports a rank that exits without it as a failure)."""
        try:
            self.command(("stop",))
            self.group.comm = rk.OneRank()  # NCCL's communicator goes before MPI
            self.comm.Free()
            if self.inter is not None:
                self.inter.Disconnect()
            from mpi4py import MPI

            MPI.Finalize()
        except Exception:  # the solver process is leaving anyway
            logger.debug("the ranks could not be told to stop", exc_info=True)


def start_ranks(settings: LiveRanks, reason_dir: str) -> RankHub:
    """Make this process rank 0 of ``settings.size`` ranks: spawn the others, merge, join.
    ConfigurationError (one line, the reason) when mpi4py or MPI is missing or the ranks
    do not start."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ConfigurationError(
            f"{settings.size} ranks need mpi4py and an MPI library (pip install mpi4py; "
            f"Debian: apt-get install openmpi-bin): {exc}"
        ) from exc
    began = time.monotonic()
    info = MPI.Info.Create()
    info.Set("map_by", ":OVERSUBSCRIBE")  # ranks may outnumber the cores (they share GPUs)
    args = ["-m", "hxn_liveptycho.recon.rank_child", str(reason_dir), str(os.getpid())]
    try:
        inter = MPI.COMM_SELF.Spawn(
            sys.executable, args=args, maxprocs=settings.size - 1, info=info
        )
    except MPI.Exception as exc:
        raise ConfigurationError(
            f"could not start {settings.size - 1} more rank(s) (MPI spawn): {exc}"
        ) from exc
    finally:
        info.Free()
    comm = inter.Merge(high=False)
    comm.bcast(settings.model_dump(), root=0)
    pids = tuple(int(p) for p in comm.gather(os.getpid(), root=0) or ())
    group, xp = rk.join(settings, comm=comm)
    logger.info(
        "%d ranks (%s) joined in %.1f s",
        settings.size,
        type(group.comm).__name__,
        time.monotonic() - began,
    )
    return RankHub(comm=comm, group=group, xp=xp, pids=pids, inter=inter)


class RankedSolver:
    """One run's solver spread over the ranks, seen from rank 0: the face of
    :class:`~hxn_liveptycho.recon.iterative.StreamingSolver` the solver process uses, each
    call sending the other ranks what they need and entering the collective steps with
    them. :attr:`n_positions` counts every rank's frames; :attr:`positions_px` is every
    rank's positions as the last :meth:`snapshot` gathered them."""

    def __init__(self, hub: RankHub, run_id: str, spec: dict[str, Any]) -> None:
        from hxn_liveptycho.recon.iterative import StreamingSolver

        self._hub = hub
        self._run_id = run_id
        size = hub.size
        expected = spec.get("expected_positions")
        share = None if expected is None else math.ceil(int(expected) / size)
        settings = {
            "probe": np.asarray(spec["probe"]),
            "canvas_shape": tuple(spec["canvas_shape"]),
            "params": spec["params"],
            "expected_positions": share,
            "object_init": spec.get("object_init"),
            "iteration": int(spec.get("iteration") or 0),
            "error_history": list(spec.get("error_history") or ()),
        }
        hub.command(("open", run_id, settings))
        self.local = open_share(StreamingSolver, settings, hub.group, hub.xp)
        n = int(settings["probe"].shape[-1])
        canvas = np.asarray(settings["canvas_shape"], dtype=np.float64)
        #: Equal cuts of the canvas's window positions: the scan's box before its frames.
        self._extent = (np.zeros(2), np.maximum(canvas - n, 1.0))
        self._total = 0
        self._positions = np.empty((0, 2))
        self.xp = hub.xp

    @property
    def n_positions(self) -> int:
        return self._total

    @property
    def iteration(self) -> int:
        return int(self.local.iteration)

    @property
    def error_history(self) -> list[float]:
        return self.local.error_history

    @property
    def positions_px(self) -> np.ndarray:
        return self._positions.copy()

    @property
    def probe_modes(self) -> Any:
        return self.local.probe_modes

    @property
    def object(self) -> Any:
        return self.local.object

    def add(self, amplitudes: Any, positions_px: Any) -> int:
        """Split the chunk by position; send each rank its share, keep rank 0's."""
        positions = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)
        frames = np.asarray(amplitudes, dtype=np.float32)
        indices = np.arange(self._total, self._total + len(positions), dtype=np.int64)
        labels = rk.assign_ranks(positions, self._hub.size, extent=self._extent)
        for rank in range(1, self._hub.size):
            take = np.flatnonzero(labels == rank)
            if len(take):
                share = (np.ascontiguousarray(frames[take]), positions[take], indices[take])
                self._hub.send(rank, ("add", self._run_id, *share))
        rk.add_share(self.local, self.xp.asarray(frames), positions, indices, labels)
        self._total += len(positions)
        return self._total

    def iterate(self, passes: int) -> None:
        self._hub.command(("iterate", self._run_id, int(passes)))
        self.local.iterate(passes)

    def snapshot(self, *, state_error: bool = False) -> dict[str, Any]:
        """The whole scan's state (collective), and every rank's positions kept for
        :attr:`positions_px`."""
        self._hub.command(("snapshot", self._run_id, bool(state_error)))
        snap = rk.snapshot(self.local, state_error=state_error)
        self._positions = rk.gather_positions(self.local)
        return snap

    def close(self) -> None:
        """The run is over: the other ranks free its state."""
        self._hub.command(("drop", self._run_id))


def open_share(solver_class: Any, settings: dict[str, Any], group: rk.RankGroup, xp: Any) -> Any:
    """This rank's solver of a run (``settings`` as :class:`RankedSolver` sends them), in its
    own :class:`~hxn_liveptycho.recon.ranks.RankGroup` on the ranks' communicator."""
    init = settings.get("object_init")
    solver = solver_class(
        probe=xp.asarray(settings["probe"]),
        canvas_shape=settings["canvas_shape"],
        params=settings["params"],
        xp=xp,
        expected_positions=settings["expected_positions"],
        object_init=1.0 if init is None else init,
        ranks=rk.RankGroup(group.comm, merge_every=group.merge_every),
    )
    if settings["iteration"]:
        solver._iteration = settings["iteration"]
    solver.error_history.extend(float(e) for e in settings["error_history"])
    return solver
