"""One scan over several ranks (data parallel): each rank reconstructs its share of the
positions and the ranks combine their object and probe with collective operations.

Every rank runs the ordinary :class:`~hxn_liveptycho.recon.iterative.StreamingSolver`
on its own frames (a compact region of the scan: :func:`assign_ranks`) and holds the
whole object canvas and the probe modes, identical on every rank between passes. The
solver meets the other ranks at a few points of a pass, through the :class:`RankGroup`
it holds; with one rank (:class:`OneRank`, the default) every one of them returns at
once and the solver is the single-process one, bit for bit.

What is combined, and when:

* **DM** (a pass is one overlap projection over all positions): the object's numerator
  and illumination, then the probe's numerator and object power, are summed over the
  ranks before they are divided (:meth:`RankGroup.sum`). The result is the single-rank
  pass up to the order of float32 sums.
* **ePIE and LSQ-ML** (sequential mini-batch updates): each rank sweeps its own
  positions batch by batch on its copy, as the single-rank solver does on all of them;
  at the end of the pass (:meth:`RankGroup.merge`) the ranks' changes are combined, the
  object's as the illumination-weighted mean of the ranks' changes (where one rank's
  positions alone light a pixel, that rank's change; in the overlap of two regions, their
  mean weighted by each one's ``sum |P|^2``), the probe's as the mean of the ranks'
  changes weighted by their position counts. One reduction a pass, not one a batch; or,
  with ``RankGroup(comm, merge_every=k)``, one every k batches of each rank (merging after
  every batch is one global batch: ``sum_r den_r (num_r / den_r) / sum_r den_r``). Per
  pass, R ranks update a pixel as often as one rank with R times their batch: give each
  rank ``batch_size / R`` to keep the single rank's convergence per pass.
* **Errors**: each pass's squared error and the data's power are summed, so every rank
  reports the error of the whole scan.
* **Position refinement**: each rank estimates its positions' shifts; at the pass end the
  measured, current and estimated positions of all ranks are gathered (small: six
  numbers a position) and every rank applies the same global step (the zero-mean drift
  and the global position model see every position, in acquisition order), then keeps
  its own rows (:meth:`RankGroup.apply_shifts`).
* **The probe's power**: fixed once from all ranks' frames (the first :meth:`iterate
  <hxn_liveptycho.recon.iterative.StreamingSolver.iterate>` that has frames anywhere).
* Momentum, the gauge, the clamp and the modes' orthogonalisation run after the merge, on
  identical arrays: every rank computes the same.
* **OPR** (the variable probe): each rank keeps its positions' weights; the eigen-probes'
  pass step and the weights' mean are summed over the ranks at the pass end
  (:mod:`~hxn_liveptycho.recon.opr`), and the snapshot gathers the weights in scan order.

Every rank calls ``iterate`` (and ``state_error``, :func:`gather_positions`) together, the
same number of passes: they are collective. A rank may hold no frames yet.

The communicators (:mod:`~hxn_liveptycho.recon._rank_comms`): :class:`MpiRanks` (mpi4py,
host buffers; the reference) and :class:`NcclRanks` (CuPy device buffers through
``cupy.cuda.nccl``); a pass costs one reduction (DM: two) however many arrays it sums.
Which rank takes which position: :func:`assign_ranks`
(:mod:`~hxn_liveptycho.recon._rank_shares`). How a deployment sets the ranks up:
:class:`RankSettings` and :func:`join`.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.recon import forward, pass_end
from hxn_liveptycho.recon._batch import Batch
from hxn_liveptycho.recon._modes import orthogonalize_modes
from hxn_liveptycho.recon._positions import position_model_entries
from hxn_liveptycho.recon._rank_comms import CommTime, MpiRanks, NcclRanks, OneRank, Ranks
from hxn_liveptycho.recon._rank_shares import assign_ranks, grid_shape
from hxn_liveptycho.recon.backend import array_namespace, to_host

if TYPE_CHECKING:
    from hxn_liveptycho.recon.iterative import StreamingSolver

__all__ = [
    "CommTime",
    "MpiRanks",
    "NcclRanks",
    "OneRank",
    "RankGroup",
    "RankSettings",
    "Ranks",
    "add_share",
    "assign_ranks",
    "gather_positions",
    "grid_shape",
    "join",
    "snapshot",
]


@dataclass
class PassStart:
    """The object and probe modes as the last merge left them (or the pass found them),
    and the batches this rank has run since."""

    objects: Any
    probes: Any
    batches: list[Batch] = field(default_factory=list)


@dataclass
class RankGroup:
    """A solver's place among the ranks: the communicator, the global index of each of
    its frames (acquisition order, for the position model), whether the probe's power is
    the global one yet, and (ePIE, LSQ-ML) how often the ranks merge: at the end of each
    pass (``merge_every`` 0), or every ``merge_every`` batches as well. Its methods are
    the solver's meeting points; with one rank each returns at once."""

    comm: Ranks = field(default_factory=OneRank)
    merge_every: int = 0
    indices: list[np.ndarray] = field(default_factory=list, init=False, repr=False)
    power_shared: bool = field(default=False, init=False)
    _start: PassStart | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.merge_every < 0:
            raise ValueError(
                f"merge_every takes 0 (each pass) or k >= 1 batches, got {self.merge_every}"
            )

    @property
    def size(self) -> int:
        return self.comm.size

    def sum(self, *arrays: Any) -> None:
        """Sum the arrays over the ranks in place (DM's numerators and weights)."""
        if self.comm.size > 1:
            self.comm.sum(*arrays)

    def begin(self, s: StreamingSolver) -> None:
        """At the start of an ``iterate`` call: refuse when no rank has frames, and fix the
        probe's power from all ranks' frames the first time any has some."""
        if self.comm.size == 1 or self.power_shared:
            return
        xp, n = s._xp, s._n
        local = np.array([float(to_host(s._amp_power)), s._n_active], dtype=np.float64)
        power, count = np.sum(self.comm.gather_rows(local), axis=0)
        if count == 0:
            raise RuntimeError("iterate() called before any rank added a frame")
        target = xp.asarray(np.float32(power / (count * n * n)))
        s._probes *= xp.sqrt(target / xp.sum(s._probes.real**2 + s._probes.imag**2)).astype(
            xp.complex64
        )
        if s._probes.shape[0] > 1 and s._probe_power is None:
            s._probes, _ = orthogonalize_modes(s._probes, xp)
        # Ranks that scaled from their own frames first hold a probe rounded a little
        # differently: one mean makes them equal again.
        self.comm.sum(s._probes)
        s._probes /= np.float32(self.comm.size)
        s._probe_power = target.astype(xp.float32)
        self.power_shared = True
        if s._opr is not None:  # OPR's eigen-probes, made from the same probe everywhere
            s._opr.eigen_probes(s)

    def pass_start(self, s: StreamingSolver) -> None:
        """Before an ePIE / LSQ-ML pass: keep what the pass will change (several ranks)."""
        if self.comm.size > 1:
            self._start = PassStart(s._objects.copy(), s._probes.copy())

    def batches(self, s: StreamingSolver, batches: list[Batch]) -> list[Batch | None]:
        """This rank's batches of a pass; merging every few batches, padded with None to
        the most any rank has, so that every rank meets the others as often."""
        if self.comm.size == 1 or self.merge_every == 0:
            return list(batches)
        most = max(int(c[0]) for c in self.comm.gather_rows(np.array([len(batches)])))
        return [*batches, *([None] * (most - len(batches)))]

    def after_batch(
        self, s: StreamingSolver, batch: Batch | None, index: int, update_probe: bool
    ) -> None:
        """After batch ``index`` of a pass (None: this rank had none left): merge every
        ``merge_every`` batches."""
        if self._start is None:
            return
        if batch is not None:
            self._start.batches.append(batch)
        if self.merge_every and (index + 1) % self.merge_every == 0:
            self._merge(s, update_probe)
            self._start = PassStart(s._objects.copy(), s._probes.copy())

    def merge(self, s: StreamingSolver, update_probe: bool, batches: int) -> None:
        """After an ePIE / LSQ-ML pass of ``batches`` batches (as :meth:`batches` listed
        them): every rank's object and probe become the combination of all ranks'
        changes since the last merge (module docstring)."""
        if self._start is None:
            return
        if not (self.merge_every and batches % self.merge_every == 0):
            self._merge(s, update_probe)
        self._start = None

    def _merge(self, s: StreamingSolver, update_probe: bool) -> None:
        """One reduction: the object's illumination-weighted and the probe's
        position-weighted mean change over the ranks."""
        start = self._start
        assert start is not None, "pass_start() keeps the state a merge starts from"
        xp = s._xp
        weight = xp.zeros(s._shape, dtype=xp.float32)
        illumination = forward.probe_intensity(s)
        for batch in start.batches:
            forward.scatter(s, batch, illumination, weight, whole=True)
        change = s._objects - start.objects
        change *= weight
        arrays = [change, weight]
        if update_probe:
            positions = sum(int(b.rows.shape[0]) for b in start.batches)
            count = xp.full((1,), float(positions), dtype=xp.float32)
            probe_change = s._probes - start.probes
            probe_change *= count[0]
            arrays += [probe_change, count]
        self.comm.sum(*arrays)
        change /= xp.maximum(weight, np.float32(1e-30))
        change += start.objects
        s._objects[...] = change
        if update_probe:
            probe_change /= xp.maximum(count[0], np.float32(1.0))
            probe_change += start.probes
            s._probes[...] = probe_change

    def error_sums(self, s: StreamingSolver, errors: Any) -> tuple[Any, Any]:
        """``(errors, data power)`` over all ranks: the passes' squared errors and the
        frames' ``sum A^2`` (on one rank, the solver's own arrays)."""
        if self.comm.size == 1:
            return errors, s._amp_power
        xp = s._xp
        errors = xp.array(errors, dtype=xp.float32)
        power = xp.array(s._amp_power, dtype=xp.float32).reshape(1)
        self.comm.sum(errors, power)
        return errors, power[0]

    def apply_shifts(self, s: StreamingSolver) -> None:
        """Apply the pass's position shifts of all ranks at once, as one rank holding every
        position would (:func:`~hxn_liveptycho.recon.pass_end.apply_shifts`); keep this
        rank's rows."""
        if self.comm.size == 1:
            pass_end.apply_shifts(s)
            return
        m = s._n_active
        mine = np.concatenate(
            [
                np.asarray(to_host(a[:m]), dtype=np.float64).reshape(m, 2)
                for a in (s._meas, s._pos, s._shift)
            ]
            + [self._global_indices(m)[:, None].astype(np.float64)],
            axis=1,
        )
        parts = self.comm.gather_rows(mine)
        rows = np.concatenate(parts)
        order = np.argsort(rows[:, 6], kind="stable")
        rows = rows[order]
        everyone = types.SimpleNamespace(
            _xp=np,
            params=s.params,
            _n_active=len(rows),
            _shape=s._shape,
            _n=s._n,
            _meas=rows[:, 0:2].copy(),
            _pos=rows[:, 2:4].copy(),
            _shift=rows[:, 4:6].copy(),
            _pos_host=None,
        )
        pass_end.apply_shifts(cast("StreamingSolver", everyone))
        moved = np.empty((len(rows), 2))
        moved[order] = everyone._pos
        offset = sum(len(p) for p in parts[: self.comm.rank])
        new = moved[offset : offset + m]
        s._pos[:m] = s._xp.asarray(new)
        s._pos_host = new.copy()
        s._shift[:m] = 0

    def _global_indices(self, m: int) -> np.ndarray:
        """The global (acquisition) index of each of this rank's ``m`` frames, as
        :func:`add_share` recorded them; without a record, this rank's order after the
        lower ranks'. Collective on every path (the counts are gathered either way)."""
        counts = [int(c[0]) for c in self.comm.gather_rows(np.array([m]))]
        if self.indices:
            recorded = np.concatenate(self.indices)
            if len(recorded) == m:
                return recorded
        first = sum(counts[: self.comm.rank])
        return np.arange(first, first + m)


