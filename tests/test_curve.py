"""CurveZMQ on the Eiger stream: a real encrypted round trip, wrong keys, clear config errors."""

from __future__ import annotations

import base64
import time
from typing import Any

import numpy as np
import pytest
import zmq
from eiger_helpers import Collector, wait_until
from zmq.utils import z85

from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.streams import EigerPublisher, EigerReceiver
from hxn_liveptycho.streams.curve import CurveKeys, curve_key

pytestmark = [
    pytest.mark.skipif(not zmq.has("curve"), reason="libzmq built without CurveZMQ"),
    pytest.mark.usefixtures("no_leaked_receiver_threads"),
]

KEY_NAMES = ("curve_server_key", "curve_public_key", "curve_secret_key")


def as_base64(key: bytes) -> str:
    """A Z85 key re-written in base64 (44 characters), the other form users paste."""
    return base64.b64encode(z85.decode(key)).decode("ascii")


def _receiver(
    endpoint: str, collector: Collector, socket_type: str, **keys: str | bytes
) -> EigerReceiver:
    """A receiver with the client keys given as the ``curve_*`` settings are (all or none)."""
    return EigerReceiver(
        endpoint,
        on_series_start=collector.on_series_start,
        on_frame=collector.on_frame,
        on_series_end=collector.on_series_end,
        socket_type=socket_type,  # type: ignore[arg-type]
        curve=CurveKeys.from_keys(**keys),
    )


@pytest.mark.parametrize("key_form", ["z85", "base64"])
@pytest.mark.parametrize(("out", "into", "flavour"), [("pub", "sub", "v2"), ("push", "pull", "v1")])
def test_curve_round_trip(
    collector: Collector, out: str, into: str, flavour: str, key_form: str
) -> None:
    """A Curve server publisher and a Curve client receiver exchange a series bit for bit."""
    server_public, server_secret = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    form = (lambda k: k.decode("ascii")) if key_form == "z85" else as_base64
    publisher = EigerPublisher(
        "tcp://127.0.0.1:*",
        socket_type=out,  # type: ignore[arg-type]
        flavour=flavour,  # type: ignore[arg-type]
        curve_secret_key=form(server_secret),
    )
    receiver = _receiver(
        publisher.endpoint,
        collector,
        into,
        curve_server_key=form(server_public),
        curve_public_key=form(client_public),
        curve_secret_key=form(client_secret),
    )
    try:
        assert publisher.curve_public_key == server_public.decode("ascii")
        receiver.start()
        assert publisher.wait_for_subscribers(1, timeout=5.0)
        frames = [
            np.random.default_rng(s).poisson(2.0, (32, 48)).astype(np.uint32) for s in range(3)
        ]
        publisher.start_series(1, shape=(32, 48), dtype="uint32")
        for index, frame in enumerate(frames):
            publisher.send_frame(1, index, frame)
        publisher.end_series(1)
        assert wait_until(lambda: collector.of("end") == [1])
        got = collector.of("frame")
        assert [f.frame for f in got] == [0, 1, 2]
        assert all(np.array_equal(g.data, f) for g, f in zip(got, frames, strict=True))
        assert receiver.counters.get("malformed") == 0
    finally:
        assert receiver.stop(timeout=5.0)
        publisher.close(linger=0)


@pytest.mark.parametrize("client_keys", ["wrong-server-key", "no-keys"])
def test_receiver_without_the_right_server_key_gets_nothing_and_stops(
    collector: Collector, client_keys: str
) -> None:
    """A wrong server key (or none) fails the handshake: nothing arrives, and stop is quick.

    "Nothing arrives" is judged once a receiver with the right keys, on the same publisher,
    has had the whole series: what the first receiver would have had by then, it would have
    had."""
    server_public, server_secret = zmq.curve_keypair()
    impostor_public, _ = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    keys = (
        {
            "curve_server_key": impostor_public.decode(),
            "curve_public_key": client_public.decode(),
            "curve_secret_key": client_secret.decode(),
        }
        if client_keys == "wrong-server-key"
        else {}
    )
    publisher = EigerPublisher(
        "tcp://127.0.0.1:*", socket_type="pub", flavour="v2", curve_secret_key=server_secret
    )
    receiver = _receiver(publisher.endpoint, collector, "sub", **keys)
    witness, control = Collector(), None
    try:
        receiver.start()
        assert not publisher.wait_for_subscribers(1, timeout=0.5)
        control = _receiver(
            publisher.endpoint,
            witness,
            "sub",
            curve_server_key=server_public,
            curve_public_key=client_public,
            curve_secret_key=client_secret,
        )
        control.start()
        assert publisher.wait_for_subscribers(1, timeout=5.0)  # the control alone
        publisher.start_series(1, shape=(8, 8), dtype="uint16")
        publisher.send_frame(1, 0, np.ones((8, 8), np.uint16))
        publisher.end_series(1)
        assert wait_until(lambda: witness.of("end") == [1])
        assert len(witness.of("frame")) == 1
        assert receiver.counters.get("messages") == 0
        assert collector.events == []
    finally:
        started = time.monotonic()
        assert receiver.stop(timeout=5.0)
        assert time.monotonic() - started < 1.0
        assert control is None or control.stop(timeout=5.0)
        publisher.close(linger=0)


