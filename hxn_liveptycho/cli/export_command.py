"""``liveptycho export``: a run's final result from Tiled as a file other programs read.

Why here: the file and what goes in it are :mod:`hxn_liveptycho.store.cxi_export`'s;
this adds the command, finds Tiled the way every other command does (settings,
``--tiled-uri``; the embedded server's folder when none is set) and says what it
wrote. An unknown run is one line and exit status 1 (main's rule for errors).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from hxn_liveptycho.cli.help_format import add_command

logger = logging.getLogger(__name__)

#: The formats ``--format`` accepts.
FORMATS = ("cxi",)


def run_export_command(args: argparse.Namespace) -> int:
    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.store.cxi_export import find_container, read_container
    from hxn_liveptycho.store.cxi_layout import write_cxi
    from hxn_liveptycho.store.server import TiledConnection

    fields: dict[str, Any] = {}
    if args.tiled_uri:
        fields["tiled_uri"] = args.tiled_uri
    if args.catalog_path:
        fields["catalog_path"] = args.catalog_path
    settings = Settings(**fields)
    if args.output is not None and args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} exists: give --overwrite to replace it")
    tiled = TiledConnection(settings)
    try:
        node, path = find_container(tiled.client(), args.source, settings.catalog_path)
        result, notes = read_container(node, path, with_frames=not args.no_frames)
        output = args.output or Path(f"{path.rsplit('/', 1)[-1]}.cxi")
        if output.exists() and not args.overwrite:
            raise FileExistsError(f"{output} exists: give --overwrite to replace it")
        write_cxi(result, output)
    finally:
        tiled.close()
    for note in notes:
        logger.info("%s", note)
    frames = result.frames.count if result.frames is not None else 0
    print(
        f"{output}: run {result.raw_uid} (scan {result.scan_id}, {result.status}), object "
        f"{result.object.shape[-2]}x{result.object.shape[-1]}, {len(result.probes)} probe "
        f"mode(s), {len(result.positions_m)} positions, {frames} frames"
    )
    return 0


def add_export_command(sub: Any) -> None:
    """``liveptycho export`` and its options."""
    export = add_command(
        sub,
        "export",
        "export a run's final result from Tiled as a CXI (NXcxi_ptycho) file",
        "Export the final result of a run (object, every probe mode, positions, energy, "
        "distance, pixel sizes, raw_uid, and the measured frames) from its processed "
        "container in Tiled as a CXI 1.6 / NeXus NXcxi_ptycho file that ptychodus and PtyPy "
        "read. Tiled is LIVEPTYCHO_TILED_URI (or --tiled-uri); unset, the embedded "
        "server's data in LIVEPTYCHO_DATA_DIR. See docs/cxi-export.md.",
    )
    export.add_argument(
        "source",
        help="the raw run's uid (its newest result), a container key under the catalog "
        "path, or a container path such as processed/liveptycho/scan12-1a2b3c4d-...",
    )
    export.add_argument(
        "--format", choices=FORMATS, default="cxi", help="file format (CXI 1.6 / NXcxi_ptycho)"
    )
    export.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="file to write; default: <container key>.cxi in the current folder",
    )
    export.add_argument("--overwrite", action="store_true", help="replace an existing file")
    export.add_argument(
        "--no-frames",
        action="store_true",
        help="leave the measured frames out (object, probe, positions and geometry only)",
    )
    export.add_argument(
        "--tiled-uri", default=None, help="Tiled server to read from; default: the settings'"
    )
    export.add_argument(
        "--catalog-path", default=None, help="where processed containers are; default: settings'"
    )
    export.set_defaults(func=run_export_command)
