"""What is configured and installed: ``config-reference``, ``settings`` and ``models``.

Why together: these commands only describe (the settings' reference, the
settings this environment gives, the NN branch's models); none starts a run or
talks to a serve.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from hxn_liveptycho.cli.help_format import add_command


def _config_reference(args: argparse.Namespace) -> int:
    from hxn_liveptycho.devtools.docs_reference import configuration_reference

    print(configuration_reference())
    return 0


def _status_json(args: argparse.Namespace) -> int:
    from hxn_liveptycho.config.settings import Settings

    print(json.dumps(Settings().public_view(), indent=2, default=str))
    return 0


def _model_registry(args: argparse.Namespace) -> Any:
    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.nn.registry import ModelRegistry

    return ModelRegistry(args.model_dir or Settings().model_dir)


def _models_list(args: argparse.Namespace) -> int:
    registry = _model_registry(args)
    print(f"local model directory: {registry.model_dir}")
    for model in registry.list():
        card = model.card
        created = card.created if card else "no card"
        print(f"{model.name:28s} {model.source:8s} {created:12s} {model.path}")
    return 0


def _models_inspect(args: argparse.Namespace) -> int:
    model = _model_registry(args).get(args.name)
    info = model.describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    for key in ("name", "source", "path", "bytes", "sha256"):
        print(f"{key:8s} {info[key]}")
    for role in ("graph_inputs", "graph_outputs"):
        for spec in info[role]:
            print(f"{role[6:-1]:8s} {spec['name']} {spec['shape']} {spec['type']}")
    print()
    print(model.card.to_markdown() if model.card else "(no model card beside the model)")
    return 0


def add_info_commands(sub: Any) -> Any:
    """``config-reference``, ``settings`` and ``models``; returns the models' subparsers."""
    ref = add_command(sub, "config-reference", "print the configuration reference (Markdown)")
    ref.set_defaults(func=_config_reference)

    settings = add_command(
        sub,
        "settings",
        "print the settings read from LIVEPTYCHO_*",
        "Print the settings this machine's LIVEPTYCHO_* environment gives, as JSON, with "
        "every secret hidden.",
    )
    settings.set_defaults(func=_status_json)

    models = add_command(sub, "models", "list or inspect the NN branch's models")
    models.add_argument(
        "--model-dir", type=Path, default=None, help="local models' folder (default: settings)"
    )
    models_sub = models.add_subparsers(dest="models_command", required=True)
    add_command(models_sub, "list", "shipped and local models").set_defaults(func=_models_list)
    inspect = add_command(models_sub, "inspect", "a model's graph I/O and card")
    inspect.add_argument("name", help="model name or path to an .onnx file")
    inspect.add_argument("--json", action="store_true", help="machine-readable")
    inspect.set_defaults(func=_models_inspect)
    return models_sub
