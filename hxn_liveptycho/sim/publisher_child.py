"""What runs in a simulated detector's process: its command loop, and the Eiger's and the
PandA's series.

Why a module of its own: the child is spawned, sets ``OMP_NUM_THREADS=1``
before bitshuffle loads, and imports ZMQ and the wire encoders only there;
the owner's side is :mod:`~hxn_liveptycho.sim.publishers`.
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.sim.pacing import Pacer, SharedCounters

__all__ = ["REMOTE_ERRORS", "child_main"]

#: The exceptions a child's error reply is raised as again on the owner's side, by name;
#: any other arrives as a RuntimeError.
REMOTE_ERRORS: dict[str, type[Exception]] = {
    "ConfigurationError": ConfigurationError,
    "ValueError": ValueError,
    "TimeoutError": TimeoutError,
}


def child_main(
    kind: str, options: dict[str, Any], conn: Any, counters: Any, parent_pid: int
) -> None:
    """Entry point of a detector's process."""
    # bitshuffle's OpenMP runtime reads this when it loads, which happens below.
    os.environ["OMP_NUM_THREADS"] = "1"
    # Ctrl-C in a terminal reaches the whole process group; the owner decides what stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from hxn_liveptycho.util.children import exit_with_parent

    exit_with_parent(parent_pid)
    try:
        child: _Child = (_EigerChild if kind == "eiger" else _PandaChild)(options, counters)
    except Exception as exc:
        _send_error(conn, exc)
        return
    try:
        conn.send(("ok", child.describe()))
        _serve(conn, child)
    except (EOFError, OSError):
        pass  # the owner has gone: nothing is left to publish for
    finally:
        child.close()


def _send_error(conn: Any, exc: Exception) -> None:
    name = type(exc).__name__
    text = str(exc) if name in REMOTE_ERRORS else f"{name}: {exc}"
    conn.send(("error", name, text))


def _serve(conn: Any, child: _Child) -> None:
    released = False  # a release that came after the series was armed, before it started
    while True:
        command, *args = conn.recv()
        if command == "close":
            return
        if command == "abort":
            continue  # nothing is running: late word about the last series
        if command == "release":
            released = True
            continue
        try:
            if command == "subscribers":
                result: Any = child.wait_for_subscribers(*args)
            elif command == "prepare":
                released = False
                result = child.prepare(*args)
            elif command == "start":
                pacer = Pacer(conn, child.counters, *args)
                pacer.released, released = released, False
                result = child.publish(pacer)
            else:
                raise ValueError(f"unknown command {command!r}")
        except (EOFError, OSError):
            raise
        except Exception as exc:
            _send_error(conn, exc)
            continue
        conn.send(("ok", result))


class _Child:
    """What both detectors' processes share: the wire socket and an inproc encoder read-back."""

    counters: SharedCounters

    def __init__(self, options: dict[str, Any], counters: Any, make_encoder: Callable) -> None:
        import zmq

        from hxn_liveptycho.streams._zmq import ZmqPublisher

        self.counters = SharedCounters(counters)
        self.counters.reset()
        self._zmq = zmq
        self.context: Any = zmq.Context.instance()
        self.wire = ZmqPublisher(
            options["endpoint"],
            socket_type=options["socket_type"],
            context=self.context,
            sndhwm=0,
            send_timeout=None,
            curve_secret_key=options.get("curve_secret_key"),
        )
        address = f"inproc://sim-hxn-encoder-{uuid.uuid4().hex}"
        self.encoder = make_encoder(address, self.context)
        self._readback = self.context.socket(zmq.PULL)
        self._readback.setsockopt(zmq.RCVTIMEO, 10_000)
        self._readback.connect(address)
        self.plan: dict[str, Any] | None = None
        self.counters.state("idle")

    def describe(self) -> dict[str, Any]:
        return {"endpoint": self.wire.endpoint, "curve_public_key": self.wire.curve_public_key}

    def wait_for_subscribers(self, count: int, timeout: float) -> bool:
        return self.wire.wait_for_subscribers(count, timeout)

    def read_back(self) -> tuple[list[bytes], int]:
        """The message the encoder just made, and its size in bytes."""
        parts = self._readback.recv_multipart()
        return parts, sum(len(p) for p in parts)

    def prepare(self, spec: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def publish(self, pacer: Pacer) -> dict[str, Any]:
        raise NotImplementedError

    def begin_series(self, pacer: Pacer) -> dict[str, Any]:
        """The prepared plan, taken once (a start without a prepare is refused), with the
        counters marked as publishing from ``pacer.t0``."""
        plan, self.plan = self.plan, None
        if plan is None:
            raise RuntimeError("start without prepare")
        self.counters["t0"] = pacer.t0
        self.counters.state("publishing")
        return plan

    def close(self) -> None:
        self._readback.close(linger=0)
        self.encoder.close(linger=0)
        self.wire.close(linger=2.0)
        self.context.term()


class _EigerChild(_Child):
    def __init__(self, options: dict[str, Any], counters: Any) -> None:
        from hxn_liveptycho.streams.eiger import EigerPublisher

        def make_encoder(address: str, context: Any) -> EigerPublisher:
            return EigerPublisher(
                address,
                encoding=options["encoding"],
                flavour=options["flavour"],
                socket_type="push",
                context=context,
            )

        super().__init__(options, counters, make_encoder)
        self.budget = int(options["preencode_bytes"])

    def prepare(self, spec: dict[str, Any]) -> dict[str, Any]:
        began = time.monotonic()
        series, sample, frames = spec["series"], spec["sample"], spec["frames"]
        self.counters.reset(series=series, frames_planned=frames, frame_time_s=spec["frame_time"])
        self.counters.state("preparing")
        bl = sample.beamline
        self.encoder.start_series(
            series, shape=bl.detector_shape, dtype="uint32", header=spec["header"]
        )
        header, _ = self.read_back()
        sample.intensities  # noqa: B018 -- simulate every frame now, not during the series
        simulated = time.monotonic()
        messages: list[tuple[list[bytes], int] | None] = []
        total = 0
        for index in range(frames):
            if total >= self.budget:
                break
            self.encoder.send_frame(series, index, sample.detector_frame(index))
            message = self.read_back()
            messages.append(message)
            total += message[1]
        done = time.monotonic()
        self.plan = {**spec, "header_parts": header, "messages": messages}
        self.counters["preencoded_frames"] = len(messages)
        self.counters["prepare_s"] = done - began
        self.counters.state("prepared")
        return {
            "frames": frames,
            "preencoded_frames": len(messages),
            "preencoded_bytes": total,
            "simulate_s": simulated - began,
            "encode_s": done - simulated,
        }

    def publish(self, pacer: Pacer) -> dict[str, Any]:
        plan = self.begin_series(pacer)
        series, sample, frames = plan["series"], plan["sample"], plan["frames"]
        period = plan["frame_time"]
        messages = plan["messages"]
        self.wire.send_parts(plan["header_parts"])
        sent_wall: list[float] = []
        try:
            for index in range(frames):
                if index < len(messages):
                    message = messages[index]
                    messages[index] = None  # sent once: its memory goes back now
                else:
                    self.encoder.send_frame(series, index, sample.detector_frame(index))
                    message = self.read_back()
                assert message is not None
                if index == plan["hold_before"] and not pacer.hold():
                    break
                # Frame i's exposure spans [t0 + i T, t0 + (i + 1) T]; it leaves when that ends.
                if not pacer.wait_until(pacer.due(index + 1, period)):
                    break
                self.wire.send_parts(message[0])
                pacer.sent(index + 1, message[1])
                sent_wall.append(time.time())
        finally:
            self.encoder.end_series(series)
            self.wire.send_parts(self.read_back()[0])
            self.counters.state("done")
        return pacer.report(
            frames,
            len(sent_wall),
            sent_wall=sent_wall,
            preencoded_frames=len(messages),
            prepare_s=self.counters["prepare_s"],
        )


class _PandaChild(_Child):
    def __init__(self, options: dict[str, Any], counters: Any) -> None:
        from hxn_liveptycho.streams.panda import PandaPublisher

        def make_encoder(address: str, context: Any) -> PandaPublisher:
            return PandaPublisher(address, socket_type="push", context=context)

        super().__init__(options, counters, make_encoder)

    def prepare(self, spec: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        samples = {name: np.asarray(v, dtype=np.float64) for name, v in spec["samples"].items()}
        shapes = {v.shape for v in samples.values()}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(f"encoder samples must share one (frames, k) shape, got {shapes}")
        frames, _ = next(iter(shapes))
        self.counters.reset(frames_planned=frames, frame_time_s=spec["frame_time"])
        self.plan = {**spec, "samples": samples, "frames": frames}
        self.counters.state("prepared")
        return {"frames": frames}

    def publish(self, pacer: Pacer) -> dict[str, Any]:
        import numpy as np

        plan = self.begin_series(pacer)
        samples, frames, row = plan["samples"], plan["frames"], plan["row_length"]
        period = plan["frame_time"]
        per_frame = next(iter(samples.values())).shape[1]
        self.encoder.start()
        self.wire.send_parts(self.read_back()[0])
        published = 0
        try:
            for row_start in range(0, frames, row):
                row_end = min(row_start + row, frames)
                datasets = {name: v[row_start:row_end].ravel() for name, v in samples.items()}
                first_sample = row_start * per_frame
                count = (row_end - row_start) * per_frame
                datasets[plan["timestamps"]] = (
                    (first_sample + np.arange(count)) * period / per_frame
                )
                hold = plan["hold_before"]
                if hold is not None and row_start <= hold < row_end and not pacer.hold():
                    break
                # A row's samples leave when its last exposure ends, as the Eiger's frames do.
                # They are encoded only then, so the stop message counts what went out.
                if not pacer.wait_until(pacer.due(row_end, period)):
                    break
                self.encoder.send_samples(datasets, frame_number=row_start // row)
                parts, nbytes = self.read_back()
                self.wire.send_parts(parts)
                pacer.sent(row_end, nbytes)
                published = row_end
        finally:
            self.encoder.stop()
            self.wire.send_parts(self.read_back()[0])
            self.counters.state("done")
        return pacer.report(frames, published)
