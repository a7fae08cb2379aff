"""Model management: the models shipped with the package plus a local model directory.

A model is ``<name>.onnx`` with an optional card ``<name>.json`` beside it. The
local directory (``Settings.model_dir``) is searched first, so a beamline can
shadow a shipped model by dropping in its own under the same name.

A model name arrives from settings, the API, the queue server or a start
document, so it is treated as untrusted: a name is a plain file stem, a path
must resolve (symlinks followed) inside the model directory or the shipped
models, the files' sizes are checked before anything reads them, and an ONNX
file's external-data references must stay beside it. Refusals name what was
asked for, never the server's folders.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.nn.card import MAX_CARD_BYTES, ModelCard
from hxn_liveptycho.nn.interface import GraphIO
from hxn_liveptycho.util.paths import lies_in

logger = logging.getLogger(__name__)

#: Where the package's own models live (installed as package data).
SHIPPED_DIR = Path(__file__).parent / "models"
#: What a model name may look like: a file stem, no separators, no leading dot.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
#: Largest ONNX file read: protobuf's 2 GiB ceiling (bigger weights are external data).
MAX_MODEL_BYTES = 2**31 - 1
#: Largest external-data file one model may name (the weights beside a big model).
MAX_EXTERNAL_BYTES = 16 * 2**30
#: Subgraph nesting followed when looking for external data (If/Loop bodies).
MAX_GRAPH_DEPTH = 32


def _inspection_session(path: Path) -> Any:
    """An ONNX Runtime session only for reading the graph's I/O: no optimisation, one thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@dataclass
class ModelInfo:
    """One model on disk: where it is, where it came from, and its card if it has one."""

    name: str
    path: Path
    source: str
    card: ModelCard | None = None
    _sha256: str | None = field(default=None, repr=False)
    _graph_io: tuple[list[tuple[str, list[Any]]], list[tuple[str, list[Any]]]] | None = field(
        default=None, repr=False
    )

    @property
    def sha256(self) -> str:
        if self._sha256 is None:  # streamed: never the whole file in memory at once
            with self.path.open("rb") as file:
                self._sha256 = hashlib.file_digest(file, "sha256").hexdigest()
        return self._sha256

    def _inspect(self) -> tuple[list[tuple[str, list[Any]]], list[tuple[str, list[Any]]]]:
        """The graph's inputs and outputs as (name, shape), read once."""
        if self._graph_io is None:
            sess = _inspection_session(self.path)
            self._graph_io = (
                [(t.name, list(t.shape)) for t in sess.get_inputs()],
                [(t.name, list(t.shape)) for t in sess.get_outputs()],
            )
        return self._graph_io

    def input_hw(self) -> tuple[int, int]:
        """The (height, width) of the graph's input, read without loading a runtime for it."""
        shape = self._inspect()[0][0][1]
        if len(shape) != 4 or not all(isinstance(s, int) for s in shape[-2:]):
            raise ConfigurationError(
                f"model {self.name} must take (batch, 1, n, n) patterns; its input is {shape}"
            )
        return int(shape[-2]), int(shape[-1])

    def io(self) -> GraphIO:
        """Input and output names: from the card, else the graph's first input and
        outputs named ``amplitude``/``phase`` (or its first two outputs)."""
        graph_inputs, graph_outputs = self._inspect()
        inputs = [name for name, _ in graph_inputs]
        outputs = [name for name, _ in graph_outputs]
        if len(inputs) != 1 or len(outputs) < 2:
            raise ConfigurationError(
                f"model {self.name} must have one input and two outputs (amplitude, phase); "
                f"it has inputs {inputs} and outputs {outputs}"
            )
        amp = self.card.amplitude_output if self.card else "amplitude"
        phase = self.card.phase_output if self.card else "phase"
        if amp not in outputs or phase not in outputs:
            amp, phase = outputs[0], outputs[1]
        return GraphIO(input=inputs[0], amplitude=amp, phase=phase)

    def describe(self) -> dict[str, Any]:
        """What ``liveptycho models inspect`` shows: file facts, graph I/O, and the card."""
        sess = _inspection_session(self.path)

        def spec(t: Any) -> dict[str, Any]:
            return {"name": t.name, "shape": list(t.shape), "type": t.type}

        return {
            "name": self.name,
            "path": str(self.path),
            "source": self.source,
            "bytes": self.path.stat().st_size,
            "sha256": self.sha256,
            "graph_inputs": [spec(t) for t in sess.get_inputs()],
            "graph_outputs": [spec(t) for t in sess.get_outputs()],
            "card": None if self.card is None else self.card.model_dump(mode="json"),
        }


