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
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from hxn_liveptycho import __version__


def _configure_logging(verbose: int) -> None:
    """Our own loggers at INFO (DEBUG with -vv); everybody else's at WARNING."""
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s"
    )
    logging.getLogger("hxn_liveptycho").setLevel(logging.DEBUG if verbose > 1 else logging.INFO)


class _Progress:
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


def _one_line_errors(parser: argparse.ArgumentParser) -> None:
    """A wrong option is one line (what is wrong) and exit status 2, not the usage block."""

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: {message} (see --help)\n")

    parser.error = error  # type: ignore[method-assign]


def _demo(args: argparse.Namespace) -> int:
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
        progress=_Progress(),
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


#: ``liveptycho serve`` flags → the Settings fields they set (flags win over LIVEPTYCHO_*).
_SERVE_FLAGS = {
    "host": "serve_host",
    "port": "serve_port",
    "documents": "documents_address",
    "proxy_in": "documents_proxy_in",
    "prefix": "documents_prefix",
    "log_file": "log_file",
    "tiled_uri": "tiled_uri",
    "eiger": "eiger_endpoint",
    "panda": "panda_endpoint",
    "data_dir": "data_dir",
}


def _serve(args: argparse.Namespace) -> int:
    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.errors import ConfigurationError
    from hxn_liveptycho.serve import run_serve

    fields = {f: getattr(args, flag) for flag, f in _SERVE_FLAGS.items()}
    try:
        return run_serve(Settings(**{k: v for k, v in fields.items() if v is not None}))
    except ConfigurationError as exc:
        print(f"liveptycho serve: {exc}", file=sys.stderr)
        return 2


def _serve_client(args: argparse.Namespace) -> Any:
    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.control.client import ServeClient

    return ServeClient.from_settings(Settings(), url=args.url, token=args.token)


def _client_call(
    args: argparse.Namespace,
    call: Any,
    report: Callable[[argparse.Namespace, Any], int] | None = None,
) -> int:
    """``call`` on a client of the running serve; its result printed as JSON, or handed to
    ``report`` (which returns the exit status)."""
    from hxn_liveptycho.control.client import ServeError
    from hxn_liveptycho.errors import ConfigurationError

    try:
        with _serve_client(args) as client:
            result = call(client)
    except ConfigurationError:
        raise  # bad settings: main's one line and exit status 2
    except (ServeError, ValueError) as exc:
        print(f"liveptycho {args.command}: {exc}", file=sys.stderr)
        return 1
    if report is not None:
        return report(args, result)
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


def _print_status(status: dict[str, Any]) -> None:
    serve = status.get("serve", {})
    docs = status.get("documents", {})
    print(
        f"serve {serve.get('version')} up {serve.get('uptime_s')} s; documents from "
        f"{docs.get('address')}: {docs.get('counters')}"
    )
    for name, counters in (status.get("receivers") or {}).items():
        print(f"receiver {name}: {counters}")
    for run in status.get("runs") or []:
        err = run.get("error_metric")
        print(
            f"scan {run['scan_id']} {run['uid'][:8]} {run['status']}: "
            f"{run['positions']}/{run.get('expected_positions', '?')} positions, "
            f"iteration {run['iteration']}"
            + (f", data mismatch {err:.4g}" if err is not None else "")
            + (f" ({run['error']})" if run.get("error") else "")
        )


def _status(args: argparse.Namespace) -> int:
    def call(client: Any) -> Any:
        status = client.status()
        if args.json:
            return status
        _print_status(status)
        return None

    return _client_call(args, call)


def _stop(args: argparse.Namespace) -> int:
    from hxn_liveptycho.control.client import ServeError

    def call(client: Any) -> Any:
        result = client.stop(args.uid)
        if args.uid is not None and not result.get("stopped"):
            run = client.run(args.uid)  # an unknown uid is serve's 404, one line
            raise ServeError(f"run {args.uid!r} is not running (it ended {run.get('status')})")
        return result

    return _client_call(args, call)


