"""The command line documents itself: every command has a description, every option a help
text, and ``--help`` works for each (issue 24, 'CLI help')."""

from __future__ import annotations

import argparse

import pytest

from hxn_liveptycho.cli import build_parser, main


def _commands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()) -> list[tuple]:
    found = [(prefix, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found += _commands(sub, (*prefix, name))
    return found


COMMANDS = _commands(build_parser())
IDS = [" ".join(path) or "liveptycho" for path, _ in COMMANDS]


@pytest.mark.parametrize(("path", "parser"), COMMANDS, ids=IDS)
def test_every_command_and_option_is_documented(path, parser):
    assert parser.description, f"liveptycho {' '.join(path)} has no description"
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        assert action.help, f"liveptycho {' '.join(path)} {action.option_strings or action.dest}"


@pytest.mark.parametrize("path", [p for p, _ in COMMANDS], ids=IDS)
def test_help_of_every_command_prints_and_exits_zero(path, capsys):
    with pytest.raises(SystemExit) as done:
        main([*path, "--help"])
    assert done.value.code == 0
    assert "usage: liveptycho" in capsys.readouterr().out


def test_defaults_are_shown_where_they_are_real():
    demo = dict(_commands(build_parser()))[("demo",)]
    text = demo.format_help()
    assert "(default: 24)" in text and "(default: bs32-lz4<)" in text
    assert "default: None" not in build_parser().format_help()
    serve = dict(_commands(build_parser()))[("serve",)].format_help()
    assert "default: None" not in serve and "LIVEPTYCHO_SERVE_PORT" in serve
