"""Sustained replay publish rate (frames/s) for raw and bslz4 Eiger frames.

    python benchmarks/replay_rate.py [--frames 2048] [--size 256] [--flavour v1]

The clean archive's frames (archives/clean-12x12) are tiled to ``--frames``
frames of ``--size`` x ``--size`` uint32 pixels (zero-padded around the
recorded 128 x 128 window, as a detector crop would be) and replayed unpaced
(``pace="fast"``) through the real publishers. One bare ZMQ SUB socket per
stream drains what is sent; the rate is frames over the time from the first
frame sent to the last frame received, so a publisher that merely queues does
not look faster than the wire.
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import zmq

from hxn_liveptycho.replay import StreamPublishers, load_archive, replay_run
from hxn_liveptycho.replay.model import RecordedRun

ARCHIVE = Path(__file__).resolve().parents[1] / "archives" / "clean-12x12"


class ArrayFrames:
    """Frames held in memory (the benchmark measures publishing, not disk)."""

    def __init__(self, frames: np.ndarray) -> None:
        self._frames = frames

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self._frames.shape)

    @property
    def dtype(self) -> np.dtype:
        return self._frames.dtype

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._frames[start:stop]


def scaled_run(n_frames: int, size: int) -> RecordedRun:
    run = load_archive(ARCHIVE)
    recorded = run.frames.read(0, run.frames.shape[0])
    run.close()
    h, w = recorded.shape[1:]
    top, left = (size - h) // 2, (size - w) // 2
    frames = np.zeros((n_frames, size, size), dtype=recorded.dtype)
    repeats = np.arange(n_frames) % recorded.shape[0]
    frames[:, top : top + h, left : left + w] = recorded[repeats]
    positions = run.positions[repeats]
    times = run.times[0] + np.arange(n_frames) * run.detector.frame_time_s
    return replace(
        run,
        frames=ArrayFrames(frames),
        frame_numbers=np.arange(n_frames),
        positions=positions,
        times=times,
        resources=[],
    )


class Drain(threading.Thread):
    """Counts the Eiger images arriving on a SUB socket; notes when the last one came."""

    def __init__(self, endpoint: str, expected: int) -> None:
        super().__init__(name="replay-bench-drain", daemon=True)
        self.socket = zmq.Context.instance().socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.socket.setsockopt(zmq.RCVHWM, 0)
        self.socket.connect(endpoint)
        self.expected = expected
        self.images = 0
        self.done_at: float | None = None

    def run(self) -> None:
        while self.images < self.expected and self.socket.poll(10_000):
            parts = self.socket.recv_multipart(copy=False)
            if len(parts) == 4 or (len(parts) == 1 and b"image" in parts[0].bytes[:64]):
                self.images += 1
        self.done_at = time.monotonic()
        self.socket.close(linger=0)


def measure(run: RecordedRun, encoding: str, flavour: str) -> tuple[float, float, int]:
    with StreamPublishers(encoding=encoding, flavour=flavour) as publishers:
        drains = [
            Drain(publishers.eiger_endpoint, run.frames.shape[0]),
            Drain(publishers.panda_endpoint, 0),
        ]
        for drain in drains:
            drain.start()
        began = time.monotonic()
        report = replay_run(
            run, callback=lambda name, doc: None, publishers=publishers, pace="fast"
        )
        drains[0].join(60)
        drains[1].join(1)
        received = drains[0].images
        end = drains[0].done_at or time.monotonic()
    return report.frames_per_second or 0.0, received / (end - began), received


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=2048)
    parser.add_argument("--size", type=int, default=256, help="frame edge in pixels")
    parser.add_argument("--flavour", choices=["v1", "v2"], default="v1")
    args = parser.parse_args()
    print(
        f"# {datetime.now(UTC):%Y-%m-%d}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {args.frames} frames of {args.size}x{args.size} uint32, "
        f"SIMPLON {args.flavour}"
    )
    print("| encoding | sent (frames/s) | sent and received (frames/s) | received |")
    print("|---|---|---|---|")
    for encoding in ("raw", "bs32-lz4<"):
        run = scaled_run(args.frames, args.size)
        sent, received_rate, received = measure(run, encoding, args.flavour)
        print(f"| {encoding} | {sent:,.0f} | {received_rate:,.0f} | {received}/{args.frames} |")


if __name__ == "__main__":
    main()
