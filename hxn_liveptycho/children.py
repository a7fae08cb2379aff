"""Child processes that never outlive their owner.

Every helper process the project starts (the solver, the NN branch, the
embedded Tiled server, the simulated detectors) calls :func:`exit_with_parent`
first: on Linux the kernel then sends it SIGTERM when the process that started
it dies, even by SIGKILL, when no ``finally`` block runs. Elsewhere the child
falls back to noticing that its pipe to the parent has closed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def exit_with_parent(expected_parent: int | None = None) -> bool:
    """Ask the kernel to SIGTERM this process when its parent exits; True when it will.

    ``expected_parent`` closes the race where the parent died before this call:
    the process is then already re-parented and exits at once.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except OSError:
        return False
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(0)
    return True
