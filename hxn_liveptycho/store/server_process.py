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
import contextlib
import copy
import json
import logging
import os
import re
import select
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from hxn_liveptycho.util.children import exit_with_parent

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


def _commit_without_fsync(dbapi_connection: Any, _record: Any) -> None:
    """SQLite ``synchronous=NORMAL`` for the catalog (already in WAL mode): a commit no
    longer waits for the disk to flush.

    Every node the sink makes (the container, ``live/`` and ``final/`` and their
    arrays) is a catalog commit, and the first live image and the final result
    wait for them; on a disk with slow flushes each cost a flush. In WAL mode
    the database stays consistent through a crash; what a power loss can cost
    is the last commits, of a store on the machine that reconstructs (a
    facility's Tiled keeps its own settings).
    """
    if (
        "sqlite"
        not in type(dbapi_connection).__module__.lower() + type(dbapi_connection).__name__.lower()
    ):
        return
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def warm_array_storage(directory: Path) -> None:
    """Load and start what the server's first array write needs (Zarr, obstore, Tiled's
    Zarr adapter, Zarr's I/O thread) before the port is announced.

    Otherwise the first run's first array node pays for it, and that is the first
    live image the scientist waits for. A failure here only logs: the first
    write then reports whatever is wrong.
    """
    began = time.monotonic()
    scratch = directory / "warm-up"
    try:
        import numpy as np
        import tiled.adapters.zarr  # noqa: F401
        import zarr
        from obstore.store import LocalStore
        from zarr.storage import ObjectStore

        scratch.mkdir(parents=True, exist_ok=True)
        store = ObjectStore(store=LocalStore(str(scratch)))
        array = zarr.create_array(store, shape=(4, 4), chunks=(4, 4), dtype="complex64")
        array[:] = np.ones((4, 4), np.complex64)
        _ = array[:]
    except Exception as exc:
        logger.warning("array storage not warmed up: %s", exc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    logger.info("array storage warmed up in %.2f s", time.monotonic() - began)


def build_app(directory: Path, api_key: str) -> tuple[Any, Any]:
    """Tiled's app over ``directory`` (``SimpleTiledServer``'s setup with the Bluesky exporter).

    ``SimpleTiledServer`` cannot be given exporters, so its few lines of setup
    are repeated here. Returns the app and the DuckDB storage, which the caller
    disposes of after the server stops.
    """
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from tiled.catalog import from_uri as catalog_from_uri
    from tiled.config import Authentication, StreamingCacheConfig
    from tiled.server.app import build_app as tiled_build_app
    from tiled.storage import get_storage
    from tiled.utils import ensure_uri

    # This process serves only the embedded catalog: every engine in it is that catalog's.
    if not event.contains(Engine, "connect", _commit_without_fsync):
        event.listen(Engine, "connect", _commit_without_fsync)
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


#: Query parameters whose values are secrets, in any case and percent-encoding of ``_``.
_SECRET_PARAMETER = re.compile(
    r"((?:api(?:_|%5f)key|(?:access(?:_|%5f))?token)=)[^&\s\"']+", re.IGNORECASE
)

#: The log files of the server's directory; created readable by their owner only.
LOG_FILES = ("server.log", "access.log", "error.log")


class RedactApiKey(logging.Filter):
    """Hides secrets in log records: ``api_key=...`` values, and the server's own key anywhere.

    Tiled's client sends the key in the first URL, users paste URIs with it,
    and a key may end up in a path or a traceback; the server knows its key, so
    every appearance of it (and of its URL-encoded forms) is replaced, in the
    message, its arguments and exception text, before any handler writes it.
    """

    def __init__(self, name: str = "", secrets: list[str] | tuple[str, ...] = ()) -> None:
        super().__init__(name)
        forms = {form for secret in secrets if secret for form in _encodings(secret)}
        self._secrets = (
            re.compile("|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True)))
            if forms
            else None
        )

    def redact(self, text: str) -> str:
        text = _SECRET_PARAMETER.sub(r"\1***", text)
        return self._secrets.sub("***", text) if self._secrets is not None else text

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = self.redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self.redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {
                k: self.redact(v) if isinstance(v, str) else v for k, v in record.args.items()
            }
        if self._secrets is not None and record.args:
            # A key inside a container argument (formatted with %r): redact the message.
            try:
                message = record.getMessage()
            except Exception:  # a bad format string: logging reports it itself
                message = ""
            if self._secrets.search(message):
                record.msg, record.args = self.redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


class RedactingStream:
    """A text stream that hides secrets in what is written to it (the child's ``sys.stderr``).

    Logging has :class:`RedactApiKey`; this covers what bypasses logging:
    warnings, uncaught-exception tracebacks of threads, stray prints. Lines
    are redacted whole, so a key split over two writes is still found.
    """

    def __init__(self, stream: Any, redact: RedactApiKey) -> None:
        self._stream = stream
        self._redact = redact
        self._pending = ""

    def write(self, text: str) -> int:
        self._pending += text
        lines, sep, self._pending = self._pending.rpartition("\n")
        if sep:
            self._stream.write(self._redact.redact(lines + sep))
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._stream.write(self._redact.redact(self._pending))
            self._pending = ""
        self._stream.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _encodings(secret: str) -> set[str]:
    from urllib.parse import quote, quote_plus

    return {secret, quote(secret, safe=""), quote_plus(secret)}


def uvicorn_log_config(directory: Path, secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    """Tiled's uvicorn logging, into ``access.log`` and ``error.log``, secrets hidden."""
    from tiled.server.logging_config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"]["redact_api_key"] = {
        "()": "hxn_liveptycho.store.server_process.RedactApiKey",
        "secrets": list(secrets),
    }
    for handler, filename in (("access", "access.log"), ("default", "error.log")):
        config["handlers"][handler]["class"] = "logging.FileHandler"
        del config["handlers"][handler]["stream"]
        config["handlers"][handler]["filename"] = str(directory / filename)
        config["handlers"][handler]["filters"].insert(0, "redact_api_key")
    for formatter in config["formatters"].values():
        formatter["use_colors"] = False  # files, not a terminal
    return config


def _owner_only(directory: Path) -> None:
    """The directory and its log files readable by their owner only (they name the server's
    clients and paths; before the key was redacted, they held it)."""
    os.umask(0o077)
    with contextlib.suppress(OSError):
        directory.chmod(0o700)
    for name in LOG_FILES:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            (directory / name).chmod(0o600)


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
    redact = RedactApiKey(secrets=(api_key,))
    for handler in logging.getLogger().handlers:  # server.log, through stderr
        handler.addFilter(redact)
    sys.stderr = RedactingStream(sys.stderr, redact)  # warnings, thread tracebacks, prints

    import uvicorn

    directory = args.directory.resolve()
    _owner_only(directory)
    app, storage = build_app(directory, api_key)
    warm_array_storage(directory)
    sock = bind(args.port)
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            loop="asyncio",
            log_config=uvicorn_log_config(directory, (api_key,)),
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
