"""NN branch speed: frames/s per runtime at 128² and 256² crops, the network alone and the
whole branch in its process, on whatever machine it runs.

From the repository root:

    PYTHONPATH=. python benchmarks/nn_infer.py [--json OUT.json] [--runtimes LIST]
        [--batches 1,16,64,256] [--branch-frames 4096] [--crops 128,256]

Runtimes (each one that is installed and works here; ``--runtimes`` narrows
the list): ``onnxruntime`` (CPU), ``onnxruntime-cuda``, ``tensorrt``,
``torch-cuda`` (the shipped graph on PyTorch, FP16, CUDA graphs: what
``nn_backend=torch`` runs) and ``torch-cuda-fp32`` (the same in FP32, for
scale). All run the shipped 128² model; a 256² crop is cut to it by the
branch's rule (central 128², :mod:`hxn_liveptycho.nn.resample`).

Rows:

- ``network``: one batch from host amplitudes at the run's crop to complex
  patches on the host (the rule's crop, the runtime, amplitude and phase to
  complex): what the branch's worker pays per batch before blending. The
  median over ``--repeats`` after warm-ups; frames/s = batch / median.
  ``resident`` rows (torch-cuda) replay the CUDA graph alone, input already on
  the GPU: the network without the host.
- ``branch``: the whole branch as a run uses it, :class:`NNProcessBranch` in its
  own process on a warm worker: ``--branch-frames`` frames of a 64 x 64 raster
  handed over in batches of 32 as fast as ``submit`` returns, the time from the
  first hand-over to ``close`` returning the final mosaic (blending and live
  snapshots every 2 s included), drops, and the mean cost of ``submit`` per
  frame in the caller.
- ``parity``: each GPU runtime against ONNX Runtime on the CPU on the same
  frames (largest difference of amplitude relative to its peak, of phase in rad).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.config.nn_params import DEFAULT_MODEL
from hxn_liveptycho.nn.backends import (
    InferenceBackend,
    onnxruntime_cuda_available,
    open_backend,
    tensorrt_available,
)
from hxn_liveptycho.nn.mosaic import to_complex
from hxn_liveptycho.nn.process import NNProcessBranch, WorkerKey, WorkerPool
from hxn_liveptycho.nn.registry import ModelInfo, ModelRegistry
from hxn_liveptycho.nn.resample import InputRule
from hxn_liveptycho.nn.torch_backend import torch_cuda_available

RUNTIMES = ("onnxruntime", "onnxruntime-cuda", "tensorrt", "torch-cuda", "torch-cuda-fp32")


def timed(run: Callable[[], Any], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median seconds of ``run`` over ``repeats`` after three warm-ups."""
    for _ in range(3):
        run()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def frames(batch: int, n: int, seed: int = 0) -> np.ndarray:
    """sqrt(counts) of a bright centre over a dim background, like a measured pattern."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:n, 0:n] - n // 2
    mean = 2.0 + 2000.0 * np.exp(-(x**2 + y**2) / (2 * (0.1 * n) ** 2))
    return np.sqrt(rng.poisson(mean, size=(batch, n, n))).astype(np.float32)


def available(names: list[str]) -> list[str]:
    checks: dict[str, Callable[[], bool]] = {
        "onnxruntime": lambda: True,
        "onnxruntime-cuda": onnxruntime_cuda_available,
        "tensorrt": tensorrt_available,
        "torch-cuda": torch_cuda_available,
        "torch-cuda-fp32": torch_cuda_available,
    }
    return [name for name in names if name in checks and checks[name]()]


def open_runtime(name: str, model: ModelInfo, max_batch: int, threads: int) -> InferenceBackend:
    if name.startswith("torch-cuda"):
        from hxn_liveptycho.nn.torch_backend import TorchBackend

        backend = TorchBackend(
            model.path,
            model.io(),
            device_id=0,
            precision="fp32" if name.endswith("fp32") else "fp16",
            max_batch=max_batch,
        )
        backend.warm()
        return backend
    return open_backend(
        model.path,
        model.io(),
        kind=name,  # type: ignore[arg-type]
        max_batch=max_batch,
        cpu_threads=threads,
    )


def row(kind: str, runtime: str, crop: int, batch: int, seconds: float, **extra: Any) -> dict:
    return {
        "kind": kind,
        "runtime": runtime,
        "crop": crop,
        "batch": batch,
        "latency_ms": round(seconds * 1e3, 3),
        "frames_per_s": round(batch / seconds, 1),
        **extra,
    }


def network_rows(
    name: str, model: ModelInfo, crops: list[int], batches: list[int], repeats: int, threads: int
) -> list[dict]:
    backend = open_runtime(name, model, max(batches), threads)
    sync = getattr(backend, "synchronize", lambda: None)
    out = []
    for crop in crops:
        rule = InputRule(crop, 128)
        for b in batches:
            x = frames(b, crop)

            def run(x: np.ndarray = x, rule: InputRule = rule) -> None:
                amplitude, phase = backend.infer(rule.frames(x))
                to_complex(amplitude, phase)

            out.append(row("network", backend.name, crop, b, timed(run, repeats, sync)))
    if getattr(backend, "cuda_graphs", False):
        import torch

        stream = backend._stream  # type: ignore[attr-defined]
        for b in batches:
            bucket = backend._bucket(b)  # type: ignore[attr-defined]
            graph = backend._graph(bucket)[0]  # type: ignore[attr-defined]

            def replay(graph: Any = graph) -> None:
                with torch.cuda.stream(stream):  # replay runs on the current stream
                    graph.replay()

            seconds = timed(replay, repeats, backend.synchronize)  # type: ignore[attr-defined]
            out.append(row("resident", f"{name} (graph replay)", 128, bucket, seconds))
    backend.close()
    return out


def parity(name: str, model: ModelInfo, threads: int) -> dict[str, Any]:
    x = frames(33, 128, seed=1)
    ref_amp, ref_phase = open_backend(
        model.path, model.io(), kind="onnxruntime", cpu_threads=threads
    ).infer(x)
    backend = open_runtime(name, model, 64, threads)
    amp, phase = backend.infer(x)
    backend.close()
    return {
        "kind": "parity",
        "runtime": name,
        "reference": "onnxruntime CPU",
        "frames": len(x),
        "amplitude_max_diff_rel": float(np.abs(amp - ref_amp).max() / np.abs(ref_amp).max()),
        "phase_max_diff_rad": float(np.abs(phase - ref_phase).max()),
    }


def branch_row(
    name: str, model: ModelInfo, crop: int, count: int, threads: int, interval_s: float
) -> dict[str, Any]:
    kind = {"torch-cuda": "torch"}.get(name, name)
    if name == "torch-cuda-fp32":
        raise ValueError("the branch runs torch in FP16")
    key = WorkerKey(backend=kind, device_id=0, cpu_threads=threads)
    step = 9 * crop // 128
    points = 64
    side = (points - 1) * step + crop + 2 * step
    iy, ix = np.mgrid[0:points, 0:points]
    rng = np.random.default_rng(0)
    positions = np.stack([iy.ravel(), ix.ravel()], 1) * step + step + rng.normal(0, 0.5, (4096, 2))
    pool = WorkerPool()
    try:
        source = frames(64, crop)

        def run(total: int) -> tuple[float, float, dict[str, Any]]:
            branch = NNProcessBranch(
                model,
                key,
                canvas_shape=(side, side),
                window=crop,
                batch_size=64,
                max_queued_frames=total,
                publish=lambda snapshot: None,
                interval_s=interval_s,
                rule=InputRule(crop, 128),
                footprint_px=0.28 * crop,
                pool=pool,
            )
            submit = 0.0
            began = time.perf_counter()
            for start in range(0, total, 32):
                k = min(32, total - start)
                batch = source[np.arange(start, start + k) % len(source)]
                where = positions[np.arange(start, start + k) % 4096]
                t0 = time.perf_counter()
                branch.submit(batch, where)
                submit += time.perf_counter() - t0
            final = branch.close(timeout=600)
            seconds = time.perf_counter() - began
            assert final is not None, branch.describe()
            return seconds, submit, branch.describe()

        run(64)  # loads the runtime in the worker (and captures its graphs)
        seconds, submit, info = run(count)
    finally:
        pool.shutdown()
    return {
        "kind": "branch",
        "runtime": info["backend"],
        "crop": crop,
        "frames": count,
        "seconds": round(seconds, 3),
        "frames_per_s": round(count / seconds, 1),
        "frames_dropped": info["nn_frames_dropped"],
        "frames_inferred": info["nn_frames_inferred"],
        "snapshots": info["nn_snapshots"],
        "max_lag_s": info["max_lag_s"],
        "infer_seconds": info["infer_seconds"],
        "submit_us_per_frame": round(submit / count * 1e6, 1),
        "input_rule": info["input_rule"],
    }


def device_info() -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "cpus": os.cpu_count()}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if torch_cuda_available():
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--crops", default="128,256")
    parser.add_argument("--batches", default="1,16,64,256")
    parser.add_argument("--cpu-batches", default="1,16,64")
    parser.add_argument("--branch-frames", type=int, default=4096)
    parser.add_argument("--cpu-branch-frames", type=int, default=256)
    parser.add_argument("--no-branch", action="store_true")
    parser.add_argument("--interval", type=float, default=2.0, help="live snapshot interval")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime CPU threads")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = ModelRegistry(None).get(args.model)
    crops = [int(c) for c in args.crops.split(",")]
    runtimes = available([r for r in args.runtimes.split(",") if r])
    report: dict[str, Any] = {
        "benchmark": "nn_infer",
        "model": model.name,
        "model_sha256": model.sha256,
        "date": time.strftime("%Y-%m-%d"),
        "device": device_info(),
        "runtimes": runtimes,
        "rows": [],
    }
    for name in runtimes:
        cpu = name == "onnxruntime"
        batches = [int(b) for b in (args.cpu_batches if cpu else args.batches).split(",")]
        repeats = max(3, args.repeats // 4) if cpu else args.repeats
        report["rows"] += network_rows(name, model, crops, batches, repeats, args.threads)
        if not cpu:
            report["rows"].append(parity(name, model, args.threads))
        if not args.no_branch and name != "torch-cuda-fp32":
            count = args.cpu_branch_frames if cpu else args.branch_frames
            for crop in crops:
                report["rows"].append(
                    branch_row(name, model, crop, count, args.threads, args.interval)
                )
        print(f"done: {name}", flush=True)
    print(f"model {model.name}; device {report['device']}")
    print("| kind | runtime | crop | batch/frames | latency or time | frames/s |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for r in report["rows"]:
        if r["kind"] in ("network", "resident"):
            print(
                f"| {r['kind']} | {r['runtime']} | {r['crop']} | {r['batch']} | "
                f"{r['latency_ms']} ms | {r['frames_per_s']:,.0f} |"
            )
        elif r["kind"] == "branch":
            print(
                f"| branch | {r['runtime']} | {r['crop']} | {r['frames']} | {r['seconds']} s "
                f"(dropped {r['frames_dropped']}, submit {r['submit_us_per_frame']} us/frame) | "
                f"{r['frames_per_s']:,.0f} |"
            )
        else:
            print(r)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
