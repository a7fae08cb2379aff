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


@pytest.fixture
def no_leaked_receiver_threads() -> Iterator[None]:
    """Every stream test must stop the receivers it started."""
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.endswith("-receiver")]
    assert leaked == []


@pytest.fixture
def collector() -> Any:
    """Records the receiver callbacks of one test."""
    from eiger_helpers import Collector

    return Collector()


@pytest.fixture
def raw_push() -> Iterator[tuple[Any, str]]:
    """A bare ZMQ PUSH socket, as a detector's stream interface is, on a random port."""
    import zmq

    sock = zmq.Context.instance().socket(zmq.PUSH)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close(linger=0)


@pytest.fixture
def pull_receiver(collector: Any, raw_push: tuple[Any, str]) -> Iterator[Any]:
    """An EigerReceiver (flavour auto-detected) PULLing from the bare PUSH socket."""
    from hxn_liveptycho.streams import EigerReceiver

    receiver = EigerReceiver(
        raw_push[1],
        on_series_start=collector.on_series_start,
        on_frame=collector.on_frame,
        on_series_end=collector.on_series_end,
        socket_type="pull",
    )
    receiver.start()
    yield receiver
    assert receiver.stop(timeout=5.0)
