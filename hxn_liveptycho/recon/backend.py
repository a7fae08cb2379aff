"""Array-module selection: numerical code is written once against ``xp``.

``xp`` is CuPy on a machine with a usable CUDA device and NumPy otherwise.
Nothing here imports CuPy unless it is asked for (or ``auto`` probes for it),
so CPU-only installs never pay for, or fail on, a CuPy import.
"""

from __future__ import annotations

import logging
import sys
import types
from typing import Any, Literal

import numpy as np

from hxn_liveptycho.errors import ConfigurationError

__all__ = [
    "array_namespace",
    "fft2",
    "get_array_module",
    "ifft2",
    "ifft2_unscaled",
    "is_cupy",
    "to_host",
]

log = logging.getLogger(__name__)

Backend = Literal["auto", "numpy", "cupy"]


def _cupy_or_reason() -> tuple[types.ModuleType | None, str]:
    """Import CuPy and check that a CUDA device answers; return (module, "") or (None, why)."""
    try:
        import cupy
    except Exception as exc:  # ImportError, or a broken CUDA install raising anything
        return None, f"CuPy is not importable ({type(exc).__name__}: {exc})"
    try:
        n_devices = cupy.cuda.runtime.getDeviceCount()
        if n_devices < 1:
            return None, "CuPy is installed but no CUDA device is visible"
        # A tiny allocation and kernel proves the driver and device really work.
        (cupy.arange(2, dtype=cupy.float32) * 2).sum().item()
    except Exception as exc:
        why = f"{type(exc).__name__}: {exc}"
        return None, f"CuPy is installed but the CUDA device is unusable ({why})"
    return cupy, ""


def get_array_module(prefer: Backend = "auto") -> types.ModuleType:
    """Return the array module to compute with.

    ``auto`` gives CuPy when it imports and a CUDA device works, NumPy otherwise
    (logged once per call, so a silent CPU fallback is visible in the logs).
    ``cupy`` insists and raises :class:`ConfigurationError` naming why it cannot.
    """
    if prefer == "numpy":
        return np
    if prefer not in ("auto", "cupy"):
        raise ConfigurationError(f"unknown array backend {prefer!r}; use 'auto', 'numpy' or 'cupy'")
    cupy, why = _cupy_or_reason()
    if cupy is not None:
        return cupy
    if prefer == "cupy":
        raise ConfigurationError(f"backend 'cupy' requested but unavailable: {why}")
    log.info("array backend: numpy (%s)", why)
    return np


def is_cupy(xp: types.ModuleType) -> bool:
    """True when ``xp`` is the CuPy module."""
    return getattr(xp, "__name__", "") == "cupy"


def array_namespace(*arrays: Any) -> types.ModuleType:
    """CuPy if any argument is a CuPy array, else NumPy.

    Only looks at CuPy when it is already imported (an array of it can only
    exist then), so this never triggers a CuPy import.
    """
    cupy = sys.modules.get("cupy")
    if cupy is not None and any(isinstance(a, cupy.ndarray) for a in arrays):
        return cupy
    return np


def to_host(x: Any) -> np.ndarray:
    """Copy an array to host memory as NumPy: THE one place data leaves the GPU."""
    get = getattr(x, "get", None)
    if get is not None and not isinstance(x, np.ndarray):
        return get()
    return np.asarray(x)


def fft2(x: Any, /, *, xp: types.ModuleType | None = None, overwrite_x: bool = False) -> Any:
    """Unnormalised forward 2-D FFT over the last two axes (batched, dtype-preserving).

    On NumPy this is ``scipy.fft`` with all cores (single precision stays single);
    on CuPy it is ``cupyx.scipy.fft`` (cuFFT, plans cached by CuPy; it, unlike
    ``cupy.fft``, takes ``overwrite_x``). ``overwrite_x`` lets the transform
    reuse a temporary input's memory.
    """
    xp = array_namespace(x) if xp is None else xp
    if xp is np:
        import scipy.fft

        return scipy.fft.fft2(x, axes=(-2, -1), workers=-1, overwrite_x=overwrite_x)
    import cupyx.scipy.fft

    return cupyx.scipy.fft.fft2(x, axes=(-2, -1), overwrite_x=overwrite_x)


def ifft2(x: Any, /, *, xp: types.ModuleType | None = None, overwrite_x: bool = False) -> Any:
    """Inverse of :func:`fft2` (carries the 1/N² factor)."""
    xp = array_namespace(x) if xp is None else xp
    if xp is np:
        import scipy.fft

        return scipy.fft.ifft2(x, axes=(-2, -1), workers=-1, overwrite_x=overwrite_x)
    import cupyx.scipy.fft

    return cupyx.scipy.fft.ifft2(x, axes=(-2, -1), overwrite_x=overwrite_x)


def ifft2_unscaled(
    x: Any, /, *, xp: types.ModuleType | None = None, overwrite_x: bool = False
) -> Any:
    """:func:`ifft2` without the 1/N² factor (``norm="forward"``): the caller folds the
    factor into the kernel that made ``x``, which saves cuFFT's separate scaling pass."""
    xp = array_namespace(x) if xp is None else xp
    if xp is np:
        import scipy.fft

        return scipy.fft.ifft2(
            x, axes=(-2, -1), norm="forward", workers=-1, overwrite_x=overwrite_x
        )
    import cupyx.scipy.fft

    return cupyx.scipy.fft.ifft2(x, axes=(-2, -1), norm="forward", overwrite_x=overwrite_x)
