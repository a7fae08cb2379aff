"""TiledSink: one run's processed container in Tiled, written off the solver's thread.

Layout under ``<catalog_path>/<key>`` (metadata: ``raw_uid``, ``scan_id``,
``status``, parameters, counters)::

    live/          object_amplitude, object_phase, probe, error_history (views to look at:
                   the complex object is in final/, and half the bytes reach Tiled sooner)
    final/         object, object_amplitude, object_phase, probe, positions_m, error_history
                   (and probe_modes / object_modes when the solver has more than one)
    diffraction/   amplitude (float16 sqrt(counts)), indices, positions_m: appended in
                   chunks while the run goes on, in arrival order (see store.diffraction)
    nn/            object, object_amplitude, object_phase, coverage (the NN branch's mosaic)

Live snapshots go through a one-slot mailbox: a newer one replaces an older one
not yet written (counted as ``live_superseded``), so a slow server never slows
the solver; the NN branch's mosaic has a mailbox of its own (``nn_superseded``).
Measured frames are never superseded: they queue in arrival order and the
writer appends whole chunks of them to ``diffraction/`` while the scan runs, so
the final write holds only what changed at the end (the object, probe,
positions, metadata, and the last partial chunk). While Tiled is down the
frames stay queued and are tried again every few seconds.

The final write is ordered so that a reader who sees the container's metadata
say ``finished`` (with its final ``status``) finds the whole result: ``final/``,
then the rest of ``diffraction/`` and its metadata, then the container's
metadata; ``live/`` is brought up to the end only after that (it is not part
of the result). It goes through Tiled's own retries; if Tiled still refuses
it, everything not yet in Tiled is saved to ``<backup_dir>/<key>.npz`` (+
``.json``, which says how many frames Tiled already holds) and the log says
where.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.config.scan import ScanConfig
from hxn_liveptycho.store import diffraction as stored_diffraction
from hxn_liveptycho.store.arrays import ArrayGroup, Layout, append_rows
from hxn_liveptycho.store.recovery import Recovery, UnwrittenResult, save_backup
from hxn_liveptycho.util.counters import Counters
from hxn_liveptycho.util.jsonsafe import json_safe

logger = logging.getLogger(__name__)

ClientFactory = Callable[[], Any]

_OBJECT_KEYS = ("object_amplitude", "object_phase", "probe", "error_history")
_NN_KEYS = ("object", "object_amplitude", "object_phase", "coverage")
_DIFFRACTION_KEYS = ("amplitude", "indices", "positions_m")
#: Seconds between attempts to reach Tiled again after a failed diffraction append.
RETRY_S = 5.0
#: First and longest wait between attempts of the final write (doubling in between).
RETRY_FIRST_S = 0.5
RETRY_LONGEST_S = 8.0


def _with_object_views(snapshot: Mapping[str, Any]) -> dict[str, np.ndarray]:
    arrays = {k: np.asarray(v) for k, v in snapshot.items() if isinstance(v, np.ndarray)}
    if "object" in arrays:
        arrays["object_amplitude"] = np.abs(arrays["object"]).astype(np.float32)
        arrays["object_phase"] = np.angle(arrays["object"]).astype(np.float32)
    return arrays


#: Arrays of ``final/`` made ahead of the result from the live snapshots' layout.
_PREPARED_KEYS = ("object", "object_amplitude", "object_phase", "probe", "positions_m")


def _key_part(text: str) -> str:
    """A piece of the container's key (and backup file name): no '/', nothing a path or a
    URL would read differently."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _live_layout(metadata: Mapping[str, Any]) -> Layout:
    """``live/``'s arrays as the run's canvas fixes them (empty when it does not say)."""
    canvas = metadata.get("canvas") or {}
    shape, window = canvas.get("shape"), canvas.get("window")
    if not shape or not window:
        return {}
    real, cplx = np.dtype(np.float32), np.dtype(np.complex64)
    return {
        "object_amplitude": (tuple(int(n) for n in shape), real),
        "object_phase": (tuple(int(n) for n in shape), real),
        "probe": ((int(window), int(window)), cplx),
    }


