"""The processed container of one run: its key, its groups and the arrays each holds.

Layout under ``<catalog_path>/<key>`` (metadata: ``raw_uid``, ``scan_id``,
``status``, parameters, counters, ``convergence`` and ``resolution`` of the latest
snapshot)::

    live/          object_amplitude, object_phase, probe, error_history (views to look at:
                   the complex object is in final/, and half the bytes reach Tiled sooner),
                   and the quality maps: coverage, position_count, constrained, error_map
                   (when the solver sends them)
    final/         object, object_amplitude, object_phase, probe, positions_m, error_history
                   (and probe_modes / object_modes when the solver has more than one), and
                   the final state's quality maps and position_errors
    diffraction/   amplitude (float16 sqrt(counts)), indices, positions_m: appended in
                   chunks while the run goes on, in arrival order (see store.diffraction)
    nn/            object, object_amplitude, object_phase, coverage (the NN branch's mosaic)

The writer (:class:`~hxn_liveptycho.store.tiled.TiledSink`) and the upload of a
kept result (:mod:`~hxn_liveptycho.store.recovery`) both build it from the
names and helpers here, so the two cannot disagree on where an array lives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from hxn_liveptycho.store import diffraction as stored_diffraction
from hxn_liveptycho.store.arrays import Layout

#: The arrays of ``live/``.
OBJECT_KEYS = ("object_amplitude", "object_phase", "probe", "error_history")
#: The quality maps of ``live/`` (and ``final/``), when the solver sends them
#: (:func:`hxn_liveptycho.recon.worker_child.quality_snapshot`). The canvas fixes their
#: shape; ``position_errors`` grows with the scan, so only ``final/`` holds it (one
#: node made again per live write would cost more than the map that shows it).
QUALITY_KEYS = ("coverage", "position_count", "constrained", "error_map")
#: The arrays of ``nn/``.
NN_KEYS = ("object", "object_amplitude", "object_phase", "coverage")
#: The arrays of ``diffraction/``, one row per frame.
DIFFRACTION_KEYS = ("amplitude", "indices", "positions_m")
#: Arrays of ``final/`` made ahead of the result from the live snapshots' layout.
PREPARED_KEYS = ("object", "object_amplitude", "object_phase", "probe", "positions_m")


def with_object_views(snapshot: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The snapshot's arrays, with the complex object's amplitude and phase beside it:
    what a reader looks at, without taking the complex array apart."""
    arrays = {k: np.asarray(v) for k, v in snapshot.items() if isinstance(v, np.ndarray)}
    if "object" in arrays:
        arrays["object_amplitude"] = np.abs(arrays["object"]).astype(np.float32)
        arrays["object_phase"] = np.angle(arrays["object"]).astype(np.float32)
    return arrays


#: Prefix of the global position model's named fit in a snapshot (recon.position_model).
POSITION_MODEL_PREFIX = "position_model_"


def quality_metadata(snapshot: Mapping[str, Any]) -> dict[str, Any]:
    """The container metadata a snapshot's quality carries, each when the solver sent it:
    ``convergence`` (rate, flag, window, tolerance); ``state_error``, the data error of the
    object and probe written (the final snapshot's; ``error`` is the last pass's running
    error, taken during the pass); ``position_model``, the fitted stage model (scale,
    rotation, shear, offset, drift); ``resolution``, the half-set FRC estimate with
    ``live_quality.resolution`` on (``half_period_nm``, ``period_nm``,
    ``resolved_to_nyquist``, ``iteration``, positions per half: see
    :class:`~hxn_liveptycho.recon.live_resolution.LiveResolution`)."""
    md: dict[str, Any] = {}
    if snapshot.get("convergence") is not None:
        md["convergence"] = dict(snapshot["convergence"])
    if snapshot.get("resolution") is not None:
        md["resolution"] = dict(snapshot["resolution"])
    if snapshot.get("state_error") is not None:
        md["state_error"] = float(snapshot["state_error"])
    model = {
        key.removeprefix(POSITION_MODEL_PREFIX): float(value)
        for key, value in snapshot.items()
        if key.startswith(POSITION_MODEL_PREFIX)
    }
    if model:
        md["position_model"] = model
    return md


def key_part(text: str) -> str:
    """A piece of the container's key (and backup file name): no '/', nothing a path or a
    URL would read differently."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def container_key(metadata: Mapping[str, Any]) -> str:
    """``scan<scan_id>-<raw uid's first 8>-<UTC time>``: the uid and the time tell apart
    runs that share a scan_id (HXN's scan_id is not unique)."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    raw_uid = key_part(str(metadata.get("raw_uid", ""))[:8])
    return f"scan{key_part(str(metadata.get('scan_id')))}-{raw_uid}-{stamp}"


def live_layout(metadata: Mapping[str, Any]) -> Layout:
    """``live/``'s arrays as the run's canvas fixes them (empty when it does not say), with
    the quality maps its ``live_quality`` says the solver sends."""
    canvas = metadata.get("canvas") or {}
    shape, window = canvas.get("shape"), canvas.get("window")
    if not shape or not window:
        return {}
    real, cplx = np.dtype(np.float32), np.dtype(np.complex64)
    canvas_shape = tuple(int(n) for n in shape)
    layout: Layout = {
        "object_amplitude": (canvas_shape, real),
        "object_phase": (canvas_shape, real),
        "probe": ((int(window), int(window)), cplx),
    }
    quality = metadata.get("live_quality") or {}
    if quality.get("maps"):  # the maps the solver will send (recon.quality.QualitySettings)
        layout["coverage"] = (canvas_shape, real)
        layout["position_count"] = (canvas_shape, np.dtype(np.int32))
        layout["constrained"] = (canvas_shape, np.dtype(np.uint8))
        if quality.get("error_map"):
            layout["error_map"] = (canvas_shape, real)
    return layout


def catalog_node(root: Any, parts: Sequence[str]) -> Any:
    """The node at ``parts`` below ``root``, making the containers missing on the way (one
    that another run made meanwhile is used)."""
    node = root
    for part in parts:
        try:
            node = node[part]
        except KeyError:
            try:
                node = node.create_container(part)
            except Exception:
                node = node[part]  # another session created it meanwhile
    return node


def child(container: Any, name: str) -> Any:
    """The group ``name`` of ``container``, made if it is not there yet."""
    try:
        return container[name]
    except KeyError:
        return container.create_container(name)


def diffraction_group(container: Any, chunk_frames: int) -> Any:
    """``diffraction/`` of ``container``, made with its metadata if it is not there yet."""
    try:
        return container["diffraction"]
    except KeyError:
        return container.create_container(
            "diffraction", metadata=stored_diffraction.group_metadata(chunk_frames)
        )
