"""``liveptycho reconstruct <file.cxi>``: reprocess a ptychography file with the live engine.

Why apart: the reading and the run are :mod:`hxn_liveptycho.reprocess`'s; this
turns options into its settings, conventions and overrides, prints a progress
line every few seconds (iteration and data mismatch) and the report, and
exits 0 only for a ``complete`` run. A file whose conventions cannot be told
is one line naming the option to pass, exit status 2; a missing file, 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, get_args

from hxn_liveptycho.cli.help_format import add_command


class ReconstructProgress:
    """A line every few seconds while the file is fed and reconstructed."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream
        self.began = time.monotonic()

    def __call__(self, status: dict[str, Any]) -> None:
        feed = status.get("reprocess") or {}
        parts = [f"{feed.get('frames_fed', 0)}/{feed.get('frames', '?')} frames read"]
        runs = status.get("runs") or []
        if runs:
            run = runs[-1]
            err = run.get("error_metric")
            parts.append(
                f"{run['status']}: {run['positions']} positions, iteration {run['iteration']}"
                + (f", data mismatch {err:.4f}" if err is not None else "")
            )
            if run["status"] not in ("waiting", "running") and not run.get("finished", True):
                parts.append("writing the result to Tiled")
        else:
            parts.append("starting the engine")
        elapsed = time.monotonic() - self.began
        stream = self.stream or sys.stderr  # looked up now: a redirected stderr is honoured
        stream.write(f"[{elapsed:5.1f} s] " + "; ".join(parts) + "\n")
        stream.flush()


def _assignment(text: str) -> tuple[list[str], Any]:
    """``recon.iterations=200`` → (["recon", "iterations"], 200); the value is JSON if it
    parses, else the text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. recon.iterations=200)")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip().split("."), parsed


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for path, value in args.set or []:
        node = overrides
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    recon = overrides.setdefault("recon", {})
    if args.iterations is not None:
        recon["iterations"] = args.iterations
    if args.algorithm is not None:
        recon["algorithm"] = args.algorithm
    if not recon:
        del overrides["recon"]
    if args.roi_size is not None:
        overrides.setdefault("roi", {})["size"] = args.roi_size
    if args.mode is not None:
        overrides["mode"] = args.mode
    return overrides


def run_reconstruct_command(args: argparse.Namespace) -> int:
    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.reprocess import FileConventions, reconstruct_file

    basis = None
    if args.basis_vectors is not None:
        b = args.basis_vectors
        basis = ((b[0], b[1], b[2]), (b[3], b[4], b[5]))
    conventions = FileConventions(
        data=args.data,
        dc=args.dc,
        position_units=args.position_units,
        translation=args.translation,
        basis_vectors=basis,
        energy_kev=args.energy_kev,
        distance_m=args.distance,
        pixel_size_m=args.pixel_size,
    )
    fields: dict[str, Any] = {}
    if args.tiled_uri:
        fields["tiled_uri"] = args.tiled_uri
    if args.data_dir:
        fields["data_dir"] = args.data_dir
    if args.backend:
        fields["array_backend"] = args.backend
    report = reconstruct_file(
        args.file,
        settings=Settings(**fields),
        overrides=_overrides(args),
        conventions=conventions,
        entry=args.entry,
        progress=ReconstructProgress(),
        progress_interval_s=args.progress_interval,
    )
    print(report.summary())
    return 0 if report.status == "complete" else 1


def add_reconstruct_command(sub: Any) -> None:
    """``liveptycho reconstruct`` and its options."""
    from hxn_liveptycho.recon.params import Algorithm

    command = add_command(
        sub,
        "reconstruct",
        "reconstruct a CXI / NXcxi_ptycho file with the live engine, into Tiled",
        "Reconstruct a ptychography file (CXI 1.6, or NeXus NXcxi_ptycho) with the same "
        "engine, settings and overrides as live runs, and write the result to Tiled like a "
        "live run (processed container, live snapshots, terminal status; raw_uid: the "
        "file's own, else a hash of its contents). Conventions the file does not say and "
        "the data do not show are refused with the option to pass (docs/reprocess.md).",
    )
    command.add_argument("file", type=Path, help="the .cxi / .h5 / .nxs file")
    command.add_argument("--entry", help="the entry to read (default: entry_1, else the first)")
    command.add_argument(
        "--data",
        choices=["auto", "intensity", "amplitude"],
        default="auto",
        help="what the frames hold; auto: intensities when they are whole photon counts",
    )
    command.add_argument(
        "--dc",
        choices=["auto", "centre", "corner"],
        default="auto",
        help="where the zero frequency is: the frame's centre, or index 0 (FFT order); "
        "auto: the mean pattern's brightest spot",
    )
    command.add_argument(
        "--position-units",
        choices=["auto", "m", "mm", "um", "nm"],
        default="auto",
        help="units of the translations; auto: their units attribute, else metres (CXI)",
    )
    command.add_argument(
        "--translation",
        choices=["auto", "sample", "beam"],
        default="auto",
        help="the translations are the sample's (CXI) or the beam's position on the sample; "
        "auto: the beam's in this project's exports, else the sample's",
    )
    command.add_argument(
        "--basis-vectors",
        type=float,
        nargs=6,
        metavar=("RX", "RY", "RZ", "CX", "CY", "CZ"),
        help="the detector's pixel step along rows, then along columns, in the lab frame "
        "(metres; z along the beam, y up); instead of the file's",
    )
    command.add_argument("--energy-kev", type=float, help="photon energy instead of the file's")
    command.add_argument(
        "--distance", type=float, help="detector distance (m) instead of the file's"
    )
    command.add_argument(
        "--pixel-size", type=float, help="detector pixel (m) instead of the file's"
    )
    command.add_argument("--iterations", type=int, help="iterations after the last frame")
    command.add_argument(
        "--algorithm", choices=list(get_args(Algorithm)), help="the iterative algorithm"
    )
    command.add_argument("--roi-size", type=int, help="crop the frames to this square (pixels)")
    command.add_argument(
        "--mode", choices=["iterative", "nn", "both"], help="which branches run (as for live runs)"
    )
    command.add_argument(
        "--set",
        action="append",
        type=_assignment,
        metavar="KEY=VALUE",
        help="any run override, e.g. --set recon.batch_size=32 (repeatable; JSON values)",
    )
    command.add_argument(
        "--backend", choices=["auto", "numpy", "cupy"], help="the solver's arrays (settings)"
    )
    command.add_argument(
        "--tiled-uri", help="write to this Tiled (default: settings, else embedded)"
    )
    command.add_argument("--data-dir", type=Path, help="embedded Tiled's data and backups")
    command.add_argument(
        "--progress-interval", type=float, default=3.0, help="seconds between progress lines"
    )
    command.set_defaults(func=run_reconstruct_command)
