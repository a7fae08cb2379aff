"""Single-shot network inference: frames/s and latency per batch, on the CPU and on the GPU.

From the repository root:

    PYTHONPATH=. python benchmarks/nn_infer.py [--model PATH.onnx] [--torch-weights PATH.pt]
        [--json OUT.json]

CPU: ONNX Runtime's CPU execution provider on the ONNX graph (hxn_liveptycho.nn).
GPU, the first that is present: TensorRT (engine built from the same ONNX graph,
FP16 where the builder allows), else ONNX Runtime's CUDA execution provider,
else PyTorch running the same architecture (training/model.py) with the same
weights (``--torch-weights``, saved by training/train.py next to the ONNX
export), in FP16 with channels-last tensors and cuDNN autotuning. The report
names the runtime that ran. Two figures per GPU batch: *resident* (input already
on the GPU, outputs left there: the network alone) and *host to host* (a host
batch in, both outputs back on the host: what the live branch pays).
Latency is the median over repeats of one batch; frames/s = batch / that time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.nn.backends import (
    GraphIO,
    onnxruntime_cuda_available,
    open_backend,
    tensorrt_available,
)
from hxn_liveptycho.nn.config import DEFAULT_MODEL
from hxn_liveptycho.nn.registry import ModelRegistry

IO = GraphIO(input="diffraction", amplitude="amplitude", phase="phase")


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


def row(runtime: str, where: str, batch: int, seconds: float) -> dict[str, Any]:
    return {
        "runtime": runtime,
        "where": where,
        "batch": batch,
        "latency_ms": round(seconds * 1e3, 3),
        "frames_per_s": round(batch / seconds, 1),
    }


def frames(batch: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.sqrt(rng.poisson(20.0, size=(batch, n, n))).astype(np.float32)


def cpu_rows(model: Path, batches: list[int], threads: int, repeats: int) -> list[dict]:
    backend = open_backend(model, IO, kind="onnxruntime", cpu_threads=threads)
    n = backend.input_hw[0]
    import onnxruntime

    name = f"onnxruntime {onnxruntime.__version__} CPU EP ({threads or 'all'} threads)"
    rows = []
    for b in batches:
        x = frames(b, n)
        rows.append(row(name, "host", b, timed(lambda x=x: backend.infer(x), repeats)))
    return rows


def gpu_rows_backend(model: Path, kind: str, batches: list[int], repeats: int) -> list[dict]:
    backend = open_backend(model, IO, kind=kind, max_batch=max(batches))  # type: ignore[arg-type]
    n = backend.input_hw[0]
    out = []
    for b in batches:
        x = frames(b, n)
        out.append(row(kind, "host to host", b, timed(lambda x=x: backend.infer(x), repeats)))
        if kind == "tensorrt":
            import cupy as cp

            xd = cp.asarray(x[:, None])
            out.append(
                row(
                    kind,
                    "resident",
                    b,
                    timed(lambda xd=xd: backend.infer_device(xd), repeats, backend.synchronize),
                )
            )
    return out


def gpu_rows_torch(weights: Path, batches: list[int], repeats: int) -> list[dict]:
    import torch

    from training.model import PtychoNNLite

    torch.backends.cudnn.benchmark = True
    model = PtychoNNLite()
    model.load_state_dict(torch.load(weights, map_location="cpu"))
    model = model.eval().cuda().half().to(memory_format=torch.channels_last)
    ref = PtychoNNLite()
    ref.load_state_dict(torch.load(weights, map_location="cpu"))
    ref = ref.eval().cuda()
    name = f"PyTorch {torch.__version__} FP16 channels-last, cuDNN (same weights as the ONNX)"
    out = []
    with torch.inference_mode():
        x = torch.from_numpy(frames(8, 128)).cuda()[:, None]
        a16, p16 = model(x.half().contiguous(memory_format=torch.channels_last))
        a32, p32 = ref(x)
        fp16_err = float(max((a16.float() - a32).abs().max(), (p16.float() - p32).abs().max()))
        for b in batches:
            host = torch.from_numpy(frames(b, 128))[:, None].pin_memory()
            xd = host.cuda().half().contiguous(memory_format=torch.channels_last)
            sync = torch.cuda.synchronize
            out.append(row(name, "resident", b, timed(lambda xd=xd: model(xd), repeats, sync)))

            def host_to_host(host: Any = host) -> None:
                a, p = model(
                    host.cuda(non_blocking=True)
                    .half()
                    .contiguous(memory_format=torch.channels_last)
                )
                a.float().cpu(), p.float().cpu()

            out.append(row(name, "host to host", b, timed(host_to_host, repeats, sync)))
    out.append({"fp16_vs_fp32_max_abs_diff": fp16_err})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="ONNX file (default: shipped)")
    parser.add_argument("--torch-weights", type=Path, default=None)
    parser.add_argument("--cpu-batches", default="1,16,64")
    parser.add_argument("--gpu-batches", default="1,16,64,256,1024,4096")
    parser.add_argument("--cpu-threads", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    model = args.model or ModelRegistry(None).get(DEFAULT_MODEL).path
    cpu_b = [int(b) for b in args.cpu_batches.split(",")]
    gpu_b = [int(b) for b in args.gpu_batches.split(",")]
    report: dict[str, Any] = {
        "model": str(model),
        "host": platform.node(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": [],
    }
    report["rows"] += cpu_rows(model, cpu_b, args.cpu_threads, max(3, args.repeats // 4))
    if tensorrt_available():
        report["gpu_runtime"] = "tensorrt"
        report["rows"] += gpu_rows_backend(model, "tensorrt", gpu_b, args.repeats)
    elif onnxruntime_cuda_available():
        report["gpu_runtime"] = "onnxruntime-cuda"
        report["rows"] += gpu_rows_backend(model, "onnxruntime-cuda", gpu_b, args.repeats)
    elif args.torch_weights is not None:
        import torch

        if torch.cuda.is_available():
            report["gpu"] = torch.cuda.get_device_name()
            report["gpu_runtime"] = "pytorch"
            report["rows"] += gpu_rows_torch(args.torch_weights, gpu_b, args.repeats)
    else:
        report["gpu_runtime"] = "none (no TensorRT, no ONNX Runtime CUDA EP, no --torch-weights)"
    print(f"model {model}; GPU runtime: {report.get('gpu_runtime')} {report.get('gpu', '')}")
    print("| runtime | where | batch | latency (ms) | frames/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in report["rows"]:
        if "batch" in r:
            print(
                f"| {r['runtime']} | {r['where']} | {r['batch']} | {r['latency_ms']} | "
                f"{r['frames_per_s']:,.0f} |"
            )
        else:
            print(r)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
