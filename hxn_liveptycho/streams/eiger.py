"""The Eiger's SIMPLON stream interface, JSON multipart ("v1") and CBOR ("v2"): publish and receive.

A v1 series on the wire, as Dectris documents it:

- ``dheader-1.0`` {series, header_detail}; for ``basic``/``all`` a second part with
  the detector configuration (beam_center_x, count_time, nimages, ...); for
  ``all`` also flatfield, pixel mask and count-rate table (JSON + blob each).
- per image, one 4-part message: ``dimage-1.0`` {series, frame, hash},
  ``dimage_d-1.0`` {shape: [width, height], type, encoding, size}, the blob,
  ``dconfig-1.0`` {start_time, stop_time, real_time} in ns.
- ``dseries_end-1.0`` {series}.

A v2 series is three kinds of single-part CBOR messages, ``start``, ``image`` (all
channels/thresholds of one exposure) and ``end``; :mod:`hxn_liveptycho.streams.cbor`
describes them. The receiver tells the flavours apart per message (a CBOR map vs
a JSON object) unless told which to expect, and hands both to the same callbacks.

Series bookkeeping (both flavours): the newest series header defines the current
series. A detector re-armed mid-run (a new series id, or in v2 a new
``series_unique_id``) starts a new series; frames or an end of a series that a
newer header superseded are counted as ``stale_series`` and discarded, so a late
straggler can never end or pollute the new series.

A detector PUSHes (the client PULLs); at HXN a proxy republishes on PUB and
clients SUBscribe. Both ends here do either, chosen by ``socket_type``.

This module receives on one process (threads);
:mod:`~hxn_liveptycho.streams.eiger_publisher` publishes and
:mod:`~hxn_liveptycho.streams.eiger_processes` receives with worker processes.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import numpy as np
import zmq

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.streams.curve import CurveKeys, client_options
from hxn_liveptycho.streams.eiger_messages import (
    DEFAULT_CHANNEL,
    FLAVOURS,
    EigerEvent,
    EigerFrame,
    parse,
)
from hxn_liveptycho.streams.eiger_publisher import EigerPublisher
from hxn_liveptycho.streams.eiger_series import EigerSeriesBook
from hxn_liveptycho.streams.receiver import (
    RECEIVER_COUNTERS,
    SocketReceiver,
    handle_guarded,
    names,
)
from hxn_liveptycho.util.counters import Counters

logger = logging.getLogger(__name__)


#: The counters of every Eiger receiver (threaded or multi-process).
EIGER_COUNTERS = names(
    RECEIVER_COUNTERS,
    (
        "headers",
        "frames",
        "series_end",
        "unknown_series",
        "duplicates",
        "gaps",
        "late",
        "nonstandard",
        "stale_series",
        "other_channels",
        "header_parts_dropped",
    ),
)


def check_receiver_options(flavour: str, channel: str | None) -> None:
    """Refuse a flavour or channel no receiver understands (ConfigurationError)."""
    if flavour not in ("auto", *FLAVOURS):
        raise ConfigurationError(
            f"Eiger stream flavour {flavour!r} is not supported "
            f"(expected 'auto' or one of {FLAVOURS})"
        )
    if channel is not None and (not isinstance(channel, str) or not channel):
        raise ConfigurationError(f"channel must be a channel name or None, got {channel!r}")


class EigerReceiver(SocketReceiver):
    """Receives an Eiger stream on a background thread and hands decoded frames to callbacks.

    ``flavour`` is ``"auto"`` (each message is looked at: a CBOR map is v2, a
    JSON multipart is v1), ``"v1"`` or ``"v2"``. Under v2, ``channel`` names the
    threshold delivered (None: the first channel of each image); other channels
    are counted (``other_channels``), and an image without the configured channel
    is malformed. With ``curve`` (:class:`~hxn_liveptycho.streams.curve.CurveKeys`)
    the socket is a CurveZMQ client.

    Callbacks run on the receiver thread, in wire order: keep them short (put
    the frame on a queue). A malformed message is counted in ``counters``
    ("malformed") with one log line and the thread carries on; a callback that
    raises is counted ("callback_errors") and logged.
    """

    counter_names = EIGER_COUNTERS

    def __init__(
        self,
        endpoint: str,
        *,
        on_series_start: Callable[[int, dict], None],
        on_frame: Callable[[EigerFrame], None],
        on_series_end: Callable[[int], None],
        socket_type: Literal["sub", "pull"] = "sub",
        rcvhwm: int = 0,
        name: str = "eiger",
        context: zmq.Context | None = None,
        curve: CurveKeys | None = None,
        flavour: Literal["auto", "v1", "v2"] = "auto",
        channel: str | None = DEFAULT_CHANNEL,
        decode_threads: int = 0,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        if decode_threads < 0:
            raise ConfigurationError(f"decode_threads must be >= 0, got {decode_threads}")
        check_receiver_options(flavour, channel)
        self.flavour = flavour
        self.channel = channel
        #: Applied to each decoded frame (e.g. an ROI crop), on the decode pool when there is one.
        self.transform = transform
        super().__init__(
            endpoint,
            socket_type=socket_type,
            rcvhwm=rcvhwm,
            name=name,
            context=context,
            curve=client_options(curve),
        )
        self._book = EigerSeriesBook(
            name,
            self.counters,
            on_series_start=on_series_start,
            on_frame=on_frame,
            on_series_end=on_series_end,
        )
        self._pipeline = (
            _DecodePipeline(name, self.counters, self._parse, self._book.apply, decode_threads)
            if decode_threads
            else None
        )

    def start(self) -> None:
        """Start receiving on a background thread (and the decode pool, if any)."""
        if self._pipeline is not None:
            self._pipeline.start()
        super().start()

    def stop(self, timeout: float = 5.0, *, drain: bool = True) -> bool:
        """Stop the thread and close the socket; True if it ended within ``timeout``.

        With a decode pool, frames already received are decoded and delivered first.
        """
        stopped = super().stop(timeout, drain=drain)
        if self._pipeline is not None:
            stopped = self._pipeline.stop(timeout) and stopped
        return stopped

    # -- message handling (receiver thread) -----------------------------------------

    def _parse(self, parts: list[zmq.Frame]) -> EigerEvent:
        return parse(parts, flavour=self.flavour, channel=self.channel, transform=self.transform)

    def _handle(self, parts: list[zmq.Frame]) -> None:
        if self._pipeline is None:
            self._book.apply(self._parse(parts))
        else:
            self._pipeline.submit(parts)


class _DecodePipeline:
    """Parses (and decodes) messages on a thread pool and applies them in arrival order.

    The socket thread only receives; parsing and pixel decoding (C codecs that
    release the GIL) run on ``threads`` workers; one delivery thread then
    applies the parsed events -- series bookkeeping, counters, callbacks --
    in the order the messages arrived. The queue between them is bounded, so a
    slow consumer backs up into ZMQ's buffers instead of dropping anything.
    """

    _STOP = object()

    def __init__(
        self,
        name: str,
        counters: Counters,
        parse: Callable[[list[zmq.Frame]], EigerEvent],
        apply: Callable[[EigerEvent], None],
        threads: int,
    ) -> None:
        self._name = name
        self._counters = counters
        self._parse = parse
        self._apply = apply
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix=f"{name}-decode")
        self._ordered: queue.Queue[Any] = queue.Queue(maxsize=4 * threads)
        self._thread = threading.Thread(target=self._deliver, name=f"{name}-deliver", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, parts: list[zmq.Frame]) -> None:
        self._ordered.put(self._pool.submit(self._parse, parts))

    def stop(self, timeout: float) -> bool:
        if self._thread.is_alive():
            self._ordered.put(self._STOP)
            self._thread.join(timeout)
        self._pool.shutdown(wait=True, cancel_futures=False)
        return not self._thread.is_alive()

    def _deliver(self) -> None:
        while True:
            item = self._ordered.get()
            if item is self._STOP:
                return
            handle_guarded(self._name, self._counters, self._apply_parsed, item)

    def _apply_parsed(self, parsed: Future[EigerEvent]) -> None:
        """A parse error (raised on the pool) drops the message like any other."""
        self._apply(parsed.result())


__all__ = [
    "EIGER_COUNTERS",
    "EigerFrame",
    "EigerPublisher",
    "EigerReceiver",
    "check_receiver_options",
]
