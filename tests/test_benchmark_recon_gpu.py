"""``benchmarks/recon_gpu.py`` end to end on CPU: its cases, report and tables.

The GPU benchmark runs only on a lent machine, minutes at a time, so an error in its
own bookkeeping (which cases it plans, what it writes) costs a call. Here it runs on
NumPy solvers behind a stand-in for CuPy, and pty-chi's side is a stand-in too: what is
checked is the script, not the GPU's figures.
"""

from __future__ import annotations

import importlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def stand_in_cupy(used_bytes: int) -> types.ModuleType:
    """The few CuPy names the benchmark itself touches (the solvers run on NumPy)."""

    class MemoryHook:
        def __enter__(self) -> MemoryHook:
            return self

        def __exit__(self, *_: object) -> None:
            pass

    class NotAnArray:  # no array is a CuPy array here
        pass

    pool = types.SimpleNamespace(
        free_all_blocks=lambda: None,
        total_bytes=lambda: 3 * used_bytes,
        used_bytes=lambda: used_bytes,
    )
    cp = types.ModuleType("cupy")
    cp.__version__ = "stand-in"
    cp.ndarray = NotAnArray
    cp.get_default_memory_pool = lambda: pool
    cp.cuda = types.SimpleNamespace(
        MemoryHook=MemoryHook,
        Device=lambda *_: types.SimpleNamespace(synchronize=lambda: None),
        runtime=types.SimpleNamespace(getDeviceProperties=lambda _: {"name": b"stand-in"}),
    )
    return cp


#: These two run the benchmark's demo-size parity case (400 frames of 128², 20 iterations on
#: each side) on NumPy: they check the script's bookkeeping, not the package, at a minute of
#: CPU or more on two cores. ``pytest -m slow`` (and .ci/run) runs them.
_LONG = pytest.mark.slow


@_LONG
def test_recon_gpu_plans_times_and_reports_every_case(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setitem(sys.modules, "cupy", stand_in_cupy(used_bytes=1000))
    recon_gpu = importlib.import_module("benchmarks.recon_gpu")
    versus = importlib.import_module("benchmarks.recon_vs_ptychi")
    on_numpy = recon_gpu.make_solver
    monkeypatch.setattr(recon_gpu, "make_solver", lambda s, _xp, p: on_numpy(s, np, p))
    monkeypatch.setattr(recon_gpu, "copy_bandwidth", lambda _cp: 4e12)
    compared: list[tuple] = []

    def ours(sample: object, probe: np.ndarray, algorithm: str, *rest: object) -> dict:
        compared.append((algorithm, probe.shape[0], *rest))
        return {"s_per_epoch": 0.01, "error": 0.3}

    monkeypatch.setattr(versus, "run_ours", ours)
    monkeypatch.setattr(versus, "run_ptychi", lambda *_: {"s_per_epoch": 0.2, "error": 0.4})
    out = tmp_path / "report.json"
    argv = ["recon_gpu.py", "--iterations", "1", "--rounds", "2", "--no-reference"]
    argv += ["--algorithms", "epie", "--modes", "1", "--sides", "3", "--whole-pixel-big"]
    argv += ["--whole-pixel-parity", "--momentum-gains", "0", "0.1", "--ptychi-epochs", "3"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])

    recon_gpu.main()

    report = json.loads(out.read_text())
    assert [r["case"] for r in report["results"]] == [
        "demo 400x128^2 epie K=1 whole-pixel",
        "9x256^2 epie K=1 momentum 0",
        "9x256^2 epie K=1 momentum 0 whole-pixel",
        "9x256^2 epie K=1 momentum 0.1",
        "9x256^2 epie K=1 momentum 0.1 whole-pixel",
    ]
    for r in report["results"]:
        rounds = r["gpu_rounds_s_per_iteration"]
        assert len(rounds) == 2 and all(s > 0 for s in rounds)
        assert r["gpu_s_per_iteration"] == pytest.approx(float(np.median(rounds)))
        # Everything is issued before the round ends (NumPy here: issued is done).
        assert len(r["host_enqueued_fraction"]) == 2
        assert all(0 < f <= 1 for f in r["host_enqueued_fraction"])
        for kind, floor in r["floor_s"].items():
            assert floor == pytest.approx(r["floor_bytes"][kind] / 4e12)
            assert r["ratio_to_floor"][kind] == pytest.approx(r["gpu_s_per_iteration"] / floor)
        assert r["gpu_resident_bytes"] == 1000 and r["gpu_peak_used_bytes"] >= 1000
    parity = report["results"][0]
    assert parity["parity_rel_diff_20"] == 0.0  # both sides NumPy here
    assert parity["parity_error_numpy_20"] == parity["parity_error_cupy_20"] < 0.5
    # pty-chi's side: one row per algorithm and mode count, on the big case's own data.
    assert compared == [("epie", 1, 3, 96, 0.1)]  # epochs, batch, momentum gain
    (row,) = report["ptychi"]
    assert row["positions"] == 9 and row["speedup"] == pytest.approx(20.0)
    printed = capsys.readouterr().out
    assert "| 9x256^2 epie K=1 momentum 0.1 whole-pixel |" in printed
    assert "| 9 | epie | 1 | 0.0100 | 0.2000 | 20.0x | 0.300 | 0.400 |" in printed


