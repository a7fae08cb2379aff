"""Model management: the models shipped with the package plus a local model directory.

A model is ``<name>.onnx`` with an optional card ``<name>.json`` beside it. The
local directory (``Settings.model_dir``) is searched first, so a beamline can
shadow a shipped model by dropping in its own under the same name.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.nn.backends import GraphIO
from hxn_liveptycho.nn.card import ModelCard

logger = logging.getLogger(__name__)

#: Where the package's own models live (installed as package data).
SHIPPED_DIR = Path(__file__).parent / "models"


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
        if self._sha256 is None:
            self._sha256 = hashlib.sha256(self.path.read_bytes()).hexdigest()
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

    def _scan(self, folder: Path | None, source: str) -> dict[str, ModelInfo]:
        if folder is None or not folder.is_dir():
            return {}
        found = {}
        for path in sorted(folder.glob("*.onnx")):
            card_path = path.with_suffix(".json")
            card = None
            if card_path.exists():
                try:
                    card = ModelCard.load(card_path)
                except Exception as exc:  # a broken card must not hide the model
                    logger.warning("model card %s is unreadable: %s", card_path, exc)
            found[path.stem] = ModelInfo(path.stem, path, source, card)
        return found

    def list(self) -> list[ModelInfo]:
        models = self._scan(self.shipped_dir, "shipped")
        models.update(self._scan(self.model_dir, "local"))
        return [models[k] for k in sorted(models)]

    def get(self, name: str) -> ModelInfo:
        """The model called ``name`` (or the ONNX file at path ``name``); clear error if none."""
        as_path = Path(name).expanduser()
        if as_path.suffix == ".onnx" and as_path.is_file():
            card = as_path.with_suffix(".json")
            return ModelInfo(
                as_path.stem, as_path, "file", ModelCard.load(card) if card.exists() else None
            )
        for model in self.list():
            if model.name == name:
                return model
        known = ", ".join(m.name for m in self.list()) or "none"
        where = f"{self.model_dir} and " if self.model_dir else ""
        raise ConfigurationError(
            f"no model named {name!r} in {where}{self.shipped_dir} (known: {known})"
        )
