"""The variable probe (OPR, recon.opr) on a fly scan whose probe drifts along the scan."""

from __future__ import annotations

import numpy as np
import pytest
from recon_helpers import N, use_cupy_stand_in

from hxn_liveptycho.recon._positions import fraction_ramps
from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.recon.metrics import illuminated_mask, object_error
from hxn_liveptycho.sim import optics, phantom

ITERATIONS = 80


class DriftingProbeScan:
    """A 15 x 15 scan (sub-pixel jitter, 1e6 photons/frame, Poisson) whose probe moves
    linearly, in frame order, from one zone-plate-like probe to another of a smaller
    footprint and the same power: ``P_j = (1 - t_j) A + t_j B``, ``t`` from 0 to 1.
    The solver starts from the nominal probe of the other tests' scan."""

    def __init__(self) -> None:
        lam = optics.wavelength_m(12.0)
        dx = optics.sample_pixel_size_m(lam, 0.5, N, 75e-6)
        first = optics.make_probe(N, pixel_size_m=dx, wavelength_m=lam, rng=1)
        last = optics.make_probe(N, pixel_size_m=dx, wavelength_m=lam, rng=7, footprint_px=22)
        last *= np.sqrt(np.sum(np.abs(first) ** 2) / np.sum(np.abs(last) ** 2))
        self.probe_guess = optics.make_probe(N, pixel_size_m=dx, wavelength_m=lam, footprint_px=29)
        self.positions = phantom.scan_positions(15, 15, 5.0, jitter_px=0.5, rng=2) + 4
        top = self.positions.max(axis=0)
        self.canvas = (int(top[0]) + N + 6, int(top[1]) + N + 6)
        self.obj = phantom.make_object(self.canvas)
        self.drift = np.linspace(0.0, 1.0, len(self.positions))
        probes = (1 - self.drift)[:, None, None] * first + self.drift[:, None, None] * last
        corners = np.floor(self.positions).astype(int)
        ramps = fraction_ramps(self.positions - corners, N, np)
        shifted = np.fft.ifft2(np.fft.fft2(probes) * ramps)
        windows = np.stack([self.obj[y : y + N, x : x + N] for y, x in corners])
        far = np.fft.fftshift(np.fft.fft2(shifted * windows), axes=(-2, -1))
        expected = np.abs(far) ** 2
        expected *= 1e6 / expected.sum(axis=(1, 2)).mean()
        counts = np.random.default_rng(3).poisson(expected)
        self.amplitudes = np.sqrt(counts).astype(np.float32)
        self.mask = illuminated_mask(self.positions, first, self.canvas)

    def solve(self, iterations: int = ITERATIONS, **params: object) -> StreamingSolver:
        solver = StreamingSolver(
            probe=self.probe_guess, canvas_shape=self.canvas, params=IterativeParams(**params)
        )
        solver.add(self.amplitudes, self.positions)
        solver.iterate(iterations)
        return solver

    def object_error(self, solver: StreamingSolver) -> float:
        return object_error(self.obj, solver.snapshot()["object"], self.mask)


@pytest.fixture(scope="module")
def scan() -> DriftingProbeScan:
    return DriftingProbeScan()


def test_opr_beats_fixed_modes_on_a_drifting_probe(scan: DriftingProbeScan) -> None:
    """OPR lowers the data error and the object error against one probe and against two
    incoherent modes from the same start, and its weights follow the drift."""
    fixed = [scan.solve(), scan.solve(probe_modes=2)]
    opr = scan.solve(opr_modes=2)
    fixed_data = min(s.state_error() for s in fixed)
    fixed_object = min(scan.object_error(s) for s in fixed)
    assert opr.state_error() < 0.6 * fixed_data
    assert scan.object_error(opr) < 0.85 * fixed_object
    snap = opr.snapshot()
    weights, probes = snap["opr_weights"], snap["opr_probes"]
    assert isinstance(weights, np.ndarray) and isinstance(probes, np.ndarray)
    assert weights.shape == (len(scan.positions), 2) and probes.shape == (2, N, N)
    np.testing.assert_array_equal(weights[:, 0], 1.0)
    np.testing.assert_array_equal(probes[0], snap["probe"])
    # The eigen-probe's sign is free: the weights follow the drift up to it.
    assert abs(np.corrcoef(weights[:, 1], scan.drift)[0, 1]) > 0.9


