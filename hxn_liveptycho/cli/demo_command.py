"""``liveptycho demo``: a simulated HXN scan, reconstructed live, into a local Tiled.

Why apart: the demo is the one command that runs a whole scan here and reports
on it while it goes (a progress line from the watcher thread, then where the
result and the pictures are); its options are bounded, so a mistake is one line.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from hxn_liveptycho.cli.help_format import add_command, one_line_errors


class DemoProgress:
    """A status line every few seconds, from the demo's watcher thread, while the run goes on."""

    def __init__(self, stream: Any = sys.stderr) -> None:
        self.stream = stream
        self.began = time.monotonic()

    def __call__(self, status: dict[str, Any]) -> None:
        runs = status.get("runs") or []
        demo = status.get("demo") or {}
        elapsed = time.monotonic() - self.began
        parts = []
        if demo.get("frames_planned"):
            parts.append(f"{demo['frames_published']}/{demo['frames_planned']} frames published")
        if runs:
            run = runs[-1]
            err = run.get("error_metric")
            parts.append(
                f"scan {run['scan_id']} {run['status']}: "
                f"{run['positions']}/{run.get('expected_positions', '?')} positions, "
                f"iteration {run['iteration']}"
                + (f", data mismatch {err:.4f}" if err is not None else "")
            )
        else:
            parts.append("waiting for the run")
        if demo.get("live_snapshots"):
            count = demo["live_snapshots"]
            parts.append(
                f"{count} live image{'s' if count > 1 else ''} read back from Tiled "
                f"(latest: iteration {demo['tiled_iteration']})"
            )
        elif runs:
            server = ((status.get("tiled") or {}).get("server") or {}).get("state")
            parts.append("no live image in Tiled yet" + (f" (Tiled {server})" if server else ""))
        self.stream.write(f"[{elapsed:5.1f} s] " + "; ".join(parts) + "\n")
        self.stream.flush()


#: What ``liveptycho demo`` accepts; a value outside is one line and exit status 2.
DEMO_LIMITS = {
    "points": (2, 200),
    "window": (32, 1024),
    "frame_time": (1e-4, 10.0),
    "iterations": (1, 100_000),
}


def _bounded(kind: type, name: str) -> Any:
    low, high = DEMO_LIMITS[name]

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside {low:g}..{high:g}")
        if name == "window" and value % 2:
            raise argparse.ArgumentTypeError(f"{text} is odd; the window needs an even size")
        return value

    return parse


def add_demo_command(sub: Any) -> None:
    """``liveptycho demo`` and its options."""
    demo = add_command(
        sub,
        "demo",
        "simulated HXN scan → live reconstruction → local Tiled",
        "Run a simulated HXN fly scan through a real RunEngine, reconstruct it live, and "
        "write the result to a local Tiled (started here): progress lines during the scan, "
        "pictures in --out, and the Tiled address to look at the live images.",
    )
    one_line_errors(demo)
    demo.add_argument("--out", default="demo-output", help="folder for pictures and Tiled data")
    demo.add_argument(
        "--points", type=_bounded(int, "points"), default=24, help="scan points per side"
    )
    demo.add_argument(
        "--window", type=_bounded(int, "window"), default=128, help="ROI edge in detector pixels"
    )
    demo.add_argument(
        "--frame-time",
        type=_bounded(float, "frame_time"),
        default=0.06,
        help="seconds per frame (the simulated detectors' rate is its inverse)",
    )
    demo.add_argument(
        "--iterations",
        type=_bounded(int, "iterations"),
        default=100,
        help="iterations after the scan",
    )
    demo.add_argument(
        "--backend",
        choices=["auto", "numpy", "cupy"],
        default="auto",
        help="the solver's arrays: CuPy on a CUDA GPU, NumPy otherwise (auto picks)",
    )
    demo.add_argument(
        "--mode",
        choices=["iterative", "nn", "both"],
        default="iterative",
        help="the iterative solver, the single-shot network's live mosaic, or both",
    )
    demo.add_argument(
        "--encoding",
        choices=["bs32-lz4<", "bs16-lz4<", "lz4<", "raw"],
        default="bs32-lz4<",
        help="Eiger stream encoding",
    )
    demo.add_argument("--tiled-uri", default=None, help="write to this Tiled server instead")
    demo.add_argument("--keep-serving", action="store_true", help="keep Tiled up afterwards")
    demo.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    import importlib.util

    if args.backend == "cupy" and importlib.util.find_spec("cupy") is None:
        print("liveptycho demo: --backend cupy, but CuPy is not installed", file=sys.stderr)
        return 2

    from hxn_liveptycho.demo import run_demo
    from hxn_liveptycho.sim import SimulatedBeamline

    beamline = SimulatedBeamline.for_window(args.window, x_num=args.points, y_num=args.points)
    out = Path(args.out)
    print(
        f"liveptycho demo: {args.points} x {args.points} points, {args.window}² window, "
        f"{args.frame_time:g} s a frame ({args.points**2 * args.frame_time:.0f} s of "
        f"acquisition), mode {args.mode}, backend {args.backend}",
        file=sys.stderr,
    )

    def keep_serving(live: Any) -> None:
        if not args.keep_serving:
            return
        print(f"Tiled is serving at {live.tiled.uri}  (Ctrl-C to stop)")
        try:
            while True:
                time.sleep(1.0)
        except KeyboardInterrupt:
            pass

    result = run_demo(
        out,
        beamline=beamline,
        iterations=args.iterations,
        array_backend=args.backend,
        mode=args.mode,
        dwell=args.frame_time,
        encoding=args.encoding,
        tiled_uri=args.tiled_uri,
        progress=DemoProgress(),
        keep=keep_serving,
    )
    print()
    acquired = result.acquisition
    if acquired:
        print(
            f"acquisition:       {acquired['frames_published']}/{acquired['frames_planned']} "
            f"frames at {acquired['rate_hz'] or 0:.1f} frames/s (set {acquired['target_hz']:.1f})"
        )
    live = result.snapshots_before_stop
    if live and result.start_time is not None:
        print(
            f"live images:       {len(live)} read back from Tiled during the scan, the first "
            f"{live[0].seen - result.start_time:.1f} s after it started"
        )
    else:
        print("live images:       none reached Tiled before the scan ended")
    print(
        f"scan finished: {result.exit_status}; reconstruction {result.status} "
        f"after {result.iterations} iterations in {result.seconds:.1f} s"
    )
    print(f"raw run uid:       {result.raw_uid}")
    print(f"Tiled server:      {result.tiled_uri}")
    print(f"processed result:  {result.container_path}  (metadata raw_uid == raw run uid)")
    if result.object_error is not None:
        print(f"object error vs phantom: {result.object_error:.3f} (normalised, well-lit region)")
    for picture in result.pictures:
        print(f"picture:           {picture}")
    print(f"Tiled data kept in {out / 'data'}; read it back with tiled.client.from_uri(...)")
    return 0 if result.status == "complete" else 1
