"""A final result as a CXI file: read from its processed container, or from a run's final state.

Two ways in, one file (:mod:`~hxn_liveptycho.store.cxi_layout` writes it):
:func:`read_container` gathers a processed container from Tiled (``final/``, its
metadata, and the measured frames of ``diffraction/`` when they pair row by row
with the positions), for ``liveptycho export``; :func:`export_final` writes the
state a run hands its sink, for the automatic export beside each result
(``Settings.cxi_export_dir``), which needs no Tiled at all.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.errors import LivePtychoError
from hxn_liveptycho.store.container import key_part
from hxn_liveptycho.store.cxi_layout import CxiResult, Frames, write_cxi

logger = logging.getLogger(__name__)

#: Final arrays the file keeps outside CXI's own fields (under ``entry_1/liveptycho``).
EXTRA_KEYS = ("opr_weights", "opr_probes", "position_errors")
#: Frames read from Tiled per request while the file is written.
BLOCK_ROWS = 256


class ExportError(LivePtychoError, ValueError):
    """A result cannot be exported: not found, or missing what the file needs (named)."""


def result_from_final(
    arrays: Mapping[str, Any],
    metadata: Mapping[str, Any],
    *,
    container_path: str | None = None,
    indices: np.ndarray | None = None,
    frames: Frames | None = None,
) -> CxiResult:
    """The file's content from a run's final arrays (``final/``, or the final snapshot)
    and its container metadata; raises :class:`ExportError` naming what is missing."""
    missing = [k for k in ("object", "probe", "positions_m") if arrays.get(k) is None]
    canvas = metadata.get("canvas") or {}
    missing += [f"metadata {k}" for k in ("energy_kev", "distance_m") if metadata.get(k) is None]
    missing += [f"metadata canvas.{k}" for k in ("origin_um", "pixel_size_m") if k not in canvas]
    if missing:
        mode = metadata.get("mode")
        raise ExportError(
            f"the result of run {metadata.get('raw_uid')} (status {metadata.get('status')}, "
            f"mode {mode}) has no {', '.join(missing)}: nothing to export"
        )
    probe = np.asarray(arrays["probe"])
    probes = np.asarray(arrays["probe_modes"]) if arrays.get("probe_modes") is not None else None
    probes = probe[None] if probes is None else probes
    object_pixel_m = float(canvas["pixel_size_m"])
    energy_kev = float(metadata["energy_kev"])
    wavelength_m = float(metadata.get("wavelength_m") or 1.23984e-9 / energy_kev)
    distance_m = float(metadata["distance_m"])
    config = metadata.get("config") or {}
    detector_pixel_m = config.get("detector_pixel_m")
    if detector_pixel_m is None:  # from the far-field relation the object pixel came from
        detector_pixel_m = wavelength_m * distance_m / (probes.shape[-1] * object_pixel_m)
    oy, ox = (float(v) * 1e-6 for v in canvas["origin_um"])
    return CxiResult(
        raw_uid=str(metadata.get("raw_uid")),
        scan_id=metadata.get("scan_id"),
        status=metadata.get("status"),
        object=np.asarray(arrays["object"]),
        probes=probes,
        positions_m=np.asarray(arrays["positions_m"], dtype=np.float64).reshape(-1, 2),
        energy_kev=energy_kev,
        wavelength_m=wavelength_m,
        distance_m=distance_m,
        detector_pixel_m=float(detector_pixel_m),
        object_pixel_m=object_pixel_m,
        canvas_origin_m=(oy, ox),
        indices=indices,
        object_modes=arrays.get("object_modes"),
        error_history=arrays.get("error_history"),
        angle_deg=config.get("angle_deg"),
        dwell_s=config.get("dwell_s"),
        start_time=metadata.get("raw_start_time"),
        finished=metadata.get("finished"),
        container_path=container_path,
        metadata=dict(metadata),
        extras={k: np.asarray(arrays[k]) for k in EXTRA_KEYS if arrays.get(k) is not None},
        frames=frames,
    )


def read_container(
    node: Any, container_path: str, *, with_frames: bool = True
) -> tuple[CxiResult, list[str]]:
    """A processed container as a :class:`CxiResult`, and notes on what was left out."""
    notes: list[str] = []
    metadata = dict(node.metadata)
    if "final" not in node:
        raise ExportError(
            f"{container_path} has no final result yet (status {metadata.get('status')})"
        )
    final = node["final"]
    wanted = ("object", "probe", "probe_modes", "object_modes", "positions_m", "error_history")
    arrays = {k: final[k].read() for k in (*wanted, *EXTRA_KEYS) if k in final}
    rows = len(np.asarray(arrays.get("positions_m", ())).reshape(-1, 2))
    indices, frames = _stored_frames(node, rows, with_frames, notes)
    result = result_from_final(
        arrays, metadata, container_path=container_path, indices=indices, frames=frames
    )
    return result, notes


def _stored_frames(
    node: Any, rows: int, with_frames: bool, notes: list[str]
) -> tuple[np.ndarray | None, Frames | None]:
    """The scan index of each position row and the frames of ``diffraction/``, when its rows
    are the solver's rows (same count, arrival order); else None, and a note why."""
    group = node.get("diffraction")
    if group is None or "indices" not in group or "amplitude" not in group:
        notes.append("no measured frames in arrival order in the container: file without frames")
        return None, None
    indices = np.asarray(group["indices"].read(), dtype=np.int64)
    amplitude = group["amplitude"]
    stored = min(len(indices), int(amplitude.shape[0]))
    if stored != rows:
        notes.append(
            f"{stored} stored frames do not pair with the {rows} positions of the result "
            "(frames still being stored, or lost): file without frames"
        )
        return None, None
    if not with_frames:
        return indices[:rows], None

    def blocks() -> Iterator[tuple[int, np.ndarray]]:
        for first in range(0, rows, BLOCK_ROWS):
            yield first, np.asarray(amplitude[first : min(rows, first + BLOCK_ROWS)])

    measured = np.asarray(group["positions_m"].read(), dtype=np.float64)[:rows]
    shape = (int(amplitude.shape[1]), int(amplitude.shape[2]))
    return indices[:rows], Frames(rows, shape, blocks, measured)


