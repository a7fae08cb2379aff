"""Serve's API and the CLI refuse bad overrides, unknown runs and show no secrets.

Before: ``PATCH /api/config {"recon": {"iterations": -5}}`` and ``liveptycho
configure recon.algorithm=epei`` answered success and every later run failed;
``liveptycho stop <unknown uid>`` printed ``{"stopped": null}`` and exited 0;
``GET /api/config`` showed the ``api_key=`` inside ``LIVEPTYCHO_TILED_URI``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from conftest import TILED_API_KEY
from serve_helpers import free_port

from hxn_liveptycho import cli
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.control.api import create_app
from hxn_liveptycho.control.transport import ZmqDocumentSource
from hxn_liveptycho.serve import ServeService

pytestmark = pytest.mark.timeout(120)

TOKEN = "entry-points-token"


@pytest.fixture
def service(tmp_path: Path, tiled_server: Any) -> Iterator[ServeService]:
    assert f"api_key={TILED_API_KEY}" in tiled_server.uri  # the secret the views must hide
    settings = Settings(tiled_uri=tiled_server.uri, data_dir=tmp_path / "data", api_token=TOKEN)
    service = ServeService(settings, ZmqDocumentSource(f"tcp://127.0.0.1:{free_port()}"))
    yield service
    service.close(timeout=10)


@pytest.fixture
def url(service: ServeService) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        create_app(service, token=TOKEN), host="127.0.0.1", port=port, log_config=None
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="liveptycho-test-api", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def api(url: str) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=url, headers=headers, timeout=10) as client:
        yield client


def test_api_refuses_bad_overrides_with_the_field(api: httpx.Client) -> None:
    assert api.patch("/api/config", json={"recon": {"iterations": 7}}).status_code == 200
    bad = api.patch("/api/config", json={"recon": {"iterations": -5}})
    assert bad.status_code == 422
    assert "recon.iterations: -5 refused" in bad.json()["detail"]
    assert "greater than or equal to 0" in bad.json()["detail"]
    bad = api.patch("/api/config/overrides", json={"recon": {"algorithm": "epei"}})
    assert bad.status_code == 422
    assert (
        "recon.algorithm: 'epei' refused: Input should be 'epie', 'dm' or 'lsqml'"
        in (bad.json()["detail"])
    )
    bad = api.put("/api/config/overrides", json={"roi": {"size": 3}})
    assert bad.status_code == 422 and "roi.size" in bad.json()["detail"]
    # merged (PATCH) and kept: nothing refused got in
    assert api.get("/api/config").json()["overrides"] == {"recon": {"iterations": 7}}


def test_config_view_hides_the_tiled_api_key(api: httpx.Client) -> None:
    reply = api.get("/api/config")
    assert reply.status_code == 200
    assert TILED_API_KEY not in reply.text
    assert "api_key=***" in reply.json()["settings"]["tiled_uri"]
    assert reply.json()["settings"]["api_token"] == "**********"


def test_api_stop_of_an_unknown_run_is_404(api: httpx.Client) -> None:
    assert api.post("/api/stop", json={"uid": "nosuchrun"}).status_code == 404
    assert api.post("/api/stop", json={}).json() == {"stopped": None}  # none running: no error


def test_cli_configure_refuses_in_one_line(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["--url", url, "--token", TOKEN]
    assert cli.main(["configure", *base, "recon.algorithm=epei"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "recon.algorithm: 'epei' refused" in err and "HTTP 422" in err
    assert cli.main(["configure", *base, "recon.iterations=12"]) == 0
    assert cli.main(["configure", *base, "roi.size=64"]) == 0
    assert '"iterations": 12' in capsys.readouterr().out  # merged, not replaced


def test_cli_stop_of_an_unknown_run_fails_in_one_line(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["stop", "--url", url, "--token", TOKEN, "nosuchrun"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no run 'nosuchrun'" in err
    assert cli.main(["stop", "--url", url, "--token", TOKEN]) == 0  # nothing running is fine


def test_cli_settings_hides_the_tiled_api_key(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LIVEPTYCHO_TILED_URI", "http://tiled:8000/api?api_key=topsecret")
    monkeypatch.setenv("LIVEPTYCHO_TILED_API_KEY", "othersecret")
    assert cli.main(["settings"]) == 0
    out = capsys.readouterr().out
    assert "topsecret" not in out and "othersecret" not in out
    assert "http://tiled:8000/api?api_key=***" in out


def test_a_non_ascii_token_is_401_not_500(api: httpx.Client, url: str) -> None:
    with httpx.Client(base_url=url, timeout=10) as anonymous:
        assert anonymous.get("/api/config", params={"token": "clé"}).status_code == 401
        latin1 = {"Authorization": "Bearer clé".encode("latin-1")}  # as a raw header
        reply = anonymous.get("/api/config", headers=latin1)
        assert reply.status_code == 401
    assert api.get("/api/config").status_code == 200
