"""A series' container in Tiled: the final images of a ptycho-tomography series, by angle.

Layout under ``<catalog_path>/series/<series id>``::

    phase       (N, H, W) float32   each projection's final object phase (see stack_views)
    amplitude   (N, H, W) float32   its amplitude
    angles      (N,) float64        the projections' angles in degrees, ascending

Metadata: ``series_key`` and ``series_id`` (the start-document key and its value),
``shape`` (H, W), ``stack`` (``raw_uid`` and ``angle_deg`` of each row, in row order),
``projections`` (every run of the series in angle order: ``raw_uid``, ``scan_id``,
``angle_deg``, ``status``, ``reason``, ``container_path``, ``stack_index`` (None while
it has no row), ``canvas_shape``, ``probe_seed_from``), ``count``, ``updated``.

Rows are in angle order (equal angles in arrival order; a projection without an
angle goes last). The first projection stacked fixes (H, W); a later canvas of
another size is cut or padded about its centre, the padding NaN (no data). A
projection that lands at the end is one append; one that lands before others
rewrites the rows after it. Each run's own container keeps its full result: the
series container is a view of them, written on its own thread, retried while Tiled
refuses it and, when Tiled stays down, lost with a log line (the runs are not).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from hxn_liveptycho.store.container import catalog_node, key_part
from hxn_liveptycho.util.counters import Counters
from hxn_liveptycho.util.jsonsafe import json_safe

logger = logging.getLogger(__name__)

ClientFactory = Callable[[], Any]

#: The child container of ``catalog_path`` that holds the series.
SERIES_GROUP = "series"
#: Seconds between attempts to reach Tiled again after a failed series write.
RETRY_S = 5.0
#: Series whose writer state is kept (the newest); an older one continues from Tiled.
MAX_SERIES_KEPT = 16
#: Fraction of the peak illumination above which a pixel sets the phase reference.
LIT_FRACTION = 0.1


def series_path(catalog_path: str, series_id: str) -> str:
    """Where the container of ``series_id`` lives, as a path below the Tiled root."""
    parts = [p for p in catalog_path.split("/") if p]
    return "/".join([*parts, SERIES_GROUP, key_part(series_id)])


def stack_views(
    obj: np.ndarray, coverage: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(phase, amplitude) float32 of a final object for the stack.

    A ptychographic phase is known up to a constant: the phase is referenced to the
    object's mean over the well-lit pixels (coverage at least :data:`LIT_FRACTION` of
    its peak; all pixels without a coverage map), so every projection's lit region
    sits about zero and rows of different runs compare.
    """
    obj = np.asarray(obj)
    weights = None
    if coverage is not None and np.shape(coverage) == obj.shape:
        cov = np.asarray(coverage, dtype=np.float64)
        peak = float(np.max(cov)) if cov.size else 0.0
        if peak > 0:
            weights = cov >= LIT_FRACTION * peak
    mean = complex(np.mean(obj[weights]) if weights is not None else np.mean(obj))
    reference = mean / abs(mean) if abs(mean) > 0 else 1.0
    phase = np.angle(obj * np.conj(reference)).astype(np.float32)
    return phase, np.abs(obj).astype(np.float32)


