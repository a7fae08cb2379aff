"""``replay_run``: a recorded run back through the live path, documents and detector streams.

The order is the order of a real fly scan: the documents up to the frames
stream's descriptor (start, baseline), then the detector series and the
encoder positions, then the remaining documents (the fly scan's collected
events, stop). Everything is validated before the first message leaves.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.replay.files import load_archive
from hxn_liveptycho.replay.model import RecordedRun, ReplayError, refusing_malformed
from hxn_liveptycho.replay.publish import Pace, Selection, StreamPublishers, select
from hxn_liveptycho.replay.tiled_source import DocumentsMode, load_tiled_run
from hxn_liveptycho.streams import ENCODINGS

logger = logging.getLogger(__name__)

DocumentCallback = Callable[[str, dict[str, Any]], Any]


class ReplayOptions(BaseModel):
    """How a run is replayed: pace, which part of it, and the wire formats."""

    model_config = ConfigDict(extra="forbid")

    pace: Pace = Field(
        default="realtime",
        description="'realtime' from the recorded timestamps, 'rate' at rate_hz, 'fast' unpaced.",
    )
    rate_hz: float = Field(default=100.0, gt=0.0, description="Frames per second for 'rate'.")
    speed: float = Field(default=1.0, gt=0.0, description="Speed-up of 'realtime'.")
    max_frames: int | None = Field(default=None, ge=1, description="Send at most this many.")
    skip_frames: int = Field(
        default=0, ge=0, description="Drop the first positions (settling rows) and their frames."
    )
    chunk_frames: int = Field(default=32, ge=1, description="Frames read from storage at once.")
    flavour: Literal["v1", "v2"] = Field(default="v1", description="SIMPLON stream flavour.")
    encoding: str = Field(default="bs32-lz4<", description=f"One of {ENCODINGS}.")
    socket_type: Literal["pub", "push"] = "pub"
    eiger_endpoint: str = "tcp://127.0.0.1:*"
    panda_endpoint: str = "tcp://127.0.0.1:*"
    samples_per_frame: int = Field(default=1, ge=1, description="PandA samples per position.")
    subscriber_timeout_s: float = Field(
        default=10.0, ge=0.0, description="How long to wait for receivers to connect."
    )
    documents: DocumentsMode = Field(
        default="auto", description="Tiled: 'export' (json-seq), 'streams' (nodes), or either."
    )
    wait_s: float = Field(
        default=300.0, gt=0.0, description="In-process target: how long to wait for the result."
    )


class ReplayReport(BaseModel):
    """What a replay sent (or, dry, would send), and what it found wrong with the run."""

    source: str
    uid: str
    scan_id: Any
    dry_run: bool
    documents: dict[str, int]
    positions: int
    frames: int
    frame_shape: list[int]
    frame_dtype: str
    flavour: str
    encoding: str
    pace: str
    skipped_positions: int
    capped_positions: int
    missing_frames: list[int]
    positions_outside_scan: int
    eiger_endpoint: str | None = None
    panda_endpoint: str | None = None
    seconds: float = 0.0
    frames_per_second: float | None = None
    result: dict[str, Any] | None = None

    def summary(self) -> str:
        verb = "would send" if self.dry_run else "sent"
        lines = [
            f"run {self.uid} (scan {self.scan_id}) from {self.source}",
            f"{verb}: {sum(self.documents.values())} documents {self.documents}",
            f"{verb}: {self.frames} frames {self.frame_shape} {self.frame_dtype} as Eiger "
            f"{self.flavour} {self.encoding}, {self.positions} positions as PandA samples, "
            f"pace {self.pace}",
        ]
        if self.skipped_positions or self.capped_positions:
            lines.append(
                f"skipped the first {self.skipped_positions} positions, "
                f"left out the last {self.capped_positions}"
            )
        if self.missing_frames:
            lines.append(f"frames missing in the recording: {self.missing_frames}")
        if self.positions_outside_scan:
            lines.append(
                f"{self.positions_outside_scan} positions lie well outside the commanded scan "
                "(settling?); --skip-frames drops them"
            )
        if not self.dry_run and self.frames_per_second is not None:
            lines.append(f"took {self.seconds:.2f} s ({self.frames_per_second:.0f} frames/s)")
        if self.result is not None:
            lines.append(f"reconstruction: {self.result.get('status')}")
        return "\n".join(lines)


def load_run(
    source: str | int | Path,
    *,
    settings: Settings | None = None,
    client: Any = None,
    documents: DocumentsMode = "auto",
) -> RecordedRun:
    """A run from a file archive (a path) or from Tiled (a uid, or a scan_id: the newest wins)."""
    path = Path(str(source))
    # uids and scan_ids never contain a path separator: anything that does is a file archive.
    if isinstance(source, Path) or path.exists() or "/" in str(source) or "\\" in str(source):
        return load_archive(path)
    if client is None:
        from hxn_liveptycho.store.server import TiledConnection

        client = TiledConnection(settings or Settings()).client()
    return load_tiled_run(client, str(source), documents=documents)


def replay_run(
    source: str | int | Path | RecordedRun,
    *,
    callback: DocumentCallback | None = None,
    settings: Settings | None = None,
    options: ReplayOptions | None = None,
    publishers: StreamPublishers | None = None,
    client: Any = None,
    dry_run: bool = False,
    **option_fields: Any,
) -> ReplayReport:
    """Replay one recorded run into ``callback`` and onto the detector wires.

    ``callback`` receives the documents (a ``LivePtycho``, bluesky's 0MQ
    ``Publisher`` for a remote ``liveptycho serve``, anything ``(name, doc)``);
    its receivers must listen to ``publishers`` (bind them first to learn the
    endpoints). With ``callback=None`` an in-process ``LivePtycho`` is made
    from ``settings``, pointed at the replay's sockets, waited for, and its
    run summary returned in ``report.result``. ``option_fields`` are
    :class:`ReplayOptions` fields (``pace="fast"``, ``skip_frames=24``, ...).
    """
    opts = ReplayOptions.model_validate(
        {**(options or ReplayOptions()).model_dump(), **option_fields}
    )
    if opts.encoding not in ENCODINGS:
        raise ReplayError(f"unknown encoding {opts.encoding!r}; expected one of {ENCODINGS}")
    run = (
        source
        if isinstance(source, RecordedRun)
        else load_run(source, settings=settings, client=client, documents=opts.documents)
    )
    try:
        with refusing_malformed(run.source):
            run.validate()
            selection = select(run, skip_frames=opts.skip_frames, max_frames=opts.max_frames)
            documents = _adjusted(run, selection)
            report = _report(run, selection, documents, opts, dry_run=dry_run)
        if report.missing_frames:
            logger.warning(
                "%d frames are missing from the recording: %s",
                len(report.missing_frames),
                report.missing_frames,
            )
        if report.positions_outside_scan:
            logger.warning(
                "%d positions lie well outside the commanded scan (settling rows?)",
                report.positions_outside_scan,
            )
        if dry_run:
            logger.info("dry run of %s: nothing sent", run.source)
            return report
        return _send(run, selection, documents, opts, report, callback, settings, publishers)
    finally:
        run.close()


def _send(
    run: RecordedRun,
    selection: Selection,
    documents: list[tuple[str, dict[str, Any]]],
    opts: ReplayOptions,
    report: ReplayReport,
    callback: DocumentCallback | None,
    settings: Settings | None,
    publishers: StreamPublishers | None,
) -> ReplayReport:
    own_publishers = publishers is None
    if publishers is None:
        publishers = publishers_for(opts)
    live = None
    try:
        if callback is None:
            live = in_process_target(publishers, settings)
            callback = live
        if opts.socket_type == "pub" and not publishers.wait_for_subscribers(
            opts.subscriber_timeout_s
        ):
            raise ReplayError(
                f"no receiver subscribed to {publishers.eiger_endpoint} and "
                f"{publishers.panda_endpoint} within {opts.subscriber_timeout_s} s"
            )
        split = _split_index(documents, run.stream_name)
        began = time.monotonic()
        for name, doc in documents[:split]:
            callback(name, doc)
        sent = publishers.publish(
            run,
            selection,
            pace=opts.pace,
            rate_hz=opts.rate_hz,
            speed=opts.speed,
            chunk_frames=opts.chunk_frames,
            samples_per_frame=opts.samples_per_frame,
        )
        elapsed = time.monotonic() - began
        for name, doc in documents[split:]:
            callback(name, doc)
        report = report.model_copy(
            update={
                "frames": sent,
                "seconds": elapsed,
                "frames_per_second": sent / elapsed if elapsed > 0 else None,
                "eiger_endpoint": publishers.eiger_endpoint,
                "panda_endpoint": publishers.panda_endpoint,
            }
        )
        logger.info("replayed %s: %d frames in %.2f s", run.uid[:8], sent, elapsed)
        if live is not None:
            if not live.wait(timeout=opts.wait_s):
                logger.warning("the reconstruction did not finish within %s s", opts.wait_s)
            session = live.engine.session(run.uid)
            result = session.summary() if session is not None else None
            report = report.model_copy(update={"result": result})
        return report
    finally:
        if live is not None:
            live.close()
        if own_publishers:
            publishers.close()


def publishers_for(opts: ReplayOptions) -> StreamPublishers:
    """The Eiger and PandA publishers a replay opens when the caller gave none."""
    return StreamPublishers(
        eiger_endpoint=opts.eiger_endpoint,
        panda_endpoint=opts.panda_endpoint,
        flavour=opts.flavour,
        encoding=opts.encoding,
        socket_type=opts.socket_type,
    )


def in_process_target(publishers: StreamPublishers, settings: Settings | None) -> Any:
    """A LivePtycho from ``settings`` whose receivers listen to ``publishers``' sockets."""
    from hxn_liveptycho.callback import LivePtycho

    base = settings or Settings()
    fields = base.model_dump()
    fields.update(
        eiger_endpoint=publishers.eiger_endpoint,
        panda_endpoint=publishers.panda_endpoint,
        eiger_socket="pull" if publishers.socket_type == "push" else "sub",
    )
    return LivePtycho(Settings(**fields))


