"""The neural-network branch: single-shot models, their runtimes, and the live mosaic.

The per-scan parameters live below it, in :mod:`hxn_liveptycho.config.nn_params`
(configuration that the scan's model holds); everything here loads lazily, so
importing the package never pulls in ONNX Runtime.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelCard": "card",
    "ModelInfo": "registry",
    "ModelRegistry": "registry",
    "Mosaic": "mosaic",
    "NNBranch": "branch",
    "open_backend": "backends",
    "start_nn_branch": "branch",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(name)
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
