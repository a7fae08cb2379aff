"""``live/``, ``nn/`` and ``final/`` of one processed container: the images of a run.

Each is overwritten in place rather than grown: a live snapshot replaces the
last one, the NN branch's mosaic keeps its canvas, and the result is written
once. What the reader waits for is the last array of a write, so the arrays of
one write go up in parallel on a small pool, and the nodes whose layout is
known early (``live/`` from the canvas, ``final/`` from the last live snapshot)
are made while nothing waits (see :mod:`~hxn_liveptycho.store.arrays`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from hxn_liveptycho.store.arrays import ArrayGroup, Layout
from hxn_liveptycho.store.container import (
    NN_KEYS,
    OBJECT_KEYS,
    PREPARED_KEYS,
    QUALITY_KEYS,
    child,
    quality_metadata,
    with_object_views,
)

logger = logging.getLogger(__name__)


def _all_done(futures: Iterable[Future[Any]]) -> None:
    """Wait for every one of ``futures``; the first failure is raised after all ended."""
    pending = list(futures)
    errors = [f.exception() for f in pending]
    for error in errors:
        if error is not None:
            raise error


class ImageGroups:
    """The image groups of one container, written from its sink's writer thread only.

    ``timeline`` is the sink's: the first time each step happened
    (``time.monotonic``), for benchmarks and the run's summary.
    """

    def __init__(self, timeline: dict[str, float]) -> None:
        self._timeline = timeline
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tiled-arrays")
        self._live: ArrayGroup | None = None
        #: ``live/``'s arrays as the run's canvas fixes them (empty when it does not say).
        self.live_layout: Layout = {}
        #: Shape and dtype of each array of the latest live write: the final result's, so
        #: ``final/`` can be made before the result comes (see :meth:`prepare_final`).
        self._result_layout: Layout = {}
        self._final: ArrayGroup | None = None
        self._final_prepared = False
        self._nn_arrays: dict[str, Any] = {}

    @property
    def nn_written(self) -> bool:
        """Whether ``nn/`` holds a mosaic (Tiled may have been down while the branch ran)."""
        return bool(self._nn_arrays)

    def final_may_be_prepared(self) -> bool:
        """Whether a live write has shown the result's shapes and ``final/`` was not made
        ahead with them yet."""
        return not self._final_prepared and bool(self._result_layout)

    def live_group(self, container: Any) -> ArrayGroup:
        """``live/``, with the arrays the canvas fixes made at once (before the first frame)."""
        if self._live is None:
            self._live = ArrayGroup(child(container, "live"))
            self._timeline.setdefault("live_group_made", time.monotonic())
            self._live.make_ahead(self.live_layout, self._pool)
            self._timeline.setdefault("live_made", time.monotonic())
        return self._live

    def write_live(self, container: Any, snapshot: Mapping[str, Any]) -> None:
        arrays = with_object_views(snapshot)
        live = self.live_group(container)
        # In parallel: the server takes several requests at once, and the picture is
        # there when the last of them is.
        _all_done(
            self._pool.submit(live.extend if key == "error_history" else live.put, key, arrays[key])
            for key in OBJECT_KEYS + QUALITY_KEYS
            if key in arrays
        )
        layout = {
            key: (arrays[key].shape, arrays[key].dtype) for key in PREPARED_KEYS if key in arrays
        }
        if layout != self._result_layout:
            self._result_layout = layout
            self._final_prepared = False  # made ahead with an older layout: make again
        container.update_metadata(
            metadata={
                "iteration": int(snapshot.get("iteration", 0)),
                "live_updated": time.time(),
                **quality_metadata(snapshot),
            },
            drop_revision=True,
        )
        self._timeline.setdefault("live_written", time.monotonic())

    def write_nn(self, container: Any, snapshot: Mapping[str, Any]) -> None:
        """Overwrite the mosaic in place under ``nn/`` (its canvas never changes shape)."""
        arrays = with_object_views(snapshot)
        if not arrays:
            return
        group = child(container, "nn")
        for key in NN_KEYS:
            if key not in arrays:
                continue
            client = self._nn_arrays.get(key)
            if client is None:
                self._nn_arrays[key] = group.write_array(arrays[key], key=key)
            else:
                client.write(arrays[key])
        container.update_metadata(
            metadata={"nn_frames": int(snapshot.get("frames", 0)), "nn_updated": time.time()},
            drop_revision=True,
        )

    def prepare_final(self, container: Any, container_path: str | None) -> None:
        """Make ``final/`` and its large arrays (empty) while the last passes run.

        The result then costs one upload per array instead of a creation and an
        upload, and no catalog write competes with it. A later live snapshot of
        another layout makes them again; a result of another layout than the last
        snapshot replaces them when it is written.
        """
        self._final_prepared = True
        try:
            self._final_group(container).make_ahead(self._result_layout, self._pool)
        except Exception as exc:
            logger.info("final/ not made ahead for %s: %s", container_path, exc)
        self._timeline.setdefault("final_prepared", time.monotonic())

    def write_final(self, container: Any, arrays: Mapping[str, np.ndarray]) -> None:
        """The result's arrays into ``final/`` (raises if Tiled refuses any of them)."""
        final = self._final_group(container)
        # In parallel: the scientist waits for the last of them, and one request at
        # a time leaves the server idle between them.
        _all_done(self._pool.submit(final.put, key, value) for key, value in arrays.items())
        self._timeline.setdefault("final_arrays_written", time.monotonic())

    def _final_group(self, container: Any) -> ArrayGroup:
        if self._final is None:
            self._final = ArrayGroup(child(container, "final"))
        return self._final

    def close(self) -> None:
        """Let the pool's threads go once their work is done (nothing waits for them)."""
        self._pool.shutdown(wait=False)
