"""CurveZMQ keys: read in any form users paste, checked once, and never shown.

HXN's Eiger and PandA streams may be encrypted with CurveZMQ. A client (our
receivers) needs three keys, the server's public key and its own key pair;
a server (the simulated or replayed publishers) needs its secret key.
:class:`CurveKeys` carries the client's three as one value from the settings
(:meth:`CurveKeys.from_settings`) to the sockets, so no constructor takes three
loose strings and no ``repr`` or log line can show the secret key.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import zmq
from zmq.utils import z85

from hxn_liveptycho.errors import ConfigurationError

if TYPE_CHECKING:
    from pydantic import SecretStr

__all__ = [
    "CurveKeys",
    "client_options",
    "curve_key",
    "curve_server_options",
]

#: The Z85 alphabet (ZMQ RFC 32): CurveZMQ's printable key form.
_Z85_CHARS = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)


def curve_key(value: str | bytes, field: str) -> bytes:
    """A CurveZMQ key given as Z85 (40 characters) or base64 (44), returned as Z85 bytes.

    A key in any other form is a ConfigurationError that names ``field`` (the key
    itself is never echoed: it may be a secret).
    """
    if isinstance(value, bytes | bytearray):
        try:
            text = bytes(value).decode("ascii")
        except UnicodeDecodeError:
            raise ConfigurationError(
                f"{field}: not a Z85 or base64 CurveZMQ key (non-ASCII bytes)"
            ) from None
    elif isinstance(value, str):
        text = value
    else:
        raise ConfigurationError(
            f"{field}: a CurveZMQ key is a Z85 or base64 string, got {type(value).__name__}"
        )
    text = text.strip()
    raw: bytes | None = None
    if len(text) == 40 and set(text) <= _Z85_CHARS:
        try:
            raw = z85.decode(text.encode("ascii"))
        except Exception:  # a 5-character group above 2**32 does not fit
            raw = None
    elif len(text) == 44:
        for altchars in (b"+/", b"-_"):  # standard or URL-safe alphabet
            try:
                raw = base64.b64decode(text.encode("ascii"), altchars=altchars, validate=True)
                break
            except (binascii.Error, ValueError):
                continue
    if raw is None or len(raw) != 32:
        raise ConfigurationError(
            f"{field}: not a CurveZMQ key; expected 32 bytes as Z85 (40 characters) or "
            f"base64 (44 characters), got {len(text)} characters"
        )
    return z85.encode(raw)


class CurveSettings(Protocol):
    """Where :meth:`CurveKeys.from_settings` reads the keys (``Settings`` has these fields)."""

    @property
    def curve_server_key(self) -> SecretStr | None: ...

    @property
    def curve_public_key(self) -> SecretStr | None: ...

    @property
    def curve_secret_key(self) -> SecretStr | None: ...


@dataclass(frozen=True, repr=False)
class CurveKeys:
    """A CurveZMQ client's keys, as Z85 bytes: the server's public key and its own pair.

    Built from Z85 (40 characters) or base64 (44), text or bytes; a key in any
    other form, or a public key that is not the secret key's other half, is a
    ConfigurationError naming the field and never the key. The ``repr`` shows the
    start of the public keys (to tell configurations apart) and nothing of the secret.
    """

    server_key: bytes
    public_key: bytes
    secret_key: bytes

    def __post_init__(self) -> None:
        for name in ("server_key", "public_key", "secret_key"):
            value: Any = getattr(self, name)
            object.__setattr__(self, name, curve_key(value, f"curve_{name}"))
        if zmq.curve_public(self.secret_key) != self.public_key:
            raise ConfigurationError(
                "curve_public_key is not the public half of curve_secret_key (mismatched key pair)"
            )

    @classmethod
    def from_keys(
        cls,
        curve_server_key: str | bytes | None = None,
        curve_public_key: str | bytes | None = None,
        curve_secret_key: str | bytes | None = None,
    ) -> CurveKeys | None:
        """The keys, or None when none is given; all three or none (HXN's rule).

        A partial set raises ConfigurationError naming exactly the missing keys.
        """
        given = {
            "curve_server_key": curve_server_key,
            "curve_public_key": curve_public_key,
            "curve_secret_key": curve_secret_key,
        }
        missing = [name for name, value in given.items() if not value]
        if len(missing) == len(given):
            return None
        if missing:
            raise ConfigurationError(
                "incomplete CurveZMQ configuration: set all of "
                f"{', '.join(given)} or none; missing: {', '.join(missing)}"
            )
        return cls(curve_server_key, curve_public_key, curve_secret_key)  # type: ignore[arg-type]

    @classmethod
    def from_settings(cls, settings: CurveSettings) -> CurveKeys | None:
        """The keys of ``settings.curve_*`` (``LIVEPTYCHO_CURVE_*``), or None without CurveZMQ."""

        def value(secret: SecretStr | None) -> str | None:
            return secret.get_secret_value() if secret is not None else None

        return cls.from_keys(
            value(settings.curve_server_key),
            value(settings.curve_public_key),
            value(settings.curve_secret_key),
        )

    def socket_options(self) -> dict[int, bytes]:
        """The socket options that make a SUB or PULL socket a CurveZMQ client."""
        return {
            zmq.CURVE_SERVERKEY: self.server_key,
            zmq.CURVE_PUBLICKEY: self.public_key,
            zmq.CURVE_SECRETKEY: self.secret_key,
        }

    def __repr__(self) -> str:
        server, public = (k.decode("ascii")[:5] for k in (self.server_key, self.public_key))
        return f"CurveKeys(server_key='{server}...', public_key='{public}...', secret_key=***)"

    __str__ = __repr__


def client_options(curve: CurveKeys | None) -> dict[int, bytes]:
    """A receiver socket's CurveZMQ client options; no keys give none (a plain socket)."""
    return {} if curve is None else curve.socket_options()


def curve_server_options(secret_key: str | bytes | None) -> dict[int, Any]:
    """Socket options for a CurveZMQ server (a publisher): its secret key, or none for plain."""
    if not secret_key:
        return {}
    return {
        zmq.CURVE_SERVER: 1,
        zmq.CURVE_SECRETKEY: curve_key(secret_key, "curve_secret_key"),
    }
