"""``liveptycho serve``: the engine as a standalone service fed documents over the network.

The service is the same :class:`~hxn_liveptycho.callback.LivePtycho` a
beamline profile subscribes to the RunEngine, subscribed instead to a
:class:`~hxn_liveptycho.control.transport.DocumentSource`; so runs get the
same Engine and RunSessions. Beside it runs the HTTP status and control API
and the live page (uvicorn in its own thread); the main thread waits for
SIGTERM or SIGINT and then shuts down in order: stop taking documents, stop
running sessions (each writes what it has, status 'aborted', reason
'serve shutting down'), close the engine and Tiled, stop the API.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hxn_liveptycho import __version__
from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.control.transport import DocumentSource, ZmqDocumentSource
from hxn_liveptycho.counters import Counters
from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.session import RunSession
from hxn_liveptycho.settings import Settings

logger = logging.getLogger(__name__)

#: Why sessions still running at shutdown end 'aborted' (recorded in their containers).
SHUTDOWN_REASON = "serve shutting down"
#: How many run uids serve remembers to tell "started before serve" from "skipped".
_REMEMBERED_RUNS = 1024


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose the API beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise ConfigurationError(
            f"refusing to bind the API to {host!r} without a token: set LIVEPTYCHO_API_TOKEN, "
            "or bind 127.0.0.1"
        )


class ServeService:
    """One serve process: LivePtycho fed by a document source, plus what the API asks of it."""

    def __init__(
        self, settings: Settings, source: DocumentSource, *, live: LivePtycho | None = None
    ) -> None:
        self.settings = settings
        self.source = source
        self.live = live or LivePtycho(settings)
        self.started_at = time.time()
        self.closing = threading.Event()
        self.counters = Counters(["documents", "documents_of_unknown_runs"])
        self._lock = threading.Lock()
        self._runs_seen: OrderedDict[str, None] = OrderedDict()
        self._descriptor_runs: OrderedDict[str, str] = OrderedDict()
        self._reported_unknown: set[str] = set()

    def start(self) -> None:
        self.source.start(self.deliver)

    # ---- documents (the source's thread) -----------------------------------------------
    def deliver(self, name: str, doc: dict[str, Any]) -> None:
        """Hand a document to LivePtycho; note documents of runs whose start serve never saw."""
        self.counters.add("documents")
        try:
            self._track(name, doc)
        except Exception:
            logger.exception("could not track the %r document", name)
        self.live(name, doc)

    def _track(self, name: str, doc: Mapping[str, Any]) -> None:
        if name == "start":
            _remember(self._runs_seen, str(doc.get("uid")), None)
            return
        run_uid = doc.get("run_start")
        if name == "descriptor" and run_uid:
            _remember(self._descriptor_runs, str(doc.get("uid")), str(run_uid))
        if run_uid is None and name in ("event", "event_page"):
            run_uid = self._descriptor_runs.get(str(doc.get("descriptor")), "")
        if run_uid is not None and run_uid in self._runs_seen:
            return
        if name in ("resource", "datum", "datum_page", "stream_resource", "stream_datum"):
            return  # these need not name their run
        self.counters.add("documents_of_unknown_runs")
        key = run_uid or str(doc.get("descriptor"))
        if key not in self._reported_unknown:
            self._reported_unknown.add(key)
            logger.warning(
                "%s document of run %s, whose start document this serve never received "
                "(it started before serve did): that run is not reconstructed",
                name,
                str(key)[:8] or "?",
            )

    # ---- queries and controls (the API's threads) --------------------------------------
    def sessions(self) -> list[RunSession]:
        return self.live.engine.sessions()

    def find_session(self, uid: str) -> RunSession | None:
        """The session of run ``uid`` (a unique prefix of 8 or more characters also does)."""
        exact = self.live.engine.session(uid)
        if exact is not None or len(uid) < 8:
            return exact
        matches = [s for s in self.sessions() if s.uid.startswith(uid)]
        return matches[0] if len(matches) == 1 else None

    def current_session(self) -> RunSession | None:
        """The newest run that is still being reconstructed, else the newest one."""
        sessions = self.sessions()
        running = [s for s in sessions if not s.finished]
        return (running or sessions or [None])[-1]

    def status(self) -> dict[str, Any]:
        info = self.live.status()
        info["serve"] = {
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "closing": self.closing.is_set(),
            **self.counters.snapshot(),
        }
        info["documents"] = self.source.describe()
        return info

    def config(self) -> dict[str, Any]:
        return {
            "enabled": self.live.enabled,
            "overrides": self.live.overrides,
            "settings": self.settings.public_view(),
        }

    def configure(self, overrides: Mapping[str, Any], *, merge: bool) -> dict[str, Any]:
        """Set the overrides of the next runs: deep-merge into them, or replace them.

        Invalid overrides raise ConfigurationError naming the fields; the old ones stay.
        """
        return self.live.configure(overrides, replace=not merge)

    def select_model(self, name: str) -> dict[str, Any]:
        """Use NN model ``name`` for the next runs; the name is checked against the registry."""
        from hxn_liveptycho.nn.registry import ModelRegistry

        model = ModelRegistry(self.settings.model_dir).get(name)
        overrides = self.configure({"nn": {"model": name}}, merge=True)
        logger.info("NN model for the next runs: %s (%s)", name, model.source)
        # The reply names the model, not where the server keeps it.
        return {"model": name, "source": model.source, **overrides}

    def retry_uploads(self) -> dict[str, Any]:
        """Upload now every result waiting for Tiled (see ``LivePtycho.retry_uploads``)."""
        return self.live.retry_uploads()

    def uploads(self) -> list[dict[str, Any]]:
        """Results waiting for Tiled: in the backup folder, or in memory."""
        return [] if self.live.tiled is None else self.live.tiled.recovery.pending()

    def stop_run(self, uid: str | None = None) -> str | None:
        """Stop a running reconstruction (the newest when ``uid`` is None); its uid, or None."""
        session = self.current_session() if uid is None else self.find_session(uid)
        if session is None or session.finished:
            return None
        session.cancel("stopped through the serve API")
        return session.uid

    def close(self, timeout: float | None = None) -> None:
        """Stop taking documents, then let every running session write what it has."""
        if self.closing.is_set():
            return
        self.closing.set()
        timeout = self.settings.tiled_write_timeout_s if timeout is None else timeout
        logger.info("serve shutting down")
        self.source.stop()
        running = [s for s in self.sessions() if not s.finished]
        for session in running:
            session.cancel(SHUTDOWN_REASON)
        deadline = time.monotonic() + timeout
        for session in running:
            if not session.join(max(0.0, deadline - time.monotonic())):
                logger.error("run %s did not finish its final write in time", session.uid[:8])
        self.live.close(max(1.0, deadline - time.monotonic()))
        logger.info("serve stopped; %d running reconstruction(s) were written", len(running))


def _remember(store: OrderedDict[str, Any], key: str, value: Any) -> None:
    store[key] = value
    while len(store) > _REMEMBERED_RUNS:
        store.popitem(last=False)


def add_log_file(path: Path) -> logging.Handler:
    """Also append the log to ``path`` (created with its folder), in the stderr format."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


