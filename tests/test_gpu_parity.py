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


def _cupy() -> Any:
    try:
        import cupy

        return cupy if cupy.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


cp = _cupy()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(cp is None, reason="needs CuPy and a CUDA device (pytest -m gpu)"),
]

#: Relative difference a float32 kernel may have from its float32 reference.
STEP_TOL = 2e-5


def _rel(a: Any, b: Any) -> float:
    a, b = (np.asarray(x.get() if hasattr(x, "get") else x) for x in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


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
    assert _rel(lines.fft2(x.copy()), want) < STEP_TOL
    back = cp.fft.ifft2(x) * (n * n)
    assert _rel(lines.ifft2_unscaled(x.copy()), back) < STEP_TOL


@pytest.mark.parametrize("per_position", [False, True])
def test_exit_waves_and_their_spectra_are_the_windows_times_the_probes(per_position):
    from hxn_liveptycho.recon import _fft_lines as lines
    from hxn_liveptycho.recon import _fused

    rng = np.random.default_rng(1)
    n, k, b = 64, 2, 7
    canvas = _complex(rng, 200, 180)
    corners = cp.asarray(rng.integers(0, 100, size=(b, 2)).astype(np.int32))
    probes = _complex(rng, b, k, n, n) if per_position else _complex(rng, k, n, n)
    _poison_pool()
    got = _fused.exit_waves(canvas, corners, probes)
    host = corners.get()
    windows = cp.stack([canvas[y : y + n, x : x + n] for y, x in host])[:, None]
    want = windows * (probes if per_position else probes[None])
    assert not bool(cp.isnan(got).any())
    assert _rel(got, want) < STEP_TOL
    spectra = lines.exit_wave_spectra(canvas, corners, probes)
    assert not bool(cp.isnan(spectra).any())
    assert _rel(spectra, cp.fft.fft2(want)) < STEP_TOL


def test_sub_pixel_shifts_are_the_fourier_phase_ramps():
    from hxn_liveptycho.recon import _fused

    rng = np.random.default_rng(2)
    n, k, b = 64, 3, 6
    ft = _complex(rng, k, n, n)
    frac = cp.asarray(rng.random((b, 2)).astype(np.float32))
    _poison_pool()
    table = _fused.ramp_table(frac, n)
    got = _fused.shift_spectra(ft, table, 0.5)
    f = np.fft.fftfreq(n)  # the ramp exp(-2 pi i f k) in the FFT's own frequency order
    fr = frac.get().astype(np.float64)
    ramp_y = np.exp(-2j * np.pi * fr[:, 0, None] * f[None] * n)
    ramp_x = np.exp(-2j * np.pi * fr[:, 1, None] * f[None] * n)
    want = 0.5 * ft.get()[None] * ramp_y[:, None, :, None] * ramp_x[:, None, None, :]
    assert not bool(cp.isnan(got).any())
    assert _rel(got, want) < 1e-4  # float32 phases against float64 ones


@pytest.mark.parametrize("k", [2, 3, 5])
def test_the_mode_unitary_is_the_reference_s_and_mixing_applies_it(k):
    from hxn_liveptycho.recon import _fused
    from hxn_liveptycho.recon._modes import orthogonalize_modes

    rng = np.random.default_rng(k)
    modes = _complex(rng, k, 32, 32)
    _poison_pool()
    u = _fused.mode_unitary(modes)
    _, want = orthogonalize_modes(modes, cp)
    assert not bool(cp.isnan(u).any())
    assert _rel(u, want) < 1e-4  # Jacobi rotations in double against the eigen-solver
    waves = _complex(rng, 4, k, 16, 16)
    expected = cp.einsum("ab,nbij->naij", u, waves)
    _fused.mix_modes(waves, u)
    assert _rel(waves, expected) < STEP_TOL


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
#: its object by ~4e-4 under a 1e-7 change of the data).
TOLERANCE = {
    ("epie", 1): 1e-5,
    ("epie", 3): 1e-5,
    ("lsqml", 1): 1e-5,
    ("lsqml", 3): 1e-5,
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
    assert _rel(fused.object, reference.object) < tol
    assert _rel(fused.probe_modes, reference.probe_modes) < tol
    np.testing.assert_allclose(fused.error_history, reference.error_history, rtol=1e-3)


@pytest.mark.parametrize("algorithm", ["epie", "lsqml", "dm"])
def test_the_fused_solver_matches_numpy(algorithm):
    """NumPy is the project's reference path everywhere (CI runs it)."""
    sample = _scan()
    fused = _solver(sample, cp, None, algorithm=algorithm)
    numpy = _solver(sample, np, None, algorithm=algorithm)
    fused.iterate(ITERATIONS)
    numpy.iterate(ITERATIONS)
    assert _rel(fused.object, numpy.object) < TOLERANCE[(algorithm, 1)]


@pytest.mark.parametrize("window", [64, 256])
def test_the_solver_s_own_fft_sizes_match_the_reference(window):
    """n = 64 and 256 take the solver's own FFT with the modulus step folded in."""
    sample = _scan(window)
    fused = _solver(sample, cp, None, algorithm="epie")
    reference = _solver(sample, cp, False, algorithm="epie")
    assert fused._lines
    fused.iterate(ITERATIONS)
    reference.iterate(ITERATIONS)
    assert _rel(fused.object, reference.object) < 1e-5
