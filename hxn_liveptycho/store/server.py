"""The Tiled server results go to: a remote one by URL, or an embedded one started here.

The embedded server is tiled's own ``SimpleTiledServer`` (SQLite catalog,
files under ``<data_dir>/tiled``), started lazily on the first run so a
beamline profile loads instantly. URIs are never logged with their API key.
"""

from __future__ import annotations

import logging
import threading
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.settings import Settings
from hxn_liveptycho.store.tiled import TiledSink

logger = logging.getLogger(__name__)


def redact(uri: str) -> str:
    """The URI with any ``api_key`` query value hidden, fit for logs and status pages."""
    parts = urlsplit(uri)
    query = [(k, "***" if k == "api_key" else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


class TiledConnection:
    """Lazily connects (and if needed starts) Tiled; hands out one sink per run."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._server: Any = None
        self._client: Any = None

    @property
    def embedded(self) -> bool:
        return self.settings.tiled_uri is None

    def connect_in_background(self) -> None:
        """Start connecting now, off the caller's thread, so the first run finds Tiled ready."""

        def connect() -> None:
            if not self.reachable():
                logger.warning("Tiled at %s is not reachable yet", redact(self.uri or ""))
                return
            try:
                self.client()
            except Exception as exc:  # the first sink retries and reports it
                logger.warning("could not reach Tiled yet: %s", exc)

        threading.Thread(target=connect, name="liveptycho-tiled-connect", daemon=True).start()

    def client(self) -> Any:
        """A Tiled client of the root, connecting (or starting the server) on first use."""
        with self._lock:
            if self._client is None:
                self._client = self._connect()
            return self._client

    def _connect(self) -> Any:
        from tiled.client import from_uri

        if self.settings.tiled_uri is None:
            from tiled.server import SimpleTiledServer

            directory = self.settings.data_dir / "tiled"
            directory.mkdir(parents=True, exist_ok=True)
            # tiled 0.2's single-user API key is process-wide: a second SimpleTiledServer in
            # one process silently revokes the first one's key. Reusing a configured key
            # keeps both working (and gives a stable key across restarts).
            api_key = self.settings.tiled_api_key
            if api_key and not api_key.get_secret_value().isalnum():
                raise ConfigurationError(
                    "the embedded Tiled server takes only letters and digits in its API key"
                )
            self._server = SimpleTiledServer(
                directory=directory, api_key=api_key.get_secret_value() if api_key else None
            )
            logger.info(
                "embedded Tiled server at %s (data in %s)", redact(self._server.uri), directory
            )
            return from_uri(self._server.uri)
        api_key = self.settings.tiled_api_key
        return from_uri(
            self.settings.tiled_uri, api_key=api_key.get_secret_value() if api_key else None
        )

    def reachable(self, timeout: float = 2.0) -> bool:
        """A quick ``/healthz`` probe, so an outage is noticed in seconds, not after retries."""
        if self.embedded:
            return True  # started on demand, in this process
        import httpx

        parts = urlsplit(self.settings.tiled_uri or "")
        try:
            reply = httpx.get(f"{parts.scheme}://{parts.netloc}/healthz", timeout=timeout)
        except httpx.HTTPError:
            return False
        return reply.status_code < 500

    @property
    def uri(self) -> str | None:
        """The server's URI, with its API key (for clients of this process, never for logs)."""
        if self._server is not None:
            return self._server.uri
        return self.settings.tiled_uri

    def describe(self) -> dict[str, Any]:
        uri = self.uri
        return {
            "uri": redact(uri) if uri else None,
            "embedded": self.embedded,
            "catalog_path": self.settings.catalog_path,
        }

    def sink_factory(self) -> TiledSink:
        return TiledSink(
            self.client,
            catalog_path=self.settings.catalog_path,
            backup_dir=self.settings.data_dir / "backup",
            reachable=self.reachable,
        )

    def close(self) -> None:
        with self._lock:
            self._client = None
            if self._server is not None:
                self._server.close()
                self._server = None
