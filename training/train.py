"""Train the PtychoNN-style model on simulated HXN data, score it, export ONNX and its card.

    PYTHONPATH=. python training/train.py --out OUT --minutes 5

Data: ``--objects`` random objects (training/phantoms.py, never the test
phantom) x ``--frames-per-object`` frames each, simulated on the GPU with
hxn_liveptycho.sim (CuPy when present). Held out: objects from other images
(coins, moon) and other seeds, scored per frame by SSIM and PSNR of amplitude
and phase on the well-lit centre of the patch, and a whole unseen simulated
scan (camera / astronaut, the tests' phantom) stitched by hxn_liveptycho.nn.mosaic.
Writes ``<name>.onnx``, ``<name>.json`` (the model card), ``<name>.pt`` (the
PyTorch weights, for further training; the runtimes, PyTorch's included, run the
ONNX file) and a figure to ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hxn_liveptycho.nn.card import ModelCard, TensorSpec, TrainingGeometry
from training.dataset import Geometry, make_objects, simulate_set
from training.model import PtychoNNLite
from training.phantoms import HELD_OUT_IMAGES, TRAIN_IMAGES

logger = logging.getLogger("training")

#: The scored region: the central square of the output patch, where the nominal beam is bright.
SCORE_PX = 32


def _to_torch(x: Any, device: torch.device) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(x)).to(device)
    return torch.from_dlpack(x).to(device)


def weighted_loss(
    amp: torch.Tensor,
    phase: torch.Tensor,
    t_amp: torch.Tensor,
    t_phase: torch.Tensor,
    w: torch.Tensor,
) -> torch.Tensor:
    """Probe-weighted squared amplitude error + phase error 2(1 - cos d) (wrap-safe)."""
    w_sum = w.sum()
    amp_loss = (w * (amp - t_amp) ** 2).sum() / w_sum
    phase_loss = (w * 2 * (1 - torch.cos(phase - t_phase))).sum() / w_sum
    return amp_loss + phase_loss


def train(
    model: torch.nn.Module,
    data: dict[str, torch.Tensor],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    n = data["diffraction"].shape[0]
    budget = args.minutes * 60.0
    began = time.monotonic()
    step, epoch = 0, 0
    losses: list[float] = []  # every 50th step's loss (reading it syncs the GPU)
    autocast = device.type == "cuda"
    model.train()
    while True:
        order = torch.randperm(n, device=device)
        for start in range(0, n - args.batch + 1, args.batch):
            elapsed = time.monotonic() - began
            if elapsed >= budget or (args.max_steps and step >= args.max_steps):
                return {
                    "steps": step,
                    "epochs": epoch,
                    "seconds": round(elapsed, 1),
                    "final_loss": float(np.mean(losses[-5:])),
                }
            lr = args.lr * 0.5 * (1 + math.cos(math.pi * min(elapsed / budget, 1.0)))
            for group in opt.param_groups:
                group["lr"] = lr
            idx = order[start : start + args.batch]
            x = data["diffraction"][idx].float()[:, None]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                amp, phase = model(x)
            loss = weighted_loss(
                amp.float()[:, 0],
                phase.float()[:, 0],
                data["amplitude"][idx],
                data["phase"][idx],
                data["weight"][idx].float(),
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 50 == 0:
                losses.append(float(loss.detach()))
            if step % 500 == 0:
                logger.info(
                    "step %d epoch %d loss %.4f lr %.2e (%.0f s)",
                    step,
                    epoch,
                    losses[-1],
                    lr,
                    elapsed,
                )
            step += 1
        epoch += 1


@torch.no_grad()
def predict(model: torch.nn.Module, x: torch.Tensor, batch: int = 512) -> tuple[np.ndarray, ...]:
    model.eval()
    amps, phases = [], []
    for start in range(0, len(x), batch):
        a, p = model(x[start : start + batch].float()[:, None])
        amps.append(a[:, 0].cpu().numpy())
        phases.append(p[:, 0].cpu().numpy())
    return np.concatenate(amps), np.concatenate(phases)


def patch_metrics(
    pred_a: np.ndarray, pred_p: np.ndarray, t_a: np.ndarray, t_p: np.ndarray
) -> dict[str, float]:
    """Mean SSIM / PSNR over frames, on the central SCORE_PX square.

    The data range of each quantity is that of the truth over the whole held-out
    set (one fixed range, as SSIM/PSNR expect; a per-frame range blows up on the
    flat amplitude of a pure phase object).
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    m = t_a.shape[-1]
    lo = (m - SCORE_PX) // 2
    sl = (slice(None), slice(lo, lo + SCORE_PX), slice(lo, lo + SCORE_PX))
    out: dict[str, float] = {}
    for key, pred, truth in (("amp", pred_a[sl], t_a[sl]), ("phase", pred_p[sl], t_p[sl])):
        rng = float(truth.max() - truth.min())
        ssim = [
            structural_similarity(t, p, data_range=rng) for t, p in zip(truth, pred, strict=True)
        ]
        psnr = [
            peak_signal_noise_ratio(t, p, data_range=rng) for t, p in zip(truth, pred, strict=True)
        ]
        out[f"{key}_ssim"] = float(np.mean(ssim))
        out[f"{key}_psnr"] = float(np.mean(psnr))
        out[f"{key}_data_range"] = rng
        out[f"{key}_rmse"] = float(np.sqrt(np.mean((pred - truth) ** 2)))
    return out


