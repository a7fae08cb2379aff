"""A wrong PandA samples-per-frame factor never misplaces positions silently.

Issue 23, 'Why': configured 10 with 11, 5 or 20 sent, or auto with a ratio like 10.4,
misplaced positions by up to the whole scan width and the run still ended ``complete``;
the factor used was not recorded (the config shows ``upsample: None``). Each case is
reproduced here through an :class:`~hxn_liveptycho.pipeline.engine.Engine` with a recording sink
(the scaffolding of ``test_lifecycle_states``), feeding the PandA's messages as HXN sends
them: the encoders plus the ``/PCAP.TS_TRIG.Value`` time channel, and the Eiger's series
header with ``frame_time``. Each test first shows what the old pairing would have made of
those samples, then asserts the run's terminal state and warning, the recorded factor,
the counters, and that the positions written are the true ones (or that none were
written, rather than stretched ones).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scans import fly, make_live, processed
from test_lifecycle_states import (
    OVERRIDES,
    SCAN_MD,
    X_CHANNEL,
    Y_CHANNEL,
    RecordingSink,
    Run,
    Sinks,
    make_engine,
    only_sink,
)

from hxn_liveptycho.config.scan import EncoderConfig
from hxn_liveptycho.pipeline.assemble import RATIO_TOLERANCE, Assembler
from hxn_liveptycho.pipeline.engine import Engine
from hxn_liveptycho.pipeline.inputs import Samples, SeriesStart
from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample
from hxn_liveptycho.store.diffraction import read_diffraction

pytestmark = pytest.mark.timeout(120)

T_CHANNEL = "/PCAP.TS_TRIG.Value"
#: The scan's dwell (SCAN_MD) and the Eiger's frame period, in seconds.
FRAME_TIME = 0.01
#: Encoder counts per µm with the default calibration (counts * -1e-4 * -1 = µm).
COUNTS_PER_UM = 1e4


class PositionSink(RecordingSink):
    """A RecordingSink that also keeps each frame's position (metres, columns (y, x))."""

    def __init__(self) -> None:
        super().__init__()
        self.positions_m: dict[int, np.ndarray] = {}

    def diffraction(
        self, indices: np.ndarray, amplitudes: np.ndarray, positions_m: np.ndarray
    ) -> None:
        super().diffraction(indices, amplitudes, positions_m)
        for index, position in zip(indices, np.asarray(positions_m), strict=True):
            self.positions_m[int(index)] = position.copy()


class PositionSinks(Sinks):
    def __call__(self) -> PositionSink:
        sink = PositionSink()
        with self._lock:
            self.made.append(sink)
        return sink


def grid_um(x_num: int = 3, y_num: int = 3) -> np.ndarray:
    """The scan's true positions, (y, x) in µm, row by row over [-1, 1] µm."""
    yy, xx = np.meshgrid(
        np.linspace(-1.0, 1.0, y_num), np.linspace(-1.0, 1.0, x_num), indexing="ij"
    )
    return np.column_stack([yy.ravel(), xx.ravel()])


def panda_samples(
    truth_um: np.ndarray, sent: int, *, sample_period_s: float | None
) -> dict[str, np.ndarray]:
    """What the PandA captures: ``sent`` samples per frame whose mean is the frame's true
    position (x sweeps through the exposure as in a fly scan), and, with a sample period,
    the time channel."""
    sweep = np.linspace(-0.05, 0.05, sent)  # zero mean within each frame
    x = (np.repeat(truth_um[:, 1], sent) + np.tile(sweep, len(truth_um))) * COUNTS_PER_UM
    y = np.repeat(truth_um[:, 0], sent) * COUNTS_PER_UM
    samples = {X_CHANNEL: x, Y_CHANNEL: y}
    if sample_period_s is not None:
        samples[T_CHANNEL] = np.arange(x.size) * sample_period_s
    return samples


