"""Pairing detector frame *i* with encoder position *i*.

The PandA sends ``upsample`` encoder samples per detector frame; frame *i*'s
position is the mean of samples ``[i*N, (i+1)*N)``. A frame waits until its
position exists and the reverse; nothing is invented, and what never pairs is
reported at the end.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from hxn_liveptycho.counters import Counters
from hxn_liveptycho.scan import EncoderConfig

logger = logging.getLogger(__name__)

#: How far from an integer a measured samples-per-frame ratio may be and still be trusted.
_RATIO_TOLERANCE = 0.1


@dataclass(frozen=True, slots=True)
class PairedFrame:
    index: int
    data: np.ndarray
    y_um: float
    x_um: float


class _GrowingArray:
    """A float64 vector written by sample number; never-written samples stay NaN."""

    def __init__(self) -> None:
        self._buffer = np.full(1024, np.nan)
        self.size = 0

    def write(self, start: int, values: np.ndarray) -> None:
        end = start + values.size
        if end > self._buffer.size:
            grown = np.full(max(end, 2 * self._buffer.size), np.nan)
            grown[: self.size] = self._buffer[: self.size]
            self._buffer = grown
        self._buffer[start:end] = values
        self.size = max(self.size, end)

    def view(self) -> np.ndarray:
        return self._buffer[: self.size]


class Assembler:
    """Collects frames and encoder samples, hands out frames that have a position."""

    def __init__(self, encoder: EncoderConfig, *, expected_frames: int | None = None) -> None:
        self.encoder = encoder
        self.expected_frames = expected_frames
        self.upsample: int | None = encoder.upsample
        self.counters = Counters(["frames", "paired", "duplicate_frames", "samples"])
        self._frames: dict[int, np.ndarray] = {}
        self._x = _GrowingArray()
        self._y = _GrowingArray()
        self._t = _GrowingArray()
        #: The detector's frame period from its series header, when it sent one.
        self.frame_time_s: float | None = None
        self._paired: set[int] = set()
        self._positions_final = False

    def add_frame(self, index: int, data: np.ndarray) -> None:
        if index in self._frames or index in self._paired:
            self.counters.add("duplicate_frames")
            return
        self._frames[index] = data
        self.counters.add("frames")

    def discard_frame(self, index: int) -> bool:
        """Take back a frame not yet paired (quarantined after the fact); False if it was
        paired already or never came."""
        if self._frames.pop(index, None) is None:
            return False
        self.counters.add("frames", -1)
        return True

    def add_samples(self, samples: Mapping[str, np.ndarray], starting_sample: int) -> None:
        """Take one PandA data message; channels other than the two encoders are ignored."""
        x = samples.get(self.encoder.x_channel)
        y = samples.get(self.encoder.y_channel)
        if x is None or y is None:
            self.counters.add("samples_without_encoders")
            return
        self._x.write(starting_sample, np.asarray(x, dtype=np.float64))
        self._y.write(starting_sample, np.asarray(y, dtype=np.float64))
        t = samples.get(self.encoder.time_channel) if self.encoder.time_channel else None
        if t is not None:
            self._t.write(starting_sample, np.asarray(t, dtype=np.float64))
        self.counters.add("samples", int(np.asarray(x).size))

    def positions_ended(self) -> None:
        """The PandA said 'stop': the sample count is final, so the ratio can be fixed."""
        self._positions_final = True

    def _settle_upsample(self) -> int | None:
        """Samples per frame: configured, else frame period / sample period, else counts at the end.

        A ratio of counts received so far is never used: the two streams arrive
        in batches of different sizes, and a wrong guess squeezes the scan.
        """
        if self.upsample is not None:
            return self.upsample
        ratio: float | None = None
        how = ""
        if self.frame_time_s and self._t.size >= 2:
            sample_period = float(np.median(np.diff(self._t.view()[: min(self._t.size, 256)])))
            if sample_period > 0:
                ratio, how = self.frame_time_s / sample_period, "frame time / sample period"
        if ratio is None and self._positions_final:
            n_frames = self.expected_frames or self.counters.get("frames")
            if n_frames:
                ratio, how = min(self._x.size, self._y.size) / n_frames, "sample count at the end"
        if (
            ratio is None
            or round(ratio) < 1
            or abs(ratio - round(ratio)) > _RATIO_TOLERANCE * ratio
        ):
            return None
        self.upsample = round(ratio)
        logger.info("encoder samples per frame: %d (from the %s)", self.upsample, how)
        return self.upsample

    def pop_ready(self) -> list[PairedFrame]:
        """Frames whose positions have all their encoder samples, in frame order."""
        upsample = self._settle_upsample()
        if upsample is None or not self._frames:
            return []
        n_positions = min(self._x.size, self._y.size) // upsample
        ready = sorted(i for i in self._frames if i < n_positions)
        if not ready:
            return []
        x = self._x.view()
        y = self._y.view()
        enc = self.encoder
        out = []
        for index in ready:
            window = slice(index * upsample, (index + 1) * upsample)
            if np.isnan(x[window]).any() or np.isnan(y[window]).any():
                continue  # a lost PandA message: the frame waits; reported if it never pairs
            x_um = float(x[window].mean()) * enc.x_ratio * enc.x_direction
            y_um = float(y[window].mean()) * enc.y_ratio * enc.y_direction
            out.append(PairedFrame(index, self._frames.pop(index), y_um, x_um))
            self._paired.add(index)
        self.counters.add("paired", len(out))
        return out

    def unpaired_report(self) -> dict[str, int]:
        """What never paired: frames that lack a position, positions that lack a frame."""
        if self.upsample is None:
            return {
                "frames_without_position": len(self._frames),
                "positions_without_frame": 0,
                "samples_unassigned": min(self._x.size, self._y.size),
            }
        n_positions = min(self._x.size, self._y.size) // self.upsample
        return {
            "frames_without_position": len(self._frames),
            "positions_without_frame": max(0, n_positions - len(self._paired)),
        }
