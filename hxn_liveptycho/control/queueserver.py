"""Steer a LivePtycho from bluesky-queueserver: functions for ``function_execute``, plan wrappers.

Queueserver looks functions up by name in the worker's namespace and sends
their return values back to the client as JSON, so the profile binds one
:class:`LivePtychoControl` to the subscribed callback and puts its
:meth:`~LivePtychoControl.functions` into the namespace::

    globals().update(LivePtychoControl(live_ptycho).functions())

after which a client calls ``function_execute(BFunc("liveptycho_status"))``.
Every function returns a JSON-safe mapping and raises a clear error for bad
arguments (queueserver reports it as the task's ``traceback``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Generator, Mapping
from typing import Any

import bluesky.preprocessors as bpp

from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.config.overrides import check_overrides, deep_merge
from hxn_liveptycho.util.jsonsafe import json_safe

__all__ = ["PREFIX", "LivePtychoControl", "check_overrides", "ptychography"]

logger = logging.getLogger(__name__)

#: The prefix of every name this module puts into the queueserver namespace.
PREFIX = "liveptycho_"


def ptychography(
    plan: Generator[Any, Any, Any],
    md: Mapping[str, Any] | None = None,
    *,
    flag: str = "ptychography",
) -> Generator[Any, Any, Any]:
    """Mark every run of ``plan`` for live reconstruction, whatever the plan is called.

    ``flag`` must match ``Settings.metadata_flag``; ``md`` adds metadata of
    the caller's (it wins over the plan's own, as ``RE(plan, **md)`` does).
    """
    return (yield from bpp.inject_md_wrapper(plan, {**(md or {}), flag: True}))


class LivePtychoControl:
    """The queueserver face of one subscribed :class:`LivePtycho` (or of none, if it failed)."""

    def __init__(self, live: LivePtycho | None) -> None:
        self.live = live
        self._reprocessing: dict[str, dict[str, Any]] = {}
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()

    def _require_live(self) -> LivePtycho:
        if self.live is None:
            raise RuntimeError(
                "live ptychography is not running in this environment; "
                "the startup log ('hxn_liveptycho.profile') says why"
            )
        return self.live

    def status(self) -> dict[str, Any]:
        """Runs (newest last) with progress, counters, overrides and the Tiled location."""
        if self.live is None:
            return {"running": False, "enabled": False, "runs": []}
        info = self.live.status()
        info["running"] = True
        info["enabled"] = self.live.enabled
        info["overrides"] = self.live.overrides
        info["settings"] = {
            "catalog_path": self.live.settings.catalog_path,
            "metadata_flag": self.live.settings.metadata_flag,
            "plan_names": list(self.live.settings.plan_names),
        }
        with self._lock:
            info["reprocessing"] = [dict(job) for job in self._reprocessing.values()]
        return json_safe(info)

    def enable(self) -> dict[str, Any]:
        """Reconstruct new ptychography runs again."""
        live = self._require_live()
        live.enable()
        logger.info("live ptychography enabled from the queue")
        return {"enabled": True}

    def disable(self) -> dict[str, Any]:
        """Leave new runs alone; runs already being reconstructed carry on."""
        live = self._require_live()
        live.disable()
        logger.info("live ptychography disabled from the queue")
        return {"enabled": False}

    def configure(self, replace: bool = False, **overrides: Any) -> dict[str, Any]:
        """Deep-merge ScanConfig overrides into those of the *next* runs; return them all.

        ``replace=True`` replaces them instead (``liveptycho_configure(replace=True)``
        clears them). The merged overrides are validated as a run would: a bad
        field fails the call with one line naming it and what it accepts, and the
        previous overrides stay.
        """
        live = self._require_live()
        live.configure(overrides, replace=replace)
        logger.info("live ptychography overrides for the next runs: %s", live.overrides)
        return {"overrides": json_safe(live.overrides)}

    def select_model(self, name: str) -> dict[str, Any]:
        """Run the NN branch of the next runs with model ``name`` (a registry name or .onnx path).

        The name is checked against the model registry now, so a typo fails
        here rather than in every later run.
        """
        chosen = self._require_live().select_model(name)
        return {"nn_model": chosen["model"], "source": chosen["source"]}

    def stop(self, uid: str | None = None) -> dict[str, Any]:
        """Stop the reconstruction of run ``uid`` (None: the newest running); it ends 'aborted'."""
        live = self._require_live()
        stopped = live.stop_run(uid)
        logger.info("stop of reconstruction %s requested: %s", uid or "(newest)", stopped)
        return {"stopped": stopped, "uid": uid}

    def reprocess(self, source: str, **overrides: Any) -> dict[str, Any]:
        """Reconstruct an archived run again, in the background: ``source`` is a raw run's
        uid or scan_id in Tiled (the newest run with that scan_id wins) or a replay archive.

        The run's documents and frames are replayed into a LivePtycho of its own with
        this environment's settings and overrides, plus ``overrides`` for this run only;
        the result is a new processed container linked by ``raw_uid``. Progress and
        the outcome appear under ``reprocessing`` in ``liveptycho_status``.
        """
        live = self._require_live()
        check_overrides(overrides)
        key = str(source)
        with self._lock:
            if self._reprocessing.get(key, {}).get("state") == "running":
                raise RuntimeError(f"{key} is already being reprocessed")
            job: dict[str, Any] = {"source": key, "state": "running", "overrides": overrides}
            self._reprocessing[key] = job
        merged = deep_merge(deep_merge(live.settings.overrides, live.overrides), overrides)
        settings = live.settings.model_copy(update={"overrides": check_overrides(merged)})
        worker = threading.Thread(
            target=self._reprocess, args=(key, settings, job), name=f"liveptycho-reprocess-{key}"
        )
        worker.start()
        self._workers.append(worker)
        logger.info("reprocessing %s with overrides %s", key, overrides)
        return {"reprocessing": key, "state": "running"}

    def _reprocess(self, source: str, settings: Any, job: dict[str, Any]) -> None:
        from hxn_liveptycho.replay import replay_run  # replay pulls in h5py and Tiled readers

        try:
            report = replay_run(source, settings=settings, pace="fast")
        except Exception as exc:  # recorded for status; the queue worker carries on
            logger.exception("reprocessing %s failed", source)
            update: dict[str, Any] = {"state": "failed", "error": f"{type(exc).__name__}: {exc}"}
        else:
            result = report.result or {}
            update = {
                "state": "done",
                "raw_uid": report.uid,
                "frames": report.frames,
                "result": result,
            }
        with self._lock:
            job.update(update)

    def wait_reprocessing(self, timeout: float | None = None) -> bool:
        """Block until every reprocessing started here has ended (tests, clean shutdown)."""
        for worker in list(self._workers):
            worker.join(timeout)
        return not any(w.is_alive() for w in self._workers)

    def functions(self) -> dict[str, Callable[..., dict[str, Any]]]:
        """The names queueserver users call, each bound to this control."""
        return {
            f"{PREFIX}status": self.status,
            f"{PREFIX}enable": self.enable,
            f"{PREFIX}disable": self.disable,
            f"{PREFIX}configure": self.configure,
            f"{PREFIX}select_model": self.select_model,
            f"{PREFIX}stop": self.stop,
            f"{PREFIX}reprocess": self.reprocess,
        }
