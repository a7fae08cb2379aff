"""The communicators between the ranks of one scan (:mod:`~hxn_liveptycho.recon.ranks`):
one rank (nothing to combine), MPI through mpi4py (the reference: host buffers, CuPy arrays
staged through them), and NCCL through ``cupy.cuda.nccl`` (device buffers; MPI for the
small host exchanges and to hand out NCCL's id). Each packs the arrays of one call into one
float32 buffer, so a call is one reduction however many arrays it sums, and counts the
seconds and bytes it spent (:class:`CommTime`)."""

from __future__ import annotations

import time
import types
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.recon.backend import array_namespace, to_host

__all__ = ["CommTime", "MpiRanks", "NcclRanks", "OneRank", "Ranks"]


@runtime_checkable
class Ranks(Protocol):
    """A communicator between the ranks that reconstruct one scan."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    def sum(self, *arrays: Any) -> None:
        """Sum each array (float32 or complex64, same shape on every rank) over the ranks,
        in place; every rank gets the same sums."""

    def gather_rows(self, rows: np.ndarray) -> list[np.ndarray]:
        """Every rank's host array ``rows`` (small), in rank order, on every rank."""


@dataclass
class CommTime:
    """What a communicator spent: seconds and bytes in its collectives, and calls."""

    seconds: float = 0.0
    bytes: int = 0
    calls: int = 0


class OneRank:
    """The communicator of a single rank: nothing to combine."""

    rank = 0
    size = 1

    def __init__(self) -> None:
        self.spent = CommTime()

    def sum(self, *arrays: Any) -> None:
        """Nothing to add: the arrays are the sums."""

    def gather_rows(self, rows: np.ndarray) -> list[np.ndarray]:
        return [rows]


def _packed(arrays: tuple[Any, ...], xp: types.ModuleType) -> Any:
    """The arrays (float32 or complex64) as one contiguous float32 buffer, each starting
    at an even float (a complex64 view of it stays 8-byte aligned on the device)."""
    parts = []
    for a in arrays:
        if a.dtype not in (xp.float32, xp.complex64):
            raise TypeError(f"ranks sum float32 or complex64 arrays, not {a.dtype}")
        parts.append(xp.ascontiguousarray(a).reshape(-1).view(xp.float32))
        if parts[-1].size % 2:
            parts.append(xp.zeros(1, dtype=xp.float32))
    return parts[0].copy() if len(parts) == 1 else xp.concatenate(parts)


def _unpack(buffer: Any, arrays: tuple[Any, ...]) -> None:
    """Write the sums in ``buffer`` (as :func:`_packed` laid them out) back into the arrays."""
    start = 0
    for a in arrays:
        width = a.size * (2 if a.dtype.kind == "c" else 1)
        a[...] = buffer[start : start + width].view(a.dtype).reshape(a.shape)
        start += width + width % 2


class MpiRanks:
    """The ranks of an MPI communicator (mpi4py; default ``COMM_WORLD``). Device arrays
    are summed through one host buffer a call; this is the reference communicator."""

    def __init__(self, comm: Any | None = None) -> None:
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ConfigurationError(
                "several ranks need mpi4py and an MPI library (pip install mpi4py; Debian: "
                f"apt-get install openmpi-bin): {exc}"
            ) from exc
        self._mpi = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.spent = CommTime()

    @property
    def rank(self) -> int:
        return int(self.comm.Get_rank())

    @property
    def size(self) -> int:
        return int(self.comm.Get_size())

    def sum(self, *arrays: Any) -> None:
        if not arrays:
            return
        xp = array_namespace(arrays[0])
        began = time.perf_counter()
        buffer = np.ascontiguousarray(to_host(_packed(arrays, xp)))
        self.comm.Allreduce(self._mpi.IN_PLACE, buffer, op=self._mpi.SUM)
        _unpack(xp.asarray(buffer), arrays)
        self._count(began, buffer.nbytes)

    def gather_rows(self, rows: np.ndarray) -> list[np.ndarray]:
        began = time.perf_counter()
        parts = [np.asarray(p) for p in self.comm.allgather(np.asarray(rows))]
        self._count(began, sum(p.nbytes for p in parts))
        return parts

    def _count(self, began: float, nbytes: int) -> None:
        self.spent.seconds += time.perf_counter() - began
        self.spent.bytes += nbytes
        self.spent.calls += 1


class NcclRanks(MpiRanks):
    """The ranks of an MPI communicator with CuPy arrays summed on the devices by NCCL
    (``cupy.cuda.nccl``); the small host exchanges, and handing out NCCL's id, go
    through MPI. Each rank selects its device before it builds this."""

    def __init__(self, comm: Any | None = None) -> None:
        super().__init__(comm)
        from cupy.cuda import nccl

        self._nccl = nccl
        uid = nccl.get_unique_id() if self.rank == 0 else None
        uid = self.comm.bcast(uid, root=0)
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)

    def sum(self, *arrays: Any) -> None:
        if not arrays:
            return
        import cupy as cp

        began = time.perf_counter()
        buffer = _packed(arrays, cp)
        stream = cp.cuda.get_current_stream()
        nccl = self._nccl
        self.nccl_comm.allReduce(
            buffer.data.ptr,
            buffer.data.ptr,
            buffer.size,
            nccl.NCCL_FLOAT32,
            nccl.NCCL_SUM,
            stream.ptr,
        )
        _unpack(buffer, arrays)
        stream.synchronize()  # the time counted is the reduction's, not a queue's
        self._count(began, buffer.nbytes)