def old_pairing_um(samples: Mapping[str, np.ndarray], factor: int) -> np.ndarray:
    """Positions (y, x) µm as pairing with ``factor`` makes them: the reproduction."""
    n = len(samples[X_CHANNEL]) // factor
    x = samples[X_CHANNEL][: n * factor].reshape(n, factor).mean(axis=1) / COUNTS_PER_UM
    y = samples[Y_CHANNEL][: n * factor].reshape(n, factor).mean(axis=1) / COUNTS_PER_UM
    return np.column_stack([y, x])


def overrides(upsample: int | None) -> dict[str, Any]:
    return {**OVERRIDES, "encoder": {"upsample": upsample}}


@pytest.fixture
def sinks() -> PositionSinks:
    return PositionSinks()


def scan(
    engine: Engine,
    samples: Mapping[str, np.ndarray],
    *,
    n_frames: int = 9,
    frame_time: float | None = FRAME_TIME,
    md: Mapping[str, Any] | None = None,
) -> Run:
    """One whole scan: every frame and every sample arrives, then the stop."""
    run = Run(engine, md)
    header: dict[str, Any] = {"series": 1}
    if frame_time is not None:
        header["frame_time"] = frame_time
    engine.put(SeriesStart("eiger", header))
    engine.put(SeriesStart("panda", {}))
    run.frames(range(n_frames))
    engine.put(Samples(dict(samples), 0))
    run.end_streams()
    run.stop()
    assert engine.wait_idle(timeout=60)
    return run


def written_um(sink: PositionSink) -> np.ndarray:
    """The positions written, (y, x) µm, in frame order."""
    return np.array([sink.positions_m[i] for i in sorted(sink.positions_m)]) * 1e6


@pytest.fixture
def configured_10(tmp_path: Path, sinks: PositionSinks) -> Iterator[Engine]:
    engine = make_engine(tmp_path, sinks, overrides=overrides(10))
    yield engine
    engine.close(timeout=20)


@pytest.fixture
def auto(tmp_path: Path, sinks: PositionSinks) -> Iterator[Engine]:
    engine = make_engine(tmp_path, sinks, overrides=overrides(None))
    yield engine
    engine.close(timeout=20)


# ---- the cases of the issue, through the engine ------------------------------------------
@pytest.mark.parametrize("sent", [11, 5, 20])
def test_configured_10_with_another_factor_sent_uses_the_time_channel(
    configured_10: Engine, sinks: PositionSinks, sent: int, caplog: pytest.LogCaptureFixture
) -> None:
    """Was: pairing by 10 squeezed (11), halved the frames paired (5) or stretched the
    scan twofold (20), and the run said ``complete``. Now the time channel (frame_time /
    sample period = ``sent``) decides, every frame gets its true position, and the run is
    ``complete`` with a warning naming configured and measured factors."""
    truth = grid_um()
    samples = panda_samples(truth, sent, sample_period_s=FRAME_TIME / sent)
    old = old_pairing_um(samples, 10)[:9]
    assert not np.allclose(old[: len(truth)], truth[: len(old)], atol=0.05)  # reproduced

    with caplog.at_level(logging.WARNING, logger="hxn_liveptycho"):
        run = scan(configured_10, samples)
    summary = run.summary()
    assert summary["status"] == "complete", summary
    (warning,) = summary["warnings"]
    assert f"configured 10, measured {sent}" in warning
    assert f"positions use the measured {sent}" in warning
    # said once, in one line, with the run (the session's closing summary repeats it)
    said = [r.getMessage() for r in caplog.records]
    lines = [m for m in said if "] PandA samples per frame:" in m]
    assert len(lines) == 1 and "\n" not in lines[0] and run.uid[:8] in lines[0]

    sink = only_sink(sinks)
    assert isinstance(sink, PositionSink)
    md = sink.final_metadata
    assert md is not None and md["status"] == "complete" and md["warnings"] == [warning]
    pairing = md["pairing"]
    assert pairing["samples_per_frame"] == sent
    assert pairing["configured"] == 10
    assert pairing["samples_per_frame_from"].startswith("time channel")
    assert pairing["time_channel_ratio"] == pytest.approx(sent)
    assert pairing["frame_period_from"] == "detector frame_time"
    assert pairing["sample_count_ratio"] == pytest.approx(sent)
    assert pairing["mismatch"] is True
    counters = md["counters"]
    assert counters["assembler_samples_per_frame"] == sent
    assert counters["assembler_pairing_mismatches"] == 1
    assert counters["frames_used"] == 9
    assert counters["frames_without_position"] == counters["positions_without_frame"] == 0
    assert summary["pairing"] == pairing

    assert sorted(sink.indices) == list(range(9))
    np.testing.assert_allclose(written_um(sink), truth, atol=1e-6)  # not stretched


