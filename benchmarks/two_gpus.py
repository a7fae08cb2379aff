"""Iterative solver and NN branch side by side: each alone, both on one GPU, both on two.

Run on a CUDA machine from the repository root (two GPUs for the last rows):

    PYTHONPATH=. python3 benchmarks/two_gpus.py [--side 64] [--seconds 20] [--out two.json]

Data: one simulated scan (``side``² positions of 256² frames, default 4,096).
Iterative branch: ``StreamingSolver`` (ePIE, fused CuPy kernels), all frames
resident on its GPU, seconds per iteration. NN branch: the shipped network's
architecture (``training/model.py``) in PyTorch FP16, on the 128² centre crops
of the same frames in batches of 256, each batch copied from pinned host
memory and both outputs copied back (what the live branch pays), frames/s.
The weights are random: they do not change the arithmetic, so the speed is
the trained network's (the ONNX graph has no CUDA runtime on the lent machine;
see docs/benchmarks-history.md). Placement comes from the project's own rule
(:func:`hxn_liveptycho.recon.placement.resolve_placement`). "both" runs the two
branches in two threads of one process, as a session does, for the same
wall time; each branch's figure is compared with the same branch alone on
the same GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from hxn_liveptycho.recon.iterative import IterativeParams, StreamingSolver
from hxn_liveptycho.recon.placement import GpuPlacement, resolve_placement
from hxn_liveptycho.recon.probe import initial_probe
from hxn_liveptycho.sim.sample import SimulatedBeamline, SimulatedSample


class IterativeBranch:
    """The solver on GPU ``device``; ``run`` iterates until told to stop."""

    def __init__(self, cp: Any, device: int, amplitudes: np.ndarray, positions: np.ndarray):
        self.cp, self.device = cp, device
        with cp.cuda.Device(device):
            probe = initial_probe(amplitudes[:256], footprint_px=60.0)
            canvas = tuple(int(positions[:, k].max()) + 256 + 8 for k in range(2))
            self.solver = StreamingSolver(
                probe=cp.asarray(probe),
                canvas_shape=canvas,
                params=IterativeParams(algorithm="epie", batch_size=128),
                xp=cp,
            )
            self.solver.add(cp.asarray(amplitudes), positions + 4)
            self.solver.iterate(2)  # kernels compiled, cuFFT plans made
            cp.cuda.Device().synchronize()

    def run(self, stop: threading.Event, out: dict[str, float]) -> None:
        cp = self.cp
        with cp.cuda.Device(self.device):
            began, n = time.perf_counter(), 0
            while not stop.is_set():
                self.solver.iterate(1)
                n += 1
            cp.cuda.Device().synchronize()
            out["s_per_iteration"] = (time.perf_counter() - began) / max(n, 1)
            out["iterations"] = n


class NNBranch:
    """The network on GPU ``device``; ``run`` infers batches until told to stop."""

    def __init__(self, device: int, crops: np.ndarray, batch: int = 256):
        import torch

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training"))
        from model import PtychoNNLite  # training/model.py: the shipped network's architecture

        self.torch, self.device, self.batch = torch, device, batch
        torch.backends.cudnn.benchmark = True
        self.dev = torch.device("cuda", device)
        self.model = PtychoNNLite().eval().to(self.dev).half().to(memory_format=torch.channels_last)
        self.host = torch.from_numpy(np.ascontiguousarray(crops[:, None])).pin_memory()
        self.stream = torch.cuda.Stream(device=self.dev)
        for _ in range(3):
            self._one(0)
        torch.cuda.synchronize(self.dev)

    def _one(self, start: int) -> None:
        torch = self.torch
        n = self.host.shape[0]
        start %= max(n - self.batch, 1)
        with torch.cuda.device(self.dev), torch.cuda.stream(self.stream), torch.inference_mode():
            x = self.host[start : start + self.batch].to(self.dev, non_blocking=True)
            x = x.half().contiguous(memory_format=torch.channels_last)
            amp, phase = self.model(x)
            amp.float().cpu()
            phase.float().cpu()

    def run(self, stop: threading.Event, out: dict[str, float]) -> None:
        began, frames, start = time.perf_counter(), 0, 0
        while not stop.is_set():
            self._one(start)
            start += self.batch
            frames += self.batch
        self.torch.cuda.synchronize(self.dev)
        out["frames_per_s"] = frames / (time.perf_counter() - began)


def run_for(seconds: float, *branches: Any) -> list[dict[str, float]]:
    stop = threading.Event()
    outs: list[dict[str, float]] = [{} for _ in branches]
    threads = [
        threading.Thread(target=b.run, args=(stop, o), daemon=True)
        for b, o in zip(branches, outs, strict=True)
    ]
    for t in threads:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return outs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=64, help="positions per side")
    parser.add_argument("--seconds", type=float, default=20.0, help="wall time per row")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    import cupy as cp
    import torch

    gpus = cp.cuda.runtime.getDeviceCount()
    bl = SimulatedBeamline.for_window(
        256,
        step_px=20.0,
        photons_per_frame=5e5,
        x_num=args.side,
        y_num=args.side,
    )
    began = time.perf_counter()
    sample = SimulatedSample(bl)
    amplitudes = np.sqrt(sample.intensities).astype(np.float32)
    crops = np.ascontiguousarray(amplitudes[:, 64:192, 64:192])
    print(f"simulated {sample.num_points} frames in {time.perf_counter() - began:.0f} s")
    placement = resolve_placement(GpuPlacement(), gpus)
    rows: list[dict[str, Any]] = []

    def record(what: str, it_dev: int | None, nn_dev: int | None, outs: list[dict]) -> None:
        row: dict[str, Any] = {"what": what, "iterative_gpu": it_dev, "nn_gpu": nn_dev}
        for o in outs:
            row.update(o)
        rows.append(row)
        print(json.dumps(row), flush=True)

    it0 = IterativeBranch(cp, 0, amplitudes, sample.positions_px)
    nn0 = NNBranch(0, crops)
    record("iterative alone", 0, None, run_for(args.seconds, it0))
    record("nn alone", None, 0, run_for(args.seconds, nn0))
    record("both, one GPU", 0, 0, run_for(args.seconds, it0, nn0))
    if gpus >= 2:
        assert placement.iterative is not None and placement.nn is not None
        nn1 = NNBranch(placement.nn, crops)
        del nn0
        record("nn alone", None, placement.nn, run_for(args.seconds, nn1))
        record(
            "both, two GPUs (auto placement)",
            placement.iterative,
            placement.nn,
            run_for(args.seconds, it0, nn1),
        )
    alone_it = next(r for r in rows if r["what"] == "iterative alone")["s_per_iteration"]
    for r in rows:
        if r["what"].startswith("both"):
            r["iterative_vs_alone"] = r["s_per_iteration"] / alone_it
            nn_alone = next(
                x["frames_per_s"]
                for x in rows
                if x["what"] == "nn alone" and x["nn_gpu"] == r["nn_gpu"]
            )
            r["nn_vs_alone"] = r["frames_per_s"] / nn_alone
    props = cp.cuda.runtime.getDeviceProperties(0)
    report = {
        "device": props["name"].decode(),
        "gpus": gpus,
        "placement": placement.as_metadata(),
        "frames": sample.num_points,
        "torch": torch.__version__,
        "cupy": cp.__version__,
        "python": platform.python_version(),
        "rows": rows,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{report['device']} x{gpus}, {sample.num_points} frames of 256^2")
    print("| what | iterative GPU | NN GPU | s/iteration | NN frames/s | vs alone (it / NN) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        ratio = (
            f"{r['iterative_vs_alone']:.2f} / {r['nn_vs_alone']:.2f}" if "nn_vs_alone" in r else ""
        )
        print(
            f"| {r['what']} | {r['iterative_gpu']} | {r['nn_gpu']} "
            f"| {r.get('s_per_iteration', float('nan')):.4f} "
            f"| {r.get('frames_per_s', float('nan')):.0f} | {ratio} |"
        )


if __name__ == "__main__":
    main()
