"""CXI export (issue 26, 'CXI / NXcxi_ptycho out'): a real run's result, from real Tiled,
read back by ptychodus's own CXI readers and checked against the NXcxi_ptycho definition."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import h5py
import numpy as np
import pytest
from scans import SMALL, fly, make_live, processed

from hxn_liveptycho.cli import main
from hxn_liveptycho.sim import SimEiger, SimPanda, SimulatedSample
from hxn_liveptycho.store.cxi_export import ExportError, export_final, result_from_final
from hxn_liveptycho.store.cxi_layout import ELECTRON_VOLT_J, write_cxi


@pytest.fixture(scope="module")
def ptychodus() -> SimpleNamespace:
    """The independent reader: ptychodus's own CXI readers (PyPI, installed without its
    dependencies by .ci/run). Missing, the tests that read with it fail under CI (``CI``
    set) and are skipped elsewhere, with the reason shown."""
    try:
        from ptychodus.api.probe import ProbeGeometry
        from ptychodus.plugins.cxi_file import CXIDiffractionFileReader, CXIProductFileIO
    except ImportError:
        install = "pip install --no-deps 'ptychodus==1.7.0'"
        if os.environ.get("CI"):
            pytest.fail(f"ptychodus is not installed; .ci/run installs it ({install})")
        pytest.skip(f"ptychodus is not installed ({install}); CI installs it and runs these")
    return SimpleNamespace(
        product=CXIProductFileIO().read,
        diffraction=CXIDiffractionFileReader().read,
        ProbeGeometry=ProbeGeometry,
    )


@dataclass
class ExportedRuns:
    """Two real runs into the session's Tiled: one with the automatic export, one whose
    export folder cannot be made."""

    uri: str
    raw_uid: str
    export_dir: Path
    summary: dict[str, Any]
    failed_uid: str
    failed_summary: dict[str, Any]
    sample: SimulatedSample


def _run_engine() -> Any:
    from bluesky import RunEngine

    return RunEngine({}, call_returns_result=True)


def _close(engine: Any) -> None:
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    engine._th.join(timeout=10)
    engine.loop.close()


@pytest.fixture(scope="module")
def runs(tiled_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExportedRuns]:
    """Two scans through one LivePtycho, made once for the module (every thread stopped
    before the first test begins): the first exported to its folder; before the second,
    the folder is moved away and a file takes its place, so that export cannot be written."""
    tmp = tmp_path_factory.mktemp("cxi")
    sample = SimulatedSample(SMALL)
    export_dir, exported = tmp / "cxi", tmp / "cxi-first-run"
    engine, eiger, panda = _run_engine(), SimEiger(), SimPanda()
    live = None
    try:
        live = make_live(
            engine, eiger, panda, tmp, tiled_uri=tiled_server.uri, cxi_export_dir=export_dir
        )
        uid = fly(engine, eiger, panda, sample).run_start_uids[0]
        assert live.wait(timeout=120)
        export_dir.rename(exported)
        export_dir.write_text("a file where the export folder should be")
        failed_uid = fly(engine, eiger, panda, sample).run_start_uids[0]
        assert live.wait(timeout=120)
        summary, failed_summary = live.status()["runs"][-2:]
    finally:
        if live is not None:
            live.close()
        eiger.close()
        panda.close()
        _close(engine)
    assert (summary["uid"], failed_summary["uid"]) == (uid, failed_uid)
    yield ExportedRuns(tiled_server.uri, uid, exported, summary, failed_uid, failed_summary, sample)


def _client(uri: str) -> Any:
    from tiled.client import from_uri

    return from_uri(uri)


def _tiled_result(runs: ExportedRuns, uid: str | None = None) -> tuple[Any, dict[str, Any]]:
    node = processed(_client(runs.uri), uid or runs.raw_uid)
    return node, dict(node.metadata)


def _export(monkeypatch: Any, runs: ExportedRuns, *argv: str) -> int:
    monkeypatch.setenv("LIVEPTYCHO_TILED_URI", runs.uri)
    return main(["export", *argv])


def _top_left_px(positions_m: np.ndarray, md: dict[str, Any]) -> np.ndarray:
    """Where the solver put each probe window's top-left corner (pipeline.geometry)."""
    canvas = md["canvas"]
    return (positions_m - np.asarray(canvas["origin_um"]) * 1e-6) / canvas["pixel_size_m"]