#: Environment variables that hold secrets; read once into the settings, then removed so
#: that no child serve spawns (solver, NN worker, receivers) carries them in its environment.
SECRET_ENVIRONMENT = (
    "LIVEPTYCHO_API_TOKEN",
    "LIVEPTYCHO_TILED_API_KEY",
    "LIVEPTYCHO_CURVE_SECRET_KEY",
    "TILED_API_KEY",
    "TILED_SINGLE_USER_API_KEY",
)


def _drop_secrets_from_environment() -> None:
    for name in SECRET_ENVIRONMENT:
        os.environ.pop(name, None)


def run_serve(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT; 0 after a clean shutdown."""
    import uvicorn

    from hxn_liveptycho.control.api import create_app

    token = settings.api_token.get_secret_value() if settings.api_token else None
    check_bind(settings.serve_host, token)
    _drop_secrets_from_environment()
    if settings.log_file is not None:
        add_log_file(settings.log_file)
    source = ZmqDocumentSource(
        settings.documents_address,
        prefix=settings.documents_prefix,
        proxy_in_address=settings.documents_proxy_in,
    )
    service = ServeService(settings, source)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service, token=token),
            host=settings.serve_host,
            port=settings.serve_port,
            log_config=None,  # our logging setup, not uvicorn's
            access_log=False,  # the live page may carry the token in query strings
            lifespan="off",
            timeout_graceful_shutdown=3,
        )
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        logger.info("received %s", signal.Signals(signum).name)
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    api = threading.Thread(target=server.run, name="liveptycho-api", daemon=True)
    try:
        service.start()
        api.start()
        while not server.started and api.is_alive() and not stop.wait(0.05):
            pass
        if not api.is_alive():
            logger.error("API not started on %s:%d", settings.serve_host, settings.serve_port)
            return 2
        logger.info(
            "liveptycho serve %s: API and live page on http://%s:%d/, documents from %s%s",
            __version__,
            settings.serve_host,
            settings.serve_port,
            settings.documents_address,
            " (token required)" if token else "",
        )
        while not stop.wait(0.5):
            if not api.is_alive():
                logger.error("the API thread ended; shutting down")
                break
        return 0
    finally:
        service.close()
        server.should_exit = True
        api.join(10)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