# ---------------------------------------------------------------------- settings


class RankSettings(BaseModel):
    """How the ranks of one scan are set up: their GPUs, their communicator, how often
    ePIE / LSQ-ML merge."""

    model_config = ConfigDict(extra="forbid")

    gpus: list[NonNegativeInt] = Field(
        default_factory=list,
        description="The CUDA device of each rank, in rank order (as many as there are "
        "ranks); empty: the ranks compute on the CPU (NumPy).",
    )
    comm: Literal["auto", "mpi", "nccl"] = Field(
        default="auto",
        description="How the ranks sum: NCCL on the GPUs, or MPI through host memory; auto: "
        "NCCL when every rank has a GPU of its own (NCCL refuses two ranks on one device), "
        "else MPI.",
    )
    merge_every: NonNegativeInt = Field(
        default=0,
        description="ePIE / LSQ-ML: merge the ranks' changes every this many batches as well "
        "as at each pass end; 0: at the pass end only.",
    )


def join(settings: RankSettings, comm: Any | None = None) -> tuple[RankGroup, types.ModuleType]:
    """This process's place among the ranks of MPI communicator ``comm`` (default
    ``COMM_WORLD``): selects its GPU (CuPy) when ``settings.gpus`` names one per rank,
    picks the communicator, and returns the :class:`RankGroup` for its solver and the array
    module to build the solver's arrays with. ConfigurationError when the GPUs do not
    match the ranks or NCCL is asked for without a GPU a rank."""
    ranks = MpiRanks(comm)
    xp: types.ModuleType = np
    gpus = settings.gpus
    if gpus and len(gpus) != ranks.size:
        raise ConfigurationError(
            f"{len(gpus)} GPU(s) named for {ranks.size} rank(s): name one per rank"
        )
    own_gpus = bool(gpus) and len(set(gpus)) == len(gpus)
    if settings.comm == "nccl" and not own_gpus:
        raise ConfigurationError("NCCL needs a GPU of its own for every rank")
    if gpus:
        import cupy

        cupy.cuda.Device(gpus[ranks.rank]).use()
        xp = cupy
    nccl = settings.comm == "nccl" or (settings.comm == "auto" and own_gpus and ranks.size > 1)
    chosen: Ranks = NcclRanks(ranks.comm) if nccl else ranks
    return RankGroup(chosen, merge_every=settings.merge_every), xp


