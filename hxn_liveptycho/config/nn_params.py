"""Per-scan choices of the neural-network branch (part of ScanConfig, so runs record them).

Why here and not in :mod:`hxn_liveptycho.nn`: these are configuration, read by
:mod:`~hxn_liveptycho.config.scan` below the branch that uses them; in ``nn/`` they
made the configuration import the pipeline stage it configures.
"""

from __future__ import annotations

from pathlib import PurePath
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_MODEL = "ptychonn-hxn-128"


class NNParams(BaseModel):
    """Which model the NN branch runs and how much it may fall behind."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str = Field(
        default=DEFAULT_MODEL,
        description="Model name in Settings.model_dir or among the shipped models, or a path "
        "to an .onnx file.",
    )
    batch_size: int = Field(default=64, ge=1, le=4096, description="Frames per inference call.")
    fit: Literal["auto", "crop", "bin"] = Field(
        default="auto",
        description="How a crop larger than the model's input (an integer multiple of it) "
        "reaches the model: keep its central part (crop), sum blocks of pixels (bin), or "
        "whichever gives the object pixel the model card was trained for (auto).",
    )
    max_queued_frames: int = Field(
        default=4096,
        ge=1,
        description="Frames waiting for inference; beyond this new frames are dropped (counted).",
    )
    seed_solver: bool = Field(
        default=True,
        description="In mode 'both', hand each newer mosaic to the iterative solver, which "
        "takes it as its object where it has not yet worked long (the scan's start and each "
        "newly arriving region) and keeps its own object elsewhere. Seeds stop once the scan's "
        "frames are all in, so the final passes depend on the data alone.",
    )
    seed_mature_passes: int = Field(
        default=4,
        ge=1,
        description="Solver passes over a scan position after which the solver's own object "
        "there is kept over a newer mosaic; before that the mosaic replaces it in proportion "
        "to the passes still missing.",
    )

    @field_validator("model")
    @classmethod
    def _plain_model(cls, value: str) -> str:
        """Refuse what could only climb out of the model folders (the registry confines the rest).

        The name comes from settings, the API, the queue server or a start
        document; refusing it here makes a bad one fail where it enters, not at
        the next run's start.
        """
        if not value or len(value) > 4096 or any(ord(c) < 32 for c in value):
            raise ValueError("a model is a name or an .onnx path of printable characters")
        if ".." in PurePath(value).parts:
            raise ValueError(f"model {value!r} climbs with '..': give a model name")
        return value
