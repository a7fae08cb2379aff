"""PyTorch runtime: the model's own ONNX graph and weights executed by PyTorch.

Why it exists: a GPU machine may have PyTorch with CUDA but neither TensorRT
nor ONNX Runtime's CUDA provider (the lent H200 is one), and the branch would
then run on the CPU beside a free GPU. The graph is read from the ONNX file
itself (:mod:`hxn_liveptycho.nn.onnx_graph`, no ``onnx`` package needed) and
interpreted node by node, so any model built from the supported operators
runs, not only the shipped architecture, and the weights are exactly the
file's (its SHA-256 is what the run records).

On CUDA it runs in FP16 (convolutions in half precision with channels-last
tensors and cuDNN autotuning; the graph's input normalisation, whose squared
counts overflow half precision, stays in FP32 because casting happens at the
first convolution) and replays one CUDA graph per batch bucket (powers of
two up to ``max_batch``), so the Python interpretation costs nothing per
batch: a batch is padded to its bucket, copied through pinned host buffers
and replayed on the backend's own stream. On the CPU it runs eagerly in FP32;
that path exists to check the interpreter against ONNX Runtime, not for speed.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.nn.interface import GraphIO, as_batch
from hxn_liveptycho.nn.onnx_graph import OnnxGraph, OnnxNode, load_graph

logger = logging.getLogger(__name__)

Precision = Literal["fp16", "fp32"]

#: Operators the interpreter runs; a graph with any other is refused when it is loaded.
SUPPORTED_OPS = frozenset(
    {
        "Abs",
        "Add",
        "AveragePool",
        "BatchNormalization",
        "Clip",
        "Concat",
        "Constant",
        "Conv",
        "Div",
        "Exp",
        "Identity",
        "LeakyRelu",
        "Log",
        "MaxPool",
        "Mul",
        "Neg",
        "Pow",
        "ReduceMean",
        "ReduceSum",
        "Relu",
        "Resize",
        "Sigmoid",
        "Softplus",
        "Sqrt",
        "Sub",
        "Tanh",
    }
)


def torch_cuda_available() -> bool:
    """PyTorch is installed, built with CUDA, and sees a GPU.

    Importing PyTorch takes seconds, so a machine without an NVIDIA driver is
    ruled out first from the files the driver creates.
    """
    if importlib.util.find_spec("torch") is None:
        return False
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    if not (os.path.exists("/proc/driver/nvidia/version") or glob.glob("/dev/nvidia*")):
        return False
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # a broken install is "not available", not a crash
        return False


def _symmetric_pads(node: OnnxNode, dims: int) -> tuple[int, ...]:
    pads = [int(p) for p in node.attributes.get("pads", [0] * (2 * dims))]
    begin, end = pads[:dims], pads[dims:]
    if begin != end:
        raise ConfigurationError(f"{node.op_type} {node.name!r}: asymmetric pads {pads}")
    if node.attributes.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID"):
        raise ConfigurationError(f"{node.op_type} {node.name!r}: auto_pad is not supported")
    return tuple(begin)


class GraphModule:
    """An ONNX graph as a callable over torch tensors (one input, any number of outputs).

    Not an ``nn.Module``: nothing here trains, and keeping the weights in a
    plain dict keeps the interpreter small. Constant inputs (weights, Resize
    scales, reduction axes) are resolved once when the module is built, so a
    call only launches kernels and can be captured in a CUDA graph.
    """

    def __init__(self, graph: OnnxGraph, *, device: Any, precision: Precision = "fp32") -> None:
        import torch

        unsupported = sorted(graph.op_types - SUPPORTED_OPS)
        if unsupported:
            raise ConfigurationError(
                f"the PyTorch runtime does not support the operators {unsupported}; "
                "use TensorRT or ONNX Runtime for this model"
            )
        if len(graph.inputs) != 1:
            raise ConfigurationError(f"expected one graph input, got {list(graph.inputs)}")
        self.graph = graph
        self.device = torch.device(device)
        self.half = precision == "fp16"
        self.input_name = next(iter(graph.inputs))
        self._torch = torch
        self._F = torch.nn.functional
        #: Values known before any input arrives: initializers and Constant outputs.
        self.constants: dict[str, np.ndarray] = dict(graph.initializers)
        for node in graph.nodes:
            if node.op_type == "Constant":
                self.constants[node.outputs[0]] = self._constant_value(node)
        conv_weights = {
            name
            for node in graph.nodes
            if node.op_type == "Conv"
            for name in node.inputs[1:3]
            if name
        }
        self.tensors: dict[str, Any] = {}
        for name, value in self.constants.items():
            t = torch.from_numpy(np.ascontiguousarray(value)).to(self.device)
            if name in conv_weights and self.half and t.is_floating_point():
                t = t.half()
                if t.ndim == 4 and self.device.type == "cuda":
                    t = t.contiguous(memory_format=torch.channels_last)
            self.tensors[name] = t
        self._steps = [self._compile(node) for node in graph.nodes if node.op_type != "Constant"]

    # ---- building --------------------------------------------------------------------
    @staticmethod
    def _constant_value(node: OnnxNode) -> np.ndarray:
        attrs = node.attributes
        for key, dtype in (
            ("value", None),
            ("value_float", np.float32),
            ("value_floats", np.float32),
            ("value_int", np.int64),
            ("value_ints", np.int64),
        ):
            if key in attrs:
                return np.asarray(attrs[key], dtype=dtype)
        raise ConfigurationError(f"Constant {node.name!r}: unsupported value {list(attrs)}")

    def _static(self, node: OnnxNode, index: int) -> np.ndarray | None:
        if index >= len(node.inputs) or not node.inputs[index]:
            return None
        name = node.inputs[index]
        if name not in self.constants:
            raise ConfigurationError(
                f"{node.op_type} {node.name!r}: input {name!r} must be a constant"
            )
        return self.constants[name]

    def _compile(self, node: OnnxNode) -> tuple[Callable[..., Any], list[str], list[str]]:
        """One node as (function of its tensor inputs, input names, output names)."""
        torch, F = self._torch, self._F
        a = node.attributes
        op = node.op_type
        fn: Callable[..., Any]
        inputs = list(node.inputs)
        if op == "Conv":
            kernel = len(self.constants[node.inputs[1]].shape) - 2
            if kernel != 2:
                raise ConfigurationError(f"Conv {node.name!r}: only 2-D convolutions")
            stride = tuple(a.get("strides", [1, 1]))
            dilation = tuple(a.get("dilations", [1, 1]))
            padding = _symmetric_pads(node, 2)
            groups = int(a.get("group", 1))
            channels_last = self.device.type == "cuda" and self.half

            def fn(x: Any, w: Any, b: Any = None) -> Any:
                x = x.to(w.dtype)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                return F.conv2d(x, w, b, stride, padding, dilation, groups)

        elif op in ("MaxPool", "AveragePool"):
            kernel_shape = tuple(a["kernel_shape"])
            stride = tuple(a.get("strides", [1] * len(kernel_shape)))
            padding = _symmetric_pads(node, len(kernel_shape))
            ceil = bool(a.get("ceil_mode", 0))
            if op == "MaxPool":
                dilation = tuple(a.get("dilations", [1] * len(kernel_shape)))

                def fn(x: Any) -> Any:
                    return F.max_pool2d(x, kernel_shape, stride, padding, dilation, ceil)

            else:
                include_pad = bool(a.get("count_include_pad", 0))

                def fn(x: Any) -> Any:
                    return F.avg_pool2d(x, kernel_shape, stride, padding, ceil, include_pad)

        elif op == "Resize":
            fn = self._resize(node)
            inputs = inputs[:1]
        elif op in ("ReduceMean", "ReduceSum"):
            axes = a.get("axes")
            static = self._static(node, 1)
            if axes is None and static is not None:
                axes = [int(v) for v in np.ravel(static)]
            keep = bool(a.get("keepdims", 1))
            dims = tuple(int(v) for v in axes) if axes else None
            reduce = torch.mean if op == "ReduceMean" else torch.sum
            inputs = inputs[:1]

            def fn(x: Any) -> Any:
                if dims is None:
                    out = reduce(x)
                    return out.reshape([1] * x.ndim) if keep else out
                return reduce(x, dim=dims, keepdim=keep)

        elif op == "LeakyRelu":
            slope = float(a.get("alpha", 0.01))

            def fn(x: Any) -> Any:
                return F.leaky_relu(x, slope)

        elif op == "BatchNormalization":
            eps = float(a.get("epsilon", 1e-5))

            def fn(x: Any, scale: Any, bias: Any, mean: Any, var: Any) -> Any:
                return F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)

        elif op == "Clip":
            lo = self._static(node, 1)
            hi = self._static(node, 2)
            lo_v = float(a.get("min", lo if lo is not None else -math.inf))
            hi_v = float(a.get("max", hi if hi is not None else math.inf))
            inputs = inputs[:1]

            def fn(x: Any) -> Any:
                return torch.clamp(x, lo_v, hi_v)

        elif op == "Concat":
            axis = int(a["axis"])

            def fn(*xs: Any) -> Any:
                return torch.cat(xs, dim=axis)

        else:
            simple: dict[str, Callable[..., Any]] = {
                "Abs": torch.abs,
                "Add": torch.add,
                "Div": torch.div,
                "Exp": torch.exp,
                "Identity": lambda x: x,
                "Log": torch.log,
                "Mul": torch.mul,
                "Neg": torch.neg,
                "Pow": torch.pow,
                "Relu": torch.relu,
                "Sigmoid": torch.sigmoid,
                "Softplus": F.softplus,
                "Sqrt": torch.sqrt,
                "Sub": torch.sub,
                "Tanh": torch.tanh,
            }
            fn = simple[op]
        return fn, inputs, list(node.outputs)

    def _resize(self, node: OnnxNode) -> Callable[[Any], Any]:
        F = self._F
        a = node.attributes
        mode = a.get("mode", b"nearest").decode()
        transform = a.get("coordinate_transformation_mode", b"half_pixel").decode()
        scales = self._static(node, 2)
        sizes = self._static(node, 3)
        if mode == "linear":
            if transform not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
                raise ConfigurationError(f"Resize {node.name!r}: linear with {transform!r}")
            kwargs: dict[str, Any] = {
                "mode": "bilinear",
                "align_corners": transform == "align_corners",
            }
        elif mode == "nearest":
            if transform != "asymmetric" or a.get("nearest_mode", b"floor") != b"floor":
                raise ConfigurationError(f"Resize {node.name!r}: nearest with {transform!r}")
            kwargs = {"mode": "nearest"}
        else:
            raise ConfigurationError(f"Resize {node.name!r}: mode {mode!r} is not supported")
        if sizes is not None and sizes.size:
            size = tuple(int(s) for s in sizes[-2:])

            def resize(x: Any) -> Any:
                return F.interpolate(x, size=size, **kwargs)

            return resize
        if scales is None or scales.size < 4 or np.any(scales[:2] != 1):
            raise ConfigurationError(f"Resize {node.name!r}: needs constant spatial scales")
        factor = tuple(float(s) for s in scales[-2:])

        def resize_by(x: Any) -> Any:
            return F.interpolate(x, scale_factor=factor, **kwargs)

        return resize_by

    # ---- running ---------------------------------------------------------------------
    def __call__(self, x: Any) -> dict[str, Any]:
        env = dict(self.tensors)
        env[self.input_name] = x
        for fn, inputs, outputs in self._steps:
            args = [env[name] if name else None for name in inputs]
            while args and args[-1] is None:  # optional trailing inputs left out
                args.pop()
            env[outputs[0]] = fn(*args)
        return {name: env[name] for name in self.graph.outputs}


class TorchBackend:
    """The model on PyTorch, on GPU ``device_id`` when CUDA is there, else on the CPU."""

    def __init__(
        self,
        model_path: Path,
        io: GraphIO,
        *,
        device: str | None = None,
        device_id: int = 0,
        precision: Precision | None = None,
        max_batch: int = 256,
        cuda_graphs: bool = True,
    ) -> None:
        import torch

        self._torch = torch
        self._io = io
        if device is None:
            device = f"cuda:{device_id}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        on_gpu = self.device.type == "cuda"
        self.precision: Precision = precision or ("fp16" if on_gpu else "fp32")
        self.max_batch = max(1, int(max_batch))
        self.name = "torch-cuda" if on_gpu else "torch-cpu"
        graph = load_graph(model_path)
        for wanted in (io.input, io.amplitude, io.phase):
            if wanted not in graph.inputs and wanted not in graph.outputs:
                raise ConfigurationError(f"the graph has no tensor named {wanted!r}")
        shape = graph.inputs[io.input]
        if len(shape) != 4 or not all(isinstance(s, int) for s in shape[-2:]):
            raise ConfigurationError(f"expected a (B, 1, n, n) input, the graph has {shape}")
        self.input_hw = (int(shape[-2]), int(shape[-1]))  # type: ignore[arg-type]
        if on_gpu:
            torch.backends.cudnn.benchmark = True
            if self.precision == "fp32":
                # FP32 is the reference-grade mode: cuDNN's default TF32 convolutions round
                # operands to 10 bits, which moved the phases visibly on the H200.
                torch.backends.cudnn.allow_tf32 = False
                torch.backends.cuda.matmul.allow_tf32 = False
            self._stream = torch.cuda.Stream(device=self.device)
        with self._device_context():
            self.module = GraphModule(graph, device=self.device, precision=self.precision)
        self.cuda_graphs = cuda_graphs and on_gpu
        self._graphs: dict[int, tuple[Any, Any, Any, Any]] = {}
        self._pinned: dict[int, tuple[Any, Any, Any]] = {}

    def _device_context(self) -> Any:
        import contextlib

        if self.device.type == "cuda":
            return self._torch.cuda.device(self.device)
        return contextlib.nullcontext()

    def _forward(self, x: Any) -> tuple[Any, Any]:
        out = self.module(x)
        return out[self._io.amplitude].float(), out[self._io.phase].float()

    # ---- CUDA graphs -----------------------------------------------------------------
    def buckets(self) -> list[int]:
        """Batch sizes that get a graph: powers of two below ``max_batch``, and it."""
        sizes, b = [], 1
        while b < self.max_batch:
            sizes.append(b)
            b *= 2
        return [*sizes, self.max_batch]

    def _bucket(self, count: int) -> int:
        return next(b for b in self.buckets() if b >= count)

    def _graph(self, bucket: int) -> tuple[Any, Any, Any, Any]:
        """(graph, static input, static amplitude, static phase) for ``bucket`` frames."""
        if bucket in self._graphs:
            return self._graphs[bucket]
        torch = self._torch
        n, m = self.input_hw
        # no_grad, not inference_mode: the static input is written in place at every call,
        # which PyTorch forbids on an inference-mode tensor outside that mode.
        with torch.cuda.device(self.device), torch.no_grad():
            static_in = torch.zeros((bucket, 1, n, m), device=self.device)
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                for _ in range(3):  # cuDNN picks its algorithms before capture
                    self._forward(static_in)
            self._stream.synchronize()
            # Each graph keeps its own memory: graphs of different buckets are replayed in
            # any order, which a shared pool does not allow.
            graph = torch.cuda.CUDAGraph()
            # thread_local: a solver launching on the same GPU from another thread of this
            # process (the branch on a thread) must not break, nor be broken by, the capture.
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                amp, phase = self._forward(static_in)
        self._graphs[bucket] = (graph, static_in, amp, phase)
        return self._graphs[bucket]

    def warm(self, batch_sizes: Sequence[int] | None = None) -> None:
        """Capture the graphs a run will use now, not on its first frames."""
        if not self.cuda_graphs:
            return
        for bucket in sorted(
            {self._bucket(min(b, self.max_batch)) for b in batch_sizes or []} or self.buckets()
        ):
            self._graph(bucket)

    def _staging(self, bucket: int) -> tuple[Any, Any, Any]:
        if bucket not in self._pinned:
            torch = self._torch
            n, m = self.input_hw
            out = self._graph(bucket)[2].shape
            self._pinned[bucket] = (
                torch.zeros((bucket, 1, n, m), pin_memory=True),
                torch.empty(tuple(out), pin_memory=True),
                torch.empty(tuple(out), pin_memory=True),
            )
        return self._pinned[bucket]

    # ---- inference -------------------------------------------------------------------
    def infer_device(self, batch: Any) -> tuple[Any, Any]:
        """Run a batch (B, 1, n, n) float32 already on this device, eagerly; outputs stay there."""
        with self._torch.inference_mode():
            return self._forward(batch)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            self._stream.synchronize()

    def infer(self, amplitudes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        torch = self._torch
        x = as_batch(amplitudes)
        if not self.cuda_graphs:
            with torch.inference_mode(), self._device_context():
                amp, phase = self._forward(torch.from_numpy(x).to(self.device))
                return amp[:, 0].cpu().numpy(), phase[:, 0].cpu().numpy()
        amps, phases = [], []
        with torch.cuda.device(self.device):
            for start in range(0, len(x), self.max_batch):
                chunk = x[start : start + self.max_batch]
                k = len(chunk)
                bucket = self._bucket(k)
                graph, static_in, static_amp, static_phase = self._graph(bucket)
                host_in, host_amp, host_phase = self._staging(bucket)
                host_in.numpy()[:k] = chunk
                if k < bucket:
                    host_in.numpy()[k:] = 0.0
                with torch.cuda.stream(self._stream):
                    static_in.copy_(host_in, non_blocking=True)
                    graph.replay()
                    host_amp.copy_(static_amp, non_blocking=True)
                    host_phase.copy_(static_phase, non_blocking=True)
                self._stream.synchronize()
                amps.append(host_amp.numpy()[:k, 0].copy())
                phases.append(host_phase.numpy()[:k, 0].copy())
        return np.concatenate(amps), np.concatenate(phases)

    def close(self) -> None:
        self._graphs.clear()
        self._pinned.clear()
