"""The whole live path on embedded defaults: simulated HXN scan → LivePtycho → local Tiled.

Used by ``liveptycho demo`` and by the end-to-end tests, so what a newcomer
runs first is exactly what CI checks.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.recon.metrics import illuminated_mask, object_error, register_object
from hxn_liveptycho.sim import (
    SimEiger,
    SimHXNFlyer,
    SimPanda,
    SimulatedBeamline,
    SimulatedSample,
    baseline_motors,
    fly2dpd,
)

logger = logging.getLogger(__name__)


#: How often the demo reads the engine's status and the processed container back from Tiled.
PROGRESS_INTERVAL_S = 3.0


@dataclass(frozen=True)
class LiveSnapshot:
    """A live snapshot of the processed container, as the demo read it back from Tiled."""

    iteration: int
    #: When the writer wrote it (``live_updated`` in the container's metadata; wall clock).
    written: float
    #: When the demo read it from Tiled (wall clock).
    seen: float


@dataclass
class DemoResult:
    raw_uid: str
    exit_status: str
    container_path: str | None
    tiled_uri: str | None
    status: str | None
    object_error: float | None
    iterations: int
    seconds: float
    pictures: list[Path] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Wall-clock times of the run's start and stop documents.
    start_time: float | None = None
    stop_time: float | None = None
    #: Each distinct live snapshot the demo saw in Tiled, in the order it saw them.
    snapshots: list[LiveSnapshot] = field(default_factory=list)
    #: What the simulated Eiger's process reported (frames published, rate achieved).
    acquisition: dict[str, Any] = field(default_factory=dict)

    @property
    def snapshots_before_stop(self) -> list[LiveSnapshot]:
        """Live snapshots already read back from Tiled when the scan's stop document was made."""
        if self.stop_time is None:
            return []
        return [s for s in self.snapshots if s.seen < self.stop_time]


