"""Inference backends behind one interface: TensorRT, PyTorch, ONNX Runtime (CUDA or CPU).

Every backend takes measured amplitudes ``(B, n, n)`` float32 on the host and
returns the object amplitude and phase ``(B, m, m)`` float32 on the host. The
device is a constructor argument (never a global), so several branches can sit
on several GPUs. ``auto`` picks the fastest runtime that is installed *and*
works: TensorRT (with CuPy for device buffers), then PyTorch on CUDA (the
model's own graph in FP16 with CUDA graphs, :mod:`hxn_liveptycho.nn.torch_backend`:
faster than ONNX Runtime's CUDA provider in FP32, and often the only GPU
runtime a machine with PyTorch has), then ONNX Runtime's CUDA execution
provider, then ONNX Runtime on the CPU.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Literal

import numpy as np

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.nn.interface import GraphIO, InferenceBackend, as_batch

__all__ = [
    "BackendName",
    "GraphIO",
    "InferenceBackend",
    "OnnxRuntimeBackend",
    "as_batch",
    "onnxruntime_cuda_available",
    "open_backend",
    "tensorrt_available",
]

logger = logging.getLogger(__name__)

BackendName = Literal["auto", "tensorrt", "torch", "onnxruntime-cuda", "onnxruntime"]


class OnnxRuntimeBackend:
    """ONNX Runtime on the CPU, or on GPU ``device_id`` through its CUDA execution provider."""

    def __init__(
        self,
        model_path: Path,
        io: GraphIO,
        *,
        device_id: int | None = None,
        threads: int = 0,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        # Idle ONNX Runtime workers spin by default, taking cores from the solver and the
        # Tiled writer between batches; a live branch must sleep instead.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        providers: list[str | tuple[str, dict[str, object]]] = ["CPUExecutionProvider"]
        if device_id is not None:
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ConfigurationError(
                    "ONNX Runtime's CUDA execution provider is not installed "
                    "(pip install onnxruntime-gpu)"
                )
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device_id}))
        self._session = ort.InferenceSession(str(model_path), options, providers=providers)
        used = self._session.get_providers()
        if device_id is not None and "CUDAExecutionProvider" not in used:
            raise ConfigurationError(f"ONNX Runtime could not start CUDA on GPU {device_id}")
        self.name = "onnxruntime-cuda" if device_id is not None else "onnxruntime"
        self._io = io
        self._outputs = [io.amplitude, io.phase]
        shape = self._session.get_inputs()[0].shape
        self.input_hw = (int(shape[-2]), int(shape[-1]))

    def infer(self, amplitudes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        amplitude, phase = self._session.run(self._outputs, {self._io.input: as_batch(amplitudes)})
        return np.asarray(amplitude)[:, 0], np.asarray(phase)[:, 0]

    def close(self) -> None:
        self._session = None


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None and (
        importlib.util.find_spec("cupy") is not None
    )


def onnxruntime_cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def open_backend(
    model_path: Path,
    io: GraphIO,
    *,
    kind: BackendName = "auto",
    device_id: int = 0,
    cache_dir: Path | None = None,
    max_batch: int = 256,
    cpu_threads: int = 0,
) -> InferenceBackend:
    """Load ``model_path`` on the requested (or best available) runtime; say which in the log."""
    if kind == "auto":
        if tensorrt_available():
            try:
                return open_backend(
                    model_path,
                    io,
                    kind="tensorrt",
                    device_id=device_id,
                    cache_dir=cache_dir,
                    max_batch=max_batch,
                )
            except Exception as exc:  # a broken GPU stack falls back, loudly
                logger.warning("TensorRT unusable (%s); trying the next runtime", exc)
        from hxn_liveptycho.nn.torch_backend import torch_cuda_available

        if torch_cuda_available():
            try:
                return open_backend(
                    model_path, io, kind="torch", device_id=device_id, max_batch=max_batch
                )
            except Exception as exc:
                logger.warning("PyTorch on CUDA unusable (%s); trying ONNX Runtime", exc)
        if onnxruntime_cuda_available():
            try:
                return OnnxRuntimeBackend(model_path, io, device_id=device_id)
            except Exception as exc:
                logger.warning("ONNX Runtime CUDA unusable (%s); using the CPU", exc)
        kind = "onnxruntime"
    if kind == "tensorrt":
        from hxn_liveptycho.nn.tensorrt import TensorRTBackend

        backend: InferenceBackend = TensorRTBackend(
            model_path, io, device_id=device_id, cache_dir=cache_dir, max_batch=max_batch
        )
    elif kind == "torch":
        from hxn_liveptycho.nn.torch_backend import TorchBackend

        backend = TorchBackend(model_path, io, device_id=device_id, max_batch=max_batch)
    elif kind == "onnxruntime-cuda":
        backend = OnnxRuntimeBackend(model_path, io, device_id=device_id)
    else:
        backend = OnnxRuntimeBackend(model_path, io, threads=cpu_threads)
    logger.info("model %s runs on %s", Path(model_path).name, backend.name)
    return backend
