"""The Tiled server results go to: a remote one by URL, or an embedded one started here.

The embedded server (:class:`EmbeddedTiledServer`) is tiled's
``SimpleTiledServer`` setup (SQLite catalog, files under ``<data_dir>/tiled``)
plus what a facility's Tiled configures for Bluesky runs: the
``application/json-seq`` exporter of bluesky-tiled-plugins, so
``client[uid].documents()`` works on runs that TiledWriter recorded into it.
It is started lazily on the first run so a beamline profile loads instantly.
URIs are never logged with their API key.
"""

from __future__ import annotations

import copy
import logging
import secrets
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote_plus, urlencode, urlsplit, urlunsplit

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.settings import Settings
from hxn_liveptycho.store.tiled import TiledSink

logger = logging.getLogger(__name__)


def redact(uri: str) -> str:
    """The URI with any ``api_key`` query value hidden, fit for logs and status pages."""
    parts = urlsplit(uri)
    query = [(k, "***" if k == "api_key" else v) for k, v in parse_qsl(parts.query)]
    return urlunsplit(parts._replace(query=urlencode(query, safe="*")))


#: Seconds the embedded server may take to answer its health probe.
STARTUP_TIMEOUT_S = 20.0


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


class EmbeddedTiledServer:
    """A local single-user Tiled server in a thread, the way ``SimpleTiledServer`` runs one.

    ``SimpleTiledServer`` cannot be given exporters, so its few lines of setup
    are repeated here with the Bluesky serialization registry. Like it: a
    random port on localhost, logs in ``directory``, a readiness probe with a
    deadline, and teardown if the probe fails.
    """

    def __init__(self, directory: Path, *, api_key: str | None = None, port: int = 0) -> None:
        import httpx
        import uvicorn
        from tiled.catalog import from_uri as catalog_from_uri
        from tiled.config import Authentication, StreamingCacheConfig
        from tiled.server.app import build_app
        from tiled.server.logging_config import LOGGING_CONFIG
        from tiled.server.simple import ThreadedServer
        from tiled.storage import get_storage
        from tiled.utils import ensure_uri

        self.directory = Path(directory).resolve()
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        storage_uri = ensure_uri(f"duckdb:///{self.directory / 'storage.duckdb'}")
        self.api_key = api_key or secrets.token_hex(8)
        log_config = copy.deepcopy(LOGGING_CONFIG)
        for handler, filename in (("access", "access.log"), ("default", "error.log")):
            log_config["handlers"][handler]["class"] = "logging.FileHandler"
            del log_config["handlers"][handler]["stream"]
            log_config["handlers"][handler]["filename"] = str(self.directory / filename)
        catalog = catalog_from_uri(
            self.directory / "catalog.db",
            writable_storage=[self.directory / "data", storage_uri],
            init_if_not_exists=True,
            cache_config=StreamingCacheConfig(uri="memory").model_dump(),
        )
        app = build_app(
            catalog,
            authentication=Authentication(single_user_api_key=self.api_key),
            serialization_registry=bluesky_serialization_registry(),
        )
        self._server = ThreadedServer(
            uvicorn.Config(app, port=port, loop="asyncio", log_config=log_config)
        )
        self._running = self._server.run_in_thread()
        base_url = self._running.__enter__()
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            with httpx.Client(trust_env=False) as client:
                while True:
                    if not self._server.thread.is_alive():
                        raise RuntimeError(f"Tiled server exited at start; see {self.directory}")
                    try:
                        if client.get(f"{base_url}/healthz", timeout=1.0).status_code == 200:
                            break
                    except httpx.RequestError:
                        pass
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"Tiled did not answer within {STARTUP_TIMEOUT_S} s")
                    time.sleep(0.1)
        except BaseException:
            self._running.__exit__(None, None, None)
            raise
        self._storage = get_storage(storage_uri)
        self.uri = f"{base_url}/api/v1?api_key={quote_plus(self.api_key)}"

    def close(self) -> None:
        self._storage.dispose()
        self._running.__exit__(None, None, None)

    def __enter__(self) -> EmbeddedTiledServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
            directory = self.settings.data_dir / "tiled"
            directory.mkdir(parents=True, exist_ok=True)
            # tiled 0.2's single-user API key is process-wide: a second embedded server in
            # one process silently revokes the first one's key. Reusing a configured key
            # keeps both working (and gives a stable key across restarts).
            api_key = self.settings.tiled_api_key
            if api_key and not api_key.get_secret_value().isalnum():
                raise ConfigurationError(
                    "the embedded Tiled server takes only letters and digits in its API key"
                )
            self._server = EmbeddedTiledServer(
                directory, api_key=api_key.get_secret_value() if api_key else None
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
