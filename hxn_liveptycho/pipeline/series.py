"""Series (ptycho-tomography): runs whose start documents share a series key, stacked by angle.

A run whose start document holds ``settings.series_key`` (``tomo_series`` by
default) belongs to the series named by its value. Each projection is still
reconstructed as its own run, into its own processed container; the engine's
:class:`SeriesBook` also

- gives each new projection the newest probe of the series (the final probe of
  the one before, else its latest live one) as its starting probe, when
  ``settings.series_seed_probe`` is on;
- stacks the final phase and amplitude of every projection, by angle, in the
  series container (:mod:`hxn_liveptycho.store.series`), updated as each one ends;
- keeps a small copy of each projection's phase for the live page's sinogram.

The angle is the stage angle HXN's reconstruction uses (``ScanConfig.angle_deg``:
baseline ``zpsth`` when the y motor is ``zpssy``, ``dsth`` otherwise, 0 on the
ssx/ssy stage; an override wins), or ``start[settings.series_angle_key]`` when
that is set. The book sees a run through its result sink (:class:`SeriesTap`
wraps the sink the session writes to), so the session knows nothing of series.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from hxn_liveptycho.config.scan import ScanConfig
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.pipeline.result_sink import ResultSink, SinkFactory
from hxn_liveptycho.store.series import StackRow, fit_to, order_key, stack_views

logger = logging.getLogger(__name__)

#: Series kept in memory for status and the live page (the newest).
MAX_SERIES = 8
#: Series whose phase copies are kept for the sinogram (the newest; older ones list only).
SINOGRAM_SERIES = 2
#: Longest side of the copy of each projection's phase kept for the live page.
PREVIEW_SIDE = 128

ProbeSeed = Callable[[int], "np.ndarray | None"]


class SeriesStore(Protocol):
    """Where series containers go (:class:`~hxn_liveptycho.store.series.TiledSeriesStore`)."""

    def path(self, series_id: str) -> str: ...

    def update(
        self,
        series_id: str,
        entries: Sequence[Mapping[str, Any]],
        row: StackRow | None = None,
    ) -> None: ...

    def flush(self, timeout: float | None = None) -> bool: ...

    def close(self, timeout: float | None = None) -> None: ...


def series_of(start: Mapping[str, Any], key: str) -> str | None:
    """The series a run belongs to: ``start[key]`` as text (None: not in a series)."""
    if not key:
        return None
    value = start.get(key)
    if value is None or isinstance(value, bool) or value == "":
        return None
    if isinstance(value, Mapping):  # {"uid": ...} as some plans nest it
        value = value.get("uid")
        if value is None:
            return None
    return str(value)


def projection_angle(
    start: Mapping[str, Any], config: ScanConfig | None, angle_key: str | None
) -> float | None:
    """The projection's angle in degrees (None when the run does not say)."""
    if angle_key:
        value = start.get(angle_key)
        try:
            angle = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None
        return angle if math.isfinite(angle) else None
    return None if config is None else float(config.angle_deg)


