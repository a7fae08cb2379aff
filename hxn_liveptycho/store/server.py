"""The Tiled server results go to: a remote one by URL, or an embedded one started here.

The embedded server (:class:`~hxn_liveptycho.store.embedded.EmbeddedTiledServer`,
found here too) runs in a child process of its own
(:mod:`hxn_liveptycho.store.server_process`): in the process of the
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

import logging
import threading
import time
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from hxn_liveptycho.config.settings import Settings, redact_uri
from hxn_liveptycho.store.embedded import (
    STARTUP_TIMEOUT_S,
    STOP_TIMEOUT_S,
    EmbeddedTiledServer,
    check_api_key,
)
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


#: After a failed start, seconds before a health probe may try again on its own.
RESTART_BACKOFF_S = 10.0


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
        return check_api_key(api_key.get_secret_value())

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
