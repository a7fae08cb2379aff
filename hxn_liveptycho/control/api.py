"""Serve's HTTP face: status and control API, picture endpoints and the live page.

Every ``/api`` route except ``/api/health`` needs ``Authorization: Bearer
<token>`` when a token is configured. The live page cannot put headers on
``<img>`` or ``EventSource`` requests, so a ``token`` query parameter is
accepted too (serve turns uvicorn's access log off so it is not written down).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
from collections import OrderedDict
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any
from urllib.parse import urlsplit

from fastapi import Body, Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from hxn_liveptycho import __version__
from hxn_liveptycho.control.render import KINDS, picture_array, render_png
from hxn_liveptycho.control.service import ServeService
from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.pipeline.session import RunSession
from hxn_liveptycho.util.jsonsafe import json_safe

#: Seconds between two server-sent status events.
EVENT_INTERVAL_S = 0.5
_PNG_CACHE_SIZE = 32


class StopRequest(BaseModel):
    uid: str | None = None


class ModelRequest(BaseModel):
    name: str


def _bearer(token: str | None) -> Any:
    async def check(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, supplied = header.partition(" ")
        if scheme.lower() != "bearer":
            supplied = request.query_params.get("token", "")
        # Bytes: compare_digest refuses non-ASCII str (a 500 for a token with an 'é').
        if not supplied or not hmac.compare_digest(
            supplied.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")
        ):
            raise HTTPException(
                status_code=401,
                detail="a valid bearer token is required",
                headers={"WWW-Authenticate": "Bearer"},
            )

    return check


def _snapshot_version(session: RunSession) -> str:
    """Changes whenever the pictures of ``session`` would."""
    snap = session.latest_snapshot or {}
    nn = session.nn_snapshot() or {}
    return f"{snap.get('iteration', 0)}.{nn.get('frames', 0)}.{session.status}"


class _Pictures:
    """Rendered PNGs, keyed by run, picture and snapshot version: each is rendered once per
    snapshot, however many pages poll it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str, str], bytes] = OrderedDict()

    def get(self, session: RunSession, kind: str) -> bytes | None:
        key = (session.uid, kind, _snapshot_version(session))
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        nn = session.nn_snapshot() if kind == "mosaic" else None
        array = picture_array(kind, session.latest_snapshot, nn)
        if array is None:
            return None
        png = render_png(kind, array)
        with self._lock:
            self._cache[key] = png
            while len(self._cache) > _PNG_CACHE_SIZE:
                self._cache.popitem(last=False)
        return png


def _tiled_base(service: ServeService) -> str | None:
    """Scheme and host of the Tiled server, never its API key."""
    tiled = service.live.tiled
    uri = tiled.uri if tiled is not None else None
    if not uri:
        return None
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc}"


def _run_view(service: ServeService, run: dict[str, Any]) -> dict[str, Any]:
    """A status-page row: the run's summary plus its Tiled link and picture version."""
    view = dict(run)
    base = _tiled_base(service)
    if base and run.get("container_path"):
        view["tiled_url"] = f"{base}/api/v1/metadata/{run['container_path']}"
    session = service.find_session(run["uid"])
    if session is not None:
        view["version"] = _snapshot_version(session)
        view["has_mosaic"] = session.nn_snapshot() is not None
        snap = session.latest_snapshot or {}
        view["has_quality"] = snap.get("coverage") is not None
        view["convergence"] = snap.get("convergence")
        view["resolution"] = snap.get("resolution")
    return view