def test_opr_streams_and_combines_with_incoherent_modes(scan: DriftingProbeScan) -> None:
    """Positions added while iterating get weights, and OPR rides on the first of two
    incoherent modes."""
    solver = StreamingSolver(
        probe=scan.probe_guess,
        canvas_shape=scan.canvas,
        params=IterativeParams(opr_modes=3, probe_modes=2, probe_update_start=0),
    )
    half = len(scan.positions) // 2
    solver.add(scan.amplitudes[:half], scan.positions[:half])
    solver.iterate(2)
    assert solver.snapshot()["opr_weights"].shape == (half, 3)
    solver.add(scan.amplitudes[half:], scan.positions[half:])
    solver.iterate(3)
    snap = solver.snapshot(state_error=True)
    probes = snap["opr_probes"]
    assert snap["opr_weights"].shape == (len(scan.positions), 3)
    assert snap["probe_modes"].shape == (2, N, N)
    assert np.isfinite(snap["state_error"]) and snap["state_error"] < 0.1
    # Each pass's end leaves the variable part with zero mean over the scan and its
    # eigen-probes orthogonal (real part) to each other.
    np.testing.assert_allclose(snap["opr_weights"][:, 1:].mean(axis=0), 0.0, atol=1e-6)
    overlap = np.vdot(probes[1], probes[2]).real
    assert abs(overlap) < 1e-4 * np.vdot(probes[1], probes[1]).real


def test_opr_off_reports_nothing(scan: DriftingProbeScan) -> None:
    """With OPR off the snapshot has no OPR entries."""
    snap = scan.solve(iterations=1).snapshot()
    assert "opr_weights" not in snap and "opr_probes" not in snap


@pytest.mark.parametrize(
    "params",
    [
        {"opr_modes": 2, "algorithm": "lsqml"},
        {"opr_modes": 2, "algorithm": "dm"},
        {"opr_modes": 2, "schedule": [("epie", 0.5), ("lsqml", 0.5)]},
        {"opr_modes": 2, "object_modes": 2},
        {"opr_modes": 1},
    ],
)
def test_opr_refuses_what_it_does_not_support(params: dict) -> None:
    """Other algorithms, several object modes and a lone eigen-probe are refused."""
    with pytest.raises(ValueError, match="opr_modes"):
        IterativeParams(**params)


def test_opr_takes_the_reference_path_on_a_fused_solver(
    scan: DriftingProbeScan, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a solver that fuses (a recording CuPy stand-in), OPR's batches launch none of
    the fused update kernels: its per-position probes take the reference expressions."""
    _, cp, launches = use_cupy_stand_in(monkeypatch)
    solver = StreamingSolver(
        probe=cp.asarray(scan.probe_guess),
        canvas_shape=scan.canvas,
        params=IterativeParams(opr_modes=2, probe_update_start=0),
        xp=cp,
    )
    assert solver._fused
    with np.errstate(all="ignore"):  # the stand-in's kernels are no-ops: garbage arrays
        solver.add(cp.asarray(scan.amplitudes), scan.positions)
        launches.clear()
        solver.iterate(2)
    names = {launch[0] for launch in launches}
    fused_updates = {"tile_sums", "window_sums", "probe_sums", "regularised_step"}
    assert not {f"liveptycho_{k}" for k in fused_updates} & names
    assert not any("<" in name for name in names)  # nor the solver's own FFT


def test_position_errors_judge_each_position_by_its_own_probe(scan: DriftingProbeScan) -> None:
    """With OPR the live per-position errors use each position's own probe: weighted by
    each frame's power they add up to the solver's state error, which the shared probe's
    errors overstate on a drifting probe."""
    from hxn_liveptycho.recon.opr import position_probes
    from hxn_liveptycho.recon.quality import QualitySettings, position_fit
    from hxn_liveptycho.recon.worker_child import quality_snapshot

    solver = scan.solve(iterations=20, opr_modes=2)
    params = solver.params
    errors = quality_snapshot(solver, params, QualitySettings())["position_errors"]
    power = (scan.amplitudes.astype(np.float64) ** 2).sum(axis=(1, 2))
    state = solver.state_error()
    assert float((errors * power).sum() / power.sum()) == pytest.approx(state, rel=1e-4)

    own = position_probes(solver)
    assert own is not None
    whole = own(slice(0, len(scan.positions)))
    assert whole.shape == (len(scan.positions), N, N)
    as_array = position_fit(
        solver.object_modes,
        solver.probe_modes,
        solver.positions_px,
        scan.amplitudes,
        batch_size=7,
        position_probes=whole,
    ).errors
    np.testing.assert_allclose(as_array, errors, rtol=1e-4)
    shared = position_fit(
        solver.object_modes, solver.probe_modes, solver.positions_px, scan.amplitudes
    ).errors
    assert float((shared * power).sum() / power.sum()) > 1.2 * state
    assert position_probes(scan.solve(iterations=1)) is None