def test_the_automatic_export_writes_the_result_beside_tiled_and_ptychodus_reads_it(
    ptychodus, runs
):
    """With cxi_export_dir set, the final result is also a file that ptychodus reads as
    the same object, probe, positions, energy and distance Tiled holds."""
    node, md = _tiled_result(runs)
    files = list(runs.export_dir.glob("*.cxi"))
    assert [f.name for f in files] == [f"{node.item['id']}.cxi"]
    assert runs.summary["status"] == "complete"
    assert runs.summary["counters"]["cxi_exported"] == 1
    product = ptychodus.product(files[0])
    final = node["final"]
    np.testing.assert_array_equal(product.object_.get_array()[0], final["object"].read())
    np.testing.assert_array_equal(product.probes.get_array()[0, 0], final["probe"].read())
    positions = final["positions_m"].read()
    got = product.probe_positions
    np.testing.assert_allclose([p.x_m for p in got], positions[:, 1], rtol=0, atol=1e-15)
    np.testing.assert_allclose([p.y_m for p in got], positions[:, 0], rtol=0, atol=1e-15)
    assert product.metadata.photon_energy_eV == pytest.approx(md["energy_kev"] * 1e3)
    assert product.metadata.detector_distance_m == pytest.approx(md["distance_m"])
    assert product.object_.get_pixel_geometry().width_m == pytest.approx(md["pixel_size_m"])
    assert product.probes.get_pixel_geometry().height_m == pytest.approx(md["pixel_size_m"])
    assert [loss.value for loss in product.losses] == pytest.approx(
        final["error_history"].read().tolist()
    )
    with h5py.File(files[0]) as f:
        assert f["entry_1/entry_identifier"][()].decode() == runs.raw_uid
        assert "data" not in f["entry_1/instrument_1/detector_1"]  # frames: export command


def test_export_command_writes_the_run_with_its_frames_for_ptychodus(
    ptychodus, runs, tmp_path, monkeypatch
):
    """``liveptycho export <raw_uid>`` writes object, probe, positions and the measured
    frames (photon counts: the square of the amplitudes the solver fitted), paired with
    the positions row by row as ptychodus pairs them (by index)."""
    out = tmp_path / "run.cxi"
    assert _export(monkeypatch, runs, runs.raw_uid, "-o", str(out)) == 0
    node, md = _tiled_result(runs)
    dataset = ptychodus.diffraction(out)
    meta = dataset.get_metadata()
    stored = node["diffraction"]["amplitude"].read().astype(np.float32)
    patterns = np.concatenate([array.get_patterns() for array in dataset])
    assert patterns.dtype == np.uint32
    np.testing.assert_array_equal(patterns, np.rint(stored.astype(np.float64) ** 2))
    assert meta.num_patterns_per_array == [runs.sample.num_points]
    assert meta.detector_distance_m == pytest.approx(md["distance_m"])
    assert meta.detector_pixel_geometry.width_m == pytest.approx(75e-6)
    assert meta.photon_energy_eV == pytest.approx(12000.0, rel=1e-4)
    product = ptychodus.product(out)
    assert [p.index for p in product.probe_positions] == list(range(runs.sample.num_points))
    with h5py.File(out) as f:
        scan_indices = f["entry_1/liveptycho/scan_indices"][()]
    np.testing.assert_array_equal(scan_indices, node["diffraction"]["indices"].read())
    np.testing.assert_array_equal(product.object_.get_array()[0], node["final"]["object"].read())


