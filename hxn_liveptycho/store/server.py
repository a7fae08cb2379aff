"""The Tiled server results go to: a remote one by URL, or an embedded one started here.

The embedded server (:class:`EmbeddedTiledServer`) runs in a child process of
its own (:mod:`hxn_liveptycho.store.server_process`): in the process of the
RunEngine or the solver it competed with them for the GIL and, on a small
machine, came up only after the scan had ended. :class:`TiledConnection`
starts it in the background as soon as the engine is created, so it is ready
before the first scan, and supervises it: a child that has died is seen by
:meth:`TiledConnection.reachable` and started again on next use, on the same
port and with the same key where it can, so clients made before keep working.
No child outlives its owner: ``close()`` stops it, and if the owner dies
without closing it the child notices (its stdin pipe closes; on Linux the
kernel also signals it) and exits. URIs are never logged with their API key,
and the key is never on a command line.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import queue
import secrets
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit, urlunsplit

from hxn_liveptycho.config.settings import Settings, redact_uri
from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.store.recovery import Recovery
from hxn_liveptycho.store.server_process import bluesky_serialization_registry
from hxn_liveptycho.store.tiled import TiledSink

__all__ = [
    "EmbeddedTiledServer",
    "TiledConnection",
    "bluesky_serialization_registry",
    "redact",
    "split_api_key",
]

logger = logging.getLogger(__name__)


def redact(uri: str) -> str:
    """The URI with secret query values and a password hidden (the settings' own rule)."""
    return redact_uri(uri)


def split_api_key(uri: str) -> tuple[str, str | None]:
    """``uri`` without its ``api_key`` query parameter, and that key (None if it has none)."""
    parts = urlsplit(uri)
    query = parse_qsl(parts.query, keep_blank_values=True)
    keys = [v for k, v in query if k.lower() == "api_key"]
    if not keys:
        return uri, None
    rest = [(k, v) for k, v in query if k.lower() != "api_key"]
    return urlunsplit(parts._replace(query=urlencode(rest))), keys[-1] or None


#: Seconds the embedded server may take from its start to answering its health probe.
STARTUP_TIMEOUT_S = 60.0
#: Seconds a stopping server is given before it is killed.
STOP_TIMEOUT_S = 10.0
#: After a failed start, seconds before a health probe may try again on its own.
RESTART_BACKOFF_S = 10.0


class _Launcher:
    """Starts child processes from one thread that lives as long as this process.

    On Linux a child asks the kernel for SIGTERM when its parent dies
    (``PR_SET_PDEATHSIG``), but the kernel's "parent" is the *thread* that
    forked it: a child started from a short-lived thread (a run's writer, a
    background connect) would be signalled as soon as that thread ended.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[tuple[Future[Any], list[str], dict[str, Any]]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None

    def popen(self, argv: list[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="hxn-child-launcher", daemon=True
                )
                self._thread.start()
        future: Future[subprocess.Popen[bytes]] = Future()
        self._queue.put((future, argv, kwargs))
        return future.result()

    def _run(self) -> None:
        while True:
            future, argv, kwargs = self._queue.get()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(subprocess.Popen(argv, **kwargs))
            except BaseException as exc:
                future.set_exception(exc)


_launcher = _Launcher()
#: Servers started by this process and not yet closed; closed at interpreter exit. Held
#: strongly so a server lives while any client of it may (not merely while its owner does).
_running: set[EmbeddedTiledServer] = set()
_running_lock = threading.Lock()


@atexit.register
def _close_running() -> None:
    with _running_lock:
        servers = list(_running)
    for server in servers:
        server.close(timeout=5.0)


_KEY_VARIABLES = frozenset(
    {"LIVEPTYCHO_TILED_API_KEY", "TILED_API_KEY", "TILED_SINGLE_USER_API_KEY"}
)


def _package_root() -> str:
    import hxn_liveptycho

    return str(Path(hxn_liveptycho.__file__).resolve().parents[1])


class EmbeddedTiledServer:
    """A local single-user Tiled server in a supervised child process.

    Like tiled's ``SimpleTiledServer``: SQLite catalog and files under
    ``directory``, a random port on localhost (``port`` is tried first), logs
    in ``directory`` (``server.log``, ``access.log``, ``error.log``), a
    readiness probe with a deadline, and teardown if it fails. The
    constructor returns once ``/healthz`` answers (``start=False``: once the
    object exists; :meth:`start` then starts it, and :meth:`close` from another
    thread aborts a start in progress). ``api_key`` (letters and digits, as
    tiled requires) defaults to a random one; it reaches the child through a
    pipe, never its command line or environment.
    """

    def __init__(
        self,
        directory: Path,
        *,
        api_key: str | None = None,
        port: int = 0,
        startup_timeout: float = STARTUP_TIMEOUT_S,
        start: bool = True,
    ) -> None:
        if api_key is not None and not api_key.isalnum():
            raise ConfigurationError(
                "the embedded Tiled server takes only letters and digits in its API key"
            )
        self.directory = Path(directory).resolve()
        self.api_key = api_key or secrets.token_hex(16)
        self.startup_timeout = startup_timeout
        self.port = port
        self.uri = ""
        self.restarts = 0
        self.started_in_s: float | None = None
        self._owner_pid = os.getpid()
        self._process: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._closed = False
        if start:
            self.start()

    @property
    def pid(self) -> int | None:
        process = self._process
        return process.pid if process is not None else None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "server.log"

    def alive(self) -> bool:
        """Whether the child process is running (not whether it answers; see :meth:`healthy`)."""
        process = self._process
        return process is not None and process.poll() is None

    def healthy(self, timeout: float = 2.0) -> bool:
        """Whether the child runs and answers ``/healthz`` within ``timeout``."""
        if not self.alive():
            return False
        import httpx

        try:
            reply = httpx.get(f"{self.base_url}/healthz", timeout=timeout, trust_env=False)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    def start(self) -> None:
        """Start the child unless it runs; a start after an exit logs one line saying so."""
        with self._start_lock:
            with self._lock:
                if self._closed:
                    raise RuntimeError("the embedded Tiled server was closed")
                old = self._process
            if old is not None and old.poll() is None:
                return
            code = old.poll() if old is not None else None
            if old is not None:
                _stop(old, STOP_TIMEOUT_S)
                self.restarts += 1
            self._start()
        if old is not None:
            logger.warning(
                "embedded Tiled server (pid %s) had exited with code %s; restarted it as "
                "pid %s at %s in %.1f s",
                old.pid,
                code,
                self.pid,
                self.base_url,
                self.started_in_s or 0.0,
            )

    def restart(self) -> None:
        """Start the child again if it has exited (same key, same port if free)."""
        self.start()

    def _start(self) -> None:
        began = time.monotonic()
        # Owner only: the logs name the server's clients and paths (never its key).
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            self.directory.chmod(0o700)
        # Keys reach the child through its stdin only; a key in the parent's environment
        # has no business in the child's.
        env = {k: v for k, v in os.environ.items() if k not in _KEY_VARIABLES}
        # The child must run this same code, whatever sys.path the parent was started with.
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_package_root(), env.get("PYTHONPATH", "")) if p
        )
        argv = [
            sys.executable,
            "-m",
            "hxn_liveptycho.store.server_process",
            "--directory",
            str(self.directory),
            "--port",
            str(self.port),
            "--parent-pid",
            str(os.getpid()),
        ]
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with contextlib.suppress(OSError):
            os.fchmod(fd, 0o600)
        with os.fdopen(fd, "ab") as log:
            process = _launcher.popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                env=env,
                close_fds=True,
                # Its own session: a Ctrl-C at the terminal (to stop a scan in IPython) is
                # meant for the RunEngine, not for the store the results go to.
                start_new_session=True,
            )
        with self._lock:
            closed = self._closed
            if not closed:
                self._process = process
        if closed:
            _stop(process, STOP_TIMEOUT_S)
            raise RuntimeError("the embedded Tiled server was closed while starting")
        with _running_lock:
            _running.add(self)
        deadline = began + self.startup_timeout
        try:
            assert process.stdin is not None
            try:
                process.stdin.write(self.api_key.encode("ascii") + b"\n")
                process.stdin.flush()
            except BrokenPipeError:
                pass  # it died at once: _read_port reports how
            port = self._read_port(process, deadline)
            self._wait_healthy(process, f"http://127.0.0.1:{port}", deadline)
        except BaseException:
            _stop(process, STOP_TIMEOUT_S)
            raise
        self.port = port
        self.uri = f"{self.base_url}/api/v1?api_key={quote_plus(self.api_key)}"
        self.started_in_s = time.monotonic() - began

    def _check_starting(self, process: subprocess.Popen[bytes], deadline: float) -> None:
        if self._closed:
            raise RuntimeError("the embedded Tiled server was closed while starting")
        code = process.poll()
        if code is not None:
            raise RuntimeError(
                f"the embedded Tiled server exited at start (code {code}); see {self.log_path}"
            )
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"the embedded Tiled server did not answer within {self.startup_timeout} s; "
                f"see {self.log_path}"
            )

    def _read_port(self, process: subprocess.Popen[bytes], deadline: float) -> int:
        assert process.stdout is not None
        fd = process.stdout.fileno()
        line = b""
        while not line.endswith(b"\n"):
            self._check_starting(process, deadline)
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                data = os.read(fd, 256)
                if not data:
                    process.wait(timeout=STOP_TIMEOUT_S)
                    self._check_starting(process, deadline)
                line += data
        return int(json.loads(line)["port"])

    def _wait_healthy(
        self, process: subprocess.Popen[bytes], base_url: str, deadline: float
    ) -> None:
        import httpx

        with httpx.Client(trust_env=False) as client:
            while True:
                self._check_starting(process, deadline)
                try:
                    if client.get(f"{base_url}/healthz", timeout=1.0).status_code == 200:
                        return
                except httpx.RequestError:
                    pass
                time.sleep(0.05)

    def close(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop the child (or abort its start) and wait for it; safe to call more than once."""
        with self._lock:
            self._closed = True
            process, self._process = self._process, None
        with _running_lock:
            _running.discard(self)
        if process is not None and os.getpid() == self._owner_pid:
            _stop(process, timeout)

    def __enter__(self) -> EmbeddedTiledServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM (uvicorn then finishes open requests), SIGKILL if that is not enough; reaped."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning(
                "embedded Tiled server (pid %d) ignored SIGTERM: killing it", process.pid
            )
            process.kill()
            process.wait()
    for stream in (process.stdin, process.stdout):
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()


