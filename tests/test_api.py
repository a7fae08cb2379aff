"""Serve's HTTP API in process: token authentication, bind rules, overrides and model choice."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from serve_helpers import free_port

from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.control.api import create_app
from hxn_liveptycho.control.client import parse_assignments
from hxn_liveptycho.control.transport import ZmqDocumentSource, load_document
from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.serve import ServeService, check_bind

TOKEN = "s3cret-token"


@pytest.fixture
def service(tmp_path: Path, tiled_server: Any) -> Iterator[ServeService]:
    settings = Settings(tiled_uri=tiled_server.uri, data_dir=tmp_path / "data", api_token=TOKEN)
    source = ZmqDocumentSource(f"tcp://127.0.0.1:{free_port()}")
    service = ServeService(settings, source)
    yield service
    service.close(timeout=10)


@pytest.fixture
def api(service: ServeService) -> Iterator[httpx.Client]:
    """The app on a real uvicorn server (as serve runs it), on a free loopback port."""
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
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield client
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize(
    "path",
    ["/api/status", "/api/config", "/api/runs", "/api/events", "/api/runs/x/images/probe.png"],
)
def test_requests_without_the_token_are_rejected(api, path):
    assert api.get(path).status_code == 401
    assert api.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert api.get(path, params={"token": "wrong"}).status_code == 401
    assert api.get(path).headers["www-authenticate"] == "Bearer"


def test_the_token_opens_the_api_in_a_header_or_the_query(api):
    assert api.get("/api/health").json() == {"status": "ok"}  # monitors need no token
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    status = api.get("/api/status", headers=bearer).json()
    assert status["runs"] == [] and status["serve"]["closing"] is False
    assert api.get("/api/config", params={"token": TOKEN}).status_code == 200
    assert api.post("/api/stop", headers=bearer, json={}).json() == {"stopped": None}
    assert api.get("/api/runs/nosuchrun", headers=bearer).status_code == 404
    settings = api.get("/api/config", headers=bearer).json()["settings"]
    assert settings["api_token"] == "**********"  # never echoed back


def test_overrides_are_checked_merged_and_replaced(api):
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    reply = api.patch("/api/config/overrides", headers=bearer, json={"recon": {"iterations": 7}})
    assert reply.json() == {"overrides": {"recon": {"iterations": 7}}}
    reply = api.patch("/api/config/overrides", headers=bearer, json={"roi": {"size": 64}})
    assert reply.json()["overrides"] == {"recon": {"iterations": 7}, "roi": {"size": 64}}
    bad = api.patch("/api/config/overrides", headers=bearer, json={"recon": {"iteratoins": 7}})
    assert bad.status_code == 422 and "iteratoins" in bad.json()["detail"]
    reply = api.put("/api/config/overrides", headers=bearer, json={"energy_kev": 9.0})
    assert reply.json()["overrides"] == {"energy_kev": 9.0}


def test_model_selection_is_checked_against_the_registry(api):
    from hxn_liveptycho.nn.registry import SHIPPED_DIR

    bearer = {"Authorization": f"Bearer {TOKEN}"}
    bad = api.put("/api/config/model", headers=bearer, json={"name": "no-such-model"})
    assert bad.status_code == 422
    shipped = sorted(SHIPPED_DIR.glob("*.onnx"))
    assert shipped, "the package ships at least one NN model"
    reply = api.put("/api/config/model", headers=bearer, json={"name": shipped[0].stem})
    assert reply.status_code == 200, reply.text
    overrides = api.get("/api/config", headers=bearer).json()["overrides"]
    assert overrides["nn"]["model"] == shipped[0].stem


def test_bind_rules():
    for host in ("127.0.0.1", "localhost", "::1"):
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.5", "xf03id-gpu1"):
        with pytest.raises(ConfigurationError, match="without a token"):
            check_bind(host, None)
        check_bind(host, TOKEN)
    assert Settings().serve_host == "127.0.0.1"


def test_serve_refuses_all_interfaces_without_a_token(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "hxn_liveptycho.cli", "serve", "--host", "0.0.0.0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "refusing to bind the API to '0.0.0.0' without a token" in done.stderr


def test_documents_are_unpickled_as_plain_data_only():
    import pickle

    import numpy as np

    doc = {"uid": "a", "data": {"x": np.arange(3.0)}, "seq_num": [1]}
    loaded = load_document(pickle.dumps(doc))
    assert loaded["uid"] == "a" and loaded["data"]["x"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        load_document(pickle.dumps({"path": Path("/etc")}))


def test_cli_assignments_become_nested_overrides():
    assert parse_assignments(["recon.iterations=50", "roi.size=256", "detector=eiger1"]) == {
        "recon": {"iterations": 50},
        "roi": {"size": 256},
        "detector": "eiger1",
    }
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_assignments(["recon.iterations"])
