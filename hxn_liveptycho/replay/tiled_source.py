"""Raw runs from Tiled, as TiledWriter records them (a ``BlueskyRun`` container per run).

Documents come from ``run.documents()`` when the server exports
``application/json-seq`` (bluesky-tiled-plugins' exporter, which the
project's embedded server registers). A server without it answers 406; then
the documents are rebuilt through the ordinary client API from what
TiledWriter stores: the start and stop documents in the run's metadata, each
stream's descriptors in its metadata, and its events in its table. Frames
are never taken from the documents: they are read in chunks from the
stream's array node (internal zarr or an external HDF5 resource alike).
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np

from hxn_liveptycho.replay.model import (
    RecordedRun,
    ReplayError,
    SlicedFrames,
    detector_info,
    refusing_malformed,
    split_documents,
)

logger = logging.getLogger(__name__)

DocumentsMode = Literal["auto", "export", "streams"]


class TiledFrames(SlicedFrames):
    """A Tiled array node of frames, sliced a chunk at a time (each slice one request)."""


def find_run(client: Any, source: str | int) -> Any:
    """The run with this uid (or uid prefix), or the newest run with this scan_id."""
    from tiled.queries import Key

    text = str(source)
    if not text.lstrip("-").isdigit():
        try:
            return client[text]
        except KeyError as exc:
            raise ReplayError(f"no run with uid {text!r} in Tiled") from exc
    scan_id = int(text)
    found = client.search(Key("start.scan_id") == scan_id)
    if len(found) == 0:
        raise ReplayError(f"no run with scan_id {scan_id} in Tiled")
    runs = sorted(found.values(), key=lambda run: run.metadata["start"].get("time", 0.0))
    newest = runs[-1]
    if len(runs) > 1:
        logger.warning(
            "%d runs have scan_id %d; replaying the newest, %s (started %s); others: %s",
            len(runs),
            scan_id,
            newest.metadata["start"]["uid"],
            newest.metadata["start"].get("time"),
            [run.metadata["start"]["uid"][:8] for run in runs[:-1]],
        )
    else:
        logger.info("scan_id %d is run %s", scan_id, newest.metadata["start"]["uid"])
    return newest


def run_documents(run: Any, mode: DocumentsMode = "auto") -> list[tuple[str, dict[str, Any]]]:
    """The run's documents: exported by the server if it can, else rebuilt from its nodes."""
    if mode in ("auto", "export"):
        try:
            return [(str(name), dict(doc)) for name, doc in run.documents()]
        except Exception as exc:
            if mode == "export":
                raise ReplayError(f"the server cannot export the run's documents: {exc}") from exc
            logger.info(
                "the server does not export documents (%s); reading the run's streams instead",
                str(exc).splitlines()[0][:120],
            )
    return documents_from_streams(run)


def documents_from_streams(run: Any) -> list[tuple[str, dict[str, Any]]]:
    """Rebuild start, descriptors, events (in time order) and stop from the run's nodes.

    Array-valued keys (frames) stay out of the events: the replay reads them
    from their own node.
    """
    start = dict(run.metadata["start"])
    stop = run.metadata.get("stop")
    if stop is None:
        raise ReplayError(f"run {start.get('uid')} has no stop document: was it cut short?")
    uid = start["uid"]
    timeline: list[tuple[float, int, str, dict[str, Any]]] = []
    for stream in run:
        node = run[stream]
        descriptor = {**dict(node.metadata), "name": stream, "run_start": uid}
        descriptor.pop("_config_updates", None)
        descriptor.setdefault("object_keys", {})
        table = node.base["internal"].read() if "internal" in node.base else None
        events = [] if table is None else _events(table, descriptor["uid"])
        # A descriptor goes just before its first event: a fly scan's primary descriptor
        # is made at collect time, after the events it describes were stamped.
        first = min([descriptor.get("time", 0.0)] + [e["time"] for e in events])
        timeline.append((first, 0, "descriptor", descriptor))
        timeline.extend((e["time"], 1, "event", e) for e in events)
    timeline.sort(key=lambda item: (item[0], item[1]))
    documents: list[tuple[str, dict[str, Any]]] = [("start", start)]
    documents.extend((name, doc) for _, _, name, doc in timeline)
    documents.append(("stop", dict(stop)))
    return documents


def _events(table: Any, descriptor_uid: str) -> list[dict[str, Any]]:
    keys = [k for k in table.columns if k not in ("seq_num", "time") and not k.startswith("ts_")]
    events = []
    for row in table.to_dict(orient="records"):
        events.append(
            {
                "uid": f"{descriptor_uid}-{int(row['seq_num'])}",
                "descriptor": descriptor_uid,
                "seq_num": int(row["seq_num"]),
                "time": float(row["time"]),
                "data": {k: _plain(row[k]) for k in keys},
                "timestamps": {k: float(row.get(f"ts_{k}", row["time"])) for k in keys},
                "filled": {},
            }
        )
    return events


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def load_tiled_run(
    client: Any, source: str | int, *, documents: DocumentsMode = "auto"
) -> RecordedRun:
    """A recorded run from Tiled, by uid or scan_id; frames stay on the server until read."""
    run = find_run(client, source)
    uid = run.metadata["start"]["uid"]
    where = f"tiled:{uid}"
    docs = run_documents(run, documents)
    with refusing_malformed(where):
        cleaned, stream, key, descriptor, positions, times = split_documents(where, docs)
        detector = detector_info(cleaned[0][1], descriptor, key)
    try:
        frames_node = run[stream][key]
    except KeyError as exc:
        raise ReplayError(f"{where}: stream {stream!r} has no frame node {key!r}") from exc
    frames = TiledFrames(frames_node, f"{where} {stream}/{key}")
    return RecordedRun(
        source=where,
        documents=cleaned,
        frames=frames,
        frame_numbers=np.arange(frames.shape[0]),
        positions=positions,
        position_keys=("inenc2_val", "inenc3_val"),
        times=times,
        detector=detector,
        stream_name=stream,
    )
