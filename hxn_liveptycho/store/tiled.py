"""TiledSink: one run's processed container in Tiled, written off the solver's thread.

The container's layout is in :mod:`~hxn_liveptycho.store.container`; the
measured frames' queue and appends in
:mod:`~hxn_liveptycho.store.diffraction_appends`.

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
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.config.scan import ScanConfig
from hxn_liveptycho.store.container import (
    catalog_node,
    container_key,
    live_layout,
    with_object_views,
)
from hxn_liveptycho.store.diffraction_appends import DiffractionAppends
from hxn_liveptycho.store.image_groups import ImageGroups
from hxn_liveptycho.store.recovery import Recovery, UnwrittenResult, keep_unwritten
from hxn_liveptycho.util.counters import Counters
from hxn_liveptycho.util.jsonsafe import json_safe

logger = logging.getLogger(__name__)

ClientFactory = Callable[[], Any]

#: Seconds between attempts to reach Tiled again after a failed diffraction append.
RETRY_S = 5.0
#: First and longest wait between attempts of the final write (doubling in between).
RETRY_FIRST_S = 0.5
RETRY_LONGEST_S = 8.0


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
        self._images = ImageGroups(self.timeline)
        self._cond = threading.Condition()
        self._live_slot: Mapping[str, Any] | None = None
        self._nn_slot: Mapping[str, Any] | None = None
        self._nn_latest: Mapping[str, Any] | None = None
        self._final: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None
        self._closing = False
        self._open_requested = False
        # Measured frames: queued under self._cond; the rest is the writer thread's own.
        self._frames = DiffractionAppends(self._cond, diffraction_chunk_frames)
        self._retry_at = 0.0
        self._thread = threading.Thread(target=self._work, name="liveptycho-tiled", daemon=True)

    # ---- ResultSink protocol ---------------------------------------------------------
    def open(self, config: ScanConfig | None, metadata: Mapping[str, Any]) -> None:
        self.key = container_key(metadata)
        self.container_path = "/".join([*self._catalog_path, self.key])
        self._metadata = {"created": datetime.now(UTC).isoformat(), **json_safe(metadata)}
        self._images.live_layout = live_layout(self._metadata)
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
            chunk_waits = self._frames.queue(
                np.asarray(indices),
                np.asarray(amplitudes, np.float32),
                np.asarray(positions_m),
            )
            if chunk_waits:
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
        return self._frames.stored

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
                    final=with_object_views(snapshot),
                    nn=with_object_views(self._nn_latest or {}),
                )
            else:
                with contextlib.suppress(Exception):
                    self._keep({**self._metadata, "note": self._last_error})
        finally:
            self._images.close()

    def _write_until_done(self) -> None:
        self._container = self._attempt("create the container", self._create_container)
        if self._container is not None and self._images.live_layout:
            self._attempt("make live/ ahead", lambda: self._images.live_group(self._container))
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
                self._write_image("NN mosaic", self._images.write_nn, nn, "nn_written")
            if final is not None:
                self._final_in_hand = final
                self._write_final(*final)
                return
            if prepare:
                self._images.prepare_final(self._container, self.container_path)
            if live is not None and self._container is None:
                self.counters.add("live_skipped")
            if live is not None and self._container is not None:
                self._write_image("live", self._images.write_live, live, "live_written")
            if chunk_due and self._container is not None and not closing:
                self._append_while_running()
            if closing:
                self._flush_without_final()
                return

    def _write_image(
        self,
        what: str,
        write: Callable[[Any, Mapping[str, Any]], None],
        snapshot: Mapping[str, Any],
        written: str | None,
    ) -> None:
        """A live or NN write: a failure is counted and logged, never raised (a newer
        snapshot replaces what it would have shown); ``written`` counts a success."""
        try:
            write(self._container, snapshot)
            if written is not None:
                self.counters.add(written)
        except Exception as exc:
            self.counters.add("write_errors")
            logger.warning("%s write to %s failed: %s", what, self.container_path, exc)

    def _chunk_due(self) -> bool:
        """Whether a whole chunk of frames waits and Tiled may be tried (caller holds the lock)."""
        return (
            not self._final_due
            and self._frames.chunk_waits()
            and time.monotonic() >= self._retry_at
        )

    def _prepare_due(self) -> bool:
        """Whether ``final/`` may be made now (caller holds the lock): the result is due,
        the container exists and a live write has shown the result's shapes."""
        return (
            self._final_due and self._container is not None and self._images.final_may_be_prepared()
        )

    def _retry_wait(self) -> float | None:
        """How long the writer may sleep: until the next retry when a chunk waits for one."""
        if not self._final_due and self._frames.chunk_waits():
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
        root = self._client_factory()
        self.timeline.setdefault("client_ready", time.monotonic())
        node = catalog_node(root, self._catalog_path)
        container = node.create_container(self.key, metadata=self._metadata)
        self.timeline.setdefault("container_created", time.monotonic())
        logger.info("processed container %s created", self.container_path)
        return container

    # ---- diffraction/: appended in chunks --------------------------------------------
    def _append_while_running(self) -> None:
        """Append the whole chunks waiting (a few per request); on failure, retry later."""
        rows = self._frames.next_append()
        if rows <= 0:
            return
        done = self._attempt(
            "append diffraction frames", lambda: self._frames.append(self._container, rows)
        )
        if not done:
            self._retry_at = time.monotonic() + RETRY_S
        else:
            self.counters.add("diffraction_appended", done)

    def _flush_without_final(self) -> None:
        """Closed before any final result: store the queued frames, in Tiled or the backup."""
        if not self._frames.queued():
            return
        if (
            self._container is not None
            and self._attempt(
                "append diffraction frames", lambda: self._frames.append_all(self._container)
            )
            is not None
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
        arrays = with_object_views(snapshot)
        appended = self._frames.stored

        def diffraction_state(complete: bool) -> dict[str, Any]:
            queued = self._frames.queued()
            return {
                "frames": self._frames.stored + queued,
                "stored": self._frames.stored,
                "complete": complete,
                "order": "arrival",
                "appended_while_running": appended,
            }

        def write_result() -> bool:
            if self._container is None:
                self._container = self._create_container()
            if self._nn_latest is not None and not self._images.nn_written:
                # Tiled was down while the branch ran
                self._images.write_nn(self._container, self._nn_latest)
            if arrays:
                self._images.write_final(self._container, arrays)
            self._container.update_metadata(
                metadata={**metadata, "diffraction": diffraction_state(False)}
            )
            self.timeline.setdefault("final_metadata_written", time.monotonic())
            return True

        def write_frames() -> bool:
            in_final = self._frames.append_all(self._container)
            self.counters.add("diffraction_in_final", in_final)
            frames = self._frames.stored
            if frames:
                self._frames.group(self._container).update_metadata(
                    metadata={
                        "frames": frames,
                        "complete": True,
                        "clipped_pixels": self._frames.clipped_pixels,
                    }
                )
            self._container.update_metadata(
                metadata={"diffraction": diffraction_state(True)}, drop_revision=True
            )
            return True

        began = self.timeline.get("final_handed", time.monotonic())
        if not self._retrying("write the final result", write_result, began):
            nn = with_object_views(self._nn_latest or {})
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
            self._write_image("live", self._images.write_live, snapshot, None)

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
        result = UnwrittenResult(
            key=str(self.key),
            container_path=str(self.container_path),
            metadata=json.loads(json.dumps(dict(metadata), default=str)),
            final=dict(final or {}),
            nn=dict(nn or {}),
            frames=self._frames.unstored(),
            frames_in_tiled=self._frames.stored,
            result_in_tiled=result_in_tiled,
            errors=[self._last_error or "Tiled refused it"],
            on_uploaded=self.on_stored_later,
        )
        self._kept = True
        path = keep_unwritten(result, self._backup_dir, self._recovery)
        if path is None:
            self.write_failure = "; ".join(result.errors)
        elif result_in_tiled:
            self.frames_backup_path = path
        else:
            self.backup_path = path
