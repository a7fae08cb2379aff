"""How every ``liveptycho`` command documents itself and says a user's mistake.

Why apart: each command module builds its own subcommand with these, so every
command's page shows real defaults the same way and a wrong option is one line
(tests/test_cli_help.py checks both for every command).
"""

from __future__ import annotations

import argparse
from typing import Any, NoReturn


class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default where it has a real one; options whose default comes
    from the settings (None here) say so in their help instead."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and default not in (None, False, argparse.SUPPRESS)
            and action.option_strings
            and action.nargs != 0
        ):
            text += " (default: %(default)s)"
        return text


def add_command(sub: Any, name: str, text: str, description: str | None = None) -> Any:
    """A subcommand with a one-line ``help`` for the list and a ``description`` for its page."""
    return sub.add_parser(
        name,
        help=text,
        description=description or text[:1].upper() + text[1:] + ".",
        formatter_class=HelpFormatter,
    )


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """A wrong option is one line (what is wrong) and exit status 2, not the usage block."""

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: {message} (see --help)\n")

    parser.error = error  # type: ignore[method-assign]
