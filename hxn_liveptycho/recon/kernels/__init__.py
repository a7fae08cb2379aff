"""The solver's CUDA sources, shipped as ``.cu`` files beside this module and read one way.

A source may leave places for text the Python side makes (constants the
launchers share with the kernels, generated code): ``/*@NAME@*/`` is replaced by
the part given as ``NAME``. Every place must be filled and every part used, so
a kernel never compiles with a hole or a stale constant.
"""

from __future__ import annotations

import functools
import re
from importlib import resources

__all__ = ["source"]

_PLACE = re.compile(r"/\*@([A-Z_]+)@\*/")


@functools.cache
def _text(name: str) -> str:
    return resources.files(__package__).joinpath(name).read_text(encoding="utf-8")


def source(name: str, **parts: str) -> str:
    """The CUDA source ``name`` (e.g. ``"fused.cu"``) with its places filled from ``parts``."""
    text = _text(name)
    places = set(_PLACE.findall(text))
    if places != set(parts):
        raise ValueError(
            f"{name}: places {sorted(places)} but parts {sorted(parts)} (they must match)"
        )
    return _PLACE.sub(lambda m: parts[m.group(1)], text)
