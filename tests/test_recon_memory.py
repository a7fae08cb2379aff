"""Memory estimate of the iterative solver and its refusal of scans that would not fit (NumPy)."""

from __future__ import annotations

import itertools
import re
import tracemalloc

import numpy as np
import pytest

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.recon import memory
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.sim import optics, phantom

N = 64
PERSISTENT = ("frames", "positions", "dm_exit_waves", "object", "probe", "momentum", "opr")

#: The traced scan: 100 positions of 32² in batches of 25 (whole batches, so DM's pass
#: ends on a full one), small enough for every case to run in a fraction of a second.
TRACED_WINDOW, TRACED_BATCH = 32, 25
#: The estimate is an upper bound of the traced peak, up to what tracemalloc counts and
#: the estimate leaves out: Python objects (frames, lists, batches) and index arrays.
UNCOUNTED_BYTES = 64 * 2**10
#: ...and at most this factor above it: NumPy elides some temporaries of chained
#: arithmetic that the estimate counts (CuPy allocates them), most with three probe modes.
MOST_ABOVE_PEAK = 1.3


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    return _scan(N, 15, 5.0)


def _scan(
    n: int, side: int, step: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """``(probe, amplitudes, positions, canvas)`` of a ``side`` x ``side`` jittered scan."""
    lam = optics.wavelength_m(12.0)
    dx = optics.sample_pixel_size_m(lam, 0.5, n, 75e-6)
    probe = optics.make_probe(n, pixel_size_m=dx, wavelength_m=lam, footprint_px=n // 2 - 3)
    pos = phantom.scan_positions(side, side, step, jitter_px=0.5, rng=2) + 4
    top = pos.max(axis=0)
    canvas = (int(top[0]) + n + 6, int(top[1]) + n + 6)
    amps = np.random.default_rng(0).random((len(pos), n, n)).astype(np.float32)
    return probe, amps, pos, canvas


@pytest.fixture(scope="module")
def traced() -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """The traced scan, after one untraced solve has made the one-time allocations
    (imports, FFT plans) that would otherwise land in the first case's peak."""
    scan = _scan(TRACED_WINDOW, 10, 3.0)
    _traced_peak(scan, IterativeParams(algorithm="lsqml", probe_modes=2, object_modes=2))
    return scan


def _traced_peak(scan: tuple, params: IterativeParams) -> tuple[int, StreamingSolver]:
    """Traced peak bytes of two passes after the frames are added (the solver's arrays
    are traced from its construction on), and the solver."""
    probe, amps, pos, canvas = scan
    tracemalloc.start()
    try:
        s = StreamingSolver(
            probe=probe, canvas_shape=canvas, params=params, expected_positions=len(pos)
        )
        s.add(amps, pos)
        tracemalloc.reset_peak()  # add()'s temporaries are not the iteration's
        s.iterate(2)  # DM allocates its exit waves; both passes update the probe
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak, s


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


#: Every algorithm with 1 and 3 probe modes, 1 and 2 object modes, whole-pixel and
#: sub-pixel positions; then position refinement, momentum, Poisson noise and the
#: variable probe (OPR, ePIE only) on whole-pixel and sub-pixel positions.
CASES = (
    [
        pytest.param(algorithm, k, m, subpixel, {}, id=f"{algorithm}-K{k}-M{m}-{kind}")
        for algorithm, k, m, (subpixel, kind) in itertools.product(
            ("epie", "lsqml", "dm"), (1, 3), (1, 2), ((False, "whole"), (True, "subpixel"))
        )
    ]
    + [
        pytest.param(a, k, m, True, {"position_refinement": True}, id=f"{a}-K{k}-M{m}-refinement")
        for a, k, m in (("epie", 1, 1), ("lsqml", 2, 1), ("epie", 1, 2))
    ]
    + [
        pytest.param(a, 1, m, False, {"momentum_gain": 0.3}, id=f"{a}-M{m}-momentum")
        for a, m in (("epie", 1), ("lsqml", 2))
    ]
    + [pytest.param("lsqml", 1, 1, False, {"noise": "poisson"}, id="lsqml-poisson")]
    + [
        pytest.param("epie", k, 1, subpixel, {"opr_modes": 2}, id=f"epie-K{k}-opr-{kind}")
        for k, (subpixel, kind) in ((1, (False, "whole")), (2, (True, "subpixel")))
    ]
)


@pytest.mark.parametrize(("algorithm", "k", "m", "subpixel", "options"), CASES)
def test_estimate_bounds_the_traced_peak(traced, algorithm, k, m, subpixel, options):
    """The estimate is an upper bound of the NumPy solver's traced peak over two passes,
    at most :data:`MOST_ABOVE_PEAK` times it; its persistent terms are the arrays the
    solver holds, and the solver's own peak_bytes() is the same estimate."""
    probe, amps, pos, canvas = traced
    scan = (probe, amps, pos if subpixel else np.rint(pos), canvas)
    params = IterativeParams(
        algorithm=algorithm,
        probe_modes=k,
        object_modes=m,
        batch_size=TRACED_BATCH,
        probe_update_start=0,
        position_refinement_start=0,
        **{"momentum_gain": 0.0, **options},
    )
    peak, s = _traced_peak(scan, params)
    terms = memory.estimate_terms(
        len(pos),
        TRACED_WINDOW,
        k,
        algorithm,
        canvas,
        TRACED_BATCH,
        backend="numpy",
        subpixel=subpixel,
        position_refinement=params.position_refinement,
        momentum=params.momentum_gain > 0,
        object_modes=m,
        opr_modes=params.opr_modes,
    )
    estimate = sum(terms.values())
    held = _array_bytes(s)
    assert held == pytest.approx(s.held_bytes(), abs=64)  # 0-d scalars aside
    assert sum(terms[t] for t in PERSISTENT) == pytest.approx(held, rel=0.02)
    assert peak <= estimate + UNCOUNTED_BYTES, (peak, estimate)
    assert estimate <= MOST_ABOVE_PEAK * peak, (estimate / peak, estimate, peak)
    assert s.peak_bytes() == pytest.approx(estimate, rel=0.01)


@pytest.mark.parametrize("algorithm", ["epie", "lsqml", "dm"])
def test_estimate_grows_with_what_the_step_allocates(algorithm):
    """More probe or object modes, sub-pixel shifts and position refinement never lower
    the batch temporaries; the named phases give the term."""
    args = (4096, 128, 2, algorithm, (900, 900), 64)

    def batch(**kwargs):
        return memory.estimate_terms(*args, **kwargs)["batch_temporaries"]

    whole = batch(subpixel=False)
    assert batch(subpixel=True) > whole
    assert batch(subpixel=True, position_refinement=True) >= batch(subpixel=True)
    assert batch(subpixel=False, position_refinement=True) == batch(
        subpixel=True, position_refinement=True
    )  # refinement shifts the probes
    assert batch(object_modes=2) > batch(object_modes=1)
    assert memory.estimate_terms(*args[:2], 3, *args[3:])["batch_temporaries"] > batch()
    phases = memory.batch_phases(algorithm, 128, 2, 64, subpixel=True)
    assert batch() == max(phases.values()) + 3 * 8 * 2 * 128**2  # + the probe-sized arrays


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
