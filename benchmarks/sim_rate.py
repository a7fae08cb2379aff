"""The simulated detectors' achieved publish rate at set frame rates, with a receiver draining.

    python benchmarks/sim_rate.py [--rates 500 2000] [--points 64] [--window 128]
        [--detector 256] [--encoding bs32-lz4<] [--flavour v1] [--json PATH]

A 64 x 64-point simulated fly scan (4,096 frames of ``--detector``² uint32, the
phantom's ``--window``² diffraction at the beam centre) is published by
``SimEiger`` and ``SimPanda`` from their own processes at each set rate, driven
by ``SimHXNFlyer`` as a plan would (prepare, kickoff, complete). One bare ZMQ
SUB socket per stream, in this process, drains what arrives. Figures per rate:

- published: frames the Eiger's process sent, and its achieved rate (frames
  after the first over the time from the first send to the last);
- late: the longest a frame waited past its due time;
- received: frames the drain got, and its rate over the time from the first
  frame received to the last; ``end lag``: last frame received after the last
  frame sent (both on the machine's monotonic clock).

The frames are simulated once, here, and handed to the Eiger's process with the
sample; each rate's ``prepare`` (encoding them) is timed separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time
from datetime import date
from pathlib import Path
from typing import Any

import zmq

from hxn_liveptycho.sim import SimEiger, SimHXNFlyer, SimPanda, SimulatedBeamline, SimulatedSample
from hxn_liveptycho.streams import cbor


class Drain(threading.Thread):
    """Counts the Eiger images (or PandA data messages) arriving on a SUB socket, and when."""

    def __init__(self, endpoint: str) -> None:
        super().__init__(name="sim-rate-drain", daemon=True)
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.connect(endpoint)
        self.count = 0
        self.first: float | None = None
        self.last: float | None = None

    def run(self) -> None:
        while self.socket.poll(20_000):
            kind = message_kind(self.socket.recv_multipart(copy=False))
            if kind in ("dseries_end-1.0", "end", "stop"):
                break
            if kind not in ("dimage-1.0", "image", "data"):
                continue  # a series header, the PandA's start
            now = time.monotonic()
            if self.first is None:
                self.first = now
            self.last = now
            self.count += 1
        self.socket.close(linger=0)


def message_kind(parts: list[zmq.Frame]) -> str:
    """The message's type as its wire format names it (v1 htype, v2 type, PandA msg_type)."""
    first = parts[0].buffer
    if cbor.looks_like_v2(first):
        return cbor.loads(first).type
    head = json.loads(bytes(first))
    return str(head.get("htype") or head.get("msg_type"))


def measure(
    sample: SimulatedSample, rate: float, *, encoding: str, flavour: str, socket: str
) -> dict[str, Any]:
    eiger = SimEiger(encoding=encoding, flavour=flavour)
    panda = SimPanda()
    try:
        drains = [Drain(eiger.endpoint), Drain(panda.endpoint)]
        assert eiger.wait_for_subscribers(1, timeout=10.0)
        assert panda.wait_for_subscribers(1, timeout=10.0)
        flyer = SimHXNFlyer(eiger, panda, sample, dwell=1.0 / rate)
        began = time.monotonic()
        flyer.prepare().wait()
        prepared = time.monotonic() - began
        for drain in drains:  # subscribed since they were made; draining from now on
            drain.start()
        flyer.kickoff().wait()
        flyer.complete().wait()
        for drain in drains:
            drain.join(30.0)
        published = flyer.report["eiger"]
        last_sent = published["last_sent"]
    finally:
        eiger.close()
        panda.close()
    received = drains[0]
    receive_span = (received.last or 0.0) - (received.first or 0.0)
    frames = published["frames_planned"]
    return {
        "feed_hz": rate,
        "frames": frames,
        "frame_shape": list(sample.beamline.detector_shape),
        "window": sample.beamline.window,
        "encoding": encoding,
        "flavour": flavour,
        "socket": socket,
        "published": published["frames_published"],
        "publish_rate_hz": published["rate_hz"],
        "max_late_s": published["max_late_s"],
        "bytes_per_frame": published["bytes_published"] / max(published["frames_published"], 1),
        "received": received.count,
        "receive_rate_hz": (received.count - 1) / receive_span if receive_span > 0 else None,
        "end_lag_s": (received.last - last_sent) if received.last is not None else None,
        "panda_messages_received": drains[1].count,
        "panda_rate_hz": flyer.report["panda"]["rate_hz"],
        "prepare_s": prepared,
        "device": device(),
        "date": date.today().isoformat(),
    }


def device() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[500.0, 2000.0])
    parser.add_argument("--points", type=int, default=64, help="scan points per side")
    parser.add_argument("--window", type=int, default=128, help="diffraction pattern edge")
    parser.add_argument("--detector", type=int, default=256, help="frame edge on the wire")
    parser.add_argument("--encoding", default="bs32-lz4<", help="bs32-lz4<, lz4< or raw")
    parser.add_argument("--flavour", choices=["v1", "v2"], default="v1")
    parser.add_argument("--json", type=Path, default=None, help="also write the cases here")
    args = parser.parse_args()

    fields: dict[str, Any] = {"x_num": args.points, "y_num": args.points, "window": args.window}
    if args.detector != 256 or args.window > 128:
        centre = args.detector // 2
        fields |= {"detector_shape": (args.detector,) * 2, "beam_center": (centre, centre)}
    sample = SimulatedSample(SimulatedBeamline(**fields))
    began = time.monotonic()
    sample.intensities  # noqa: B018 -- simulated once here, not once per rate
    simulated = time.monotonic() - began
    print(
        f"# {date.today()}, {device()}; {sample.num_points} frames of "
        f"{args.detector}x{args.detector} uint32 ({args.window}² pattern), {args.encoding}, "
        f"SIMPLON {args.flavour}; simulated in {simulated:.1f} s"
    )
    print(
        "| set (Hz) | published | achieved (Hz) | max late (ms) | received | "
        "received (Hz) | end lag (ms) | kB/frame | prepare (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    cases = []
    for rate in args.rates:
        case = measure(sample, rate, encoding=args.encoding, flavour=args.flavour, socket="pub")
        cases.append(case)
        print(
            f"| {rate:,.0f} | {case['published']}/{case['frames']} | "
            f"{case['publish_rate_hz']:,.1f} | {case['max_late_s'] * 1e3:.1f} | "
            f"{case['received']}/{case['frames']} | {case['receive_rate_hz']:,.1f} | "
            f"{(case['end_lag_s'] or 0.0) * 1e3:.1f} | {case['bytes_per_frame'] / 1e3:.1f} | "
            f"{case['prepare_s']:.1f} |"
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(cases, indent=2) + "\n")
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
