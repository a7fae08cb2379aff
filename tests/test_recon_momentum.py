"""Momentum between passes (mPIE's acceleration): the update itself, and what it buys the solver."""

from __future__ import annotations

import numpy as np
import pytest
from recon_helpers import mix_modes_like_the_kernel
from test_recon_algorithms import Scan

from hxn_liveptycho.recon import memory
from hxn_liveptycho.recon._modes import orthogonalize_modes
from hxn_liveptycho.recon._momentum import Momentum
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver

GAIN, FRICTION = 0.3, 0.9


@pytest.fixture(scope="module")
def scan() -> Scan:
    return Scan()


def _errors(scan: Scan, params: IterativeParams, checkpoints, *, modes: bool = False):
    s = StreamingSolver(probe=scan.probe_guess, canvas_shape=scan.canvas, params=params)
    s.add(scan.mode_amplitudes if modes else scan.amplitudes, scan.positions)
    errors = []
    for c in checkpoints:
        s.iterate(c - s.iteration)
        errors.append(scan.error(s))
    return errors


def test_step_follows_the_heavy_ball_update():
    """v <- f v + (x - x_prev); x <- x + g v; the first step after a reset only records."""
    m = Momentum(FRICTION, GAIN, np)
    x = np.zeros(3, dtype=np.complex64)
    m.step(x)
    np.testing.assert_array_equal(x, 0)  # recorded only
    x += 1  # a pass moves x by 1
    m.step(x)
    np.testing.assert_allclose(x, 1 + GAIN * 1)
    x += 1
    m.step(x)
    v = FRICTION * 1 + 1
    np.testing.assert_allclose(x, 2 + GAIN + GAIN * v, rtol=1e-6)
    assert len(m.buffers) == 2 and all(b.dtype == np.complex64 for b in m.buffers)
    m.reset()
    assert m.buffers == []
    before = x.copy()
    m.step(x)
    np.testing.assert_array_equal(x, before)
    m.step(np.zeros(5, dtype=np.complex64))  # another shape: recorded afresh, not mixed in
    assert m.buffers[0].shape == (5,)


def test_mixing_follows_the_modes():
    """After the modes are mixed by u, the history is mixed the same way: the next step is the
    one the mixed modes would have taken."""
    rng = np.random.default_rng(0)
    modes = (rng.normal(size=(3, 8, 8)) + 1j * rng.normal(size=(3, 8, 8))).astype(np.complex64)
    moved = modes + 0.1 * modes[::-1]
    plain, mixed = Momentum(FRICTION, GAIN, np), Momentum(FRICTION, GAIN, np)
    a, b = modes.copy(), modes.copy()
    plain.step(a)
    mixed.step(b)
    a[...] = moved
    b[...] = moved
    plain.step(a)
    mixed.step(b)
    b, u = orthogonalize_modes(b, np)
    mixed.mix(u)
    # One more pass that moves both by the same (mixed) change.
    change = 0.05 * modes
    a += change
    b += np.einsum("kl,lmn->kmn", u, change)
    plain.step(a)
    mixed.step(b)
    np.testing.assert_allclose(b, np.einsum("kl,lmn->kmn", u, a), atol=1e-5)