def mosaic_score(model: torch.nn.Module, device: torch.device, out: Path) -> dict[str, float]:
    """Stitch an unseen simulated scan (camera/astronaut phantom, seed 11) and score its phase."""
    from hxn_liveptycho.nn.mosaic import Mosaic, footprint_weight
    from hxn_liveptycho.recon.metrics import illuminated_mask
    from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample

    sample = SimulatedSample(SimulatedBeamline(x_num=14, y_num=14, seed=11))
    amplitudes = np.sqrt(sample.intensities)
    pred_a, pred_p = predict(model, torch.from_numpy(amplitudes).to(device))
    n = sample.beamline.window
    mosaic = Mosaic(sample.object.shape, n, footprint_weight(sample.probe, pred_a.shape[-1]))
    mosaic.add(pred_a, pred_p, sample.positions_px)
    # The mosaic is on the phantom's own grid, so truth and estimate need no registration.
    mask = illuminated_mask(sample.positions_px, sample.probe, sample.object.shape)
    return phase_agreement(sample.object, mosaic.image(), mask, out)


def phase_agreement(
    truth: np.ndarray, estimate: np.ndarray, mask: np.ndarray, out: Path | None = None
) -> dict[str, float]:
    """Pearson correlation of phases on ``mask`` (offset-free by construction)."""
    t = np.angle(truth)[mask]
    e = np.angle(estimate * np.exp(-1j * np.angle(np.vdot(estimate[mask], truth[mask]))))[mask]
    corr = float(np.corrcoef(t, e)[0, 1])
    amp_corr = float(np.corrcoef(np.abs(truth)[mask], np.abs(estimate)[mask])[0, 1])
    if out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows, cols = np.nonzero(mask)
        box = (slice(rows.min(), rows.max() + 1), slice(cols.min(), cols.max() + 1))
        truth, estimate, mask = truth[box], estimate[box], mask[box]
        fig, ax = plt.subplots(2, 2, figsize=(8, 8))
        shown = np.where(mask, 1.0, np.nan)
        for axis, img, title in (
            (ax[0, 0], np.angle(truth) * shown, "truth phase"),
            (ax[0, 1], np.angle(estimate) * shown, f"NN mosaic phase (r={corr:.2f})"),
            (ax[1, 0], np.abs(truth) * shown, "truth amplitude"),
            (ax[1, 1], np.abs(estimate) * shown, f"NN mosaic amplitude (r={amp_corr:.2f})"),
        ):
            axis.imshow(img, cmap="gray")
            axis.set_title(title)
            axis.axis("off")
        fig.tight_layout()
        fig.savefig(out, dpi=80)
        plt.close(fig)
    return {"phase_pearson": corr, "amplitude_pearson": amp_corr, "pixels": int(mask.sum())}