@pytest.mark.parametrize(
    "given",
    [(0,), (1,), (2,), (0, 1), (0, 2), (1, 2)],
    ids=lambda g: "+".join(KEY_NAMES[i] for i in g),
)
def test_partial_curve_configuration_names_exactly_what_is_missing(
    collector: Collector, given: tuple[int, ...]
) -> None:
    """All three client keys or none: a partial set names each missing key, and only those."""
    public, secret = zmq.curve_keypair()
    values = {"curve_server_key": public, "curve_public_key": public, "curve_secret_key": secret}
    keys = {KEY_NAMES[i]: values[KEY_NAMES[i]].decode() for i in given}
    missing = [name for name in KEY_NAMES if name not in keys]
    with pytest.raises(ConfigurationError) as info:
        _receiver("tcp://127.0.0.1:1", collector, "sub", **keys)
    assert str(info.value).endswith("missing: " + ", ".join(missing))


def _bad_keys() -> list[tuple[str, object]]:
    public, _ = zmq.curve_keypair()
    text = public.decode()
    return [
        ("short", text[:39]),
        ("z85-bad-character", text[:39] + '"'),
        ("z85-overflow", "%" * 40),
        ("base64-invalid", "*" * 44),
        ("base64-31-bytes", base64.b64encode(b"\x01" * 31).decode()),
        ("hex-64", "ab" * 32),
        ("not-text", 12345),
    ]


@pytest.mark.parametrize("field", KEY_NAMES)
@pytest.mark.parametrize(("case", "bad"), _bad_keys(), ids=[c for c, _ in _bad_keys()])
def test_wrong_key_format_names_the_field(
    collector: Collector, field: str, case: str, bad: object
) -> None:
    """A key that is neither Z85 (40) nor base64 (44) of 32 bytes is refused by field name."""
    server_public, _ = zmq.curve_keypair()
    client_public, client_secret = zmq.curve_keypair()
    keys: dict[str, Any] = {
        "curve_server_key": server_public.decode(),
        "curve_public_key": client_public.decode(),
        "curve_secret_key": client_secret.decode(),
    }
    keys[field] = bad
    with pytest.raises(ConfigurationError, match=rf"^{field}: ") as info:
        _receiver("tcp://127.0.0.1:1", collector, "sub", **keys)
    assert str(bad) not in str(info.value)  # a secret is never echoed into logs


def test_mismatched_client_key_pair_is_refused(collector: Collector) -> None:
    """A public key that is not the secret key's other half fails at construction, not silently."""
    server_public, _ = zmq.curve_keypair()
    client_public, _ = zmq.curve_keypair()
    _, other_secret = zmq.curve_keypair()
    with pytest.raises(ConfigurationError, match="not the public half of curve_secret_key"):
        _receiver(
            "tcp://127.0.0.1:1",
            collector,
            "sub",
            curve_server_key=server_public,
            curve_public_key=client_public,
            curve_secret_key=other_secret,
        )


def test_publisher_refuses_a_malformed_secret_key() -> None:
    """The publisher names curve_secret_key when its server key is not a CurveZMQ key."""
    with pytest.raises(ConfigurationError, match=r"^curve_secret_key: "):
        EigerPublisher("tcp://127.0.0.1:*", curve_secret_key="not-a-key")


def test_key_forms_normalise_to_the_same_z85_key() -> None:
    """Z85 text, Z85 bytes, standard and URL-safe base64 all give the same key."""
    public, _ = zmq.curve_keypair()
    raw = z85.decode(public)
    forms = [
        public,
        public.decode(),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
        " " + public.decode() + "\n",
    ]
    assert {curve_key(form, "curve_server_key") for form in forms} == {public}
