"""Ophyd devices of a simulated HXN fly scan: an Eiger, a PandA and the flyer that drives them.

Like HXN's hardware, the two detectors are triggered together and publish on
their own ZMQ sockets in their real wire formats (Dectris SIMPLON stream,
PandA JSON); the RunEngine only sees the flyer's documents. Each detector
publishes from a process of its own (:mod:`hxn_liveptycho.sim.publishers`), so
the simulator keeps a beamline's frame rate however busy the RunEngine's process
is. Each piece is small, in the way of ophyd-async's ``sim`` devices.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
from ophyd import Device
from ophyd.sim import SynAxis
from ophyd.status import Status

from hxn_liveptycho.sim.publishers import (
    DEFAULT_PREENCODE_BYTES,
    EigerProcess,
    PandaProcess,
    PublisherProcess,
)
from hxn_liveptycho.sim.sample import SimulatedSample, dcm_theta_deg
from hxn_liveptycho.sim.spiral import FRAMES_PER_MESSAGE, SpiralSample

logger = logging.getLogger(__name__)

#: PandA datasets that carry the two encoders, as HXN names its capture fields.
X_CHANNEL = "/INENC2.VAL.Value"
Y_CHANNEL = "/INENC3.VAL.Value"
TS_CHANNEL = "/PCAP.TS_TRIG.Value"
#: Between arming the detectors and the first exposure: both processes get the start
#: command and are waiting when the clock reaches it.
START_LEAD_S = 0.05


class _SimDetector(Device):
    """What both simulated detectors share: a publisher process, and what it says."""

    publisher: PublisherProcess

    @property
    def endpoint(self) -> str:
        return self.publisher.endpoint

    @property
    def counters(self) -> dict[str, Any]:
        """Frames published in the current (or last) series and the rate achieved (for the
        PandA, frames whose encoder samples went out)."""
        return self.publisher.counters

    def wait_for_subscribers(self, count: int = 1, timeout: float = 5.0) -> bool:
        return self.publisher.wait_for_subscribers(count, timeout)

    def release(self) -> None:
        """Let a series held by the flyer's ``hold_before`` go on."""
        self.publisher.release()

    def close(self) -> None:
        self.publisher.close()


