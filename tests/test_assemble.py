"""Assembler: frame i pairs with the mean of encoder samples [i*N, (i+1)*N); nothing invented."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from hxn_liveptycho.config.scan import EncoderConfig
from hxn_liveptycho.pipeline.assemble import Assembler

X = "/INENC2.VAL.Value"
Y = "/INENC3.VAL.Value"
T = "/PCAP.TS_TRIG.Value"
#: Default conversion: counts * (-1e-4) * (-1) → 1 µm per 10 000 counts.
COUNTS_PER_UM = 10_000.0


def frame(index: int) -> np.ndarray:
    """A small detector frame that remembers its index (to check the pairing)."""
    return np.full((4, 4), index, dtype=np.uint32)


def encoder_samples(
    first_frame: int, n_frames: int, upsample: int
) -> tuple[np.ndarray, np.ndarray]:
    """Samples whose group means are x = frame µm, y = -2 * frame µm; jittered inside each group."""
    frames = np.repeat(np.arange(first_frame, first_frame + n_frames, dtype=np.float64), upsample)
    jitter = np.tile(np.linspace(-0.3, 0.3, upsample), n_frames)  # zero mean in every group
    return (frames + jitter) * COUNTS_PER_UM, (-2.0 * frames + jitter) * COUNTS_PER_UM


def send(
    assembler: Assembler,
    first_frame: int,
    n_frames: int,
    upsample: int,
    *,
    period_s: float | None = None,
) -> None:
    """One PandA data message carrying ``n_frames`` frames' worth of samples."""
    x, y = encoder_samples(first_frame, n_frames, upsample)
    first_sample = first_frame * upsample
    samples = {X: x, Y: y, "/COUNTER1.OUT.Value": np.zeros_like(x)}
    if period_s is not None:
        samples[T] = (first_sample + np.arange(x.size)) * period_s
    assembler.add_samples(samples, first_sample)


def test_pairs_by_index_with_the_mean_of_each_group() -> None:
    """With N = 10 configured, frame i gets the mean of samples [10i, 10i+10)."""
    assembler = Assembler(EncoderConfig(upsample=10))
    for i in (2, 0, 1):
        assembler.add_frame(i, frame(i))
    send(assembler, 0, 3, 10)
    ready = assembler.pop_ready()
    assert [p.index for p in ready] == [0, 1, 2]
    for paired in ready:
        assert paired.x_um == pytest.approx(paired.index)
        assert paired.y_um == pytest.approx(-2.0 * paired.index)
        assert int(paired.data[0, 0]) == paired.index
    assert assembler.counters.get("paired") == 3
    assert assembler.counters.get("samples") == 30
    assert assembler.pop_ready() == []


def test_frames_wait_for_their_positions_and_positions_for_their_frames() -> None:
    """A frame is handed out only when all N of its samples exist, whichever arrives first."""
    assembler = Assembler(EncoderConfig(upsample=10))
    send(assembler, 0, 2, 10)
    assert assembler.pop_ready() == []  # positions, no frames yet
    assembler.add_frame(0, frame(0))
    assembler.add_frame(1, frame(1))
    assembler.add_frame(2, frame(2))
    assert [p.index for p in assembler.pop_ready()] == [0, 1]
    x, y = encoder_samples(2, 1, 10)
    assembler.add_samples({X: x[:5], Y: y[:5]}, 20)  # half of frame 2's group
    assert assembler.pop_ready() == []
    assembler.add_samples({X: x[5:], Y: y[5:]}, 25)
    (last,) = assembler.pop_ready()
    assert last.index == 2
    assert last.x_um == pytest.approx(2.0)


def test_upsample_from_detector_frame_time_and_panda_time_channel() -> None:
    """frame_time 10 ms / sample period 1 ms gives N = 10 before the scan ends."""
    assembler = Assembler(EncoderConfig())
    assembler.frame_time_s = 0.01
    for i in range(3):
        assembler.add_frame(i, frame(i))
    send(assembler, 0, 3, 10, period_s=0.001)
    ready = assembler.pop_ready()
    assert assembler.upsample == 10
    assert [p.x_um for p in ready] == pytest.approx([0.0, 1.0, 2.0])