@pytest.mark.parametrize("sent", [11, 5, 20])
def test_configured_10_without_a_time_channel_is_caught_by_the_count(
    configured_10: Engine, sinks: PositionSinks, sent: int
) -> None:
    """A PandA that captures no time channel (and a detector without frame_time) leaves
    only the sample count at the end: the positions were already paired with 10, so the
    run cannot be mended, but it is no longer silent: the warning names configured 10
    and the ``sent`` per frame the count shows, and says the positions are likely wrong."""
    truth = grid_um()
    samples = panda_samples(truth, sent, sample_period_s=None)
    run = scan(configured_10, samples, frame_time=None)
    summary = run.summary()
    assert summary["status"] == "complete", summary
    factor_lines = [w for w in summary["warnings"] if w.startswith("PandA samples per frame")]
    assert len(factor_lines) == 1, summary["warnings"]
    assert (
        f"10 used (configured), but the PandA sent {9 * sent} samples for 9 frames"
        in factor_lines[0]
    )
    assert "likely misplaced" in factor_lines[0]

    sink = only_sink(sinks)
    assert isinstance(sink, PositionSink)
    md = sink.final_metadata
    assert md is not None
    assert md["pairing"]["samples_per_frame"] == 10
    assert md["pairing"]["samples_per_frame_from"] == "configured"
    assert md["pairing"]["time_channel_ratio"] is None
    assert md["pairing"]["sample_count_ratio"] == pytest.approx(sent)
    assert md["counters"]["assembler_samples_per_frame"] == 10
    assert md["counters"]["assembler_pairing_mismatches"] == 1
    # What was written is what pairing by 10 gives: flagged, not presented as the truth.
    expected = old_pairing_um(samples, 10)[: len(sink.indices)]
    np.testing.assert_allclose(written_um(sink), expected, atol=1e-6)
    if sent == 5:  # 45 samples make 4 positions: 5 frames never pair, and it says so
        assert md["counters"]["frames_without_position"] == 5
        assert any("5 frames_without_position" in w for w in md["warnings"])


def test_auto_with_a_time_ratio_of_10_4_waits_for_the_count(
    auto: Engine, sinks: PositionSinks
) -> None:
    """Was: frame_time / sample period = 10.4 was rounded to 10 (within 10 %) and used
    live. Now it is refused with a warning; the frames wait for the PandA's end, whose
    sample count (90 for 9 frames) proves 10; positions are the true ones."""
    truth = grid_um()
    samples = panda_samples(truth, 10, sample_period_s=0.001)
    run = scan(auto, samples, frame_time=0.0104)
    summary = run.summary()
    assert summary["status"] == "complete", summary
    (warning,) = summary["warnings"]
    assert "not configured; measured 10.400" in warning and "not a whole number" in warning

    sink = only_sink(sinks)
    assert isinstance(sink, PositionSink)
    md = sink.final_metadata
    assert md is not None and md["warnings"] == [warning]
    pairing = md["pairing"]
    assert pairing["samples_per_frame"] == 10
    assert pairing["samples_per_frame_from"] == "sample count at the end"
    assert pairing["configured"] is None
    assert md["config"]["encoder"]["upsample"] is None  # the config says what was asked
    assert pairing["time_channel_ratio"] == pytest.approx(10.4)
    assert md["counters"]["assembler_samples_per_frame"] == 10
    assert md["counters"]["assembler_pairing_mismatches"] == 1
    np.testing.assert_allclose(written_um(sink), truth, atol=1e-6)


