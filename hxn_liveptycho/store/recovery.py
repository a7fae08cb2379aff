"""Results Tiled did not take: kept (on disk, else in memory) and uploaded when it returns.

A run's final write that Tiled refuses, after the sink's retries, becomes an
:class:`UnwrittenResult`: the final arrays, the NN mosaic, the measured frames
Tiled lacks and the container's metadata with the run's terminal state. It is
saved as ``<backup_dir>/<key>.npz`` + ``<key>.json``; when that fails too (a
file where the folder should be, a read-only or full disk) it stays in the
process's memory. Either way :class:`Recovery` holds it, and uploads it when
Tiled answers again: at start (backups of an earlier process), every
:data:`RECOVERY_INTERVAL_S` while anything waits, or when asked
(``liveptycho retry-upload``, the API, ``LivePtycho.retry_uploads()``).
An upload completes the container the run began (or makes it), moves its
metadata to the run's true terminal state, and moves the backup files to
``<backup_dir>/uploaded/``.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.store import diffraction as stored_diffraction
from hxn_liveptycho.store.arrays import ArrayGroup, append_rows
from hxn_liveptycho.store.container import (
    DIFFRACTION_KEYS,
    catalog_node,
    child,
    diffraction_group,
)

logger = logging.getLogger(__name__)

#: Seconds between upload attempts while results wait and Tiled does not answer.
RECOVERY_INTERVAL_S = 10.0


@dataclass
class UnwrittenResult:
    """What of one run Tiled lacks, and the metadata to give its container."""

    key: str
    container_path: str
    metadata: dict[str, Any]
    #: ``final/`` arrays (empty when only frames are missing).
    final: dict[str, np.ndarray] = field(default_factory=dict)
    #: ``nn/`` arrays (the NN branch's mosaic).
    nn: dict[str, np.ndarray] = field(default_factory=dict)
    #: ``diffraction/`` rows Tiled lacks: amplitude (float16), indices, positions_m.
    frames: dict[str, np.ndarray] = field(default_factory=dict)
    #: Rows of ``diffraction/`` Tiled already holds (the frames above follow them).
    frames_in_tiled: int = 0
    #: The result is in Tiled; only frames are missing.
    result_in_tiled: bool = False
    #: Why it is not in Tiled (and, if so, why not on disk).
    errors: list[str] = field(default_factory=list)
    #: Where it is on disk (None: in memory only).
    backup_path: Path | None = None
    #: Told once the result is in Tiled (the run that made it, when in this process).
    on_uploaded: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @property
    def frames_missing(self) -> int:
        return len(self.frames.get("indices", ()))

    def describe(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "container_path": self.container_path,
            "status": self.metadata.get("status"),
            "kept": "local backup" if self.backup_path is not None else "memory",
            "backup_path": str(self.backup_path) if self.backup_path is not None else None,
            "result_in_tiled": self.result_in_tiled,
            "frames_missing": self.frames_missing,
            "errors": list(self.errors),
        }


def save_backup(result: UnwrittenResult, backup_dir: Path) -> Path:
    """Write ``result`` as ``<key>.npz`` + ``<key>.json``; raises when the disk refuses."""
    backup_dir.mkdir(parents=True, exist_ok=True)
    path = backup_dir / f"{result.key}.npz"
    payload: dict[str, Any] = dict(result.final)
    payload.update({f"nn_{k}": v for k, v in result.nn.items()})
    payload.update({f"diffraction_{k}": v for k, v in result.frames.items()})
    np.savez_compressed(path, **payload)
    note = {
        **result.metadata,
        "key": result.key,
        "container_path": result.container_path,
        "result_in_tiled": result.result_in_tiled,
        "diffraction": {
            "in_tiled": result.frames_in_tiled,
            "in_backup": result.frames_missing,
            "order": "arrival",
            "representation": stored_diffraction.REPRESENTATION,
        },
    }
    if result.result_in_tiled:
        note["note"] = "the result is in Tiled; these frames are not"
    path.with_suffix(".json").write_text(json.dumps(note, indent=2, default=str))
    result.backup_path = path
    return path


def keep_unwritten(
    result: UnwrittenResult, backup_dir: Path, recovery: Recovery | None
) -> Path | None:
    """Save ``result`` as a backup; if the disk refuses too, ``recovery`` holds it in memory
    (None is returned and ``result.errors`` says why). Either way it is uploaded when
    Tiled answers again, and the log says where it is."""
    try:
        path = save_backup(result, backup_dir)
    except Exception as exc:
        result.errors.append(f"backup to {backup_dir} failed: {type(exc).__name__}: {exc}")
        if recovery is not None:
            recovery.keep(result)
        logger.error(
            "%s of %s is in memory only (retry-upload writes it): %s",
            "frames" if result.result_in_tiled else "the result",
            result.container_path,
            "; ".join(result.errors),
        )
        return None
    if recovery is not None:
        recovery.backed_up()
    if result.result_in_tiled:
        logger.error(
            "Tiled did not take the last diffraction frames of %s; saved to %s",
            result.container_path,
            path,
        )
    else:
        logger.error(
            "Tiled refused the final result of %s; saved to %s instead",
            result.container_path,
            path,
        )
    return path


def load_backup(note_path: Path) -> UnwrittenResult:
    """A backup written by :func:`save_backup` (or by the sink before it existed)."""
    note = json.loads(note_path.read_text())
    arrays = np.load(note_path.with_suffix(".npz"))
    final: dict[str, np.ndarray] = {}
    nn: dict[str, np.ndarray] = {}
    frames: dict[str, np.ndarray] = {}
    for name in arrays.files:
        if name.startswith("diffraction_"):
            frames[name.removeprefix("diffraction_")] = arrays[name]
        elif name.startswith("nn_"):
            nn[name.removeprefix("nn_")] = arrays[name]
        else:
            final[name] = arrays[name]
    diffraction = note.get("diffraction") or {}
    result_in_tiled = bool(
        note.get("result_in_tiled", str(note.get("note", "")).startswith("the result is in Tiled"))
    )
    metadata = {
        k: v
        for k, v in note.items()
        if k not in ("key", "container_path", "result_in_tiled", "diffraction", "note")
    }
    return UnwrittenResult(
        key=str(note.get("key") or note_path.stem),
        container_path=str(note["container_path"]),
        metadata=metadata,
        final=final,
        nn=nn,
        frames=frames,
        frames_in_tiled=int(diffraction.get("in_tiled", 0)),
        result_in_tiled=result_in_tiled,
        backup_path=note_path.with_suffix(".npz"),
    )


def upload(result: UnwrittenResult, root: Any) -> None:
    """Complete the run's container in Tiled from ``result`` (raises if Tiled refuses).

    Safe to repeat after a failure half way: arrays are overwritten, frames are
    appended only past the rows Tiled already holds.
    """
    container = _container(root, result)
    for name, arrays in (("final", result.final), ("nn", result.nn)):
        if arrays:
            group = ArrayGroup.existing(child(container, name))
            for key, value in arrays.items():
                group.put(key, np.asarray(value))
    stored = result.frames_in_tiled
    if result.frames_missing:
        stored = _append_frames(container, result)
    diffraction = {
        "frames": stored,
        "stored": stored,
        "complete": True,
        "order": "arrival",
    }
    container.update_metadata(
        metadata={
            **result.metadata,
            "diffraction": diffraction,
            "recovered": {
                "from": "local backup" if result.backup_path is not None else "memory",
                "at": datetime.now(UTC).isoformat(),
                "errors": list(result.errors),
            },
        }
    )


def _container(root: Any, result: UnwrittenResult) -> Any:
    """The run's container, made with the result's metadata if the run never made it."""
    parts = [p for p in result.container_path.split("/") if p]
    if not parts:
        return root
    node = catalog_node(root, parts[:-1])
    try:
        return node[parts[-1]]
    except KeyError:
        return node.create_container(parts[-1], metadata=result.metadata)


def _append_frames(container: Any, result: UnwrittenResult) -> int:
    """Append the frames Tiled lacks to each ``diffraction/`` array; rows now stored."""
    group = diffraction_group(container, 0)
    rows = []
    for key in DIFFRACTION_KEYS:
        _, stored = append_rows(group, key, result.frames[key], first=result.frames_in_tiled)
        rows.append(stored)
    stored = min(rows)
    group.update_metadata(metadata={"frames": stored, "complete": True})
    return stored


class Recovery:
    """Results waiting for Tiled: in the backup folder, or in memory when the disk refused."""

    def __init__(
        self,
        backup_dir: Path,
        client: Callable[[], Any],
        reachable: Callable[[], bool],
    ) -> None:
        self.backup_dir = Path(backup_dir)
        self._client = client
        self._reachable = reachable
        self._lock = threading.Lock()  # the lists below
        self._upload_lock = threading.Lock()  # one upload pass at a time
        self._in_memory: dict[str, UnwrittenResult] = {}
        self._failed: dict[str, str] = {}
        self.uploaded: list[str] = []
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- what waits -------------------------------------------------------------------
    def keep(self, result: UnwrittenResult) -> None:
        """A result neither Tiled nor the disk took: held here until it is written."""
        with self._lock:
            self._in_memory[result.key] = result
        self._wake.set()

    def backed_up(self) -> None:
        """A sink saved a backup: look for Tiled soon."""
        self._wake.set()

    def _backups(self) -> list[Path]:
        try:
            notes = sorted(self.backup_dir.glob("*.json"))
        except OSError:
            return []
        return [p for p in notes if p.with_suffix(".npz").is_file()]

    def pending(self) -> list[dict[str, Any]]:
        """Every result waiting for Tiled: in memory, then on disk."""
        with self._lock:
            waiting = [r.describe() for r in self._in_memory.values()]
            failed = dict(self._failed)
        for note in self._backups():
            entry = {"key": note.stem, "kept": "local backup", "backup_path": str(note)}
            if note.stem in failed:
                entry["last_error"] = failed[note.stem]
            waiting.append(entry)
        return waiting

    # ---- uploading ---------------------------------------------------------------------
    def retry(self) -> dict[str, Any]:
        """Upload everything waiting, now. Returns what was uploaded and what still waits."""
        with self._upload_lock:
            uploaded: list[str] = []
            errors: dict[str, str] = {}
            with self._lock:
                in_memory = list(self._in_memory.values())
            backups = self._backups()
            if (in_memory or backups) and not self._reachable():
                errors["tiled"] = "Tiled is not reachable"
            else:
                for result in in_memory:
                    self._try(result, uploaded, errors)
                for note in backups:
                    try:
                        result = load_backup(note)
                    except Exception as exc:
                        errors[note.stem] = f"unreadable backup: {type(exc).__name__}: {exc}"
                        continue
                    self._try(result, uploaded, errors)
            with self._lock:
                self._failed.update(errors)
                for key in uploaded:
                    self._failed.pop(key, None)
                self.uploaded.extend(uploaded)
            return {"uploaded": uploaded, "errors": errors, "pending": self.pending()}

    def _try(self, result: UnwrittenResult, uploaded: list[str], errors: dict[str, str]) -> None:
        try:
            upload(result, self._client())
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            errors[result.key] = error
            with self._lock:
                repeated = self._failed.get(result.key) == error
            if not repeated:  # once per new error, not every pass
                logger.warning("result of %s still not in Tiled: %s", result.container_path, error)
            return
        uploaded.append(result.key)
        with self._lock:
            self._in_memory.pop(result.key, None)
        if result.on_uploaded is not None and result.backup_path is None:
            try:
                result.on_uploaded()
            except Exception:
                logger.exception("telling the run of %s failed", result.container_path)
        if result.backup_path is not None:
            _move_uploaded(result.backup_path)
        logger.info(
            "result of %s uploaded to Tiled from %s; its status is %s",
            result.container_path,
            "the local backup" if result.backup_path is not None else "memory",
            result.metadata.get("status"),
        )

    # ---- in the background ---------------------------------------------------------------
    def start(self) -> None:
        """Upload backups found now, and whatever waits whenever Tiled answers again."""
        self._thread = threading.Thread(target=self._run, name="liveptycho-recovery", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed.is_set():
            with self._lock:
                waiting = bool(self._in_memory)
            if waiting or self._backups():
                try:
                    self.retry()
                except Exception:  # never let the loop die: the next pass tries again
                    logger.exception("uploading kept results failed")
            self._wake.wait(RECOVERY_INTERVAL_S)
            self._wake.clear()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        with self._lock:
            lost = list(self._in_memory.values())
        for result in lost:
            logger.error(
                "result of %s was never written (Tiled and the backup folder refused it): %s",
                result.container_path,
                "; ".join(result.errors),
            )


def _move_uploaded(npz: Path) -> None:
    """Keep an uploaded backup aside (``uploaded/``) rather than delete measured data."""
    done = npz.parent / "uploaded"
    try:
        done.mkdir(exist_ok=True)
        for path in (npz, npz.with_suffix(".json")):
            if path.exists():
                path.replace(done / path.name)
    except OSError as exc:
        logger.warning("uploaded backup %s could not be moved aside: %s", npz, exc)