def _configure(args: argparse.Namespace) -> int:
    from hxn_liveptycho.control.client import parse_assignments

    def call(client: Any) -> Any:
        result = {}
        if args.model:
            result = client.select_model(args.model)
        if args.assignments or args.replace:
            result = client.configure(parse_assignments(args.assignments), replace=args.replace)
        return result or client.config()

    return _client_call(args, call)


def _retry_upload(args: argparse.Namespace) -> int:
    """Upload the results Tiled did not take: through a running serve, or (``--data-dir``)
    the backups of that folder directly, for a process that has ended."""
    if args.data_dir is None:
        if args.list:
            return _client_call(args, lambda client: client.uploads())
        return _client_call(args, lambda client: client.retry_uploads(), _report_uploads)
    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.store.server import TiledConnection

    settings = Settings(data_dir=args.data_dir)
    if not (settings.data_dir / "backup").is_dir():
        print(f"liveptycho retry-upload: no backup folder in {settings.data_dir}", file=sys.stderr)
        return 1
    tiled = TiledConnection(settings)
    try:
        if args.list:
            print(json.dumps(tiled.recovery.pending(), indent=2, default=str))
            return 0
        return _report_uploads(args, tiled.retry_uploads())
    finally:
        tiled.close()


def _report_uploads(args: argparse.Namespace, report: dict[str, Any]) -> int:
    for key in report.get("uploaded", []):
        print(f"uploaded {key}")
    errors = report.get("errors") or {}
    for key, error in errors.items():
        print(f"liveptycho {args.command}: {key}: {error}", file=sys.stderr)
    waiting = report.get("pending") or []
    print(f"{len(report.get('uploaded', []))} uploaded, {len(waiting)} still waiting")
    return 1 if errors or waiting else 0


class _HelpFormatter(argparse.HelpFormatter):
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


def _command(sub: Any, name: str, text: str, description: str | None = None) -> Any:
    """A subcommand with a one-line ``help`` for the list and a ``description`` for its page."""
    return sub.add_parser(
        name,
        help=text,
        description=description or text[:1].upper() + text[1:] + ".",
        formatter_class=_HelpFormatter,
    )


def _add_serve_commands(sub: Any) -> None:
    serve = _command(
        sub,
        "serve",
        "run the engine as a service fed documents over 0MQ",
        "Run the engine as a long-lived service: documents from bluesky's 0MQ proxy, "
        "frames from the Eiger and PandA streams, results to Tiled, and an HTTP API and "
        "live page for status and control. Options override the LIVEPTYCHO_* settings.",
    )
    texts = {
        "host": "API bind address; beyond loopback needs an API token",
        "port": "API and live page port",
        "documents": "0MQ proxy output to subscribe to (host:port)",
        "proxy_in": "run bluesky's 0MQ proxy here; publishers connect to it",
        "prefix": "accept only this bluesky Publisher prefix",
        "log_file": "also append the log to this file",
        "tiled_uri": "Tiled server for results (unset: an embedded one)",
        "eiger": "Eiger stream endpoint (tcp://host:port)",
        "panda": "PandA stream endpoint (tcp://host:port)",
        "data_dir": "folder of the embedded Tiled and of local backups",
    }
    kinds: dict[str, Any] = {"port": int, "log_file": Path, "data_dir": Path}
    for dest, setting in _SERVE_FLAGS.items():
        serve.add_argument(
            "--" + dest.replace("_", "-"),
            dest=dest,
            type=kinds.get(dest, str),
            help=f"{texts[dest]} (default: LIVEPTYCHO_{setting.upper()} or its default)",
        )
    serve.set_defaults(func=_serve)

    for name, text, description, func in (
        (
            "status",
            "status of a running serve",
            "Print one line per recent run of a running serve (--json: everything).",
            _status,
        ),
        (
            "stop",
            "stop a reconstruction on serve (the newest running by default)",
            "Stop a reconstruction on a running serve; it writes what it has and ends "
            "'aborted'. Exit status 1 when nothing was running.",
            _stop,
        ),
        (
            "configure",
            "set overrides for the next runs on serve: KEY=VALUE ...",
            "Set overrides for the next runs on a running serve, e.g. recon.iterations=200 "
            "roi.size=256; merged into the current ones (--replace replaces them). Values "
            "are checked against the settings' models; a bad one is refused with its field.",
            _configure,
        ),
        (
            "retry-upload",
            "upload results Tiled did not take (serve's, or a --data-dir's backups)",
            "Upload now the results Tiled refused: a running serve's (local backups and "
            "results held in memory), or with --data-dir the backups of that folder, for a "
            "process that has ended (its embedded Tiled is started if it has one). Exit "
            "status 1 while anything still waits.",
            _retry_upload,
        ),
    ):
        command = _command(sub, name, text, description)
        command.add_argument("--url", help="serve's URL (default from LIVEPTYCHO_SERVE_*)")
        command.add_argument("--token", help="API token (default LIVEPTYCHO_API_TOKEN)")
        command.set_defaults(func=func)
        if name == "status":
            command.add_argument("--json", action="store_true", help="the full status as JSON")
        elif name == "stop":
            command.add_argument("uid", nargs="?", help="run uid or its first 8+ characters")
        elif name == "retry-upload":
            command.add_argument(
                "--data-dir",
                type=Path,
                help="upload this folder's backups directly (no serve needed)",
            )
            command.add_argument("--list", action="store_true", help="only list what waits")
        else:
            command.add_argument("assignments", nargs="*", help="e.g. recon.iterations=50")
            command.add_argument("--replace", action="store_true", help="replace, not merge")
            command.add_argument("--model", help="NN model for the next runs")


