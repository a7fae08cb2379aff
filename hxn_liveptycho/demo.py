"""The whole live path on embedded defaults: simulated HXN scan → LivePtycho → local Tiled.

Used by ``liveptycho demo`` and by the end-to-end tests, so what a newcomer
runs first is exactly what CI checks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.recon.metrics import illuminated_mask, object_error, register_object
from hxn_liveptycho.settings import Settings
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
    (see :class:`~hxn_liveptycho.geometry.CanvasGeometry`), which fixes the
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
    tiled_uri: str | None = None,
    dwell: float = 0.01,
    encoding: str = "bs32-lz4<",
    progress: Callable[[dict[str, Any]], None] | None = None,
    keep: Callable[[LivePtycho], None] | None = None,
) -> DemoResult:
    """Run one simulated fly scan with LivePtycho subscribed; write pictures to ``out_dir``."""
    from bluesky import RunEngine

    began = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    bl = beamline or SimulatedBeamline()
    logger.info("simulating a %d x %d point scan", bl.x_num, bl.y_num)
    sample = SimulatedSample(bl)
    eiger = SimEiger(encoding=encoding)
    panda = SimPanda()
    settings = Settings(
        eiger_endpoint=eiger.endpoint,
        panda_endpoint=panda.endpoint,
        data_dir=data_dir or out_dir / "data",
        tiled_uri=tiled_uri,
        array_backend=array_backend,  # type: ignore[arg-type]
        overrides={"recon": {"iterations": iterations}},
        live_interval_s=1.0,
    )
    live = LivePtycho(settings)
    try:
        # PUB/SUB drops what is sent before a subscriber has joined: wait for the receivers.
        eiger.publisher.wait_for_subscribers(1, timeout=10.0)
        panda.publisher.wait_for_subscribers(1, timeout=10.0)
        RE = RunEngine({}, call_returns_result=True)
        RE.subscribe(live)
        flyer = SimHXNFlyer(eiger, panda, sample, dwell=dwell)
        result = RE(fly2dpd(flyer, baseline=baseline_motors(bl.energy_kev)))
        raw_uid = result.run_start_uids[0]
        while not live.wait(timeout=1.0):
            if progress is not None:
                progress(live.status())
        if progress is not None:
            progress(live.status())
        return _report(sample, live, raw_uid, result.exit_status, out_dir, began, keep)
    finally:
        live.close()
        eiger.close()
        panda.close()


def _report(
    sample: SimulatedSample,
    live: LivePtycho,
    raw_uid: str,
    exit_status: str,
    out_dir: Path,
    began: float,
    keep: Callable[[LivePtycho], None] | None,
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
