"""Deployment settings: where data comes from and where results go.

Read from ``LIVEPTYCHO_*`` environment variables (nested fields with ``__``),
so a beamline profile, ``liveptycho serve`` and queueserver share one source
of truth. Scan-specific choices live in :class:`~hxn_liveptycho.config.scan.ScanConfig`.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.recon.placement import GpuPlacement
from hxn_liveptycho.recon.quality import QualitySettings
from hxn_liveptycho.recon.rank_hub import LiveRanks
from hxn_liveptycho.streams.crop import DetectorCrop
from hxn_liveptycho.util.validation import validation_problems

logger = logging.getLogger(__name__)

ENV_PREFIX = "LIVEPTYCHO_"
#: ``LIVEPTYCHO_*`` names that are not settings but are read on purpose elsewhere.
OTHER_ENV_NAMES = frozenset({"LIVEPTYCHO_TEST_ARTIFACTS"})
#: Query keys whose values are secrets in a URI.
SECRET_QUERY_KEYS = frozenset({"api_key", "apikey", "token", "access_token", "password", "key"})

DEFAULT_PLAN_NAMES = ("fly2dpd", "fly2d", "FlyPlan2D", "hxn_fly2d_panda")


def default_data_dir() -> Path:
    return Path.home() / ".local" / "share" / "hxn_liveptycho"


class Settings(BaseSettings):
    """Where LivePtycho listens and writes; every field has an env var ``LIVEPTYCHO_<NAME>``."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid"
    )

    def __init__(self, **values: Any) -> None:
        """Read the fields from ``values`` and ``LIVEPTYCHO_*``; a bad one is one line.

        Raises :class:`~hxn_liveptycho.errors.ConfigurationError` naming the
        environment variable (or the field, when given here) and what it accepts;
        an unknown ``LIVEPTYCHO_*`` name is logged once as a warning.
        """
        warn_unknown_environment()
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise ConfigurationError(_settings_problem(exc, values)) from None
        except SettingsError as exc:
            field = re.search(r'field "(\w+)"', str(exc))
            where = _env_name((field.group(1),)) if field else "LIVEPTYCHO_*"
            cause = exc.__cause__ if exc.__cause__ is not None else exc
            raise ConfigurationError(f"invalid settings: {where}: cannot parse: {cause}") from None

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
    live_quality: QualitySettings = Field(
        default_factory=QualitySettings,
        description="Quality maps and convergence flag sent with every snapshot "
        "(LIVEPTYCHO_LIVE_QUALITY__<FIELD>).",
    )
    ranks: LiveRanks = Field(
        default_factory=LiveRanks,
        description="Ranks that reconstruct each scan together (docs/scaling.md): the solver "
        "process is rank 0 and starts the others itself through MPI; one rank by default "
        "(LIVEPTYCHO_RANKS__COUNT=2, LIVEPTYCHO_RANKS__GPUS='[0,1]').",
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
    checkpoint_interval_s: float | None = Field(
        default=10.0,
        ge=0.0,
        description="Least time between a running run's solver checkpoints, written with its "
        "live snapshots under <data_dir>/checkpoints so that a restarted serve can resume "
        "it (see docs/resume.md); None: no checkpoints.",
    )
    resume_timeout_s: float = Field(
        default=60.0,
        gt=0.0,
        description="How long a run resumed from its checkpoint after a restart waits for "
        "more of its data before it ends 'incomplete' with the checkpoint's object and probe.",
    )
    tiled_write_timeout_s: float = Field(
        default=120.0, gt=0.0, description="How long a run's final write to Tiled may take."
    )
    tiled_retry_s: float = Field(
        default=20.0,
        ge=0.0,
        description="How long a run's final write is tried again (waiting longer each time) "
        "when Tiled refuses it, before the result goes to the local backup; uploaded from "
        "there when Tiled answers again.",
    )
    cxi_export_dir: Path | None = Field(
        default=None,
        description="When set, each run's final result is also written here as a CXI "
        "(NXcxi_ptycho) file, <container key>.cxi (see docs/cxi-export.md); a file that "
        "cannot be written is a warning and a counter, never a lost result.",
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
    series_key: str = Field(
        default="tomo_series",
        description="Start-document key naming a series (ptycho-tomography): runs with the "
        "same value are stacked by angle under <catalog_path>/series/<value>; empty: off.",
    )
    series_angle_key: str | None = Field(
        default=None,
        description="Start-document key holding a series projection's angle in degrees; "
        "None: the stage angle from the baseline (zpsth or dsth by the motors, as HXN reads it).",
    )
    series_seed_probe: bool = Field(
        default=True,
        description="Start each projection of a series from the newest probe of the one "
        "before (its final probe, else its latest live one) instead of a guess from the data.",
    )
    redis_url: str | None = Field(
        default=None,
        description="Redis that several `liveptycho serve` workers share to take each run "
        "exactly once (claims with expiry, heartbeats, take-over of a dead worker's runs; see "
        "docs/serve.md), e.g. redis://host:6379/0; None: this serve takes every run itself.",
    )
    worker_name: str | None = Field(
        default=None,
        description="This serve worker's name in Redis and in `liveptycho status --all`; "
        "None: host:pid.",
    )
    claim_ttl_s: float = Field(
        default=15.0,
        gt=0.0,
        description="How long a worker's claim on a run (and its registration) lives without "
        "a heartbeat: a worker silent this long is taken as dead and its runs are taken over.",
    )
    heartbeat_s: float = Field(
        default=3.0,
        gt=0.0,
        description="Time between a worker's heartbeats (claims refreshed, registration "
        "updated, dead workers' runs looked for); keep it well under claim_ttl_s.",
    )
    checkpoint_dir: Path | None = Field(
        default=None,
        description="Folder of the runs' checkpoints; None: <data_dir>/checkpoints. Serve "
        "workers that take over each other's runs point it at one folder they all read.",
    )

    @field_validator("overrides")
    @classmethod
    def _check_overrides(cls, value: dict[str, Any]) -> dict[str, Any]:
        from hxn_liveptycho.config.overrides import check_overrides  # imports ScanConfig

        return check_overrides(value)

    def public_view(self) -> dict[str, Any]:
        """The settings as JSON with every secret hidden: keys, tokens, ``api_key=`` in URIs."""
        return _redact_uris(self.model_dump(mode="json"))


def redact_uri(uri: str) -> str:
    """``uri`` with its password and secret query values (``api_key``, ``token``) hidden.

    :data:`SECRET_QUERY_KEYS` holds every query key the store's own ``redact`` hides
    (and more), so configuration needs nothing from the store to hide them.
    """
    try:
        parts = urlsplit(uri)
        query = [
            (k, "***" if k.lower() in SECRET_QUERY_KEYS else v)
            for k, v in parse_qsl(parts.query, keep_blank_values=True)
        ]
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, _, host = netloc.rpartition("@")
            user = userinfo.partition(":")[0]
            netloc = f"{user}:***@{host}" if ":" in userinfo else netloc
        return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*")))
    except ValueError:  # not a URI we can take apart: show nothing of it
        return "***"


def _redact_uris(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _redact_uris(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_uris(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return redact_uri(value)
    return value


def _env_name(loc: tuple[Any, ...]) -> str:
    return ENV_PREFIX + "__".join(str(part).upper() for part in loc)


def _settings_problem(exc: ValidationError, given: Mapping[str, Any]) -> str:
    """One line for a settings ValidationError: the variable (or field), its value, the rule."""
    problems = []
    for path, text in validation_problems(exc, Settings):
        top = path.split(".")[0]
        if top in given:
            problems.append(f"setting {path}: {text}")
        else:
            problems.append(f"{_env_name(tuple(path.split('.')))}: {text}")
    return "invalid settings: " + "; ".join(problems)


_warned: set[str] = set()
_warned_lock = threading.Lock()


def _env_names(model: type[BaseModel], prefix: str) -> list[str]:
    names = []
    for name, field in model.model_fields.items():
        env = prefix + name.upper()
        names.append(env)
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel):
            names.extend(_env_names(nested, env + "__"))
    return names


def warn_unknown_environment(environ: Mapping[str, str] | None = None) -> list[str]:
    """Warn (once per name) about ``LIVEPTYCHO_*`` variables no setting reads; return them.

    A misspelt name would otherwise be ignored silently and the default used.
    """
    environ = os.environ if environ is None else environ
    known = _env_names(Settings, ENV_PREFIX)
    known_set = set(known) | OTHER_ENV_NAMES
    # Nested names are validated by their field: a model refuses unknown ones with an error
    # (LIVEPTYCHO_GPU_PLACEMENT__ITERATVE), a dict takes any (LIVEPTYCHO_OVERRIDES__ROI__SIZE).
    open_ended = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    unknown = []
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in known_set:
            continue
        if "__" in upper and upper.split("__")[0] in open_ended:
            continue
        unknown.append(name)
        with _warned_lock:
            if name in _warned:
                continue
            _warned.add(name)
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]}?" if close else ""
        logger.warning("environment variable %s is not a liveptycho setting%s", name, hint)
    return unknown
