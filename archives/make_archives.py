"""Regenerate the archived runs in this folder (deterministic: same bytes of data every time).

    python archives/make_archives.py          # writes archives/clean-12x12, archives/faulty-12x12

Each archive is a simulated HXN fly scan (12 x 12 positions) recorded the
way a document recorder sees it: a real RunEngine flies ``fly2dpd`` with the
simulated Eiger and PandA, and every document is kept, frames included
(``SimHXNFlyer(record_frames=True)``). Frames are then cropped to the
128 x 128 window around the beam centre (the part a reconstruction reads;
the beam centre in the descriptor's configuration is moved with it), uids and
times are replaced by deterministic ones, and the faulty archive gets the
faults seen at HXN: frames the detector never delivered, and first rows
whose encoder positions overshoot the commanded range while the stage settles.
"""

from __future__ import annotations

import argparse
import copy
import logging
import uuid
from pathlib import Path
from typing import Any

import numpy as np
from event_model import unpack_event_page

from hxn_liveptycho.replay import write_archive
from hxn_liveptycho.sim import (
    SimEiger,
    SimHXNFlyer,
    SimPanda,
    SimulatedBeamline,
    SimulatedSample,
    baseline_motors,
    fly2dpd,
)

logger = logging.getLogger("make_archives")
HERE = Path(__file__).resolve().parent
BEAMLINE = SimulatedBeamline(x_num=12, y_num=12, photons_per_frame=2e5)
ROI = 128
DWELL_S = 0.02
ROW_TURNAROUND_S = 0.05
EPOCH = 1_767_225_600.0  # 2026-01-01T00:00:00Z: archives carry fixed times
NAMESPACE = uuid.UUID("6f1c9d0e-2b1a-4e53-9d61-4c1a7d1e0b2c")
#: The faulty archive's faults: frames never delivered, and settling overshoot factors by row.
MISSING_FRAMES = (5, 37, 38, 90)
SETTLING_OVERSHOOT = (4.0, 2.5)


def record(beamline: SimulatedBeamline) -> list[tuple[str, dict[str, Any]]]:
    """Every document of one simulated fly scan, frames inline, as a recorder receives them."""
    from bluesky import RunEngine

    documents: list[tuple[str, dict[str, Any]]] = []
    sample = SimulatedSample(beamline)
    eiger, panda = SimEiger(), SimPanda()
    RE = RunEngine({}, call_returns_result=True)
    try:

        def keep(name: str, doc: dict[str, Any]) -> None:
            if name == "event_page":  # one event per line reads (and diffs) better
                documents.extend(("event", event) for event in unpack_event_page(doc))
            else:
                documents.append((name, copy.deepcopy(doc)))

        RE.subscribe(keep)
        flyer = SimHXNFlyer(eiger, panda, sample, dwell=DWELL_S, record_frames=True)
        RE(fly2dpd(flyer, baseline=baseline_motors(beamline.energy_kev), md={"scan_id": 1}))
    finally:
        RE.loop.call_soon_threadsafe(RE.loop.stop)
        RE._th.join(timeout=10)
        RE.loop.close()
        eiger.close()
        panda.close()
    return documents


