"""CurveKeys: the client's three CurveZMQ keys as one checked value that never shows its secret."""

from __future__ import annotations

import base64
import logging
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import zmq
from zmq.utils import z85

from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.streams import CurveKeys, PandaPublisher, PandaReceiver

pytestmark = pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CurveZMQ")


@pytest.fixture(autouse=True)
def no_leaked_receiver_threads() -> Iterator[None]:
    yield
    leaked = [t.name for t in threading.enumerate() if t.name.endswith("-receiver")]
    assert not leaked, f"receiver threads left running: {leaked}"


@pytest.fixture
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No LIVEPTYCHO_* variable of the caller's shell reaches the Settings made here."""
    import os

    for name in list(os.environ):
        if name.startswith("LIVEPTYCHO_"):
            monkeypatch.delenv(name)


def client_keys() -> tuple[dict[str, str], str]:
    """A client's three keys (by their settings names) and the server's secret key."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    keys = {
        "curve_server_key": server_public.decode(),
        "curve_public_key": client_public.decode(),
        "curve_secret_key": client_secret.decode(),
    }
    return keys, server_secret.decode()


def test_the_repr_shows_the_public_keys_start_and_nothing_of_the_secret(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """repr, str, f-strings and a log line name the keys without the secret key."""
    keys, _ = client_keys()
    curve = CurveKeys.from_keys(**keys)
    assert curve is not None
    with caplog.at_level(logging.INFO):
        logging.getLogger("hxn_liveptycho.test").info("keys: %s %r", curve, curve)
    for shown in (repr(curve), str(curve), f"{curve}", caplog.text):
        assert keys["curve_secret_key"] not in shown
        assert "secret_key=***" in shown
    assert repr(curve).startswith(f"CurveKeys(server_key='{keys['curve_server_key'][:5]}...'")


def test_every_key_form_gives_the_same_value() -> None:
    """Z85 text or bytes and base64 of the same keys make equal CurveKeys, held as Z85 bytes."""
    keys, _ = client_keys()
    as_base64 = {k: base64.b64encode(z85.decode(v.encode())).decode() for k, v in keys.items()}
    as_bytes = {k: v.encode() for k, v in keys.items()}
    values = {CurveKeys.from_keys(**forms) for forms in (keys, as_base64, as_bytes)}
    assert len(values) == 1
    (curve,) = values
    assert curve is not None and curve.secret_key == keys["curve_secret_key"].encode()
    assert (curve.server_key, curve.public_key, curve.secret_key) == tuple(as_bytes.values())


def test_no_keys_is_none_and_a_partial_set_names_what_is_missing() -> None:
    """All three keys or none, as HXN configures CurveZMQ."""
    keys, _ = client_keys()
    assert CurveKeys.from_keys() is None
    with pytest.raises(ConfigurationError, match=r"missing: curve_public_key$") as info:
        CurveKeys.from_keys(keys["curve_server_key"], None, keys["curve_secret_key"])
    assert keys["curve_secret_key"] not in str(info.value)


def test_a_mismatched_pair_and_a_malformed_key_are_refused_by_name() -> None:
    """The public key must be the secret key's other half; a bad key never echoes itself."""
    keys, _ = client_keys()
    _, other_secret = zmq.curve_keypair()
    with pytest.raises(ConfigurationError, match="not the public half of curve_secret_key"):
        CurveKeys.from_keys(**{**keys, "curve_secret_key": other_secret.decode()})
    with pytest.raises(ConfigurationError, match=r"^curve_secret_key: ") as info:
        CurveKeys(
            keys["curve_server_key"].encode(),
            keys["curve_public_key"].encode(),
            b"not-a-key-but-secret",
        )
    assert "not-a-key-but-secret" not in str(info.value)


@pytest.mark.usefixtures("clean_environment")
def test_from_settings_reads_the_curve_fields() -> None:
    """Settings' curve_* fields (LIVEPTYCHO_CURVE_*) give the keys; without them, None."""
    keys, _ = client_keys()
    assert CurveKeys.from_settings(Settings(**keys)) == CurveKeys.from_keys(**keys)
    assert CurveKeys.from_settings(Settings()) is None
    with pytest.raises(ConfigurationError, match=r"missing: curve_server_key, curve_public_key$"):
        CurveKeys.from_settings(Settings(curve_secret_key=keys["curve_secret_key"]))


def test_a_panda_receiver_with_curve_keys_gets_a_scan_over_curve() -> None:
    """PandaReceiver(curve=CurveKeys) is a CurveZMQ client of a Curve publisher."""
    keys, server_secret = client_keys()
    publisher = PandaPublisher("tcp://127.0.0.1:*", curve_secret_key=server_secret)
    events: list[tuple[str, Any]] = []
    stopped = threading.Event()

    def on_stop(message: dict) -> None:
        events.append(("stop", message))
        stopped.set()

    receiver = PandaReceiver(
        publisher.endpoint,
        on_start=lambda m: events.append(("start", m)),
        on_samples=lambda d, s: events.append(("samples", d)),
        on_stop=on_stop,
        curve=CurveKeys.from_keys(**keys),
    )
    try:
        sock = receiver._socket
        assert sock is not None and sock.getsockopt(zmq.MECHANISM) == zmq.CURVE
        receiver.start()
        assert publisher.wait_for_subscribers(1, timeout=5.0)
        publisher.start()
        publisher.send_samples({"x": np.arange(3.0)}, frame_number=0)
        publisher.stop()
        assert stopped.wait(5.0), f"no stop message; events {events}"
        assert [kind for kind, _ in events] == ["start", "samples", "stop"]
        assert events[1][1]["x"].tolist() == [0.0, 1.0, 2.0]
    finally:
        assert receiver.stop(timeout=5.0)
        publisher.close(linger=0)
