"""Publish a recorded run's frames and positions on the Eiger and PandA wires, paced.

The sockets are the project's own publishers (the ones the simulated
detectors use), so what goes out is exactly the SIMPLON stream (v1 or v2,
raw or bslz4) and the PandA JSON stream. Frames are read one chunk ahead on
a reader thread, so publishing starts after the first chunk and a slow disk
or Tiled server overlaps with the sending.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Literal

import numpy as np

from hxn_liveptycho.replay.model import (
    DEFAULT_POSITION_KEYS,
    MAX_READ_BYTES,
    TIME_CHANNEL,
    RecordedRun,
)
from hxn_liveptycho.streams import EigerPublisher, PandaPublisher

logger = logging.getLogger(__name__)

Pace = Literal["realtime", "rate", "fast"]


@dataclass(frozen=True)
class Selection:
    """Which positions go out: ``first`` .. ``stop`` (recorded indices), renumbered from 0."""

    first: int
    stop: int
    frame_rows: np.ndarray  # stored-frame indices whose frame number lies in [first, stop)
    row_length: int

    @property
    def positions(self) -> int:
        return self.stop - self.first

    @property
    def frames(self) -> int:
        return int(self.frame_rows.size)


def select(run: RecordedRun, *, skip_frames: int, max_frames: int | None) -> Selection:
    """The positions and stored frames to send after skipping and capping (aligned by index)."""
    first = min(skip_frames, run.num_positions)
    stop = run.num_positions if max_frames is None else min(run.num_positions, first + max_frames)
    numbers = np.asarray(run.frame_numbers)
    rows = np.flatnonzero((numbers >= first) & (numbers < stop))
    rows = rows[np.argsort(numbers[rows], kind="stable")]
    shape = (run.start.get("scan") or {}).get("shape")
    row_length = int(shape[-1]) if shape else 16
    return Selection(first, stop, rows, max(1, row_length))


class StreamPublishers:
    """The two bound sockets a replay publishes on; bind once, replay as often as needed."""

    def __init__(
        self,
        *,
        eiger_endpoint: str = "tcp://127.0.0.1:*",
        panda_endpoint: str = "tcp://127.0.0.1:*",
        flavour: Literal["v1", "v2"] = "v1",
        encoding: str = "bs32-lz4<",
        socket_type: Literal["pub", "push"] = "pub",
    ) -> None:
        self.eiger = EigerPublisher(
            eiger_endpoint, encoding=encoding, flavour=flavour, socket_type=socket_type
        )
        try:
            self.panda = PandaPublisher(panda_endpoint, socket_type=socket_type)
        except Exception:
            self.eiger.close()
            raise
        self.socket_type = socket_type
        self._series = 0

    @property
    def eiger_endpoint(self) -> str:
        return self.eiger.endpoint

    @property
    def panda_endpoint(self) -> str:
        return self.panda.endpoint

    def wait_for_subscribers(self, timeout: float) -> bool:
        """Wait for one receiver on each socket (PUB drops what is sent before one joins)."""
        return self.eiger.wait_for_subscribers(1, timeout) and self.panda.wait_for_subscribers(
            1, timeout
        )

    def publish(
        self,
        run: RecordedRun,
        selection: Selection,
        *,
        pace: Pace,
        rate_hz: float,
        speed: float,
        chunk_frames: int,
        samples_per_frame: int = 1,
    ) -> int:
        """Send one series: header, frames and positions row by row, then both ends.

        Returns the number of frames sent. Positions go out after each row (as
        HXN's PandA batches them), ``samples_per_frame`` equal samples per
        position, with sample times that let a receiver tell that ratio.
        """
        self._series += 1
        series = self._series
        detector = run.detector
        height, width = run.frames.shape[1:]
        frame_time = detector.frame_time_s
        self.eiger.start_series(
            series,
            shape=(height, width),
            dtype=np.dtype(run.frames.dtype).name,
            header=detector.header(selection.positions),
        )
        self.panda.start()
        numbers = np.asarray(run.frame_numbers)
        clock = _Pacer(run.times, selection.first, pace=pace, rate_hz=rate_hz, speed=speed)
        frames = _prefetched(run, selection.frame_rows, chunk_frames)
        pending = next(frames, None)
        sent = 0
        try:
            for row_start in range(selection.first, selection.stop, selection.row_length):
                row_stop = min(row_start + selection.row_length, selection.stop)
                for index in range(row_start, row_stop):
                    clock.wait(index)
                    if pending is not None and numbers[pending[0]] == index:
                        self.eiger.send_frame(series, index - selection.first, pending[1])
                        sent += 1
                        pending = next(frames, None)
                self._send_positions(
                    run, row_start, row_stop, selection, frame_time, samples_per_frame
                )
        finally:
            frames.close()
            self.eiger.end_series(series)
            self.panda.stop()
        return sent

    def _send_positions(
        self,
        run: RecordedRun,
        row_start: int,
        row_stop: int,
        selection: Selection,
        frame_time: float,
        samples_per_frame: int,
    ) -> None:
        k = samples_per_frame
        values = np.repeat(run.positions[row_start:row_stop], k, axis=0)
        first_sample = (row_start - selection.first) * k
        times = (first_sample + np.arange(values.shape[0])) * frame_time / k
        datasets = {
            DEFAULT_POSITION_KEYS[key]: values[:, column]
            for column, key in enumerate(run.position_keys)
        }
        datasets[TIME_CHANNEL] = times
        self.panda.send_samples(
            datasets, frame_number=(row_start - selection.first) // selection.row_length
        )

    def close(self) -> None:
        self.eiger.close()
        self.panda.close()

    def __enter__(self) -> StreamPublishers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Pacer:
    """Sleeps until position ``index`` is due: as recorded, at a fixed rate, or never."""

    def __init__(
        self, times: np.ndarray, first: int, *, pace: Pace, rate_hz: float, speed: float
    ) -> None:
        self.times = times
        self.first = first
        self.pace = pace
        self.rate_hz = rate_hz
        self.speed = speed
        self.began = time.monotonic()

    def due(self, index: int) -> float:
        if self.pace == "realtime":
            return float(self.times[index] - self.times[self.first]) / self.speed
        if self.pace == "rate":
            return (index - self.first) / self.rate_hz
        return 0.0

    def wait(self, index: int) -> None:
        if self.pace == "fast":
            return
        delay = self.began + self.due(index) - time.monotonic()
        if delay > 0:
            time.sleep(delay)


def _prefetched(
    run: RecordedRun, rows: np.ndarray, chunk_frames: int
) -> Generator[tuple[int, np.ndarray], None, None]:
    """(stored index, frame) in order, the next chunk read while this one is sent."""
    # A chunk of large frames could take gigabytes: read fewer at a time rather than refuse.
    frame_bytes = math.prod(run.frames.shape[1:]) * np.dtype(run.frames.dtype).itemsize
    chunk_frames = max(1, min(chunk_frames, MAX_READ_BYTES // max(1, frame_bytes)))
    spans = _contiguous_chunks(rows, chunk_frames)
    with ThreadPoolExecutor(1, thread_name_prefix="liveptycho-replay-read") as pool:

        def read(span: tuple[int, int]) -> np.ndarray:
            return run.frames.read(*span)

        future = pool.submit(read, spans[0]) if spans else None
        for k, span in enumerate(spans):
            assert future is not None
            block = future.result()
            future = pool.submit(read, spans[k + 1]) if k + 1 < len(spans) else None
            wanted = _wanted(rows, span)
            for offset, stored in enumerate(range(*span)):
                if stored in wanted:
                    yield stored, block[offset]


def _contiguous_chunks(rows: np.ndarray, chunk_frames: int) -> list[tuple[int, int]]:
    if rows.size == 0:
        return []
    lo, hi = int(rows.min()), int(rows.max()) + 1
    return [(s, min(s + chunk_frames, hi)) for s in range(lo, hi, max(1, chunk_frames))]


def _wanted(rows: np.ndarray, span: tuple[int, int]) -> set[int]:
    return {int(r) for r in rows if span[0] <= r < span[1]}