# ---------------------------------------------------------------------- a rank's frames


def add_share(
    s: StreamingSolver,
    amplitudes: Any,
    positions_px: np.ndarray,
    indices: np.ndarray,
    labels: np.ndarray,
) -> int:
    """Add this rank's frames of an arriving chunk (``labels`` from :func:`assign_ranks`;
    ``indices``: the frames' global indices in acquisition order) to its solver; returns
    how many it took. Every rank calls it for every chunk (it is not collective, but the
    ``iterate`` that follows is)."""
    group = s._ranks
    take = np.flatnonzero(np.asarray(labels) == group.comm.rank)
    if len(take) == 0:
        return 0
    s.add(amplitudes[array_namespace(amplitudes).asarray(take)], np.asarray(positions_px)[take])
    group.indices.append(np.asarray(indices)[take].astype(np.int64))
    return len(take)


def _all_rows(s: StreamingSolver) -> np.ndarray:
    """Every rank's (measured y, x, current y, x, global index) rows in scan order, on every
    rank (collective)."""
    group, m = s._ranks, s._n_active
    mine = np.concatenate(
        [
            np.asarray(to_host(s._meas[:m]), dtype=np.float64).reshape(m, 2),
            np.asarray(to_host(s._pos[:m]), dtype=np.float64).reshape(m, 2),
            group._global_indices(m)[:, None].astype(np.float64),
        ],
        axis=1,
    )
    rows = np.concatenate(group.comm.gather_rows(mine))
    return rows[np.argsort(rows[:, 4], kind="stable")]