def test_auto_with_a_count_of_10_4_pairs_nothing_and_says_why(
    auto: Engine, sinks: PositionSinks
) -> None:
    """Was: 104 samples for 10 frames rounded to 10 (within 10 %), drifting the last
    positions by 4 % of the scan. No witness proves a factor, so no frame is given a made-up
    position: the run is ``incomplete`` (no usable positions is never ``complete``), its
    frames are counted, and the warning gives the ratio."""
    md = copy.deepcopy(SCAN_MD)
    md["scan"]["scan_input"] = [-1.0, 1.0, 5, -1.0, 1.0, 2, FRAME_TIME]
    truth = grid_um(5, 2)
    samples = panda_samples(np.concatenate([truth, truth[:1]]), 10, sample_period_s=None)
    samples = {k: v[:104] for k, v in samples.items()}
    assert old_pairing_um(samples, 10).shape[0] == 10  # the old rounding paired them all
    run = scan(auto, samples, n_frames=10, frame_time=None, md=md)
    summary = run.summary()
    assert summary["status"] == "incomplete", summary
    assert "no frame was paired" in summary["reason"]
    factor_lines = [w for w in summary["warnings"] if w.startswith("PandA samples per frame")]
    assert len(factor_lines) == 1, summary["warnings"]
    assert "104 samples for 10 frames (10.400 per frame), not a whole number" in factor_lines[0]

    sink = only_sink(sinks)
    assert isinstance(sink, PositionSink)
    assert sink.indices == [] and sink.positions_m == {}  # nothing stretched was written
    final = sink.final_metadata
    assert final is not None and final["status"] == "incomplete"
    assert final["pairing"]["samples_per_frame"] is None
    assert final["pairing"]["sample_count_ratio"] == pytest.approx(10.4)
    counters = final["counters"]
    assert counters["frames_without_position"] == 10
    assert counters["samples_unassigned"] == 104
    assert counters["assembler_samples_per_frame"] == 0
    assert counters["assembler_pairing_mismatches"] == 1


@pytest.mark.parametrize("configured", [10, None])
def test_a_right_factor_is_recorded_and_not_warned_about(
    tmp_path: Path, sinks: PositionSinks, configured: int | None
) -> None:
    """The control: 10 sent, configured 10 or auto; the factor and its witness are
    recorded and the run is ``complete`` with no warning."""
    engine = make_engine(tmp_path, sinks, overrides=overrides(configured))
    try:
        truth = grid_um()
        run = scan(engine, panda_samples(truth, 10, sample_period_s=FRAME_TIME / 10))
    finally:
        engine.close(timeout=20)
    summary = run.summary()
    assert summary["status"] == "complete" and "warnings" not in summary, summary
    sink = only_sink(sinks)
    assert isinstance(sink, PositionSink)
    md = sink.final_metadata
    assert md is not None and "warnings" not in md
    assert md["pairing"]["samples_per_frame"] == 10
    assert md["pairing"]["samples_per_frame_from"] == (
        "configured, confirmed by the time channel" if configured else "time channel"
    )
    assert md["pairing"]["mismatch"] is False
    assert md["counters"]["assembler_samples_per_frame"] == 10
    assert md["counters"]["assembler_pairing_mismatches"] == 0
    np.testing.assert_allclose(written_um(sink), truth, atol=1e-6)


