"""``liveptycho serve`` and the commands that talk to a running serve.

Why together: ``serve`` starts the service; ``status``, ``stop``, ``configure`` and
``retry-upload`` are its clients (one client, one way of saying what went wrong,
``--url``/``--token`` from the same settings). ``retry-upload --data-dir`` also
works without a serve, on a folder's backups.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hxn_liveptycho.cli.help_format import add_command

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


def _print_workers(view: dict[str, Any]) -> None:
    workers = view.get("workers") or []
    if view.get("redis") is None:
        print("serve runs alone (no redis_url): one worker")
    else:
        print(f"{len(workers)} serve worker(s) in Redis {view['redis']}")
    for worker in workers:
        state = "alive" if worker.get("alive") else "DEAD"
        if not worker.get("alive") and worker.get("state") == "stopped":
            state = "stopped"
        this = (
            " (this one)" if worker.get("name") and worker.get("name") == view.get("this") else ""
        )
        print(
            f"worker {worker.get('name') or 'serve'}{this} {state}, heartbeat "
            f"{worker.get('heartbeat_age_s')} s ago, {worker.get('url') or ''}".rstrip(", ")
        )
        for run in worker.get("runs") or []:
            print(
                f"  scan {run.get('scan_id')} {str(run.get('uid'))[:8]} {run.get('status')}, "
                f"iteration {run.get('iteration')}"
            )


def _workers_from_redis(redis_url: str, args: argparse.Namespace) -> int:
    """``status --all`` read from the workers' Redis itself: no serve needs to answer."""
    from hxn_liveptycho.config.settings import Settings, redact_uri
    from hxn_liveptycho.control.workers import list_workers, redis_client

    client = redis_client(redis_url)
    try:
        workers = list_workers(client, Settings().claim_ttl_s)
    except Exception as exc:  # redis' errors: one line, exit status 1
        print(f"liveptycho status: Redis {redact_uri(redis_url)}: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    view = {"redis": redact_uri(redis_url), "this": None, "workers": workers}
    if args.json:
        print(json.dumps(view, indent=2, default=str))
    else:
        _print_workers(view)
    return 0


def _status(args: argparse.Namespace) -> int:
    if args.all and args.url is None:
        from hxn_liveptycho.config.settings import Settings

        redis_url = Settings().redis_url
        if redis_url:
            return _workers_from_redis(redis_url, args)

    def call(client: Any) -> Any:
        if args.all:
            view = client.workers()
            if args.json:
                return view
            _print_workers(view)
            return None
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


def add_serve_commands(sub: Any) -> None:
    """``liveptycho serve`` and its client commands, with their options."""
    serve = add_command(
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
            "Print one line per recent run of a running serve (--json: everything; --all: "
            "every serve worker sharing its Redis, and their runs).",
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
        command = add_command(sub, name, text, description)
        command.add_argument("--url", help="serve's URL (default from LIVEPTYCHO_SERVE_*)")
        command.add_argument("--token", help="API token (default LIVEPTYCHO_API_TOKEN)")
        command.set_defaults(func=func)
        if name == "status":
            command.add_argument("--json", action="store_true", help="the full status as JSON")
            command.add_argument(
                "--all",
                action="store_true",
                help="every serve worker sharing this one's Redis, and their runs (read from "
                "LIVEPTYCHO_REDIS_URL when it is set and --url is not given)",
            )
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
