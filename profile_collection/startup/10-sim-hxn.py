"""Simulated HXN detectors and a ptychography plan, for the demo/test profile only.

Do not copy this file into a beamline profile: there, ``fly2dpd`` and the
real Eiger and PandA come from the profile's own files. The simulated Eiger
and PandA publish on ``LIVEPTYCHO_EIGER_ENDPOINT`` / ``LIVEPTYCHO_PANDA_ENDPOINT``
when those name a port (``tcp://127.0.0.1:5555``), otherwise on random
localhost ports which are then exported in those variables, so that
``90-liveptycho.py`` listens to them.
"""

import atexit
import os

# Modules, not their generator functions: queueserver lists every generator function in the
# namespace as a plan, and only ptycho_fly2dpd below is one for users.
from hxn_liveptycho.control import queueserver as liveptycho_queueserver
from hxn_liveptycho.sim import (
    SimEiger,
    SimHXNFlyer,
    SimPanda,
    SimulatedBeamline,
    SimulatedSample,
    baseline_motors,
)
from hxn_liveptycho.sim import plans as sim_plans


def _bind_address(variable):
    """Where a simulated detector binds: the variable's endpoint, or a random local port."""
    endpoint = os.environ.get(variable, "")
    return endpoint if endpoint.startswith("tcp://") else "tcp://127.0.0.1:*"


eiger2 = SimEiger(endpoint=_bind_address("LIVEPTYCHO_EIGER_ENDPOINT"))
panda1 = SimPanda(endpoint=_bind_address("LIVEPTYCHO_PANDA_ENDPOINT"))
os.environ["LIVEPTYCHO_EIGER_ENDPOINT"] = eiger2.endpoint
os.environ["LIVEPTYCHO_PANDA_ENDPOINT"] = panda1.endpoint
atexit.register(eiger2.close)
atexit.register(panda1.close)
dcm_th, zpsth = baseline_motors(SimulatedBeamline().energy_kev)


def ptycho_fly2dpd(
    x_num: int = 8,
    y_num: int = 8,
    dwell: float = 0.005,
    photons_per_frame: float = 2e5,
    md: dict | None = None,
):
    """Fly a simulated x_num by y_num ptychography raster, reconstructed live by LivePtycho.

    The run's start document carries HXN's fly2dpd metadata and
    ``ptychography: True``; ``md`` adds to it.
    """
    beamline = SimulatedBeamline(x_num=x_num, y_num=y_num, photons_per_frame=photons_per_frame)
    flyer = SimHXNFlyer(eiger2, panda1, SimulatedSample(beamline), dwell=dwell)
    # A subscriber that joined late would miss the first frames (ZMQ's slow joiner).
    eiger2.publisher.wait_for_subscribers(1, timeout=2.0)
    panda1.publisher.wait_for_subscribers(1, timeout=2.0)
    plan = sim_plans.fly2dpd(flyer, baseline=[dcm_th, zpsth])
    return (yield from liveptycho_queueserver.ptychography(plan, md))
