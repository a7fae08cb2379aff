"""The ``liveptycho replay`` arguments and what they do (``cli/replay_command.py`` prints)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.replay.runner import ReplayOptions, ReplayReport, replay_run
from hxn_liveptycho.replay.series import SeriesReplayReport, replay_series
from hxn_liveptycho.streams import ENCODINGS

#: How long a fresh 0MQ Publisher is given to connect before the first document.
PUBLISHER_JOIN_S = 2.0
#: Short names for the wire encodings users type.
ENCODING_ALIASES = {"bslz4": "bs32-lz4<", "bslz4-16": "bs16-lz4<", "lz4": "lz4<", "raw": "raw"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source",
        help="archive folder (e.g. archives/clean-12x12), run uid, or scan_id (newest wins)",
    )
    parser.add_argument(
        "more",
        nargs="*",
        metavar="SOURCE",
        help="further runs, replayed after the first in this order as one series "
        "(ptycho-tomography): each is reconstructed before the next is sent",
    )
    parser.add_argument(
        "--series",
        metavar="ID",
        help="the series id the runs are replayed in (default: the one they were recorded "
        "in; runs recorded without one join it)",
    )
    parser.add_argument("--tiled-uri", help="Tiled to read the run from (default: settings)")
    parser.add_argument(
        "--publish",
        metavar="HOST:PORT",
        help="send documents to this 0MQ proxy input (liveptycho serve) instead of an "
        "in-process LivePtycho",
    )
    parser.add_argument("--prefix", default="", help="bluesky Publisher prefix with --publish")
    parser.add_argument(
        "--pace",
        choices=["realtime", "rate", "fast"],
        default="realtime",
        help="as recorded, at --rate, or as fast as possible",
    )
    parser.add_argument("--rate", type=float, default=100.0, help="frames/s with --pace rate")
    parser.add_argument("--speed", type=float, default=1.0, help="speed-up of --pace realtime")
    parser.add_argument("--max-frames", type=int, help="send at most this many positions")
    parser.add_argument(
        "--skip-frames", type=int, default=0, help="drop the first N positions (settling rows)"
    )
    parser.add_argument("--chunk", type=int, default=32, help="frames read at a time")
    parser.add_argument("--flavour", choices=["v1", "v2"], default="v1", help="SIMPLON stream")
    parser.add_argument(
        "--encoding",
        default="bslz4",
        help=f"frame encoding: {', '.join(ENCODING_ALIASES)} or one of {list(ENCODINGS)}",
    )
    parser.add_argument("--eiger", default="tcp://127.0.0.1:*", help="Eiger bind endpoint")
    parser.add_argument("--panda", default="tcp://127.0.0.1:*", help="PandA bind endpoint")
    parser.add_argument(
        "--socket", choices=["pub", "push"], default="pub", help="PUB (proxy-like) or PUSH"
    )
    parser.add_argument(
        "--documents",
        choices=["auto", "export", "streams"],
        default="auto",
        help="Tiled: the server's json-seq export, the run's stream nodes, or either",
    )
    parser.add_argument("--data-dir", type=Path, help="in-process target: embedded Tiled data")
    parser.add_argument(
        "--wait-subscribers",
        type=float,
        default=30.0,
        help="seconds to wait for receivers to connect (--publish: to the Eiger/PandA sockets)",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate and say what would go")


def run(args: argparse.Namespace) -> ReplayReport | SeriesReplayReport:
    """Replay as the arguments say; the report is the caller's to print."""
    fields: dict[str, Any] = {}
    if args.tiled_uri:
        fields["tiled_uri"] = args.tiled_uri
    if args.data_dir:
        fields["data_dir"] = args.data_dir
    settings = Settings(**fields)
    options = ReplayOptions(
        pace=args.pace,
        rate_hz=args.rate,
        speed=args.speed,
        max_frames=args.max_frames,
        skip_frames=args.skip_frames,
        chunk_frames=args.chunk,
        flavour=args.flavour,
        encoding=ENCODING_ALIASES.get(args.encoding, args.encoding),
        socket_type=args.socket,
        eiger_endpoint=args.eiger,
        panda_endpoint=args.panda,
        documents=args.documents,
        subscriber_timeout_s=args.wait_subscribers,
    )
    sources = [args.source, *(args.more or [])]
    if len(sources) > 1 or args.series:
        return _run_series(args, sources, settings, options)
    if args.publish and not args.dry_run:
        from bluesky.callbacks.zmq import Publisher

        publisher = Publisher(args.publish, prefix=args.prefix.encode())
        # A PUB socket drops what it sends before its connection is up (ZMQ's slow joiner,
        # about half a second on a loaded host); a RunEngine's Publisher lives long enough
        # not to notice, a fresh one must wait or lose the start document.
        time.sleep(PUBLISHER_JOIN_S)
        try:
            return replay_run(args.source, callback=publisher, settings=settings, options=options)
        finally:
            publisher.close()
    return replay_run(args.source, settings=settings, options=options, dry_run=args.dry_run)


def _run_series(
    args: argparse.Namespace, sources: list[str], settings: Settings, options: ReplayOptions
) -> SeriesReplayReport:
    """Several runs in order, as one series, into the same target."""
    if args.publish and not args.dry_run:
        from bluesky.callbacks.zmq import Publisher

        publisher = Publisher(args.publish, prefix=args.prefix.encode())
        time.sleep(PUBLISHER_JOIN_S)  # see run(): a fresh PUB socket drops what it sends first
        try:
            return replay_series(
                sources,
                series_id=args.series,
                callback=publisher,
                settings=settings,
                options=options,
            )
        finally:
            publisher.close()
    return replay_series(
        sources, series_id=args.series, settings=settings, options=options, dry_run=args.dry_run
    )
