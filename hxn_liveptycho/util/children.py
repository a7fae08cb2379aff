"""Child processes that never outlive their owner.

Every helper process the project starts (the solver, the NN branch, the
embedded Tiled server, the simulated detectors) calls :func:`exit_with_parent`
first. A watchdog thread notices that the process has been re-parented (its
owner died, even by SIGKILL, with no chance to say so) and exits at once,
whatever the main thread is busy with (a kernel compile, a long pass).

On Linux the kernel can also signal the child when its parent dies
(``PR_SET_PDEATHSIG``), but its "parent" is the *thread* that started the
child: a child started from a short-lived thread would be killed when that
thread ends. Only a caller that starts children from a thread living as long
as the process asks for it (``death_signal=True``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

_PR_SET_PDEATHSIG = 1
#: Seconds between the watchdog's looks at the parent.
WATCH_INTERVAL_S = 0.25


def exit_with_parent(parent_pid: int, *, death_signal: bool = False) -> None:
    """Exit (``os._exit``) as soon as the process ``parent_pid`` is no longer the parent."""
    if death_signal and sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(0)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(WATCH_INTERVAL_S)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def start_spawned(process: Any) -> None:
    """``process.start()`` for a spawn-context process, also from a script read from stdin.

    A spawned child re-runs the parent's ``__main__`` from its file; a script piped in
    (``python - <<EOF``) has ``__file__ == '<stdin>'``, which the child cannot open, and
    it dies at start. Such a main is hidden for the moment of the start (the child needs
    nothing from it: every target lives in the package).
    """
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    hide = (
        main is not None
        and getattr(main, "__spec__", None) is None
        and isinstance(path, str)
        and not os.path.exists(path)
    )
    if not hide:
        process.start()
        return
    with _MAIN_LOCK:
        del main.__file__  # type: ignore[union-attr]
        try:
            process.start()
        finally:
            main.__file__ = path  # type: ignore[union-attr]


_MAIN_LOCK = threading.Lock()


class LogToParent(logging.Handler):
    """A child's log records travel to its parent (``send`` puts them on the child's pipe as
    ``("log", level, logger name, formatted text)``); the parent logs them under the same
    name, so a child's lines reach the host's handlers like any other."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None]) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            self._send(("log", record.levelno, record.name, self.format(record)))