class SimEiger(_SimDetector):
    """An Eiger2 whose frames go out on a SIMPLON stream socket (JSON v1 or CBOR v2).

    The socket lives in the device's own process; :attr:`publisher` is that
    process's handle (``endpoint``, ``wait_for_subscribers``, live ``counters``).
    Call :meth:`close` when done.
    """

    publisher: EigerProcess

    def __init__(
        self,
        *,
        endpoint: str = "tcp://127.0.0.1:*",
        encoding: str = "bs32-lz4<",
        flavour: str = "v1",
        curve_secret_key: str | None = None,
        socket_type: str = "pub",
        preencode_bytes: int = DEFAULT_PREENCODE_BYTES,
        name: str = "eiger2",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.publisher = EigerProcess(
            endpoint,
            encoding=encoding,
            flavour=flavour,
            socket_type=socket_type,
            curve_secret_key=curve_secret_key,
            preencode_bytes=preencode_bytes,
            name=name,
        )
        self._series = 0

    def next_series(self) -> int:
        self._series += 1
        return self._series

    def series_header(self, sample: SimulatedSample, *, frame_time: float) -> dict[str, Any]:
        """The detector configuration a series header carries (v1 names)."""
        bl = sample.beamline
        return {
            "beam_center_x": float(bl.beam_center[1]),
            "beam_center_y": float(bl.beam_center[0]),
            "count_time": frame_time,
            "frame_time": frame_time,
            "nimages": sample.num_points,
            "ntrigger": 1,
            "x_pixel_size": bl.detector_pixel_m,
            "y_pixel_size": bl.detector_pixel_m,
            "detector_distance": bl.distance_m,
            "photon_energy": bl.energy_kev * 1e3,
            "wavelength": bl.wavelength_m * 1e10,
            "description": "Dectris EIGER2 Si 1M (simulated)",
        }


class SimPanda(_SimDetector):
    """A PandA whose position capture goes out on its JSON publisher, from its own process."""

    publisher: PandaProcess

    def __init__(
        self,
        *,
        endpoint: str = "tcp://127.0.0.1:*",
        socket_type: str = "pub",
        curve_secret_key: str | None = None,
        name: str = "panda1",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.publisher = PandaProcess(
            endpoint, socket_type=socket_type, curve_secret_key=curve_secret_key, name=name
        )


class SimHXNFlyer:
    """The fly-scan flyer: kickoff starts the detectors, complete waits, collect gives the encoders.

    One frame every ``dwell`` seconds (``1 / dwell`` frames/s), both detectors
    paced on the same monotonic clock from their own processes; the PandA sends
    one message per scan row (per run of points on a spiral). :meth:`prepare`
    arms them ahead of the plan (the Eiger's process simulates and encodes the
    frames then); otherwise kickoff does, and its status finishes when the first
    exposure starts.
    :attr:`counters` reads what each has published while the series runs,
    :attr:`report` what they published once it is complete.
    """

    def __init__(
        self,
        eiger: SimEiger,
        panda: SimPanda,
        sample: SimulatedSample,
        *,
        dwell: float = 0.01,
        name: str = "fly_panda",
        max_frames: int | None = None,
        record_frames: bool = False,
        hold_before: int | None = None,
        prepare_timeout: float = 900.0,
    ) -> None:
        if not dwell > 0:
            raise ValueError(f"dwell must be positive, got {dwell}")
        self.name = name
        self.parent = None
        self.eiger = eiger
        self.panda = panda
        self.sample = sample
        self.dwell = dwell
        self.max_frames = max_frames
        #: Also put each frame into the collected events (``eiger2_image``), so a recorder
        #: such as TiledWriter archives the run with its frames (see ``hxn_liveptycho.replay``).
        self.record_frames = record_frames
        #: Hold both detectors before this frame until :meth:`release` (a gated trigger), so a
        #: test can act while a scan is surely mid-way, however slow the machine.
        self.hold_before = hold_before
        self.prepare_timeout = prepare_timeout
        #: What each detector's process reported for the last complete series.
        self.report: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._armed: Status | None = None
        self._encoders: tuple[np.ndarray, np.ndarray] | None = None
        self._complete: Status | None = None
        self._published: list[tuple[float, float, float]] = []
        self._abort = threading.Event()

    @property
    def frame_rate_hz(self) -> float:
        return 1.0 / self.dwell

    @property
    def num_frames(self) -> int:
        n = self.sample.num_points
        return n if self.max_frames is None else min(self.max_frames, n)

    @property
    def counters(self) -> dict[str, dict[str, Any]]:
        """Live figures from both detectors' processes (frames published, rate achieved)."""
        return {"eiger": self.eiger.counters, "panda": self.panda.counters}

    def prepare(self, value: Any = None) -> Status:
        """Arm both detectors for the next series now; the status finishes once they are armed.

        Bluesky's ``Preparable``: call it (or ``bps.prepare``) before the plan so
        the frames are simulated and encoded before the RunEngine opens the run.
        Arming again before kickoff reuses the armed series.
        """
        with self._lock:
            armed = self._armed
            if armed is not None and not (armed.done and not armed.success):
                return armed  # armed, or arming: a failed arming is tried again
            self._abort.clear()
            armed = self._armed = Status(obj=self, timeout=self.prepare_timeout)
        threading.Thread(target=self._arm, args=(armed,), name="sim-hxn-arm", daemon=True).start()
        return armed

    def _arm(self, armed: Status) -> None:
        try:
            bl = self.sample.beamline
            n = self.num_frames
            series = self.eiger.next_series()
            rng = np.random.default_rng(bl.seed + series)
            xs, ys = zip(*(self.sample.encoder_samples(i, rng) for i in range(n)), strict=True)
            x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
            self.panda.publisher.prepare(
                {X_CHANNEL: x, Y_CHANNEL: y},
                frame_time=self.dwell,
                row_length=_frames_per_message(self.sample),
                timestamps=TS_CHANNEL,
                hold_before=self.hold_before,
            )
            header = self.eiger.series_header(self.sample, frame_time=self.dwell)
            done = self.eiger.publisher.prepare(
                series,
                self.sample,
                frames=n,
                frame_time=self.dwell,
                header=header,
                hold_before=self.hold_before,
                timeout=self.prepare_timeout,
            )
            logger.debug("simulated detectors armed: %s", done)
            self._encoders = (x, y)
        except Exception as exc:
            logger.exception("arming the simulated detectors failed")
            armed.set_exception(exc)
            return
        armed.set_finished()

    def kickoff(self) -> Status:
        armed = self.prepare()
        with self._lock:
            self._armed = None  # this series takes the armed one; the next arms anew
        self._published = []
        self._complete = complete = Status(obj=self)
        started = Status(obj=self)
        threading.Thread(
            target=self._fly, args=(armed, started, complete), name="sim-hxn-fly", daemon=True
        ).start()
        return started

    def _fly(self, armed: Status, started: Status, complete: Status) -> None:
        try:
            armed.wait()
            if self._abort.is_set():
                raise RuntimeError("the fly scan was stopped before it started")
            t0 = time.monotonic() + START_LEAD_S
            self.panda.publisher.start(t0)
            self.eiger.publisher.start(t0)
        except Exception as exc:
            started.set_exception(exc)
            complete.set_exception(exc)
            return
        started.set_finished()
        try:
            limit = START_LEAD_S + self.num_frames * self.dwell + 60.0
            eiger = self.eiger.publisher.wait_done(limit)
            panda = self.panda.publisher.wait_done(limit)
        except Exception as exc:
            logger.exception("simulated acquisition failed")
            complete.set_exception(exc)
            return
        assert self._encoders is not None
        x, y = self._encoders
        sent = eiger.pop("sent_wall")
        self._published = [
            (stamp, float(x[k].mean()), float(y[k].mean())) for k, stamp in enumerate(sent)
        ]
        self.report = {"eiger": eiger, "panda": panda}
        logger.info(
            "simulated fly scan: %d/%d frames at %.0f Hz (set %.0f Hz)",
            eiger["frames_published"],
            eiger["frames_planned"],
            eiger["rate_hz"] or 0.0,
            eiger["target_hz"],
        )
        complete.set_finished()

    def complete(self) -> Status:
        assert self._complete is not None, "kickoff first"
        return self._complete

    def release(self) -> None:
        """Let a series held at ``hold_before`` go on (word sent early waits for the hold)."""
        self.eiger.release()
        self.panda.release()

    def stop(self, *, success: bool = False) -> None:
        self._abort.set()
        self.eiger.publisher.abort()
        self.panda.publisher.abort()

    def describe_collect(self) -> dict[str, dict[str, Any]]:
        source = f"PANDA:{self.panda.name}"
        keys: dict[str, dict[str, Any]] = {
            "inenc2_val": {"source": source, "dtype": "number", "shape": [], "units": "counts"},
            "inenc3_val": {"source": source, "dtype": "number", "shape": [], "units": "counts"},
        }
        if self.record_frames:
            keys[f"{self.eiger.name}_image"] = {
                "source": f"ZMQ:{self.eiger.endpoint}",
                "dtype": "array",
                "dtype_numpy": np.dtype("<u4").str,
                "shape": list(self.sample.beamline.detector_shape),
                "units": "counts",
            }
        return {"primary": keys}

    def collect(self) -> Any:
        image_key = f"{self.eiger.name}_image"
        for k, (stamp, x, y) in enumerate(self._published):
            data: dict[str, Any] = {"inenc2_val": x, "inenc3_val": y}
            if self.record_frames:
                # The same frame the Eiger's process published: the same sample, same numbers.
                data[image_key] = self.sample.detector_frame(k)
            yield {"time": stamp, "data": data, "timestamps": dict.fromkeys(data, stamp)}

    def read_configuration(self) -> dict[str, Any]:
        """The Eiger's series header values a replay needs (only when frames are recorded)."""
        if not self.record_frames:
            return {}
        now = time.time()
        return {
            key: {"value": value, "timestamp": now}
            for key, value in self._detector_configuration().items()
        }

    def describe_configuration(self) -> dict[str, Any]:
        if not self.record_frames:
            return {}
        source = f"SIM:{self.eiger.name}"
        return {
            key: {"source": source, "dtype": "number", "shape": []}
            for key in self._detector_configuration()
        }

    def _detector_configuration(self) -> dict[str, float]:
        bl = self.sample.beamline
        prefix = self.eiger.name
        return {
            f"{prefix}_beam_center_x": float(bl.beam_center[1]),
            f"{prefix}_beam_center_y": float(bl.beam_center[0]),
            f"{prefix}_frame_time": self.dwell,
            f"{prefix}_x_pixel_size": bl.detector_pixel_m,
        }


def _frames_per_message(sample: SimulatedSample) -> int:
    """Frames per PandA data message: a raster's row, or a fixed run of a spiral's points."""
    if isinstance(sample, SpiralSample):
        return FRAMES_PER_MESSAGE
    return sample.beamline.x_num


def baseline_motors(energy_kev: float) -> list[SynAxis]:
    """The baseline readings HXN's auto-configuration needs: DCM angle and stage angle."""
    dcm = SynAxis(name="dcm_th")
    dcm.set(dcm_theta_deg(energy_kev)).wait()
    zpsth = SynAxis(name="zpsth")
    return [dcm, zpsth]
