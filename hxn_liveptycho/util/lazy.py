"""A package's re-exported names, each imported from its module on first use.

Why: ``sim`` and ``nn`` name their main classes at the package's top, yet
importing either must not pull in what only some of its modules need (ophyd
and ZMQ for the simulated devices, ONNX Runtime for a model's runtime).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: ``exports`` maps each name to the
    submodule that defines it."""

    def attribute(name: str) -> Any:
        if name not in exports:
            raise AttributeError(name)
        return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)

    return attribute
