"""Simulated HXN: a phantom in a focused beam, and ophyd devices that publish real wire formats."""

from hxn_liveptycho.sim.devices import SimEiger, SimHXNFlyer, SimPanda, baseline_motors
from hxn_liveptycho.sim.plans import fly2dpd
from hxn_liveptycho.sim.sample import SimulatedBeamline, SimulatedSample

__all__ = [
    "SimEiger",
    "SimHXNFlyer",
    "SimPanda",
    "SimulatedBeamline",
    "SimulatedSample",
    "baseline_motors",
    "fly2dpd",
]
