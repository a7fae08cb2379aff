"""Solver checkpoints on local disk: what a restarted engine needs to take a run up again.

Why: a serve process that dies mid-scan (a crash, SIGKILL, a node reboot) loses the
solver's state with it, and the frames it had received. A :class:`Checkpoint` is
written beside the run's live snapshots (at most every ``checkpoint_interval_s``):
the solver's object, probe modes, positions, iteration and error history, a hash of
the run's configuration, the documents that configure the run again (start,
descriptors, the baseline reading, the ``stop`` when it came), how many frames were
used, the detector window and the container the run was writing. A restarted
``liveptycho serve`` resumes each run it finds here (see docs/resume.md); the file
is removed once the run's final result is stored.

One run, one file ``<directory>/<uid>.npz`` (the arrays, and the rest as JSON in
``meta``), written to a temporary name and renamed, so a reader sees the previous
checkpoint or the new one, never half of one. A file that cannot be read is reported
in one line and moved to ``<directory>/corrupt/``. :class:`CheckpointStore` is the
API by run uid (save, load, list, remove) that a worker taking over another's runs
uses too; :class:`CheckpointWriter` writes a session's checkpoints on a thread of
its own, newest wins, so the session never waits for the disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.errors import LivePtychoError
from hxn_liveptycho.store.container import key_part
from hxn_liveptycho.util.jsonsafe import json_safe

__all__ = [
    "CHECKPOINT_FORMAT",
    "Checkpoint",
    "CheckpointError",
    "CheckpointStore",
    "CheckpointWriter",
    "config_hash",
    "light_header",
]

logger = logging.getLogger(__name__)

#: The layout of a checkpoint file; a file of another format is refused, not guessed at.
CHECKPOINT_FORMAT = 1
_SUFFIX = ".npz"
#: The folder under ``data_dir`` that holds the checkpoints.
CHECKPOINT_FOLDER = "checkpoints"
_ARRAYS = ("object", "probe", "positions_px", "error_history")


class CheckpointError(LivePtychoError, ValueError):
    """A checkpoint file that cannot be read (truncated, not ours, another format)."""


def config_hash(config: Mapping[str, Any]) -> str:
    """A short hash of a run's configuration (a ScanConfig's JSON dump): a checkpoint is
    restored onto a solver only when the run is configured again the same way."""
    text = json.dumps(json_safe(config), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Checkpoint:
    """One run's solver state and what configures the run again.

    ``documents`` are ``(name, doc)`` pairs in arrival order, the ``start`` first;
    ``object`` (H, W) complex64 is the solver's first object mode, ``probe`` (k, n, n)
    complex64 its probe modes, ``positions_px`` (N, 2) the solver's (refined) positions
    of the frames it held, ``error_history`` the running error of each pass.
    """

    uid: str
    documents: list[tuple[str, dict[str, Any]]]
    overrides: dict[str, Any]
    settings_hash: str
    iteration: int
    object: np.ndarray
    probe: np.ndarray
    positions_px: np.ndarray
    error_history: np.ndarray = field(default_factory=lambda: np.zeros(0))
    frames_received: int = 0
    frames_used: int = 0
    #: The Eiger series header's plain entries (beam centre, frame time).
    series_header: dict[str, Any] = field(default_factory=dict)
    #: The detector window the run cut its frames to: (y0, y1, x0, x1).
    window: tuple[int, int, int, int] | None = None
    #: Which streams were open, and which had been armed, when it was written.
    streams_open: dict[str, bool] = field(default_factory=dict)
    streams_seen: dict[str, bool] = field(default_factory=dict)
    #: The processed container the run was writing (catalog path), if it had one.
    container_path: str | None = None
    #: time.time() when it was made.
    saved_at: float = field(default_factory=time.time)
    #: What made it: the serve's host and process id.
    writer: str = field(default_factory=lambda: f"{os.uname().nodename}:{os.getpid()}")

    @property
    def start(self) -> dict[str, Any]:
        return dict(self.documents[0][1])

    @property
    def scan_id(self) -> Any:
        return self.start.get("scan_id")

    @property
    def stop(self) -> dict[str, Any] | None:
        """The run's ``stop`` document, when it came before the checkpoint."""
        for name, doc in self.documents:
            if name == "stop":
                return dict(doc)
        return None

    def describe(self) -> str:
        """One line for logs: scan, uid, iteration, frames, age."""
        age = max(0.0, time.time() - self.saved_at)
        return (
            f"scan {self.scan_id} ({self.uid[:8]}): iteration {self.iteration}, "
            f"{self.frames_used} frames, saved {age:.0f} s ago by {self.writer}"
        )

    # ---- the file form
    def _meta(self) -> dict[str, Any]:
        return json_safe(
            {
                "format": CHECKPOINT_FORMAT,
                "uid": self.uid,
                "documents": [[name, doc] for name, doc in self.documents],
                "overrides": self.overrides,
                "settings_hash": self.settings_hash,
                "iteration": int(self.iteration),
                "frames_received": int(self.frames_received),
                "frames_used": int(self.frames_used),
                "series_header": self.series_header,
                "window": None if self.window is None else [int(v) for v in self.window],
                "streams_open": self.streams_open,
                "streams_seen": self.streams_seen,
                "container_path": self.container_path,
                "saved_at": self.saved_at,
                "writer": self.writer,
            }
        )

    def write(self, path: Path) -> None:
        """Write to ``path`` atomically (a temporary file in the same folder, then rename)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        arrays: dict[str, Any] = {
            "meta": np.array(json.dumps(self._meta())),
            "object": np.asarray(self.object, dtype=np.complex64),
            "probe": np.asarray(self.probe, dtype=np.complex64).reshape(
                (-1, *np.shape(self.probe)[-2:])
            ),
            "positions_px": np.asarray(self.positions_px, dtype=np.float64).reshape(-1, 2),
            "error_history": np.asarray(self.error_history, dtype=np.float64).ravel(),
        }
        try:
            with temporary.open("wb") as out:
                np.savez(out, **arrays)
                out.flush()
                os.fsync(out.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                temporary.unlink()
            raise

    @classmethod
    def read(cls, path: Path) -> Checkpoint:
        """Read a checkpoint file; CheckpointError says why one cannot be."""
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"][()]))
                arrays = {name: np.array(data[name]) for name in _ARRAYS}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            raise CheckpointError(f"{path.name}: not a readable checkpoint ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
            raise CheckpointError(
                f"{path.name}: checkpoint format {found!r}, this version reads {CHECKPOINT_FORMAT}"
            )
        try:
            documents = [(str(name), dict(doc)) for name, doc in meta["documents"]]
            if not documents or documents[0][0] != "start":
                raise ValueError("its documents do not begin with a start document")
            window = meta.get("window")
            checkpoint = cls(
                uid=str(meta["uid"]),
                documents=documents,
                overrides=dict(meta.get("overrides") or {}),
                settings_hash=str(meta["settings_hash"]),
                iteration=int(meta["iteration"]),
                object=arrays["object"],
                probe=arrays["probe"],
                positions_px=arrays["positions_px"],
                error_history=arrays["error_history"],
                frames_received=int(meta.get("frames_received", 0)),
                frames_used=int(meta.get("frames_used", 0)),
                series_header=dict(meta.get("series_header") or {}),
                window=None
                if window is None
                else (int(window[0]), int(window[1]), int(window[2]), int(window[3])),
                streams_open={str(k): bool(v) for k, v in (meta.get("streams_open") or {}).items()},
                streams_seen={str(k): bool(v) for k, v in (meta.get("streams_seen") or {}).items()},
                container_path=meta.get("container_path"),
                saved_at=float(meta.get("saved_at", 0.0)),
                writer=str(meta.get("writer", "?")),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointError(f"{path.name}: incomplete checkpoint ({exc})") from None
        if checkpoint.object.ndim != 2 or checkpoint.probe.ndim != 3:
            raise CheckpointError(
                f"{path.name}: object {checkpoint.object.shape} and probe "
                f"{checkpoint.probe.shape} are not (H, W) and (k, n, n)"
            )
        return checkpoint


class CheckpointStore:
    """The checkpoints in one folder (``<data_dir>/checkpoints``), by run uid."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @classmethod
    def in_data_dir(cls, data_dir: Path) -> CheckpointStore:
        """The checkpoints of an engine whose ``data_dir`` is given: ``<data_dir>/checkpoints``."""
        return cls(Path(data_dir) / CHECKPOINT_FOLDER)

    @classmethod
    def at(cls, checkpoint_dir: Path | None, data_dir: Path) -> CheckpointStore:
        """``checkpoint_dir`` when set (one folder the serve workers that take over each
        other's runs all read), else ``<data_dir>/checkpoints``."""
        if checkpoint_dir is not None:
            return cls(Path(checkpoint_dir))
        return cls.in_data_dir(data_dir)

    def path(self, uid: str) -> Path:
        return self.directory / f"{key_part(uid)}{_SUFFIX}"

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write (or replace) ``checkpoint``'s file atomically; its path."""
        path = self.path(checkpoint.uid)
        checkpoint.write(path)
        return path

    def load(self, uid: str) -> Checkpoint:
        """Run ``uid``'s checkpoint; FileNotFoundError if none, CheckpointError if unreadable."""
        path = self.path(uid)
        if not path.exists():
            raise FileNotFoundError(f"no checkpoint of run {uid} in {self.directory}")
        return Checkpoint.read(path)

    def uids(self) -> list[str]:
        """The run uids (as their file names spell them) with a checkpoint, oldest first."""
        if not self.directory.is_dir():
            return []
        files = sorted(self.directory.glob(f"*{_SUFFIX}"), key=lambda p: p.stat().st_mtime)
        return [p.name.removesuffix(_SUFFIX) for p in files if not p.name.startswith(".")]

    def load_all(self) -> list[Checkpoint]:
        """Every readable checkpoint, oldest first. One that cannot be read is reported in
        one line and moved to ``corrupt/`` (kept for a person, never read again)."""
        found: list[Checkpoint] = []
        for name in self.uids():
            path = self.directory / f"{name}{_SUFFIX}"
            try:
                found.append(Checkpoint.read(path))
            except CheckpointError as exc:
                moved = self._set_aside(path)
                logger.error("checkpoint skipped: %s; moved to %s", exc, moved)
        return found

    def remove(self, uid: str) -> bool:
        """Delete run ``uid``'s checkpoint; False if there was none."""
        try:
            self.path(uid).unlink()
        except FileNotFoundError:
            return False
        return True

    def _set_aside(self, path: Path) -> Path | str:
        target = self.directory / "corrupt" / path.name
        try:
            target.parent.mkdir(exist_ok=True)
            os.replace(path, target)
        except OSError as exc:
            return f"nowhere ({exc}); it stays where it is"
        return target