def _needs_tiled(source: str) -> bool:
    """Whether replay would look ``source`` up in Tiled (its rule: no folder, no separator)."""
    return not (Path(source).exists() or "/" in source or "\\" in source)


def _replay(args: argparse.Namespace) -> int:
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


def _add_replay_command(sub: Any) -> None:
    from hxn_liveptycho.replay.command import add_arguments

    replay = _command(
        sub,
        "replay",
        "replay an archived run: documents + Eiger/PandA streams, paced",
        "Replay an archived run (a folder, or a uid / scan_id in Tiled) as the beamline "
        "published it: documents through a RunEngine-like publisher, Eiger frames and "
        "PandA positions on their streams, paced as recorded (or faster), into a live "
        "reconstruction here or into a running serve.",
    )
    add_arguments(replay)
    replay.set_defaults(func=_replay)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="liveptycho", description=__doc__, formatter_class=_HelpFormatter
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

    demo = _command(
        sub,
        "demo",
        "simulated HXN scan → live reconstruction → local Tiled",
        "Run a simulated HXN fly scan through a real RunEngine, reconstruct it live, and "
        "write the result to a local Tiled (started here): progress lines during the scan, "
        "pictures in --out, and the Tiled address to look at the live images.",
    )
    _one_line_errors(demo)
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
    demo.set_defaults(func=_demo)

    ref = _command(sub, "config-reference", "print the configuration reference (Markdown)")
    ref.set_defaults(func=_config_reference)

    settings = _command(
        sub,
        "settings",
        "print the settings read from LIVEPTYCHO_*",
        "Print the settings this machine's LIVEPTYCHO_* environment gives, as JSON, with "
        "every secret hidden.",
    )
    settings.set_defaults(func=_status_json)

    models = _command(sub, "models", "list or inspect the NN branch's models")
    models.add_argument(
        "--model-dir", type=Path, default=None, help="local models' folder (default: settings)"
    )
    models_sub = models.add_subparsers(dest="models_command", required=True)
    _command(models_sub, "list", "shipped and local models").set_defaults(func=_models_list)
    inspect = _command(models_sub, "inspect", "a model's graph I/O and card")
    inspect.add_argument("name", help="model name or path to an .onnx file")
    inspect.add_argument("--json", action="store_true", help="machine-readable")
    inspect.set_defaults(func=_models_inspect)
    _add_serve_commands(sub)
    _add_replay_command(sub)
    for command in (parser, *sub.choices.values(), *models_sub.choices.values()):
        _one_line_errors(command)
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


if __name__ == "__main__":
    sys.exit(main())
