"""The simulated Eiger and PandA publish from processes of their own, paced on a monotonic clock.

Why processes: a publisher inside the RunEngine's process shares the GIL with the
RunEngine, the callback and the receivers, and bitshuffle's OpenMP threads make
each encode far slower on a busy host than one thread does; such a simulator
cannot feed a beamline's frame rate. Each simulated device therefore owns one
child (spawn context), which

- sets ``OMP_NUM_THREADS=1`` before bitshuffle loads (nothing its modules import
  at their top loads it), binds the device's socket and reports the endpoint;
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

This module is the owner's side; the child's is
:mod:`~hxn_liveptycho.sim.publisher_child`, and the schedule both keep
:mod:`~hxn_liveptycho.sim.pacing`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import threading
import time
import weakref
from typing import Any, ClassVar

from hxn_liveptycho.sim.pacing import COUNTER_FIELDS, STATES
from hxn_liveptycho.sim.publisher_child import REMOTE_ERRORS, child_main
from hxn_liveptycho.util.children import start_spawned

logger = logging.getLogger(__name__)

#: Pre-encoded Eiger messages a child may hold for one series; frames past it are encoded
#: while the series runs.
DEFAULT_PREENCODE_BYTES = 1 << 30


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
            target=child_main,
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
                    raise REMOTE_ERRORS.get(kind, RuntimeError)(f"simulated {self.name}: {text}")
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
