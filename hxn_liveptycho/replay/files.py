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

An archive is untrusted input: every path it names (the uri, an HDF5 external
link, a virtual dataset's source) is resolved and must lie inside the archive
folder, and every size it declares is checked against what the files actually
store before a frame is read, so a hostile or damaged archive is one clear
:class:`ReplayError`, never a file read from elsewhere or a huge allocation.
"""

from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np

from hxn_liveptycho.replay.model import (
    MALFORMED,
    MAX_READ_BYTES,
    RecordedRun,
    ReplayError,
    SlicedFrames,
    check_declared_frames,
    detector_info,
    one_line,
    refusing_malformed,
    split_documents,
)
from hxn_liveptycho.util.paths import lies_in

logger = logging.getLogger(__name__)

DOCUMENTS = "documents.jsonl"
FRAMES = "frames.h5"
DATASET = "/entry/data/data"
FRAME_NUMBERS = "/entry/data/frame_number"
#: Largest documents file read: its documents are held in memory, several times their size
#: as Python objects (a 10^5-position fly scan's are about 50 MB), so a bigger one is refused.
MAX_DOCUMENTS_BYTES = 2**29
#: Links (soft or external) one dataset path may pass through: HDF5 link loops end here.
MAX_LINK_HOPS = 8
#: Longest HDF5 dataset path taken from a stream_resource.
MAX_DATASET_NAME = 1024


def confine(root: Path, path: str | Path, *, what: str, base: Path | None = None) -> Path:
    """``path`` (relative to ``base``, by default ``root``) resolved, if it lies in ``root``.

    Archives come from elsewhere, so their paths are refused when they climb with
    ``..``, are absolute outside the archive, or are symlinks whose target is outside
    (the resolved path is checked, so a link inside pointing inside is fine). ``root``
    must already be resolved.
    """
    raw = Path(path)
    if ".." in raw.parts:
        raise ReplayError(f"{what} {str(path)!r} climbs out with '..': archive paths stay inside")
    candidate = raw if raw.is_absolute() else (base or root) / raw
    try:
        resolved = candidate.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ReplayError(f"{what} {str(path)!r} cannot be resolved ({one_line(exc)})") from exc
    if resolved.is_relative_to(root):
        return resolved
    if Path(os.path.normpath(candidate)).is_relative_to(root):
        raise ReplayError(f"{what} {str(path)!r} is a symlink pointing out of the archive")
    raise ReplayError(f"{what} {str(path)!r} is not inside the archive")


def regular_file(path: Path, *, what: str, shown: str) -> Path:
    """``path`` if it is a regular file (a FIFO would block the open, a device never end)."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ReplayError(f"{what} {shown!r} is missing from the archive") from None
    except OSError as exc:
        raise ReplayError(f"{what} {shown!r} cannot be read ({one_line(exc)})") from exc
    if not stat.S_ISREG(mode):
        raise ReplayError(f"{what} {shown!r} is not a regular file")
    return path


class HDF5Frames(SlicedFrames):
    """An HDF5 image dataset, read a chunk at a time, its links and storage checked first.

    HDF5 itself would follow an external link or a virtual dataset's source to
    any file (even one in the current directory when the named one is missing)
    and would read chunks that were never written as fill values. So links are
    followed here, one step at a time, each file confined to the archive; and
    the dataset must store every byte it declares before it is used.
    """

    def __init__(self, path: Path, dataset: str, *, root: Path | None = None) -> None:
        self._root = (root or path.parent).resolve()
        self._files: list[Any] = []
        self._path = path
        try:
            regular_file(path, what="the frames file", shown=path.name)
            self._file = self._open(path)
            super().__init__(self._dataset(self._file, dataset), f"{path.name}:{dataset}")
            check_declared_frames(self._label, tuple(self._data.shape), self._data.dtype)
            self._check_stored(self._data, self._label, hops=0)
        except BaseException:
            self.close()
            raise

    # ---- opening, links ----------------------------------------------------------------
    def _open(self, path: Path) -> Any:
        import h5py

        try:
            file = h5py.File(path, "r")
        except OSError as exc:
            raise ReplayError(
                f"{path}: cannot open the frames file (truncated, or not HDF5: {one_line(exc)})"
            ) from exc
        self._files.append(file)
        return file

    def _linked_file(self, file: Any, filename: str, what: str) -> Any:
        """The file a link or virtual source names, relative to ``file``'s folder, confined."""
        import h5py

        if filename == ".":
            return file
        here = Path(file.filename).resolve().parent
        path = confine(self._root, filename, what=what, base=here)
        regular_file(path, what=what, shown=filename)
        for open_file in self._files:  # HDF5 refuses to open one file twice with other modes
            if Path(open_file.filename).resolve() == path:
                return open_file
        try:
            other = h5py.File(path, "r")
        except OSError as exc:
            raise ReplayError(f"{what} {filename!r} cannot be opened ({one_line(exc)})") from exc
        self._files.append(other)
        return other

    def _dataset(self, file: Any, name: str, hops: int = 0, *, missing_ok: bool = False) -> Any:
        """Dataset ``name`` of ``file``, following soft and external links ourselves.

        Links are read with the low-level calls that never traverse them (h5py's
        ``in`` and ``get`` ask HDF5 whether the target exists, which opens it).
        """
        import h5py

        if hops > MAX_LINK_HOPS:
            raise ReplayError(
                f"{self._path.name}: {name!r} goes through more than {MAX_LINK_HOPS} links"
            )
        parts = [part for part in name.split("/") if part and part != "."]
        node = file
        for k, part in enumerate(parts):
            rest = "/".join(parts[k + 1 :])
            if not isinstance(node, h5py.Group):
                raise ReplayError(f"{self._path.name}: {name!r} is not a dataset")
            try:
                key = part.encode()
                if not node.id.links.exists(key):
                    if missing_ok:
                        return None
                    raise ReplayError(f"{self._path.name}: no dataset {name!r} in the frames file")
                kind = node.id.links.get_info(key).type
                value = None if kind == h5py.h5l.TYPE_HARD else node.id.links.get_val(key)
            except (KeyError, OSError, RuntimeError, ValueError, UnicodeError) as exc:
                raise ReplayError(
                    f"{self._path.name}: {name!r} cannot be looked up ({one_line(exc)})"
                ) from exc
            if kind == h5py.h5l.TYPE_SOFT and value is not None:
                target = posixpath.join(node.name, value.decode(errors="replace"))
                return self._dataset(file, posixpath.join(target, rest), hops + 1)
            if kind == h5py.h5l.TYPE_EXTERNAL and value is not None:
                filename, path = (v.decode(errors="replace") for v in value)
                other = self._linked_file(file, filename, f"HDF5 external link {name!r} to")
                return self._dataset(other, posixpath.join(path, rest), hops + 1)
            if kind != h5py.h5l.TYPE_HARD:
                raise ReplayError(f"{self._path.name}: {name!r} is a user-defined link")
            node = node[part]
        if not isinstance(node, h5py.Dataset):
            raise ReplayError(f"{self._path.name}: {name!r} is not a dataset")
        return node

    # ---- storage ----------------------------------------------------------------------
    def _check_stored(self, data: Any, label: str, *, hops: int) -> None:
        """Every byte ``data`` declares is stored in its files (no fill values, no overrun)."""
        import h5py

        plist = data.id.get_create_plist()
        if plist.get_external_count():
            raise ReplayError(f"{label}: data kept in external raw files are not read by replay")
        layout = plist.get_layout()
        shape = tuple(int(n) for n in data.shape)
        declared = math.prod(shape) * data.dtype.itemsize
        if layout == h5py.h5d.VIRTUAL:
            self._check_virtual(data, label, hops=hops)
            return
        if declared == 0 or layout == h5py.h5d.COMPACT:
            return
        file_size = os.path.getsize(data.file.filename)
        if layout == h5py.h5d.CONTIGUOUS:
            offset = data.id.get_offset()
            if offset is None:
                raise ReplayError(
                    f"{label}: declares {_described(shape)} but stores none of its "
                    f"{declared} bytes (never written)"
                )
            if offset + declared > file_size:
                raise ReplayError(
                    f"{label}: declares {_described(shape)} ({declared} bytes) but the file "
                    f"ends {offset + declared - file_size} bytes short (truncated)"
                )
            return
        chunks = tuple(int(n) for n in data.chunks)
        chunk_bytes = math.prod(chunks) * data.dtype.itemsize
        if chunk_bytes > MAX_READ_BYTES:
            raise ReplayError(
                f"{label}: chunks of {chunks} are {chunk_bytes} bytes, more than the "
                f"{MAX_READ_BYTES} replay reads at once"
            )
        expected = math.prod(-(-n // c) for n, c in zip(shape, chunks, strict=True))
        stored = int(data.id.get_num_chunks())
        if stored < expected:
            raise ReplayError(
                f"{label}: declares {_described(shape)} but stores {stored} of its {expected} "
                "chunks (truncated, or never written)"
            )
        ends: list[int] = [0]

        def furthest(info: Any) -> None:
            ends[0] = max(ends[0], int(info.byte_offset) + int(info.size))

        try:
            data.id.chunk_iter(furthest)
        except (AttributeError, NotImplementedError):  # HDF5 < 1.14: the open checked the end
            return
        if ends[0] > file_size:
            raise ReplayError(
                f"{label}: chunks reach byte {ends[0]} but the file has {file_size} (truncated)"
            )

    def _check_virtual(self, data: Any, label: str, *, hops: int) -> None:
        """A virtual dataset's sources: confined, present (missing ones read as fill), stored."""
        if hops >= MAX_LINK_HOPS:
            raise ReplayError(f"{label}: virtual sources nest more than {MAX_LINK_HOPS} deep")
        if os.environ.get("HDF5_VDS_PREFIX"):  # HDF5 would look there before the archive
            raise ReplayError(
                f"{label}: a virtual dataset is not read while HDF5_VDS_PREFIX is set"
            )
        for source in data.virtual_sources():
            what = f"virtual dataset source {source.dset_name!r} in"
            file = self._linked_file(data.file, source.file_name, what)
            try:
                part = self._dataset(file, source.dset_name, hops + 1)
            except ReplayError as exc:
                raise ReplayError(f"{label}: virtual source {one_line(exc)}") from exc
            self._check_stored(part, f"{label} (source {source.file_name})", hops=hops + 1)

    # ---- FrameSource --------------------------------------------------------------------
    def _read_slice(self, start: int, stop: int) -> np.ndarray:
        """A corrupt chunk is refused as one line."""
        try:
            return np.asarray(self._data[start:stop])
        except (OSError, RuntimeError, ValueError, KeyError) as exc:
            raise ReplayError(
                f"{self._label}: frames {start}..{stop - 1} cannot be read ({one_line(exc)})"
            ) from exc

    def frame_numbers(self, name: str) -> np.ndarray | None:
        """The detector frame index of each stored image, checked before it is read."""
        data = self._dataset(self._file, name, missing_ok=True)
        if data is None:
            return None
        frames = self.shape[0]
        if data.ndim != 1 or np.dtype(data.dtype).kind not in "iu":
            raise ReplayError(
                f"{name}: frame numbers must be one integer per frame, got {data.dtype} "
                f"of shape {data.shape}"
            )
        if data.shape[0] != frames:  # the same words as RecordedRun.validate
            raise ReplayError(
                f"{self._label}: {frames} stored frames but {data.shape[0]} frame numbers"
            )
        self._check_stored(data, name, hops=0)
        try:
            return np.asarray(data[()], dtype=np.int64)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ReplayError(
                f"{name}: the frame numbers cannot be read ({one_line(exc)})"
            ) from exc

    def close(self) -> None:
        while self._files:
            self._files.pop().close()


def _described(shape: tuple[int, ...]) -> str:
    if len(shape) == 3:
        return f"{shape[0]} frames of {shape[1]}x{shape[2]}"
    return f"shape {shape}"


def read_documents(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The documents of a JSON Lines file, with the line number of anything malformed."""
    documents: list[tuple[str, dict[str, Any]]] = []
    try:
        with path.open(encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                    documents.append((str(entry["name"]), dict(entry["doc"])))
                except (*MALFORMED, RecursionError) as exc:  # deep nesting: RecursionError
                    raise ReplayError(
                        f"{path}:{number}: not a document line ({one_line(exc)[:200]})"
                    ) from exc
    except UnicodeDecodeError as exc:
        raise ReplayError(f"{path}: not UTF-8 text ({one_line(exc)[:200]})") from exc
    return documents


def load_archive(folder: str | Path) -> RecordedRun:
    """Open an archive folder (or its documents.jsonl) lazily; validate before use.

    The folder is the one the user named; everything it points at must lie in it.
    """
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    if not (folder / DOCUMENTS).exists() and not (folder / DOCUMENTS).is_symlink():
        raise ReplayError(f"{folder}: not a replay archive (no {DOCUMENTS})")
    root = folder.resolve()
    docs_path = confine(root, DOCUMENTS, what="the documents file")
    regular_file(docs_path, what="the documents file", shown=DOCUMENTS)
    size = docs_path.stat().st_size
    if size > MAX_DOCUMENTS_BYTES:
        raise ReplayError(
            f"{folder}: {DOCUMENTS} is {size} bytes, more than the {MAX_DOCUMENTS_BYTES} "
            "replay reads"
        )
    documents = read_documents(docs_path)
    with refusing_malformed(str(folder)):
        cleaned, stream, key, descriptor, positions, times = split_documents(str(folder), documents)
        detector = detector_info(cleaned[0][1] if cleaned else {}, descriptor, key)
        resource = next(
            (d for n, d in documents if n == "stream_resource" and d.get("data_key") == key),
            None,
        )
        frames_path, dataset = _frames_location(root, resource)
    frames = HDF5Frames(frames_path, dataset, root=root)
    try:
        numbers = frames.frame_numbers(FRAME_NUMBERS)
    except BaseException:
        frames.close()
        raise
    return RecordedRun(
        source=str(folder),
        documents=cleaned,
        frames=frames,
        frame_numbers=np.arange(frames.shape[0]) if numbers is None else numbers,
        positions=positions,
        position_keys=("inenc2_val", "inenc3_val"),
        times=times,
        detector=detector,
        stream_name=stream,
        resources=[frames],
    )


def _frames_location(root: Path, resource: dict[str, Any] | None) -> tuple[Path, str]:
    """The frames file and dataset a stream_resource names, confined to the archive.

    A relative uri is taken inside the archive. An absolute one (ophyd-async records
    where the detector wrote) is used when it lies inside the archive; otherwise the
    archive was moved since, and the file of that name inside the archive is read: a
    path outside is never opened.
    """
    what = "the frames file"
    if resource is None:
        path = confine(root, FRAMES, what=what)
        return regular_file(path, what=what, shown=FRAMES), DATASET
    uri = resource.get("uri", FRAMES)
    dataset = (resource.get("parameters") or {}).get("dataset", DATASET)
    if not isinstance(uri, str) or not uri or "\0" in uri:
        raise ReplayError(f"the stream_resource uri {uri!r} is not a file name")
    if not isinstance(dataset, str) or not dataset or len(dataset) > MAX_DATASET_NAME:
        raise ReplayError(f"the stream_resource dataset {str(dataset)[:80]!r} is not a dataset")
    raw = uri
    if "://" in uri:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise ReplayError(f"the stream_resource uri {uri!r} is not a file uri")
        if parsed.netloc not in ("", "localhost"):
            raise ReplayError(f"the stream_resource uri {uri!r} names another host")
        raw = unquote(parsed.path)
    path = Path(raw)
    outside = path.is_absolute() and not lies_in(root, path)
    if outside and ".." not in path.parts:
        logger.debug("frames recorded at %s are read from the archive copy", path)
        if not path.name:
            raise ReplayError(f"the stream_resource uri {uri!r} names no file")
        located = confine(root, path.name, what=what)
        if not located.exists():
            raise ReplayError(
                f"{what} {uri!r} is not inside the archive, and the archive holds no {path.name!r}"
            )
        return regular_file(located, what=what, shown=path.name), dataset
    located = confine(root, path, what=what)
    return regular_file(located, what=what, shown=raw), dataset


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