@_LONG
def test_recon_gpu_runs_object_modes_on_the_reference_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--object-modes 2``: the parity case carries them (named ``M=2``) and its floor
    counts an exit wave per probe-object pair."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setitem(sys.modules, "cupy", stand_in_cupy(used_bytes=1000))
    recon_gpu = importlib.import_module("benchmarks.recon_gpu")
    on_numpy = recon_gpu.make_solver
    made: list = []

    def make(sample: object, _xp: object, params: object) -> object:
        made.append(params)
        return on_numpy(sample, np, params)

    monkeypatch.setattr(recon_gpu, "make_solver", make)
    monkeypatch.setattr(recon_gpu, "copy_bandwidth", lambda _cp: 4e12)
    out = tmp_path / "report.json"
    argv = ["recon_gpu.py", "--quick", "--iterations", "1", "--rounds", "1", "--no-reference"]
    argv += ["--algorithms", "lsqml", "--modes", "1", "--whole-pixel-parity"]
    monkeypatch.setattr(sys, "argv", [*argv, "--object-modes", "2", "--out", str(out)])

    recon_gpu.main()

    (case,) = json.loads(out.read_text())["results"]
    assert case["case"] == "demo 400x128^2 lsqml K=1 M=2 whole-pixel"
    assert made and all(p.object_modes == 2 for p in made)
    assert case["floor_bytes"] == recon_gpu.floor_bytes(400, 128, 2, "lsqml", False)
    assert case["parity_rel_diff_20"] == 0.0


def test_recon_gpu_no_parity_times_the_big_cases_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.setitem(sys.modules, "cupy", stand_in_cupy(used_bytes=1000))
    recon_gpu = importlib.import_module("benchmarks.recon_gpu")
    on_numpy = recon_gpu.make_solver
    monkeypatch.setattr(recon_gpu, "make_solver", lambda s, _xp, p: on_numpy(s, np, p))
    monkeypatch.setattr(recon_gpu, "copy_bandwidth", lambda _cp: 4e12)
    out = tmp_path / "report.json"
    argv = ["recon_gpu.py", "--no-parity", "--iterations", "1", "--rounds", "1"]
    argv += ["--no-reference", "--algorithms", "dm", "--modes", "1", "--sides", "3"]
    monkeypatch.setattr(sys, "argv", [*argv, "--out", str(out)])

    recon_gpu.main()

    (case,) = json.loads(out.read_text())["results"]
    assert case["case"] == "9x256^2 dm K=1"
    assert "parity_rel_diff_20" not in case
    monkeypatch.setattr(sys, "argv", ["recon_gpu.py", "--no-parity", "--quick"])
    with pytest.raises(SystemExit):
        recon_gpu.main()


def test_mode_orthogonalisation_checks_what_it_claims(monkeypatch: pytest.MonkeyPatch) -> None:
    """``benchmarks/mode_orthogonalisation.py``'s check on CPU, the kernels stood in for by
    the xp path: identical results read as identical, and its orthogonality, order and
    incoherent-sum measures hold for modes of equal power too (where the unitary is not
    unique) and fail for modes left unmixed."""
    from recon_helpers import mix_modes_like_the_kernel

    from hxn_liveptycho.recon._modes import orthogonalize_modes

    monkeypatch.syspath_prepend(str(ROOT))
    bench = importlib.import_module("benchmarks.mode_orthogonalisation")
    xp = types.ModuleType("numpy_as_cupy")
    xp.__dict__.update(np.__dict__)
    xp.asnumpy = np.asarray

    monkeypatch.setattr(bench, "mode_unitary", lambda modes: orthogonalize_modes(modes, np)[1])
    monkeypatch.setattr(bench, "mix_modes", mix_modes_like_the_kernel)
    for modes, powers in [(3, None), (5, None), (3, np.array([1.0, 1.0, 0.5]))]:
        r = bench.check(xp, modes, 32, powers)
        assert r["unitary_max_diff"] == 0 and r["modes_rel_diff"] == 0
        assert r["sorted"] and r["off_diagonal"] < 1e-6 and r["incoherent_sum_rel_diff"] < 1e-6
    monkeypatch.setattr(bench, "mix_modes", lambda waves, u: None)  # a kernel that did nothing
    r = bench.check(xp, 3, 32)
    assert r["modes_rel_diff"] > 0.1 and r["off_diagonal"] > 0.1
