"""The Eiger receiver's decode pool: same frames, same order, same counters as inline decoding."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from hxn_liveptycho.streams import EigerPublisher, EigerReceiver


def _collect(flavour: str, decode_threads: int, frames: int = 40) -> tuple[list, dict, list]:
    received: list = []
    events: list = []
    done = threading.Event()

    def on_frame(frame) -> None:
        received.append(frame)

    publisher = EigerPublisher("tcp://127.0.0.1:*", socket_type="push", flavour=flavour)
    receiver = EigerReceiver(
        publisher.endpoint,
        socket_type="pull",
        on_series_start=lambda series, header: events.append(("start", series)),
        on_frame=on_frame,
        on_series_end=lambda series: (events.append(("end", series)), done.set()),
        decode_threads=decode_threads,
    )
    receiver.start()
    rng = np.random.default_rng(3)
    data = [rng.poisson(20, (96, 80)).astype(np.uint32) for _ in range(frames)]
    try:
        publisher.start_series(1, shape=(96, 80), dtype="uint32")
        for index, frame in enumerate(data):
            publisher.send_frame(1, index, frame)
            if index == 10:
                # a corrupt image in the middle: counted, the rest still arrives in order
                publisher.send_parts([b'{"htype": "dimage-1.0", "series": 1}'])
        publisher.end_series(1)
        assert done.wait(10)
    finally:
        receiver.stop()
        publisher.close()
    for frame, expected in zip(received, data, strict=True):
        np.testing.assert_array_equal(frame.data, expected)
    return [f.frame for f in received], receiver.counters.snapshot(), events


@pytest.mark.parametrize("flavour", ["v1", "v2"])
def test_pool_delivers_what_inline_decoding_delivers(flavour):
    """With 3 decode threads the frames, their order, the events and the counters are unchanged."""
    inline = _collect(flavour, 0)
    pooled = _collect(flavour, 3)
    assert pooled[0] == inline[0] == list(range(40))
    assert pooled[2] == inline[2] == [("start", 1), ("end", 1)]
    assert pooled[1] == inline[1]
    assert pooled[1]["malformed"] == 1


def test_negative_pool_size_is_refused():
    """A negative thread count is a configuration error, not a silent inline receiver."""
    from hxn_liveptycho.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="decode_threads"):
        EigerReceiver(
            "tcp://127.0.0.1:5",
            on_series_start=lambda *a: None,
            on_frame=lambda f: None,
            on_series_end=lambda s: None,
            decode_threads=-1,
        )


@pytest.mark.parametrize("decode_threads", [0, 2])
def test_transform_is_applied_once_per_frame(decode_threads):
    """An ROI transform runs exactly once per frame, inline or on the pool, before delivery."""
    calls: list[int] = []
    received: list = []
    done = threading.Event()

    def crop(pixels: np.ndarray) -> np.ndarray:
        calls.append(1)
        return pixels[10:20, 5:15].copy()

    publisher = EigerPublisher("tcp://127.0.0.1:*", socket_type="push")
    receiver = EigerReceiver(
        publisher.endpoint,
        socket_type="pull",
        on_series_start=lambda series, header: None,
        on_frame=received.append,
        on_series_end=lambda series: done.set(),
        decode_threads=decode_threads,
        transform=crop,
    )
    receiver.start()
    frame = np.arange(96 * 80, dtype=np.uint32).reshape(96, 80)
    try:
        publisher.start_series(1, shape=(96, 80), dtype="uint32")
        for index in range(5):
            publisher.send_frame(1, index, frame)
        publisher.end_series(1)
        assert done.wait(10)
    finally:
        receiver.stop()
        publisher.close()
    assert len(calls) == 5
    assert [f.data.shape for f in received] == [(10, 10)] * 5
    np.testing.assert_array_equal(received[0].data, frame[10:20, 5:15])