def export(model: torch.nn.Module, geom: Geometry, path: Path, opset: int) -> None:
    model = model.float().cpu().eval()
    dummy = torch.rand(2, 1, geom.window, geom.window)
    torch.onnx.export(
        model,
        (dummy,),
        str(path),
        input_names=["diffraction"],
        output_names=["amplitude", "phase"],
        opset_version=opset,
        dynamic_axes={
            "diffraction": {0: "batch"},
            "amplitude": {0: "batch"},
            "phase": {0: "batch"},
        },
        dynamo=False,
    )


def onnx_parity(model: torch.nn.Module, path: Path, x: np.ndarray) -> float:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    a, p = sess.run(["amplitude", "phase"], {"diffraction": x[:, None].astype(np.float32)})
    with torch.no_grad():
        ta, tp = model.float().cpu().eval()(torch.from_numpy(x[:, None].astype(np.float32)))
    return float(max(np.abs(a - ta.numpy()).max(), np.abs(p - tp.numpy()).max()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", default="ptychonn-hxn-128")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--max-steps", type=int, default=0)
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--val-objects", type=int, default=64)
    parser.add_argument("--frames-per-object", type=int, default=48)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--object-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--opset", type=int, default=17)
    parser.add_argument("--seed", type=int, default=2026)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    geom = Geometry()

    t0 = time.monotonic()
    train_objects = make_objects(
        TRAIN_IMAGES, args.objects, args.object_size, args.seed, args.workers
    )
    val_objects = make_objects(
        HELD_OUT_IMAGES, args.val_objects, args.object_size, args.seed + 1, args.workers
    )
    logger.info(
        "%d + %d objects in %.1f s", len(train_objects), len(val_objects), time.monotonic() - t0
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.benchmark = True
    if device.type == "cuda":
        import cupy as xp
    else:
        xp = np
    t0 = time.monotonic()
    train_set = simulate_set(
        train_objects, geom, frames_per_object=args.frames_per_object, seed=args.seed, xp=xp
    )
    val_set = simulate_set(val_objects, geom, frames_per_object=16, seed=args.seed + 1, xp=xp)
    sim_seconds = time.monotonic() - t0
    frames = int(train_set["diffraction"].shape[0])
    logger.info(
        "simulated %d training + %d held-out frames in %.1f s",
        frames,
        int(val_set["diffraction"].shape[0]),
        sim_seconds,
    )
    data = {k: _to_torch(v, device) for k, v in train_set.items()}
    val = {k: _to_torch(v, device) for k, v in val_set.items()}
    del train_set, val_set

    model = PtychoNNLite(width=args.width).to(device).to(memory_format=torch.channels_last)
    summary = train(model, data, args, device)
    logger.info("trained: %s", summary)

    pred_a, pred_p = predict(model, val["diffraction"])
    metrics = patch_metrics(
        pred_a, pred_p, val["amplitude"].cpu().numpy(), val["phase"].cpu().numpy()
    )
    metrics = {k: round(v, 4) for k, v in metrics.items()}
    logger.info("held-out patches: %s", metrics)
    scan = mosaic_score(model, device, args.out / f"{args.name}-mosaic.png")
    logger.info("unseen scan mosaic: %s", scan)

    onnx_path = args.out / f"{args.name}.onnx"
    torch.save(model.float().cpu().state_dict(), args.out / f"{args.name}.pt")
    export(model, geom, onnx_path, args.opset)
    parity = onnx_parity(model, onnx_path, val["diffraction"][:8].float().cpu().numpy())
    logger.info("ONNX Runtime vs PyTorch max |diff| %.2e", parity)

    m = geom.out_size
    card = ModelCard(
        name=args.name,
        version="1",
        created=datetime.now(UTC).date().isoformat(),
        description=(
            "Single-shot network for HXN fly scans: one diffraction pattern in, the object "
            "patch under the beam out. Trained by hxn_liveptycho on simulated data only."
        ),
        architecture=(
            f"PtychoNN-style CNN (training/model.py): encoder widths {args.width}-"
            f"{8 * args.width} with four 2x poolings to 8x8, two decoders (amplitude, phase) "
            "with three 2x upsamplings; BatchNorm + LeakyReLU; softplus amplitude, pi*tanh phase"
        ),
        parameters=int(sum(p.numel() for p in model.parameters())),
        opset=args.opset,
        inputs=[
            TensorSpec(
                name="diffraction",
                shape=["batch", 1, geom.window, geom.window],
                description="sqrt(counts) of the detector crop, zero frequency at "
                "the centre, masked pixels 0",
            )
        ],
        outputs=[
            TensorSpec(
                name="amplitude",
                shape=["batch", 1, m, m],
                description="object amplitude on the central n/2 of the probe window, relative",
            )
        ],
        normalisation=(
            "Inside the graph: the input is divided by its RMS (unit mean power per frame), "
            "then x -> log1p(16 x) / log(17). Outputs cover the central "
            f"{m}x{m} pixels of the {geom.window}x{geom.window} probe window at the object "
            "pixel below. The amplitude is relative: divided by the probe-weighted RMS "
            "transmission of the patch (one frame's counts fix only flux x transmission). "
            "The phase is in radians with the probe-weighted mean of the patch set to "
            "phase 0 (one frame cannot see a constant phase); the mosaic matches each patch "
            "to its neighbours before blending."
        ),
        geometry=TrainingGeometry(
            energy_kev=geom.energy_kev,
            distance_m=geom.distance_m,
            detector_pixel_m=geom.detector_pixel_m,
            crop_px=geom.window,
            object_pixel_m=geom.pixel_size_m,
            # random_probe: outer radius 0.22 n x U(0.9, 1.1)
            bright_field_radius_px=(0.198 * geom.window, 0.242 * geom.window),
        ),
        training_data={
            "frames": frames,
            "objects": len(train_objects),
            "object_px": args.object_size,
            "sources": "scikit-image images " + ", ".join(TRAIN_IMAGES) + "; Gaussian random "
            "fields, random shapes, Voronoi cells (training/phantoms.py); amplitude and phase "
            "from independent textures; never camera/astronaut (the test phantom)",
            "object_ranges": "min amplitude 0.3-0.95 (15 % pure phase), max phase 0.2-1.6 rad",
            "probes": "hxn_liveptycho.sim.optics.make_probe: zone-plate radius 0.198-0.242 n, "
            "central stop 0.3-0.5, footprint 0.22-0.34 n, aberrations 0-0.6 rad rms",
            "photons_per_frame": "3e4-5e6 (log-uniform), Poisson noise",
            "forward_model": "hxn_liveptycho.sim.phantom.simulate_diffraction (whole-pixel "
            "positions)",
            "simulation_seconds": round(sim_seconds, 1),
        },
        training={
            **summary,
            "batch": args.batch,
            "optimiser": f"AdamW lr {args.lr} cosine",
            "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "seed": args.seed,
        },
        metrics={
            "held_out_patches": {"frames": int(val["diffraction"].shape[0]), **metrics},
            "held_out_patches_region": f"central {SCORE_PX}x{SCORE_PX} px of the output "
            "(the well-lit beam), SSIM/PSNR with the truth's range over the whole set, mean over "
            "frames; "
            "objects from coins/moon + procedural textures with unseen seeds",
            "unseen_scan_mosaic": scan,
            "unseen_scan": "SimulatedSample(SimulatedBeamline(x_num=14, y_num=14, seed=11)), "
            "camera/astronaut phantom, 196 frames; Pearson r on the well-lit mask after the "
            "global phase offset",
            "onnx_vs_torch_max_abs_diff": parity,
        },
    )
    card.outputs.append(
        TensorSpec(
            name="phase",
            shape=["batch", 1, m, m],
            description="object phase (rad) on the same pixels, patch mean phase 0",
        )
    )
    card.training["onnx_sha256"] = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    card.save(args.out / f"{args.name}.json")
    logger.info("wrote %s", json.dumps(card.metrics))


if __name__ == "__main__":
    main()