def gather_positions(s: StreamingSolver) -> np.ndarray:
    """All ranks' current positions (N, 2) in global index order, on every rank
    (collective; with one rank, :attr:`~StreamingSolver.positions_px`)."""
    if s._ranks.size == 1:
        return s.positions_px
    return _all_rows(s)[:, 2:4].copy()


def snapshot(s: StreamingSolver, *, state_error: bool = False) -> dict[str, Any]:
    """:meth:`StreamingSolver.snapshot` of the whole scan, on every rank (collective): the
    object and probe (the same on every rank), the error of all ranks' frames, and the
    global position model fitted to every rank's positions, not this rank's alone."""
    snap: dict[str, Any] = dict(s.snapshot(state_error=state_error))
    if s._ranks.size == 1:
        return snap
    rows = _all_rows(s)
    everyone = types.SimpleNamespace(
        params=s.params, _n_active=len(rows), _meas=rows[:, 0:2], _pos=rows[:, 2:4]
    )
    snap = {k: v for k, v in snap.items() if not k.startswith("position_model_")}
    snap.update(position_model_entries(cast("StreamingSolver", everyone)))
    if "opr_weights" in snap:  # this rank's rows: every rank's, in scan order
        weights = np.asarray(snap["opr_weights"], dtype=np.float64)
        mine = np.concatenate([weights, s._ranks._global_indices(len(weights))[:, None]], axis=1)
        rows = np.concatenate(s._ranks.comm.gather_rows(mine))
        rows = rows[np.argsort(rows[:, -1], kind="stable")]
        snap["opr_weights"] = rows[:, :-1].astype(np.float32)
    return snap
