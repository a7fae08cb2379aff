"""What the ``pytest -m gpu`` modules share: CuPy when a CUDA device is there, the marks
that skip them (with the reason) where it is not, and how they compare arrays."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest


def cupy_or_none() -> Any:
    """The ``cupy`` module when it imports and sees a CUDA device, else None."""
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


cp = cupy_or_none()

#: A GPU test module's ``pytestmark``: marked ``gpu``, skipped with its reason without one.
GPU_MARKS = [
    pytest.mark.gpu,
    pytest.mark.skipif(cp is None, reason="needs CuPy and a CUDA device (pytest -m gpu)"),
]


def host(x: Any) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy array."""
    return np.asarray(x.get() if hasattr(x, "get") else x)


def rel_diff(a: Any, b: Any) -> float:
    """``|a - b| / |b|`` (Frobenius norms), ``b`` the reference, either on either device."""
    a, b = (host(x).astype(np.complex128) for x in (a, b))
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
