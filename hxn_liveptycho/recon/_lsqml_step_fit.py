"""Fused CuPy kernels for LSQ-ML's step fit: the normal-equation sums of each position's
step lengths, and the steps and step multipliers from them.

The sums read the object step ``num / den`` (``den`` regularised as it is read), the
probe step and the exit-wave update in one pass per position
(``liveptycho_lsqml_sums``), or by canvas tile (``liveptycho_tile_step_sums``), which
reads the object step and the object once per canvas pixel instead of once per window
pixel. The algebra is :mod:`hxn_liveptycho.recon._lsqml`'s, the xp reference.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hxn_liveptycho.recon._raw_kernels import (
    SUMS_THREADS,
    TILE_SHAPE,
    TileShape,
    launch_per_position,
    raw_kernel,
    require_contiguous,
    sums_kernel,
)
from hxn_liveptycho.recon._regularised import regularising
from hxn_liveptycho.recon._update_sums import tile_grid

__all__ = ["lsqml_step_sums", "lsqml_steps"]

#: Most modes for which LSQ-ML's step-fit sums are gathered by tile. At three modes they
#: lost to the per-position kernel at the 1,024 scan's density and tied at the 4,096 one.
TILE_STEP_MODES = 1


def lsqml_step_sums(
    chi: Any,
    probes: Any,
    dprobes: Any | None,
    canvas: Any,
    num: Any,
    den: Any,
    corners: Any,
    origin: tuple[int, int],
    reg: float = 0.0,
    den_max: Any | None = None,
    box: tuple[int, int, int, int] | None = None,
) -> Any:
    """The normal-equation sums (B, 5) ``(a11, a12, a22, b1, b2)`` of LSQ-ML's step fit.

    ``u = P dO`` with ``dO = num / den`` read on the batch's box (at ``origin``), ``v =
    O dP`` with ``O`` the canvas window and ``dprobes`` the probe step (shared (K, n, n),
    per position (B, K, n, n), or None: object step only, v = 0); sums over modes and
    pixels of ``|u|^2, Re u* v, |v|^2, Re u* chi, Re v* chi``. ``den`` is regularised as
    it is read, as :func:`~hxn_liveptycho.recon._regularised.divide_regularised` does with
    ``reg`` and ``den_max`` (reg 0: ``den`` already regularised).

    ``box``, the canvas pixels ``num`` and ``den`` cover (``origin`` its corner): up to
    :data:`TILE_STEP_MODES` modes (one) the sums are gathered by canvas tile
    (:func:`_tile_step_sums`).
    """
    import cupy as cp

    b, k, n = chi.shape[0], chi.shape[1], chi.shape[-1]
    out = cp.zeros((b, 5), dtype=cp.float32)
    # An absent probe step stands in as the probes, never read; its mode: 0 none, 1
    # shared, 2 per position.
    mode = 0 if dprobes is None else (2 if dprobes.ndim == 4 else 1)
    step = dprobes if dprobes is not None else probes
    arrays = (chi, probes, step, canvas, num, den, corners)
    if box is not None and k <= TILE_STEP_MODES and tuple(origin) == tuple(box[:2]):
        _tile_step_sums(arrays, mode, box, regularising(den, reg, den_max), out)
        return out
    i32 = np.int32
    args = (
        *arrays,
        i32(origin[0]),
        i32(origin[1]),
        i32(n),
        i32(num.shape[1]),
        i32(canvas.shape[1]),
        i32(k),
        i32(probes.ndim == 4),
        i32(mode),
        *regularising(den, reg, den_max),
        out,
    )
    launch_per_position("liveptycho_lsqml_sums", b, n * n, args)
    return out


def _tile_step_sums(
    arrays: tuple,
    mode: int,
    box: tuple[int, int, int, int],
    reg_args: tuple,
    out: Any,
    shape: TileShape = TILE_SHAPE,
) -> None:
    """The step-fit sums added into ``out``, gathered by canvas tile: ``arrays`` and
    ``mode`` as :func:`lsqml_step_sums` makes them (``num`` and ``den`` covering exactly
    ``box``, ``reg_args`` from :func:`~hxn_liveptycho.recon._regularised.regularising`),
    with ``dO`` and ``O`` read once per canvas pixel instead of once per window pixel."""
    chi, probes, _, canvas, num, den, corners = arrays
    b, k, n = chi.shape[0], chi.shape[1], chi.shape[-1]
    height, width, tiles_x, tiles = tile_grid(box, shape)
    if num.shape != (height, width) or den.shape != num.shape:
        raise ValueError(f"step sums {num.shape} / {den.shape} do not cover the box {box}")
    if b == 0 or tiles == 0:
        return
    require_contiguous(chi, probes, canvas, num, den, corners, out)
    i32 = np.int32
    args = (
        *arrays,
        *(i32(v) for v in (b, n, k, probes.ndim == 4, mode, box[0], box[1], height, width)),
        i32(tiles_x),
        i32(canvas.shape[1]),
        *reg_args,
        out,
    )
    raw_kernel("tile_step_sums", shape.options())((tiles,), (shape.threads,), args)


def lsqml_steps(
    sums: Any, reg: float, alpha: float, beta: float, with_probe: bool
) -> tuple[Any, Any]:
    """:func:`~hxn_liveptycho.recon._lsqml.steps_from_sums` and the step multipliers in one
    launch: returns the object weights ``alpha * alpha_O`` (B,) and the probe factor
    ``beta * mean(alpha_P)`` (0-d; 0 without ``with_probe``), float32 on the device."""
    import cupy as cp

    b = sums.shape[0]
    weights = cp.empty(b, dtype=cp.float32)
    scale = cp.zeros((), dtype=cp.float32)
    f32 = np.float32
    args = (sums, np.int32(b), f32(reg), f32(alpha), f32(beta), np.int32(with_probe))
    sums_kernel("liveptycho_lsqml_steps")((1,), (SUMS_THREADS,), (*args, weights, scale))
    return weights, scale
