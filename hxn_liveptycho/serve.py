"""``liveptycho serve``: the engine as a standalone service fed documents over the network.

The service is the same :class:`~hxn_liveptycho.callback.LivePtycho` a
beamline profile subscribes to the RunEngine, subscribed instead to a
:class:`~hxn_liveptycho.control.transport.DocumentSource`; so runs get the
same Engine and RunSessions. Beside it runs the HTTP status and control API
and the live page (uvicorn in its own thread); the main thread waits for
SIGTERM or SIGINT and then shuts down in order: stop taking documents, stop
running sessions (each writes what it has, status 'aborted', reason
'serve shutting down'), close the engine and Tiled, stop the API.

At start, before taking documents, serve resumes the runs a process that died
left checkpoints of (:func:`resume_runs`, docs/resume.md). With ``redis_url`` set it
is one of several workers on the same stream: each run is claimed in Redis and a dead
worker's runs are taken over (:mod:`hxn_liveptycho.control.workers`).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hxn_liveptycho import __version__
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.control.api import create_app
from hxn_liveptycho.control.service import ServeService
from hxn_liveptycho.control.transport import ZmqDocumentSource
from hxn_liveptycho.control.workers import WorkerCoordinator
from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.store.checkpoint import Checkpoint
from hxn_liveptycho.store.diffraction import Diffraction
from hxn_liveptycho.store.left_behind import mark_left_behind, stored_frames

# ServeService (the service the API fronts) lives in control/service.py; it is found here too.
__all__ = [
    "SECRET_ENVIRONMENT",
    "ServeService",
    "add_log_file",
    "check_bind",
    "is_loopback",
    "resume_runs",
    "run_serve",
]

logger = logging.getLogger(__name__)


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
    "LIVEPTYCHO_REDIS_URL",  # may hold the Redis password
)


def _drop_secrets_from_environment() -> None:
    for name in SECRET_ENVIRONMENT:
        os.environ.pop(name, None)


#: Attempts (a second apart, then longer) at marking the containers a dead process left.
_MARK_ATTEMPTS = 10


def resume_runs(service: ServeService) -> list[Checkpoint]:
    """Take up again every run that a dead process left a checkpoint of: each gets a
    session that starts from the checkpoint and the data still arriving, or ends
    ``incomplete`` with the checkpoint's state (docs/resume.md). The containers those
    runs left ``running`` are marked ``incomplete`` in the background. Call it before
    the service takes documents."""
    tiled = service.live.tiled

    def stored(checkpoint: Checkpoint) -> Callable[[], Diffraction | None] | None:
        if tiled is None or not checkpoint.container_path:
            return None
        return lambda: stored_frames(tiled.client(), checkpoint.container_path)

    checkpoints = service.live.engine.resume_checkpoints(stored)
    if not checkpoints:
        return []
    service.adopt_runs(
        {
            checkpoint.uid: [d["uid"] for name, d in checkpoint.documents if name == "descriptor"]
            for checkpoint in checkpoints
        }
    )
    logger.info("resuming %d run(s) from their checkpoints", len(checkpoints))
    if tiled is not None and any(checkpoint.container_path for checkpoint in checkpoints):
        threading.Thread(
            target=_mark_left_behind,
            args=(tiled, checkpoints),
            name="liveptycho-resume-marks",
            daemon=True,
        ).start()
    return checkpoints


def _mark_left_behind(tiled: Any, checkpoints: list[Checkpoint]) -> None:
    waiting = [checkpoint for checkpoint in checkpoints if checkpoint.container_path]
    for attempt in range(_MARK_ATTEMPTS):
        try:
            root = tiled.client()
            while waiting:
                if mark_left_behind(root, waiting[0]):
                    logger.info("container %s marked incomplete", waiting[0].container_path)
                waiting.pop(0)
            return
        except Exception as exc:
            if attempt == _MARK_ATTEMPTS - 1:
                logger.warning("could not mark %d container(s) left running: %s", len(waiting), exc)
                return
            time.sleep(min(1.0 + attempt, 10.0))


def run_serve(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT; 0 after a clean shutdown."""
    import uvicorn

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
    if settings.redis_url:
        # One of several workers: runs are claimed in Redis, and a dead worker's runs
        # (a restarted one's own included) are taken over from the shared checkpoints.
        try:
            service.workers = WorkerCoordinator(settings, service)
        except BaseException:  # no Redis, a name taken: the engine must not outlive this
            service.close(timeout=5.0)
            raise
        service.workers.start()
    else:
        resume_runs(service)
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
        if service.workers is not None:
            service.workers.close()
        server.should_exit = True
        api.join(10)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
