"""``replay_series``: several recorded runs replayed in order, as one series (ptycho-tomography).

Each run goes through :func:`~hxn_liveptycho.replay.runner.replay_run` onto the
same detector sockets and into the same target, one after the other, so the
target groups them as the beamline's series was grouped: by the series key in
their start documents (``settings.series_key``). Runs recorded without one (or
all of them, when ``series_id`` is given) are given it here, so any set of
archived projections can be replayed as a series. With the in-process target each
run is reconstructed before the next one is sent, as a tomography plan measures:
the next projection then starts from the previous one's final probe.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.replay.model import RecordedRun, ReplayError
from hxn_liveptycho.replay.publish import StreamPublishers
from hxn_liveptycho.replay.runner import (
    DocumentCallback,
    ReplayOptions,
    ReplayReport,
    in_process_target,
    load_run,
    publishers_for,
    replay_run,
)

logger = logging.getLogger(__name__)

Source = str | int | Path | RecordedRun


class SeriesReplayReport(BaseModel):
    """What a series replay sent: a report per run, and the target's view of the series."""

    series_id: str
    dry_run: bool
    runs: list[ReplayReport]
    #: The in-process target's series (projections by angle, statuses); None otherwise.
    series: dict[str, Any] | None = None
    eiger_endpoint: str | None = None
    panda_endpoint: str | None = None

    @property
    def result(self) -> dict[str, Any] | None:
        """The series' outcome as one run's would read: ``complete`` when every run is."""
        results = [run.result for run in self.runs]
        if any(r is None for r in results):
            return None
        statuses = [str(r.get("status")) for r in results if r is not None]
        worst = next((s for s in statuses if s != "complete"), "complete")
        return {"status": worst, "statuses": statuses}

    def summary(self) -> str:
        lines = [f"series {self.series_id}: {len(self.runs)} runs in order"]
        for k, run in enumerate(self.runs, start=1):
            lines += [f"-- {k}/{len(self.runs)}", run.summary()]
        if self.series is not None:
            stacked = self.series.get("stacked")
            angles = [p.get("angle_deg") for p in self.series.get("projections", [])]
            lines.append(f"series stack: {stacked} projections, angles {angles}")
        return "\n".join(lines)


def with_series(run: RecordedRun, key: str, series_id: str, *, replace: bool) -> str:
    """Give ``run``'s start document ``key`` = ``series_id`` (kept when it has one and
    ``replace`` is False); the series the run is replayed in."""
    start = dict(run.start)
    recorded = start.get(key)
    if recorded not in (None, "") and not replace:
        return str(recorded)
    start[key] = series_id
    run.documents[0] = ("start", start)
    return series_id


def replay_series(
    sources: Sequence[Source],
    *,
    series_id: str | None = None,
    callback: DocumentCallback | None = None,
    settings: Settings | None = None,
    options: ReplayOptions | None = None,
    publishers: StreamPublishers | None = None,
    client: Any = None,
    dry_run: bool = False,
    **option_fields: Any,
) -> SeriesReplayReport:
    """Replay ``sources`` (archive folders, run uids or scan_ids, or loaded runs) in order,
    as one series; the arguments are :func:`replay_run`'s.

    ``series_id`` stamps every run with that series; without it a run keeps the series
    it was recorded in, and one recorded without any joins the first series found among
    the runs (a new id when none has one).
    """
    if not sources:
        raise ReplayError("a series needs at least one run")
    settings = settings or Settings()
    key = settings.series_key
    if not key:
        raise ReplayError("series_key is empty (series are off): set LIVEPTYCHO_SERIES_KEY")
    opts = ReplayOptions.model_validate(
        {**(options or ReplayOptions()).model_dump(), **option_fields}
    )
    runs = [
        source
        if isinstance(source, RecordedRun)
        else load_run(source, settings=settings, client=client, documents=opts.documents)
        for source in sources
    ]
    uids = [run.uid for run in runs]
    if len(set(uids)) != len(uids):
        raise ReplayError(f"a run appears twice in the series: {uids}")
    recorded = [run.start.get(key) for run in runs]
    chosen = series_id or next((str(v) for v in recorded if v not in (None, "")), None)
    chosen = chosen or f"replay-{uuid.uuid4()}"
    for run in runs:
        with_series(run, key, chosen, replace=series_id is not None)
    logger.info("replaying %d runs as series %s", len(runs), chosen)
    if dry_run:
        reports = [replay_run(run, settings=settings, options=opts, dry_run=True) for run in runs]
        return SeriesReplayReport(series_id=chosen, dry_run=True, runs=reports)

    own_publishers = publishers is None
    if publishers is None:
        publishers = publishers_for(opts)
    live = None
    try:
        if callback is None:
            live = in_process_target(publishers, settings)
            callback = live
        reports = []
        for run in runs:
            report = replay_run(run, callback=callback, options=opts, publishers=publishers)
            if live is not None:
                # Reconstructed before the next run goes: it starts from this one's probe.
                if not live.wait(timeout=opts.wait_s):
                    logger.warning("run %s did not finish within %s s", run.uid[:8], opts.wait_s)
                session = live.engine.session(run.uid)
                result = session.summary() if session is not None else None
                report = report.model_copy(update={"result": result})
            reports.append(report)
        series = None
        if live is not None:
            found = [s for s in live.engine.series.status() if s["series_id"] == chosen]
            series = found[0] if found else None
        return SeriesReplayReport(
            series_id=chosen,
            dry_run=False,
            runs=reports,
            series=series,
            eiger_endpoint=publishers.eiger_endpoint,
            panda_endpoint=publishers.panda_endpoint,
        )
    finally:
        if live is not None:
            live.close()
        if own_publishers:
            publishers.close()
