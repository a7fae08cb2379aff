"""Memory estimate of the iterative solver and its refusal of scans that would not fit (NumPy)."""

from __future__ import annotations

import re
import tracemalloc

import numpy as np
import pytest

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.recon import memory
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.sim import optics, phantom

N = 64
PERSISTENT = ("frames", "positions", "dm_exit_waves", "object", "probe", "momentum")


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    lam = optics.wavelength_m(12.0)
    dx = optics.sample_pixel_size_m(lam, 0.5, N, 75e-6)
    probe = optics.make_probe(N, pixel_size_m=dx, wavelength_m=lam, footprint_px=29)
    pos = phantom.scan_positions(15, 15, 5.0, jitter_px=0.5, rng=2) + 4
    top = pos.max(axis=0)
    canvas = (int(top[0]) + N + 6, int(top[1]) + N + 6)
    amps = np.random.default_rng(0).random((len(pos), N, N)).astype(np.float32)
    return probe, amps, pos, canvas


def _array_bytes(solver: StreamingSolver) -> int:
    """Sum of nbytes of every NumPy array the solver holds as an attribute, and of the
    arrays its attributes hold (the momentum's history); a view into a larger one of
    them (the first object mode) is that one's memory, counted once."""
    arrays = []
    for value in vars(solver).values():
        if isinstance(value, np.ndarray):
            arrays.append(value)
        elif hasattr(value, "__dict__"):
            arrays += [v for v in vars(value).values() if isinstance(v, np.ndarray)]
    counted: list[np.ndarray] = []
    for a in sorted(arrays, key=lambda a: a.nbytes, reverse=True):
        if not any(np.shares_memory(a, b) for b in counted):
            counted.append(a)
    return sum(a.nbytes for a in counted)


@pytest.mark.parametrize(
    ("algorithm", "modes"), [("epie", 1), ("epie", 3), ("dm", 1), ("dm", 3), ("lsqml", 2)]
)
def test_estimate_matches_numpy_allocations(data, algorithm, modes):
    """The estimate is within 20 % of the solver's arrays and of its traced peak while iterating."""
    probe, amps, pos, canvas = data
    params = IterativeParams(
        algorithm=algorithm, probe_modes=modes, probe_update_start=0, momentum_gain=0.1
    )
    tracemalloc.start()
    try:
        s = StreamingSolver(probe=probe, canvas_shape=canvas, params=params)
        s.add(amps, pos)
        s.iterate(2)  # DM allocates its exit waves; both passes update the probe
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    kwargs = {"backend": "numpy", "momentum": True}
    terms = memory.estimate_terms(len(pos), N, modes, algorithm, canvas, 64, **kwargs)
    held = _array_bytes(s)
    persistent = sum(terms[t] for t in PERSISTENT)
    total = memory.estimate_bytes(len(pos), N, modes, algorithm, canvas, 64, **kwargs)
    assert held == pytest.approx(s.held_bytes(), abs=64)  # 0-d scalars aside
    assert abs(persistent - held) <= 0.2 * held, (persistent, held)
    assert abs(total - peak) <= 0.2 * peak, (total, peak)
    assert abs(s.peak_bytes() - peak) <= 0.2 * peak, (s.peak_bytes(), peak)


def test_estimate_terms():
    """DM adds one complex64 exit wave per position and mode; CuPy adds cuFFT's work area."""
    args = (4096, 256, 3, "epie", (1500, 1500), 96)
    epie = memory.estimate_terms(*args)
    dm = memory.estimate_terms(*args[:3], "dm", *args[4:])
    sched = memory.estimate_terms(*args[:3], {"dm", "lsqml"}, *args[4:])
    assert epie["frames"] == 4096 * 256**2 * 4
    assert epie["dm_exit_waves"] == 0
    assert dm["dm_exit_waves"] == sched["dm_exit_waves"] == 4096 * 3 * 256**2 * 8  # 6.4 GB
    assert sched["batch_temporaries"] >= dm["batch_temporaries"]
    assert epie["fft_work_area"] == 96 * 3 * 256**2 * 8
    assert memory.estimate_terms(*args, backend="numpy")["fft_work_area"] == 0
    assert memory.estimate_bytes(*args) == sum(epie.values())
    assert memory.available_bytes(np) > 0
    with pytest.raises(ValueError, match="unknown algorithm"):
        memory.estimate_terms(*args[:3], "pie", *args[4:])


def _named_bytes(message: str) -> list[int]:
    return [int(m.replace(",", "")) for m in re.findall(r"([\d,]+) bytes", message)]


def test_refused_at_construction(data):
    """A scan whose expected size exceeds the limit is refused up front, naming both counts."""
    probe, _, _, canvas = data
    params = IterativeParams(algorithm="dm")
    need = memory.estimate_bytes(10_000, N, 1, "dm", canvas, 64, backend="numpy")
    limit = need // 2
    with pytest.raises(ConfigurationError) as err:
        StreamingSolver(
            probe=probe,
            canvas_shape=canvas,
            params=params,
            expected_positions=10_000,
            memory_limit_bytes=limit,
        )
    assert _named_bytes(str(err.value)) == [need, limit]
    assert "10000 positions" in str(err.value)
    # The same scan fits a big enough limit.
    s = StreamingSolver(
        probe=probe,
        canvas_shape=canvas,
        params=params,
        expected_positions=10_000,
        memory_limit_bytes=need,
    )
    assert s.n_positions == 0


def test_refused_in_add_keeps_earlier_frames(data):
    """add() refuses growth past the limit before allocating; earlier frames stay usable."""
    probe, amps, pos, canvas = data
    kwargs = {"backend": "numpy", "momentum": True}  # the defaults run ePIE with momentum
    limit = memory.estimate_bytes(150, N, 1, "epie", canvas, 64, **kwargs)
    s = StreamingSolver(probe=probe, canvas_shape=canvas, memory_limit_bytes=limit)
    assert s.add(amps[:100], pos[:100]) == 100
    # Doubling to 200 rows would not fit, growing to exactly 150 does.
    assert s.add(amps[100:150], pos[100:150]) == 150
    assert s.held_bytes() <= limit
    with pytest.raises(ConfigurationError) as err:
        s.add(amps[150:], pos[150:])
    need = memory.estimate_bytes(len(pos), N, 1, "epie", canvas, 64, **kwargs)
    assert _named_bytes(str(err.value)) == [need, limit]
    assert s.n_positions == 150
    assert np.isfinite(s.iterate(1))


def test_expected_positions_sizes_buffers_once(data):
    """With expected_positions the buffers are sized at the first add, not doubled piecewise."""
    probe, amps, pos, canvas = data
    s = StreamingSolver(probe=probe, canvas_shape=canvas, expected_positions=len(pos))
    for idx in np.array_split(np.arange(len(pos)), 5):
        s.add(amps[idx], pos[idx])
    terms = memory.estimate_terms(len(pos), N, 1, "epie", canvas, 64, backend="numpy")
    assert s.held_bytes() == pytest.approx(sum(terms[t] for t in PERSISTENT), rel=0.01)
