"""``liveptycho``: live ptychographic reconstruction for HXN, from the command line.

``demo`` runs a simulated scan end to end; ``serve`` runs the engine as a
service fed by bluesky's 0MQ documents; ``status``, ``stop``, ``configure`` and
``retry-upload`` talk to a running serve; ``replay`` publishes an archived run
as the beamline did; ``models``, ``settings`` and ``config-reference``
describe what is installed and configured. Settings come from ``LIVEPTYCHO_*``
environment variables (see ``liveptycho config-reference``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from hxn_liveptycho import __version__
from hxn_liveptycho.cli.demo_command import add_demo_command
from hxn_liveptycho.cli.export_command import add_export_command
from hxn_liveptycho.cli.help_format import HelpFormatter, one_line_errors
from hxn_liveptycho.cli.info_commands import add_info_commands
from hxn_liveptycho.cli.reconstruct_command import add_reconstruct_command
from hxn_liveptycho.cli.replay_command import add_replay_command
from hxn_liveptycho.cli.serve_commands import add_serve_commands

__all__ = ["build_parser", "main"]


def _configure_logging(verbose: int) -> None:
    """Our own loggers at INFO (DEBUG with -vv); everybody else's at WARNING."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    logging.getLogger("hxn_liveptycho").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


def build_parser() -> argparse.ArgumentParser:
    """Every command with its options; each command module adds its own."""
    parser = argparse.ArgumentParser(
        prog="liveptycho", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=1,
        help="more log lines; -vv: debug, and tracebacks instead of one-line errors",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    add_demo_command(sub)
    models_sub = add_info_commands(sub)
    add_serve_commands(sub)
    add_replay_command(sub)
    add_reconstruct_command(sub)
    add_export_command(sub)
    for command in (parser, *sub.choices.values(), *models_sub.choices.values()):
        one_line_errors(command)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user's mistake is one line on stderr and a non-zero exit status.

    Exit status 2: bad settings or arguments; 1: the command failed (serve
    unreachable, a file missing); 130: interrupted. ``-vv`` shows the traceback.
    """
    from hxn_liveptycho.control.client import ServeError
    from hxn_liveptycho.errors import ConfigurationError, LivePtychoError

    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        return int(args.func(args))
    except KeyboardInterrupt:
        print(f"liveptycho {args.command}: interrupted", file=sys.stderr)
        return 130
    except (LivePtychoError, ServeError, ValueError, OSError) as exc:
        if args.verbose > 1:
            raise
        print(f"liveptycho {args.command}: {_one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigurationError) else 1