def test_each_position_lands_on_the_object_pixels_the_solver_used(
    ptychodus, runs, tmp_path, monkeypatch
):
    """ptychodus's own geometry (centred pixels, (N-1)/2) puts every probe window where the
    solver put it: the positions' sign, axis order and origin all agree."""
    out = tmp_path / "geometry.cxi"
    assert _export(monkeypatch, runs, runs.raw_uid, "-o", str(out), "--no-frames") == 0
    node, md = _tiled_result(runs)
    product = ptychodus.product(out)
    objects = product.object_.get_geometry()
    probes = ptychodus.ProbeGeometry(
        width_px=product.probes.width_px,
        height_px=product.probes.height_px,
        pixel_width_m=product.probes.get_pixel_geometry().width_m,
        pixel_height_m=product.probes.get_pixel_geometry().height_m,
    )
    expected = _top_left_px(node["final"]["positions_m"].read(), md)
    for position, (top, left) in zip(product.probe_positions, expected, strict=True):
        centre = objects.map_coordinates_probe_to_object(position)
        bounds = probes.resolve_patch_bounds(centre.x_px, centre.y_px)
        # ptychodus's integer corner plus its sub-pixel shift is the solver's corner.
        assert bounds.y_slice.start + bounds.dy == pytest.approx(top, abs=1e-6)
        assert bounds.x_slice.start + bounds.dx == pytest.approx(left, abs=1e-6)
        assert abs(bounds.dy) < 1 and abs(bounds.dx) < 1


def test_the_file_carries_what_nxcxi_ptycho_and_cxi_name(runs, tmp_path, monkeypatch):
    """The definition's required names, in SI units, with its links resolved, read with h5py."""
    out = tmp_path / "nexus.cxi"
    assert _export(monkeypatch, runs, runs.raw_uid, "-o", str(out)) == 0
    n = runs.sample.num_points
    _, md = _tiled_result(runs)
    with h5py.File(out) as f:
        assert f["cxi_version"][()] == 160
        entry = f["entry_1"]
        assert entry.attrs["NX_class"] == "NXentry"
        assert entry["definition"][()].decode() == "NXcxi_ptycho"
        instrument = entry["instrument_1"]
        energy_j = md["energy_kev"] * 1e3 * ELECTRON_VOLT_J
        for path in ("source_1/energy", "beam_1/energy", "beam_1/incident_beam_energy"):
            assert instrument[path][()] == pytest.approx(energy_j)
            assert instrument[path].attrs["units"] == "J"
        detector = instrument["detector_1"]
        assert detector.attrs["NX_class"] == "NXdetector"
        for name, value in (("distance", md["distance_m"]), ("x_pixel_size", 75e-6)):
            assert detector[name][()] == pytest.approx(value)
            assert detector[name].attrs["units"] == "m"
        assert detector["data"].shape == (n, 128, 128)
        p = detector["x_pixel_size"][()]
        np.testing.assert_array_equal(detector["basis_vectors"][()], [[0, p, 0], [p, 0, 0]])
        assert detector["translation"].shape == (n, 3)
        # One translation, found where every reader looks (CXI, NXcxi_ptycho, ptychodus).
        for path in ("data_1/translation", "sample_1/geometry_1/translation"):
            np.testing.assert_array_equal(entry[path][()], detector["translation"][()])
        assert entry["data_1/data"].shape == (n, 128, 128)
        data = entry["data"]  # the NXdata PtyPy's DiamondNexus loader reads
        assert data.attrs["NX_class"] == "NXdata" and data.attrs["signal"] == "data"
        np.testing.assert_array_equal(data["x"][()], detector["translation"][:, 0])
        np.testing.assert_array_equal(data["y"][()], detector["translation"][:, 1])
        assert entry["image_2/data"].dtype == np.complex64
        assert entry["liveptycho/raw_uid"][()].decode() == runs.raw_uid
        assert entry["instrument_1/source_1/illumination"].shape == entry["image_1/data"].shape


def test_a_file_that_cannot_be_written_is_a_counted_warning_and_the_run_still_completes(runs):
    """An export folder that cannot be made loses nothing: the run is complete in Tiled and
    its counters say the file was not written."""
    node, md = _tiled_result(runs, runs.failed_uid)
    assert md["status"] == "complete"
    assert node["final"]["object"].read().size
    assert runs.failed_summary["status"] == "complete"
    assert runs.failed_summary["counters"]["cxi_export_failed"] == 1
    assert "cxi_exported" not in runs.failed_summary["counters"]


