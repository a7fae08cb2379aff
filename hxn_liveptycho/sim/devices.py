"""Ophyd devices of a simulated HXN fly scan: an Eiger, a PandA and the flyer that drives them.

Like HXN's hardware, the two detectors are triggered together and publish on
their own ZMQ sockets in their real wire formats (Dectris SIMPLON stream,
PandA JSON); the RunEngine only sees the flyer's documents. Each piece is
small, in the way of ophyd-async's ``sim`` devices.
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

from hxn_liveptycho.sim.sample import SimulatedSample, dcm_theta_deg
from hxn_liveptycho.streams import EigerPublisher, PandaPublisher

logger = logging.getLogger(__name__)

#: PandA datasets that carry the two encoders, as HXN names its capture fields.
X_CHANNEL = "/INENC2.VAL.Value"
Y_CHANNEL = "/INENC3.VAL.Value"
TS_CHANNEL = "/PCAP.TS_TRIG.Value"


class SimEiger(Device):
    """An Eiger2 whose frames go out on a SIMPLON stream socket (JSON v1 or CBOR v2)."""

    def __init__(
        self,
        *,
        endpoint: str = "tcp://127.0.0.1:*",
        encoding: str = "bs32-lz4<",
        flavour: str = "v1",
        curve_secret_key: str | None = None,
        socket_type: str = "pub",
        name: str = "eiger2",
        **kwargs: Any,
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.publisher = EigerPublisher(
            endpoint,
            encoding=encoding,
            flavour=flavour,  # type: ignore[arg-type]
            curve_secret_key=curve_secret_key,
            socket_type=socket_type,  # type: ignore[arg-type]
        )
        self._series = 0

    @property
    def endpoint(self) -> str:
        return self.publisher.endpoint

    def arm(self, sample: SimulatedSample, *, frame_time: float) -> int:
        self._series += 1
        bl = sample.beamline
        header = {
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
        self.publisher.start_series(
            self._series, shape=bl.detector_shape, dtype="uint32", header=header
        )
        return self._series

    def send(self, series: int, index: int, frame: np.ndarray) -> None:
        self.publisher.send_frame(series, index, frame)

    def disarm(self, series: int) -> None:
        self.publisher.end_series(series)

    def close(self) -> None:
        self.publisher.close()


class SimPanda(Device):
    """A PandA whose position capture goes out on its JSON publisher."""

    def __init__(
        self, *, endpoint: str = "tcp://127.0.0.1:*", name: str = "panda1", **kwargs: Any
    ) -> None:
        super().__init__(name=name, **kwargs)
        self.publisher = PandaPublisher(endpoint)

    @property
    def endpoint(self) -> str:
        return self.publisher.endpoint

    def close(self) -> None:
        self.publisher.close()


class SimHXNFlyer:
    """The fly-scan flyer: kickoff starts the detectors, complete waits, collect gives the encoders.

    Frames and encoder samples are published from a thread at ``dwell`` per
    point, one row at a time, while the RunEngine waits on ``complete``.
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
    ) -> None:
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
        self._frames: list[np.ndarray] = []
        self._thread: threading.Thread | None = None
        self._complete: Status | None = None
        self._published: list[tuple[float, float, float]] = []
        self._abort = threading.Event()

    def kickoff(self) -> Status:
        self._published = []
        self._frames = []
        self._abort.clear()
        self._complete = Status(obj=self)
        series = self.eiger.arm(self.sample, frame_time=self.dwell)
        self.panda.publisher.start()
        self._thread = threading.Thread(
            target=self._acquire, args=(series,), name="sim-hxn-fly", daemon=True
        )
        self._thread.start()
        status = Status(obj=self)
        status.set_finished()
        return status

    def _acquire(self, series: int) -> None:
        try:
            rng = np.random.default_rng(self.sample.beamline.seed + series)
            bl = self.sample.beamline
            n = (
                self.sample.num_points
                if self.max_frames is None
                else min(self.max_frames, self.sample.num_points)
            )
            sample_number = 0
            for row_start in range(0, n, bl.x_num):
                began = time.monotonic()
                row = range(row_start, min(row_start + bl.x_num, n))
                xs, ys = [], []
                for index in row:
                    if self._abort.is_set():
                        return
                    frame = self.sample.detector_frame(index)
                    self.eiger.send(series, index, frame)
                    if self.record_frames:
                        self._frames.append(frame)
                    x, y = self.sample.encoder_samples(index, rng)
                    xs.append(x)
                    ys.append(y)
                    self._published.append((time.time(), float(x.mean()), float(y.mean())))
                x_all, y_all = np.concatenate(xs), np.concatenate(ys)
                ts = (sample_number + np.arange(x_all.size)) * self.dwell / bl.samples_per_frame
                self.panda.publisher.send_samples(
                    {X_CHANNEL: x_all, Y_CHANNEL: y_all, TS_CHANNEL: ts},
                    frame_number=row_start // bl.x_num,
                )
                sample_number += x_all.size
                time.sleep(max(0.0, self.dwell * len(row) - (time.monotonic() - began)))
        except Exception as exc:
            logger.exception("simulated acquisition failed")
            assert self._complete is not None
            self._complete.set_exception(exc)
            return
        finally:
            self.eiger.disarm(series)
            self.panda.publisher.stop()
        assert self._complete is not None
        self._complete.set_finished()

    def complete(self) -> Status:
        assert self._complete is not None, "kickoff first"
        return self._complete

    def stop(self, *, success: bool = False) -> None:
        self._abort.set()

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
                data[image_key] = self._frames[k]
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


def baseline_motors(energy_kev: float) -> list[SynAxis]:
    """The baseline readings HXN's auto-configuration needs: DCM angle and stage angle."""
    dcm = SynAxis(name="dcm_th")
    dcm.set(dcm_theta_deg(energy_kev)).wait()
    zpsth = SynAxis(name="zpsth")
    return [dcm, zpsth]
