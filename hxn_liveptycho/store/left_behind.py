"""What a resumed run finds in Tiled of the process that died: its container and frames.

Why apart from :mod:`.checkpoint` (the local files): these read and write the
processed container the dead process was writing. :func:`stored_frames` reads back
the measured frames it had appended to ``diffraction/`` (a resumed run iterates on
them again), and :func:`mark_left_behind` ends that container ``incomplete`` with a
reason naming the restart, since the resumed run writes a container of its own.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hxn_liveptycho.store.checkpoint import Checkpoint
from hxn_liveptycho.store.diffraction import Diffraction, read_diffraction

__all__ = ["mark_left_behind", "stored_frames"]


def mark_left_behind(root: Any, checkpoint: Checkpoint) -> bool:
    """The container a dead process left ``running`` (``checkpoint.container_path``) is
    marked ``incomplete``, its reason naming the restart: the resumed run writes its
    result to a container of its own (same ``raw_uid``; its metadata ``resumed`` names
    this one). False when there is nothing to mark (no container, or one already ended)."""
    path = checkpoint.container_path
    if not path:
        return False
    node = root
    try:
        for part in (p for p in path.split("/") if p):
            node = node[part]
    except KeyError:
        return False
    metadata = dict(node.metadata)
    if metadata.get("status") != "running":
        return False
    metadata.update(
        status="incomplete",
        reason=(
            "the process writing this run stopped mid-run; it was resumed from its checkpoint "
            f"at iteration {checkpoint.iteration}, and its result is in a newer container "
            "with the same raw_uid (metadata 'resumed')"
        ),
        left_behind_at=datetime.now(UTC).isoformat(),
    )
    node.update_metadata(metadata=metadata)
    return True


def stored_frames(root: Any, container_path: str | None) -> Diffraction | None:
    """The measured frames a run's container holds in ``diffraction/`` (appended in chunks
    while the run went on), in the order they were stored; None when it holds none. What a
    resumed run reads back of the frames the dead process had received: all but those
    still waiting in its memory for a whole chunk."""
    if not container_path:
        return None
    node = root
    try:
        for part in (p for p in container_path.split("/") if p):
            node = node[part]
        if "diffraction" not in node or "amplitude" not in node["diffraction"]:
            return None
        read = read_diffraction(node, order="stored")
    except KeyError:
        return None
    rows = min(len(read.indices), len(read.amplitude), len(read.positions_m))
    if rows == 0:
        return None
    return Diffraction(
        indices=read.indices[:rows],
        amplitude=read.amplitude[:rows],
        positions_m=read.positions_m[:rows],
        order=read.order,
    )
