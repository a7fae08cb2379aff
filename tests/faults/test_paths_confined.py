"""Paths from replay archives and model selections stay where they belong; sizes are
checked against the files before anything is allocated.

Before: a ``stream_resource`` uri (or a ``frames.h5`` symlink, an HDF5 external
link, a virtual dataset's source) could make replay open any file the process
can read; HDF5 even fell back to the current directory for a link target
missing from the archive. An archive declaring 144 frames of 16384² made
``--dry-run`` allocate 1 GiB per frame read, and one declaring frames it never
stored replayed fill values as if they were data. A hostile documents file
ended in a ``RecursionError`` or ``KeyError`` traceback. Model selection
accepted any ``*.onnx`` path, including a symlink out of the model directory,
read cards and weights from anywhere, and its errors showed the server's paths.
"""

from __future__ import annotations

import json
import os
import shutil
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from hxn_liveptycho.cli import main
from hxn_liveptycho.config.nn_params import NNParams
from hxn_liveptycho.config.overrides import check_overrides
from hxn_liveptycho.errors import ConfigurationError, LivePtychoError
from hxn_liveptycho.nn.registry import SHIPPED_DIR, ModelRegistry
from hxn_liveptycho.replay import ReplayError, load_archive, replay_run

pytestmark = pytest.mark.timeout(120)

CLEAN = Path(__file__).resolve().parents[2] / "archives" / "clean-12x12"
DATASET = "/entry/data/data"
NUMBERS = "/entry/data/frame_number"
MODEL = "ptychonn-hxn-128"
#: A refused archive may allocate this much at most while being refused (bytes, tracemalloc).
REFUSAL_PEAK_BYTES = 32 * 2**20


# ---- helpers -----------------------------------------------------------------------------
def _archive(tmp_path: Path) -> Path:
    target = tmp_path / "archive"
    shutil.copytree(CLEAN, target)
    return target


def _documents(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "documents.jsonl").read_text().splitlines()]


def _write_documents(folder: Path, entries: list[dict[str, Any]]) -> None:
    (folder / "documents.jsonl").write_text("".join(json.dumps(e) + "\n" for e in entries))


def _set_uri(folder: Path, uri: str, dataset: str | None = None) -> None:
    entries = _documents(folder)
    for entry in entries:
        if entry["name"] == "stream_resource":
            entry["doc"]["uri"] = uri
            if dataset is not None:
                entry["doc"]["parameters"]["dataset"] = dataset
    _write_documents(folder, entries)