def fit_to(image: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``image`` cut or padded (NaN) to ``shape`` about its centre, float32."""
    a = np.asarray(image, dtype=np.float32)
    h, w = int(shape[0]), int(shape[1])
    if a.shape == (h, w):
        return a
    out = np.full((h, w), np.nan, dtype=np.float32)
    ah, aw = a.shape
    rows, cols = min(ah, h), min(aw, w)
    sy, sx = (ah - rows) // 2, (aw - cols) // 2
    dy, dx = (h - rows) // 2, (w - cols) // 2
    out[dy : dy + rows, dx : dx + cols] = a[sy : sy + rows, sx : sx + cols]
    return out


def order_key(angle: float | None, arrival: float) -> tuple[bool, float, float]:
    """The stack's order: by angle, equal angles by arrival, no angle last."""
    missing = angle is None or not math.isfinite(angle)
    return (missing, 0.0 if missing else float(angle), arrival)  # type: ignore[arg-type]


@dataclass
class StackRow:
    """One projection's final images, to be placed in the stack."""

    raw_uid: str
    angle_deg: float | None
    #: When the run started (its start document's time): orders equal angles.
    arrival: float
    phase: np.ndarray
    amplitude: np.ndarray


@dataclass
class _Series:
    """The writer's view of one series: what Tiled holds and what it still lacks."""

    series_id: str
    node: Any = None
    shape: tuple[int, int] | None = None
    #: (raw_uid, angle, arrival) of each row Tiled holds, in row order.
    rows: list[tuple[str, float | None, float]] = field(default_factory=list)
    pending: list[StackRow] = field(default_factory=list)
    #: Metadata of every projection, by raw_uid (those Tiled held before included).
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Arrays a row was written to by an attempt that failed before the row was complete.
    partial: dict[str, set[str]] = field(default_factory=dict)
    #: Updates Tiled lacks; being written.
    dirty: bool = False
    writing: bool = False


class TiledSeriesStore:
    """Writes series containers on one thread; :meth:`update` returns at once."""

    def __init__(
        self,
        client_factory: ClientFactory,
        *,
        catalog_path: str,
        series_key: str,
        reachable: Callable[[], bool] = lambda: True,
        retry_s: float = RETRY_S,
    ) -> None:
        self._client_factory = client_factory
        self.catalog_path = catalog_path
        self.series_key = series_key
        self._reachable = reachable
        self._retry_s = retry_s
        self.counters = Counters(["updates", "rows_written", "rows_rewritten", "write_errors"])
        self._cond = threading.Condition()
        self._series: OrderedDict[str, _Series] = OrderedDict()
        self._closing = False
        self._retry_at = 0.0
        self._thread: threading.Thread | None = None

    def path(self, series_id: str) -> str:
        return series_path(self.catalog_path, series_id)

    # ---- any thread ------------------------------------------------------------------
    def update(
        self,
        series_id: str,
        entries: Sequence[Mapping[str, Any]],
        row: StackRow | None = None,
    ) -> None:
        """Record the projections' metadata (and a new row): written soon, in order."""
        with self._cond:
            if self._closing:
                logger.warning("series %s: update after close not written", series_id)
                return
            state = self._series.get(series_id)
            if state is None:
                state = self._series[series_id] = _Series(series_id)
            self._series.move_to_end(series_id)
            for entry in entries:
                state.entries[str(entry["raw_uid"])] = dict(entry)
            if row is not None:
                state.pending.append(row)
            state.dirty = True
            self.counters.add("updates")
            self._prune()
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._work, name="liveptycho-series-writer", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until Tiled holds every update so far; False as soon as a write fails
        (it is tried again later) or when ``timeout`` passes first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        errors = self.counters.get("write_errors")
        with self._cond:
            while any(s.dirty or s.writing for s in self._series.values()):
                writing = any(s.writing for s in self._series.values())
                if self.counters.get("write_errors") > errors and not writing:
                    return False
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(0.1 if remaining is None else min(0.1, remaining))
        return True

    def close(self, timeout: float | None = None) -> None:
        """Write what waits (one attempt), then stop the writer."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                logger.error("the series writer did not finish in %s s", timeout)

    def _prune(self) -> None:
        """Forget the oldest series that Tiled holds all of (caller holds the lock)."""
        while len(self._series) > MAX_SERIES_KEPT:
            oldest = next(iter(self._series.values()))
            if oldest.dirty or oldest.pending:
                return
            del self._series[oldest.series_id]

    # ---- the writer thread -----------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._closing and not self._due():
                    self._cond.wait(self._wait_s())
                closing = self._closing
                due = [s for s in self._series.values() if s.dirty]
            for state in due:
                self._flush(state)
            if closing:
                with self._cond:
                    lost = [s for s in self._series.values() if s.dirty]
                for state in lost:
                    logger.error(
                        "series %s: %d projections not stacked in Tiled (each run's own "
                        "container holds its result)",
                        state.series_id,
                        len(state.pending),
                    )
                return

    def _due(self) -> bool:
        return any(s.dirty for s in self._series.values()) and time.monotonic() >= self._retry_at

    def _wait_s(self) -> float | None:
        if any(s.dirty for s in self._series.values()):
            return max(0.05, self._retry_at - time.monotonic())
        return None

    def _flush(self, state: _Series) -> None:
        try:
            if not self._reachable():
                raise ConnectionError("Tiled is unreachable")
            self._write(state)
        except Exception as exc:
            self.counters.add("write_errors")
            self._retry_at = time.monotonic() + self._retry_s
            logger.warning(
                "series %s: could not write %s: %s",
                state.series_id,
                self.path(state.series_id),
                exc,
            )

    def _write(self, state: _Series) -> None:
        with self._cond:
            state.dirty = False
            state.writing = True
            pending = list(state.pending)
        try:
            if state.node is None:
                state.node = self._open(state)
            for row in pending:
                self._insert(state, row)
                with self._cond:
                    state.pending.remove(row)
            self._write_metadata(state)
        except Exception:
            with self._cond:
                state.dirty = True  # tried again after RETRY_S
            raise
        finally:
            with self._cond:
                state.writing = False
                self._cond.notify_all()

    def _open(self, state: _Series) -> Any:
        """The series' container, made if new; one Tiled already holds (a restarted serve,
        another process) is continued from its metadata."""
        parts = [p for p in self.catalog_path.split("/") if p]
        parent = catalog_node(self._client_factory(), [*parts, SERIES_GROUP])
        key = key_part(state.series_id)
        try:
            node = parent[key]
        except KeyError:
            node = None
        if node is None:
            try:
                node = parent.create_container(key, metadata=self._metadata(state))
                logger.info("series container %s created", self.path(state.series_id))
                return node
            except Exception:
                node = parent[key]  # made meanwhile by another writer
        held = node.metadata
        stack = list(held.get("stack") or [])
        if stack and "phase" in node:
            state.rows = [
                (str(r["raw_uid"]), r.get("angle_deg"), float(r.get("arrival", i)))
                for i, r in enumerate(stack)
            ]
            state.shape = tuple(int(n) for n in held["shape"])  # type: ignore[assignment]
        for entry in held.get("projections") or []:
            state.entries.setdefault(str(entry["raw_uid"]), dict(entry))
        logger.info(
            "series container %s continued (%d rows)", self.path(state.series_id), len(state.rows)
        )
        return node

    def _insert(self, state: _Series, row: StackRow) -> None:
        node = state.node
        if any(uid == row.raw_uid for uid, _, _ in state.rows):
            return  # written before a failure further on: not twice
        key = order_key(row.angle_deg, row.arrival)
        k = sum(1 for _, angle, arrival in state.rows if order_key(angle, arrival) <= key)
        angle = np.array([np.nan if row.angle_deg is None else row.angle_deg], dtype=np.float64)
        if not state.rows:
            state.shape = (int(row.phase.shape[0]), int(row.phase.shape[1]))
            for name, value in (("phase", row.phase), ("amplitude", row.amplitude)):
                _replace(node, name, fit_to(value, state.shape)[None])
            _replace(node, "angles", angle)
        else:
            assert state.shape is not None
            held = len(state.rows)
            # An attempt of this row that failed half way left some arrays one row longer:
            # those are done already (rewriting them would shift their rows twice).
            retry = row.raw_uid in state.partial
            done = state.partial.setdefault(row.raw_uid, set())
            arrays = (
                ("phase", fit_to(row.phase, state.shape)[None]),
                ("amplitude", fit_to(row.amplitude, state.shape)[None]),
                ("angles", angle),
            )
            for name, block in arrays:
                client = node[name]
                if name in done or (retry and int(client.shape[0]) > held):
                    done.add(name)
                    continue
                if k < held:  # the rows after it move down by one
                    block = np.concatenate([block, np.asarray(client[k:held], dtype=block.dtype)])
                offset = (k,) + (0,) * (block.ndim - 1)
                client.patch(np.ascontiguousarray(block), offset=offset, extend=True)
                done.add(name)
            if k < held:
                self.counters.add("rows_rewritten", held - k)
        state.partial.pop(row.raw_uid, None)
        state.rows.insert(k, (row.raw_uid, row.angle_deg, row.arrival))
        self.counters.add("rows_written")

    def _metadata(self, state: _Series) -> dict[str, Any]:
        index = {uid: i for i, (uid, _, _) in enumerate(state.rows)}
        projections = []
        for entry in state.entries.values():
            uid = str(entry["raw_uid"])
            projections.append({**entry, "stack_index": index.get(uid)})
        projections.sort(key=lambda e: order_key(e.get("angle_deg"), float(e.get("arrival", 0.0))))
        return json_safe(
            {
                "series_key": self.series_key,
                "series_id": state.series_id,
                "shape": list(state.shape) if state.shape else None,
                "stack": [
                    {"raw_uid": uid, "angle_deg": angle, "arrival": arrival}
                    for uid, angle, arrival in state.rows
                ],
                "projections": projections,
                "count": len(state.rows),
                "updated": datetime.now(UTC).isoformat(),
            }
        )

    def _write_metadata(self, state: _Series) -> None:
        state.node.update_metadata(metadata=self._metadata(state), drop_revision=True)


def _replace(node: Any, key: str, value: np.ndarray) -> None:
    """Write ``value`` as array ``key`` of ``node``, replacing one there (a first row that a
    failed attempt left half written)."""
    if key in node:
        node[key].delete(external_only=False)
    node.write_array(np.ascontiguousarray(value), key=key)
