"""The embedded Tiled server: a supervised child process that never outlives its owner."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.store.server import EmbeddedTiledServer, TiledConnection

KEY = "storeserverkey0123456789"


def _gone(pid: int, timeout: float) -> bool:
    """Whether ``pid`` has exited (or is only a zombie) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state == "Z":
            return True
        time.sleep(0.1)
    return False


def _until(condition: Callable[[], Any], timeout: float = 30.0) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.01)
    return True


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # a task that ended while we looked
        return ""


def _server_children(directory: Path) -> list[int]:
    """Our child processes running an embedded Tiled server on ``directory``."""
    found = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in _read(task / "children").split():
            cmdline = _read(Path(f"/proc/{pid}/cmdline")).replace("\0", " ")
            if "server_process" in cmdline and str(directory) in cmdline:
                found.append(int(pid))
    return found


def _files_text(directory: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in directory.glob("*.log"))


def test_embedded_server_runs_in_its_own_process_and_close_leaves_no_child(tmp_path, monkeypatch):
    """Another PID; the key is not on its command line, in its environment, or in its logs."""
    from tiled.client import from_uri

    monkeypatch.setenv("LIVEPTYCHO_TILED_API_KEY", KEY)  # as a profile may set it
    with EmbeddedTiledServer(tmp_path / "tiled", api_key=KEY) as server:
        pid = server.pid
        assert pid is not None and pid != os.getpid()
        assert server.alive() and server.healthy()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
        assert "server_process" in cmdline
        assert KEY not in cmdline
        assert KEY not in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
        client = from_uri(server.uri)  # the key in the URL, as users may pass it
        client.write_array(np.arange(6, dtype=np.int32), key="x")
        assert client["x"].read().tolist() == list(range(6))
    assert not server.alive()
    assert _gone(pid, 1.0), "close() returned with the child still running"
    assert KEY not in _files_text(tmp_path / "tiled")


def test_a_server_started_from_a_short_lived_thread_outlives_that_thread(tmp_path):
    """PR_SET_PDEATHSIG follows the thread that forked: the project's launcher thread forks."""
    box: dict[str, EmbeddedTiledServer] = {}
    starter = threading.Thread(
        target=lambda: box.setdefault("server", EmbeddedTiledServer(tmp_path / "tiled"))
    )
    starter.start()
    starter.join(120)
    server = box["server"]
    try:
        # The kernel signals the children of a thread as that thread's task goes: wait for
        # that moment, not for a time. The child was forked by a thread that lives on.
        tasks = Path(f"/proc/{os.getpid()}/task")
        assert _until(lambda: not (tasks / str(starter.native_id)).exists())
        forkers = [
            int(task.name)
            for task in tasks.iterdir()
            if str(server.pid) in _read(task / "children").split()
        ]
        assert forkers and starter.native_id not in forkers, forkers
        assert server.alive() and server.healthy()
    finally:
        server.close()


OWNER = """
import sys, time
from hxn_liveptycho.store.server import EmbeddedTiledServer
server = EmbeddedTiledServer(sys.argv[1])
print(server.pid, flush=True)
time.sleep(600)
"""


def test_the_child_exits_when_its_owner_is_killed(tmp_path):
    """SIGKILL to the owning process (no finally, no atexit) still ends the server."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(tmp_path / "tiled")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        child = int(owner.stdout.readline())
        assert not _gone(child, 0.5)
    finally:
        owner.kill()
        owner.wait(30)
    assert _gone(child, 15.0), "the embedded server outlived its owner"


def test_a_killed_child_is_seen_and_restarted_on_next_use(tmp_path, caplog):
    """reachable() says it is down; client() brings it back on the same port, data intact."""
    settings = Settings(data_dir=tmp_path, tiled_api_key=KEY)
    connection = TiledConnection(settings)
    try:
        began = time.monotonic()
        connection.connect_in_background()
        assert time.monotonic() - began < 0.5, "the background start blocked the caller"
        assert connection.describe()["server"]["state"] in {"starting", "running"}
        client = connection.client()
        client.write_array(np.arange(4.0), key="kept")
        first = connection.describe()["server"]
        assert first["state"] == "running" and first["pid"] != os.getpid()
        assert connection.reachable()

        os.kill(first["pid"], signal.SIGKILL)
        assert _gone(first["pid"], 10.0)
        with caplog.at_level(logging.WARNING, logger="hxn_liveptycho.store.embedded"):
            assert not connection.reachable()
            again = connection.client()
        second = connection.describe()["server"]
        assert second["state"] == "running"
        assert second["pid"] not in {first["pid"], None}
        assert second["restarts"] == 1
        restarts = [r for r in caplog.records if "restarted it" in r.getMessage()]
        assert len(restarts) == 1
        # Same port and key: the client made before the restart still works.
        assert again is client
        assert client["kept"].read().tolist() == [0.0, 1.0, 2.0, 3.0]
        assert connection.reachable()
        assert KEY not in str(connection.describe())
        assert all(KEY not in r.getMessage() for r in caplog.records)
    finally:
        connection.close()
    assert _gone(second["pid"], 1.0)
    assert connection.describe()["server"]["state"] == "stopped"


def test_close_while_starting_aborts_the_start(tmp_path):
    """An engine closed at once (a profile reloaded) leaves no server starting behind."""
    connection = TiledConnection(Settings(data_dir=tmp_path))
    connection.connect_in_background()
    # Close while the start is under way: once its child is forked (or, on a machine fast
    # enough to win the race, once it is up), not after a time that is usually mid-start.
    assert _until(
        lambda: _server_children(tmp_path) or connection.describe()["server"]["state"] != "starting"
    )
    server = connection._server
    began = time.monotonic()
    connection.close()
    assert time.monotonic() - began < 5.0
    assert server is None or not server.alive()
    with pytest.raises(RuntimeError):
        connection.client()


def test_a_key_tiled_would_refuse_is_a_configuration_error(tmp_path):
    from hxn_liveptycho.errors import ConfigurationError

    with pytest.raises(ConfigurationError):
        TiledConnection(Settings(data_dir=tmp_path, tiled_api_key="not-alnum")).client()


def test_the_embedded_catalog_commits_without_waiting_for_the_disk(tmp_path):
    """The catalog's SQLite connections (aiosqlite's, as Tiled's server makes them) get
    ``synchronous=NORMAL``; other engines' connections are left alone."""
    import asyncio

    from sqlalchemy import event, text
    from sqlalchemy.ext.asyncio import create_async_engine

    from hxn_liveptycho.store.server_process import _commit_without_fsync

    async def synchronous_level() -> int:
        engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'catalog.db'}")
        event.listen(engine.sync_engine, "connect", _commit_without_fsync)
        try:
            async with engine.connect() as connection:
                return (await connection.execute(text("PRAGMA synchronous"))).scalar_one()
        finally:
            await engine.dispose()

    assert asyncio.run(synchronous_level()) == 1  # NORMAL (FULL is 2)
