"""Fused CuPy kernels that divide by a regularised illumination and add the result.

An update's direction is its numerator over the illumination regularised as the xp
path's ``_regularised`` makes it, ``max((1 - reg) (den + reg max(den)), 1e-30)``. The
kernels here regularise ``den`` as they read it, with ``max(den)`` from the slots the
update's sums tracked (:func:`~hxn_liveptycho.recon._raw_kernels.max_slots`) or from a
reduction, so no pass makes the regularised array itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hxn_liveptycho.recon._raw_kernels import (
    launch,
    placeholder_for,
    require_contiguous,
    row_layout,
)

__all__ = ["add_scaled", "divide_regularised", "max_of", "regularised_step", "regularising"]


def regularising(den: Any, reg: float, den_max: Any | None) -> tuple[Any, Any, Any]:
    """The kernels' ``(den_max, has_slots, reg)`` arguments for regularising ``den`` as it
    is read, as :func:`divide_regularised` does (reg 0: ``den`` taken as it is)."""
    if not reg:
        return placeholder_for(np.float32), np.int32(0), np.float32(0)
    return (*max_of(den, den_max), np.float32(reg))


def max_of(den: Any, slots: Any | None) -> tuple[Any, Any]:
    """``(den_max, has_slots)`` as the kernels take ``max(den)``: the tracked slots, else
    a reduction's 0-d result."""
    import cupy as cp

    return (slots, np.int32(1)) if slots is not None else (cp.max(den), np.int32(0))


def regularised_step(
    target: Any, num: Any, den: Any, reg: float, weight: float, slots: Any | None = None
) -> None:
    """``target += weight num / max((1 - reg) (den + reg max(den)), 1e-30)`` in place: the
    same regularised denominator as the xp path's ``_regularised`` (scale, then add the
    scaled maximum). ``den`` is the shape of ``num`` or of its last axes (repeated over
    the leading ones); ``target`` may be a box of a larger canvas. ``slots``:
    ``max(den)`` as an update's sums tracked it (:mod:`~hxn_liveptycho.recon._update_sums`;
    else a reduction finds it)."""
    require_contiguous(num, den)
    width, stride = row_layout(target, num.size)
    if num.size % den.size:
        raise ValueError(f"den {den.shape} does not repeat over num {num.shape}")
    m, from_slots = max_of(den, slots)
    args = (np.float32(reg), np.float32(weight), target, width, stride)
    launch("regularised_step", num.size, (num, den, np.int64(den.size), m, from_slots, *args))


def divide_regularised(x: Any, den: Any, reg: float, slots: Any | None = None) -> Any:
    """``x /= max((1 - reg) (den + reg max(den)), 1e-30)`` (the xp path's ``_regularised``;
    ``den`` itself unchanged), in place, in one launch; ``den`` is the shape of ``x`` or of
    its last axes. Returns ``x``. ``slots`` as :func:`regularised_step`."""
    require_contiguous(x, den)
    if x.size % den.size:
        raise ValueError(f"den {den.shape} does not repeat over {x.shape}")
    m, from_slots = max_of(den, slots)
    args = (den, np.int64(den.size), m, from_slots, np.float32(reg), x)
    launch("divide_regularised", x.size, args)
    return x


def add_scaled(target: Any, x: Any, scale: Any) -> None:
    """``target += x * scale`` in place, ``scale`` a 0-d float32 device array."""
    require_contiguous(x)
    width, stride = row_layout(target, x.size)
    launch("add_scaled", x.size, (x, scale, target, width, stride))