class CheckpointWriter:
    """Writes one run's checkpoints on a thread of its own (``liveptycho-checkpoint``).

    :meth:`submit` only hands the newest checkpoint over (one waiting write: a newer
    one replaces it); :meth:`discard` waits for the write under way and removes the
    file (the final result is stored); :meth:`close` ends the thread. A write that
    fails is logged and counted; the run goes on.
    """

    def __init__(self, store: CheckpointStore, uid: str) -> None:
        self.store = store
        self.uid = uid
        self.written = 0
        self.failures = 0
        self._cond = threading.Condition()
        self._pending: Checkpoint | None = None
        self._writing = False
        self._closed = False
        self._discarded = False
        self._thread: threading.Thread | None = None

    def submit(self, checkpoint: Checkpoint) -> None:
        with self._cond:
            if self._closed or self._discarded:
                return
            self._pending = checkpoint
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name=f"liveptycho-checkpoint-{self.uid[:8]}", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closed:
                    self._cond.wait()
                checkpoint, self._pending = self._pending, None
                if checkpoint is None:
                    return
                self._writing = True
            try:
                self.store.save(checkpoint)
                self.written += 1
            except Exception as exc:
                self.failures += 1
                logger.warning("checkpoint of run %s not written: %s", self.uid[:8], exc)
            finally:
                with self._cond:
                    self._writing = False
                    self._cond.notify_all()

    def discard(self, timeout: float = 30.0) -> bool:
        """No more checkpoints: wait for the write under way, then remove the file; True
        when a file was removed."""
        with self._cond:
            self._discarded = True
            self._pending = None
            self._cond.wait_for(lambda: not self._writing, timeout)
        try:
            return self.store.remove(self.uid)
        except OSError as exc:
            logger.warning("checkpoint of run %s not removed: %s", self.uid[:8], exc)
            return False

    def close(self, timeout: float = 30.0) -> None:
        """Write what waits, then end the thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)


def light_header(header: Mapping[str, Any]) -> dict[str, Any]:
    """A series header's plain entries (no flatfield or mask arrays): what a resumed run
    needs of it (beam centre, frame time)."""
    keep = (str, int, float, bool, type(None))
    return {str(k): v for k, v in header.items() if isinstance(v, keep)}
