"""Whether a path a caller gave stays inside a folder it is confined to.

Why a leaf module: the model registry (:mod:`~hxn_liveptycho.nn.registry`) and
the replay of archived runs (:mod:`~hxn_liveptycho.replay.files`) both take
paths from outside and must keep them in their root; one test serves both.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["lies_in"]


def lies_in(root: Path, path: Path) -> bool:
    """Whether ``path`` names a place in ``root`` (already resolved), as written or once
    resolved: a path that only a symlink takes out still lies in it, for the caller to
    refuse with a reason of its own."""
    if Path(os.path.normpath(path)).is_relative_to(root):
        return True
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):
        return False