def deterministic(
    documents: list[tuple[str, dict[str, Any]]], name: str
) -> list[tuple[str, dict[str, Any]]]:
    """Fixed uids and times: a primary event every DWELL_S, a turnaround after each row."""
    uids: dict[str, str] = {}

    def new_uid(old: str) -> str:
        return uids.setdefault(old, str(uuid.uuid5(NAMESPACE, f"{name}:{len(uids)}")))

    primary = {d["uid"] for n, d in documents if n == "descriptor" and d["name"] == "primary"}
    x_num = BEAMLINE.x_num
    scan_t0 = EPOCH + 1.0
    n_points = BEAMLINE.x_num * BEAMLINE.y_num
    scan_end = scan_t0 + n_points * DWELL_S + BEAMLINE.y_num * ROW_TURNAROUND_S
    out = []
    after_scan = False
    for k, (doc_name, original) in enumerate(documents):
        doc = copy.deepcopy(original)
        for key in ("uid", "run_start", "descriptor"):
            if key in doc:
                doc[key] = new_uid(doc[key])
        if doc_name == "descriptor" and original["uid"] in primary:
            after_scan = True
        if doc_name == "event" and original["descriptor"] in primary:
            i = doc["seq_num"] - 1
            t = scan_t0 + i * DWELL_S + (i // x_num) * ROW_TURNAROUND_S
        else:
            t = (scan_end if after_scan else EPOCH) + 0.01 * k
        doc["time"] = t
        if "timestamps" in doc:
            doc["timestamps"] = dict.fromkeys(doc["timestamps"], t)
        for info in (doc.get("data_keys") or {}).values():
            if str(info.get("source", "")).startswith("ZMQ:"):
                info["source"] = "ZMQ:tcp://xf03id-eiger2:9999"  # not the random local port
        for config in (doc.get("configuration") or {}).values():
            config["timestamps"] = dict.fromkeys(config.get("timestamps", {}), t)
        out.append((doc_name, doc))
    return out


def crop_frames(
    documents: list[tuple[str, dict[str, Any]]], key: str
) -> tuple[list[tuple[str, dict[str, Any]]], np.ndarray]:
    """Frames out of the events, cut to the ROI; the beam centre moved into the crop."""
    cy, cx = BEAMLINE.beam_center
    top, left = cy - ROI // 2, cx - ROI // 2
    frames = []
    out = []
    for name, doc in documents:
        if name == "event" and key in doc["data"]:
            frames.append(np.asarray(doc["data"][key])[top : top + ROI, left : left + ROI])
        if name == "descriptor" and key in doc["data_keys"]:
            doc = copy.deepcopy(doc)
            for config in doc["configuration"].values():
                data = config["data"]
                data["eiger2_beam_center_y"] = float(cy - top)
                data["eiger2_beam_center_x"] = float(cx - left)
        out.append((name, doc))
    return out, np.stack(frames)


def with_settling(
    documents: list[tuple[str, dict[str, Any]]], factors: tuple[float, ...]
) -> list[tuple[str, dict[str, Any]]]:
    """The first rows' x encoder readings overshoot the commanded range by ``factors``."""
    x_num = BEAMLINE.x_num
    out = []
    for name, doc in documents:
        if name == "event" and "inenc2_val" in doc["data"]:
            row = (doc["seq_num"] - 1) // x_num
            if row < len(factors):
                doc = copy.deepcopy(doc)
                doc["data"]["inenc2_val"] *= factors[row]
        out.append((name, doc))
    return out


def make(out_dir: Path) -> list[Path]:
    recorded = record(BEAMLINE)
    written = []
    for name, faulty in (("clean-12x12", False), ("faulty-12x12", True)):
        documents, frames = crop_frames(deterministic(recorded, name), "eiger2_image")
        numbers = np.arange(frames.shape[0])
        if faulty:
            documents = with_settling(documents, SETTLING_OVERSHOOT)
            numbers = np.setdiff1d(numbers, MISSING_FRAMES)
            frames = frames[numbers]
            documents[0][1]["description"] = (
                f"frames {list(MISSING_FRAMES)} never delivered; "
                f"rows 0-{len(SETTLING_OVERSHOOT) - 1} overshoot the commanded x range "
                f"by {list(SETTLING_OVERSHOOT)}"
            )
        written.append(
            write_archive(out_dir / name, documents, frames, numbers, frame_key="eiger2_image")
        )
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="folder for the archives")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logger.setLevel(logging.INFO)
    for path in make(args.out):
        size = sum(p.stat().st_size for p in path.iterdir())
        logger.info("%s: %.2f MB", path, size / 1e6)


if __name__ == "__main__":
    main()
