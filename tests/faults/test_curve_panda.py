"""CurveZMQ on the PandA socket, as on the Eiger's (issue 23: with all keys set it was plain)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq
from waiting import wait_for

from hxn_liveptycho.streams import PandaPublisher, PandaReceiver
from hxn_liveptycho.streams.curve import CurveKeys

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CurveZMQ")


@pytest.fixture(autouse=True)
def no_leaked_receiver_threads() -> Iterator[None]:
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.endswith("-receiver")]
    assert not leaked, f"receiver threads left running: {leaked}"


class _Got:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def receiver(self, endpoint: str, **keys: str) -> PandaReceiver:
        """A receiver with the client keys given as the ``curve_*`` settings are."""
        return PandaReceiver(
            endpoint,
            on_start=lambda m: self.events.append(("start", m)),
            on_samples=lambda d, s: self.events.append(("samples", (d, s))),
            on_stop=lambda m: self.events.append(("stop", m)),
            curve=CurveKeys.from_keys(**keys),
        )


def _keys() -> tuple[dict[str, str], str]:
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    client = {
        "curve_server_key": server_public.decode(),
        "curve_public_key": client_public.decode(),
        "curve_secret_key": client_secret.decode(),
    }
    return client, server_secret.decode()


def _send_scan(publisher: PandaPublisher) -> None:
    publisher.start()
    publisher.send_samples({"x": np.arange(4.0), "y": np.ones(4)}, frame_number=0)
    publisher.stop()


def test_panda_round_trip_over_curve() -> None:
    client, server_secret = _keys()
    publisher = PandaPublisher("tcp://127.0.0.1:*", curve_secret_key=server_secret)
    got = _Got()
    receiver = got.receiver(publisher.endpoint, **client)
    try:
        assert publisher.curve_public_key == client["curve_server_key"]
        receiver.start()
        assert publisher.wait_for_subscribers(1, timeout=5.0)
        _send_scan(publisher)
        wait_for(lambda: len(got.events) >= 3, timeout=5, what=lambda: f"events {got.events}")
        assert [kind for kind, _ in got.events] == ["start", "samples", "stop"]
        assert got.events[1][1][0]["x"].tolist() == [0.0, 1.0, 2.0, 3.0]
    finally:
        assert receiver.stop(timeout=5.0)
        publisher.close(linger=0)


def test_a_curve_panda_receiver_refuses_a_plain_publisher() -> None:
    """Nothing reaches the Curve receiver: judged once a plain receiver on the same
    publisher has had the whole scan (what the first would have had by then, it would)."""
    client, _ = _keys()
    publisher = PandaPublisher("tcp://127.0.0.1:*")  # plain: an impostor on the network
    got, witness = _Got(), _Got()
    receiver, control = got.receiver(publisher.endpoint, **client), None
    try:
        receiver.start()
        assert not publisher.wait_for_subscribers(1, timeout=0.5)
        control = witness.receiver(publisher.endpoint)
        control.start()
        assert publisher.wait_for_subscribers(1, timeout=5.0)  # the plain one alone
        _send_scan(publisher)
        wait_for(lambda: len(witness.events) >= 3, timeout=5, what="the plain receiver's scan")
        assert [kind for kind, _ in witness.events] == ["start", "samples", "stop"]
        assert receiver.counters.get("messages") == 0 and got.events == []
    finally:
        assert receiver.stop(timeout=5.0)
        assert control is None or control.stop(timeout=5.0)
        publisher.close(linger=0)


def _engine_receivers(settings: Any) -> list[Any]:
    """The receivers Engine._start_receivers makes, without the rest of an engine."""
    from hxn_liveptycho.pipeline.engine import Engine

    engine = Engine.__new__(Engine)
    engine.settings = settings
    engine._receivers = []
    engine._start_receivers()
    return engine._receivers


def test_the_engine_gives_the_panda_socket_the_curve_keys(monkeypatch) -> None:
    from hxn_liveptycho.config.settings import Settings

    client, _ = _keys()
    for name in list(__import__("os").environ):
        if name.startswith("LIVEPTYCHO_"):
            monkeypatch.delenv(name)
    settings = Settings(panda_endpoint="tcp://127.0.0.1:9", **client)
    receivers = _engine_receivers(settings)
    try:
        (panda,) = [r for r in receivers if isinstance(r, PandaReceiver)]
        sock = panda._socket
        assert sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
    finally:
        for receiver in receivers:
            receiver.stop(timeout=1.0)
