"""LivePtycho: the RunEngine-facing face of the live reconstruction.

    RE.subscribe(LivePtycho())

It is an :class:`event_model.DocumentRouter` rather than bluesky's
``CallbackBase`` because the router converts ``event`` ↔ ``event_page`` for us
(we implement only the paged form) and is the base bluesky's own newer
callbacks (``TiledWriter``) use. Each document is handed to the
:class:`~hxn_liveptycho.pipeline.engine.Engine` with one queue put: the RunEngine's
thread never waits for reconstruction, Tiled or the network, and nothing
raised here ever reaches the RunEngine (a callback exception aborts a scan).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from event_model import DocumentRouter
from event_model.documents import EventDescriptor, EventPage, RunStart, RunStop

from hxn_liveptycho.config.overrides import check_overrides, deep_merge, merge_overrides
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.pipeline.engine import Engine
from hxn_liveptycho.pipeline.session import SinkFactory
from hxn_liveptycho.store.series import TiledSeriesStore
from hxn_liveptycho.store.server import TiledConnection
from hxn_liveptycho.util.counters import Counters

logger = logging.getLogger(__name__)


class LivePtycho(DocumentRouter):
    """Reconstruct every ptychography run live; subscribe one instance to the RunEngine.

    Parameters
    ----------
    settings:
        Endpoints, Tiled location and run selection; ``Settings()`` reads
        ``LIVEPTYCHO_*`` environment variables.
    overrides:
        :class:`~hxn_liveptycho.config.scan.ScanConfig` fields to force on every run
        (``{"roi": {"size": 256}, "recon": {"iterations": 300}}``), deep-merged
        over ``settings.overrides``; change them later with :meth:`configure`.
        Invalid ones raise :class:`~hxn_liveptycho.errors.ConfigurationError`.
    sink_factory:
        Where results go; by default a Tiled container (an embedded server is
        started when ``settings.tiled_uri`` is unset).
    """

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        overrides: Mapping[str, Any] | None = None,
        sink_factory: SinkFactory | None = None,
        **settings_fields: Any,
    ) -> None:
        super().__init__()
        self.settings = settings or Settings(**settings_fields)
        self._overrides: dict[str, Any] = check_overrides(overrides or {})
        self.enabled = True
        self.counters = Counters(["documents", "callback_errors", "ignored_while_disabled"])
        self.tiled: TiledConnection | None = None
        series_store = None
        if sink_factory is None:
            self.tiled = TiledConnection(self.settings)
            self.tiled.connect_in_background()
            sink_factory = self.tiled.sink_factory
            series_store = TiledSeriesStore(
                self.tiled.client,
                catalog_path=self.settings.catalog_path,
                series_key=self.settings.series_key,
                reachable=self.tiled.reachable,
            )
        # The engine lays these over settings.overrides key by key; handing it the deep merge
        # of both makes that the same deep merge serve and queueserver use.
        self.engine = Engine(
            self.settings,
            sink_factory=sink_factory,
            overrides=lambda: deep_merge(self.settings.overrides, self._overrides),
            series_store=series_store,
        )
        self._worst_call_s = 0.0

    def __call__(self, name: str, doc: dict, validate: bool = False) -> None:  # type: ignore[override]
        """Dispatch one document; log and count anything that goes wrong, never raise."""
        began = time.perf_counter()
        try:
            super().__call__(name, doc, validate=validate)
        except Exception:
            self.counters.add("callback_errors")
            logger.exception("LivePtycho could not take the %r document", name)
        finally:
            self._worst_call_s = max(self._worst_call_s, time.perf_counter() - began)
        return None

    def _hand_over(self, name: str, doc: Mapping[str, Any]) -> None:
        self.counters.add("documents")
        self.engine.submit(name, doc)

    # event-model's typed documents in, the same document out (the router's contract; the
    # engine works on its own thread, so nothing here waits for the reconstruction).
    def start(self, doc: RunStart) -> RunStart:
        if not self.enabled:
            self.counters.add("ignored_while_disabled")
            logger.info("LivePtycho is disabled: scan %s not reconstructed", doc.get("scan_id"))
            return doc
        self._hand_over("start", doc)
        return doc

    def descriptor(self, doc: EventDescriptor) -> EventDescriptor:
        self._hand_over("descriptor", doc)
        return doc

    def event_page(self, doc: EventPage) -> EventPage:
        self._hand_over("event_page", doc)
        return doc

    def stop(self, doc: RunStop) -> RunStop:
        self._hand_over("stop", doc)
        return doc

    # ---- controls ----------------------------------------------------------------------
    def configure(
        self,
        overrides: Mapping[str, Any] | None = None,
        /,
        *,
        replace: bool = False,
        **fields: Any,
    ) -> dict[str, Any]:
        """Change the overrides of the *next* runs (running ones keep theirs); return them.

        ``overrides`` and keyword ``fields`` (``configure(recon={"iterations": 50})``)
        are deep-merged into the earlier overrides: ``recon.iterations`` changes,
        ``recon.algorithm`` set before stays. ``replace=True`` starts from none
        instead (``configure(replace=True)`` clears them).

        The result is validated as a run would validate it; if it is invalid,
        :class:`~hxn_liveptycho.errors.ConfigurationError` names each bad field
        and what it accepts, and the previous overrides stay in place. This is
        called by users (a profile, queueserver, serve), never by the RunEngine,
        so raising here stops a typo before a scan instead of failing every run.
        """
        update = deep_merge(overrides or {}, fields)
        new = merge_overrides(self._overrides, update, replace=replace)
        self._overrides = new
        logger.info("overrides for the next runs: %s", new)
        return self.overrides

    @property
    def overrides(self) -> dict[str, Any]:
        """A copy of the overrides the next runs get (over ``settings.overrides``)."""
        return deep_merge({}, self._overrides)

    def enable(self) -> None:
        self.enabled = True

    def disable(self) -> None:
        """Leave new runs alone; runs already being reconstructed carry on."""
        self.enabled = False

    def status(self) -> dict[str, Any]:
        info = self.engine.status()
        # A run's status turns final before its last write to Tiled ends; 'finished' says
        # when that write is done too (runs dropped from the engine's history are).
        running = {s.uid for s in self.engine.sessions() if not s.finished}
        for run in info["runs"]:
            run["finished"] = run["uid"] not in running
        info["callback"] = {
            **self.counters.snapshot(),
            "enabled": self.enabled,
            "worst_call_ms": round(self._worst_call_s * 1e3, 3),
        }
        if self.tiled is not None:
            info["tiled"] = self.tiled.describe()
        return info

    def stop_run(self, uid: str | None = None) -> bool:
        """Stop a running reconstruction (the newest if ``uid`` is None); it ends 'aborted'."""
        sessions = [s for s in self.engine.sessions() if not s.finished]
        if uid is not None:
            sessions = [s for s in sessions if s.uid == uid]
        if not sessions:
            return False
        sessions[-1].cancel("stopped by the user")
        return True

    def select_model(self, name: str) -> dict[str, Any]:
        """Run the NN branch of the next runs with model ``name``, checked against the
        model registry now (a typo fails here, not in every later run). Returns the model,
        where it comes from (never the server's folders) and the overrides."""
        from hxn_liveptycho.nn.registry import ModelRegistry  # the NN branch loads lazily

        model = ModelRegistry(self.settings.model_dir).get(name)
        overrides = self.configure({"nn": {"model": name}})
        logger.info("NN model for the next runs: %s (%s)", name, model.source)
        return {"model": name, "source": model.source, "overrides": overrides}

    def uploads(self) -> list[dict[str, Any]]:
        """Results waiting for Tiled: in the backup folder, or in memory."""
        return [] if self.tiled is None else self.tiled.recovery.pending()

    def retry_uploads(self) -> dict[str, Any]:
        """Upload now every result Tiled did not take (local backups, and results held in
        memory because the backup folder refused them too); what still waits is listed."""
        if self.tiled is None:
            return {"uploaded": [], "errors": {"tiled": "no Tiled connection"}, "pending": []}
        return self.tiled.retry_uploads()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every run handed over so far is reconstructed and written."""
        return self.engine.wait_idle(timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Stop receivers and sessions (each writes what it has), then the embedded Tiled."""
        self.engine.close(timeout)
        if self.tiled is not None:
            self.tiled.close()

    def __enter__(self) -> LivePtycho:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir
