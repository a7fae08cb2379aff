"""The simulated Eiger and PandA publish from processes of their own, paced on a monotonic clock.

Why processes: a publisher inside the RunEngine's process shares the GIL with the
RunEngine, the callback and the receivers, and bitshuffle's OpenMP threads make
each encode far slower on a busy host than one thread does; such a simulator
cannot feed a beamline's frame rate. Each simulated device therefore owns one
child (spawn context), which

- sets ``OMP_NUM_THREADS=1`` before bitshuffle loads (nothing this module imports
  at its top loads it), binds the device's socket and reports the endpoint;
- on ``prepare`` simulates the series' frames from the phantom and encodes them
  (as far as a memory budget goes; the rest are encoded on the fly), so that the
  series runs at its rate from the first frame;
- on ``start`` publishes item ``i`` when the monotonic clock reaches ``t0 + i T``:
  a late item goes out at once and the next ones catch up, so the schedule never
  drifts; an ``abort`` ends the series early (its end message still goes out);
- counts what it published into shared memory that the owner reads at any time
  (:attr:`PublisherProcess.counters`), and returns a report when a series ends;
- exits when its owner closes it, when the pipe to its owner breaks, or (Linux)
  when the owner dies, by ``PR_SET_PDEATHSIG``.

The bytes on the wire are made by the project's own :class:`EigerPublisher` and
:class:`PandaPublisher`: the child drives them through an inproc socket, reads the
messages back, and sends those exact messages on the device's socket later, at
the set rate. The wire formats therefore cannot drift from the real ones.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.util.children import start_spawned

logger = logging.getLogger(__name__)

#: What the shared counters hold, in order (doubles; times on the monotonic clock).
COUNTER_FIELDS = (
    "state",
    "series",
    "frames_planned",
    "frames_published",
    "frames_in_first_message",
    "messages_published",
    "bytes_published",
    "t0",
    "first_sent",
    "last_sent",
    "max_late_s",
    "frame_time_s",
    "preencoded_frames",
    "prepare_s",
    "held_s",
)
STATES = ("starting", "idle", "preparing", "prepared", "publishing", "held", "done")
#: Pre-encoded Eiger messages a child may hold for one series; frames past it are encoded
#: while the series runs.
DEFAULT_PREENCODE_BYTES = 1 << 30
#: How often a publishing child looks at its pipe (abort, or its owner gone), in seconds.
_COMMAND_POLL_S = 0.01
_ERRORS: dict[str, type[Exception]] = {
    "ConfigurationError": ConfigurationError,
    "ValueError": ValueError,
    "TimeoutError": TimeoutError,
}


class PublisherProcess:
    """One simulated detector's child process, as its owner sees it.

    Requests (``wait_for_subscribers``, ``prepare``) are answered in order; while a
    series runs, only :meth:`abort` and :meth:`wait_done` may be used. The owner
    must :meth:`close` it (a finaliser does so if it is forgotten).
    """

    kind: ClassVar[str]

    def __init__(self, options: dict[str, Any], *, name: str, start_timeout: float = 60.0) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.name = name
        self._lock = threading.Lock()  # one request (or wait_done) receives at a time
        self._send_lock = threading.Lock()  # abort may send while wait_done receives
        self._busy = False
        self._counters = ctx.RawArray("d", len(COUNTER_FIELDS))
        self._conn, child_conn = ctx.Pipe()
        self._process = ctx.Process(
            target=_child_main,
            args=(self.kind, options, child_conn, self._counters, os.getpid()),
            name=f"sim-hxn-{name}",
            daemon=True,
        )
        start_spawned(self._process)
        child_conn.close()
        self._finalizer = weakref.finalize(self, _shut_down, self._process, self._conn, 5.0)
        try:
            with self._lock:
                ready = self._reply(start_timeout, "start")
        except BaseException:
            self.close()
            raise
        self.endpoint: str = ready["endpoint"]
        self.curve_public_key: str | None = ready.get("curve_public_key")
        self.pid = self._process.pid

    @property
    def alive(self) -> bool:
        return self._process.is_alive()

    @property
    def counters(self) -> dict[str, Any]:
        """What the child has published in its current (or last) series, read without a request.

        ``rate_hz`` is the achieved frame rate: the frames published after the
        first message over the time from the first send to the last;
        ``max_late_s`` the longest an item waited past its due time;
        ``t0`` (the series' start), ``first_sent`` and ``last_sent`` are on the
        monotonic clock, which on Linux is the whole machine's, so a receiver's
        times compare with them.
        """
        raw = dict(zip(COUNTER_FIELDS, self._counters[:], strict=True))
        published = int(raw["frames_published"])
        span = raw["last_sent"] - raw["first_sent"]
        frame_time = raw["frame_time_s"]
        after_first = published - raw["frames_in_first_message"]
        return {
            "state": STATES[int(raw["state"])],
            "series": int(raw["series"]),
            "frames_planned": int(raw["frames_planned"]),
            "frames_published": published,
            "messages_published": int(raw["messages_published"]),
            "bytes_published": int(raw["bytes_published"]),
            "target_hz": 1.0 / frame_time if frame_time > 0 else None,
            "rate_hz": after_first / span if after_first > 0 and span > 0 else None,
            "seconds": span if published else 0.0,
            "t0": raw["t0"],
            "first_sent": raw["first_sent"],
            "last_sent": raw["last_sent"],
            "max_late_s": raw["max_late_s"],
            "preencoded_frames": int(raw["preencoded_frames"]),
            "prepare_s": raw["prepare_s"],
            "held_s": raw["held_s"],
        }

    def wait_for_subscribers(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Wait until ``count`` SUB sockets have subscribed (PUB; ZMQ's slow joiner)."""
        return bool(self._request(("subscribers", count, timeout), timeout + 10.0))

    def start(self, t0: float) -> None:
        """Start the prepared series: item ``i`` goes out at ``t0 + i T`` on the monotonic clock."""
        with self._lock:
            if self._busy:
                raise RuntimeError(f"simulated {self.name}: a series is already running")
            self._send(("start", t0))
            self._busy = True

    def wait_done(self, timeout: float) -> dict[str, Any]:
        """The report of the series :meth:`start` began, once it has ended (or been aborted)."""
        with self._lock:
            if not self._busy:
                raise RuntimeError(f"simulated {self.name}: no series is running")
            try:
                return dict(self._reply(timeout, "series"))
            finally:
                self._busy = False

    def abort(self) -> None:
        """End a running series early (its end message still goes out); idle, it does nothing."""
        if self._process.is_alive():
            with contextlib.suppress(OSError, RuntimeError):  # gone or closed: nothing runs
                self._send(("abort",))

    def release(self) -> None:
        """Let a series held by ``hold_before`` go on (or not stop, if it has not got there)."""
        if self._process.is_alive():
            with contextlib.suppress(OSError, RuntimeError):
                self._send(("release",))

    def close(self, timeout: float = 5.0) -> None:
        """Stop the child (queued messages get a moment to leave) and release its pipe."""
        self._finalizer.detach()
        _shut_down(self._process, self._conn, timeout, self._send_lock)

    def _request(self, message: tuple[Any, ...], timeout: float) -> Any:
        with self._lock:
            if self._busy:
                raise RuntimeError(f"simulated {self.name} is publishing a series")
            self._send(message)
            return self._reply(timeout, str(message[0]))

    def _send(self, message: tuple[Any, ...]) -> None:
        with self._send_lock:
            if self._conn.closed:
                raise RuntimeError(f"simulated {self.name} is closed")
            self._conn.send(message)

    def _reply(self, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"simulated {self.name}: no answer to {what} in {timeout:g} s")
            try:
                ready = self._conn.poll(min(remaining, 0.25))
            except (OSError, EOFError):
                ready = True
            if ready:
                try:
                    status, *payload = self._conn.recv()
                except (EOFError, OSError):
                    self._process.join(1.0)
                    raise RuntimeError(
                        f"simulated {self.name}'s process ended "
                        f"(exit code {self._process.exitcode}) during {what}"
                    ) from None
                if status == "error":
                    kind, text = payload
                    raise _ERRORS.get(kind, RuntimeError)(f"simulated {self.name}: {text}")
                return payload[0]
            if not self._process.is_alive():
                raise RuntimeError(
                    f"simulated {self.name}'s process ended "
                    f"(exit code {self._process.exitcode}) during {what}"
                )


class EigerProcess(PublisherProcess):
    """The simulated Eiger's child: SIMPLON v1/v2 with bslz4/lz4/raw, as :class:`EigerPublisher`."""

    kind = "eiger"

    def __init__(
        self,
        endpoint: str,
        *,
        encoding: str = "bs32-lz4<",
        flavour: str = "v1",
        socket_type: str = "pub",
        curve_secret_key: str | None = None,
        preencode_bytes: int = DEFAULT_PREENCODE_BYTES,
        name: str = "eiger",
    ) -> None:
        options = {
            "endpoint": endpoint,
            "encoding": encoding,
            "flavour": flavour,
            "socket_type": socket_type,
            "curve_secret_key": curve_secret_key,
            "preencode_bytes": int(preencode_bytes),
        }
        super().__init__(options, name=name)

    def prepare(
        self,
        series: int,
        sample: Any,
        *,
        frames: int,
        frame_time: float,
        header: dict[str, Any],
        hold_before: int | None = None,
        timeout: float = 600.0,
    ) -> dict[str, Any]:
        """Arm for a series of ``frames`` frames of ``sample`` (a SimulatedSample, sent by pickle).

        The child simulates the frames and encodes them before this returns;
        the reply says how long each took and how many frames were pre-encoded.
        With ``hold_before``, frame ``hold_before`` waits for :meth:`release`.
        """
        spec = {
            "series": series,
            "sample": sample,
            "frames": int(frames),
            "frame_time": float(frame_time),
            "header": dict(header),
            "hold_before": hold_before,
        }
        return dict(self._request(("prepare", spec), timeout))


class PandaProcess(PublisherProcess):
    """The simulated PandA's child: the JSON position stream, as :class:`PandaPublisher`."""

    kind = "panda"

    def __init__(
        self,
        endpoint: str,
        *,
        socket_type: str = "pub",
        curve_secret_key: str | None = None,
        name: str = "panda",
    ) -> None:
        options = {
            "endpoint": endpoint,
            "socket_type": socket_type,
            "curve_secret_key": curve_secret_key,
        }
        super().__init__(options, name=name)

    def prepare(
        self,
        samples: dict[str, Any],
        *,
        frame_time: float,
        row_length: int,
        timestamps: str,
        hold_before: int | None = None,
        timeout: float = 60.0,
    ) -> dict[str, Any]:
        """Arm for a series: ``samples`` maps channel → (frames, samples per frame) float64.

        One data message goes out per row of ``row_length`` frames, when the row's
        last exposure ends; ``timestamps`` names the channel that gets each
        sample's time since the start. With ``hold_before``, the row holding
        that frame waits for :meth:`release`.
        """
        spec = {
            "samples": samples,
            "frame_time": float(frame_time),
            "row_length": int(row_length),
            "timestamps": timestamps,
            "hold_before": hold_before,
        }
        return dict(self._request(("prepare", spec), timeout))


def _shut_down(
    process: Any, conn: Any, timeout: float, send_lock: threading.Lock | None = None
) -> None:
    """Ask the child to close, then make sure it has gone (terminate, then kill)."""
    if process.is_alive() and not conn.closed:
        try:
            if send_lock is None:
                conn.send(("close",))
            else:
                with send_lock:
                    conn.send(("close",))
        except OSError:
            pass
    process.join(timeout)
    if process.is_alive():
        logger.warning("simulated detector process %s did not stop; terminating it", process.pid)
        process.terminate()
        process.join(2.0)
        if process.is_alive():
            process.kill()
            process.join(2.0)
    if not conn.closed:
        conn.close()


# -- the child ------------------------------------------------------------------------------


def _child_main(
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
    text = str(exc) if name in _ERRORS else f"{name}: {exc}"
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
                pacer = _Pacer(conn, child.counters, *args)
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


class _Counters:
    """The shared counters by name (the child writes, the owner reads)."""

    def __init__(self, array: Any) -> None:
        self._array = array
        self._index = {name: k for k, name in enumerate(COUNTER_FIELDS)}

    def __setitem__(self, name: str, value: float) -> None:
        self._array[self._index[name]] = value

    def __getitem__(self, name: str) -> float:
        return float(self._array[self._index[name]])

    def reset(self, **values: float) -> None:
        for k in range(len(COUNTER_FIELDS)):
            self._array[k] = 0.0
        for name, value in values.items():
            self[name] = value

    def state(self, name: str) -> None:
        self["state"] = STATES.index(name)


class _Pacer:
    """Holds each item until its due time on the monotonic clock, watching the pipe meanwhile.

    Due times are absolute (``t0 + i T``), so a late item is sent at once and the
    ones after it catch up: the series never drifts. Sleeps are capped so that
    an abort (or the owner's death) is seen within a few milliseconds. A hold
    (:meth:`hold`) pauses the series, as a gated trigger would, until the owner
    releases it; the schedule then resumes from where it stood.
    """

    def __init__(self, conn: Any, counters: _Counters, t0: float) -> None:
        self.conn = conn
        self.counters = counters
        self.t0 = t0
        self.aborted = False
        self.released = False
        self.held = 0.0
        self.max_late = 0.0
        self._next_poll = 0.0

    def due(self, frames: float, period: float) -> float:
        """When ``frames`` frame times have passed since the start, holds left out."""
        return self.t0 + self.held + frames * period

    def wait_until(self, due: float) -> bool:
        """False once the owner has asked for an abort; EOFError if the owner has gone."""
        while True:
            now = time.monotonic()
            if now >= self._next_poll:
                self._next_poll = now + _COMMAND_POLL_S
                self._read_commands()
            if self.aborted:
                return False
            if now >= due:
                late = now - due
                if late > self.max_late:
                    self.max_late = late
                    self.counters["max_late_s"] = late
                return True
            time.sleep(min(due - now, _COMMAND_POLL_S))

    def hold(self) -> bool:
        """Wait for the owner's release (at once if it came already); False on an abort."""
        began = time.monotonic()
        self.counters.state("held")
        while not (self.released or self.aborted):
            if self.conn.poll(_COMMAND_POLL_S):
                self._read_commands()
        self.held += time.monotonic() - began
        self.counters["held_s"] = self.held
        self.counters.state("publishing")
        return not self.aborted

    def _read_commands(self) -> None:
        while self.conn.poll():
            command = self.conn.recv()[0]
            if command == "abort":
                self.aborted = True
            elif command == "release":
                self.released = True

    def sent(self, frames: int, nbytes: int) -> float:
        """Count one message sent (covering frames up to ``frames``); returns the monotonic time."""
        now = time.monotonic()
        c = self.counters
        if c["messages_published"] == 0:
            c["first_sent"] = now
            c["frames_in_first_message"] = frames
        c["last_sent"] = now
        c["frames_published"] = frames
        c["messages_published"] = c["messages_published"] + 1
        c["bytes_published"] = c["bytes_published"] + nbytes
        return now

    def report(self, planned: int, published: int, **extra: Any) -> dict[str, Any]:
        c = self.counters
        span = c["last_sent"] - c["first_sent"]
        after_first = published - c["frames_in_first_message"]
        return {
            "frames_planned": planned,
            "frames_published": published,
            "messages_published": int(c["messages_published"]),
            "bytes_published": int(c["bytes_published"]),
            "target_hz": 1.0 / c["frame_time_s"],
            "rate_hz": after_first / span if after_first > 0 and span > 0 else None,
            "seconds": span,
            "t0": self.t0,
            "first_sent": c["first_sent"],
            "last_sent": c["last_sent"],
            "max_late_s": self.max_late,
            "held_s": self.held,
            "aborted": self.aborted,
            **extra,
        }


class _Child:
    """What both detectors' processes share: the wire socket and an inproc encoder read-back."""

    counters: _Counters

    def __init__(self, options: dict[str, Any], counters: Any, make_encoder: Callable) -> None:
        import zmq

        from hxn_liveptycho.streams._zmq import ZmqPublisher

        self.counters = _Counters(counters)
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

    def publish(self, pacer: _Pacer) -> dict[str, Any]:
        raise NotImplementedError

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
        self.plan: dict[str, Any] | None = None

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

    def publish(self, pacer: _Pacer) -> dict[str, Any]:
        plan, self.plan = self.plan, None
        if plan is None:
            raise RuntimeError("start without prepare")
        series, sample, frames = plan["series"], plan["sample"], plan["frames"]
        period = plan["frame_time"]
        messages = plan["messages"]
        self.counters["t0"] = pacer.t0
        self.counters.state("publishing")
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
        self.plan: dict[str, Any] | None = None

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

    def publish(self, pacer: _Pacer) -> dict[str, Any]:
        import numpy as np

        plan, self.plan = self.plan, None
        if plan is None:
            raise RuntimeError("start without prepare")
        samples, frames, row = plan["samples"], plan["frames"], plan["row_length"]
        period = plan["frame_time"]
        per_frame = next(iter(samples.values())).shape[1]
        self.counters["t0"] = pacer.t0
        self.counters.state("publishing")
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
