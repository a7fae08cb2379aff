"""The PyTorch runtime: the shipped ONNX graph and weights read without the ``onnx`` package
and executed by PyTorch, against ONNX Runtime on the CPU (the reference)."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.nn.backends import OnnxRuntimeBackend, open_backend
from hxn_liveptycho.nn.onnx_graph import load_graph
from hxn_liveptycho.nn.registry import ModelRegistry

torch = pytest.importorskip("torch", reason="PyTorch is not installed here")

from hxn_liveptycho.nn.torch_backend import GraphModule, TorchBackend  # noqa: E402

MODEL = "ptychonn-hxn-128"


@pytest.fixture(scope="module")
def model():
    return ModelRegistry(None).get(MODEL)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(0)
    # sqrt(counts) over four decades of flux, as the branch feeds it
    flux = np.array([3.0, 30.0, 300.0, 3000.0, 30.0])[:, None, None]
    return np.sqrt(rng.poisson(flux, (5, 128, 128))).astype(np.float32)


@pytest.fixture(scope="module")
def reference(model, frames):
    return OnnxRuntimeBackend(model.path, model.io(), threads=1).infer(frames)


def test_the_reader_finds_the_graph_and_every_weight(model):
    graph = load_graph(model.path)
    assert list(graph.inputs) == ["diffraction"]
    assert graph.inputs["diffraction"] == ("batch", 1, 128, 128)
    assert list(graph.outputs) == ["amplitude", "phase"]
    assert graph.opsets[""] == 17
    convs = [n for n in graph.nodes if n.op_type == "Conv"]
    assert len(convs) == 28
    for node in convs:  # every convolution's weight and bias is an initializer
        assert node.inputs[1] in graph.initializers and node.inputs[2] in graph.initializers
    # The weights are the bytes in the file: the first convolution's raw data is in it.
    first = graph.initializers[convs[0].inputs[1]]
    assert first.shape == (16, 1, 3, 3) and first.dtype == np.float32
    assert first.tobytes() in model.path.read_bytes()
    assert hashlib.sha256(model.path.read_bytes()).hexdigest() == model.sha256


def test_torch_fp32_on_the_cpu_matches_onnxruntime(model, frames, reference):
    backend = open_backend(model.path, model.io(), kind="torch", device_id=0)
    assert backend.name in ("torch-cpu", "torch-cuda")
    if backend.name == "torch-cuda":
        backend = TorchBackend(model.path, model.io(), device="cpu")
    amp, phase = backend.infer(frames)
    assert amp.shape == phase.shape == (5, 64, 64) and amp.dtype == np.float32
    np.testing.assert_allclose(amp, reference[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(phase, reference[1], rtol=1e-5, atol=1e-5)
    one, _ = backend.infer(frames[3])
    np.testing.assert_allclose(one[0], reference[0][3], rtol=1e-5, atol=1e-5)


def test_torch_fp16_stays_close_to_onnxruntime(model, frames, reference):
    """Half precision casts at the first convolution: the input normalisation (squared counts
    up to ~1e7, beyond FP16's range) runs in FP32, so bright frames do not overflow."""
    backend = TorchBackend(model.path, model.io(), device="cpu", precision="fp16")
    amp, phase = backend.infer(frames)
    assert np.all(np.isfinite(amp)) and np.all(np.isfinite(phase))
    assert float(np.abs(amp - reference[0]).max()) < 0.02 * float(np.abs(reference[0]).max())
    assert float(np.abs(phase - reference[1]).max()) < 0.02


def test_an_operator_the_interpreter_lacks_is_refused_by_name(model):
    graph = load_graph(model.path)
    node = next(n for n in graph.nodes if n.op_type == "Tanh")
    graph.nodes[graph.nodes.index(node)] = dataclasses.replace(node, op_type="GatherND")
    with pytest.raises(ConfigurationError, match=r"does not support the operators \['GatherND'\]"):
        GraphModule(graph, device="cpu")


@pytest.mark.gpu
def test_torch_cuda_fp16_graphs_match_onnxruntime_cpu(model, frames, reference):
    """The GPU path as the branch runs it: FP16, a CUDA graph per batch bucket, pinned buffers;
    a batch that is no bucket (33 frames, padded to 64) and a single frame."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    backend = open_backend(model.path, model.io(), kind="torch", device_id=0, max_batch=64)
    assert isinstance(backend, TorchBackend) and backend.name == "torch-cuda"
    assert backend.precision == "fp16" and backend.cuda_graphs
    rng = np.random.default_rng(1)
    x = np.sqrt(rng.poisson(30.0, (33, 128, 128))).astype(np.float32)
    x[:5] = frames
    ref_amp, ref_phase = OnnxRuntimeBackend(model.path, model.io()).infer(x)
    amp, phase = backend.infer(x)
    assert amp.shape == (33, 64, 64)
    assert float(np.abs(amp - ref_amp).max()) < 0.02 * float(np.abs(ref_amp).max())
    assert float(np.abs(phase - ref_phase).max()) < 0.02
    again, _ = backend.infer(x)  # a replay gives the same numbers
    np.testing.assert_array_equal(again, amp)
    single, _ = backend.infer(x[7])
    np.testing.assert_allclose(single[0], amp[7], atol=2e-3 * float(np.abs(ref_amp).max()))
    big = np.concatenate([x, x, x])  # more than max_batch: split into graphs of 64 and 64
    big_amp, _ = backend.infer(big)
    np.testing.assert_allclose(big_amp[66:], amp, atol=2e-3 * float(np.abs(ref_amp).max()))
    fp32 = TorchBackend(model.path, model.io(), device_id=0, precision="fp32", max_batch=64)
    amp32, phase32 = fp32.infer(x)
    np.testing.assert_allclose(amp32, ref_amp, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(phase32, ref_phase, rtol=1e-3, atol=1e-3)
