"""Cutting probe-sized windows out of a canvas and adding them back, on NumPy or CuPy.

These two moves are most of an iteration's memory traffic. On NumPy a short
loop of slice operations over the batch is fastest (no index arrays). On
CuPy one kernel per batch computes every window pixel's canvas address from
the window's corner on the fly: no (B, n*n) index array (64 MiB of int64 for
128 windows of 256²) is written and read back, and the sum onto the canvas
is a float32 atomic add straight into the complex64 canvas, not a float64
``bincount`` over the whole canvas followed by a combine.

Corners are the windows' top-left pixels in the canvas's frame, less
``origin``: a batch's windows can be summed into a canvas that covers only
their bounding box.
"""

from __future__ import annotations

import functools
import types
from typing import Any

import numpy as np

__all__ = ["gather_windows", "scatter_add_windows"]

#: CUDA lines giving each window pixel (batch ``b``, in-window offset ``r``) its canvas
#: address ``dst``, from the corners less the origin (oy, ox).
WINDOW_PIXEL_INDEX = """
    const long long nn = (long long)n * n;
    const long long b = i / nn;
    const long long r = i - b * nn;
    const long long y = r / n;
    const long long x = r - y * n;
    const long long dst = (corners[2 * b] - oy + y) * width + corners[2 * b + 1] - ox + x;
"""


@functools.cache
def _kernels() -> dict[str, Any]:
    """The CuPy kernels, compiled on first use (CuPy caches the binaries on disk)."""
    import cupy as cp

    gather = cp.ElementwiseKernel(
        "raw T canvas, raw int32 corners, int32 oy, int32 ox, int32 n, int32 width",
        "T out",
        WINDOW_PIXEL_INDEX + "out = canvas[dst];",
        "liveptycho_gather_windows",
    )
    params = "raw T values, raw int32 corners, int32 oy, int32 ox, int32 n, int32 width, bool one"
    source = "const long long src = one ? r : i;"
    add_complex = cp.ElementwiseKernel(
        params,
        "raw float32 canvas",
        WINDOW_PIXEL_INDEX
        + source
        + """
        atomicAdd(&canvas[2 * dst], values[src].real());
        atomicAdd(&canvas[2 * dst + 1], values[src].imag());
        """,
        "liveptycho_scatter_add_complex",
    )
    add_real = cp.ElementwiseKernel(
        params,
        "raw float32 canvas",
        WINDOW_PIXEL_INDEX + source + "atomicAdd(&canvas[dst], values[src]);",
        "liveptycho_scatter_add_real",
    )
    return {"gather": gather, "complex": add_complex, "real": add_real}


def gather_windows(
    canvas: Any, corners: Any, n: int, xp: types.ModuleType, origin: tuple[int, int] = (0, 0)
) -> Any:
    """Windows (B, n, n) of the C-contiguous 2-D ``canvas`` at ``corners`` (B, 2) int32 (xp)."""
    oy, ox = origin
    if xp is np:
        return np.stack([canvas[y - oy : y - oy + n, x - ox : x - ox + n] for y, x in corners])
    out = xp.empty((corners.shape[0], n, n), dtype=canvas.dtype)
    if out.size:
        _kernels()["gather"](canvas, corners, oy, ox, n, canvas.shape[1], out)
    return out


def scatter_add_windows(
    canvas: Any,
    corners: Any,
    values: Any,
    xp: types.ModuleType,
    origin: tuple[int, int] = (0, 0),
) -> None:
    """Add ``values`` ((B, n, n), or one (n, n) window for all) onto ``canvas`` in place.

    ``canvas``: C-contiguous 2-D complex64 or float32. Overlapping windows add up
    (CuPy: atomically, so the order of the float32 sums varies between runs).
    """
    oy, ox = origin
    n = values.shape[-1]
    one = values.ndim == 2
    if xp is np:
        for j, (y, x) in enumerate(corners):
            canvas[y - oy : y - oy + n, x - ox : x - ox + n] += values if one else values[j]
        return
    if not canvas.flags.c_contiguous:
        raise ValueError("scatter_add_windows needs a C-contiguous canvas")
    size = corners.shape[0] * n * n
    if size == 0:
        return
    complex_ = xp.iscomplexobj(canvas)
    values = xp.ascontiguousarray(values, dtype=canvas.dtype)
    target = canvas.view(xp.float32) if complex_ else canvas
    kernel = _kernels()["complex" if complex_ else "real"]
    kernel(values, corners, oy, ox, n, canvas.shape[1], one, target, size=size)
