"""``liveptycho replay``: an archived run published again, as the beamline did.

Why here: the options and the replay itself are :mod:`hxn_liveptycho.replay.command`'s;
this adds the command to the parser, refuses early what cannot work (a uid or
scan_id without a Tiled to read it from) and prints the report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hxn_liveptycho.cli.help_format import add_command


def _needs_tiled(source: str) -> bool:
    """Whether replay would look ``source`` up in Tiled (its rule: no folder, no separator)."""
    return not (Path(source).exists() or "/" in source or "\\" in source)


def run_replay_command(args: argparse.Namespace) -> int:
    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.replay import ReplayError
    from hxn_liveptycho.replay.command import run

    if _needs_tiled(args.source) and not args.tiled_uri and Settings().tiled_uri is None:
        # Without a Tiled URI the run would be looked up in an embedded server that holds
        # only processed results (and was stopped before the lookup: a minute, then a
        # ConnectError).
        print(
            f"liveptycho replay: {args.source!r} is no archive folder here, and a run uid or "
            "scan_id is read from Tiled: give --tiled-uri or set LIVEPTYCHO_TILED_URI",
            file=sys.stderr,
        )
        return 2
    try:
        report = run(args)
    except ReplayError as exc:
        print(f"cannot replay: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if report.eiger_endpoint:
        print(f"Eiger stream on {report.eiger_endpoint}, PandA on {report.panda_endpoint}")
    status = (report.result or {}).get("status")
    return 0 if report.dry_run or status in (None, "complete") else 1


def add_replay_command(sub: Any) -> None:
    """``liveptycho replay`` and its options (from :mod:`hxn_liveptycho.replay.command`)."""
    from hxn_liveptycho.replay.command import add_arguments

    replay = add_command(
        sub,
        "replay",
        "replay an archived run: documents + Eiger/PandA streams, paced",
        "Replay an archived run (a folder, or a uid / scan_id in Tiled) as the beamline "
        "published it: documents through a RunEngine-like publisher, Eiger frames and "
        "PandA positions on their streams, paced as recorded (or faster), into a live "
        "reconstruction here or into a running serve.",
    )
    add_arguments(replay)
    replay.set_defaults(func=run_replay_command)
