"""A small client of serve's HTTP API, used by ``liveptycho status|stop|configure``."""

from __future__ import annotations

import json
from typing import Any

import httpx

from hxn_liveptycho.config.settings import Settings


class ServeError(RuntimeError):
    """Serve answered with an error, or could not be reached."""


class ServeClient:
    def __init__(self, url: str, token: str | None = None, timeout: float = 10.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    @classmethod
    def from_settings(
        cls, settings: Settings, url: str | None = None, token: str | None = None
    ) -> ServeClient:
        """Talk to the serve that the same ``LIVEPTYCHO_*`` settings describe."""
        host = settings.serve_host
        host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        if token is None and settings.api_token is not None:
            token = settings.api_token.get_secret_value()
        return cls(url or f"http://{host}:{settings.serve_port}", token)

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            reply = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise ServeError(f"cannot reach liveptycho serve at {self.url}: {exc}") from exc
        if reply.status_code >= 400:
            try:
                detail = reply.json().get("detail", reply.text)
            except json.JSONDecodeError:
                detail = reply.text
            raise ServeError(f"{method} {path}: HTTP {reply.status_code}: {detail}")
        return reply.json()

    def status(self) -> dict[str, Any]:
        return self._call("GET", "/api/status")

    def workers(self) -> dict[str, Any]:
        return self._call("GET", "/api/workers")

    def run(self, uid: str) -> dict[str, Any]:
        return self._call("GET", f"/api/runs/{uid}")

    def stop(self, uid: str | None = None) -> dict[str, Any]:
        return self._call("POST", "/api/stop", {"uid": uid})

    def config(self) -> dict[str, Any]:
        return self._call("GET", "/api/config")

    def configure(self, overrides: dict[str, Any], *, replace: bool = False) -> dict[str, Any]:
        return self._call("PUT" if replace else "PATCH", "/api/config/overrides", overrides)

    def select_model(self, name: str) -> dict[str, Any]:
        return self._call("PUT", "/api/config/model", {"name": name})

    def uploads(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/uploads")

    def retry_uploads(self) -> dict[str, Any]:
        return self._call("POST", "/api/uploads/retry")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ServeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_assignments(assignments: list[str]) -> dict[str, Any]:
    """``["recon.iterations=50", "roi.size=256"]`` → ``{"recon": {"iterations": 50}, ...}``.

    Values are read as JSON when they parse (numbers, true, null, lists), else as text.
    """
    overrides: dict[str, Any] = {}
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE, got {assignment!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        *parents, leaf = key.split(".")
        node = overrides
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key!r} sets a field inside a value given earlier")
        node[leaf] = value
    return overrides