@pytest.mark.parametrize("algorithm", ["epie", "lsqml"])
def test_momentum_gets_there_sooner(scan, algorithm):
    """On the noisy CI scan, momentum lowers the object error at 10 and 20 iterations and
    ends close to the run without it: within 0.005 at gain 0.3, 0.002 at the default 0.1.
    The end is taken at 40 iterations (first measured at 60; the bounds are the same)."""
    checkpoints = (10, 20, 40)
    off = _errors(scan, IterativeParams(algorithm=algorithm, momentum_gain=0.0), checkpoints)
    params = IterativeParams(algorithm=algorithm, momentum_gain=GAIN, momentum_friction=FRICTION)
    on = _errors(scan, params, checkpoints)
    # Measured at 10 / 20 / 60: ePIE 0.159 / 0.056 / 0.038 off, 0.099 / 0.042 / 0.039 on;
    # LSQ-ML 0.171 / 0.066 / 0.040 off, 0.127 / 0.046 / 0.042 on. At 40, on - off is
    # -0.001 (ePIE) and 0.000 (LSQ-ML).
    assert on[0] < 0.85 * off[0], (on, off)
    assert on[1] < 0.9 * off[1], (on, off)
    assert on[2] <= off[2] + 0.005, (on, off)
    default = _errors(scan, IterativeParams(algorithm=algorithm), checkpoints)
    # Measured at 10 / 20 / 60: ePIE 0.130 / 0.041 / 0.038, LSQ-ML 0.148 / 0.043 / 0.040; at
    # 40, default - off is -0.002 (ePIE) and -0.001 (LSQ-ML).
    assert default[0] < 0.9 * off[0] and default[1] < 0.8 * off[1], (default, off)
    assert default[2] <= off[2] + 0.002, (default, off)


def test_momentum_with_modes_and_position_refinement(scan):
    """Momentum works with 3 orthogonalised modes (its history mixed with them) and with
    position refinement; both end below the runs without it."""
    modes_off = _errors(scan, IterativeParams(probe_modes=3, momentum_gain=0.0), (60,), modes=True)
    modes_on = _errors(scan, IterativeParams(probe_modes=3, momentum_gain=GAIN), (60,), modes=True)
    # Measured: 0.058 off, 0.023 on.
    assert modes_on[0] < 0.7 * modes_off[0], (modes_on, modes_off)
    refine = {"position_refinement": True}
    refine_off = _errors(scan, IterativeParams(**refine, momentum_gain=0.0), (60,))
    refine_on = _errors(scan, IterativeParams(**refine, momentum_gain=GAIN), (60,))
    # Measured: 0.048 off, 0.039 on.
    assert refine_on[0] < refine_off[0], (refine_on, refine_off)


def test_dm_passes_ignore_momentum(scan):
    """DM is a fixed-point map of its stored waves: momentum never touches its passes, and a
    schedule's later ePIE stage starts its history afresh."""
    dm = IterativeParams(algorithm="dm")
    a = StreamingSolver(probe=scan.probe_guess, canvas_shape=scan.canvas, params=dm)
    b = StreamingSolver(
        probe=scan.probe_guess,
        canvas_shape=scan.canvas,
        params=dm.model_copy(update={"momentum_gain": GAIN}),
    )
    for s in (a, b):
        s.add(scan.amplitudes, scan.positions)
        s.iterate(5)
    np.testing.assert_array_equal(a.object, b.object)
    assert b.held_bytes() == a.held_bytes()
    schedule = IterativeParams(
        schedule=[("dm", 0.5), ("epie", 0.5)], iterations=20, momentum_gain=GAIN
    )
    assert _errors(scan, schedule, (20,))[0] <= 0.08


def test_streaming_with_momentum_matches_batch(scan):
    """Frames added in 4 chunks between iterations (the history carries across the adds) end
    within 0.01 of the batch run, and ahead of the same stream without momentum at the
    moment the last frame arrives."""
    params = IterativeParams(momentum_gain=GAIN)
    batch = _errors(scan, params, (60,))[0]
    at_last_frame = {}
    for gain in (0.0, GAIN):
        s = StreamingSolver(
            probe=scan.probe_guess,
            canvas_shape=scan.canvas,
            params=params.model_copy(update={"momentum_gain": gain}),
        )
        for idx in np.array_split(np.arange(len(scan.positions)), 4):
            s.add(scan.amplitudes[idx], scan.positions[idx])
            s.iterate(5)
        at_last_frame[gain] = scan.error(s)
    s.iterate(60)
    assert abs(scan.error(s) - batch) < 0.01, (scan.error(s), batch)
    # Measured: 0.111 without momentum, 0.047 with it; both end at 0.038-0.039.
    assert at_last_frame[GAIN] < 0.6 * at_last_frame[0.0], at_last_frame


