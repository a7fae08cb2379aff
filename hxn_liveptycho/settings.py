"""Deployment settings: where data comes from and where results go.

Read from ``LIVEPTYCHO_*`` environment variables (nested fields with ``__``),
so a beamline profile, ``liveptycho serve`` and queueserver share one source
of truth. Scan-specific choices live in :class:`~hxn_liveptycho.scan.ScanConfig`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from hxn_liveptycho.recon.placement import GpuPlacement
from hxn_liveptycho.streams.crop import DetectorCrop

DEFAULT_PLAN_NAMES = ("fly2dpd", "fly2d", "FlyPlan2D", "hxn_fly2d_panda")


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "hxn_liveptycho"


class Settings(BaseSettings):
    """Where LivePtycho listens and writes; every field has an env var ``LIVEPTYCHO_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix="LIVEPTYCHO_", env_nested_delimiter="__", extra="forbid"
    )

    tiled_uri: str | None = Field(
        default=None, description="Tiled server URL; None starts an embedded server."
    )
    tiled_api_key: SecretStr | None = Field(default=None, description="API key for tiled_uri.")
    catalog_path: str = Field(
        default="processed/liveptycho", description="Container path for processed runs."
    )
    data_dir: Path = Field(
        default_factory=default_data_dir,
        description="Embedded Tiled storage and local backups of results Tiled refused.",
    )
    eiger_endpoint: str | None = Field(
        default=None, description="Eiger SIMPLON stream (e.g. tcp://xf03id-eiger:9999)."
    )
    eiger_socket: Literal["sub", "pull"] = Field(
        default="sub", description="'pull' straight from a detector, 'sub' from a proxy."
    )
    eiger_flavour: Literal["auto", "v1", "v2"] = Field(
        default="auto", description="SIMPLON stream flavour: JSON v1, CBOR v2, or per message."
    )
    eiger_channel: str | None = Field(
        default="threshold_1", description="v2 image channel to reconstruct (None: the first)."
    )
    curve_server_key: SecretStr | None = Field(
        default=None, description="CurveZMQ: the stream server's public key (Z85 or base64)."
    )
    curve_public_key: SecretStr | None = Field(
        default=None, description="CurveZMQ: this client's public key (all three keys or none)."
    )
    curve_secret_key: SecretStr | None = Field(
        default=None, description="CurveZMQ: this client's secret key."
    )
    eiger_decode_threads: int = Field(
        default_factory=lambda: max(0, min(8, (os.cpu_count() or 1) - 2)),
        ge=0,
        description="Threads decoding Eiger frames (0: on the socket thread); default: "
        "cores - 2, at most 8.",
    )
    eiger_decode_processes: int = Field(
        default=0,
        ge=0,
        description="Worker processes receiving and decoding Eiger frames, each with its own "
        "PULL socket (needs eiger_socket='pull'); 0: one receiving process.",
    )
    eiger_crop: DetectorCrop | None = Field(
        default=None,
        description="Fixed detector window cut where frames are decoded (decode threads or "
        "worker processes); each run's ROI is cut from it. None: full frames.",
    )
    panda_endpoint: str | None = Field(default=None, description="PandA position publisher.")
    plan_names: tuple[str, ...] = Field(
        default=DEFAULT_PLAN_NAMES, description="Plans reconstructed without a metadata flag."
    )
    metadata_flag: str = Field(
        default="ptychography",
        description="Start-document key: True forces a run in, False keeps it out.",
    )
    array_backend: Literal["auto", "numpy", "cupy"] = Field(
        default="auto", description="Array module of the solver: CuPy on a GPU when present."
    )
    model_dir: Path = Field(
        default_factory=lambda: default_data_dir() / "models",
        description="Local ONNX models (<name>.onnx + <name>.json card); searched before the "
        "shipped ones.",
    )
    nn_backend: Literal["auto", "tensorrt", "torch", "onnxruntime-cuda", "onnxruntime"] = Field(
        default="auto",
        description="Runtime of the NN branch; auto: TensorRT, else PyTorch on CUDA, else ONNX "
        "Runtime CUDA, else ONNX Runtime on the CPU.",
    )
    gpu_placement: GpuPlacement = Field(
        default_factory=GpuPlacement,
        description="GPU per branch (LIVEPTYCHO_GPU_PLACEMENT__ITERATIVE / __NN): auto puts "
        "the solver on the first GPU and the NN branch on the second when there are two.",
    )
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="ScanConfig fields applied to every run."
    )
    live_interval_s: float = Field(
        default=2.0, gt=0.0, description="Least time between live snapshots written to Tiled."
    )
    stream_timeout_s: float = Field(
        default=15.0, gt=0.0, description="How long after 'stop' to wait for late frames."
    )
    run_idle_timeout_s: float | None = Field(
        default=None,
        gt=0.0,
        description="How long a run whose 'stop' has not come may go without any document "
        "or frame before it ends 'incomplete' with what it received; None: the scan's "
        "expected duration (points x dwell) plus 10 minutes.",
    )
    tiled_write_timeout_s: float = Field(
        default=120.0, gt=0.0, description="How long a run's final write to Tiled may take."
    )
    max_frames_in_flight: int = Field(
        default=4096, ge=16, description="Frames received but not yet taken by a session."
    )
    serve_host: str = Field(
        default="127.0.0.1",
        description="`liveptycho serve`: HTTP bind address; beyond loopback needs api_token.",
    )
    serve_port: int = Field(default=8765, ge=0, le=65535, description="Serve's HTTP port.")
    api_token: SecretStr | None = Field(
        default=None, description="Bearer token the serve API requires (when set)."
    )
    log_file: Path | None = Field(
        default=None, description="Serve also appends its log to this file."
    )
    documents_address: str = Field(
        default="tcp://127.0.0.1:5578",
        description="0MQ proxy output (PUB) that serve subscribes to for the RE's documents.",
    )
    documents_proxy_in: str | None = Field(
        default=None,
        description="When set, serve runs bluesky's 0MQ proxy itself: RunEngine Publishers "
        "connect here, documents_address is its output.",
    )
    documents_prefix: str = Field(
        default="", description="bluesky Publisher prefix to accept (empty: every publisher)."
    )