def _import_client_modules() -> None:
    """Import what Tiled's client loads at its first array write (dask.array among them):
    done in the first run, it delayed the first live image by seconds."""
    try:
        import dask.array  # noqa: F401
        import tiled.client
        import tiled.client.array  # noqa: F401
    except Exception as exc:  # the first write imports them again and reports what fails
        logger.debug("could not import Tiled's client modules ahead: %s", exc)


class TiledConnection:
    """Connects to Tiled (starting and supervising the embedded server); one sink per run."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()  # the client
        self._cond = threading.Condition()  # the embedded server and its start
        self._server: EmbeddedTiledServer | None = None
        self._starting = False
        self._start_error: str | None = None
        self._retry_at = 0.0
        self._closed = False
        self._client: Any = None
        self._client_uri: str | None = None
        #: Results Tiled did not take (backups, or memory when the disk refused too).
        self.recovery = Recovery(settings.data_dir / "backup", self.client, self.reachable)

    @property
    def embedded(self) -> bool:
        return self.settings.tiled_uri is None

    def connect_in_background(self) -> None:
        """Start the embedded server (or reach the remote one) now, off the caller's thread.

        Called when the engine is created, so the first run finds Tiled ready.
        """
        threading.Thread(
            target=_import_client_modules, name="liveptycho-tiled-imports", daemon=True
        ).start()
        self.recovery.start()  # backups of earlier runs go up as soon as Tiled answers
        if self.embedded:
            self._embedded_key()  # a bad key is the caller's error, now
            self._start_server_async(force=True)
            return

        def connect() -> None:
            if not self.reachable():
                logger.warning("Tiled at %s is not reachable yet", redact(self.uri or ""))
                return
            try:
                self.client()
            except Exception as exc:  # the first sink retries and reports it
                logger.warning("could not reach Tiled yet: %s", exc)

        threading.Thread(target=connect, name="liveptycho-tiled-connect", daemon=True).start()

    # ---- the embedded server's supervision ---------------------------------------------
    def _embedded_key(self) -> str | None:
        api_key = self.settings.tiled_api_key
        if api_key is None:
            return None
        key = api_key.get_secret_value()
        if not key.isalnum():
            raise ConfigurationError(
                "the embedded Tiled server takes only letters and digits in its API key"
            )
        return key

    def _start_server_async(self, *, force: bool) -> None:
        """Start (or restart) the child on a helper thread unless it runs or is starting.

        ``force`` ignores the back-off after a failed start (a caller that needs
        the server now); a health probe that finds the child dead does not.
        """
        with self._cond:
            if self._closed or self._starting:
                return
            if self._server is not None and self._server.alive():
                return
            if not force and time.monotonic() < self._retry_at:
                return
            self._starting = True
        threading.Thread(
            target=self._start_server, name="liveptycho-tiled-start", daemon=True
        ).start()

    def _start_server(self) -> None:
        error: str | None = None
        directory = self.settings.data_dir / "tiled"
        server: EmbeddedTiledServer | None = None
        try:
            with self._cond:
                if self._server is None and not self._closed:
                    self._server = EmbeddedTiledServer(
                        directory, api_key=self._embedded_key(), start=False
                    )
                server = self._server
            if server is not None:
                first = server.started_in_s is None
                server.start()
                if first:
                    logger.info(
                        "embedded Tiled server at %s (pid %s, ready in %.1f s, data in %s)",
                        redact(server.uri),
                        server.pid,
                        server.started_in_s or 0.0,
                        directory,
                    )
        except Exception as exc:
            error = str(exc)
            if not self._closed:
                logger.error("could not start the embedded Tiled server: %s", exc)
        with self._cond:
            self._starting = False
            self._start_error = error
            self._retry_at = time.monotonic() + RESTART_BACKOFF_S if error else 0.0
            self._cond.notify_all()

    def _ready_server(self) -> EmbeddedTiledServer:
        """The embedded server, running: started or restarted first if it is not."""
        self._start_server_async(force=True)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S + STOP_TIMEOUT_S
        with self._cond:
            while self._starting:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError("the embedded Tiled server is still starting")
                self._cond.wait(remaining)
            server = self._server
            if self._closed:
                raise RuntimeError("this Tiled connection was closed")
            if server is None or not server.alive():
                raise RuntimeError(
                    f"the embedded Tiled server is not running: {self._start_error or 'it exited'}"
                )
            return server

    # ---- clients ---------------------------------------------------------------------
    def client(self) -> Any:
        """A Tiled client of the root; waits for the embedded server, restarting a dead one."""
        from tiled.client import from_uri

        if self.embedded:
            self._embedded_key()  # a bad key is a configuration error, not an outage
            server = self._ready_server()
            with self._lock:
                if self._client is None or self._client_uri != server.uri:
                    # The key in a header, not the URL: URLs end up in logs (httpx's, the server's).
                    self._client = from_uri(f"{server.base_url}/api/v1", api_key=server.api_key)
                    self._client_uri = server.uri
                return self._client
        with self._lock:
            if self._client is None:
                # An api_key in the URI goes in a header too: in the URL, httpx's INFO log
                # line for every request (and the server's access log) would show it.
                uri, key_in_uri = split_api_key(self.settings.tiled_uri or "")
                api_key = self.settings.tiled_api_key
                self._client = from_uri(
                    uri, api_key=api_key.get_secret_value() if api_key else key_in_uri
                )
            return self._client

    def reachable(self, timeout: float = 2.0) -> bool:
        """A quick ``/healthz`` probe, so an outage is noticed in seconds, not after retries.

        The embedded server is waited for while it starts (the first run's
        writer should not give up on a server on its way); a child found dead
        makes this False and is restarted in the background.
        """
        if not self.embedded:
            import httpx

            parts = urlsplit(self.settings.tiled_uri or "")
            try:
                reply = httpx.get(f"{parts.scheme}://{parts.netloc}/healthz", timeout=timeout)
            except httpx.HTTPError:
                return False
            return reply.status_code < 500
        with self._cond:
            server, starting, closed = self._server, self._starting, self._closed
        if closed:
            return False
        if server is None or starting:
            try:
                server = self._ready_server()
            except Exception:
                return False
        if not server.alive():
            self._start_server_async(force=False)
            return False
        return server.healthy(timeout)

    @property
    def uri(self) -> str | None:
        """The server's URI, with its API key (for clients of this process, never for logs)."""
        if not self.embedded:
            return self.settings.tiled_uri
        server = self._server
        return server.uri or None if server is not None else None

    def describe(self) -> dict[str, Any]:
        """For status pages: never the key, never blocks."""
        uri = self.uri
        info: dict[str, Any] = {
            "uri": redact(uri) if uri else None,
            "embedded": self.embedded,
            "catalog_path": self.settings.catalog_path,
            "uploads_pending": self.recovery.pending(),
        }
        if self.embedded:
            with self._cond:
                server, starting, error = self._server, self._starting, self._start_error
            if starting:
                state = "starting"
            elif server is None:
                state = "stopped" if self._closed else "not started"
            elif server.alive():
                state = "running"
            else:
                state = "failed to start" if error else "exited"
            info["server"] = {
                "state": state,
                "pid": server.pid if server is not None else None,
                "restarts": server.restarts if server is not None else 0,
                "directory": str(self.settings.data_dir / "tiled"),
                "error": error,
            }
        return info

    def sink_factory(self) -> TiledSink:
        return TiledSink(
            self.client,
            catalog_path=self.settings.catalog_path,
            backup_dir=self.settings.data_dir / "backup",
            reachable=self.reachable,
            retry_s=self.settings.tiled_retry_s,
            recovery=self.recovery,
        )

    def retry_uploads(self) -> dict[str, Any]:
        """Upload every result waiting for Tiled now (backups and results held in memory)."""
        return self.recovery.retry()

    def close(self) -> None:
        """Stop the embedded server (aborting a start in progress); the client is dropped."""
        self.recovery.close()
        with self._cond:
            self._closed = True
            server, self._server = self._server, None
        if server is not None:
            server.close()
        with self._cond:
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while self._starting and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
        with self._lock:
            self._client = None
            self._client_uri = None
