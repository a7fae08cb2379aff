"""Reprocess from files (issue 26): a CXI file, written here from the format's definition,
reconstructed by the live engine into Tiled like a live run; its conventions read, detected
or refused with the option to pass."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from conftest import TILED_API_KEY
from scans import processed

from hxn_liveptycho.cli import main
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.demo import aligned_pair
from hxn_liveptycho.recon.metrics import object_error
from hxn_liveptycho.reprocess import (
    ConventionError,
    FileConventions,
    read_cxi,
    reconstruct_file,
)
from hxn_liveptycho.reprocess.conventions import detect_dc
from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample

#: The quality bar of a reconstructed file: the live end-to-end test's (issue 1), with its
#: metric (normalised complex object error over the well-lit region, after registration:
#: hxn_liveptycho.recon.metrics.object_error), on a smaller scan (8 x 8 points, 64² frames).
MAX_OBJECT_ERROR = 0.15
ITERATIONS = 40
#: Joules per electronvolt (CXI stores the photon energy in joules).
EV_J = 1.602176634e-19


@functools.cache
def _sample() -> SimulatedSample:
    return SimulatedSample(
        SimulatedBeamline.for_window(64, x_num=8, y_num=8, photons_per_frame=2e5)
    )


def write_cxi(
    path: Path,
    sample: SimulatedSample,
    *,
    frames: np.ndarray | None = None,
    energy: bool = True,
    probe: np.ndarray | None = None,
    bad_pixels: tuple[tuple[int, int], ...] = ((3, 5), (40, 7)),
) -> Path:
    """A CXI 1.6 file as the format defines it (cxidb.org, CXI 1.6): frames in
    instrument_1/detector_1/data linked from data_1/data, the sample's translations (x, y, z)
    in metres in sample_1/geometry_1/translation, the photon energy in joules, the distance
    and pixel size in metres, the detector's basis vectors (CXI's default orientation: rows
    step along -y, columns along -x), a mask (0 good, other bits bad) and, if given, the
    probe."""
    bl = sample.beamline
    data = sample.intensities if frames is None else frames
    with h5py.File(path, "w") as f:
        f["cxi_version"] = 160
        entry = f.create_group("entry_1")
        detector = entry.create_group("instrument_1/detector_1")
        detector["data"] = data
        entry["data_1/data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
        detector["distance"] = bl.distance_m
        detector["x_pixel_size"] = bl.detector_pixel_m
        detector["y_pixel_size"] = bl.detector_pixel_m
        p = bl.detector_pixel_m
        detector["basis_vectors"] = np.array([[0.0, -p, 0.0], [-p, 0.0, 0.0]])
        mask = np.zeros(data.shape[1:], dtype=np.uint32)
        mask[data.shape[1] // 2 + 20, data.shape[2] // 2] = 0x1000  # "signal": a good pixel
        for row, col in bad_pixels:
            mask[row, col] = 1
        detector["mask"] = mask
        if energy:
            entry["instrument_1/source_1/energy"] = bl.energy_kev * 1e3 * EV_J
        if probe is not None:  # where ptychodus keeps a CXI file's probe
            entry["instrument_1/source_1/illumination"] = probe
        # The beam's position on the sample is the negative of the sample's translation;
        # with the default detector axes, that makes the translation's (x, y) the frames'
        # (column, row) direction positions.
        y_m, x_m = sample.positions_um[:, 0] * 1e-6, sample.positions_um[:, 1] * 1e-6
        entry["sample_1/geometry_1/translation"] = np.stack([x_m, y_m, np.zeros_like(x_m)], 1)
    return path


def _settings(tmp_path: Path, tiled_server: Any) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        tiled_uri=tiled_server.uri,
        array_backend="numpy",
        live_interval_s=1.0,
        tiled_retry_s=1.0,
    )


def _object_error(sample: SimulatedSample, node: Any) -> float:
    recon = node["final"]["object"].read()
    truth, estimate, mask = aligned_pair(sample, recon, node.metadata["canvas"]["origin_um"])
    return object_error(truth, estimate, mask)


def test_a_cxi_file_is_reconstructed_into_tiled_to_the_phantom(tmp_path, tiled_server):
    """A CXI file of a simulated scan, with its probe: complete, in Tiled like a live run,
    started from the file's probe, object within 0.15."""
    sample = _sample()
    path = write_cxi(tmp_path / "scan.cxi", sample, probe=sample.probe)
    seen: list[dict[str, Any]] = []
    report = reconstruct_file(
        path,
        settings=_settings(tmp_path, tiled_server),
        overrides={"recon": {"iterations": ITERATIONS}},
        progress=seen.append,
        progress_interval_s=0.5,
    )
    assert report.status == "complete", report.summary()
    assert report.conventions["data"] == "intensity" and report.conventions["dc"] == "centre"
    assert report.conventions["masked_pixels"] == 2  # the "signal" bit is a good pixel
    assert seen and seen[-1]["reprocess"] == {"frames_fed": 64, "frames": 64}
    from tiled.client import from_uri

    node = processed(from_uri(tiled_server.uri), report.raw_uid)
    md = node.metadata
    assert md["status"] == "complete" and md["plan_name"] == "liveptycho_reconstruct_file"
    assert md["energy_kev"] == pytest.approx(12.0, rel=1e-6)
    assert md["distance_m"] == pytest.approx(2.05)
    assert md["iteration"] >= ITERATIONS
    assert md["source_file"]["file"] == str(path)
    assert md["config"]["probe"]["initial"] == "file"
    assert md["config"]["probe"]["file"] == str(path.resolve())
    assert any(note.startswith("probe:") for note in md["source_file"]["notes"])
    assert {"live", "final", "diffraction"} <= set(node)
    np.testing.assert_allclose(
        node["final"]["positions_m"].read()[:, :2] * 1e6,
        sample.positions_um,
        atol=0.05,
    )
    error = _object_error(sample, node)
    assert error <= MAX_OBJECT_ERROR, f"object error {error:.3f}"
    # This project's export of the result reads back as the same run, positions in place.
    from hxn_liveptycho.store.cxi_export import read_container
    from hxn_liveptycho.store.cxi_layout import write_cxi as export_cxi

    result, _ = read_container(node, report.container_path)
    with read_cxi(export_cxi(result, tmp_path / "exported.cxi")) as exported:
        assert exported.raw_uid == report.raw_uid and exported.dc == "centre"
        final_um = node["final"]["positions_m"].read()[:, :2] * 1e6
        np.testing.assert_allclose(exported.positions_um, final_um, atol=1e-9)
    # raw_uid: stable for the file's contents, wherever it lies.
    copy = tmp_path / "elsewhere.cxi"
    copy.write_bytes(path.read_bytes())
    with read_cxi(copy) as again:
        assert again.raw_uid == report.raw_uid


