"""Shared fixtures: a real Tiled server, a real RunEngine, simulated HXN detectors."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

#: tiled's single-user API key is process-wide: every in-process server in the tests shares one.
TILED_API_KEY = "liveptychotestkey0123"


@pytest.fixture(scope="session")
def tiled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One real Tiled server (SQLite + files) for the whole session: it takes seconds to start."""
    from tiled.server import SimpleTiledServer

    server = SimpleTiledServer(directory=tmp_path_factory.mktemp("tiled"), api_key=TILED_API_KEY)
    yield server
    server.close()


@pytest.fixture
def RE() -> Iterator[Any]:
    """A RunEngine that is halted and joined at teardown, as bluesky's own tests do."""
    from bluesky import RunEngine

    engine = RunEngine({}, call_returns_result=True)
    yield engine
    if engine.state != "idle":
        engine.halt()
    engine.loop.call_soon_threadsafe(engine.loop.stop)
    engine._th.join(timeout=10)
    engine.loop.close()


@pytest.fixture
def hxn_detectors() -> Iterator[tuple[Any, Any]]:
    """A simulated Eiger and PandA publishing on random localhost ports."""
    from hxn_liveptycho.sim import SimEiger, SimPanda

    eiger = SimEiger()
    panda = SimPanda()
    yield eiger, panda
    eiger.close()
    panda.close()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves one of our threads running (receivers, sessions, writers)."""
    before = set(threading.enumerate())
    yield
    leaked = [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and t.name.startswith(("liveptycho", "sim-hxn"))
    ]
    for thread in leaked:
        thread.join(timeout=5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"threads left running: {still}"