def test_simulated_hxn_scan_with_11_sent_and_10_configured(
    RE: Any, hxn_detectors: tuple[Any, Any], tmp_path: Path, tiled_server: Any
) -> None:
    """The same fault over the wire: a real RunEngine flies the simulated HXN scan whose
    PandA captures 11 samples per frame (with its time channel) while 10 is configured.
    The processed container in Tiled is ``complete`` with the warning, records 11, and
    its diffraction rows sit where the simulated stage really was."""
    eiger, panda = hxn_detectors
    sample = SimulatedSample(
        SimulatedBeamline(x_num=8, y_num=8, photons_per_frame=2e5, samples_per_frame=11)
    )
    live = make_live(
        RE,
        eiger,
        panda,
        tmp_path,
        tiled_uri=tiled_server.uri,
        overrides={"recon": {"iterations": 5}, "encoder": {"upsample": 10}},
    )
    try:
        result = fly(RE, eiger, panda, sample)
        assert result.exit_status == "success"
        assert live.wait(timeout=120)
        assert live.tiled is not None  # its client sends the key in a header, not the URL
        node = processed(live.tiled.client(), result.run_start_uids[0])
        md = node.metadata
        diffraction = read_diffraction(node)
    finally:
        live.close()
    assert md["status"] == "complete"
    assert any("configured 10, measured 11" in w for w in md["warnings"]), md["warnings"]
    assert md["pairing"]["samples_per_frame"] == 11
    assert md["pairing"]["configured"] == 10
    assert md["counters"]["assembler_samples_per_frame"] == 11
    assert md["counters"]["frames_used"] == sample.num_points
    order = np.argsort(diffraction.indices)
    np.testing.assert_allclose(diffraction.positions_m[order] * 1e6, sample.positions_um, atol=0.01)


# ---- the assembler's rules, one by one ----------------------------------------------------
def frame(index: int) -> np.ndarray:
    return np.full((4, 4), index, dtype=np.uint32)


def fed(
    encoder: EncoderConfig,
    sent: int,
    *,
    n_frames: int = 4,
    sample_period_s: float | None,
    frame_time: float | None = None,
    dwell_s: float | None = None,
) -> Assembler:
    assembler = Assembler(encoder, expected_frames=n_frames, dwell_s=dwell_s)
    assembler.frame_time_s = frame_time
    truth = grid_um(n_frames, 1)
    for i in range(n_frames):
        assembler.add_frame(i, frame(i))
    assembler.add_samples(panda_samples(truth, sent, sample_period_s=sample_period_s), 0)
    return assembler


def test_the_scan_dwell_stands_in_for_a_missing_frame_time() -> None:
    """No frame_time in the detector's header: the dwell gives the frame period."""
    assembler = fed(EncoderConfig(upsample=10), 11, sample_period_s=0.01 / 11, dwell_s=0.01)
    ready = assembler.pop_ready()
    assert [p.index for p in ready] == [0, 1, 2, 3]
    assert [p.x_um for p in ready] == pytest.approx(list(np.linspace(-1, 1, 4)))
    report = assembler.pairing_report()
    assert report["samples_per_frame"] == 11
    assert report["frame_period_from"] == "scan dwell"


def test_frame_time_wins_over_the_dwell() -> None:
    """The detector's own frame period is the better witness than the plan's dwell."""
    assembler = fed(EncoderConfig(), 10, sample_period_s=0.001, frame_time=0.01, dwell_s=0.02)
    assert len(assembler.pop_ready()) == 4
    assert assembler.upsample == 10
    assert assembler.pairing_report()["frame_period_from"] == "detector frame_time"


def test_configured_factor_is_kept_when_the_time_ratio_is_no_whole_number() -> None:
    """10.4 proves no other factor: the configured 10 is used, with a warning."""
    assembler = fed(EncoderConfig(upsample=10), 10, sample_period_s=0.001, frame_time=0.0104)
    assert len(assembler.pop_ready()) == 4
    assert assembler.upsample == 10
    (warning,) = assembler.warnings
    assert "configured 10, measured 10.400" in warning
    assert "positions use the configured 10" in warning