def test_memory_counts_the_history(scan):
    """The solver's held bytes and the estimate both count the history: two object-sized and
    two probe-sized complex64 arrays."""
    params = IterativeParams(momentum_gain=GAIN, probe_update_start=0)
    off = StreamingSolver(
        probe=scan.probe_guess, canvas_shape=scan.canvas, params=IterativeParams(momentum_gain=0)
    )
    on = StreamingSolver(probe=scan.probe_guess, canvas_shape=scan.canvas, params=params)
    for s in (off, on):
        s.add(scan.amplitudes, scan.positions)
        s.iterate(3)
    n = scan.probe_guess.shape[-1]
    history = 2 * 8 * (scan.canvas[0] * scan.canvas[1] + n * n)
    assert on.held_bytes() - off.held_bytes() == history
    args = (len(scan.positions), n, 1, "epie", scan.canvas, 64)
    assert memory.estimate_terms(*args, momentum=True)["momentum"] == history
    assert memory.estimate_terms(*args)["momentum"] == 0
    assert on.peak_bytes() - off.peak_bytes() == history


def _momentum_like_the_kernel(x, stage, previous, velocity, friction, gain):
    """``liveptycho_momentum`` of ``recon._pass_end_kernels``, element by element, in
    NumPy."""
    if stage >= 2:
        change = x - previous
        v = change if stage == 2 else velocity * np.float32(friction) + change
        velocity[...] = v
        x += v * np.float32(gain)
    if stage >= 1:
        previous[...] = x


def _pass_tail_like_the_kernel(objects, probes, *, momentum, friction, gain, power, amax):
    """``liveptycho_power_total`` then ``liveptycho_pass_tail``, in NumPy."""
    total = np.float32(np.sum(probes.real**2 + probes.imag**2))
    s = np.sqrt(np.float32(power) / total) if power is not None else np.float32(1)
    _momentum_like_the_kernel(objects, *momentum, friction, gain)
    if power is not None:
        objects /= s
        probes *= s
    if amax is not None:
        a = np.abs(objects)
        objects *= np.where(a > amax, amax / np.maximum(a, 1e-30), 1).astype(np.float32)


@pytest.mark.parametrize(
    "settings",
    [
        {"algorithm": "epie", "probe_modes": 2},
        {"algorithm": "lsqml", "object_amplitude_max": 0.9},
        {"algorithm": "epie", "momentum_gain": 0.0, "object_amplitude_max": 0.9},
    ],
)
def test_the_fused_end_of_a_pass_does_what_the_xp_path_does(scan, settings, monkeypatch):
    """The fused end of a pass (CuPy: the probes' momentum, then one launch for the object's
    momentum, gauge and clamp) over several passes: momentum's stages, the order of
    momentum, gauge and clamp, and which arrays each touches match the xp path's. The
    kernels are stood in for by their element-wise NumPy equivalents (their CUDA is
    checked against the xp path on the GPU: ``benchmarks/recon_gpu.py --variants``)."""
    from hxn_liveptycho.recon import pass_end

    monkeypatch.setattr(pass_end, "momentum_step", _momentum_like_the_kernel)
    monkeypatch.setattr(pass_end, "pass_tail", _pass_tail_like_the_kernel)
    params = IterativeParams(probe_update_start=1, **settings)
    solvers = []
    for fused in (False, True):
        s = StreamingSolver(probe=scan.probe_guess, canvas_shape=scan.canvas, params=params)
        s.add(scan.amplitudes, scan.positions)
        s.iterate(1)
        s._fused = fused  # the end of a pass only: the passes themselves are not run
        solvers.append(s)
    reference, fused = solvers
    rng = np.random.default_rng(5)
    for algorithm, update_probe in [
        ("epie", False),
        ("epie", True),
        ("epie", True),
        ("dm", True),
        ("epie", True),
        ("epie", True),
    ]:
        # A pass's change, the same for both.
        step = 0.05 * rng.normal(size=reference._objects.shape)
        probe_step = 0.05 * rng.normal(size=reference._probes.shape)
        for s in solvers:
            s._objects += step.astype(np.complex64)
            s._probes += probe_step.astype(np.complex64)
            pass_end.end_pass(s, algorithm, update_probe)
        np.testing.assert_allclose(fused._objects, reference._objects, rtol=2e-6, atol=2e-7)
        np.testing.assert_allclose(fused._probes, reference._probes, rtol=2e-6, atol=2e-6)
        for mine, theirs in [
            (fused._object_momentum, reference._object_momentum),
            (fused._probe_momentum, reference._probe_momentum),
        ]:
            assert len(mine.buffers) == len(theirs.buffers)
            for a, b in zip(mine.buffers, theirs.buffers, strict=True):
                np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)
    if params.object_amplitude_max is not None:
        assert np.abs(fused._objects).max() <= params.object_amplitude_max * (1 + 1e-6)


