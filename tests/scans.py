"""Helpers the end-to-end tests share: run a simulated HXN fly scan through a LivePtycho."""

from __future__ import annotations

import threading
from typing import Any

from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.settings import Settings
from hxn_liveptycho.sim import (
    SimHXNFlyer,
    SimulatedBeamline,
    SimulatedSample,
    baseline_motors,
    fly2dpd,
)

SMALL = SimulatedBeamline(x_num=8, y_num=8, photons_per_frame=2e5)


def make_live(RE: Any, eiger: Any, panda: Any, tmp_path: Any, **fields: Any) -> LivePtycho:
    """A LivePtycho subscribed to ``RE`` and listening to the simulated detectors."""
    fields.setdefault("overrides", {"recon": {"iterations": 10}})
    settings = Settings(
        eiger_endpoint=eiger.endpoint,
        panda_endpoint=panda.endpoint,
        data_dir=tmp_path / "data",
        live_interval_s=0.5,
        **fields,
    )
    live = LivePtycho(settings)
    RE.subscribe(live)
    try:
        assert eiger.publisher.wait_for_subscribers(1, timeout=10)
        assert panda.publisher.wait_for_subscribers(1, timeout=10)
    except BaseException:
        live.close()  # a failed test must not leave receivers running into the next ones
        raise
    return live


def fly(
    RE: Any,
    eiger: Any,
    panda: Any,
    sample: SimulatedSample,
    *,
    dwell: float = 0.005,
    md: dict[str, Any] | None = None,
    **flyer_kw: Any,
) -> Any:
    """Run one fly scan of ``sample`` and return the RunEngine's result."""
    flyer = SimHXNFlyer(eiger, panda, sample, dwell=dwell, **flyer_kw)
    return RE(fly2dpd(flyer, baseline=baseline_motors(sample.beamline.energy_kev), md=md))


def processed(client: Any, raw_uid: str, catalog_path: str = "processed/liveptycho") -> Any:
    """The processed container whose metadata raw_uid matches, found by a Tiled search."""
    from tiled.queries import Eq

    node = client
    for part in catalog_path.split("/"):
        node = node[part]
    found = node.search(Eq("raw_uid", raw_uid))
    assert len(found) == 1, f"expected one container for {raw_uid}, found {list(found)}"
    return found.values().first()


class RunningPoller(threading.Thread):
    """Watches Tiled while a run goes on: ``seen_while_running`` turns True once a processed
    container still marked 'running' holds ``child/array`` (live results, not only final)."""

    def __init__(self, uri: str, child: str, array: str, interval: float = 0.3) -> None:
        super().__init__(name=f"liveptycho-test-poller-{child}", daemon=True)
        self.uri, self.child, self.array, self.interval = uri, child, array, interval
        self.seen_while_running = False
        self.stop_event = threading.Event()

    def run(self) -> None:
        from tiled.client import from_uri
        from tiled.queries import Eq

        client = from_uri(self.uri)
        while not self.stop_event.wait(self.interval):
            try:
                running = client["processed"]["liveptycho"].search(Eq("status", "running"))
                for node in running.values():
                    if self.child in node and self.array in node[self.child]:
                        self.seen_while_running = True
                        return
            except KeyError:
                continue