def test_an_existing_file_is_replaced_only_when_asked(runs, tmp_path, monkeypatch, capsys):
    """Export never overwrites a file silently."""
    out = tmp_path / "there.cxi"
    out.write_text("someone's file")
    assert _export(monkeypatch, runs, runs.raw_uid, "-o", str(out)) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "someone's file"
    assert _export(monkeypatch, runs, runs.raw_uid, "-o", str(out), "--overwrite") == 0
    assert h5py.is_hdf5(out)


def test_an_unknown_run_is_one_line_and_exit_status_1(runs, tmp_path, monkeypatch, capsys):
    """A uid with no processed result: one line on stderr naming it, exit 1, no file."""
    out = tmp_path / "none.cxi"
    assert _export(monkeypatch, runs, "0f0f0f0f-no-such-run", "-o", str(out)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "0f0f0f0f-no-such-run" in err[0]
    assert not out.exists() and not list(tmp_path.glob("*.partial"))
    assert _export(monkeypatch, runs, runs.raw_uid, "--catalog-path", "nowhere/at-all") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere/at-all" in err[0]


def test_an_unknown_format_is_exit_status_2(capsys):
    """--format names what exists; anything else is argparse's one line and exit 2."""
    with pytest.raises(SystemExit) as done:
        main(["export", "some-uid", "--format", "tiff"])
    assert done.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tiff" in err[0]


def test_a_result_without_an_object_is_refused_by_name(tmp_path):
    """An NN-only or failed run has no final object: the error says what is missing."""
    with pytest.raises(ExportError, match="object"):
        result_from_final({"probe": np.ones((4, 4))}, {"raw_uid": "x", "mode": "nn"})
    assert not list(tmp_path.iterdir())


def test_probe_and_object_modes_are_all_kept(ptychodus, tmp_path):
    """Every probe mode is image_1 (ptychodus: incoherent modes); object modes and OPR's
    arrays go to entry_1/liveptycho."""
    rng = np.random.default_rng(3)
    cplx = lambda *s: (rng.normal(size=s) + 1j * rng.normal(size=s)).astype(np.complex64)  # noqa: E731
    snapshot = {
        "object": cplx(40, 48),
        "object_modes": cplx(2, 40, 48),
        "probe": cplx(16, 16),
        "probe_modes": cplx(3, 16, 16),
        "positions_m": rng.normal(size=(9, 2)) * 1e-7,
        "opr_weights": rng.normal(size=(9, 2)),
    }
    canvas = {"origin_um": [-1.0, -2.0], "pixel_size_m": 1e-8, "window": 16, "shape": [40, 48]}
    md = {"raw_uid": "modes-uid", "scan_id": 3, "energy_kev": 10.0, "distance_m": 1.5}
    path = export_final(snapshot, {**md, "canvas": canvas}, tmp_path)
    assert path.name == "scan3-modes-ui.cxi"
    product = ptychodus.product(path)
    np.testing.assert_array_equal(product.probes.get_array()[0], snapshot["probe_modes"])
    with h5py.File(path) as f:
        np.testing.assert_array_equal(
            f["entry_1/liveptycho/object_modes"][()], snapshot["object_modes"]
        )
        assert f["entry_1/liveptycho/opr_weights"].shape == (9, 2)


def test_a_failed_write_leaves_no_file_behind(tmp_path):
    """The file appears whole or not at all: a write that fails half way (here an array
    HDF5 cannot hold, written last) removes its .partial file."""
    snapshot = {"object": np.ones((8, 8), np.complex64), "probe": np.ones((4, 4), np.complex64)}
    canvas = {"origin_um": [0, 0], "pixel_size_m": 1e-8}
    md = {"raw_uid": "u", "energy_kev": 9.0, "distance_m": 1.0, "canvas": canvas}
    result = result_from_final({**snapshot, "positions_m": np.zeros((2, 2))}, md)
    unwritable = replace(result, extras={"note": np.array([object()], dtype=object)})
    with pytest.raises(TypeError):
        write_cxi(unwritable, tmp_path / "r.cxi")
    assert list(tmp_path.iterdir()) == []
