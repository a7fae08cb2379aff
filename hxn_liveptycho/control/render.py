"""PNG pictures of a session's latest snapshot, for the live page.

Rendered server-side with matplotlib's object-oriented API (no pyplot state),
so the page needs no plotting library and every browser shows the same thing.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np

#: Picture name → (colour map, what it shows).
KINDS: dict[str, tuple[str, str]] = {
    "amplitude": ("gray", "object amplitude"),
    "phase": ("viridis", "object phase"),
    "probe": ("magma", "probe amplitude"),
    "mosaic": ("viridis", "NN mosaic phase"),
    "error": ("", "error curve"),
    "coverage": ("cividis", "illumination (coverage) map"),
    "error_map": ("inferno", "data error map"),
    "constrained": ("gray", "object amplitude where constrained"),
}
#: Pictures of the solver's quality maps: the snapshot's array of the same name.
QUALITY_KINDS = ("coverage", "error_map")


def picture_array(
    kind: str, snapshot: Mapping[str, Any] | None, nn: Mapping[str, Any] | None
) -> np.ndarray | None:
    """The 2-D (or, for 'error', 1-D) array a picture shows; None if there is none yet."""
    if kind == "mosaic":
        image = None if nn is None else nn.get("object")
        return None if image is None else np.angle(np.asarray(image))
    if snapshot is None:
        return None
    if kind == "error":
        history = snapshot.get("error_history")
        return None if history is None or len(history) == 0 else np.asarray(history, float)
    if kind in QUALITY_KINDS:
        value = snapshot.get(kind)
        return None if value is None else np.asarray(value, dtype=np.float32)
    if kind == "constrained":
        return _constrained_amplitude(snapshot)
    key = "probe" if kind == "probe" else "object"
    value = snapshot.get(key)
    if value is None:
        return None
    array = np.asarray(value)
    return np.angle(array) if kind == "phase" else np.abs(array)


def _constrained_amplitude(snapshot: Mapping[str, Any]) -> np.ndarray | None:
    """The object's amplitude where the data constrain it, NaN (drawn transparent)
    elsewhere: what of the picture can be trusted yet."""
    obj, mask = snapshot.get("object"), snapshot.get("constrained")
    if obj is None or mask is None or np.shape(obj) != np.shape(mask):
        return None
    amplitude = np.abs(np.asarray(obj)).astype(np.float32)
    amplitude[~np.asarray(mask, dtype=bool)] = np.nan
    return amplitude


def render_png(kind: str, array: np.ndarray) -> bytes:
    if kind == "error":
        return _error_curve_png(array)
    cmap = KINDS[kind][0]
    finite = array[np.isfinite(array)]
    # Percentile limits for phases too: a weak phase object spans far less than 2π.
    vmin, vmax = np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 1.0)
    from matplotlib.image import imsave

    buffer = io.BytesIO()
    imsave(buffer, array, cmap=cmap, vmin=vmin, vmax=vmax, format="png", origin="upper")
    return buffer.getvalue()


def _error_curve_png(history: np.ndarray) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.0, 2.6), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    positive = history[np.isfinite(history) & (history > 0)]
    iterations = np.arange(1, len(history) + 1)
    if positive.size == len(history):
        axes.semilogy(iterations, history, color="tab:blue")
    else:
        axes.plot(iterations, history, color="tab:blue")
    axes.set_xlabel("iteration")
    axes.set_ylabel("data mismatch")
    axes.grid(alpha=0.3)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