def test_a_file_with_the_zero_frequency_at_index_0_is_detected_and_reconstructed(
    tmp_path, tiled_server, capsys
):
    """Frames in FFT order (zero frequency at index 0) are found from the mean pattern,
    shifted back, and reconstruct to the same bound, from the command line, which shows
    the iterations and the data mismatch while it runs."""
    sample = _sample()
    fft_order = np.fft.ifftshift(sample.intensities, axes=(-2, -1))
    path = write_cxi(tmp_path / "fft-order.cxi", sample, frames=fft_order)
    with read_cxi(path) as scan:
        assert scan.dc == "corner"
        np.testing.assert_array_equal(scan.read(0, 3)[:, 32, 32], sample.intensities[:3, 32, 32])
    argv = ["reconstruct", str(path), "--tiled-uri", tiled_server.uri, "--backend", "numpy"]
    argv += ["--iterations", str(ITERATIONS), "--progress-interval", "0.5"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "zero frequency at index 0" in out and "reconstruction: complete" in out
    assert "iteration" in err and "data mismatch" in err
    assert TILED_API_KEY not in out + err  # the URI is printed redacted
    raw_uid = next(line.split()[1] for line in out.splitlines() if line.startswith("raw_uid"))
    from tiled.client import from_uri

    node = processed(from_uri(tiled_server.uri), raw_uid)
    assert node.metadata["source_file"]["dc"] == "corner"
    error = _object_error(sample, node)
    assert error <= MAX_OBJECT_ERROR, f"object error {error:.3f}"


def test_a_zero_order_neither_centred_nor_at_index_0_is_refused_naming_the_option(tmp_path):
    """Frames shifted along one axis only put the zero order at an edge's middle: refused
    with one line that says to pass --dc; passing it reads the file."""
    sample = _sample()
    half = np.fft.ifftshift(sample.intensities, axes=-1)
    path = write_cxi(tmp_path / "half.cxi", sample, frames=half)
    with pytest.raises(ConventionError, match="pass --dc centre or --dc corner") as refused:
        read_cxi(path)
    assert "\n" not in str(refused.value)
    with read_cxi(path, FileConventions(dc="centre")) as scan:
        assert scan.dc == "centre"
    flat = np.ones((64, 64))
    with pytest.raises(ConventionError, match="no bright zero order"):
        detect_dc(flat)


def test_amplitudes_are_squared_and_unknown_floats_are_refused(tmp_path):
    """Stored amplitudes are told apart only when said; said, they become the intensities."""
    sample = _sample()
    path = write_cxi(tmp_path / "amp.cxi", sample, frames=np.sqrt(sample.intensities))
    with pytest.raises(ConventionError, match="pass --data intensity or --data amplitude"):
        read_cxi(path)
    with read_cxi(path, FileConventions(data="amplitude")) as scan:
        window = (slice(0, 2), slice(25, 35), slice(25, 35))
        np.testing.assert_allclose(scan.read(0, 2)[window], sample.intensities[window], rtol=1e-5)
        assert scan.read(0, 1)[0, 3, 5] == 0.0  # a masked pixel


def test_positions_in_the_wrong_unit_are_refused_naming_the_option(tmp_path):
    """Translations in micrometres without a units attribute span metres: refused; said, read."""
    sample = _sample()
    path = write_cxi(tmp_path / "um.cxi", sample)
    with h5py.File(path, "r+") as f:
        node = f["entry_1/sample_1/geometry_1/translation"]
        node[...] = node[()] * 1e6 * 1e5  # far beyond a scan in metres
    with pytest.raises(ConventionError, match="pass --position-units"):
        read_cxi(path)
    with h5py.File(path, "r+") as f:
        node = f["entry_1/sample_1/geometry_1/translation"]
        node[...] = node[()] / 1e5
        node.attrs["units"] = "um"
    with read_cxi(path) as scan:
        np.testing.assert_allclose(scan.positions_um, sample.positions_um, atol=1e-6)


def test_cli_a_file_without_wavelength_is_one_line_and_exit_2(tmp_path, capsys):
    """No energy or wavelength: one line naming --energy-kev, exit status 2."""
    path = write_cxi(tmp_path / "no-energy.cxi", _sample(), energy=False)
    assert main(["reconstruct", str(path), "--data-dir", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "wavelength" in err and "--energy-kev" in err


def test_cli_a_missing_file_is_one_line_and_exit_1(tmp_path, capsys):
    """A file that is not there: one line, exit status 1."""
    missing = tmp_path / "nothing-here.cxi"
    assert main(["reconstruct", str(missing)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(missing) in err


def test_this_projects_exports_keep_their_run_and_their_beam_positions(tmp_path):
    """A file with this project's 'liveptycho' group: its raw_uid and scan_id are the run's,
    and its translations are read as the beam's positions (as the exporter writes them)."""
    sample = _sample()
    path = write_cxi(tmp_path / "export-like.cxi", sample)
    with read_cxi(path) as plain:
        sample_read = plain.positions_um.copy()
    with h5py.File(path, "r+") as f:
        own = f["entry_1"].create_group("liveptycho")
        own["raw_uid"] = "3f1c0a52-0000-4000-8000-000000000001"
        own["scan_id"] = "1234"
    with read_cxi(path) as scan:
        assert scan.raw_uid == "3f1c0a52-0000-4000-8000-000000000001"
        assert scan.scan_id == 1234
        np.testing.assert_allclose(scan.positions_um, -sample_read)
    with read_cxi(path, FileConventions(translation="sample")) as scan:
        np.testing.assert_allclose(scan.positions_um, sample_read)


def test_an_nxcxi_ptycho_file_with_units_and_a_grid_of_frames_is_read(tmp_path):
    """NXcxi_ptycho's fields with their units attributes (eV, nm, um, mm), and frames and
    translations stored as an (8, 8) grid: read in SI, one frame per position, in order."""
    sample = _sample()
    bl = sample.beamline
    counts = np.rint(sample.intensities).astype(np.uint32)
    y_nm, x_nm = sample.positions_um[:, 0] * 1e3, sample.positions_um[:, 1] * 1e3
    path = tmp_path / "nexus.nxs"
    with h5py.File(path, "w") as f:
        entry = f.create_group("entry_1")
        entry["definition"] = "NXcxi_ptycho"
        detector = entry.create_group("instrument_1/detector_1")
        detector["data"] = counts.reshape(8, 8, 64, 64)
        translation = np.stack([x_nm, y_nm, np.zeros_like(x_nm)], 1).reshape(8, 8, 3)
        detector["translation"] = translation
        detector["translation"].attrs["units"] = "nm"
        detector["x_pixel_size"] = bl.detector_pixel_m * 1e6
        detector["x_pixel_size"].attrs["units"] = "um"
        detector["distance"] = bl.distance_m * 1e3
        detector["distance"].attrs["units"] = "mm"
        entry["instrument_1/beam_1/incident_beam_energy"] = bl.energy_kev * 1e3
        entry["instrument_1/beam_1/incident_beam_energy"].attrs["units"] = "eV"
    with read_cxi(path) as scan:
        assert scan.energy_kev == pytest.approx(bl.energy_kev)
        assert scan.distance_m == pytest.approx(bl.distance_m)
        assert scan.pixel_size_m == pytest.approx(bl.detector_pixel_m)
        np.testing.assert_allclose(scan.positions_um, sample.positions_um, atol=1e-9)
        assert scan.num_frames == 64 and scan.data_kind == "intensity" and scan.dc == "centre"
        np.testing.assert_array_equal(scan.read(9, 12), counts[9:12])


def test_a_detector_mounted_transposed_is_read_through_its_basis_vectors(tmp_path, tiled_server):
    """Frames stored transposed, with basis vectors saying rows step along -x and columns
    along -y: the frames are left as stored and the positions are projected on those axes,
    so the object comes out transposed, to the same bound (nothing is flipped)."""
    sample = _sample()
    p = sample.beamline.detector_pixel_m
    transposed = np.ascontiguousarray(sample.intensities.transpose(0, 2, 1))
    path = write_cxi(tmp_path / "transposed.cxi", sample, frames=transposed)
    with h5py.File(path, "r+") as f:
        f["entry_1/instrument_1/detector_1/basis_vectors"][...] = [[-p, 0, 0], [0, -p, 0]]
    with read_cxi(path) as scan:
        np.testing.assert_allclose(scan.positions_um, sample.positions_um[:, ::-1], atol=1e-9)
        np.testing.assert_array_equal(scan.read(0, 2), transposed[:2])
    report = reconstruct_file(
        path,
        settings=_settings(tmp_path, tiled_server),
        overrides={"recon": {"iterations": ITERATIONS}},
    )
    assert report.status == "complete", report.summary()
    from tiled.client import from_uri

    node = processed(from_uri(tiled_server.uri), report.raw_uid)
    recon = node["final"]["object"].read().T  # back in the phantom's (y, x) axes
    origin = node.metadata["canvas"]["origin_um"][::-1]
    error = object_error(*aligned_pair(sample, recon, origin))
    assert error <= MAX_OBJECT_ERROR, f"object error {error:.3f}"
    with h5py.File(path, "r+") as f:  # rows along the beam: no way to place the positions
        f["entry_1/instrument_1/detector_1/basis_vectors"][...] = [[0, 0, p], [0, -p, 0]]
    with pytest.raises(ConventionError, match="pass --basis-vectors"):
        read_cxi(path)


class _PluggedError(Exception):
    """Raised by a progress callback to stop a reconstruction while the file is read."""


def test_a_read_that_fails_midway_ends_the_run_aborted_with_its_reason(tmp_path, tiled_server):
    """A failure while the frames are read (here: the progress callback's) ends the run like
    a scan that failed: 'aborted', its reason in the container, and the error raised."""
    sample = _sample()
    path = write_cxi(tmp_path / "cut.cxi", sample, frames=sample.intensities + 1.0)

    def stop_at_the_second_chunk(status: dict[str, Any]) -> None:
        if status["reprocess"]["frames_fed"] >= 16:
            raise _PluggedError("the operator pulled the plug")

    with pytest.raises(_PluggedError):
        reconstruct_file(
            path,
            settings=_settings(tmp_path, tiled_server),
            progress=stop_at_the_second_chunk,
            progress_interval_s=0.0,
            chunk_frames=8,
        )
    with read_cxi(path) as scan:
        raw_uid = scan.raw_uid
    from tiled.client import from_uri

    md = processed(from_uri(tiled_server.uri), raw_uid).metadata
    assert md["status"] == "aborted"
    assert "the operator pulled the plug" in md["reason"]
