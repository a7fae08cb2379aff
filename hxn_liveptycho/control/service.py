"""The service behind ``liveptycho serve``: LivePtycho fed by a document source, and what
its control API asks of it (status, runs, overrides, model, stop, uploads, shutdown).

Why in ``control/``: the HTTP face (:mod:`~hxn_liveptycho.control.api`) fronts
this object and :mod:`hxn_liveptycho.serve` wires the two into a process;
with the service here both import it and neither imports the other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from hxn_liveptycho import __version__
from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.control.transport import DocumentSource
from hxn_liveptycho.pipeline.session import RunSession
from hxn_liveptycho.util.counters import Counters

if TYPE_CHECKING:
    from hxn_liveptycho.control.workers import WorkerCoordinator

__all__ = ["SHUTDOWN_REASON", "ServeService"]

# The serve process logs under its own name, as before the service had a module of its own.
logger = logging.getLogger("hxn_liveptycho.serve")

#: Why sessions still running at shutdown end 'aborted' (recorded in their containers).
SHUTDOWN_REASON = "serve shutting down"
#: How many run uids serve remembers to tell "started before serve" from "skipped".
_REMEMBERED_RUNS = 1024


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
        #: The newest start document on the stream: (uid, its time); a run begun before
        #: it has ended (a RunEngine runs one at a time).
        self.latest_start: tuple[str, float] | None = None
        #: This worker's part among several sharing the stream (None: serve alone).
        self.workers: WorkerCoordinator | None = None

    def start(self) -> None:
        self.source.start(self.deliver)

    def adopt_runs(self, runs: Mapping[str, list[str]]) -> None:
        """Runs whose ``start`` came before this process did, taken up from their
        checkpoints (run uid: its descriptors' uids): their further documents are theirs,
        not an unknown run's (call it before :meth:`start`)."""
        for uid, descriptors in runs.items():
            _remember(self._runs_seen, uid, None)
            for descriptor in descriptors:
                _remember(self._descriptor_runs, descriptor, uid)

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
            with self._lock:
                self.latest_start = (str(doc.get("uid")), float(doc.get("time") or 0.0))
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
        newest = running or sessions
        return newest[-1] if newest else None

    def status(self) -> dict[str, Any]:
        info = self.live.status()
        info["serve"] = {
            "version": __version__,
            "uptime_s": round(time.time() - self.started_at, 1),
            "closing": self.closing.is_set(),
            **self.counters.snapshot(),
        }
        info["documents"] = self.source.describe()
        if self.workers is not None:
            info["worker"] = self.workers.describe()
        return info

    def workers_view(self) -> dict[str, Any]:
        """Every serve worker sharing this one's Redis and their runs; alone: this one."""
        if self.workers is None:
            runs = [
                {k: run.get(k) for k in ("uid", "scan_id", "status", "iteration")}
                for run in self.live.status()["runs"]
            ]
            return {
                "redis": None,
                "this": None,
                "workers": [
                    {
                        "name": None,
                        "url": None,
                        "alive": not self.closing.is_set(),
                        "heartbeat_age_s": 0.0,
                        "runs": runs,
                    }
                ],
            }
        return {
            "redis": self.workers.redis_url,
            "this": self.workers.name,
            "workers": self.workers.workers(),
        }

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
        """Use NN model ``name`` for the next runs (``LivePtycho.select_model``)."""
        chosen = self.live.select_model(name)
        return {"model": chosen["model"], "source": chosen["source"], **chosen["overrides"]}

    def retry_uploads(self) -> dict[str, Any]:
        """Upload now every result waiting for Tiled (see ``LivePtycho.retry_uploads``)."""
        return self.live.retry_uploads()

    def uploads(self) -> list[dict[str, Any]]:
        """Results waiting for Tiled: in the backup folder, or in memory."""
        return self.live.uploads()

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
