"""TensorRT backend: an engine built from the ONNX graph, cached on disk, run on CuPy buffers.

Written against the TensorRT 10 Python API (named I/O tensors,
``set_input_shape`` / ``set_tensor_address`` / ``execute_async_v3``; no
bindings, no implicit batch). The engine is built once per model, GPU and
TensorRT version, with one optimisation profile over the batch (1 to
``max_batch``), in FP16 where the builder offers the flag (TensorRT 10; 11 is
strongly typed and runs the graph's own precision), and cached under
``cache_dir`` with all three in its file name, so a new GPU or TensorRT never
loads a stale engine.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.nn.interface import GraphIO, as_batch

logger = logging.getLogger(__name__)


def engine_cache_key(model_bytes: bytes, gpu_name: str, trt_version: str, fp16: bool) -> str:
    """What an engine depends on: the graph, the GPU model, TensorRT's version, the precision."""
    digest = hashlib.sha256(model_bytes).hexdigest()[:16]
    gpu = "".join(c if c.isalnum() else "-" for c in gpu_name)
    return f"{digest}-{gpu}-trt{trt_version}-{'fp16' if fp16 else 'fp32'}"


class TensorRTBackend:
    """One engine and execution context on GPU ``device_id``; ``infer`` runs on its own stream."""

    name = "tensorrt"

    def __init__(
        self,
        model_path: Path,
        io: GraphIO,
        *,
        device_id: int = 0,
        cache_dir: Path | None = None,
        max_batch: int = 256,
        opt_batch: int = 64,
        fp16: bool = True,
    ) -> None:
        import cupy
        import tensorrt as trt

        self._trt = trt
        self._cp = cupy
        self._io = io
        self.device_id = device_id
        self.max_batch = max_batch
        self._logger = trt.Logger(trt.Logger.WARNING)
        model_bytes = Path(model_path).read_bytes()
        self._device = cupy.cuda.Device(device_id)
        with self._device:
            gpu_name = cupy.cuda.runtime.getDeviceProperties(device_id)["name"].decode()
            self.fp16 = fp16 and hasattr(trt.BuilderFlag, "FP16")
            key = engine_cache_key(model_bytes, gpu_name, trt.__version__, self.fp16)
            cache_dir = Path(cache_dir or Path(tempfile.gettempdir()) / "liveptycho-trt")
            self.engine_path = cache_dir / f"{Path(model_path).stem}-{key}-b{max_batch}.engine"
            runtime = trt.Runtime(self._logger)
            if self.engine_path.exists():
                serialized = self.engine_path.read_bytes()
                logger.info("TensorRT engine from cache %s", self.engine_path)
            else:
                serialized = self._build(model_bytes, opt_batch)
                cache_dir.mkdir(parents=True, exist_ok=True)
                tmp = self.engine_path.with_suffix(f".tmp{os.getpid()}")
                tmp.write_bytes(serialized)
                tmp.replace(self.engine_path)
                logger.info("TensorRT engine built and cached at %s", self.engine_path)
            self._engine = runtime.deserialize_cuda_engine(serialized)
            if self._engine is None:
                raise ConfigurationError(f"TensorRT could not load the engine {self.engine_path}")
            self._context = self._engine.create_execution_context()
            self._stream = cupy.cuda.Stream(non_blocking=True)
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if inputs != [io.input] or not {io.amplitude, io.phase} <= set(names):
            raise ConfigurationError(f"engine tensors {names} do not match the model's I/O ({io})")
        shape = self._engine.get_tensor_shape(io.input)
        self.input_hw = (int(shape[-2]), int(shape[-1]))
        self._out_dtype = {
            n: np.dtype(trt.nptype(self._engine.get_tensor_dtype(n)))
            for n in (io.amplitude, io.phase)
        }

    def _build(self, model_bytes: bytes, opt_batch: int) -> bytes:
        trt = self._trt
        builder = trt.Builder(self._logger)
        network = builder.create_network(0)  # TensorRT 10: always explicit batch
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(model_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ConfigurationError(f"TensorRT cannot parse the ONNX model: {errors}")
        config = builder.create_builder_config()
        if self.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        shape = tuple(network.get_input(0).shape)[1:]
        profile = builder.create_optimization_profile()
        opt = max(1, min(opt_batch, self.max_batch))
        profile.set_shape(self._io.input, (1, *shape), (opt, *shape), (self.max_batch, *shape))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise ConfigurationError("TensorRT failed to build an engine (see its log above)")
        return bytes(serialized)

    def infer_device(self, batch: Any) -> tuple[Any, Any]:
        """Run a CuPy batch (B, 1, n, n) float32 already on this GPU; outputs stay there."""
        cp = self._cp
        ctx = self._context
        ctx.set_input_shape(self._io.input, tuple(batch.shape))
        ctx.set_tensor_address(self._io.input, int(batch.data.ptr))
        outputs = []
        for name in (self._io.amplitude, self._io.phase):
            out = cp.empty(tuple(ctx.get_tensor_shape(name)), dtype=self._out_dtype[name])
            ctx.set_tensor_address(name, int(out.data.ptr))
            outputs.append(out)
        if not ctx.execute_async_v3(self._stream.ptr):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return outputs[0], outputs[1]

    def infer(self, amplitudes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = as_batch(amplitudes)
        amps, phases = [], []
        with self._device, self._stream:
            for start in range(0, len(x), self.max_batch):
                batch = self._cp.asarray(x[start : start + self.max_batch])
                amplitude, phase = self.infer_device(batch)
                amps.append(self._cp.asnumpy(amplitude[:, 0], stream=self._stream))
                phases.append(self._cp.asnumpy(phase[:, 0], stream=self._stream))
            self._stream.synchronize()
        return (
            np.concatenate(amps).astype(np.float32, copy=False),
            np.concatenate(phases).astype(np.float32, copy=False),
        )

    def synchronize(self) -> None:
        """Wait for the work queued by :meth:`infer_device`."""
        self._stream.synchronize()

    def close(self) -> None:
        self._context = None
        self._engine = None