def _frames(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    with h5py.File(folder / "frames.h5", "r") as file:
        return file[DATASET][()], file[NUMBERS][()]


def _secret(tmp_path: Path) -> Path:
    """A perfectly readable frames file outside the archive: what an attacker points at."""
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    frames, numbers = _frames(CLEAN)
    path = outside / "secret.h5"
    with h5py.File(path, "w") as file:
        file[DATASET] = frames + 1
        file[NUMBERS] = numbers
    return path


def _replace_frames(folder: Path, make: Callable[[h5py.File], None]) -> None:
    """frames.h5 rewritten: the frame numbers kept, the image dataset made by ``make``."""
    _, numbers = _frames(CLEAN)
    (folder / "frames.h5").unlink()
    with h5py.File(folder / "frames.h5", "w") as file:
        file[NUMBERS] = numbers
        make(file)


def _refused(folder: Path, match: str) -> None:
    with pytest.raises(ReplayError, match=match):
        replay_run(folder, dry_run=True)


def _cli_one_line(folder: Path, capsys: pytest.CaptureFixture[str], says: str) -> None:
    """``liveptycho replay --dry-run`` ends in one line on stderr and a non-zero status."""
    capsys.readouterr()
    assert main(["replay", str(folder), "--dry-run"]) != 0
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and says in lines[0], lines[0]


# ---- replay: paths -------------------------------------------------------------------------
def test_a_stream_resource_uri_outside_the_archive_is_never_opened(tmp_path, capsys):
    folder = _archive(tmp_path)
    secret = _secret(tmp_path)
    _set_uri(folder, f"file://localhost{secret}")
    _refused(folder, r"not inside the archive")
    _cli_one_line(folder, capsys, "not inside the archive")
    _set_uri(folder, "../outside/secret.h5")
    _refused(folder, r"'\.\.'")
    _set_uri(folder, f"file://elsewhere.example.org{secret}")
    _refused(folder, r"another host")
    _set_uri(folder, "http://example.org/frames.h5")
    _refused(folder, r"not a file uri")


def test_uris_inside_the_archive_still_work_wherever_it_was_recorded(tmp_path):
    """Absolute paths inside the archive, and a moved archive's recorded path, both read."""
    folder = _archive(tmp_path)
    _set_uri(folder, f"file://localhost{folder.resolve()}/frames.h5")
    assert replay_run(folder, dry_run=True).frames == 144
    _set_uri(folder, "file://localhost/nsls2/data/hxn/legacy/frames.h5")  # moved here since
    assert replay_run(folder, dry_run=True).frames == 144
    _set_uri(folder, "frames.h5")
    assert replay_run(folder, dry_run=True).frames == 144


def test_symlinks_pointing_out_of_the_archive_are_refused(tmp_path, capsys):
    folder = _archive(tmp_path)
    secret = _secret(tmp_path)
    (folder / "frames.h5").unlink()
    (folder / "frames.h5").symlink_to(secret)
    _refused(folder, r"symlink pointing out of the archive")
    _cli_one_line(folder, capsys, "symlink pointing out of the archive")

    other = _archive(tmp_path / "second")
    documents = tmp_path / "outside" / "documents.jsonl"
    shutil.move(other / "documents.jsonl", documents)
    (other / "documents.jsonl").symlink_to(documents)
    _refused(other, r"documents file .*symlink pointing out of the archive")


def test_a_symlink_inside_the_archive_is_fine(tmp_path):
    folder = _archive(tmp_path)
    (folder / "data").mkdir()
    shutil.move(folder / "frames.h5", folder / "data" / "scan_0001.h5")
    (folder / "frames.h5").symlink_to(Path("data") / "scan_0001.h5")
    assert replay_run(folder, dry_run=True).frames == 144


def test_hdf5_external_links_are_followed_only_inside_the_archive(tmp_path, monkeypatch):
    folder = _archive(tmp_path)
    secret = _secret(tmp_path)
    frames, _ = _frames(folder)
    shutil.copy(folder / "frames.h5", folder / "data_000001.h5")

    def link(target: str) -> Callable[[h5py.File], None]:
        return lambda file: file.__setitem__(DATASET, h5py.ExternalLink(target, DATASET))

    _replace_frames(folder, link("data_000001.h5"))  # an Eiger master file's way
    with load_archive(folder) as run:
        np.testing.assert_array_equal(run.frames.read(0, 2), frames[:2])

    _replace_frames(folder, link(str(secret)))
    _refused(folder, r"external link .*not inside the archive")
    _replace_frames(folder, link("../outside/secret.h5"))
    _refused(folder, r"external link .*'\.\.'")
    # A target missing from the archive: HDF5 itself would look in the current directory.
    monkeypatch.chdir(secret.parent)
    _replace_frames(folder, link("secret.h5"))
    _refused(folder, r"external link .*secret\.h5.* is missing")


def test_soft_links_and_groups_are_resolved_in_the_file(tmp_path):
    folder = _archive(tmp_path)
    frames, _ = _frames(folder)

    def soft(file: h5py.File) -> None:
        file["/entry/raw/images"] = frames
        file[DATASET] = h5py.SoftLink("/entry/raw/images")

    _replace_frames(folder, soft)
    assert replay_run(folder, dry_run=True).frames == 144

    def loop(file: h5py.File) -> None:
        file["/entry/data/a"] = h5py.SoftLink("/entry/data/b")
        file["/entry/data/b"] = h5py.SoftLink("/entry/data/a")
        file[DATASET] = h5py.SoftLink("/entry/data/a")

    _replace_frames(folder, loop)
    _refused(folder, r"more than \d+ links")
    _replace_frames(folder, lambda file: file.create_group(DATASET))
    _refused(folder, r"not a dataset")


def test_virtual_dataset_sources_must_lie_in_the_archive(tmp_path, monkeypatch):
    folder = _archive(tmp_path)
    secret = _secret(tmp_path)
    frames, _ = _frames(folder)
    with h5py.File(folder / "part.h5", "w") as file:
        file[DATASET] = frames

    def virtual(source: str) -> Callable[[h5py.File], None]:
        def make(file: h5py.File) -> None:
            layout = h5py.VirtualLayout(frames.shape, frames.dtype)
            layout[:] = h5py.VirtualSource(source, DATASET, shape=frames.shape)
            file.create_virtual_dataset(DATASET, layout)

        return make

    _replace_frames(folder, virtual("part.h5"))
    with load_archive(folder) as run:
        np.testing.assert_array_equal(run.frames.read(0, 2), frames[:2])
    with monkeypatch.context() as env:  # HDF5 would search this folder first
        env.setenv("HDF5_VDS_PREFIX", str(secret.parent))
        _refused(folder, r"HDF5_VDS_PREFIX")
    _replace_frames(folder, virtual(str(secret)))
    _refused(folder, r"virtual dataset source .*not inside the archive")
    monkeypatch.chdir(secret.parent)  # missing sources read as fill values, or from here
    _replace_frames(folder, virtual("secret.h5"))
    _refused(folder, r"virtual dataset source .*is missing")


def test_external_raw_storage_is_refused(tmp_path):
    folder = _archive(tmp_path)
    frames, _ = _frames(folder)
    frames.tofile(tmp_path / "outside.raw")

    def external(file: h5py.File) -> None:
        file.create_dataset(
            DATASET,
            shape=frames.shape,
            dtype=frames.dtype,
            external=[(str(tmp_path / "outside.raw"), 0, frames.nbytes)],
        )

    _replace_frames(folder, external)
    _refused(folder, r"external raw files")


def test_a_fifo_or_folder_is_no_frames_file(tmp_path):
    folder = _archive(tmp_path)
    (folder / "frames.h5").unlink()
    os.mkfifo(folder / "frames.h5")  # opening it would block for ever
    _refused(folder, r"not a regular file")
    (folder / "frames.h5").unlink()
    (folder / "frames.h5").mkdir()
    _refused(folder, r"not a regular file")
    (folder / "documents.jsonl").unlink()
    os.mkfifo(folder / "documents.jsonl")
    _refused(folder, r"documents file .*not a regular file")


# ---- replay: sizes ---------------------------------------------------------------------------
def _peak_while_refused(folder: Path, match: str) -> int:
    tracemalloc.start()
    try:
        _refused(folder, match)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_huge_declared_frames_are_refused_before_allocating(tmp_path, capsys):
    """144 frames of 16384² uint32 declared, none stored: 1 GiB per frame read before."""
    folder = _archive(tmp_path)
    _replace_frames(
        folder,
        lambda file: file.create_dataset(
            DATASET, shape=(144, 16384, 16384), dtype="u4", chunks=(1, 1024, 1024)
        ),
    )
    assert _peak_while_refused(folder, r"16384x16384") < REFUSAL_PEAK_BYTES
    _cli_one_line(folder, capsys, "16384x16384")


def test_a_million_frame_header_is_refused_before_allocating(tmp_path):
    """10^6 frames of 4096² declared (64 TiB): refused from the file's actual size."""
    folder = _archive(tmp_path)
    _replace_frames(
        folder,
        lambda file: file.create_dataset(
            DATASET, shape=(10**6, 4096, 4096), dtype="u4", chunks=(1, 4096, 4096)
        ),
    )
    assert _peak_while_refused(folder, r"stores 0 of its 1000000 chunks") < REFUSAL_PEAK_BYTES


def test_frames_declared_but_never_stored_are_refused(tmp_path):
    """Unwritten chunks read as zeros: before, they replayed as if recorded."""
    folder = _archive(tmp_path)
    frames, _ = _frames(folder)

    def partly(file: h5py.File) -> None:
        data = file.create_dataset(
            DATASET, shape=frames.shape, dtype=frames.dtype, chunks=(1, *frames.shape[1:])
        )
        data[:10] = frames[:10]

    _replace_frames(folder, partly)
    _refused(folder, r"stores 10 of its 144 chunks")

    def contiguous_unwritten(file: h5py.File) -> None:
        file.create_dataset(DATASET, shape=frames.shape, dtype=frames.dtype)

    _replace_frames(folder, contiguous_unwritten)
    _refused(folder, r"stores none of its")


def test_a_truncated_frames_file_is_one_clear_line(tmp_path, capsys):
    folder = _archive(tmp_path)
    path = folder / "frames.h5"
    path.write_bytes(path.read_bytes()[:-4096])
    _refused(folder, r"frames file .*(truncated|cannot open)")
    _cli_one_line(folder, capsys, "frames file")
    path.write_bytes(b"")
    _refused(folder, r"frames file")


def test_odd_frame_types_and_frame_numbers_are_refused_before_reading(tmp_path):
    folder = _archive(tmp_path)
    frames, _ = _frames(folder)
    _replace_frames(folder, lambda file: file.__setitem__(DATASET, frames.astype(np.complex64)))
    _refused(folder, r"frames of type complex64")

    (folder / "frames.h5").unlink()
    with h5py.File(folder / "frames.h5", "w") as file:
        file[DATASET] = frames
        file.create_dataset(NUMBERS, shape=(10**9,), dtype="i8", chunks=(2**20,))
    assert _peak_while_refused(folder, r"144 stored frames but 1000000000 frame numbers") < (
        REFUSAL_PEAK_BYTES
    )


# ---- replay: documents -----------------------------------------------------------------------
def test_hostile_documents_are_one_clear_error(tmp_path, capsys):
    folder = _archive(tmp_path)
    entries = _documents(folder)
    (folder / "documents.jsonl").write_text("[" * 100_000 + "]" * 100_000 + "\n")
    _refused(folder, r"documents\.jsonl:1: not a document line")
    _cli_one_line(folder, capsys, "not a document line")

    broken = [dict(e) for e in entries]
    for entry in broken:
        if entry["name"] == "descriptor":
            entry["doc"] = {k: v for k, v in entry["doc"].items() if k != "uid"}
    _write_documents(folder, broken)
    _refused(folder, r"malformed")
    _cli_one_line(folder, capsys, "malformed")

    odd = [dict(e) for e in entries]
    odd[0] = {"name": "start", "doc": {**entries[0]["doc"], "scan": {"shape": "wide"}}}
    _write_documents(folder, odd)
    _refused(folder, r"malformed")


# ---- models ----------------------------------------------------------------------------------
@pytest.fixture
def outside_model(tmp_path: Path) -> Path:
    """A valid ONNX model outside the model directory."""
    outside = tmp_path / "outside"
    outside.mkdir()
    path = outside / "system.onnx"
    shutil.copy(SHIPPED_DIR / f"{MODEL}.onnx", path)
    return path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    return folder


def test_a_model_symlink_out_of_the_model_directory_is_refused(model_dir, outside_model, caplog):
    (model_dir / "evil.onnx").symlink_to(outside_model)
    registry = ModelRegistry(model_dir)
    with caplog.at_level("WARNING"):
        assert "evil" not in {m.name for m in registry.list()}
    assert "symlink pointing out of the model directory" in caplog.text
    with pytest.raises(ConfigurationError, match="no model named 'evil'"):
        registry.get("evil")
    with pytest.raises(ConfigurationError, match="symlink pointing out"):
        registry.get(str(model_dir / "evil.onnx"))


def test_model_paths_outside_the_model_directory_are_refused(model_dir, outside_model):
    registry = ModelRegistry(model_dir)
    for name in (
        str(outside_model),
        "../outside/system.onnx",
        f"{model_dir}/../outside/system.onnx",
        "/etc/passwd",
        "~/system.onnx",
        "sub/../../outside/system",
    ):
        with pytest.raises(ConfigurationError) as caught:
            registry.get(name)
        message = str(caught.value)
        assert str(model_dir) not in message.replace(name, "")  # no server path told
        assert str(SHIPPED_DIR) not in message


def test_model_paths_inside_the_model_directory_still_work(model_dir):
    shutil.copy(SHIPPED_DIR / f"{MODEL}.onnx", model_dir / "own.onnx")
    (model_dir / "sub").mkdir()
    (model_dir / "sub" / "linked.onnx").symlink_to(model_dir / "own.onnx")
    registry = ModelRegistry(model_dir)
    assert registry.get("own").source == "local"
    assert registry.get(str(model_dir / "own.onnx")).source == "file"
    assert registry.get("sub/linked.onnx").source == "file"
    assert registry.get(MODEL).source == "shipped"
    assert registry.get(f"{MODEL}.onnx").source == "file"  # relative: found among the shipped


def test_unknown_model_errors_name_no_server_path(model_dir):
    with pytest.raises(ConfigurationError) as caught:
        ModelRegistry(model_dir).get("nope")
    message = str(caught.value)
    assert "no model named 'nope'" in message and MODEL in message
    assert str(model_dir) not in message and str(SHIPPED_DIR) not in message


def test_an_oversized_model_is_refused_before_loading(model_dir):
    with (model_dir / "huge.onnx").open("wb") as file:
        file.truncate(3 * 2**30)  # sparse: no disk used
    registry = ModelRegistry(model_dir)
    with pytest.raises(ConfigurationError, match=r"huge.*bytes"):
        registry.get("huge")
    (model_dir / "empty.onnx").touch()
    with pytest.raises(ConfigurationError, match=r"empty.*empty"):
        registry.get("empty")


def test_model_cards_are_read_only_from_inside_and_small(model_dir, tmp_path, caplog):
    shutil.copy(SHIPPED_DIR / f"{MODEL}.onnx", model_dir / "a.onnx")
    shutil.copy(SHIPPED_DIR / f"{MODEL}.onnx", model_dir / "b.onnx")
    card = json.loads((SHIPPED_DIR / f"{MODEL}.json").read_text())
    (tmp_path / "outside").mkdir(exist_ok=True)
    (tmp_path / "outside" / "card.json").write_text(json.dumps(card))
    (model_dir / "a.json").symlink_to(tmp_path / "outside" / "card.json")
    (model_dir / "b.json").write_text(json.dumps({**card, "pad": "x" * 2**21}))
    with caplog.at_level("WARNING"):
        models = {m.name: m for m in ModelRegistry(model_dir).list()}
        assert ModelRegistry(model_dir).get(str(model_dir / "a.onnx")).card is None
    assert models["a"].card is None and models["b"].card is None
    assert "symlink pointing out" in caplog.text and "bytes" in caplog.text


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _message(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _number(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _onnx_with_external_data(location: str, *, in_subgraph: bool = False) -> bytes:
    """The smallest ModelProto whose one tensor keeps its data in file ``location``."""
    entry = _message(1, b"location") + _message(2, location.encode())
    tensor = (
        _number(1, 4) + _number(2, 1) + _message(8, b"w") + _message(13, entry) + _number(14, 1)
    )
    graph = _message(2, b"g") + _message(5, tensor)
    if in_subgraph:  # If-node's then_branch attribute holding the graph
        attribute = _message(1, b"then_branch") + _message(6, graph)
        graph = _message(2, b"outer") + _message(1, _message(4, b"If") + _message(5, attribute))
    opset = _message(1, b"") + _number(2, 17)
    return _number(1, 8) + _message(8, opset) + _message(7, graph)


@pytest.mark.parametrize("in_subgraph", [False, True])
def test_onnx_external_data_must_stay_beside_the_model(model_dir, tmp_path, in_subgraph):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    registry = ModelRegistry(model_dir)
    for name, location in (("up", "../secret.bin"), ("abs", str(tmp_path / "secret.bin"))):
        (model_dir / f"{name}.onnx").write_bytes(
            _onnx_with_external_data(location, in_subgraph=in_subgraph)
        )
        with pytest.raises(ConfigurationError, match="external data"):
            registry.get(name)
    (model_dir / "weights.bin").write_bytes(b"\0" * 16)
    (model_dir / "beside.onnx").write_bytes(_onnx_with_external_data("weights.bin"))
    assert registry.get("beside").name == "beside"
    (model_dir / "garbage.onnx").write_bytes(b"\xff" * 64)
    with pytest.raises(ConfigurationError, match="not an ONNX model"):
        registry.get("garbage")


def test_model_names_with_climbing_paths_are_refused_where_they_enter():
    for bad in ("../../etc/passwd.onnx", "a/../../b", "x\0y", ""):
        with pytest.raises(ValueError, match="model"):
            NNParams(model=bad)
    assert NNParams(model="ptychonn-hxn-128").model == "ptychonn-hxn-128"
    # configure (in-process, CLI, API, queue server) validates through the same model
    with pytest.raises(ConfigurationError, match=r"nn\.model: .*climbs with '\.\.'"):
        check_overrides({"nn": {"model": "../../etc/x.onnx"}})


def test_models_inspect_outside_is_one_line(model_dir, outside_model, capsys):
    code = main(["models", "--model-dir", str(model_dir), "inspect", str(outside_model)])
    captured = capsys.readouterr()
    assert code != 0 and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert "no model file inside the model directory" in captured.err


def test_errors_derive_from_the_package_root():
    assert issubclass(ReplayError, LivePtychoError)
    assert issubclass(ConfigurationError, LivePtychoError)