def _finite(value: Any) -> float | None:
    """``value`` as a float, None when absent or not finite (JSON has no NaN)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _same_pixel(a: float | None, b: float | None) -> bool:
    """Whether two object pixel sizes agree (within 0.1 %; unknown agrees)."""
    return a is None or b is None or abs(a - b) <= 1e-3 * max(abs(a), abs(b))


def _preview(phase: np.ndarray) -> np.ndarray:
    """Every k-th pixel of ``phase`` so that its longer side is at most PREVIEW_SIDE."""
    step = max(1, math.ceil(max(phase.shape) / PREVIEW_SIDE))
    return np.ascontiguousarray(phase[::step, ::step])


@dataclass
class Projection:
    """One run of a series as the book knows it."""

    raw_uid: str
    scan_id: Any
    arrival: float
    angle_deg: float | None = None
    status: str = "waiting"
    reason: str | None = None
    container_path: str | None = None
    canvas_shape: list[int] | None = None
    iteration: int | None = None
    state_error: float | None = None
    probe_seed_from: str | None = None
    #: The object pixel of its reconstruction: a probe is a seed only at the same one.
    pixel_size_m: float | None = None
    #: Whether its final images went to the stack.
    stacked: bool = False
    #: The final phase, referenced (store.series.stack_views), every k-th pixel; kept for
    #: the newest series only.
    preview: np.ndarray | None = None
    preview_step: int = 1

    def entry(self) -> dict[str, Any]:
        """The projection's line in the series container's metadata and in status."""
        return {
            "raw_uid": self.raw_uid,
            "scan_id": self.scan_id,
            "angle_deg": self.angle_deg,
            "arrival": self.arrival,
            "status": self.status,
            "reason": self.reason,
            "container_path": self.container_path,
            "canvas_shape": self.canvas_shape,
            "iteration": self.iteration,
            "state_error": self.state_error,
            "probe_seed_from": self.probe_seed_from,
        }


@dataclass
class _Series:
    series_id: str
    projections: OrderedDict[str, Projection] = field(default_factory=OrderedDict)
    #: (probe, raw uid it came from, its pixel size in m) of the newest probe seen.
    probe: tuple[np.ndarray, str, float | None] | None = None
    #: The shape the first stacked projection fixed (as the container's).
    shape: tuple[int, int] | None = None

    def ordered(self) -> list[Projection]:
        return sorted(self.projections.values(), key=lambda p: order_key(p.angle_deg, p.arrival))


class SeriesBook:
    """The engine's series: which runs belong together, their probes, their stack."""

    def __init__(self, settings: Settings, store: SeriesStore | None = None) -> None:
        self.settings = settings
        self.store = store
        self._lock = threading.Lock()
        self._series: OrderedDict[str, _Series] = OrderedDict()

    # ---- the engine's dispatcher thread ----------------------------------------------
    def join(self, start: Mapping[str, Any], sink_factory: SinkFactory) -> RunInSeries | None:
        """The run's place in its series (None when it has none): its sink factory, which
        taps the results, and its probe seed."""
        series_id = series_of(start, self.settings.series_key)
        uid = str(start.get("uid") or "")
        if series_id is None or not uid:
            return None
        logger.info(
            "scan %s (%s) is a projection of series %s", start.get("scan_id"), uid[:8], series_id
        )
        return RunInSeries(self, series_id, dict(start), sink_factory)

    # ---- the run's threads -----------------------------------------------------------
    def _projection(self, series_id: str, uid: str) -> tuple[_Series, Projection] | None:
        series = self._series.get(series_id)
        if series is None or uid not in series.projections:
            return None
        return series, series.projections[uid]

    def probe_seed(self, series_id: str, uid: str, n: int) -> np.ndarray | None:
        """The newest probe another projection of the series offered, if its window is
        ``n`` pixels; noted as this projection's seed."""
        with self._lock:
            found = self._projection(series_id, uid)
            if found is None or found[0].probe is None:
                return None
            series, projection = found
            probe, source, pixel_size_m = series.probe  # type: ignore[misc]
            why = None
            if probe.shape[-1] != n or probe.shape[-2] != n:
                why = f"the newest probe is {probe.shape}, this run's window {n}"
            elif not _same_pixel(pixel_size_m, projection.pixel_size_m):
                why = f"its pixel is {pixel_size_m} m, this run's {projection.pixel_size_m} m"
            if why is not None:
                logger.info("series %s: %s starts from its data: %s", series_id, uid[:8], why)
                return None
            projection.probe_seed_from = source
        logger.info(
            "series %s: scan %s starts from the probe of %s", series_id, uid[:8], source[:8]
        )
        return probe

    def opened(self, series_id: str, start: Mapping[str, Any], config: ScanConfig | None) -> None:
        """A projection's results are about to be written (its sink opened): it joins the
        series' list, with its angle. A run skipped before it has a sink never joins."""
        uid = str(start.get("uid"))
        projection = Projection(
            raw_uid=uid,
            scan_id=start.get("scan_id"),
            arrival=float(start.get("time") or 0.0),
            angle_deg=projection_angle(start, config, self.settings.series_angle_key),
            status="running",
            pixel_size_m=None if config is None else float(config.pixel_size_m),
        )
        with self._lock:
            series = self._series.get(series_id)
            if series is None:
                series = self._series[series_id] = _Series(series_id)
            self._series.move_to_end(series_id)
            series.projections[uid] = projection
            while len(self._series) > MAX_SERIES:
                self._series.popitem(last=False)
            for older in list(self._series.values())[:-SINOGRAM_SERIES]:
                for p in older.projections.values():
                    p.preview = None
            entries = [projection.entry()]
        if projection.angle_deg is None:
            logger.warning(
                "series %s: scan %s has no angle (%s); it goes after the others",
                series_id,
                uid[:8],
                f"start[{self.settings.series_angle_key!r}]"
                if self.settings.series_angle_key
                else "no configuration",
            )
        if self.store is not None:
            self.store.update(series_id, entries)

    def offered(self, series_id: str, uid: str, snapshot: Mapping[str, Any]) -> None:
        """A live or final snapshot of a projection: its probe is the series' newest."""
        probe = snapshot.get("probe_modes")
        if probe is None:
            probe = snapshot.get("probe")
        if probe is None:
            return
        with self._lock:
            found = self._projection(series_id, uid)
            if found is not None:
                series, projection = found
                series.probe = (np.asarray(probe), uid, projection.pixel_size_m)

    def finished(
        self,
        series_id: str,
        uid: str,
        snapshot: Mapping[str, Any],
        metadata: Mapping[str, Any],
        container_path: str | None,
    ) -> None:
        """A projection's final result: its status, its row in the stack."""
        obj = snapshot.get("object")
        views = None if obj is None else stack_views(np.asarray(obj), snapshot.get("coverage"))
        with self._lock:
            found = self._projection(series_id, uid)
            if found is None:
                return
            series, projection = found
            projection.status = str(metadata.get("status") or "unknown")
            projection.reason = metadata.get("reason")
            projection.container_path = container_path
            iteration = snapshot.get("iteration")
            projection.iteration = None if iteration is None else int(iteration)
            projection.state_error = _finite(snapshot.get("state_error"))
            row = None
            if views is not None:
                phase, amplitude = views
                projection.canvas_shape = list(phase.shape)
                if series.shape is None:
                    series.shape = (int(phase.shape[0]), int(phase.shape[1]))
                common = fit_to(phase, series.shape)
                projection.preview = _preview(common)
                projection.stacked = True
                projection.preview_step = max(1, math.ceil(max(common.shape) / PREVIEW_SIDE))
                row = StackRow(uid, projection.angle_deg, projection.arrival, phase, amplitude)
            entries = [projection.entry()]
            stacked = sum(1 for p in series.projections.values() if p.stacked)
        logger.info(
            "series %s: scan %s %s at %s°, %d projections stacked",
            series_id,
            uid[:8],
            projection.status,
            projection.angle_deg,
            stacked,
        )
        if self.store is not None:
            self.store.update(series_id, entries, row)

    # ---- queries (any thread) --------------------------------------------------------
    def entry(self, series_id: str, uid: str) -> dict[str, Any] | None:
        """What the book knows of one projection (its line in the container's metadata)."""
        with self._lock:
            found = self._projection(series_id, uid)
            return None if found is None else found[1].entry()

    def status(self) -> list[dict[str, Any]]:
        """Every series in memory, newest last: its projections in angle order."""
        with self._lock:
            series = list(self._series.values())
            views = []
            for s in series:
                ordered = s.ordered()
                views.append(
                    {
                        "series_id": s.series_id,
                        "series_key": self.settings.series_key,
                        "path": None if self.store is None else self.store.path(s.series_id),
                        "projections": [p.entry() for p in ordered],
                        "stacked": sum(1 for p in ordered if p.stacked),
                        "shape": list(s.shape) if s.shape else None,
                    }
                )
        return views

    def sinogram(
        self, series_id: str, row: float | None = None
    ) -> tuple[np.ndarray, list[float | None], int] | None:
        """One row of the stacked phases, projection by projection in angle order:
        (image (projections, x), angles, the row in canvas pixels), None before any.
        ``row`` is a fraction of the height (0 top, 1 bottom; None: the middle)."""
        with self._lock:
            series = self._series.get(series_id)
            if series is None:
                return None
            stacked = [p for p in series.ordered() if p.preview is not None]
            if not stacked:
                return None
            previews = [p.preview for p in stacked]
            angles = [p.angle_deg for p in stacked]
            step = stacked[0].preview_step
        height = previews[0].shape[0]  # type: ignore[union-attr]
        fraction = 0.5 if row is None else min(max(float(row), 0.0), 1.0)
        index = min(int(fraction * height), height - 1)
        image = np.stack([p[index] for p in previews])  # type: ignore[index]
        return image, angles, index * step

    def newest(self) -> str | None:
        with self._lock:
            return next(reversed(self._series), None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the series containers hold every update so far (False: not in time)."""
        return True if self.store is None else self.store.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        if self.store is not None:
            self.store.close(timeout)


class RunInSeries:
    """One run's link to its series: the sink factory that taps its results, and its probe
    seed (for :class:`~hxn_liveptycho.pipeline.solver_link.SolverLink`)."""

    def __init__(
        self, book: SeriesBook, series_id: str, start: dict[str, Any], factory: SinkFactory
    ) -> None:
        self.book = book
        self.series_id = series_id
        self.start = start
        self.uid = str(start["uid"])
        self._factory = factory

    def sink_factory(self) -> ResultSink:
        return SeriesTap(self._factory(), self)

    def probe_seed(self, n: int) -> np.ndarray | None:
        try:
            return self.book.probe_seed(self.series_id, self.uid, n)
        except Exception:  # a seed is a help: never the run's failure
            logger.exception("series %s: no probe seed", self.series_id)
            return None

    def metadata(self) -> dict[str, Any]:
        store = self.book.store
        return {
            "key": self.book.settings.series_key,
            "id": self.series_id,
            "path": None if store is None else store.path(self.series_id),
        }


class SeriesTap:
    """A run's result sink, passed through, telling the series what the run writes."""

    def __init__(self, inner: ResultSink, run: RunInSeries) -> None:
        self._inner = inner
        self._run = run
        self._config: ScanConfig | None = None

    @property
    def on_stored_later(self) -> Callable[[], None] | None:
        return self._inner.on_stored_later

    @on_stored_later.setter
    def on_stored_later(self, value: Callable[[], None] | None) -> None:
        self._inner.on_stored_later = value

    def __getattr__(self, name: str) -> Any:
        # The session reads optional attributes of its sink (final_due, backup_path, ...).
        return getattr(self._inner, name)

    def _safely(self, what: str, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception:  # the series is a view: it never fails the run's own writes
            logger.exception("series %s: %s failed", self._run.series_id, what)

    def open(self, config: ScanConfig | None, metadata: Mapping[str, Any]) -> None:
        self._config = config
        run = self._run
        self._inner.open(config, {**metadata, "series": run.metadata()})
        self._safely(
            "noting the projection", lambda: run.book.opened(run.series_id, run.start, config)
        )

    def live(self, snapshot: Mapping[str, Any]) -> None:
        self._inner.live(snapshot)
        run = self._run
        self._safely(
            "keeping the probe", lambda: run.book.offered(run.series_id, run.uid, snapshot)
        )

    def diffraction(
        self, indices: np.ndarray, amplitudes: np.ndarray, positions_m: np.ndarray
    ) -> None:
        self._inner.diffraction(indices, amplitudes, positions_m)

    def nn(self, snapshot: Mapping[str, Any]) -> None:
        self._inner.nn(snapshot)

    def final(self, snapshot: Mapping[str, Any], metadata: Mapping[str, Any]) -> None:
        run = self._run
        book = run.book
        entry = book.entry(run.series_id, run.uid) or {}
        series_md = {
            **run.metadata(),
            "angle_deg": entry.get("angle_deg"),
            "probe_seed_from": entry.get("probe_seed_from"),
        }
        self._inner.final(snapshot, {**metadata, "series": series_md})
        path = getattr(self._inner, "container_path", None)
        self._safely("keeping the probe", lambda: book.offered(run.series_id, run.uid, snapshot))
        self._safely(
            "stacking the projection",
            lambda: book.finished(run.series_id, run.uid, snapshot, metadata, path),
        )

    def close(self, timeout: float | None = None) -> None:
        self._inner.close(timeout)


__all__ = [
    "MAX_SERIES",
    "ProbeSeed",
    "Projection",
    "RunInSeries",
    "SeriesBook",
    "SeriesStore",
    "SeriesTap",
    "projection_angle",
    "series_of",
]
