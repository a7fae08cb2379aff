"""Which GPU each branch (iterative solver, NN inference) computes on.

On one GPU the two branches contend and the live picture lags; with two or
more, HXN runs the solver on the first and the network on the second. The
rule here does that without being told, and takes explicit ids from users
who know their node better.
"""

from __future__ import annotations

import contextlib
import logging
import types
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

from hxn_liveptycho.errors import ConfigurationError

__all__ = ["GpuPlacement", "Placement", "on_device", "resolve_placement", "visible_gpus"]

log = logging.getLogger(__name__)

DeviceChoice = Literal["auto"] | NonNegativeInt


class GpuPlacement(BaseModel):
    """GPU ids per branch: ``auto``, or a CUDA device id (as CuPy numbers them)."""

    model_config = ConfigDict(extra="forbid")

    iterative: DeviceChoice = Field(
        default="auto", description="Iterative solver's GPU; auto: the first."
    )
    nn: DeviceChoice = Field(
        default="auto",
        description="NN branch's GPU; auto: the second when there are two or more, "
        "else the iterative one's.",
    )


@dataclass(frozen=True)
class Placement:
    """The resolved choice: a device id per branch, None where the branch runs on the CPU."""

    iterative: int | None
    nn: int | None
    gpus: int

    def as_metadata(self) -> dict[str, Any]:
        return asdict(self)


def _check(branch: str, device: int, gpus: int) -> int:
    if device >= gpus:
        seen = f"{gpus} GPU(s) visible (ids 0-{gpus - 1})" if gpus else "no GPU visible"
        raise ConfigurationError(
            f"gpu_placement.{branch} = {device} names a device that does not exist: {seen}"
        )
    return device


def resolve_placement(wanted: GpuPlacement, gpus: int) -> Placement:
    """Device ids for ``gpus`` visible GPUs; ConfigurationError for an id that is not there.

    ``auto``: no GPU, both on the CPU; one GPU, both on it; two or more, the
    solver on 0 and the network on 1. An explicit id on one branch moves the
    other ``auto`` branch to a different GPU when there is one.
    """
    explicit_it = (
        None if wanted.iterative == "auto" else _check("iterative", wanted.iterative, gpus)
    )
    explicit_nn = None if wanted.nn == "auto" else _check("nn", wanted.nn, gpus)
    if gpus == 0:
        return Placement(iterative=None, nn=None, gpus=0)
    iterative = explicit_it
    if iterative is None:
        iterative = 0 if explicit_nn != 0 or gpus == 1 else 1
    nn = explicit_nn
    if nn is None:
        others = [d for d in range(gpus) if d != iterative]
        nn = others[0] if others else iterative
    return Placement(iterative=iterative, nn=nn, gpus=gpus)


def visible_gpus(xp: types.ModuleType) -> int:
    """CUDA devices CuPy sees (0 for NumPy, or when the count cannot be read)."""
    if xp.__name__ != "cupy":
        return 0
    try:
        return int(xp.cuda.runtime.getDeviceCount())
    except Exception as exc:  # a broken driver reads as no GPU, said in the log
        log.warning("cannot count CUDA devices (%s: %s)", type(exc).__name__, exc)
        return 0


@contextlib.contextmanager
def on_device(xp: types.ModuleType, device: int | None) -> Iterator[None]:
    """Make ``device`` current for CuPy work in this block (arrays, kernels, cuFFT plans)."""
    if device is None or xp.__name__ != "cupy":
        yield
        return
    with xp.cuda.Device(device):
        yield
