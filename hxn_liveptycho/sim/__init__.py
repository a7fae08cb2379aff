"""Simulated HXN: a phantom in a focused beam, and ophyd devices that publish real wire formats.

Names are imported lazily, so the physics (``sim.sample``, ``sim.optics``) loads
without ophyd or ZMQ, e.g. on a GPU node that only benchmarks the solver.
"""

from __future__ import annotations

from hxn_liveptycho.util.lazy import lazy_exports

_EXPORTS = {
    "EigerProcess": "publishers",
    "PandaProcess": "publishers",
    "SimEiger": "devices",
    "SimHXNFlyer": "devices",
    "SimPanda": "devices",
    "baseline_motors": "devices",
    "fly2dpd": "plans",
    "SimulatedBeamline": "sample",
    "SimulatedSample": "sample",
    "SpiralSample": "spiral",
    "fermat_fly": "plans",
}

__all__ = sorted(_EXPORTS)

__getattr__ = lazy_exports(__name__, _EXPORTS)
