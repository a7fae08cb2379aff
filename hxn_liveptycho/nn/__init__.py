"""The neural-network branch: single-shot models, their runtimes, and the live mosaic.

The per-scan parameters live below it, in :mod:`hxn_liveptycho.config.nn_params`
(configuration that the scan's model holds); everything here loads lazily, so
importing the package never pulls in ONNX Runtime.
"""

from __future__ import annotations

from hxn_liveptycho.util.lazy import lazy_exports

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

__getattr__ = lazy_exports(__name__, _EXPORTS)