class ModelRegistry:
    """Finds models by name in the local directory (first) and among the shipped ones."""

    def __init__(self, model_dir: Path | None, shipped_dir: Path = SHIPPED_DIR) -> None:
        self.model_dir = None if model_dir is None else Path(model_dir).expanduser()
        self.shipped_dir = shipped_dir

    def _roots(self) -> list[tuple[Path, str]]:
        """(folder, source) in search order: the local directory shadows the shipped one."""
        roots = [] if self.model_dir is None else [(self.model_dir, "local")]
        return [*roots, (self.shipped_dir, "shipped")]

    def _scan(self, folder: Path | None, source: str) -> dict[str, ModelInfo]:
        if folder is None or not folder.is_dir():
            return {}
        root = folder.resolve()
        found = {}
        for path in sorted(folder.glob("*.onnx")):
            if not MODEL_NAME.fullmatch(path.stem):
                logger.warning("model file %r skipped: not a plain model name", path.name)
                continue
            try:
                confined(root, path, path.name)
            except ConfigurationError as exc:
                logger.warning("model file skipped: %s", exc)
                continue
            found[path.stem] = ModelInfo(path.stem, path, source, _card(root, path))
        return found

    def list(self) -> list[ModelInfo]:
        models = self._scan(self.shipped_dir, "shipped")
        models.update(self._scan(self.model_dir, "local"))
        return [models[k] for k in sorted(models)]

    def get(self, name: str) -> ModelInfo:
        """The model called ``name``, or the ONNX file at path ``name`` inside a model folder.

        A path is allowed only when it resolves inside the local model directory
        or the shipped models: a name from an API call or a start document must
        not select (and so load, and hash, and report) any file the server can
        read. Sizes and external data are checked before the model is returned.
        """
        name = str(name)
        if MODEL_NAME.fullmatch(name) and not name.endswith(".onnx"):
            for model in self.list():
                if model.name == name:
                    return _checked(model)
            known = ", ".join(m.name for m in self.list()) or "none"
            raise ConfigurationError(
                f"no model named {name!r} in the model directory or the shipped models "
                f"(known: {known})"
            )
        return _checked(self._by_path(name))

    def _by_path(self, name: str) -> ModelInfo:
        """The .onnx file at ``name`` (relative: to the model directory), if it lies in one."""
        if "\0" in name or len(name) > 4096:
            raise ConfigurationError("a model path must be a file path")
        raw = Path(name)
        if raw.parts[:1] and raw.parts[0].startswith("~"):
            raise ConfigurationError(f"model path {name!r}: '~' is not expanded; give a name")
        if ".." in raw.parts:
            raise ConfigurationError(f"model path {name!r} climbs with '..': give a model name")
        if raw.suffix != ".onnx":
            raise ConfigurationError(f"model path {name!r} does not name an .onnx file")
        refusal = (
            f"model path {name!r} is no model file inside the model directory or the shipped models"
        )
        for folder, _ in self._roots():
            if not folder.is_dir():
                continue
            root = folder.resolve()
            candidate = raw if raw.is_absolute() else folder / raw
            if not lies_in(root, candidate):
                continue
            path = confined(root, candidate, name)  # refuses symlinks pointing out
            if path.is_file():
                return ModelInfo(raw.stem, candidate, "file", _card(root, candidate))
        raise ConfigurationError(refusal)


def confined(root: Path, path: Path, shown: str) -> Path:
    """``path`` resolved, when it lies in ``root``; a symlink pointing out is refused.

    ``shown`` is what the caller asked for: errors repeat it, never the server's paths.
    """
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise ConfigurationError(f"model {shown!r} cannot be resolved") from exc
    if resolved.is_relative_to(root):
        return resolved
    if Path(os.path.normpath(path)).is_relative_to(root):
        raise ConfigurationError(
            f"model {shown!r} is a symlink pointing out of the model directory"
        )
    raise ConfigurationError(f"model {shown!r} is not inside the model directory")


def _card(root: Path, model_path: Path) -> ModelCard | None:
    """The card beside a model, read only from inside ``root`` and only when small.

    A broken or refused card must not hide the model: it runs without one.
    """
    path = model_path.with_suffix(".json")
    if not path.exists() and not path.is_symlink():
        return None
    try:
        resolved = confined(root, path, path.name)
        info = resolved.stat()
        if not stat.S_ISREG(info.st_mode):
            raise ConfigurationError(f"model card {path.name!r} is not a regular file")
        if info.st_size > MAX_CARD_BYTES:
            raise ConfigurationError(
                f"model card {path.name!r} is {info.st_size} bytes, more than {MAX_CARD_BYTES}"
            )
        return ModelCard.load(resolved)
    except Exception as exc:  # a broken card must not hide the model
        logger.warning("model card %s is unreadable: %s", path.name, exc)
        return None


def _checked(model: ModelInfo) -> ModelInfo:
    """``model`` if its file is a regular file of sane size with its data beside it."""
    try:
        info = model.path.stat()
    except OSError as exc:
        raise ConfigurationError(f"model {model.name!r} cannot be read") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ConfigurationError(f"model {model.name!r} is not a regular file")
    if info.st_size == 0:
        raise ConfigurationError(f"model {model.name!r} is empty")
    if info.st_size > MAX_MODEL_BYTES:
        raise ConfigurationError(
            f"model {model.name!r} is {info.st_size} bytes, more than the {MAX_MODEL_BYTES} "
            "an ONNX file may hold"
        )
    _check_external_data(model)
    return model


