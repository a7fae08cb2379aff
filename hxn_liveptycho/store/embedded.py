"""The embedded Tiled server: a local single-user Tiled in a supervised child process.

The child runs :mod:`hxn_liveptycho.store.server_process`; this side starts
it (from one long-lived thread, so the kernel's parent-death signal is tied to
this process rather than to a short-lived thread), hands it its API key
through a pipe, waits for its port and its health probe, and stops it. No
child outlives its owner: ``close()`` stops it, servers not closed are closed
at interpreter exit, and if the owner dies without closing it the child
notices (its stdin pipe closes; on Linux the kernel also signals it) and
exits. :class:`~hxn_liveptycho.store.server.TiledConnection` supervises it.
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
from urllib.parse import quote_plus

from hxn_liveptycho.errors import ConfigurationError

__all__ = ["STARTUP_TIMEOUT_S", "STOP_TIMEOUT_S", "EmbeddedTiledServer", "check_api_key"]

logger = logging.getLogger(__name__)


#: Seconds the embedded server may take from its start to answering its health probe.
STARTUP_TIMEOUT_S = 60.0
#: Seconds a stopping server is given before it is killed.
STOP_TIMEOUT_S = 10.0


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


def check_api_key(api_key: str) -> str:
    """``api_key`` if tiled's single-user mode takes it (letters and digits): a bad key is a
    configuration error to report at once, not an outage to retry."""
    if not api_key.isalnum():
        raise ConfigurationError(
            "the embedded Tiled server takes only letters and digits in its API key"
        )
    return api_key


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
        if api_key is not None:
            check_api_key(api_key)
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