def find_container(root: Any, source: str, catalog_path: str) -> tuple[Any, str]:
    """The processed container ``source`` names: a container path (with a '/'), a key
    under ``catalog_path``, or a raw run's uid (its newest result when several)."""
    source = source.strip().strip("/")
    if not source:
        raise ExportError("give a raw run uid or a processed container path")
    if "/" in source:
        return _walk(root, source.split("/"), source), source
    parts = [p for p in catalog_path.split("/") if p]
    try:
        catalog = _walk(root, parts, "/".join(parts))
    except ExportError:
        raise ExportError(
            f"no processed result of run {source!r}: this Tiled has nothing under {'/'.join(parts)}"
        ) from None
    if source in catalog:
        return catalog[source], "/".join([*parts, source])
    from tiled.queries import Eq

    found = catalog.search(Eq("raw_uid", source))
    keys = list(found)
    if not keys:
        raise ExportError(f"no processed result of run {source!r} under {'/'.join(parts)}")
    newest = max(keys, key=lambda k: str(found[k].metadata.get("created", "")))
    if len(keys) > 1:
        logger.info("run %s has %d results; exporting the newest, %s", source, len(keys), newest)
    return catalog[newest], "/".join([*parts, newest])


def _walk(root: Any, parts: list[str], path: str) -> Any:
    node = root
    for part in parts:
        try:
            node = node[part]
        except KeyError:
            raise ExportError(f"no container {path!r} in Tiled") from None
    return node


def file_name(metadata: Mapping[str, Any], key: str | None = None) -> str:
    """``<container key>.cxi``; without a key, ``scan<scan_id>-<raw uid's first 8>.cxi``."""
    if key:
        return f"{key_part(key)}.cxi"
    uid = key_part(str(metadata.get("raw_uid", ""))[:8])
    return f"scan{key_part(str(metadata.get('scan_id')))}-{uid}.cxi"


def export_final(
    snapshot: Mapping[str, Any],
    metadata: Mapping[str, Any],
    directory: Path,
    *,
    key: str | None = None,
) -> Path:
    """Write a run's final state (as handed to its sink) to ``<directory>/<file_name>``."""
    arrays = {k: v for k, v in snapshot.items() if isinstance(v, np.ndarray)}
    result = result_from_final(arrays, metadata)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return write_cxi(result, directory / file_name(metadata, key))
