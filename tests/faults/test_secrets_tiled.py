"""The embedded Tiled's API key is in no log file, command line or environment (issue 23).

Before, every request was written with its ``?api_key=`` to the world-readable
``<data_dir>/tiled/access.log``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from urllib.parse import quote

import httpx
import numpy as np
import pytest

from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.store.server import TiledConnection

KEY = "secretsTiledKey0123456789abcdef"


def _requests_carrying_the_key(base_url: str) -> None:
    """What clients (and mistakes) send: the key in query strings of every spelling, headers."""
    with httpx.Client(base_url=base_url, trust_env=False, timeout=10.0) as http:
        for url in (
            f"/api/v1/?api_key={KEY}",
            f"/api/v1/metadata/?API_KEY={KEY}",
            f"/api/v1/search/?api%5Fkey={KEY}",
            f"/api/v1/metadata/nosuchnode?api_key={KEY}&x=1",
            f"/api/v1/?x=1&api_key={quote(KEY)}",
            f"/api/v1/?token={KEY}",
            f"/api/v1/metadata/{KEY}",  # a key pasted in the wrong place
            "/api/v1/?api_key=wrong",
        ):
            http.get(url)
        http.get("/api/v1/", headers={"Authorization": f"Apikey {KEY}"})
        http.get("/api/v1/", headers={"Authorization": f"Bearer {KEY}"})


@pytest.fixture
def connection(tmp_path: Path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("LIVEPTYCHO_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LIVEPTYCHO_TILED_API_KEY", KEY)
    settings = Settings(data_dir=tmp_path / "data")
    conn = TiledConnection(settings)
    conn.connect_in_background()
    try:
        yield conn
    finally:
        conn.close()


def test_the_key_is_in_no_log_file_command_line_or_environment(connection, tmp_path):
    client = connection.client()  # waits for the server
    server = connection._server
    assert server is not None and server.pid is not None
    client.write_array(np.arange(4), key="a", metadata={"note": "written"})
    _requests_carrying_the_key(server.base_url)
    assert client["a"].read().tolist() == [0, 1, 2, 3]
    pid = server.pid
    assert KEY.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert KEY.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    connection.close()  # logs flushed

    directory = tmp_path / "data" / "tiled"
    logs = sorted(directory.glob("*.log"))
    assert {p.name for p in logs} >= {"access.log", "error.log", "server.log"}
    access = (directory / "access.log").read_text()
    assert "/api/v1/metadata/nosuchnode" in access  # the requests were logged ...
    for path in logs:
        text = path.read_text(errors="replace")
        assert KEY not in text, f"{path.name} holds the API key"  # ... without the key
        assert quote(KEY) not in text


def test_the_log_files_are_readable_by_their_owner_only(connection, tmp_path):
    connection.client()
    connection.close()
    directory = tmp_path / "data" / "tiled"
    for path in [directory, *directory.glob("*.log")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path.name} is {oct(mode)}"


def test_a_key_in_a_remote_uri_never_travels_in_a_url(tmp_path, monkeypatch, caplog):
    """``LIVEPTYCHO_TILED_URI=...?api_key=...``: httpx's INFO line for each request showed it."""
    import logging

    from hxn_liveptycho.store.server import EmbeddedTiledServer, redact, split_api_key

    for name in list(os.environ):
        if name.startswith("LIVEPTYCHO_"):
            monkeypatch.delenv(name)
    with EmbeddedTiledServer(tmp_path / "remote", api_key=KEY) as remote:
        assert KEY in remote.uri
        conn = TiledConnection(Settings(tiled_uri=remote.uri, data_dir=tmp_path / "data"))
        try:
            with caplog.at_level(logging.DEBUG):
                client = conn.client()
                client.write_array(np.arange(3), key="b")
                assert client["b"].read().tolist() == [0, 1, 2]
                assert conn.reachable()
            assert conn.describe()["uri"] == redact(remote.uri)
        finally:
            conn.close()
    assert "HTTP Request" in caplog.text  # httpx logged the requests ...
    assert KEY not in caplog.text  # ... without the key
    assert KEY not in (tmp_path / "remote" / "access.log").read_text()
    assert split_api_key("http://h/api/v1?x=1&API_KEY=k") == ("http://h/api/v1?x=1", "k")
    assert split_api_key("http://h/api/v1") == ("http://h/api/v1", None)
    assert redact("http://h/?Token=t&api_key=&x=1") == "http://h/?Token=***&api_key=***&x=1"


def test_what_bypasses_logging_in_the_tiled_child_is_redacted_too():
    """Warnings and thread tracebacks go to stderr (server.log) without a logging filter."""
    import io
    import logging
    import warnings

    from hxn_liveptycho.store.server_process import RedactApiKey, RedactingStream

    redact = RedactApiKey(secrets=(KEY,))
    out = io.StringIO()
    stream = RedactingStream(out, redact)
    stream.write(f"GET /x?api_key={KEY[:10]}")
    stream.write(f"{KEY[10:]} and {quote(KEY)}\nnext {KEY}")
    stream.flush()
    stream.write(warnings.formatwarning(f"no http://h/?t={KEY}", UserWarning, "f.py", 1))
    stream.flush()
    assert KEY not in out.getvalue() and out.getvalue().count("***") == 4
    record = logging.LogRecord("t", logging.ERROR, "f", 1, "key %s in %r", (KEY, {"k": KEY}), None)
    redact.filter(record)
    assert KEY not in record.getMessage()
    try:
        raise RuntimeError(f"failed with {KEY}")
    except RuntimeError:
        import sys

        record = logging.LogRecord("t", logging.ERROR, "f", 1, "boom", None, sys.exc_info())
    redact.filter(record)
    assert KEY not in logging.Formatter().format(record)
