"""Helpers the end-to-end tests share: run a simulated HXN fly scan through a LivePtycho."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.config.scan import ScanConfig, scan_config_from_documents
from hxn_liveptycho.config.settings import Settings
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
    fields.setdefault("tiled_retry_s", 1.0)  # outages in tests: the backup without the wait
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


#: Si(111) Bragg angle at 12 keV, worked out by hand from λ = hc/E and d = 3.1355893 Å.
THETA_12KEV_DEG = math.degrees(math.asin(12.39842 / (2 * 3.1355893 * 12.0)))

_NUMBER = {"dtype": "number", "shape": []}


def hxn_start_md(**changes: Any) -> dict[str, Any]:
    """Start metadata of an HXN 2D_FLY_PANDA scan, as fly2dpd writes it."""
    md: dict[str, Any] = {
        "plan_name": "fly2dpd",
        "scan_id": 404611,
        "motors": ["zpssx", "zpssy"],
        "scan": {
            "type": "2D_FLY_PANDA",
            "scan_input": [-2.0, 2.0, 41, -1.0, 1.0, 21, 0.01],
            "detector_distance": 2.05,
            "detectors": ["eiger2"],
            "dwell": 0.01,
        },
        "x_scale_factor": 0.9542,
        "z_scale_factor": 1.25,
    }
    md.update(changes)
    return md


@dataclass
class ScanRun:
    """What a session has seen of a run: start, descriptors and the first baseline reading."""

    start: dict[str, Any]
    descriptors: list[dict[str, Any]]
    baseline: dict[str, Any]

    def config(self, **overrides: Any) -> ScanConfig:
        return scan_config_from_documents(
            self.start, descriptors=self.descriptors, baseline=self.baseline, overrides=overrides
        )


def make_scan_run(
    md: dict[str, Any],
    *,
    baseline: dict[str, Any] | None = None,
    primary_keys: tuple[str, ...] = ("eiger2_image", "inenc2_val", "inenc3_val"),
) -> ScanRun:
    """Compose a run's documents and read its baseline the way RunSession does (first row)."""
    from event_model import compose_run

    bundle = compose_run(metadata=md)
    primary = bundle.compose_descriptor(
        name="primary",
        data_keys={key: {"source": f"SIM:{key}", **_NUMBER} for key in primary_keys},
    )
    descriptors = [dict(primary.descriptor_doc)]
    reading: dict[str, Any] = {}
    if baseline is not None:
        base = bundle.compose_descriptor(
            name="baseline",
            data_keys={key: {"source": f"SIM:{key}", **_NUMBER} for key in baseline},
        )
        descriptors.append(dict(base.descriptor_doc))
        page = base.compose_event_page(
            data={k: [v] for k, v in baseline.items()},
            timestamps={k: [0.0] for k in baseline},
            seq_num=[1],
        )
        reading = {k: v[0] for k, v in page["data"].items()}
    return ScanRun(dict(bundle.start_doc), descriptors, reading)
