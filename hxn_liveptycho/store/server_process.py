"""The embedded Tiled server's own process: ``python -m hxn_liveptycho.store.server_process``.

Tiled's server answers every write with Python work (JSON, validation, Zarr
and SQLite I/O); in the process that runs the RunEngine or the solver it
competes with them for the GIL, and on a small machine it came up only after
the scan had ended. So :class:`~hxn_liveptycho.store.server.EmbeddedTiledServer`
runs it here, in a child process, with the setup a facility's Tiled gives
Bluesky runs (SQLite catalog, files and DuckDB under ``--directory``, the
``application/json-seq`` exporter of bluesky-tiled-plugins).

The protocol with the parent, all on the child's standard streams:

- stdin, first line: the single-user API key. It is never on the command line
  (``/proc/<pid>/cmdline`` is world-readable) nor in the environment.
- stdout, one JSON line ``{"port": P}`` once the listening socket is bound
  (``--port``, the port of a previous incarnation, is tried first so clients
  made before a restart keep working; 0 or a taken port gives a random one).
  After that line stdout is closed onto stderr, which the parent points at
  ``<directory>/server.log``.
- stdin again: end of file means the parent has gone (or closed the server):
  the server shuts down. On Linux the kernel also sends SIGTERM when the parent
  dies (``PR_SET_PDEATHSIG``), which covers a parent whose pipe was inherited by
  a forked grandchild; and the parent's pid is polled as a last resort.

Readiness is the parent's to judge, through ``/healthz``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import select
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hxn_liveptycho.children import exit_with_parent

logger = logging.getLogger("hxn_liveptycho.store.server_process")

#: Seconds uvicorn gives open requests to finish once asked to stop.
GRACEFUL_SHUTDOWN_S = 2.0
#: Seconds after being asked to stop before the process exits regardless.
HARD_EXIT_AFTER_S = 10.0
#: How often the watcher looks at stdin and the parent's pid.
WATCH_INTERVAL_S = 0.5


def bluesky_serialization_registry() -> Any:
    """Tiled's default exporters plus the Bluesky document stream, as a facility config adds:

    ``media_types: {BlueskyRun: {application/json-seq:
    bluesky_tiled_plugins.exporters:json_seq_exporter}}``
    """
    from bluesky_tiled_plugins.exporters import json_seq_exporter
    from tiled.media_type_registration import default_serialization_registry

    registry = copy.deepcopy(default_serialization_registry)
    registry.register("BlueskyRun", "application/json-seq", json_seq_exporter)
    return registry


def build_app(directory: Path, api_key: str) -> tuple[Any, Any]:
    """Tiled's app over ``directory`` (``SimpleTiledServer``'s setup with the Bluesky exporter).

    ``SimpleTiledServer`` cannot be given exporters, so its few lines of setup
    are repeated here. Returns the app and the DuckDB storage, which the caller
    disposes of after the server stops.
    """
    from tiled.catalog import from_uri as catalog_from_uri
    from tiled.config import Authentication, StreamingCacheConfig
    from tiled.server.app import build_app as tiled_build_app
    from tiled.storage import get_storage
    from tiled.utils import ensure_uri

    (directory / "data").mkdir(parents=True, exist_ok=True)
    storage_uri = ensure_uri(f"duckdb:///{directory / 'storage.duckdb'}")
    catalog = catalog_from_uri(
        directory / "catalog.db",
        writable_storage=[directory / "data", storage_uri],
        init_if_not_exists=True,
        cache_config=StreamingCacheConfig(uri="memory").model_dump(),
    )
    app = tiled_build_app(
        catalog,
        authentication=Authentication(single_user_api_key=api_key),
        serialization_registry=bluesky_serialization_registry(),
    )
    return app, get_storage(storage_uri)


_API_KEY_VALUE = re.compile(r"(api_key=)[^&\s\"']+", re.IGNORECASE)


class RedactApiKey(logging.Filter):
    """Hides ``api_key=...`` in access-log lines: tiled's client sends it in the first URL."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(
            isinstance(a, str) and "api_key=" in a.lower() for a in record.args
        ):
            record.args = tuple(
                _API_KEY_VALUE.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args
            )
        elif isinstance(record.msg, str) and "api_key=" in record.msg.lower():
            record.msg = _API_KEY_VALUE.sub(r"\1***", record.msg)
        return True


def uvicorn_log_config(directory: Path) -> dict[str, Any]:
    """Tiled's uvicorn logging, into ``access.log`` and ``error.log``, API keys hidden."""
    from tiled.server.logging_config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"]["redact_api_key"] = {"()": "hxn_liveptycho.store.server_process.RedactApiKey"}
    for handler, filename in (("access", "access.log"), ("default", "error.log")):
        config["handlers"][handler]["class"] = "logging.FileHandler"
        del config["handlers"][handler]["stream"]
        config["handlers"][handler]["filename"] = str(directory / filename)
        config["handlers"][handler]["filters"].insert(0, "redact_api_key")
    for formatter in config["formatters"].values():
        formatter["use_colors"] = False  # files, not a terminal
    return config


def bind(port: int) -> socket.socket:
    """A listening socket on localhost: ``port`` if it is free, else one the kernel picks."""
    for candidate in dict.fromkeys((port, 0)):
        # proto must be IPPROTO_TCP (not 0) for asyncio to set TCP_NODELAY on accepted
        # connections; without it every response on a kept-alive connection waited for
        # the client's delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # A previous incarnation's connections in TIME_WAIT must not keep its port from us.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", candidate))
        except OSError:
            sock.close()
            continue
        sock.listen(2048)
        sock.set_inheritable(False)
        return sock
    raise OSError("could not bind a port on 127.0.0.1")


def _watch_parent(server: Any, parent_pid: int) -> None:
    """Stop the server when stdin closes or the parent is gone; exit hard if it will not stop."""
    stdin = sys.stdin.buffer.fileno()
    while not server.should_exit:
        ready, _, _ = select.select([stdin], [], [], WATCH_INTERVAL_S)
        if ready and not os.read(stdin, 4096):
            logger.info("the parent closed the pipe: stopping")
            break
        if os.getppid() != parent_pid:
            logger.info("the parent (pid %d) is gone: stopping", parent_pid)
            break
    server.should_exit = True
    time.sleep(HARD_EXIT_AFTER_S)
    logger.error("the server did not stop within %s s: exiting", HARD_EXIT_AFTER_S)
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--directory", type=Path, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    )
    exit_with_parent(args.parent_pid)
    api_key = sys.stdin.buffer.readline().strip().decode("ascii", "replace")
    if not api_key:
        logger.error("no API key on stdin: the parent must write it first")
        return 2

    import uvicorn

    directory = args.directory.resolve()
    app, storage = build_app(directory, api_key)
    sock = bind(args.port)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            loop="asyncio",
            log_config=uvicorn_log_config(directory),
            timeout_graceful_shutdown=int(GRACEFUL_SHUTDOWN_S),
        )
    )
    threading.Thread(
        target=_watch_parent, args=(server, args.parent_pid), name="watch-parent", daemon=True
    ).start()
    port = sock.getsockname()[1]
    sys.stdout.write(json.dumps({"port": port}) + "\n")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # nothing else may reach the parent's pipe
    logger.info("Tiled for %s listening on 127.0.0.1:%d", directory, port)
    try:
        server.run(sockets=[sock])
    finally:
        storage.dispose()
    logger.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