def create_app(service: ServeService, *, token: str | None) -> FastAPI:
    app = FastAPI(title="liveptycho serve", version=__version__)
    auth = [Depends(_bearer(token))]
    pictures = _Pictures()
    web = resources.files("hxn_liveptycho.control") / "web"

    def session_or_404(uid: str) -> RunSession:
        session = service.find_session(uid)
        if session is None:
            raise HTTPException(404, f"no run {uid!r} in serve's recent runs")
        return session

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        """Liveness for monitors; no details, so no token needed."""
        return {"status": "closing" if service.closing.is_set() else "ok"}

    @app.get("/api/status", dependencies=auth)
    def status() -> dict[str, Any]:
        info = service.status()
        info["runs"] = [_run_view(service, run) for run in info["runs"]]
        return info

    @app.get("/api/workers", dependencies=auth)
    def workers() -> dict[str, Any]:
        """Every serve worker sharing this one's Redis, alive or lately dead, with its runs
        (serve alone: this one); the Redis URL without its password."""
        try:
            return json_safe(service.workers_view())
        except Exception as exc:  # Redis unreachable: say so, not a bare 500
            raise HTTPException(503, f"the workers' Redis did not answer: {exc}") from exc

    @app.get("/api/runs", dependencies=auth)
    def runs() -> list[dict[str, Any]]:
        return [_run_view(service, run) for run in reversed(service.status()["runs"])]

    @app.get("/api/runs/{uid}", dependencies=auth)
    def run_details(uid: str) -> dict[str, Any]:
        session = session_or_404(uid)
        details = _run_view(service, session.summary())
        details["overrides"] = session.overrides
        details["start"] = {
            k: session.start_doc.get(k) for k in ("time", "plan_name", "scan", "motors")
        }
        if session.config is not None:
            details["config"] = session.config.model_dump(mode="json")
        nn = session.nn_snapshot()
        if nn is not None:
            details["nn_frames"] = nn.get("frames")
        return json_safe(details)

    @app.post("/api/runs/{uid}/stop", dependencies=auth)
    def stop_run(uid: str) -> dict[str, Any]:
        session_or_404(uid)
        return {"stopped": service.stop_run(uid)}

    @app.post("/api/stop", dependencies=auth)
    def stop_newest(request: StopRequest | None = None) -> dict[str, Any]:
        """Stop run ``uid`` (404 if serve does not know it), or the newest running one."""
        uid = request.uid if request else None
        if uid is not None:
            session_or_404(uid)
        return {"stopped": service.stop_run(uid)}

    @app.get("/api/uploads", dependencies=auth)
    def uploads() -> list[dict[str, Any]]:
        """Results Tiled did not take, waiting in the backup folder or in memory."""
        return service.uploads()

    @app.post("/api/uploads/retry", dependencies=auth)
    def retry_uploads() -> dict[str, Any]:
        """Upload every waiting result now; what was uploaded and what still waits."""
        return service.retry_uploads()

    @app.get("/api/config", dependencies=auth)
    def config() -> dict[str, Any]:
        """Enabled, overrides and settings; secrets hidden (keys, tokens, api_key= in URIs)."""
        return service.config()

    def configure(overrides: dict[str, Any], merge: bool) -> dict[str, Any]:
        try:
            return {"overrides": service.configure(overrides, merge=merge)}
        except (ValueError, ConfigurationError) as exc:  # one line: each field, what it takes
            raise HTTPException(422, str(exc)) from exc

    @app.patch("/api/config", dependencies=auth)
    def merge_config(overrides: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        """Deep-merge into the overrides of the next runs (as PATCH /api/config/overrides)."""
        return configure(overrides, merge=True)

    @app.put("/api/config/overrides", dependencies=auth)
    def replace_overrides(overrides: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        """Replace the overrides of the next runs (running ones keep theirs)."""
        return configure(overrides, merge=False)

    @app.patch("/api/config/overrides", dependencies=auth)
    def merge_overrides(overrides: dict[str, Any] = Body(...)) -> dict[str, Any]:  # noqa: B008
        """Deep-merge into the overrides of the next runs."""
        return configure(overrides, merge=True)

    @app.put("/api/config/model", dependencies=auth)
    def select_model(request: ModelRequest) -> dict[str, Any]:
        try:
            return service.select_model(request.name)
        except (ValueError, ConfigurationError) as exc:
            raise HTTPException(422, str(exc)) from exc

    @app.post("/api/enable", dependencies=auth)
    def enable() -> dict[str, bool]:
        service.live.enable()
        return {"enabled": True}

    @app.post("/api/disable", dependencies=auth)
    def disable() -> dict[str, bool]:
        service.live.disable()
        return {"enabled": False}

    @app.get("/api/runs/{uid}/images/{kind}.png", dependencies=auth)
    def picture(uid: str, kind: str) -> Response:
        if kind not in KINDS:
            raise HTTPException(404, f"no picture {kind!r}; there are {sorted(KINDS)}")
        png = pictures.get(session_or_404(uid), kind)
        if png is None:
            raise HTTPException(404, f"no {KINDS[kind][1]} for this run yet")
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/api/series", dependencies=auth)
    def series() -> list[dict[str, Any]]:
        """The series (ptycho-tomography) in memory, newest first: projections by angle."""
        return json_safe(list(reversed(service.live.engine.series.status())))

    @app.get("/api/series/{series_id}/sinogram.png", dependencies=auth)
    def sinogram(series_id: str, row: float | None = None) -> Response:
        """One row of the series' phase stack, a projection per line in angle order;
        ``row`` is a fraction of the height (0 top, 1 bottom; default the middle)."""
        found = service.live.engine.series.sinogram(series_id, row)
        if found is None:
            raise HTTPException(
                404, f"no sinogram of series {series_id!r}: none stacked yet, or not a recent one"
            )
        image, _, _ = found
        png = render_png("phase", image)
        return Response(png, media_type="image/png", headers={"Cache-Control": "no-store"})

    @app.get("/api/events", dependencies=auth)
    async def events() -> StreamingResponse:
        """Server-sent events: the current run and the recent runs, every half second."""

        async def stream() -> AsyncIterator[str]:
            last = ""
            while not service.closing.is_set():
                message = await asyncio.to_thread(_live_state, service)
                if message != last:
                    yield f"data: {message}\n\n"
                    last = message
                else:
                    yield ": keep-alive\n\n"
                await asyncio.sleep(EVENT_INTERVAL_S)
            yield 'event: closing\ndata: {"closing": true}\n\n'

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
        )

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(str(web / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(web)), name="static")
    return app


def _live_state(service: ServeService) -> str:
    runs = [_run_view(service, run) for run in reversed(service.status()["runs"])]
    current = service.current_session()
    series = service.live.engine.series.status()
    state = {
        "current": None if current is None else current.uid,
        "runs": runs[:20],
        "series": series[-1] if series else None,
        "closing": service.closing.is_set(),
    }
    return json.dumps(state, default=str)
