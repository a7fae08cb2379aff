"""The half-set resolution estimate, live: beside a run's solver, in snapshots and metadata."""

from __future__ import annotations

import math
from multiprocessing import Pipe
from typing import Any

import numpy as np
import pytest
from recon_helpers import phase_object_scan

from hxn_liveptycho.recon.frame_ring import FrameRing
from hxn_liveptycho.recon.iterative import IterativeParams
from hxn_liveptycho.recon.live_resolution import LiveResolution
from hxn_liveptycho.recon.quality import QualitySettings
from hxn_liveptycho.recon.resolution import HalfSets
from hxn_liveptycho.recon.worker import SolverWorker
from hxn_liveptycho.recon.worker_child import _Child
from hxn_liveptycho.store.container import quality_metadata

N = 32
#: The simulated object pixel, for the estimate in nanometres.
PIXEL_M = 10e-9
#: A plausible half-period for the scan below: coarser than one pixel (the noise leaves the
#: finest frequencies undecided) and finer than the probe's width (the overlap decides more).
PLAUSIBLE_PX = (1.0, 20.0)


def _noisy_scan(side: int = 10, step: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """A dense raster over a random phase object, with Poisson noise so that the halves
    disagree at fine frequencies: probe, amplitudes, positions (px), canvas side."""
    rng = np.random.default_rng(1)
    _, probe, far_field, positions = phase_object_scan(N, side, step, rng)
    canvas = N + step * side + 4
    intensity = far_field**2
    photons_per_frame = 1e5
    scale = photons_per_frame / intensity.sum(axis=(1, 2)).mean()
    amplitudes = np.sqrt(rng.poisson(intensity * scale) / scale).astype(np.float32)
    return probe, amplitudes, positions, canvas


def _final(worker: SolverWorker, run_id: str, quality: QualitySettings) -> dict[str, Any]:
    probe, amplitudes, positions, canvas = _noisy_scan()
    remote = worker.open_run(
        run_id,
        probe=probe,
        canvas_shape=(canvas, canvas),
        params=IterativeParams(batch_size=8),
        expected_positions=len(amplitudes),
        quality=quality,
    )
    remote.add(amplitudes[:50], positions[:50])
    remote.add(amplitudes[50:], positions[50:])
    remote.finish(20)
    assert remote.done.wait(120)
    assert remote.failure is None and remote.final is not None
    final = dict(remote.final)
    remote.release()
    return final


def test_the_solver_process_sends_the_estimate_with_the_setting_on_and_not_off() -> None:
    """With live_quality.resolution the final snapshot holds a plausible half-period; off, none."""
    worker = SolverWorker(backend="numpy")
    try:
        on = _final(worker, "run-on", QualitySettings(resolution=True, maps=False))
        off = _final(worker, "run-off", QualitySettings(maps=False))
    finally:
        worker.close()
    assert "resolution" not in off
    estimate = on["resolution"]
    assert estimate["estimated"] and not estimate["resolved_to_nyquist"]
    assert PLAUSIBLE_PX[0] < estimate["half_period_px"] < PLAUSIBLE_PX[1]
    assert estimate["period_px"] == pytest.approx(2 * estimate["half_period_px"])
    # The parent does not send the object pixel (yet): the estimate is in pixels only.
    assert estimate["half_period_nm"] is None and estimate["pixel_size_nm"] is None
    assert estimate["iteration"] >= 1 and sum(estimate["positions"]) == 100
    assert abs(estimate["positions"][0] - estimate["positions"][1]) <= 1
    md = quality_metadata(on)
    assert md["resolution"] == estimate and "resolution" not in quality_metadata(off)


def _child_run(
    quality: QualitySettings, pixel_size_m: float | None
) -> tuple[_Child, FrameRing, int]:
    """A run opened in a solver child driven in this process, all frames added."""
    probe, amplitudes, positions, canvas = _noisy_scan()
    inbox, outbox = Pipe()
    child = _Child(inbox, outbox)
    ring = FrameRing(len(amplitudes), N)
    ring.write(amplitudes)
    spec = {
        "ring": ring.name,
        "slots": len(amplitudes),
        "n": N,
        "probe": probe,
        "canvas_shape": (canvas, canvas),
        "params": IterativeParams(batch_size=8),
        "expected_positions": len(amplitudes),
        "quality": quality,
        "pixel_size_m": pixel_size_m,
    }
    child._open("run", spec)
    child._add("run", 0, len(amplitudes), positions)
    return child, ring, len(amplitudes)


def test_with_the_pixel_size_the_estimate_is_in_nanometres() -> None:
    """Given the object pixel in the run's spec, the estimate reads in nm, the same in px."""
    child, ring, _ = _child_run(QualitySettings(resolution=True, maps=False), PIXEL_M)
    try:
        for _ in range(15):
            child.step()
        estimate = child._snapshot(child.runs["run"])["resolution"]
    finally:
        child._drop("run")
        ring.close()
    assert estimate["pixel_size_nm"] == pytest.approx(PIXEL_M * 1e9)
    half_period_nm = estimate["half_period_nm"]
    assert math.isfinite(half_period_nm)
    assert half_period_nm == pytest.approx(estimate["half_period_px"] * PIXEL_M * 1e9)
    assert PLAUSIBLE_PX[0] * PIXEL_M * 1e9 < half_period_nm < PLAUSIBLE_PX[1] * PIXEL_M * 1e9
    assert estimate["period_nm"] == pytest.approx(2 * half_period_nm)
    assert estimate["iteration"] == 15


def test_a_failing_estimate_leaves_the_snapshot_and_the_run_as_they_were(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The estimate raising costs only the estimate; the halves failing to iterate drop them."""
    child, ring, n_frames = _child_run(QualitySettings(resolution=True, maps=False), PIXEL_M)
    try:
        child.step()

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("the FRC failed")

        monkeypatch.setattr(HalfSets, "estimate", broken)
        snap = child._snapshot(child.runs["run"])
        assert "resolution" not in snap and snap["positions_px"].shape == (n_frames, 2)
        monkeypatch.setattr(HalfSets, "iterate", broken)
        assert child.step()  # the main solver still makes its pass
        run = child.runs["run"]
        assert run.resolution is not None and run.resolution.halves is None
        assert run.resolution.failure == "iteration" and run.solver.iteration == 2
        assert "resolution" not in child._snapshot(run)
    finally:
        child._drop("run")
        ring.close()


def test_before_both_halves_hold_frames_the_estimate_says_so() -> None:
    """One frame, or frames but no pass yet: ``estimated`` is False, with the halves' counts."""
    probe, amplitudes, positions, canvas = _noisy_scan()
    live = LiveResolution(
        probe=probe,
        canvas_shape=(canvas, canvas),
        params=IterativeParams(batch_size=8),
        xp=np,
        pixel_size_m=PIXEL_M,
    )
    live.add(amplitudes[:1], positions[:1])
    live.iterate()  # one half empty: no pass, no error
    assert live.snapshot() == {"estimated": False, "iteration": 0, "positions": [1, 0]}
    live.add(amplitudes[1:4], positions[1:4])
    assert live.snapshot() == {"estimated": False, "iteration": 0, "positions": [2, 2]}
    live.iterate()
    snap = live.snapshot()
    assert snap is not None and snap["estimated"] and snap["iteration"] == 1


def test_quality_metadata_carries_the_resolution_as_plain_values() -> None:
    """The snapshot's resolution reaches the container metadata as it is, a copy."""
    resolution = {
        "estimated": True,
        "half_period_nm": 42.0,
        "period_nm": 84.0,
        "half_period_px": 4.2,
        "period_px": 8.4,
        "pixel_size_nm": 10.0,
        "resolved_to_nyquist": False,
        "iteration": 7,
        "positions": [50, 50],
    }
    md = quality_metadata({"resolution": resolution})
    assert md == {"resolution": resolution} and md["resolution"] is not resolution
    assert "resolution" not in quality_metadata({"resolution": None})
