"""The fused CUDA path against the xp reference, on the GPU (``pytest -m gpu``).

Each fused step gets fresh random inputs and is compared with the expression it
replaces; outputs the kernels allocate are checked for NaN (a kernel that leaves
part of its output unwritten shows there, since CuPy's pool hands back memory
that earlier poisoned arrays filled). The whole solver, fused, is compared with
the same solver running its xp expressions on CuPy (``fused=False``) and, for
one case each, with NumPy. Tolerances are relative (norm of the difference over
the norm of the reference), stated per case, with the margin over what the H200
measured in docs/benchmarks.md ("NumPy ⇄ CuPy parity").

Skipped, with the reason, where CuPy or a CUDA device is missing.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from gpu_helpers import GPU_MARKS, cp, rel_diff

pytestmark = GPU_MARKS

#: Relative difference a float32 kernel may have from its float32 reference.
STEP_TOL = 2e-5


def _complex(rng: np.random.Generator, *shape: int) -> Any:
    x = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    return cp.asarray(x.astype(np.complex64))


def _poison_pool() -> None:
    """Fill freed pool memory with NaN so an unwritten output element shows up."""
    junk = cp.full(64 * 1024 * 1024 // 8, cp.nan, dtype=cp.complex64)
    del junk


# ---- steps ---------------------------------------------------------------------------
@pytest.mark.parametrize("n", [64, 256])
@pytest.mark.parametrize("modes", [1, 3])
def test_the_solver_s_own_fft_is_cufft(n, modes):
    from hxn_liveptycho.recon import _fft_lines as lines

    rng = np.random.default_rng(n + modes)
    x = _complex(rng, 5, modes, n, n)
    want = cp.fft.fft2(x)
    assert rel_diff(lines.fft2(x.copy()), want) < STEP_TOL
    back = cp.fft.ifft2(x) * (n * n)
    assert rel_diff(lines.ifft2_unscaled(x.copy()), back) < STEP_TOL


@pytest.mark.parametrize("per_position", [False, True])
def test_exit_waves_and_their_spectra_are_the_windows_times_the_probes(per_position):
    from hxn_liveptycho.recon import _exit_waves
    from hxn_liveptycho.recon import _fft_lines as lines

    rng = np.random.default_rng(1)
    n, k, b = 64, 2, 7
    canvas = _complex(rng, 200, 180)
    corners = cp.asarray(rng.integers(0, 100, size=(b, 2)).astype(np.int32))
    probes = _complex(rng, b, k, n, n) if per_position else _complex(rng, k, n, n)
    _poison_pool()
    got = _exit_waves.exit_waves(canvas, corners, probes)
    host = corners.get()
    windows = cp.stack([canvas[y : y + n, x : x + n] for y, x in host])[:, None]
    want = windows * (probes if per_position else probes[None])
    assert not bool(cp.isnan(got).any())
    assert rel_diff(got, want) < STEP_TOL
    spectra = lines.exit_wave_spectra(canvas, corners, probes)
    assert not bool(cp.isnan(spectra).any())
    assert rel_diff(spectra, cp.fft.fft2(want)) < STEP_TOL


def test_sub_pixel_shifts_are_the_fourier_phase_ramps():
    from hxn_liveptycho.recon import _exit_waves

    rng = np.random.default_rng(2)
    n, k, b = 64, 3, 6
    ft = _complex(rng, k, n, n)
    frac = cp.asarray(rng.random((b, 2)).astype(np.float32))
    _poison_pool()
    table = _exit_waves.ramp_table(frac, n)
    got = _exit_waves.shift_spectra(ft, table, 0.5)
    f = np.fft.fftfreq(n)  # the ramp exp(-2 pi i f k) in the FFT's own frequency order
    fr = frac.get().astype(np.float64)
    ramp_y = np.exp(-2j * np.pi * fr[:, 0, None] * f[None])
    ramp_x = np.exp(-2j * np.pi * fr[:, 1, None] * f[None])
    want = 0.5 * ft.get()[None] * ramp_y[:, None, :, None] * ramp_x[:, None, None, :]
    assert not bool(cp.isnan(got).any())
    assert rel_diff(got, want) < 1e-4  # float32 phases against float64 ones


@pytest.mark.parametrize("k", [2, 3, 5])
def test_the_mode_unitary_is_the_reference_s_and_mixing_applies_it(k):
    from hxn_liveptycho.recon import _pass_end_kernels
    from hxn_liveptycho.recon._modes import orthogonalize_modes

    rng = np.random.default_rng(k)
    modes = _complex(rng, k, 32, 32)
    _poison_pool()
    u = _pass_end_kernels.mode_unitary(modes)
    _, want = orthogonalize_modes(modes, cp)
    assert not bool(cp.isnan(u).any())
    assert rel_diff(u, want) < 1e-4  # Jacobi rotations in double against the eigen-solver
    waves = _complex(rng, 4, k, 16, 16)
    expected = cp.einsum("ab,nbij->naij", u, waves)
    _pass_end_kernels.mix_modes(waves, u)
    assert rel_diff(waves, expected) < STEP_TOL


# ---- an update's sums -------------------------------------------------------------------
#: Modes of an update whose object sums are gathered by tile, and of one whose are not.
_TILED, _ATOMIC = 1, 4


def _update_inputs(rng: np.random.Generator, k: int, per_position: bool = False) -> tuple:
    """``(dpsi, probes, canvas, corners, box)`` of a batch of 9 overlapping 32² windows."""
    n, b = 32, 9
    canvas = _complex(rng, 120, 110)
    host = rng.integers(0, 70, size=(b, 2)).astype(np.int32)
    probes = _complex(rng, b, k, n, n) if per_position else _complex(rng, k, n, n)
    box = (int(host[:, 0].min()), int(host[:, 1].min()))
    box += (int(host[:, 0].max()) + n, int(host[:, 1].max()) + n)
    return _complex(rng, b, k, n, n), probes, canvas, cp.asarray(host), box


def _reference_sums(
    dpsi: Any, probes: Any, canvas: Any, corners: Any, box: tuple, weights: Any = None
) -> tuple[Any, Any, Any, Any]:
    """``(num, den, terms, power)`` of an update, window by window in plain CuPy: the object
    sums on ``box``, the probe terms ``conj(O_b) dpsi_bk`` and ``sum_b |O_b|^2``."""
    b, n = dpsi.shape[0], dpsi.shape[-1]
    p = probes if probes.ndim == 4 else cp.broadcast_to(probes, dpsi.shape)
    w = cp.ones(b, cp.float32) if weights is None else weights
    obj_num = (cp.conj(p) * dpsi).sum(axis=1) * w[:, None, None]
    illum = (cp.abs(p) ** 2).sum(axis=1)
    num = cp.zeros((box[2] - box[0], box[3] - box[1]), cp.complex64)
    den = cp.zeros(num.shape, cp.float32)
    for j, (y, x) in enumerate(corners.get() - np.array(box[:2])):
        num[y : y + n, x : x + n] += obj_num[j]
        den[y : y + n, x : x + n] += illum[j]
    windows = cp.stack([canvas[y : y + n, x : x + n] for y, x in corners.get()])
    return num, den, cp.conj(windows)[:, None] * dpsi, (cp.abs(windows) ** 2).sum(axis=0)


def _slots() -> Any:
    from hxn_liveptycho.recon._raw_kernels import SLOT_FLOATS

    return cp.zeros(SLOT_FLOATS, cp.float32)


def _tracked(slots: Any, of: Any) -> bool:
    """Whether the running-maximum ``slots`` hold the maximum of ``of``."""
    return abs(float(cp.max(slots)) - float(cp.max(of))) <= 1e-5 * float(cp.max(of))


@pytest.mark.parametrize("k", [_TILED, _ATOMIC])
@pytest.mark.parametrize("per_position", [False, True])
def test_object_sums_are_the_windows_sums(k, per_position):
    from hxn_liveptycho.recon._update_sums import TILE_MODES, ObjectSums, object_sums

    assert _TILED <= TILE_MODES < _ATOMIC
    rng = np.random.default_rng(10 + k + per_position)
    dpsi, probes, canvas, corners, box = _update_inputs(rng, k, per_position)
    weights = cp.asarray(rng.random(dpsi.shape[0]).astype(np.float32))
    want_num, want_den, _, _ = _reference_sums(dpsi, probes, canvas, corners, box, weights)
    _poison_pool()
    num = cp.empty(want_num.shape, cp.complex64)  # overwritten: what they held is not read
    den = cp.empty(want_den.shape, cp.float32)
    slots = _slots()
    sums = ObjectSums(num, den, box[:2], slots)
    object_sums(dpsi, probes, canvas, corners, sums, box=box, weights=weights, overwrite=True)
    assert not bool(cp.isnan(num).any()) and not bool(cp.isnan(den).any())
    assert rel_diff(num, want_num) < STEP_TOL and rel_diff(den, want_den) < STEP_TOL
    assert _tracked(slots, den)
    # Added into a canvas-wide pair (DM's overlap sums), no illumination: the ratio's numerator.
    whole = cp.ones(canvas.shape, cp.complex64)
    object_sums(dpsi, probes, canvas, corners, ObjectSums(whole))
    want = cp.ones(canvas.shape, cp.complex64)
    want[box[0] : box[2], box[1] : box[3]] += _reference_sums(dpsi, probes, canvas, corners, box)[0]
    assert rel_diff(whole, want) < STEP_TOL


@pytest.mark.parametrize("k", [_TILED, _ATOMIC])
def test_the_sums_of_a_whole_pixel_update_are_the_windows_sums(k):
    from hxn_liveptycho.recon._update_sums import ObjectSums, object_sums_and_probe_sum

    rng = np.random.default_rng(20 + k)
    dpsi, probes, canvas, corners, box = _update_inputs(rng, k)
    want_num, want_den, terms, want_power = _reference_sums(dpsi, probes, canvas, corners, box)
    _poison_pool()
    num, den = cp.empty(want_num.shape, cp.complex64), cp.empty(want_den.shape, cp.float32)
    into, power = cp.zeros(probes.shape, cp.complex64), cp.zeros(want_power.shape, cp.float32)
    den_max, power_max = _slots(), _slots()
    object_sums_and_probe_sum(
        dpsi,
        probes,
        canvas,
        corners,
        ObjectSums(num, den, box[:2], den_max),
        into=into,
        power=power,
        power_max=power_max,
        box=box,
        overwrite=True,
    )
    assert rel_diff(num, want_num) < STEP_TOL and rel_diff(den, want_den) < STEP_TOL
    assert rel_diff(into, terms.sum(axis=0)) < STEP_TOL and rel_diff(power, want_power) < STEP_TOL
    assert _tracked(den_max, den) and _tracked(power_max, power)


def test_the_sums_of_a_sub_pixel_update_are_the_windows_sums():
    from hxn_liveptycho.recon._update_sums import ObjectSums, object_sums_and_probe_terms

    rng = np.random.default_rng(30)
    dpsi, probes, canvas, corners, box = _update_inputs(rng, 2, per_position=True)
    want_num, want_den, want_terms, want_power = _reference_sums(dpsi, probes, canvas, corners, box)
    _poison_pool()
    num, den = cp.empty(want_num.shape, cp.complex64), cp.empty(want_den.shape, cp.float32)
    power = cp.zeros(want_power.shape, cp.float32)
    den_max, power_max = _slots(), _slots()
    terms = object_sums_and_probe_terms(
        dpsi,
        probes,
        canvas,
        corners,
        ObjectSums(num, den, box[:2], den_max),
        power=power,
        power_max=power_max,
        overwrite=True,
    )
    assert not bool(cp.isnan(terms).any())
    assert rel_diff(terms, want_terms) < STEP_TOL and rel_diff(power, want_power) < STEP_TOL
    assert rel_diff(num, want_num) < STEP_TOL and rel_diff(den, want_den) < STEP_TOL
    assert _tracked(den_max, den) and _tracked(power_max, power)


@pytest.mark.parametrize("k", [1, 3])
def test_the_probe_terms_alone_are_the_windows_terms(k):
    from hxn_liveptycho.recon._update_sums import add_probe_terms, probe_terms_with_power

    rng = np.random.default_rng(40 + k)
    dpsi, probes, canvas, corners, box = _update_inputs(rng, k)
    _, _, want_terms, want_power = _reference_sums(dpsi, probes, canvas, corners, box)
    _poison_pool()
    into = cp.ones(probes.shape, cp.complex64)  # added into
    power, power_max = cp.zeros(want_power.shape, cp.float32), _slots()
    add_probe_terms(dpsi, canvas, corners, into=into, power=power, power_max=power_max)
    assert rel_diff(into, 1 + want_terms.sum(axis=0)) < STEP_TOL
    assert rel_diff(power, want_power) < STEP_TOL and _tracked(power_max, power)
    terms = probe_terms_with_power(dpsi, probes, canvas, corners)
    windows = cp.stack([canvas[y : y + 32, x : x + 32] for y, x in corners.get()])
    assert not bool(cp.isnan(terms).any()) and terms.shape[1] == k + 1
    assert rel_diff(terms[:, :k], want_terms) < STEP_TOL
    assert rel_diff(terms[:, k], cp.abs(windows) ** 2) < STEP_TOL


@pytest.mark.parametrize("k", [_TILED, _ATOMIC])
@pytest.mark.parametrize("reg", [0.0, 0.1])
def test_the_window_ratio_is_the_sums_over_the_regularised_illumination(k, reg):
    from hxn_liveptycho.recon._update_sums import add_window_ratio

    rng = np.random.default_rng(50 + k)
    dpsi, probes, canvas, corners, box = _update_inputs(rng, k)
    weights = cp.asarray(rng.random(dpsi.shape[0]).astype(np.float32))
    num, den, _, _ = _reference_sums(dpsi, probes, canvas, corners, box, weights)
    den += 0.5  # no empty pixel: the ratio of an unregularised den stays finite
    want = canvas.copy()
    m = float(cp.max(den))
    want[box[0] : box[2], box[1] : box[3]] += num / cp.maximum((1 - reg) * (den + reg * m), 1e-30)
    add_window_ratio(canvas, dpsi, probes, corners, den, box=box, weights=weights, reg=reg)
    assert rel_diff(canvas, want) < STEP_TOL


def test_the_regularised_steps_are_the_xp_expressions():
    from hxn_liveptycho.recon._regularised import add_scaled, divide_regularised, regularised_step

    rng = np.random.default_rng(60)
    num, target = _complex(rng, 3, 40, 50), _complex(rng, 60, 70)
    den = cp.asarray(rng.random((40, 50)).astype(np.float32))
    regularised = cp.maximum(0.9 * (den + 0.1 * cp.max(den)), 1e-30)
    want = target.copy()
    want[5:45, 7:57] += 0.5 * num[0] / regularised
    regularised_step(target[5:45, 7:57], num[0].copy(), den, 0.1, 0.5)
    assert rel_diff(target, want) < STEP_TOL
    x = num.copy()
    assert divide_regularised(x, den, 0.1) is x
    assert rel_diff(x, num / regularised) < STEP_TOL
    add_scaled(x, num, cp.asarray(2.0, cp.float32))
    assert rel_diff(x, num / regularised + 2 * num) < STEP_TOL


def test_batch_sums_and_scaled_copies_are_the_xp_expressions():
    from hxn_liveptycho.recon._exit_waves import (
        batch_sum,
        ramp_table,
        scaled_copy,
        unshift_sum_spectra,
    )

    rng = np.random.default_rng(70)
    f = _complex(rng, 37, 3, 32, 32)
    _poison_pool()
    assert rel_diff(batch_sum(f), f.sum(axis=0)) < STEP_TOL
    assert rel_diff(scaled_copy(f, 0.25), 0.25 * f) < STEP_TOL
    table = ramp_table(cp.asarray(rng.random((37, 2)).astype(np.float32)), 32)
    ramps = table[:, 0, :, None] * table[:, 1, None, :]
    want = 0.5 * (f * cp.conj(ramps)[:, None]).sum(axis=0)
    assert rel_diff(unshift_sum_spectra(f, table, 0.5), want) < STEP_TOL


# ---- the whole solver --------------------------------------------------------------------
def _scan(window: int = 128) -> Any:
    from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample

    beamline = (
        SimulatedBeamline.for_window(window, x_num=12, y_num=12, photons_per_frame=5e5)
        if window != 128
        else SimulatedBeamline(x_num=12, y_num=12, photons_per_frame=5e5)
    )
    return SimulatedSample(beamline)


def _solver(sample: Any, xp: Any, fused: bool | None, **params: Any) -> Any:
    from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
    from hxn_liveptycho.recon.probe import initial_probe

    amplitudes = np.sqrt(sample.intensities).astype(np.float32)
    probe = initial_probe(amplitudes, footprint_px=3 * sample.beamline.step_px)
    canvas = tuple(s + 8 for s in sample.object.shape)
    solver = StreamingSolver(
        probe=xp.asarray(probe),
        canvas_shape=canvas,
        params=IterativeParams(**params),
        xp=xp,
        fused=fused,
    )
    solver.add(xp.asarray(amplitudes), sample.positions_px + 4)
    return solver


#: (algorithm, probe modes) -> tolerance after ITERATIONS: ePIE and LSQ-ML agree to
#: float32 rounding; DM with one mode amplifies rounding on its own (NumPy alone moves
#: its object by ~4e-4 under a 1e-7 change of the data). With three modes ePIE and LSQ-ML
#: add their probe sums with atomics in no fixed order, and the modes' orthogonalisation
#: (a rotation among modes of close power) magnifies that rounding in the probe, so runs
#: of the same settings differ by more than one mode's rounding; the objects still agree
#: to one mode's.
TOLERANCE = {
    ("epie", 1): 1e-5,
    ("epie", 3): 5e-5,
    ("lsqml", 1): 1e-5,
    ("lsqml", 3): 5e-5,
    ("dm", 1): 2e-3,
    ("dm", 3): 1e-4,
}
ITERATIONS = 12


@pytest.mark.parametrize(("algorithm", "modes"), sorted(TOLERANCE))
@pytest.mark.parametrize("subpixel", [True, False])
def test_the_fused_solver_matches_its_reference_on_the_gpu(algorithm, modes, subpixel):
    sample = _scan()
    if not subpixel:
        sample.positions_px[:] = np.round(sample.positions_px)
    params = {"algorithm": algorithm, "probe_modes": modes, "subpixel_positions": subpixel}
    fused = _solver(sample, cp, None, **params)
    reference = _solver(sample, cp, False, **params)
    assert fused._fused and not reference._fused
    fused.iterate(ITERATIONS)
    reference.iterate(ITERATIONS)
    tol = TOLERANCE[(algorithm, modes)]
    assert rel_diff(fused.object, reference.object) < tol
    assert rel_diff(fused.probe_modes, reference.probe_modes) < tol
    np.testing.assert_allclose(fused.error_history, reference.error_history, rtol=1e-3)


@pytest.mark.parametrize("algorithm", ["epie", "lsqml", "dm"])
def test_the_fused_solver_matches_numpy(algorithm):
    """NumPy is the project's reference path everywhere (CI runs it)."""
    sample = _scan()
    fused = _solver(sample, cp, None, algorithm=algorithm)
    numpy = _solver(sample, np, None, algorithm=algorithm)
    fused.iterate(ITERATIONS)
    numpy.iterate(ITERATIONS)
    assert rel_diff(fused.object, numpy.object) < TOLERANCE[(algorithm, 1)]


@pytest.mark.parametrize("window", [64, 256])
def test_the_solver_s_own_fft_sizes_match_the_reference(window):
    """n = 64 and 256 take the solver's own FFT with the modulus step folded in."""
    sample = _scan(window)
    fused = _solver(sample, cp, None, algorithm="epie")
    reference = _solver(sample, cp, False, algorithm="epie")
    assert fused._lines
    fused.iterate(ITERATIONS)
    reference.iterate(ITERATIONS)
    assert rel_diff(fused.object, reference.object) < 1e-5