@pytest.mark.parametrize("algorithm", ["epie", "dm"])
def test_the_fused_orthogonalisation_mixes_what_the_xp_path_mixes(scan, algorithm, monkeypatch):
    """The fused orthogonalisation (CuPy: one launch for the unitary, then the probes, their
    momentum and DM's stored waves mixed in place) leaves every array as the xp path does.
    The unitary is stood in for by the xp path's own and the mixing by NumPy's matmul (the
    CUDA of both is checked against the xp path on the GPU:
    ``pytest -m gpu``, tests/test_gpu_parity.py)."""
    from hxn_liveptycho.recon import pass_end

    unitaries = []

    def unitary(modes: np.ndarray) -> np.ndarray:
        unitaries.append(orthogonalize_modes(modes, np)[1])
        return unitaries[-1]

    monkeypatch.setattr(pass_end, "mode_unitary", unitary)
    monkeypatch.setattr(pass_end, "mix_modes", mix_modes_like_the_kernel)
    params = IterativeParams(
        algorithm=algorithm, probe_modes=3, probe_update_start=0, momentum_gain=GAIN
    )
    solvers = []
    for _ in range(2):
        s = StreamingSolver(probe=scan.probe_guess, canvas_shape=scan.canvas, params=params)
        s.add(scan.mode_amplitudes, scan.positions)
        s.iterate(3)
        solvers.append(s)
    reference, fused = solvers
    fused._fused = True  # the orthogonalisation only: the passes have run on NumPy
    # Modes far from orthogonal, the same in both.
    rng = np.random.default_rng(7)
    mixing = (np.eye(3) + 0.4 * rng.normal(size=(3, 3)) + 0.4j * rng.normal(size=(3, 3))).astype(
        np.complex64
    )
    for s in solvers:
        s._probes[...] = np.einsum("kl,lmn->kmn", mixing, s._probes)
    held = fused._probes
    for s in solvers:
        pass_end.orthogonalize(s)
    assert len(unitaries) == 1 and fused._probes is held  # in place, one unitary
    np.testing.assert_allclose(fused._probes, reference._probes, rtol=1e-5, atol=1e-6)
    mine, theirs = fused._probe_momentum.buffers, reference._probe_momentum.buffers
    assert len(mine) == len(theirs) == (0 if algorithm == "dm" else 2)
    for a, b in zip(mine, theirs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if algorithm == "dm":
        ready = reference._dm_ready
        assert ready == scan.positions.shape[0] and fused._dm_ready == ready
        np.testing.assert_allclose(
            fused._dm_waves[:ready], reference._dm_waves[:ready], rtol=1e-5, atol=1e-5
        )
