"""Pairing detector frame *i* with encoder position *i*.

The PandA sends ``upsample`` encoder samples per detector frame; frame *i*'s
position is the mean of samples ``[i*N, (i+1)*N)``. A frame waits until its
position exists and the reverse; nothing is invented, and what never pairs is
reported at the end. Nothing here knows the scan's shape: frame *i* pairs with
position *i* whatever path the stage took (a raster, a snake, a spiral, a path
only the encoders know); the scan's point count only tells when a whole scan's
samples are in.

N decides where every frame lands: one wrong by a single sample drifts the
positions by a frame per N frames, up to the whole scan width (HXN: a factor of
N compresses the scan along one axis). So N is never taken on trust. Two
witnesses are read from the streams themselves:

- the **time channel** (``/PCAP.TS_TRIG.Value``, the PandA's own timestamp of
  every sample) against the detector's frame period (``frame_time`` of its
  series header, else the scan's dwell): frame period / sample period;
- the **sample count** at the end of the PandA stream: samples / frames.

A measured ratio counts only when it is a whole number to within
:data:`RATIO_TOLERANCE`. What is done with them (see :meth:`Assembler._settle_upsample`
and :meth:`Assembler.final_check`) is recorded in :meth:`Assembler.pairing_report`
and every disagreement becomes one warning line naming the configured and the
measured factor, which the session puts in the run's ``warnings``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from hxn_liveptycho.config.scan import EncoderConfig
from hxn_liveptycho.util.counters import Counters

logger = logging.getLogger(__name__)

#: How far from a whole number a measured samples-per-frame ratio may be and still be one.
#: Hardware timestamps against a set frame period, or whole-scan counts, give N far better
#: than this; 10.4 (PandA and detector disagree by 4 %, which would drift the last row by
#: 4 % of the scan) is refused, where the old bound of 10 % of N rounded it to 10.
RATIO_TOLERANCE = 0.05
#: Time-channel samples the sample period is measured over (the median of their steps:
#: a row's turnaround or a lost message does not move it).
_PERIOD_SAMPLES = 1024

_Log = logging.Logger | logging.LoggerAdapter[Any]


@dataclass(frozen=True, slots=True)
class PairedFrame:
    index: int
    data: np.ndarray
    y_um: float
    x_um: float


@dataclass(frozen=True, slots=True)
class _TimeWitness:
    """frame period / sample period, measured once from the first time-channel samples."""

    ratio: float
    frame_period_s: float
    frame_period_from: str
    sample_period_s: float

    def describe(self) -> str:
        return (
            f"{self.frame_period_from} {self.frame_period_s * 1e3:.4g} ms / PandA sample "
            f"period {self.sample_period_s * 1e3:.4g} ms = {self.ratio:.3f}"
        )


def _whole(ratio: float | None) -> int | None:
    """The whole number ``ratio`` is, to within :data:`RATIO_TOLERANCE`; None if none."""
    if ratio is None or not np.isfinite(ratio):
        return None
    n = round(ratio)
    if n < 1 or abs(ratio - n) > RATIO_TOLERANCE:
        return None
    return n


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
    """Collects frames and encoder samples, hands out frames that have a position.

    ``dwell_s`` (the scan's exposure per point) stands in for the detector's
    ``frame_time`` when its series header has none; ``log`` is where mismatches
    are said (the session passes its run-prefixed logger).
    """

    def __init__(
        self,
        encoder: EncoderConfig,
        *,
        expected_frames: int | None = None,
        dwell_s: float | None = None,
        log: _Log = logger,
    ) -> None:
        self.encoder = encoder
        self.expected_frames = expected_frames
        self.dwell_s = dwell_s
        self.log = log
        #: Samples per frame in use (None until settled): see :meth:`_settle_upsample`.
        self.upsample: int | None = encoder.upsample
        #: Where :attr:`upsample` came from: configured, time channel or sample count.
        self.upsample_from: str | None = None if encoder.upsample is None else "configured"
        #: One line per disagreement between the configured and measured factors.
        self.warnings: list[str] = []
        self.counters = Counters(
            [
                "frames",
                "paired",
                "duplicate_frames",
                "samples",
                "samples_per_frame",
                "pairing_mismatches",
            ]
        )
        self._frames: dict[int, np.ndarray] = {}
        self._x = _GrowingArray()
        self._y = _GrowingArray()
        self._t = _GrowingArray()
        #: The detector's frame period from its series header, when it sent one.
        self.frame_time_s: float | None = None
        self._time: _TimeWitness | None = None
        self._paired: set[int] = set()
        self._positions_final = False
        self._count_checked = False
        if self.upsample is not None:
            self.counters.add("samples_per_frame", self.upsample)

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

    # ---- the samples-per-frame factor ----------------------------------------------------
    def _measure_time(self) -> _TimeWitness | None:
        """frame period / sample period, once both are known (the first time-channel
        samples arrive with the first encoder samples, so this is before any pairing)."""
        if self._time is not None:
            return self._time
        if self._t.size < 2:
            return None
        if self.frame_time_s:
            frame_period, source = float(self.frame_time_s), "detector frame_time"
        elif self.dwell_s:
            frame_period, source = float(self.dwell_s), "scan dwell"
        else:
            return None
        steps = np.diff(self._t.view()[:_PERIOD_SAMPLES])
        steps = steps[np.isfinite(steps) & (steps > 0)]
        if frame_period <= 0 or steps.size == 0:
            return None
        sample_period = float(np.median(steps))
        self._time = _TimeWitness(frame_period / sample_period, frame_period, source, sample_period)
        return self._time

    def _count_ratio(self) -> tuple[float, int, int] | None:
        """(samples / frames, samples, frames) once the PandA's stream has ended."""
        if not self._positions_final:
            return None
        n_frames = self.expected_frames or self.counters.get("frames")
        if not n_frames:
            return None
        n_samples = min(self._x.size, self._y.size)
        return n_samples / n_frames, n_samples, n_frames

    def _mismatch(self, message: str) -> None:
        """One disagreement: said once, in one line, and kept for the run's warnings."""
        line = f"PandA samples per frame: {message}"
        if line in self.warnings:
            return
        self.warnings.append(line)
        self.counters.add("pairing_mismatches")
        self.log.warning("%s", line)

    def _use(self, n: int, source: str) -> int:
        self.counters.add("samples_per_frame", n - self.counters.get("samples_per_frame"))
        self.upsample, self.upsample_from = n, source
        self.log.info("encoder samples per frame: %d (from the %s)", n, source)
        return n

    def _settle_upsample(self) -> int | None:
        """Samples per frame: the configured factor checked against the time channel, else
        the time channel, else the sample count at the end.

        What a beamline scientist gets, and why:

        - **Configured N, time channel agrees** (or cannot be read): N is used live.
        - **Configured N, time channel measures another whole number M**: M is used, with a
          warning naming both. The time channel is the PandA's own timestamp of every
          sample and the frame period is the detector's own setting; the configured
          number is typed by a person and goes stale when the PandA's capture is changed.
          Keeping N would give a reconstruction known to be wrong (stretched or squeezed
          by N/M); M gives the right one, and the warning says to fix the setting. If
          frames were already paired with N before the frame period was known, N is kept
          (one run never mixes two factors) and the warning says those positions are
          likely misplaced.
        - **Configured N, time ratio not a whole number** (10.4): it proves no other
          factor, so N is kept, with a warning.
        - **Not configured**: the time ratio when it is a whole number; otherwise (with a
          warning when it was measured but not whole) frames wait for the PandA's end,
          and samples ÷ frames is used when that is a whole number. If neither is whole,
          nothing is paired: positions are never made up from a rounded guess, and the
          run ends ``incomplete`` with the warning saying why.

        A ratio of counts received so far is never used: the two streams arrive
        in batches of different sizes, and a wrong guess squeezes the scan.
        """
        configured = self.encoder.upsample
        first_look = self._time is None
        time = self._measure_time()
        if configured is not None:
            if time is not None and first_look:
                self._check_configured(configured, time)
            return self.upsample
        if self.upsample is not None:
            return self.upsample
        if time is not None:
            measured = _whole(time.ratio)
            if measured is not None:
                return self._use(measured, "time channel")
            if first_look:
                self._mismatch(
                    f"not configured; measured {time.ratio:.3f} ({time.describe()}), not a "
                    "whole number: not used; frames wait for the sample count at the "
                    "PandA's end"
                )
        count = self._count_ratio()
        if count is None:
            return None
        ratio, n_samples, n_frames = count
        measured = _whole(ratio)
        if measured is None:
            self._count_checked = True
            self._mismatch(
                f"not configured; the PandA sent {n_samples} samples for {n_frames} frames "
                f"({ratio:.3f} per frame), not a whole number: frames not paired rather "
                "than given stretched positions"
            )
            return None
        return self._use(measured, "sample count at the end")

    def _check_configured(self, configured: int, time: _TimeWitness) -> None:
        measured = _whole(time.ratio)
        if measured == configured:
            self.upsample_from = "configured, confirmed by the time channel"
            return
        if measured is None:
            self._mismatch(
                f"configured {configured}, measured {time.ratio:.3f} ({time.describe()}), "
                f"not a whole number: positions use the configured {configured} and may be "
                "misplaced; check the PandA's capture and the detector's frame time"
            )
            return
        if self.counters.get("paired"):
            self._mismatch(
                f"configured {configured}, measured {measured} ({time.describe()}), known "
                f"only after {self.counters.get('paired')} frames were paired with "
                f"{configured}: their positions are likely misplaced; fix encoder.upsample"
            )
            return
        self._mismatch(
            f"configured {configured}, measured {measured} ({time.describe()}): positions "
            f"use the measured {measured}; fix encoder.upsample"
        )
        self._use(measured, "time channel, overriding the configured value")

    def final_check(self) -> list[str]:
        """The run is ending: check the factor used against the whole-scan sample count
        (the only witness when there is no time channel) and return every mismatch line.

        Positions already paired cannot be taken back from the solver, so a late
        disagreement is a warning saying the positions are likely misplaced. The count is
        evidence only for a whole scan (every expected frame came): in a scan cut short
        the two streams stop at different points, and samples / frames may land on a
        whole number by chance. A count that is no whole number (a lost message) is no
        evidence either: the frames it leaves without a position are reported as unpaired.
        A factor that was itself taken from the count of a scan that turned out short is
        said to be unproven.
        """
        self._settle_upsample()
        count = self._count_ratio()
        if count is None or self.upsample is None or self._count_checked:
            return list(self.warnings)
        self._count_checked = True
        ratio, n_samples, n_frames = count
        received = self.counters.get("frames")
        if self.expected_frames and received < self.expected_frames:
            if self.upsample_from == "sample count at the end":
                self._mismatch(
                    f"not configured; {self.upsample} from {n_samples} samples over the "
                    f"scan's {n_frames} points, but only {received} frames came: the factor "
                    "is unproven and positions may be misplaced; set encoder.upsample"
                )
            return list(self.warnings)
        measured = _whole(ratio)
        if measured is not None and measured != self.upsample:
            self._mismatch(
                f"{self.upsample} used ({self.upsample_from}), but the PandA sent "
                f"{n_samples} samples for {n_frames} frames ({ratio:.3f} per frame): "
                "positions are likely misplaced; fix encoder.upsample"
            )
        return list(self.warnings)

    def pairing_report(self) -> dict[str, Any]:
        """The factor used, where it came from and what each witness measured (run
        metadata: a processed container says how its positions were made)."""
        time = self._time
        count = self._count_ratio()
        return {
            "samples_per_frame": self.upsample,
            "samples_per_frame_from": self.upsample_from,
            "configured": self.encoder.upsample,
            "time_channel_ratio": None if time is None else round(time.ratio, 6),
            "frame_period_s": None if time is None else time.frame_period_s,
            "frame_period_from": None if time is None else time.frame_period_from,
            "sample_period_s": None if time is None else time.sample_period_s,
            "sample_count_ratio": None if count is None else round(count[0], 6),
            "mismatch": bool(self.warnings),
        }

    # ---- pairing -------------------------------------------------------------------------
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