def test_upsample_from_sample_count_once_the_panda_stream_ended(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Without a time channel, N = samples / frames is used only after the PandA's stop."""
    assembler = Assembler(EncoderConfig(time_channel=None), expected_frames=4)
    for i in range(4):
        assembler.add_frame(i, frame(i))
    send(assembler, 0, 4, 5)
    assert assembler.pop_ready() == []
    assert assembler.upsample is None
    assembler.positions_ended()
    with caplog.at_level(logging.INFO, logger="hxn_liveptycho.pipeline.assemble"):
        ready = assembler.pop_ready()
    assert assembler.upsample == 5
    assert [p.x_um for p in ready] == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert any("sample count at the end" in r.getMessage() for r in caplog.records)


def test_ratio_of_a_partial_stream_is_never_guessed() -> None:
    """Mid-scan, samples/frames is not trusted even when it is an integer: frames wait."""
    assembler = Assembler(EncoderConfig(time_channel=None), expected_frames=100)
    for i in range(3):
        assembler.add_frame(i, frame(i))
    send(assembler, 0, 2, 10)  # 20 samples / 3 frames: a guess would say 7
    assert assembler.pop_ready() == []
    send(assembler, 2, 1, 10)  # 30 samples / 3 frames: a guess would say 10, still unknown
    assert assembler.pop_ready() == []
    assert assembler.upsample is None
    assert assembler.counters.get("paired") == 0
    assert assembler.unpaired_report()["frames_without_position"] == 3


def test_non_integer_final_ratio_is_not_used() -> None:
    """At the end, 35 samples for 10 frames (3.5 per frame) is rejected rather than rounded."""
    assembler = Assembler(EncoderConfig(time_channel=None), expected_frames=10)
    for i in range(10):
        assembler.add_frame(i, frame(i))
    x = np.arange(35, dtype=np.float64)
    assembler.add_samples({X: x, Y: x}, 0)
    assembler.positions_ended()
    assert assembler.pop_ready() == []
    assert assembler.upsample is None


def test_time_channel_ratio_far_from_an_integer_is_not_used() -> None:
    """frame_time / sample period = 2.5 is not rounded into a wrong N."""
    assembler = Assembler(EncoderConfig())
    assembler.frame_time_s = 0.0025
    assembler.add_frame(0, frame(0))
    send(assembler, 0, 2, 10, period_s=0.001)
    assert assembler.pop_ready() == []
    assert assembler.upsample is None


def test_duplicate_frames_are_counted_not_paired_twice() -> None:
    """The same frame index again (before or after pairing) is counted and dropped."""
    assembler = Assembler(EncoderConfig(upsample=2))
    assembler.add_frame(0, frame(0))
    assembler.add_frame(0, frame(99))
    send(assembler, 0, 1, 2)
    (paired,) = assembler.pop_ready()
    assert int(paired.data[0, 0]) == 0
    assembler.add_frame(0, frame(0))
    assert assembler.pop_ready() == []
    assert assembler.counters.get("duplicate_frames") == 2
    assert assembler.counters.get("frames") == 1
    assert assembler.counters.get("paired") == 1


def test_unpaired_report_names_both_sides_and_invents_nothing() -> None:
    """Frames past the last position and positions whose frame never came are reported."""
    assembler = Assembler(EncoderConfig(upsample=10))
    for i in (0, 1, 2, 4, 5, 6):  # frame 3 is lost; frames 5, 6 have no position
        assembler.add_frame(i, frame(i))
    send(assembler, 0, 5, 10)  # positions 0..4
    ready = assembler.pop_ready()
    assert [p.index for p in ready] == [0, 1, 2, 4]
    assert ready[-1].x_um == pytest.approx(4.0)
    assert assembler.unpaired_report() == {
        "frames_without_position": 2,
        "positions_without_frame": 1,
    }


def test_message_without_encoder_channels_is_counted() -> None:
    """A PandA message lacking the configured encoder datasets is counted, not misread."""
    assembler = Assembler(EncoderConfig(upsample=2))
    assembler.add_frame(0, frame(0))
    assembler.add_samples({"/COUNTER1.OUT.Value": np.arange(2.0)}, 0)
    assert assembler.pop_ready() == []
    assert assembler.counters.get("samples_without_encoders") == 1
    assert assembler.counters.get("samples") == 0


def test_direction_and_ratio_convert_counts_to_um() -> None:
    """position_um = mean(counts) * ratio * direction, per axis, on the configured channels."""
    encoder = EncoderConfig(
        x_channel="/FMC_IN.VAL1.Value",
        y_channel="/FMC_IN.VAL2.Value",
        x_ratio=-0.9542e-4,
        y_ratio=-1.25e-4,
        x_direction=1.0,
        y_direction=-1.0,
        upsample=4,
    )
    assembler = Assembler(encoder)
    assembler.add_frame(0, frame(0))
    assembler.add_frame(1, frame(1))
    x = np.array([1000.0, 1002.0, 998.0, 1000.0, -5000.0, -5000.0, -5000.0, -5000.0])
    y = np.array([400.0, 400.0, 400.0, 400.0, 0.0, 8.0, 0.0, 0.0])
    # the default channel names are present too, and must be ignored
    assembler.add_samples(
        {"/FMC_IN.VAL1.Value": x, "/FMC_IN.VAL2.Value": y, X: np.full(8, 1e9), Y: np.full(8, 1e9)},
        0,
    )
    first, second = assembler.pop_ready()
    assert first.x_um == pytest.approx(1000.0 * -0.9542e-4 * 1.0)
    assert first.y_um == pytest.approx(400.0 * -1.25e-4 * -1.0)
    assert second.x_um == pytest.approx(-5000.0 * -0.9542e-4)
    assert second.y_um == pytest.approx(2.0 * 1.25e-4)


def test_samples_arriving_out_of_order_land_at_their_sample_number() -> None:
    """starting_sample_number places each message; late earlier messages fill their slot."""
    assembler = Assembler(EncoderConfig(upsample=10))
    for i in range(4):
        assembler.add_frame(i, frame(i))
    send(assembler, 2, 2, 10)
    send(assembler, 0, 2, 10)
    ready = assembler.pop_ready()
    assert [p.x_um for p in ready] == pytest.approx([0.0, 1.0, 2.0, 3.0])


def test_frames_in_a_gap_of_lost_samples_are_not_given_positions() -> None:
    """Samples 0..19 never arrive: frames 0 and 1 must wait, not get invented positions."""
    assembler = Assembler(EncoderConfig(upsample=10))
    for i in range(4):
        assembler.add_frame(i, frame(i))
    send(assembler, 2, 2, 10)  # the message with frames 0..1's samples was lost
    ready = assembler.pop_ready()
    assert [p.index for p in ready] == [2, 3]
    assert assembler.unpaired_report()["frames_without_position"] == 2
