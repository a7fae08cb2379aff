"""The live quality figures on CuPy against their NumPy reference (``pytest -m gpu``).

The coverage and error maps, the per-position errors, the error of the state the
solver returns and the Fourier ring correlation are one implementation over ``xp``;
here the same inputs go through NumPy and CuPy and the results are compared.
Skipped, with the reason, where CuPy or a CUDA device is missing.
"""

from __future__ import annotations

import numpy as np
import pytest
from gpu_helpers import GPU_MARKS, cp, host, rel_diff
from recon_helpers import SimulatedScan

from hxn_liveptycho.recon import quality, resolution
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver

pytestmark = GPU_MARKS

#: Relative difference allowed between float32 results of the two array modules.
TOL = 1e-5


@pytest.fixture(scope="module")
def solved() -> tuple[SimulatedScan, StreamingSolver, StreamingSolver]:
    """The same scan solved on NumPy and on CuPy (reference path: the comparison is of the
    quality code, not of the solvers)."""
    scan = SimulatedScan()
    params = IterativeParams(algorithm="epie", probe_modes=2)
    solvers = []
    for xp in (np, cp):
        s = StreamingSolver(
            probe=xp.asarray(scan.probe_guess),
            canvas_shape=scan.canvas,
            params=params,
            xp=xp,
            fused=False if xp is cp else None,
        )
        s.add(xp.asarray(scan.amplitudes), scan.positions)
        s.iterate(5)
        solvers.append(s)
    return scan, solvers[0], solvers[1]


def test_maps_and_position_errors_match_numpy(solved):
    scan, ref, _ = solved
    modes = ref.probe_modes
    cov = quality.coverage(scan.positions, modes, scan.canvas)
    assert rel_diff(quality.coverage(scan.positions, cp.asarray(modes), scan.canvas), cov) < TOL
    amps = np.asarray(scan.amplitudes)
    errors = quality.position_fit(ref.object_modes, modes, ref.positions_px, amps).errors
    on_gpu = quality.position_fit(
        cp.asarray(ref.object_modes), cp.asarray(modes), ref.positions_px, cp.asarray(amps)
    ).errors
    assert rel_diff(on_gpu, errors) < 1e-4
    emap = quality.error_map(ref.positions_px, errors, modes, scan.canvas)
    gmap = quality.error_map(ref.positions_px, cp.asarray(errors), cp.asarray(modes), scan.canvas)
    assert rel_diff(gmap, emap) < TOL


def test_the_state_error_matches_numpy_on_the_same_state(solved):
    """CuPy's solver scores NumPy's state as NumPy does (the state copied across)."""
    _, ref, gpu = solved
    gpu.object_modes[...] = cp.asarray(ref.object_modes)
    gpu.probe_modes[...] = cp.asarray(ref.probe_modes)
    assert gpu.state_error() == pytest.approx(ref.state_error(), rel=1e-4)


def test_frc_matches_numpy(solved):
    _, ref, _ = solved
    a = np.asarray(ref.object)
    rng = np.random.default_rng(0)
    b = (a + 0.05 * (rng.normal(size=a.shape) + 1j * rng.normal(size=a.shape))).astype(np.complex64)
    mask = np.zeros(a.shape, bool)
    mask[8:-8, 8:-8] = True
    on_cpu = resolution.frc(a, b, 1e-8, mask)
    on_gpu = resolution.frc(cp.asarray(a), cp.asarray(b), 1e-8, mask, xp=cp)
    got = (host(on_gpu.frequencies_per_m), host(on_gpu.values))
    np.testing.assert_allclose(got[0], on_cpu.frequencies_per_m, rtol=1e-6)
    np.testing.assert_allclose(got[1], on_cpu.values, atol=1e-4)
