"""File archives of runs: JSON Lines documents beside an HDF5 file of frames.

An archive is a folder::

    documents.jsonl   one {"name": ..., "doc": ...} per line: the format of
                      bluesky's JSONLinesWriter (TiledWriter's backup), so a
                      TiledWriter backup plus its frames is an archive too
    frames.h5         /entry/data/data (n, height, width), one chunk per frame;
                      /entry/data/frame_number (n,): the detector's frame index of
                      each stored image (a frame it never delivered is absent)

The frame key's descriptor entry is ``external: "STREAM:"`` and a
``stream_resource`` (``application/x-hdf5``, ``parameters.dataset``) plus
``stream_datum`` documents point at the frames, as ophyd-async's HDF writers
do; the uri is resolved inside the archive folder, so archives can move.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from hxn_liveptycho.replay.model import (
    RecordedRun,
    ReplayError,
    detector_info,
    split_documents,
)

logger = logging.getLogger(__name__)

DOCUMENTS = "documents.jsonl"
FRAMES = "frames.h5"
DATASET = "/entry/data/data"
FRAME_NUMBERS = "/entry/data/frame_number"


class HDF5Frames:
    """An HDF5 image dataset, read a chunk at a time."""

    def __init__(self, path: Path, dataset: str) -> None:
        import h5py

        try:
            self._file = h5py.File(path, "r")
        except OSError as exc:
            raise ReplayError(f"{path}: cannot open the frames file ({exc})") from exc
        try:
            self._data = self._file[dataset]
        except KeyError as exc:
            self._file.close()
            raise ReplayError(f"{path}: no dataset {dataset!r} in the frames file") from exc

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._data.shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self._data.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._data[start:stop])

    def frame_numbers(self, name: str) -> np.ndarray | None:
        if name not in self._file:
            return None
        return np.asarray(self._file[name][()], dtype=np.int64)

    def close(self) -> None:
        self._file.close()


def read_documents(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The documents of a JSON Lines file, with the line number of anything malformed."""
    documents: list[tuple[str, dict[str, Any]]] = []
    with path.open() as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                documents.append((str(entry["name"]), dict(entry["doc"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise ReplayError(f"{path}:{number}: not a document line ({exc})") from exc
    return documents


def load_archive(folder: str | Path) -> RecordedRun:
    """Open an archive folder (or its documents.jsonl) lazily; validate before use."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    docs_path = folder / DOCUMENTS
    if not docs_path.exists():
        raise ReplayError(f"{folder}: not a replay archive (no {DOCUMENTS})")
    documents = read_documents(docs_path)
    cleaned, stream, key, descriptor, positions, times = split_documents(str(folder), documents)
    resource = next(
        (d for n, d in documents if n == "stream_resource" and d.get("data_key") == key), None
    )
    frames_path = folder / FRAMES
    dataset = DATASET
    if resource is not None:
        frames_path = _resolve(folder, str(resource.get("uri", FRAMES)))
        dataset = str((resource.get("parameters") or {}).get("dataset", DATASET))
    if not frames_path.exists():
        raise ReplayError(f"{folder}: the frames file {frames_path.name} is missing")
    frames = HDF5Frames(frames_path, dataset)
    numbers = frames.frame_numbers(FRAME_NUMBERS)
    run = RecordedRun(
        source=str(folder),
        documents=cleaned,
        frames=frames,
        frame_numbers=np.arange(frames.shape[0]) if numbers is None else numbers,
        positions=positions,
        position_keys=("inenc2_val", "inenc3_val"),
        times=times,
        detector=detector_info(cleaned[0][1] if cleaned else {}, descriptor, key),
        stream_name=stream,
        resources=[frames],
    )
    return run


def _resolve(folder: Path, uri: str) -> Path:
    """A stream_resource uri, or its file name inside the archive folder when it moved."""
    path = Path(urlparse(uri).path) if "://" in uri else Path(uri)
    if path.is_absolute() and path.exists():
        return path
    return folder / path.name


def write_archive(
    folder: str | Path,
    documents: Iterable[tuple[str, dict[str, Any]]],
    frames: np.ndarray,
    frame_numbers: np.ndarray,
    *,
    frame_key: str,
) -> Path:
    """Write an archive: documents with frames moved out of the events into frames.h5.

    ``documents`` may carry the frames inline (as a recorder saw them); the
    frame key is replaced by stream_resource/stream_datum documents.
    """
    import h5py
    from bluesky_tiled_plugins.writing._json_writer import JSONLinesWriter

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DOCUMENTS).unlink(missing_ok=True)
    with h5py.File(folder / FRAMES, "w") as file:
        file.create_dataset(
            DATASET,
            data=frames,
            chunks=(1, *frames.shape[1:]),
            compression="gzip",
            compression_opts=4,
            shuffle=True,
            track_times=False,  # the same frames give the same bytes
        )
        file.create_dataset(
            FRAME_NUMBERS, data=np.asarray(frame_numbers, dtype=np.int64), track_times=False
        )
    writer = JSONLinesWriter(str(folder), filename=DOCUMENTS)
    resource_uid: str | None = None
    for name, doc in documents:
        if name == "descriptor" and frame_key in doc.get("data_keys", {}):
            data_keys = dict(doc["data_keys"])
            data_keys[frame_key] = {
                **data_keys[frame_key],
                "shape": list(frames.shape[1:]),
                "external": "STREAM:",
            }
            doc = {**doc, "data_keys": data_keys}
            writer(name, doc)
            resource_uid = f"{doc['uid']}-{frame_key}"
            writer(
                "stream_resource",
                {
                    "uid": resource_uid,
                    "run_start": doc["run_start"],
                    "data_key": frame_key,
                    "mimetype": "application/x-hdf5",
                    "uri": f"file://localhost/{FRAMES}",
                    "parameters": {"dataset": DATASET, "chunk_shape": [1, *frames.shape[1:]]},
                },
            )
            writer(
                "stream_datum",
                {
                    "uid": f"{resource_uid}/0",
                    "stream_resource": resource_uid,
                    "descriptor": doc["uid"],
                    "indices": {"start": 0, "stop": int(frames.shape[0])},
                    "seq_nums": {"start": 1, "stop": int(frames.shape[0]) + 1},
                },
            )
            continue
        if name in ("event", "event_page") and frame_key in doc.get("data", {}):
            data = {k: v for k, v in doc["data"].items() if k != frame_key}
            stamps = {k: v for k, v in doc["timestamps"].items() if k != frame_key}
            doc = {**doc, "data": data, "timestamps": stamps}
        writer(name, _json_ready(doc))
    logger.info("archive written to %s (%d frames)", folder, frames.shape[0])
    return folder


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value