def final_object_error(
    sample: SimulatedSample, run_node: Any
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Error of the reconstruction against the phantom over the well-lit region (see metrics).

    Returns the error, the phantom's field of view, the reconstruction cut to it, and the mask.
    """
    recon = run_node["final"]["object"].read()
    origin_um = run_node.metadata["canvas"]["origin_um"]
    truth, estimate, mask = aligned_pair(sample, recon, origin_um)
    return object_error(truth, estimate, mask), truth, estimate, mask


def aligned_pair(
    sample: SimulatedSample, recon: np.ndarray, canvas_origin_um: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The phantom and the reconstruction cut to the scanned field of view, and its well-lit mask.

    Phantom pixel ``q`` sits at stage coordinate ``origin_sim + q dx``; canvas
    pixel ``q`` of the reconstruction at ``origin_canvas + (q - n/2) dx``
    (see :class:`~hxn_liveptycho.pipeline.geometry.CanvasGeometry`), which fixes the
    whole-pixel offset between them; the metric registers the rest.
    """
    bl = sample.beamline
    dx_um = bl.pixel_size_m * 1e6
    n = bl.window
    offset = np.rint((sample.origin_um - np.asarray(canvas_origin_um)) / dx_um + n / 2).astype(int)
    truth_tl = sample.positions_px
    lo = np.maximum(np.floor(truth_tl.min(axis=0)).astype(int), 0)
    hi = np.minimum(np.ceil(truth_tl.max(axis=0)).astype(int) + n, sample.object.shape)
    lo = np.maximum(lo, -offset)
    hi = np.minimum(hi, np.asarray(recon.shape) - offset)
    truth = sample.object[lo[0] : hi[0], lo[1] : hi[1]]
    estimate = recon[lo[0] + offset[0] : hi[0] + offset[0], lo[1] + offset[1] : hi[1] + offset[1]]
    mask = illuminated_mask(truth_tl - lo, sample.probe, truth.shape)
    return truth, estimate, mask


def run_demo(
    out_dir: Path,
    *,
    data_dir: Path | None = None,
    beamline: SimulatedBeamline | None = None,
    iterations: int = 100,
    array_backend: str = "auto",
    mode: str = "iterative",
    tiled_uri: str | None = None,
    dwell: float = 0.06,
    encoding: str = "bs32-lz4<",
    progress: Callable[[dict[str, Any]], None] | None = None,
    progress_interval_s: float = PROGRESS_INTERVAL_S,
    keep: Callable[[LivePtycho], None] | None = None,
) -> DemoResult:
    """Run one simulated fly scan with LivePtycho subscribed; write pictures to ``out_dir``.

    ``progress`` is called from a background thread every ``progress_interval_s``
    while the scan and its reconstruction run, with ``LivePtycho.status()`` plus a
    ``"demo"`` entry: the frames the simulated Eiger has published and the live
    snapshots read back from Tiled, so a user sees the run is live, not only its end.
    """
    from bluesky import RunEngine
    from bluesky.run_engine import RunEngineResult

    began = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    bl = beamline or SimulatedBeamline()
    logger.info(
        "simulating a %d x %d point scan, %d² window, %.3f s a frame (%.0f s of acquisition)",
        bl.x_num,
        bl.y_num,
        bl.window,
        dwell,
        bl.x_num * bl.y_num * dwell,
    )
    sample = SimulatedSample(bl)
    eiger = SimEiger(encoding=encoding)
    panda = SimPanda()
    settings = Settings(
        eiger_endpoint=eiger.endpoint,
        panda_endpoint=panda.endpoint,
        data_dir=data_dir or out_dir / "data",
        tiled_uri=tiled_uri,
        array_backend=array_backend,
        overrides={
            "recon": {"iterations": iterations},
            "roi": {"size": bl.window},
            "mode": mode,
        },
        live_interval_s=1.0,
    )
    live = LivePtycho(settings)
    watch: _Watch | None = None
    try:
        flyer = SimHXNFlyer(eiger, panda, sample, dwell=dwell)
        flyer.prepare()  # the Eiger's process simulates the frames while the rest starts
        # PUB/SUB drops what is sent before a subscriber has joined: wait for the receivers.
        eiger.wait_for_subscribers(1, timeout=10.0)
        panda.wait_for_subscribers(1, timeout=10.0)
        RE = RunEngine({}, call_returns_result=True)
        RE.subscribe(live)
        watch = _Watch(live, flyer, progress, progress_interval_s)
        RE.subscribe(watch.document)
        watch.start()
        result = RE(fly2dpd(flyer, baseline=baseline_motors(bl.energy_kev)))
        assert isinstance(result, RunEngineResult)  # call_returns_result=True
        raw_uid = result.run_start_uids[0]
        live.wait()
        watch.close()
        watch.tick()  # the final state, read back once more
        return _report(sample, live, raw_uid, result.exit_status, out_dir, began, keep, watch)
    finally:
        if watch is not None:
            watch.close()
        live.close()
        eiger.close()
        panda.close()


class _Watch(threading.Thread):
    """Reads the engine's status and the processed container in Tiled every few seconds.

    What it reads from Tiled is the evidence that the run is live: each new
    ``live_updated`` in the container's metadata is a snapshot already stored.
    It never raises into the demo; a read that fails is logged at debug level.
    """

    def __init__(
        self,
        live: LivePtycho,
        flyer: SimHXNFlyer,
        progress: Callable[[dict[str, Any]], None] | None,
        interval: float,
    ) -> None:
        super().__init__(name="liveptycho-demo-watch", daemon=True)
        self.live = live
        self.flyer = flyer
        self.progress = progress
        self.interval = interval
        self.raw_uid: str | None = None
        self.start_time: float | None = None
        self.stop_time: float | None = None
        self.snapshots: list[LiveSnapshot] = []
        self._container: Any = None
        self._closed = threading.Event()
        self._lock = threading.Lock()

    def document(self, name: str, doc: dict[str, Any]) -> None:
        """RunEngine subscription: note the run's uid and when it started and stopped."""
        if name == "start":
            self.raw_uid, self.start_time = doc["uid"], doc["time"]
        elif name == "stop":
            self.stop_time = doc["time"]

    def run(self) -> None:
        while not self._closed.wait(self.interval):
            self.tick()

    def close(self) -> None:
        self._closed.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join()

    def tick(self) -> None:
        with self._lock:
            try:
                status = self.live.status()
                self._read_tiled()
                eiger = self.flyer.eiger.counters
                latest = self.snapshots[-1] if self.snapshots else None
                status["demo"] = {
                    "frames_published": eiger["frames_published"],
                    "frames_planned": eiger["frames_planned"],
                    "acquiring": self.start_time is not None and self.stop_time is None,
                    "live_snapshots": len(self.snapshots),
                    "tiled_iteration": latest.iteration if latest else None,
                }
                if self.progress is not None:
                    self.progress(status)
            except Exception:
                logger.debug("demo progress failed", exc_info=True)

    def _read_tiled(self) -> None:
        tiled = self.live.tiled
        if tiled is None or tiled.uri is None or self.raw_uid is None:
            return  # Tiled not up yet (its client would wait for it), or no run yet
        try:
            if self._container is None:
                self._container = self._find(tiled.client())
            if self._container is None:
                return
            metadata = self._container.refresh().metadata
        except Exception:
            logger.debug("reading the processed container back from Tiled failed", exc_info=True)
            return
        seen = time.time()
        written = metadata.get("live_updated")
        if written is None or (self.snapshots and self.snapshots[-1].written == written):
            return
        self.snapshots.append(
            LiveSnapshot(iteration=int(metadata.get("iteration", 0)), written=written, seen=seen)
        )

    def _find(self, client: Any) -> Any:
        from tiled.queries import Eq

        catalog = client
        for part in self.live.settings.catalog_path.split("/"):
            if part not in catalog:
                return None
            catalog = catalog[part]
        return next(iter(catalog.search(Eq("raw_uid", self.raw_uid)).values()), None)


def _report(
    sample: SimulatedSample,
    live: LivePtycho,
    raw_uid: str,
    exit_status: str,
    out_dir: Path,
    began: float,
    keep: Callable[[LivePtycho], None] | None,
    watch: _Watch,
) -> DemoResult:
    from tiled.queries import Eq

    assert live.tiled is not None
    client = live.tiled.client()
    catalog = client
    for part in live.settings.catalog_path.split("/"):
        catalog = catalog[part]
    found = catalog.search(Eq("raw_uid", raw_uid))
    key = next(iter(found), None)
    node = found[key] if key is not None else None
    metadata = dict(node.metadata) if node is not None else {}
    error = None
    pictures: list[Path] = []
    if node is not None and "final" in node:
        error, truth, estimate, mask = final_object_error(sample, node)
        pictures = write_pictures(out_dir, truth, estimate, mask, node["final"]["probe"].read())
    result = DemoResult(
        raw_uid=raw_uid,
        exit_status=exit_status,
        container_path=f"{live.settings.catalog_path}/{key}" if key else None,
        tiled_uri=live.tiled.describe()["uri"],
        status=metadata.get("status"),
        object_error=error,
        iterations=int(metadata.get("iteration", 0)),
        seconds=time.monotonic() - began,
        pictures=pictures,
        metadata=metadata,
        start_time=watch.start_time,
        stop_time=watch.stop_time,
        snapshots=list(watch.snapshots),
        acquisition=dict(watch.flyer.report.get("eiger", {})),
    )
    if keep is not None:
        keep(live)
    return result


def write_pictures(
    out_dir: Path, truth: np.ndarray, estimate: np.ndarray, mask: np.ndarray, probe: np.ndarray
) -> list[Path]:
    """Amplitude and phase of the reconstruction next to the phantom, and the probe, as PNG.

    The reconstruction is shown registered, de-ramped and scaled onto the
    phantom (as the error metric compares them), dimmed outside the well-lit region.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    aligned, _ = register_object(truth, estimate, mask)
    scale = np.vdot(aligned[mask], truth[mask]) / max(
        np.vdot(aligned[mask], aligned[mask]).real, 1e-30
    )
    aligned = np.where(mask, scale * aligned, 0.5 * scale * aligned)
    path = out_dir / "reconstruction.png"
    fig, axes = plt.subplots(2, 3, figsize=(12, 8), constrained_layout=True)
    panels = [
        (np.abs(truth), "phantom amplitude", "gray"),
        (np.abs(aligned), "reconstructed amplitude", "gray"),
        (np.abs(probe), "probe amplitude", "magma"),
        (np.angle(truth), "phantom phase", "twilight"),
        (np.angle(aligned), "reconstructed phase", "twilight"),
        (np.angle(probe), "probe phase", "twilight"),
    ]
    for ax, (image, title, cmap) in zip(axes.ravel(), panels, strict=True):
        shown = ax.imshow(image, cmap=cmap)
        ax.set_title(title)
        ax.axis("off")
        fig.colorbar(shown, ax=ax, shrink=0.7)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]