class TiledSink:
    """Writes one processed container; every public method returns quickly.

    ``diffraction_chunk_frames`` is how many frames each append to
    ``diffraction/`` carries (None: about
    :data:`~hxn_liveptycho.store.diffraction.CHUNK_BYTES` of them); 0 keeps
    every frame for the final write, the behaviour before appends (for
    benchmarks).
    """

    def __init__(
        self,
        client_factory: ClientFactory,
        *,
        catalog_path: str,
        backup_dir: Path,
        reachable: Callable[[], bool] = lambda: True,
        diffraction_chunk_frames: int | None = None,
        retry_s: float = 0.0,
        recovery: Recovery | None = None,
    ) -> None:
        self._client_factory = client_factory
        self._retry_s = retry_s
        self._recovery = recovery
        self._last_error = ""
        self._reachable = reachable
        self._catalog_path = [p for p in catalog_path.split("/") if p]
        self._backup_dir = Path(backup_dir)
        self.counters = Counters(
            [
                "live_written",
                "live_superseded",
                "nn_written",
                "nn_superseded",
                "write_errors",
                "diffraction_appended",
                "diffraction_in_final",
                "write_retries",
            ]
        )
        self.key: str | None = None
        self.container_path: str | None = None
        self.backup_path: Path | None = None
        #: Where the measured frames went that Tiled did not take after the result was stored.
        self.frames_backup_path: Path | None = None
        #: Set when neither Tiled nor the backup folder took the result: why (both errors).
        #: The result is then held by the recovery (memory) for ``retry-upload``.
        self.write_failure: str | None = None
        #: Called when a result held in memory (see ``write_failure``) reaches Tiled later.
        self.on_stored_later: Callable[[], None] | None = None
        self._final_in_hand: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None
        self._kept = False
        self._final_due = False
        #: When each step of the writer's work happened (``time.monotonic``), first time only:
        #: where a latency the scientist sees is spent, for benchmarks and the run's summary.
        self.timeline: dict[str, float] = {}
        self._metadata: dict[str, Any] = {}
        self._container: Any = None
        self._live: ArrayGroup | None = None
        self._live_layout: Layout = {}
        #: Shape and dtype of each array of the latest live write: the final result's, so
        #: ``final/`` can be made before the result comes (see :meth:`_prepare_final`).
        self._result_layout: Layout = {}
        self._final_group: ArrayGroup | None = None
        self._final_prepared = False
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tiled-arrays")
        self._cond = threading.Condition()
        self._live_slot: Mapping[str, Any] | None = None
        self._nn_slot: Mapping[str, Any] | None = None
        self._nn_latest: Mapping[str, Any] | None = None
        self._nn_arrays: dict[str, Any] = {}
        self._final: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None
        self._closing = False
        self._open_requested = False
        # Measured frames: queued under self._cond; the rest is the writer thread's own.
        self._pending = stored_diffraction.PendingFrames()
        self._chunk_frames = diffraction_chunk_frames
        self._retry_at = 0.0
        self._diffraction_group: Any = None
        self._diffraction_arrays: dict[str, Any] = {}
        #: Rows each diffraction array holds in Tiled; the queue starts at their minimum.
        self._diffraction_rows: dict[str, int] = dict.fromkeys(_DIFFRACTION_KEYS, 0)
        self._diffraction_base = 0
        self._clipped_pixels = 0
        self._thread = threading.Thread(target=self._work, name="liveptycho-tiled", daemon=True)

    # ---- ResultSink protocol ---------------------------------------------------------
    def open(self, config: ScanConfig | None, metadata: Mapping[str, Any]) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        raw_uid = _key_part(str(metadata.get("raw_uid", ""))[:8])
        self.key = f"scan{_key_part(str(metadata.get('scan_id')))}-{raw_uid}-{stamp}"
        self.container_path = "/".join([*self._catalog_path, self.key])
        self._metadata = {"created": datetime.now(UTC).isoformat(), **json_safe(metadata)}
        self._live_layout = _live_layout(self._metadata)
        self.timeline.setdefault("opened", time.monotonic())
        self._open_requested = True
        self._thread.start()

    def live(self, snapshot: Mapping[str, Any]) -> None:
        self.timeline.setdefault("live_handed", time.monotonic())
        with self._cond:
            if self._live_slot is not None:
                self.counters.add("live_superseded")
            self._live_slot = snapshot
            self._cond.notify()

    def nn(self, snapshot: Mapping[str, Any]) -> None:
        """The NN branch's latest mosaic; like ``live``, a newer one replaces an unwritten one."""
        with self._cond:
            if self._nn_slot is not None:
                self.counters.add("nn_superseded")
            self._nn_slot = snapshot
            self._nn_latest = snapshot
            self._cond.notify()

    def diffraction(
        self, indices: np.ndarray, amplitudes: np.ndarray, positions_m: np.ndarray
    ) -> None:
        """Queue measured frames for ``diffraction/``; they are appended while the run goes on.

        The arrays are kept, not copied: the caller hands them over and must not
        change them afterwards.
        """
        with self._cond:
            self._pending.append(
                np.asarray(indices),
                np.asarray(amplitudes, np.float32),
                np.asarray(positions_m),
            )
            if self._chunk_frames is None and self._pending.frame_shape is not None:
                self._chunk_frames = stored_diffraction.chunk_frames_for(self._pending.frame_shape)
            if self._chunk_frames and self._pending.rows >= self._chunk_frames:
                self._cond.notify()

    def final_due(self) -> None:
        """The scan has ended and the final result will follow: append no more frames until
        it is written, so it does not wait behind a chunk's request (the frames stay
        queued, nothing is lost), and make ``final/`` ahead of it."""
        with self._cond:
            self._final_due = True
            self._cond.notify()

    def final(self, snapshot: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
        self.timeline.setdefault("final_handed", time.monotonic())
        with self._cond:
            self._final = (snapshot, metadata)
            self._cond.notify()

    def close(self, timeout: float | None = None) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.error("Tiled writer for %s did not finish in %s s", self.key, timeout)

    @property
    def diffraction_rows_stored(self) -> int:
        """Frames of this run that Tiled holds (in every one of the three arrays)."""
        return self._diffraction_base

    # ---- the writer thread -----------------------------------------------------------
    def _work(self) -> None:
        """The writer never dies: an error no step expected is logged with the run, and what
        was not written is kept (backup, else memory) like any refused write."""
        try:
            self._write_until_done()
        except Exception as exc:
            logger.exception("Tiled writer of %s failed", self.container_path)
            self._last_error = f"writer failed: {type(exc).__name__}: {exc}"
            with self._cond:
                final, self._final = self._final or self._final_in_hand, None
            if self._kept:
                return
            if final is not None:
                snapshot, metadata = final
                self._keep(
                    {**json_safe(metadata), "finished": datetime.now(UTC).isoformat()},
                    final=_with_object_views(snapshot),
                    nn=_with_object_views(self._nn_latest or {}),
                )
            else:
                with contextlib.suppress(Exception):
                    self._keep({**self._metadata, "note": self._last_error})
        finally:
            self._pool.shutdown(wait=False)

    def _write_until_done(self) -> None:
        self._container = self._attempt("create the container", self._create_container)
        if self._container is not None and self._live_layout:
            self._attempt("make live/ ahead", self._live_group)
        while True:
            with self._cond:
                while (
                    self._live_slot is None
                    and self._nn_slot is None
                    and self._final is None
                    and not self._closing
                    and not self._chunk_due()
                    and not self._prepare_due()
                ):
                    self._cond.wait(self._retry_wait())
                live, self._live_slot = self._live_slot, None
                nn, self._nn_slot = self._nn_slot, None
                final, self._final = self._final, None
                closing = self._closing
                chunk_due = self._chunk_due()
                prepare = self._prepare_due()
            if (nn is not None or live is not None or chunk_due) and final is None:
                self._retry_container()
            if nn is not None and self._container is not None:
                try:
                    self._write_nn(nn)
                    self.counters.add("nn_written")
                except Exception as exc:
                    self.counters.add("write_errors")
                    logger.warning("NN mosaic write to %s failed: %s", self.container_path, exc)
            if final is not None:
                self._final_in_hand = final
                self._write_final(*final)
                return
            if prepare:
                self._prepare_final()
            if live is not None and self._container is None:
                self.counters.add("live_skipped")
            if live is not None and self._container is not None:
                try:
                    self._write_live(live)
                    self.counters.add("live_written")
                except Exception as exc:
                    self.counters.add("write_errors")
                    logger.warning("live write to %s failed: %s", self.container_path, exc)
            if chunk_due and self._container is not None and not closing:
                self._append_while_running()
            if closing:
                self._flush_without_final()
                return

    def _chunk_due(self) -> bool:
        """Whether a whole chunk of frames waits and Tiled may be tried (caller holds the lock)."""
        return (
            bool(self._chunk_frames)
            and not self._final_due
            and self._pending.rows >= (self._chunk_frames or 0)
            and time.monotonic() >= self._retry_at
        )

    def _prepare_due(self) -> bool:
        """Whether ``final/`` may be made now (caller holds the lock): the result is due,
        the container exists and a live write has shown the result's shapes."""
        return (
            self._final_due
            and not self._final_prepared
            and self._container is not None
            and bool(self._result_layout)
        )

    def _retry_wait(self) -> float | None:
        """How long the writer may sleep: until the next retry when a chunk waits for one."""
        if self._chunk_frames and not self._final_due and self._pending.rows >= self._chunk_frames:
            return max(0.05, self._retry_at - time.monotonic())
        return None

    def _retry_container(self) -> None:
        """Create the container now if Tiled was down when the run opened (after a pause)."""
        if self._container is not None or time.monotonic() < self._retry_at:
            return
        self._container = self._attempt("create the container", self._create_container)
        if self._container is None:
            self._retry_at = time.monotonic() + RETRY_S

    def _attempt(self, what: str, action: Callable[[], Any]) -> Any:
        """Run one Tiled operation; None if Tiled is down or refused it (logged, counted).

        Tiled's client already retries connection errors and 5xx replies; a
        quick health probe first keeps an outage from costing those retries.
        """
        if not self._reachable():
            self.counters.add("write_errors")
            self._last_error = f"Tiled is unreachable: could not {what}"
            logger.warning("Tiled is unreachable: could not %s for %s", what, self.container_path)
            return None
        try:
            return action()
        except Exception as exc:
            self.counters.add("write_errors")
            self._last_error = f"Tiled: could not {what}: {type(exc).__name__}: {exc}"
            logger.warning("Tiled: could not %s for %s: %s", what, self.container_path, exc)
            return None

    def _retrying(self, what: str, action: Callable[[], Any], began: float) -> bool:
        """``action`` until it succeeds, with backoff, while the run is young (``retry_s``
        from ``began``): an embedded server being restarted, or a remote one's short
        outage, then costs nothing but the wait."""
        delay = RETRY_FIRST_S
        while True:
            if self._attempt(what, action) is not None:
                return True
            if time.monotonic() + delay > began + self._retry_s:
                return False
            self.counters.add("write_retries")
            time.sleep(delay)
            delay = min(2 * delay, RETRY_LONGEST_S)

    def _create_container(self) -> Any:
        node = self._client_factory()
        self.timeline.setdefault("client_ready", time.monotonic())
        for part in self._catalog_path:
            try:
                node = node[part]
            except KeyError:
                try:
                    node = node.create_container(part)
                except Exception:
                    node = node[part]  # another session created it meanwhile
        container = node.create_container(self.key, metadata=self._metadata)
        self.timeline.setdefault("container_created", time.monotonic())
        logger.info("processed container %s created", self.container_path)
        return container

    def _child(self, name: str) -> Any:
        try:
            return self._container[name]
        except KeyError:
            return self._container.create_container(name)

    def _live_group(self) -> ArrayGroup:
        """``live/``, with the arrays the canvas fixes made at once (before the first frame)."""
        if self._live is None:
            self._live = ArrayGroup(self._child("live"))
            self.timeline.setdefault("live_group_made", time.monotonic())
            self._live.make_ahead(self._live_layout, self._pool)
            self.timeline.setdefault("live_made", time.monotonic())
        return self._live

    def _write_live(self, snapshot: Mapping[str, Any]) -> None:
        arrays = _with_object_views(snapshot)
        live = self._live_group()
        # In parallel: the server takes several requests at once, and the picture is
        # there when the last of them is.
        self._all_done(
            self._pool.submit(live.extend if key == "error_history" else live.put, key, arrays[key])
            for key in _OBJECT_KEYS
            if key in arrays
        )
        layout = {
            key: (arrays[key].shape, arrays[key].dtype) for key in _PREPARED_KEYS if key in arrays
        }
        if layout != self._result_layout:
            self._result_layout = layout
            self._final_prepared = False  # made ahead with an older layout: make again
        self._container.update_metadata(
            metadata={"iteration": int(snapshot.get("iteration", 0)), "live_updated": time.time()},
            drop_revision=True,
        )
        self.timeline.setdefault("live_written", time.monotonic())

    @staticmethod
    def _all_done(futures: Any) -> None:
        """Wait for every one of ``futures``; the first failure is raised after all ended."""
        pending = list(futures)
        errors = [f.exception() for f in pending]
        for error in errors:
            if error is not None:
                raise error

    def _write_nn(self, snapshot: Mapping[str, Any]) -> None:
        """Overwrite the mosaic in place under ``nn/`` (its canvas never changes shape)."""
        arrays = _with_object_views(snapshot)
        if not arrays:
            return
        group = self._child("nn")
        for key in _NN_KEYS:
            if key not in arrays:
                continue
            client = self._nn_arrays.get(key)
            if client is None:
                self._nn_arrays[key] = group.write_array(arrays[key], key=key)
            else:
                client.write(arrays[key])
        self._container.update_metadata(
            metadata={"nn_frames": int(snapshot.get("frames", 0)), "nn_updated": time.time()},
            drop_revision=True,
        )

    def _prepare_final(self) -> None:
        """Make ``final/`` and its large arrays (empty) while the last passes run.

        The result then costs one upload per array instead of a creation and an
        upload, and no catalog write competes with it. A later live snapshot of
        another layout makes them again; a result of another layout than the last
        snapshot replaces them when it is written.
        """
        self._final_prepared = True
        try:
            if self._final_group is None:
                self._final_group = ArrayGroup(self._child("final"))
            self._final_group.make_ahead(self._result_layout, self._pool)
        except Exception as exc:
            logger.info("final/ not made ahead for %s: %s", self.container_path, exc)
        self.timeline.setdefault("final_prepared", time.monotonic())

    # ---- diffraction/: appended in chunks --------------------------------------------
    def _append_while_running(self) -> None:
        """Append the whole chunks waiting (a few per request); on failure, retry later."""
        chunk = self._chunk_frames or 0
        with self._cond:
            whole = (self._pending.rows // chunk) * chunk
        rows = chunk if not self._diffraction_arrays else whole
        rows = min(rows, chunk * stored_diffraction.MAX_CHUNKS_PER_REQUEST)
        if rows <= 0:
            return
        done = self._attempt("append diffraction frames", lambda: self._append_rows(rows))
        if not done:
            self._retry_at = time.monotonic() + RETRY_S
        else:
            self.counters.add("diffraction_appended", done)

    def _append_all(self) -> int:
        """Append every queued frame (the final write); raises if Tiled refuses."""
        chunk = self._chunk_frames or 1024
        written = 0
        while True:
            with self._cond:
                left = self._pending.rows
            if left <= 0:
                return written
            first = not self._diffraction_arrays
            rows = min(left, chunk if first else chunk * stored_diffraction.MAX_CHUNKS_PER_REQUEST)
            written += self._append_rows(rows)

    def _append_rows(self, rows: int) -> int:
        """Write the first ``rows`` queued frames to each array that lacks them; rows now stored.

        Each array is appended at its own length, so an attempt that failed half
        way (one array written, the next not) is completed, never duplicated.
        """
        with self._cond:
            held = max(self._diffraction_rows.values()) - self._diffraction_base
            rows = max(rows, held)
            queued = self._pending.peek(rows)
        rows = len(queued)
        group = self._diffraction_group_node()
        for key in _DIFFRACTION_KEYS:
            stored = self._diffraction_rows[key]
            start = stored - self._diffraction_base
            if start >= rows:
                continue
            clipped = 0
            if key == "amplitude":
                data, clipped = queued.encoded(start)
            else:
                data = queued.indices(start) if key == "indices" else queued.positions(start)
            self._diffraction_arrays[key], self._diffraction_rows[key] = append_rows(
                group,
                key,
                data,
                first=stored,
                client=self._diffraction_arrays.get(key),
                held=stored,
            )
            self._clipped_pixels += clipped  # counted once written, not once per attempt
        done = min(self._diffraction_rows.values()) - self._diffraction_base
        with self._cond:
            self._pending.drop(done)
            self._diffraction_base += done
        return done

    def _diffraction_group_node(self) -> Any:
        if self._diffraction_group is None:
            try:
                self._diffraction_group = self._container["diffraction"]
            except KeyError:
                self._diffraction_group = self._container.create_container(
                    "diffraction",
                    metadata=stored_diffraction.group_metadata(self._chunk_frames or 0),
                )
        return self._diffraction_group

    def _flush_without_final(self) -> None:
        """Closed before any final result: store the queued frames, in Tiled or the backup."""
        with self._cond:
            left = self._pending.rows
        if not left:
            return
        if (
            self._container is not None
            and self._attempt("append diffraction frames", self._append_all) is not None
        ):
            return
        self._keep({**self._metadata, "note": "closed before its final result"})

    # ---- the final write -------------------------------------------------------------
    def _write_final(self, snapshot: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
        """The result first (object, probe, positions, status), then the frames still queued.

        The scientist waits for the result; the measured frames are a copy of what
        the raw run holds, so at a high frame rate the backlog Tiled has not yet
        taken is appended after the result is visible. ``diffraction.complete``
        in the container's metadata says when they all are (or where the rest
        went: the local backup).
        """
        self.timeline.setdefault("final_started", time.monotonic())
        metadata = {**json_safe(metadata), "finished": datetime.now(UTC).isoformat()}
        arrays = _with_object_views(snapshot)
        appended = self._diffraction_base

        def diffraction_state(complete: bool) -> dict[str, Any]:
            with self._cond:
                queued = self._pending.rows
            return {
                "frames": self._diffraction_base + queued,
                "stored": self._diffraction_base,
                "complete": complete,
                "order": "arrival",
                "appended_while_running": appended,
            }

        def write_result() -> bool:
            if self._container is None:
                self._container = self._create_container()
            if self._nn_latest is not None and not self._nn_arrays:
                self._write_nn(self._nn_latest)  # Tiled was down while the branch ran
            if arrays:
                if self._final_group is None:
                    self._final_group = ArrayGroup(self._child("final"))
                final = self._final_group
                # In parallel: the scientist waits for the last of them, and one request at
                # a time leaves the server idle between them.
                self._all_done(
                    self._pool.submit(final.put, key, value) for key, value in arrays.items()
                )
                self.timeline.setdefault("final_arrays_written", time.monotonic())
            self._container.update_metadata(
                metadata={**metadata, "diffraction": diffraction_state(False)}
            )
            self.timeline.setdefault("final_metadata_written", time.monotonic())
            return True

        def write_frames() -> bool:
            in_final = self._append_all()
            self.counters.add("diffraction_in_final", in_final)
            frames = self._diffraction_base
            if frames:
                self._diffraction_group_node().update_metadata(
                    metadata={
                        "frames": frames,
                        "complete": True,
                        "clipped_pixels": self._clipped_pixels,
                    }
                )
            self._container.update_metadata(
                metadata={"diffraction": diffraction_state(True)}, drop_revision=True
            )
            return True

        began = self.timeline.get("final_handed", time.monotonic())
        if not self._retrying("write the final result", write_result, began):
            nn = _with_object_views(self._nn_latest or {})
            self._keep(metadata, final=arrays, nn=nn)
            return
        if not self._retrying("append the remaining diffraction frames", write_frames, began):
            self._keep(metadata, result_in_tiled=True)
            if self.frames_backup_path is None:
                return
            with contextlib.suppress(Exception):
                self._container.update_metadata(
                    metadata={
                        "diffraction": {
                            **diffraction_state(False),
                            "backup_path": str(self.frames_backup_path),
                        }
                    },
                    drop_revision=True,
                )
            return
        if arrays:
            # live/ shows the end too, but after the result is complete: it is not part of
            # it, and writing the object twice before the metadata doubled the wait for it.
            try:
                self._write_live(snapshot)
            except Exception as exc:
                self.counters.add("write_errors")
                logger.warning("live write to %s failed: %s", self.container_path, exc)

    def _keep(
        self,
        metadata: Mapping[str, Any],
        *,
        final: Mapping[str, np.ndarray] | None = None,
        nn: Mapping[str, np.ndarray] | None = None,
        result_in_tiled: bool = False,
    ) -> None:
        """What Tiled did not take goes to ``<backup_dir>/<key>.npz`` (+ ``.json``); if the
        disk refuses too, the recovery keeps it in memory and the run is failed with both
        errors. Either way it is uploaded when Tiled answers again."""
        with self._cond:
            rows = self._pending.rows
            queued = self._pending.peek(rows)
        frames = {}
        if rows:
            frames = {
                "amplitude": queued.encoded()[0],
                "indices": queued.indices(),
                "positions_m": queued.positions(),
            }
        result = UnwrittenResult(
            key=str(self.key),
            container_path=str(self.container_path),
            metadata=json.loads(json.dumps(dict(metadata), default=str)),
            final=dict(final or {}),
            nn=dict(nn or {}),
            frames=frames,
            frames_in_tiled=self._diffraction_base,
            result_in_tiled=result_in_tiled,
            errors=[self._last_error or "Tiled refused it"],
            on_uploaded=self.on_stored_later,
        )
        self._kept = True
        try:
            path = save_backup(result, self._backup_dir)
        except Exception as exc:
            failed = f"backup to {self._backup_dir} failed: {type(exc).__name__}: {exc}"
            result.errors.append(failed)
            self.write_failure = "; ".join(result.errors)
            if self._recovery is not None:
                self._recovery.keep(result)
            logger.error(
                "%s of %s is in memory only (retry-upload writes it): %s",
                "frames" if result_in_tiled else "the result",
                self.container_path,
                self.write_failure,
            )
            return
        if self._recovery is not None:
            self._recovery.backed_up()
        if result_in_tiled:
            self.frames_backup_path = path
            logger.error(
                "Tiled did not take the last diffraction frames of %s; saved to %s",
                self.container_path,
                path,
            )
            return
        self.backup_path = path
        logger.error(
            "Tiled refused the final result of %s; saved to %s instead", self.container_path, path
        )
