"""Score an exported model (ONNX Runtime, CPU) on the held-out set and an unseen scan.

    PYTHONPATH=. python training/evaluate.py hxn_liveptycho/nn/models/ptychonn-hxn-128.onnx
        [--update-card] [--figure docs/images/nn-mosaic.png]

Same held-out recipe as training/train.py (coins/moon and procedural objects,
seed + 1, 16 frames each), simulated here with NumPy (so the Poisson draws
differ from the GPU run's), and the same unseen scan (camera/astronaut
phantom, seed 11). With ``--update-card`` the card's ``metrics`` are replaced
by these figures, which then describe the shipped file itself.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

import numpy as np

from hxn_liveptycho.nn.backends import OnnxRuntimeBackend
from hxn_liveptycho.nn.card import ModelCard
from hxn_liveptycho.nn.mosaic import Mosaic, footprint_weight
from hxn_liveptycho.nn.registry import ModelRegistry
from hxn_liveptycho.recon.metrics import illuminated_mask
from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample
from training.dataset import Geometry, make_objects, simulate_set
from training.phantoms import HELD_OUT_IMAGES
from training.train import SCORE_PX, patch_metrics, phase_agreement

logger = logging.getLogger("evaluate")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", type=Path)
    parser.add_argument("--val-objects", type=int, default=64)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--update-card", action="store_true")
    parser.add_argument("--figure", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    info = ModelRegistry(None).get(str(args.model))
    backend = OnnxRuntimeBackend(info.path, info.io())

    objects = make_objects(
        HELD_OUT_IMAGES, args.val_objects, 256, args.seed + 1, min(4, os.cpu_count() or 1)
    )
    val = simulate_set(objects, Geometry(), frames_per_object=16, seed=args.seed + 1, xp=np)
    pred_a, pred_p = backend.infer(val["diffraction"].astype(np.float32))
    patches = patch_metrics(pred_a, pred_p, val["amplitude"], val["phase"])
    patches = {k: round(v, 4) for k, v in patches.items()}
    logger.info("held-out patches: %s", patches)

    sample = SimulatedSample(SimulatedBeamline(x_num=14, y_num=14, seed=11))
    amp, phase = backend.infer(np.sqrt(sample.intensities))
    mosaic = Mosaic(sample.object.shape, 128, footprint_weight(sample.probe, amp.shape[-1]))
    mosaic.add(amp, phase, sample.positions_px)
    mask = illuminated_mask(sample.positions_px, sample.probe, sample.object.shape)
    scan = phase_agreement(sample.object, mosaic.image(), mask, args.figure)
    scan = {k: round(v, 4) if isinstance(v, float) else v for k, v in scan.items()}
    logger.info("unseen scan mosaic: %s", scan)

    if args.update_card and info.card is not None:
        card: ModelCard = info.card
        card.metrics["held_out_patches"] = {"frames": len(pred_a), **patches}
        card.metrics["held_out_patches_region"] = (
            f"central {SCORE_PX}x{SCORE_PX} px of the output (the well-lit beam); SSIM and "
            "PSNR per frame with the truth's range over the whole set, mean over frames; "
            f"{len(objects)} objects from coins/moon + procedural textures (seed "
            f"{args.seed + 1}), 16 frames each; truth normalised as the network's output "
            "(relative amplitude, patch mean phase 0)"
        )
        card.metrics["unseen_scan_mosaic"] = scan
        card.metrics["evaluated_with"] = (
            "training/evaluate.py: ONNX Runtime CPU on this file, NumPy simulation"
        )
        card.save(info.path.with_suffix(".json"))
        logger.info("card updated: %s", info.path.with_suffix(".json"))


if __name__ == "__main__":
    main()