def _split_index(documents: list[tuple[str, dict[str, Any]]], stream: str) -> int:
    """Where the detector streams go: just before the frames stream's first descriptor."""
    for k, (name, doc) in enumerate(documents):
        if name == "descriptor" and doc.get("name") == stream:
            return k
    return len(documents) - 1


def _adjusted(run: RecordedRun, selection: Selection) -> list[tuple[str, dict[str, Any]]]:
    """The documents, with the start document saying what part of the run is replayed.

    Dropping whole settling rows moves the commanded y start and count with
    them, so the grid and the positions stay aligned.
    """
    documents = list(run.documents)
    skipped = selection.first
    capped = run.num_positions - selection.stop
    if not skipped and not capped:
        return documents
    start = dict(run.start)
    start["replay"] = {"skipped_positions": skipped, "capped_positions": capped}
    start["num_points"] = selection.positions
    scan = dict(start.get("scan") or {})
    scan_input = list(scan.get("scan_input") or [])
    x_num = int(scan_input[2]) if len(scan_input) >= 6 else 0
    if x_num and skipped % x_num == 0 and selection.positions % x_num == 0:
        rows_skipped, rows = skipped // x_num, selection.positions // x_num
        y_num = int(scan_input[5])
        step = (float(scan_input[4]) - float(scan_input[3])) / max(y_num - 1, 1)
        scan_input[3] = float(scan_input[3]) + rows_skipped * step
        scan_input[4] = scan_input[3] + (rows - 1) * step
        scan_input[5] = rows
        scan["scan_input"] = scan_input
        if "shape" in scan:
            scan["shape"] = [rows, x_num]
        start["scan"] = scan
    elif x_num:
        logger.warning(
            "skipping %d and capping %d positions is not a whole number of %d-point rows: "
            "the commanded grid in the start document is left as recorded",
            skipped,
            capped,
            x_num,
        )
    documents[0] = ("start", start)
    return documents


def _report(
    run: RecordedRun,
    selection: Selection,
    documents: list[tuple[str, dict[str, Any]]],
    opts: ReplayOptions,
    *,
    dry_run: bool,
) -> ReplayReport:
    missing = [int(i) for i in run.missing_frames() if selection.first <= i < selection.stop]
    return ReplayReport(
        source=run.source,
        uid=run.uid,
        scan_id=run.scan_id,
        dry_run=dry_run,
        documents=dict(Counter(name for name, _ in documents)),
        positions=selection.positions,
        frames=selection.frames,
        frame_shape=list(run.frames.shape[1:]),
        frame_dtype=str(run.frames.dtype),
        flavour=opts.flavour,
        encoding=opts.encoding,
        pace=opts.pace,
        skipped_positions=selection.first,
        capped_positions=run.num_positions - selection.stop,
        missing_frames=missing,
        positions_outside_scan=run.positions_outside_scan(selection.first, selection.stop),
    )
