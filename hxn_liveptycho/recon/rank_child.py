"""One of the other ranks of a live scan (rank 1 and up), spawned by the solver process.

    python -m hxn_liveptycho.recon.rank_child REASON_DIR RANK0_PID

(started by :func:`~hxn_liveptycho.recon.rank_hub.start_ranks` through MPI's spawn, never
by hand). It joins rank 0's communicator, then does what rank 0's commands say, one at a
time: open a run's solver, add the frames of its share, run passes, take a snapshot, drop
the run, stop. Between commands it polls (MPI's blocking receive would hold Python's lock,
and nothing could notice that rank 0 is gone); it exits when rank 0 does. A command that
fails writes its reason to ``REASON_DIR`` and exits: rank 0's owner reads it there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import traceback
from typing import Any

import numpy as np

__all__ = ["main"]

logger = logging.getLogger(__name__)

#: Seconds between polls for rank 0's next command.
POLL_S = 0.0005
#: Seconds between checks that rank 0 is still alive.
ALIVE_CHECK_S = 1.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _serve(comm: Any, group: Any, xp: Any, rank0: int) -> bool:
    """Rank 0's commands until it says stop (True) or is gone (False)."""
    from mpi4py import MPI

    from hxn_liveptycho.recon import ranks as rk
    from hxn_liveptycho.recon.iterative import StreamingSolver
    from hxn_liveptycho.recon.rank_hub import COMMAND_TAG, open_share

    solvers: dict[str, Any] = {}
    checked = time.monotonic()
    while True:
        while not comm.Iprobe(source=0, tag=COMMAND_TAG):
            time.sleep(POLL_S)
            now = time.monotonic()
            if now - checked > ALIVE_CHECK_S:
                checked = now
                if not _alive(rank0):
                    return False
        message = comm.recv(source=0, tag=COMMAND_TAG, status=MPI.Status())
        kind = message[0]
        if kind == "stop":
            return True
        run_id = message[1]
        if kind == "open":
            solvers[run_id] = open_share(StreamingSolver, message[2], group, xp)
        elif kind == "add":
            _, _, frames, positions, indices = message
            solver = solvers[run_id]
            solver.add(xp.asarray(frames), positions)
            solver._ranks.indices.append(np.asarray(indices, dtype=np.int64))
        elif kind == "iterate":
            solvers[run_id].iterate(int(message[2]))
        elif kind == "snapshot":
            rk.snapshot(solvers[run_id], state_error=bool(message[2]))
            rk.gather_positions(solvers[run_id])
        elif kind == "drop":
            solvers.pop(run_id, None)
        else:
            raise ValueError(f"unknown command {kind!r}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    reason_dir, rank0 = args[0], int(args[1])
    rank = -1
    try:
        from mpi4py import MPI

        from hxn_liveptycho.recon import ranks as rk
        from hxn_liveptycho.recon.rank_hub import LiveRanks

        parent = MPI.Comm.Get_parent()
        comm = parent.Merge(high=True)
        rank = int(comm.Get_rank())
        settings = LiveRanks(**comm.bcast(None, root=0))
        comm.gather(os.getpid(), root=0)
        group, xp = rk.join(settings, comm=comm)
        if _serve(comm, group, xp, rank0):  # told to stop: leave MPI with rank 0
            comm.Free()
            parent.Disconnect()
            MPI.Finalize()
    except BaseException as exc:
        from hxn_liveptycho.recon.rank_hub import rank_reason

        reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        with contextlib.suppress(OSError):
            rank_reason(reason_dir, rank if rank >= 0 else "new").write_text(reason)
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    # Leave without MPI's teardown: rank 0 leaves without it too (a finalize would wait).
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
