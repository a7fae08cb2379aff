"""``reconstruct_file``: a ptychography file through the live engine, into Tiled like a live run.

Why through the engine: a reprocessed file gets exactly what a live run gets
(the same session, solver process, statuses, live snapshots and processed
container), so results from files and from the beamline compare one to one
and nothing here has to keep up with the live path. The file is read into
what a RunEngine and the detectors would have sent: a start document (uid:
the file's ``raw_uid``), a descriptor and one event page of positions, a
PandA capture of those positions (one sample per frame, in micrometres) and
an Eiger series of the frames, then ``stop``. The geometry the documents of
a beamline would carry comes from the file as overrides, under the user's
own settings and overrides, so ``recon``, ``mode`` or ``roi`` work as for
live runs.

    from hxn_liveptycho.reprocess import reconstruct_file
    report = reconstruct_file("scan.cxi", overrides={"recon": {"iterations": 200}})
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from event_model import compose_run
from pydantic import BaseModel

from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.config.scan import EncoderConfig, ScanConfig, scan_config_from_documents
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.pipeline.inputs import Frame, Samples, SeriesEnd, SeriesStart
from hxn_liveptycho.reprocess.conventions import FileConventions
from hxn_liveptycho.reprocess.cxi_file import CxiScan, read_cxi
from hxn_liveptycho.streams import EigerFrame
from hxn_liveptycho.util.jsonsafe import json_safe
from hxn_liveptycho.util.validation import deep_merge

logger = logging.getLogger(__name__)

__all__ = ["PLAN_NAME", "ReprocessReport", "file_overrides", "reconstruct_file"]

#: The plan name a reprocessed run's start document (and its processed container) carries.
PLAN_NAME = "liveptycho_reconstruct_file"
#: How many frames may wait for the solver before the next chunk is read from the file.
MAX_AHEAD_CHUNKS = 4
#: How long a run whose reading failed is given to end on its stop document and write.
ENDING_WAIT_S = 60.0
#: The probe footprint, in position spacings, when the file brings no probe (the live
#: path's footprint_steps default).
FOOTPRINT_SPACINGS = 3.0

Progress = Callable[[dict[str, Any]], None]


class ReprocessReport(BaseModel):
    """What a reconstruction of a file did, and where its result is."""

    source: str
    raw_uid: str
    scan_id: int | None
    frames: int
    conventions: dict[str, Any]
    status: str | None = None
    reason: str | None = None
    iteration: int = 0
    error_metric: float | None = None
    container_path: str | None = None
    tiled_uri: str | None = None
    #: Where an embedded Tiled (stopped when the command ends) keeps the result.
    tiled_data_dir: str | None = None
    seconds: float = 0.0
    result: dict[str, Any] | None = None

    def summary(self) -> str:
        conv = self.conventions
        lines = [
            f"{self.source} ({conv.get('entry')}): {self.frames} frames "
            f"{'x'.join(map(str, conv.get('frame_shape', [])))}, {conv.get('data')}, "
            f"zero frequency {'at index 0' if conv.get('dc') == 'corner' else 'at the centre'}",
            f"raw_uid {self.raw_uid}",
            f"reconstruction: {self.status} after {self.iteration} iterations in "
            f"{self.seconds:.1f} s"
            + (f", data mismatch {self.error_metric:.4f}" if self.error_metric else "")
            + (f" ({self.reason})" if self.reason else ""),
        ]
        if self.container_path:
            if self.tiled_data_dir:
                where = f" in the embedded Tiled kept in {self.tiled_data_dir}"
            else:
                where = f" on {self.tiled_uri}" if self.tiled_uri else ""
            lines.append(f"processed result: {self.container_path}{where}")
        return "\n".join(lines)


def _median_spacing_um(positions_um: np.ndarray) -> float:
    """The median distance from each position to its nearest neighbour (the scan's step)."""
    from scipy.spatial import cKDTree

    if len(positions_um) < 2:
        return 1.0
    gaps, _ = cKDTree(positions_um).query(positions_um, k=2)
    nearest = gaps[:, 1]
    nearest = nearest[np.isfinite(nearest) & (nearest > 0)]
    return float(np.median(nearest)) if nearest.size else 1.0


def file_overrides(scan: CxiScan, roi_size: int | None = None) -> dict[str, Any]:
    """The ScanConfig fields a beamline's documents would give, from the file.

    Positions travel as micrometres (ratio 1, one sample per frame), the
    canvas spans them, the ROI is the whole frame (a square crop of its
    centre when the frames are not square) and the probe guess's footprint
    (should the run guess its first probe) is three position spacings.
    """
    y, x = scan.positions_um[:, 0], scan.positions_um[:, 1]
    size = roi_size or min(scan.frame_shape)
    roi: dict[str, Any] = {"size": size}
    if size == min(scan.frame_shape) or scan.dc == "corner":
        roi.update(center_y=scan.frame_shape[0] // 2, center_x=scan.frame_shape[1] // 2)
    elif scan.beam_center is not None:
        roi.update(center_y=scan.beam_center[0], center_x=scan.beam_center[1])
    encoder = EncoderConfig()
    return {
        "detector": "cxi",
        "detector_pixel_m": scan.pixel_size_m,
        "energy_kev": scan.energy_kev,
        "distance_m": scan.distance_m,
        "angle_deg": 0.0,
        "angle_correction": False,
        "grid": {
            "kind": "mesh",
            "x_start_um": float(x.min()),
            "x_end_um": float(x.max()),
            "x_num": scan.num_frames,
            "y_start_um": float(y.min()),
            "y_end_um": float(y.max()),
            "y_num": 1,
        },
        "encoder": {
            "x_channel": encoder.x_channel,
            "y_channel": encoder.y_channel,
            "time_channel": None,
            "x_ratio": 1.0,
            "y_ratio": 1.0,
            "x_direction": 1.0,
            "y_direction": 1.0,
            "upsample": 1,
        },
        "roi": roi,
        "probe": {"footprint_um": FOOTPRINT_SPACINGS * _median_spacing_um(scan.positions_um)},
    }


def _probe_from_file(scan: CxiScan, config: ScanConfig) -> dict[str, Any] | None:
    """The file's probe as the run's first probe (``probe.initial = "file"``, read by the
    run's own probe reader, :mod:`hxn_liveptycho.pipeline.probe_start`); None when the
    file has none, or one the run cannot use (another size, another entry)."""
    n = config.roi.size
    if scan.probe is None:
        return None
    if scan.probe.shape != (n, n) or scan.entry != "entry_1":
        scan.notes.append(
            f"probe in the file ({scan.probe_path}, {scan.probe.shape}) not used: the run's "
            f"window is {n}x{n} in entry_1"
        )
        return None
    scan.notes.append(f"probe: the file's ({scan.probe_path}) starts the run")
    return {"initial": "file", "file": str(scan.path.resolve())}


def _documents(scan: CxiScan, settings: Settings) -> tuple[Any, Any]:
    metadata: dict[str, Any] = {
        "plan_name": PLAN_NAME,
        settings.metadata_flag: True,
        "num_points": scan.num_frames,
        "source_file": json_safe(scan.conventions()),
    }
    if scan.scan_id is not None:  # a start document's scan_id is an integer or absent
        metadata["scan_id"] = scan.scan_id
    run = compose_run(uid=scan.raw_uid, metadata=metadata)
    descriptor = run.compose_descriptor(
        name="primary",
        data_keys={
            axis: {"source": f"file:{scan.entry}", "dtype": "number", "shape": [], "units": "um"}
            for axis in ("x_um", "y_um")
        },
    )
    return run, descriptor


def reconstruct_file(
    path: str | Path,
    *,
    settings: Settings | None = None,
    overrides: Mapping[str, Any] | None = None,
    conventions: FileConventions | None = None,
    entry: str | None = None,
    progress: Progress | None = None,
    progress_interval_s: float = 2.0,
    chunk_frames: int = 32,
    wait_s: float | None = None,
) -> ReprocessReport:
    """Reconstruct one CXI / NXcxi_ptycho file with the live engine; write it to Tiled.

    ``settings`` say where Tiled is (an embedded server under ``data_dir``
    when ``tiled_uri`` is unset) and the backend; ``overrides`` are
    :class:`~hxn_liveptycho.config.scan.ScanConfig` fields laid over the
    file's geometry and ``settings.overrides``. ``progress`` is called every
    ``progress_interval_s`` with the engine's status plus a ``"reprocess"``
    entry (frames fed of frames). Conventions the file leaves unclear raise
    :class:`~hxn_liveptycho.reprocess.conventions.ConventionError` (one line)
    before anything runs; once running, the run ends in one terminal state
    like a live run (an interrupted feed ends it ``aborted``).
    """
    began = time.monotonic()
    base = settings or Settings()
    with read_cxi(path, conventions, entry=entry) as scan:
        user = deep_merge(base.overrides, dict(overrides or {}))
        geometry = file_overrides(scan, (user.get("roi") or {}).get("size"))
        merged = deep_merge(geometry, user)
        run, descriptor = _documents(scan, base)
        config = scan_config_from_documents(
            run.start_doc, descriptors=[descriptor.descriptor_doc], overrides=merged
        )
        if "probe" not in user:
            hint = _probe_from_file(scan, config)
            if hint is not None:
                merged = deep_merge(merged, {"probe": hint})
        fields = base.model_dump()
        fields.update(eiger_endpoint=None, panda_endpoint=None, overrides=merged)
        live = LivePtycho(Settings(**fields))
        try:
            try:
                fed = _feed(
                    live, scan, run, descriptor, chunk_frames, progress, progress_interval_s
                )
            except BaseException:
                # The stop document went out with why: let the run end on it and write
                # what it has, as a scan that failed does (a second Ctrl-C cuts it short).
                live.wait(timeout=ENDING_WAIT_S)
                raise
            _wait(live, scan, fed, progress, progress_interval_s, wait_s)
            session = live.engine.session(scan.raw_uid)
            result = session.summary() if session is not None else None
            # Redacted: an embedded server's URI holds its API key, and reports get printed.
            tiled_uri = live.tiled.describe()["uri"] if live.tiled is not None else None
            embedded = live.tiled is not None and live.tiled.embedded
            if result and result.get("container_path") and live.tiled is not None:
                _record_source(live, result["container_path"], scan)
        finally:
            live.close()
        result = result or {}
        return ReprocessReport(
            source=str(scan.path),
            raw_uid=scan.raw_uid,
            scan_id=scan.scan_id,
            frames=scan.num_frames,
            conventions=json_safe(scan.conventions()),
            status=result.get("status"),
            reason=result.get("reason"),
            iteration=int(result.get("iteration") or 0),
            error_metric=result.get("error_metric"),
            container_path=result.get("container_path"),
            tiled_uri=tiled_uri,
            tiled_data_dir=str(live.settings.data_dir) if embedded else None,
            seconds=time.monotonic() - began,
            result=json_safe(result),
        )


def _feed(
    live: LivePtycho,
    scan: CxiScan,
    run: Any,
    descriptor: Any,
    chunk_frames: int,
    progress: Progress | None,
    interval: float,
) -> int:
    """Documents, positions and frames into the engine, as a fly scan sends them; the frames
    chunk by chunk, never more than a few chunks ahead of the solver. Returns frames fed."""
    engine = live.engine
    n = scan.num_frames
    y_um, x_um = scan.positions_um[:, 0], scan.positions_um[:, 1]
    engine.submit("start", run.start_doc)
    engine.submit("descriptor", descriptor.descriptor_doc)
    now = time.time()
    engine.submit(
        "event_page",
        descriptor.compose_event_page(
            data={"x_um": x_um.tolist(), "y_um": y_um.tolist()},
            timestamps={"x_um": [now] * n, "y_um": [now] * n},
            seq_num=list(range(1, n + 1)),
            time=[now] * n,
        ),
    )
    encoder = EncoderConfig()
    engine.put(SeriesStart("panda", {}))
    engine.put(Samples({encoder.x_channel: x_um.copy(), encoder.y_channel: y_um.copy()}, 0))
    engine.put(SeriesEnd("panda"))
    header = {"nimages": n, "x_pixel_size": scan.pixel_size_m, "y_pixel_size": scan.pixel_size_m}
    engine.put(SeriesStart("eiger", header))
    fed = 0
    exit_status, reason = "success", ""
    last = time.monotonic()
    try:
        session = _session(live, scan.raw_uid)
        for start in range(0, n, chunk_frames):
            stop = min(start + chunk_frames, n)
            block = scan.read(start, stop)
            for offset, frame in enumerate(block):
                engine.put(Frame(EigerFrame(1, start + offset, frame)))
            fed = stop
            while (
                session is not None
                and not session.finished
                and fed - session.counters.get("frames_used") > MAX_AHEAD_CHUNKS * chunk_frames
            ):
                time.sleep(0.05)
            if progress is not None and time.monotonic() - last >= interval:
                last = time.monotonic()
                progress(_status(live, fed, n))
            if session is not None and session.finished:
                break
    except KeyboardInterrupt:
        exit_status, reason = "abort", "interrupted while the file was read"
        raise
    except Exception as exc:
        why = " ".join(str(exc).split()) or type(exc).__name__
        exit_status, reason = "fail", f"stopped while the file was read: {why}"
        logger.error("%s", reason)
        raise
    finally:
        engine.put(SeriesEnd("eiger"))
        engine.submit("stop", run.compose_stop(exit_status=exit_status, reason=reason))
    logger.info("fed %d frames of %s", fed, scan.path.name)
    return fed


def _session(live: LivePtycho, uid: str) -> Any:
    """The run's session, once the engine has taken its start (None if it never does)."""
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        session = live.engine.session(uid)
        if session is not None:
            return session
        time.sleep(0.02)
    return None


def _status(live: LivePtycho, fed: int, total: int) -> dict[str, Any]:
    status = live.status()
    status["reprocess"] = {"frames_fed": fed, "frames": total}
    return status


def _wait(
    live: LivePtycho,
    scan: CxiScan,
    fed: int,
    progress: Progress | None,
    interval: float,
    wait_s: float | None,
) -> None:
    deadline = None if wait_s is None else time.monotonic() + wait_s
    while not live.wait(timeout=interval):
        if progress is not None:
            progress(_status(live, fed, scan.num_frames))
        if deadline is not None and time.monotonic() > deadline:
            logger.warning("the reconstruction did not finish within %s s", wait_s)
            return
    if progress is not None:
        progress(_status(live, fed, scan.num_frames))


def _record_source(live: LivePtycho, container_path: str, scan: CxiScan) -> None:
    """The file and the conventions it was read with, in the container's metadata."""
    try:
        assert live.tiled is not None
        node = live.tiled.client()
        for part in container_path.split("/"):
            node = node[part]
        node.update_metadata({"source_file": json_safe(scan.conventions())})
    except Exception as exc:  # the result is stored; only this note is missing
        logger.warning("could not add the source file to %s: %s", container_path, exc)