def _check_external_data(model: ModelInfo) -> None:
    """Refuse external-data files outside the model's folder (ONNX Runtime would read them).

    ONNX Runtime resolves a tensor's ``location`` against the model's folder
    and reads it, so a model file could otherwise pull any readable file in as
    weights. The file is a protobuf; the walk below reads only the messages that
    can hold tensors (initializers, node attributes, subgraphs, functions).
    """
    from hxn_liveptycho.nn.onnx_graph import _fields

    folder = model.path.resolve().parent
    try:
        data = memoryview(model.path.read_bytes())
        locations = list(_model_locations(_fields, data))
    except (ConfigurationError, IndexError, ValueError, UnicodeError) as exc:
        raise ConfigurationError(f"model {model.name!r} is not an ONNX model") from exc
    for location in locations:
        raw = Path(location)
        if raw.is_absolute() or ".." in raw.parts or not location:
            raise ConfigurationError(
                f"model {model.name!r} names external data {location!r} outside its folder"
            )
        path = folder / raw
        resolved = path.resolve()
        if not resolved.is_relative_to(folder):
            raise ConfigurationError(
                f"model {model.name!r}: its external data {location!r} is a symlink pointing "
                "out of the model directory"
            )
        try:
            info = resolved.stat()
        except OSError as exc:
            raise ConfigurationError(
                f"model {model.name!r}: its external data {location!r} is missing"
            ) from exc
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_EXTERNAL_BYTES:
            raise ConfigurationError(
                f"model {model.name!r}: its external data {location!r} is not a regular file "
                f"of at most {MAX_EXTERNAL_BYTES} bytes"
            )


# Field numbers of onnx/onnx.proto that lead to tensors.
_MODEL_GRAPH, _MODEL_FUNCTIONS = 7, 25
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE = 1, 5, 15
_NODE_ATTRIBUTE = 5
_ATTR_TENSOR, _ATTR_GRAPH, _ATTR_TENSORS, _ATTR_GRAPHS = 5, 6, 10, 11
_ATTR_SPARSE, _ATTR_SPARSES = 22, 23
_FUNCTION_NODE, _FUNCTION_ATTRIBUTE = 7, 11
_TENSOR_EXTERNAL = 13
_LEN = 2


def _model_locations(fields: Any, model: memoryview) -> Iterator[str]:
    """Every external-data ``location`` in a serialized ModelProto."""
    for number, wire, value in fields(model):
        if wire != _LEN:
            continue
        if number == _MODEL_GRAPH:
            yield from _graph_locations(fields, value, 0)
        elif number == _MODEL_FUNCTIONS:
            for n2, w2, v2 in fields(value):
                if w2 == _LEN and n2 == _FUNCTION_NODE:
                    yield from _node_locations(fields, v2, 0)
                elif w2 == _LEN and n2 == _FUNCTION_ATTRIBUTE:
                    yield from _attribute_locations(fields, v2, 0)


def _graph_locations(fields: Any, graph: memoryview, depth: int) -> Iterator[str]:
    if depth > MAX_GRAPH_DEPTH:
        raise ConfigurationError("subgraphs nest too deep")
    for number, wire, value in fields(graph):
        if wire != _LEN:
            continue
        if number == _GRAPH_NODE:
            yield from _node_locations(fields, value, depth)
        elif number == _GRAPH_INITIALIZER:
            yield from _tensor_locations(fields, value)
        elif number == _GRAPH_SPARSE:
            yield from _sparse_locations(fields, value)


def _node_locations(fields: Any, node: memoryview, depth: int) -> Iterator[str]:
    for number, wire, value in fields(node):
        if wire == _LEN and number == _NODE_ATTRIBUTE:
            yield from _attribute_locations(fields, value, depth)


def _attribute_locations(fields: Any, attribute: memoryview, depth: int) -> Iterator[str]:
    for number, wire, value in fields(attribute):
        if wire != _LEN:
            continue
        if number in (_ATTR_TENSOR, _ATTR_TENSORS):
            yield from _tensor_locations(fields, value)
        elif number in (_ATTR_GRAPH, _ATTR_GRAPHS):
            yield from _graph_locations(fields, value, depth + 1)
        elif number in (_ATTR_SPARSE, _ATTR_SPARSES):
            yield from _sparse_locations(fields, value)


def _sparse_locations(fields: Any, sparse: memoryview) -> Iterator[str]:
    for number, wire, value in fields(sparse):  # values (1) and indices (2) are tensors
        if wire == _LEN and number in (1, 2):
            yield from _tensor_locations(fields, value)


def _tensor_locations(fields: Any, tensor: memoryview) -> Iterator[str]:
    for number, wire, value in fields(tensor):
        if wire == _LEN and number == _TENSOR_EXTERNAL:
            entry = {n: bytes(v).decode() for n, w, v in fields(value) if w == _LEN}
            if entry.get(1) == "location":
                yield entry.get(2, "")
