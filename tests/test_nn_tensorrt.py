"""The TensorRT backend. The engine tests run only where TensorRT (and a GPU) exist; the
cache key, which decides when an engine is rebuilt, is checked everywhere."""

from __future__ import annotations

import numpy as np
import pytest

from hxn_liveptycho.nn.tensorrt import engine_cache_key


def test_engine_cache_key_changes_with_model_gpu_version_and_precision():
    base = engine_cache_key(b"model-a", "NVIDIA H100 80GB HBM3", "10.13.0", True)
    assert base != engine_cache_key(b"model-b", "NVIDIA H100 80GB HBM3", "10.13.0", True)
    assert base != engine_cache_key(b"model-a", "NVIDIA H200", "10.13.0", True)
    assert base != engine_cache_key(b"model-a", "NVIDIA H100 80GB HBM3", "10.14.1", True)
    assert base != engine_cache_key(b"model-a", "NVIDIA H100 80GB HBM3", "10.13.0", False)
    assert "/" not in base and " " not in base  # a plain file name


def test_tensorrt_engine_matches_onnxruntime_and_is_cached(tmp_path):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed here")
    cupy = pytest.importorskip("cupy", reason="CuPy is not installed here")
    if cupy.cuda.runtime.getDeviceCount() < 1:
        pytest.skip("no CUDA device")
    from hxn_liveptycho.nn.backends import OnnxRuntimeBackend
    from hxn_liveptycho.nn.registry import ModelRegistry
    from hxn_liveptycho.nn.tensorrt import TensorRTBackend

    model = ModelRegistry(None).get("ptychonn-hxn-128")
    io = model.io()
    trt_backend = TensorRTBackend(model.path, io, device_id=0, cache_dir=tmp_path, max_batch=64)
    assert trt_backend.engine_path.exists()
    rng = np.random.default_rng(0)
    x = np.sqrt(rng.poisson(30.0, size=(33, 128, 128))).astype(np.float32)
    amp, phase = trt_backend.infer(x)  # a batch that is no profile corner
    ref_amp, ref_phase = OnnxRuntimeBackend(model.path, io).infer(x)
    assert amp.shape == ref_amp.shape == (33, 64, 64)
    np.testing.assert_allclose(amp, ref_amp, atol=0.05 * float(np.abs(ref_amp).max()))
    np.testing.assert_allclose(phase, ref_phase, atol=0.05)
    built = trt_backend.engine_path.stat().st_mtime_ns
    again = TensorRTBackend(model.path, io, device_id=0, cache_dir=tmp_path, max_batch=64)
    assert again.engine_path == trt_backend.engine_path
    assert again.engine_path.stat().st_mtime_ns == built  # loaded, not rebuilt
    single, _ = again.infer(x[:1])
    np.testing.assert_allclose(single, amp[:1], atol=0.05 * float(np.abs(ref_amp).max()))
