"""One scan over 2 and 4 MPI ranks (mpiexec, OpenMPI; NumPy on the CPU) reaches the
single-rank result on the same data.

Each launch runs tests/mpi_ranks_run.py on a 10 x 10 simulated scan (32-pixel frames,
Poisson noise) for several solver settings; the single-rank references run here, in the
test process, through the same code. Stated tolerances:

* DM (the ranks sum the overlap projection's numerators and weights): the data error, the
  object's error against the phantom and the object itself within 1 % of the single
  rank's (measured: 0.2 %; the sums' float32 rounding differs, and DM's Fourier step
  takes the phase of rounding noise where the model's far field is zero, so the first
  passes differ more than the last).
* ePIE and LSQ-ML (each rank sweeps its region; merged at the pass end): the data error
  within 25 % and the object's error within 1.5x of the single rank's. Per pass, R ranks
  update like one rank with R times the batch (docs/scaling.md).
* Position refinement across ranks: the data error within 25 % of the single rank's and
  the positions' error below 80 % of the measured positions' error.
* Streaming (frames in acquisition order, in chunks, each rank adding its share between
  passes): within 25 % of the single rank fed the same way and 30 % of the single rank's
  batch result.
* Every rank ends with the same object and probe, bit for bit; each frame went to one rank.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import mpi_ranks_run as run
import numpy as np
import pytest

from hxn_liveptycho.recon import ranks as rk
from hxn_liveptycho.recon._rank_comms import _packed, _unpack
from hxn_liveptycho.sim import phantom

SCRIPT = Path(run.__file__)
OPR = "epie-opr"  # the variable probe: its own scan (a drifting probe) and passes
OPR_PASSES = 60
ALL = [c for c in run.CASES if c != OPR]
REFINED = ["lsqml-positions", "epie-positions-affine"]
STREAMED = ["epie", "lsqml", "dm"]


def mpiexec(
    ranks: int, cases: list[str], out: Path, *, stream: bool = False, extra: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run the cases on ``ranks`` MPI ranks (``extra``: more arguments of the script); rank
    0's results by case, each with its final object under ``"object"``."""
    launcher = shutil.which("mpiexec")
    assert launcher, "mpiexec (OpenMPI: Debian's openmpi-bin) is not installed"
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    if os.geteuid() == 0:  # OpenMPI refuses root unless told twice (CI containers)
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    command = [launcher, "-n", str(ranks), "--oversubscribe", sys.executable, str(SCRIPT)]
    command += ["--case", *cases, "--out", str(out)] + (["--stream"] if stream else [])
    done = subprocess.run([*command, *extra], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    for case in cases:
        results[case]["object"] = np.load(out.with_suffix(f".{case}.npy"))
    return dict(results)


@pytest.fixture(scope="module")
def single() -> dict[tuple[str, bool], dict[str, Any]]:
    """The single-rank results, batch and streamed, of every case."""
    results = {}
    for case in ALL:
        scan = run.Scan(case)
        for stream in (False, True):
            if stream and case not in STREAMED:
                continue
            s, positions = run.solve(scan, case, None, stream=stream)
            results[case, stream] = run.outcome(scan, s, positions)
            results[case, stream]["object"] = s.object.copy()
    return results


@pytest.fixture(scope="module", params=[2, 4], ids=["2-ranks", "4-ranks"])
def ranks(request: pytest.FixtureRequest) -> int:
    return int(request.param)


@pytest.fixture(scope="module")
def batch(ranks: int, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    cases = [c for c in ALL if c not in REFINED]
    return mpiexec(ranks, cases, tmp_path_factory.mktemp("batch") / "result.json")


@pytest.fixture(scope="module")
def refined(ranks: int, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return mpiexec(ranks, REFINED, tmp_path_factory.mktemp("refined") / "result.json")


@pytest.fixture(scope="module")
def streamed(ranks: int, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("stream") / "result.json"
    return mpiexec(ranks, STREAMED, out, stream=True)


def relative_difference(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    """``|a - b| / |b|`` over ``mask`` (``b`` the reference)."""
    return float(np.linalg.norm((a - b)[mask]) / np.linalg.norm(b[mask]))


def check_ranks_agree(result: dict[str, Any], ranks: int) -> None:
    assert len(result["ranks"]) == ranks
    assert len({r["digest"] for r in result["ranks"]}) == 1, "the ranks' objects differ"
    frames = [r["frames"] for r in result["ranks"]]
    assert sum(frames) == run.SIDE * run.SIDE and min(frames) > 0, frames


@pytest.mark.parametrize("case", ["dm", "dm-modes2"])
def test_dm_over_ranks_is_the_single_rank_pass(
    case: str, ranks: int, batch: dict[str, Any], single: dict
) -> None:
    """DM summed over the ranks gives the single rank's errors within 1 % and its object
    within 1 % (relative norm of the difference over the illuminated region)."""
    got, want = batch[case], single[case, False]
    check_ranks_agree(got, ranks)
    assert got["state_error"] == pytest.approx(want["state_error"], rel=0.01)
    assert got["object_error"] == pytest.approx(want["object_error"], rel=0.01)
    assert relative_difference(got["object"], want["object"], run.Scan(case).mask) < 0.01


def test_dm_over_ranks_is_the_single_rank_pass_to_float32_rounding(
    ranks: int, tmp_path: Path
) -> None:
    """Over the first passes, before DM's own sensitivity to rounding grows, the ranks'
    DM object is the single rank's to float32 rounding (the sums' order is all that
    differs): within 1e-4, one and two probe modes."""
    cases = ["dm", "dm-modes2"]
    got = mpiexec(ranks, cases, tmp_path / "short.json", extra=("--passes", "3"))
    for case in cases:
        scan = run.Scan(case)
        one, _ = run.solve(scan, case, None, stream=False, passes=3)
        check_ranks_agree(got[case], ranks)
        assert relative_difference(got[case]["object"], one.object, scan.mask) < 1e-4


@pytest.mark.parametrize("case", ["epie", "lsqml", "epie-modes2"])
def test_sequential_solvers_merged_per_pass_reach_the_single_rank_error(
    case: str, ranks: int, batch: dict[str, Any], single: dict
) -> None:
    """ePIE and LSQ-ML (probe modes too) merged at each pass end: data error within 25 %,
    object error against the phantom within 1.5x of the single rank's."""
    got, want = batch[case], single[case, False]
    check_ranks_agree(got, ranks)
    assert got["state_error"] <= 1.25 * want["state_error"]
    assert got["object_error"] <= 1.5 * want["object_error"]
    assert got["errors"][-1] < 0.1 * got["errors"][0]  # it converged, not just stayed


@pytest.mark.parametrize("case", REFINED)
def test_position_refinement_across_ranks_moves_positions_towards_the_truth(
    case: str, ranks: int, refined: dict[str, Any], single: dict
) -> None:
    """Refinement gathered over the ranks (free, and the global affine+drift model) lowers
    the position error below 80 % of the measured one; data error within 25 %; the
    snapshot's global model, fitted to all ranks' positions, shrinks the encoders' scale."""
    got, want = refined[case], single[case, False]
    check_ranks_agree(got, ranks)
    assert got["position_error_px"] < 0.8 * got["measured_position_error_px"]
    assert want["position_error_px"] < 0.8 * want["measured_position_error_px"]
    assert got["state_error"] <= 1.25 * want["state_error"]
    if case.endswith("affine"):  # the snapshot's model is fitted to every rank's positions
        # (the encoders' scale is 1.03: the fit moves from 1 towards 1 / 1.03)
        assert all(1 / 1.03 - 0.01 < scale < 0.999 for scale in got["model_scale"])
        assert all(1 / 1.03 - 0.01 < scale < 0.999 for scale in want["model_scale"])


@pytest.mark.parametrize("case", STREAMED)
def test_frames_streamed_across_ranks_reach_the_batch_error(
    case: str, ranks: int, streamed: dict[str, Any], single: dict
) -> None:
    """Frames fed in acquisition order, each rank adding its share of every chunk between
    passes: within 25 % of one rank fed alike and 30 % of one rank's batch result."""
    got = streamed[case]
    check_ranks_agree(got, ranks)
    assert got["state_error"] <= 1.25 * single[case, True]["state_error"]
    assert got["state_error"] <= 1.30 * single[case, False]["state_error"]


@pytest.mark.parametrize("stream", [False, True], ids=["batch", "streamed"])
def test_variable_probe_over_ranks_reaches_the_single_rank_fit(
    stream: bool, ranks: int, tmp_path: Path
) -> None:
    """OPR over the ranks, on a scan whose probe drifts in scan order: the ranks agree,
    the data error is within 10 % of the single rank's OPR and below the single rank's
    fixed probe (the variable probe still pays), and the snapshot's weights cover every
    position in scan order and follow the drift as the single rank's do."""
    scan = run.Scan(OPR)
    one, positions = run.solve(scan, OPR, None, stream=stream, passes=OPR_PASSES)
    want = run.outcome(scan, one, positions)
    fixed, positions = run.solve(scan, "epie", None, stream=stream, passes=OPR_PASSES)
    fixed_error = run.outcome(scan, fixed, positions)["state_error"]
    extra = ("--passes", str(OPR_PASSES))
    got = mpiexec(ranks, [OPR], tmp_path / "opr.json", stream=stream, extra=extra)[OPR]
    check_ranks_agree(got, ranks)
    assert got["state_error"] <= 1.1 * want["state_error"]
    assert got["state_error"] < fixed_error
    assert got["opr_rows"] == run.SIDE * run.SIDE
    assert got["opr_drift_correlation"] > 0.7 and want["opr_drift_correlation"] > 0.7


def test_ranks_get_compact_regions_of_equal_size() -> None:
    """Four ranks of a 20 x 20 raster get a 2 x 2 grid of blocks of 100 positions, each
    block's bounding box a quarter of the scan's; with the scan's extent given, the rank of
    a position does not depend on which chunk it arrived in."""
    positions = phantom.scan_positions(20, 20, 4.0, jitter_px=0.3, rng=5)
    labels = rk.assign_ranks(positions, 4)
    assert np.bincount(labels).tolist() == [100, 100, 100, 100]
    scan_area = np.prod(np.ptp(positions, axis=0))
    for r in range(4):
        block = positions[labels == r]
        assert np.prod(np.ptp(block, axis=0)) < 0.3 * scan_area
    extent = (positions.min(axis=0), positions.max(axis=0))
    whole = rk.assign_ranks(positions, 4, extent=extent)
    chunked = np.concatenate(
        [rk.assign_ranks(p, 4, extent=extent) for p in np.array_split(positions, 7)]
    )
    assert np.array_equal(whole, chunked)
    assert np.bincount(whole).min() >= 80
    assert rk.grid_shape(2) == (2, 1) and rk.grid_shape(6) == (3, 2)


def test_one_rank_communicator_leaves_the_solver_bit_identical() -> None:
    """The solver with an explicit one-rank communicator computes exactly what it computes
    without one (every meeting point returns at once)."""
    scan = run.Scan("lsqml-positions")
    results = []
    for comm in (None, rk.OneRank()):
        s, positions = run.solve(scan, "lsqml-positions", comm, stream=True, passes=10)
        results.append((s.object_modes.tobytes(), s.probe_modes.tobytes(), positions))
    assert results[0][0] == results[1][0] and results[0][1] == results[1][1]
    assert np.array_equal(results[0][2], results[1][2])


def test_packed_sums_keep_every_array_and_its_alignment() -> None:
    """The buffer one reduction sends holds each array (odd sizes, complex after float) and
    writes each back unchanged; every complex array starts 8-byte aligned."""
    arrays = (
        np.arange(3, dtype=np.float32),
        (np.arange(5) + 1j * np.arange(5)).astype(np.complex64).reshape(5, 1),
        np.float32(7.0) * np.ones((), dtype=np.float32),
        np.ones((3, 3), dtype=np.complex64) * (2 - 1j),
    )
    buffer = _packed(arrays, np)
    # 3 floats (+1 pad), 5 complex, 1 float (+1 pad), 9 complex: each complex at an even float.
    assert buffer.dtype == np.float32 and buffer.size == 4 + 10 + 2 + 18
    copies = tuple(np.zeros_like(a) for a in arrays)
    _unpack(buffer, copies)
    for a, c in zip(arrays, copies, strict=True):
        assert c.dtype == a.dtype and c.shape == a.shape and np.array_equal(a, c)
    with pytest.raises(TypeError, match="float64"):
        _packed((np.zeros(2),), np)


def test_merging_after_every_batch_reaches_the_single_rank_error(
    single: dict, tmp_path: Path
) -> None:
    """2 ranks merging ePIE / LSQ-ML after every batch (one global batch of both ranks'
    batches; these cases' batch of 16 gives each rank 4 a pass) keep the tolerances of the
    pass-end merge, and refinement still moves the positions towards the truth."""
    got = mpiexec(2, REFINED, tmp_path / "every.json", extra=("--merge-every", "1"))
    for case in REFINED:
        check_ranks_agree(got[case], 2)
        assert got[case]["state_error"] <= 1.25 * single[case, False]["state_error"]
        assert got[case]["position_error_px"] < 0.8 * got[case]["measured_position_error_px"]


JOIN_CHECK = """
from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.recon import ranks as rk
from hxn_liveptycho.recon._rank_comms import _packed, _unpack
for settings in (rk.RankSettings(gpus=[0, 1]), rk.RankSettings(comm="nccl")):
    try:
        rk.join(settings)
    except ConfigurationError as exc:
        print("refused:", exc)
group, xp = rk.join(rk.RankSettings(merge_every=2))
print("joined:", group.size, group.merge_every, xp.__name__, type(group.comm).__name__)
"""


def test_rank_settings_refuse_gpus_that_do_not_match_the_ranks() -> None:
    """Joining one MPI rank (a singleton, in its own process) with two GPUs named, or with
    NCCL and no GPU, is refused with the reason; on the CPU it joins through MPI."""
    env = dict(os.environ)
    if os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    done = subprocess.run(
        [sys.executable, "-c", JOIN_CHECK], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert lines == [
        "refused: 2 GPU(s) named for 1 rank(s): name one per rank",
        "refused: NCCL needs a GPU of its own for every rank",
        "joined: 1 2 numpy MpiRanks",
    ]
    with pytest.raises(ValueError, match="merge_every"):
        rk.RankSettings(merge_every=-1)