def test_a_frame_period_known_only_after_pairing_warns_and_never_mixes_factors() -> None:
    """Frames paired with 10 before any frame period existed keep 10: one run never mixes
    two factors; the warning says those positions are likely misplaced."""
    assembler = fed(EncoderConfig(upsample=10), 11, sample_period_s=0.01 / 11)
    assert len(assembler.pop_ready()) == 4
    assert assembler.warnings == []
    assembler.frame_time_s = 0.01  # the detector's header comes late
    assembler.pop_ready()
    assert assembler.upsample == 10
    (warning,) = assembler.warnings
    assert "configured 10, measured 11" in warning and "after 4 frames were paired" in warning
    assert assembler.counters.get("pairing_mismatches") == 1


def test_tolerance_takes_timestamp_noise_but_not_a_4_percent_disagreement() -> None:
    """A sample period off by 0.1 % (10.01) is 10; 10.4 is no whole number."""
    assert RATIO_TOLERANCE < 0.4
    close = fed(EncoderConfig(), 10, sample_period_s=0.001, frame_time=0.01001)
    assert len(close.pop_ready()) == 4 and close.upsample == 10 and not close.warnings
    far = fed(EncoderConfig(), 10, sample_period_s=0.001, frame_time=0.0104)
    assert far.pop_ready() == [] and far.upsample is None
    assert len(far.warnings) == 1


def test_final_check_is_said_once() -> None:
    """The end-of-run check may run more than once: each mismatch is one line, once."""
    assembler = fed(
        EncoderConfig(upsample=10, time_channel=None), 20, n_frames=4, sample_period_s=None
    )
    assembler.pop_ready()
    assembler.positions_ended()
    first = assembler.final_check()
    assert assembler.final_check() == first and len(first) == 1
    assert "but the PandA sent 80 samples for 4 frames (20.000 per frame)" in first[0]
    assert assembler.counters.get("pairing_mismatches") == 1


def test_a_count_that_is_no_whole_number_is_no_evidence_against_the_configured_factor() -> None:
    """A scan cut short (35 of 40 samples): the frames left without a position are
    reported as unpaired, not as a wrong factor."""
    assembler = Assembler(EncoderConfig(upsample=10, time_channel=None), expected_frames=4)
    for i in range(4):
        assembler.add_frame(i, frame(i))
    samples = panda_samples(grid_um(4, 1), 10, sample_period_s=None)
    assembler.add_samples({k: v[:35] for k, v in samples.items()}, 0)
    assert len(assembler.pop_ready()) == 3
    assembler.positions_ended()
    assert assembler.final_check() == []
    assert assembler.unpaired_report()["frames_without_position"] == 1


def test_the_count_of_a_scan_cut_short_is_no_evidence() -> None:
    """Half of an 8-point scan came (4 frames, 40 samples): 40 / 8 points = 5 is a whole
    number by chance, and must not be read as 'the PandA sent 5 per frame'."""
    assembler = Assembler(EncoderConfig(upsample=10, time_channel=None), expected_frames=8)
    for i in range(4):
        assembler.add_frame(i, frame(i))
    samples = panda_samples(grid_um(8, 1), 10, sample_period_s=None)
    assembler.add_samples({k: v[:40] for k, v in samples.items()}, 0)
    assert len(assembler.pop_ready()) == 4
    assembler.positions_ended()
    assert assembler.final_check() == []
    assert assembler.pairing_report()["samples_per_frame"] == 10


def test_a_factor_from_the_count_of_a_scan_that_came_short_is_unproven() -> None:
    """Auto without a time channel: 80 samples over the scan's 8 points gives 10, but only
    6 frames came, so that 10 rests on the PandA having sent the whole scan: said so."""
    assembler = Assembler(EncoderConfig(time_channel=None), expected_frames=8)
    for i in range(6):
        assembler.add_frame(i, frame(i))
    assembler.add_samples(panda_samples(grid_um(8, 1), 10, sample_period_s=None), 0)
    assembler.positions_ended()
    assert len(assembler.pop_ready()) == 6
    (warning,) = assembler.final_check()
    assert "10 from 80 samples over the scan's 8 points, but only 6 frames came" in warning
