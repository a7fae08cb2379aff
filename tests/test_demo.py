"""``liveptycho demo``: visibly live (snapshots in Tiled before the scan ends), and its options."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from hxn_liveptycho.cli import main
from hxn_liveptycho.demo import run_demo
from hxn_liveptycho.sim import SimulatedBeamline


@pytest.mark.slow  # 26 s of acquisition by design, 40 s on two loaded cores: `pytest -m slow`
def test_live_snapshots_reach_tiled_before_the_scan_stops(tmp_path):
    """The demo reads the processed container back from Tiled while it runs; at least two
    different live snapshots (``live_updated``) were read before the stop document was made,
    and progress was reported while frames were still being published."""
    reports: list[dict[str, Any]] = []
    result = run_demo(
        tmp_path / "demo",
        beamline=SimulatedBeamline(x_num=16, y_num=16),
        iterations=5,
        dwell=0.1,  # 26 s of acquisition
        array_backend="numpy",
        progress=reports.append,
        progress_interval_s=0.5,
    )
    assert result.status == "complete", result.metadata.get("error")
    assert result.stop_time is not None and result.start_time is not None
    before = result.snapshots_before_stop
    tiled_ready = [r["tiled"] for r in reports if (r.get("tiled") or {}).get("uri")][:1]
    assert len(before) >= 2, (
        f"live snapshots read from Tiled before stop: {before}; all: {result.snapshots}; "
        f"scan {result.start_time:.1f}..{result.stop_time:.1f}; first Tiled status: {tiled_ready}"
    )
    assert len({s.written for s in before}) == len(before)
    assert all(s.written <= s.seen < result.stop_time for s in before)
    during = [r["demo"] for r in reports if r["demo"]["acquiring"]]
    assert any(0 < d["frames_published"] < d["frames_planned"] for d in during)
    assert result.acquisition["frames_published"] == 16 * 16


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["--points", "1"], "--points: 1 is outside 2..200"),
        (["--window", "abc"], "--window: 'abc' is not a whole number"),
        (["--window", "127"], "--window: 127 is odd"),
        (["--frame-time", "-1"], "--frame-time: -1 is outside"),
        (["--mode", "fast"], "--mode: invalid choice: 'fast'"),
        (["--backend", "torch"], "--backend: invalid choice: 'torch'"),
    ],
)
def test_a_wrong_demo_option_is_one_line_and_exit_status_2(capsys, argv, said):
    with pytest.raises(SystemExit) as exit_:
        main(["demo", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and said in err, err


@pytest.mark.skipif(importlib.util.find_spec("cupy") is not None, reason="CuPy is installed")
def test_the_cupy_backend_without_cupy_is_one_line_and_exit_status_2(capsys, tmp_path):
    assert main(["demo", "--backend", "cupy", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CuPy is not installed" in err
