"""The model card: what a network expects, what it returns, and what it was trained for.

It lives beside the model as ``<name>.json`` (``<name>.onnx`` + ``<name>.json``).
A model brought without one still runs (its I/O is read from the ONNX graph), but
the card is what lets a session check the physical geometry and lets users judge
the numbers it produces.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

#: Largest card read: a card is a page of text, so anything bigger is not one.
MAX_CARD_BYTES = 2**20


class TensorSpec(BaseModel):
    """One graph input or output: its name, shape (None or a name for dynamic axes), meaning."""

    model_config = ConfigDict(extra="forbid")

    name: str
    shape: list[int | str | None]
    dtype: str = "float32"
    description: str = ""


class TrainingGeometry(BaseModel):
    """The far-field geometry of the training data; together they fix the object pixel."""

    model_config = ConfigDict(extra="forbid")

    energy_kev: float
    distance_m: float
    detector_pixel_m: float
    crop_px: int = Field(description="Detector crop edge (the model's input size).")
    object_pixel_m: float = Field(description="lambda z / (crop p): the output's pixel size.")
    bright_field_radius_px: tuple[float, float] | None = Field(
        default=None,
        description="Range of the probe's bright-field disc radius (the zone plate's outer "
        "edge) in input pixels over the training probes; a session fits larger crops to it.",
    )


class ModelCard(BaseModel):
    """Everything a user or a session needs to know about one shipped or brought model."""

    model_config = ConfigDict(extra="allow")

    name: str
    version: str = "1"
    created: str = Field(default="", description="ISO date the model was trained/exported.")
    description: str = ""
    architecture: str = ""
    parameters: int | None = None
    opset: int | None = None
    inputs: list[TensorSpec] = Field(default_factory=list)
    amplitude_output: str = Field(default="amplitude", description="Output holding |O|.")
    phase_output: str = Field(default="phase", description="Output holding arg(O), radians.")
    outputs: list[TensorSpec] = Field(default_factory=list)
    normalisation: str = Field(
        default="", description="What the graph does to its input, and what its outputs mean."
    )
    geometry: TrainingGeometry | None = None
    training_data: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        """The card in ``path``; refused unread when larger than a card can be."""
        with Path(path).open("rb") as file:
            data = file.read(MAX_CARD_BYTES + 1)
        if len(data) > MAX_CARD_BYTES:
            raise ValueError(f"model card {Path(path).name} is over {MAX_CARD_BYTES} bytes")
        return cls.model_validate(json.loads(data))

    def save(self, path: Path) -> None:
        Path(path).write_text(self.model_dump_json(indent=2, exclude_none=True) + "\n")

    def to_markdown(self) -> str:
        """The card as a Markdown page (the CLI's ``models inspect`` and docs/nn.md show it)."""
        lines = [f"# Model card: {self.name} (version {self.version})", ""]
        if self.description:
            lines += [self.description, ""]
        facts = [
            ("created", self.created),
            ("architecture", self.architecture),
            ("parameters", f"{self.parameters:,}" if self.parameters else ""),
            ("ONNX opset", str(self.opset or "")),
        ]
        lines += [f"- **{k}**: {v}" for k, v in facts if v]
        lines += ["", "## Inputs and outputs", "", "| role | name | shape | meaning |"]
        lines += ["| --- | --- | --- | --- |"]
        for role, specs in (("input", self.inputs), ("output", self.outputs)):
            for spec in specs:
                shape = "x".join(
                    "B" if s is None or isinstance(s, str) else str(s) for s in spec.shape
                )
                lines.append(
                    f"| {role} | `{spec.name}` | {shape} {spec.dtype} | {spec.description} |"
                )
        if self.normalisation:
            lines += ["", "## Normalisation", "", self.normalisation]
        if self.geometry is not None:
            g = self.geometry
            lines += [
                "",
                "## Physical geometry it was trained for",
                "",
                f"{g.energy_kev:g} keV, detector distance {g.distance_m:g} m, detector pixel "
                f"{g.detector_pixel_m * 1e6:g} µm, crop {g.crop_px} px, so the object pixel is "
                f"{g.object_pixel_m * 1e9:.2f} nm. Other geometries scale the object pixel by "
                "lambda z / (N p); a session warns when its geometry differs by more than 5 %.",
            ]
            if g.bright_field_radius_px is not None:
                lo, hi = g.bright_field_radius_px
                lines += [
                    "",
                    f"The probes' bright-field disc had a radius of {lo:.1f}-{hi:.1f} input "
                    "pixels; a larger crop is cropped or binned so that the measured disc "
                    "comes closest to it.",
                ]
        for title, block in (
            ("Training data", self.training_data),
            ("Training", self.training),
            ("Metrics (held-out)", self.metrics),
        ):
            if block:
                lines += ["", f"## {title}", ""]
                lines += [f"- **{k}**: {_fmt(v)}" for k, v in block.items()]
        return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "; ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value)
    return str(value)
