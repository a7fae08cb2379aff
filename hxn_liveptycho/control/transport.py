"""Document transport: how `liveptycho serve` receives the RunEngine's documents.

Serve depends only on :class:`DocumentSource` (start with a deliver callback,
stop, describe, counters). :class:`ZmqDocumentSource` is bluesky's own 0MQ
path: a ``bluesky.callbacks.zmq.Publisher`` subscribed to the RunEngine, a
0MQ proxy (``bluesky-0MQ-proxy``, or the bounded one serve starts itself), and
here a reader of bluesky's wire format that does what ``RemoteDispatcher``
does without dying on a bad message. A Kafka source (``bluesky_kafka.RemoteDispatcher``,
as NSLS-II's document pipeline runs it) fits the same protocol: its dispatcher
also calls subscribers with ``(name, doc)`` and runs a blocking poll loop.

bluesky's Publisher pickles documents. Unpickling network input can run code
or allocate without bound, so documents are read with a restricted unpickler
that builds only plain containers and NumPy arrays whose data is in the
message; only the document names bluesky sends are accepted, and messages are
bounded in size. Anything else is counted as rejected and logged in one line,
and the documents around it are delivered in order.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pickle
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
import zmq

from hxn_liveptycho.util.counters import Counters

logger = logging.getLogger(__name__)

Deliver = Callable[[str, dict[str, Any]], None]

#: The document names bluesky's Publisher sends (``event-model``'s DocumentNames);
#: a message with any other name is refused before its payload is looked at.
DOCUMENT_NAMES = frozenset(
    {
        "start",
        "descriptor",
        "event",
        "event_page",
        "datum",
        "datum_page",
        "resource",
        "stream_resource",
        "stream_datum",
        "stop",
    }
)

#: The largest message accepted (ZMQ's MAXMSGSIZE): bigger ones are refused by
#: ZMQ before it allocates them. Documents are small; frames travel elsewhere.
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024

#: Containers deeper than this are refused (bluesky documents nest a few levels).
MAX_DEPTH = 64


class DocumentRejected(pickle.UnpicklingError):
    """A message that is not a plain bluesky document; it is dropped, counted and logged."""


def _shape_size(shape: Any) -> int:
    if not isinstance(shape, tuple) or not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape
    ):
        raise DocumentRejected(f"array shape {shape!r} is not a tuple of sizes")
    size = 1
    for n in shape:
        size *= n
    return size


def _plain_dtype(dtype: Any) -> np.dtype:
    if not isinstance(dtype, np.dtype):
        raise DocumentRejected(f"array dtype {type(dtype).__name__} is not a numpy dtype")
    if dtype.hasobject:
        raise DocumentRejected("arrays of Python objects are not allowed in a document")
    return dtype


def _array_from(data: Any, dtype: Any, shape: Any, order: Any = "C") -> np.ndarray:
    """An array over bytes that are already in the message: never a larger allocation."""
    dtype = _plain_dtype(dtype)
    if isinstance(data, pickle.PickleBuffer):
        data = data.raw()
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DocumentRejected(f"array data is {type(data).__name__}, not bytes")
    nbytes = _shape_size(shape) * dtype.itemsize
    if len(data) != nbytes:
        raise DocumentRejected(f"array data is {len(data)} bytes, its shape needs {nbytes}")
    if order not in ("C", "F"):
        raise DocumentRejected(f"array order {order!r}")
    return np.frombuffer(data, dtype=dtype).reshape(shape, order=order).copy(order="K")


class _NdarrayType:
    """What ``numpy.ndarray`` unpickles to: a marker, never the (allocating) type."""


class _PendingArray:
    """``_reconstruct(ndarray, (0,), b'b')``; the array is made when its state arrives.

    numpy's own ``ndarray.__setstate__`` allocates the declared shape before it
    checks the data, and crashes on object arrays with short data; this one
    checks first. :func:`_plain` replaces it by the array.
    """

    array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise DocumentRejected("array state is not (version, shape, dtype, fortran, data)")
        _version, shape, dtype, fortran, data = state
        self.array = _array_from(data, dtype, shape, "F" if fortran else "C")


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> _PendingArray:
    if subtype is not _NdarrayType or shape != (0,):
        raise DocumentRejected("only numpy's own array pickles are allowed")
    return _PendingArray()


def _frombuffer(buffer: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    return _array_from(buffer, dtype, shape, order)


def _scalar(dtype: Any, data: Any = None) -> Any:
    dtype = _plain_dtype(dtype)
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise DocumentRejected(f"numpy {dtype} scalar with {type(data).__name__} data")
    return np.frombuffer(data, dtype=dtype)[0]


def _dtype(spec: Any, align: Any = False, copy: Any = False) -> np.dtype:
    if not isinstance(spec, str) or len(spec) > 16:
        raise DocumentRejected(f"numpy dtype from {type(spec).__name__}")
    return np.dtype(spec, align=bool(align), copy=bool(copy))


def _bytearray(data: Any = b"") -> bytearray:
    if not isinstance(data, bytes | bytearray):  # bytearray(n) would allocate n bytes
        raise DocumentRejected(f"bytearray from {type(data).__name__}")
    return bytearray(data)


def _complex(real: Any = 0.0, imag: Any = 0.0) -> complex:
    if not all(isinstance(v, int | float) for v in (real, imag)):
        raise DocumentRejected("complex from non-numbers")
    return complex(real, imag)


#: Globals a pickled bluesky document may refer to, each a checking stand-in.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): _NdarrayType,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "complex"): _complex,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): _bytearray,
}


class _DocumentUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _ALLOWED_GLOBALS.get((module, name))
        if found is None:
            raise DocumentRejected(f"{module}.{name} is not allowed in a document")
        return found


def _plain(value: Any, budget: int) -> Any:
    """A fresh tree of ``value`` with pending arrays filled in; refuses cycles and bombs.

    Shared references (pickle's memo) could make a message of a few hundred bytes
    a tree of billions of nodes for whoever walks it later; at most ``budget``
    nodes are visited, at most :data:`MAX_DEPTH` deep.
    """
    remaining = budget

    def walk(obj: Any, depth: int) -> Any:
        nonlocal remaining
        remaining -= 1
        if remaining < 0:
            raise DocumentRejected(f"more than {budget} values (shared references or a cycle)")
        if depth > MAX_DEPTH:
            raise DocumentRejected(f"nested deeper than {MAX_DEPTH}")
        if isinstance(obj, _PendingArray):
            if obj.array is None:
                raise DocumentRejected("array without its data")
            return obj.array
        if isinstance(obj, dict):
            out = {walk(k, depth + 1): walk(v, depth + 1) for k, v in obj.items()}
            return OrderedDict(out) if isinstance(obj, OrderedDict) else out
        if isinstance(obj, list | tuple | set | frozenset):
            return type(obj)(walk(item, depth + 1) for item in obj)
        if obj is None or isinstance(
            obj, str | bytes | bytearray | bool | int | float | complex | np.ndarray | np.generic
        ):
            return obj
        raise DocumentRejected(f"{type(obj).__name__} is not allowed in a document")

    return walk(value, 0)


def load_document(payload: bytes) -> Any:
    """Unpickle one document, refusing anything but plain data and NumPy arrays.

    Nothing a message asks for is allocated beyond a small multiple of its own
    size: array data must be present in the message, ``bytearray(n)`` and
    object arrays are refused, and the result is walked with a node budget.
    Every refusal is a :class:`DocumentRejected` (a ``pickle.UnpicklingError``).
    """
    try:
        loaded = _DocumentUnpickler(io.BytesIO(payload)).load()
    except DocumentRejected:
        raise
    except (Exception, RecursionError) as exc:
        raise DocumentRejected(f"not a pickle ({type(exc).__name__}: {exc})") from None
    try:
        return _plain(loaded, budget=10_000 + 2 * len(payload))
    except DocumentRejected:
        raise
    except (Exception, RecursionError) as exc:  # an array as a dict key or set member
        raise DocumentRejected(f"not plain data ({type(exc).__name__}: {exc})") from None


class DocumentSource(Protocol):
    """What serve needs from a transport; one instance feeds one serve process."""

    counters: Counters

    def start(self, deliver: Deliver) -> None:
        """Begin delivering ``(name, doc)`` to ``deliver`` from a thread of the source's own."""
        ...

    def stop(self, timeout: float = 5.0) -> None: ...

    def describe(self) -> dict[str, Any]: ...


#: Environment variables a child process that is not ours to configure never gets.
SECRET_ENV_PREFIXES = ("LIVEPTYCHO_", "TILED_")


def child_environment() -> dict[str, str]:
    """This process's environment without ``LIVEPTYCHO_*`` and ``TILED_*`` (API keys, tokens)."""
    return {k: v for k, v in os.environ.items() if not k.startswith(SECRET_ENV_PREFIXES)}


class ProxyProcess:
    """A 0MQ proxy for bluesky's documents as a child process of serve.

    The same forwarder as ``bluesky-0MQ-proxy`` (a SUB bound where RunEngines'
    Publishers connect, a PUB bound where subscribers connect), with the
    incoming message size bounded by ZMQ's ``MAXMSGSIZE``: a publisher that
    announces a larger message is disconnected before anything is allocated
    for it. A child process, not a thread: the forwarder blocks in
    ``zmq.proxy`` and cannot be interrupted cleanly from another thread, while
    a process ends on SIGTERM. It gets none of serve's ``LIVEPTYCHO_*`` or
    ``TILED_*`` environment variables (tokens, API keys).
    """

    def __init__(
        self,
        in_address: str,
        out_address: str,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.in_address = in_address
        self.out_address = out_address
        self.max_message_bytes = max_message_bytes
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        code = "import sys; from hxn_liveptycho.control.transport import proxy_main; proxy_main()"
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                _normalize_address(self.in_address, bind=True),
                _normalize_address(self.out_address, bind=True),
                str(self.max_message_bytes),
            ],
            env=child_environment(),
        )
        logger.info(
            "0MQ proxy for documents started (pid %d): publishers connect to %s, output on %s",
            self._process.pid,
            self.in_address,
            self.out_address,
        )

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        if self._process is None or self._process.poll() is not None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            logger.warning("0MQ proxy did not stop on SIGTERM; killing it")
            self._process.kill()
            self._process.wait(timeout)


def proxy_main(argv: list[str] | None = None) -> None:
    """The proxy child: ``IN_ADDRESS OUT_ADDRESS MAX_MESSAGE_BYTES``; runs until SIGTERM."""
    import signal

    in_address, out_address, limit = (sys.argv[1:] if argv is None else argv)[:3]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    context = zmq.Context()
    frontend = context.socket(zmq.SUB)
    frontend.setsockopt(zmq.MAXMSGSIZE, int(limit))
    frontend.setsockopt(zmq.RCVHWM, 0)
    frontend.setsockopt(zmq.SUBSCRIBE, b"")
    frontend.bind(in_address)
    backend = context.socket(zmq.PUB)
    backend.setsockopt(zmq.SNDHWM, 0)
    backend.bind(out_address)
    try:
        zmq.proxy(frontend, backend)
    finally:
        frontend.close(linger=0)
        backend.close(linger=0)
        context.term()


class ZmqDocumentSource:
    """Documents from a bluesky 0MQ proxy, read as ``bluesky.callbacks.zmq.RemoteDispatcher`` does.

    The wire format is bluesky's (``prefix b" " name b" " pickle``), read by one
    thread of our own rather than by a RemoteDispatcher: bluesky's dispatcher
    dies on a document name it does not know, and every document sent while it
    was restarted was lost. Here each message is checked in turn and delivered
    in order from that one thread:

    - ZMQ refuses a message over ``max_message_bytes`` (``MAXMSGSIZE``) before
      allocating it; it then drops the connection, and this source connects
      again at once (counted as ``disconnects`` and logged; documents the proxy
      sends in that moment are lost, as on any reconnection);
    - a name outside :data:`DOCUMENT_NAMES`, a payload that is not a plain
      document (see :func:`load_document`), or one that is not a dict is
      counted as ``rejected`` and logged in one line; the documents before and
      after it are delivered as usual.
    """

    def __init__(
        self,
        address: str,
        *,
        prefix: str = "",
        proxy_in_address: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        context: zmq.Context | None = None,
    ) -> None:
        if b" " in prefix.encode():
            raise ValueError(f"prefix {prefix!r} may not contain a space")
        if max_message_bytes <= 0:
            raise ValueError(f"max_message_bytes must be positive, got {max_message_bytes}")
        self.address = _normalize_address(address)
        self.prefix = prefix.encode()
        self.max_message_bytes = max_message_bytes
        self.proxy = (
            ProxyProcess(proxy_in_address, self.address, max_message_bytes=max_message_bytes)
            if proxy_in_address
            else None
        )
        self.counters = Counters(["documents", "rejected", "disconnects"])
        self._context = context if context is not None else zmq.Context.instance()
        self._deliver: Deliver | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveptycho-documents", daemon=True)

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        if self.proxy is not None:
            self.proxy.start()
        self._thread.start()

    def _reject(self, message: bytes, name: bytes, reason: str) -> None:
        self.counters.add("rejected")  # only this thread adds to it
        rejected = self.counters.get("rejected")
        if rejected <= _LOGGED_REJECTIONS or rejected % 1000 == 0:
            logger.warning(
                "document message rejected (#%d, %d bytes, name %s): %s",
                rejected,
                len(message),
                ascii(name[:40]),
                reason,
            )

    def handle_message(self, message: bytes) -> None:
        """Check one message and deliver its document; a bad one is counted and logged."""
        prefix, _, rest = message.partition(b" ")
        name, sep, payload = rest.partition(b" ")
        if not sep:
            self._reject(message, b"", "not 'prefix name payload'")
            return
        if self.prefix and prefix != self.prefix:
            return  # another publisher's documents (the subscription filters most)
        text = name.decode("ascii", "replace")
        if text not in DOCUMENT_NAMES:
            self._reject(message, name, "not a bluesky document name")
            return
        if len(message) > self.max_message_bytes:
            self._reject(message, name, f"over max_message_bytes={self.max_message_bytes}")
            return
        try:
            doc = load_document(payload)
        except Exception as exc:  # DocumentRejected; anything else would be a bug here
            self._reject(message, name, str(exc))
            return
        if not isinstance(doc, dict):
            self._reject(message, name, f"the document is {type(doc).__name__}, not a dict")
            return
        self.counters.add("documents")
        if self._deliver is not None:
            try:
                self._deliver(text, doc)
            except Exception:
                logger.exception("delivering a %s document failed", text)

    def _run(self) -> None:
        sock = self._context.socket(zmq.SUB)
        monitor: zmq.Socket | None = None
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 0)  # documents are few and must not be dropped
            sock.setsockopt(zmq.MAXMSGSIZE, self.max_message_bytes)
            sock.setsockopt(zmq.SUBSCRIBE, self.prefix + b" " if self.prefix else b"")
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            sock.connect(self.address)
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            while not self._stopping.is_set():
                ready = dict(poller.poll(50))
                if sock in ready:
                    self._receive_queued(sock)
                if monitor in ready and self._on_monitor(monitor):
                    # ZMQ ends a connection that broke the protocol (MAXMSGSIZE) for good;
                    # take what it had queued, then connect again (documents sent in
                    # between are lost, as on any reconnection).
                    self._receive_queued(sock)
                    with contextlib.suppress(zmq.ZMQError):
                        sock.disconnect(self.address)
                    sock.connect(self.address)
        except zmq.ZMQError as exc:
            if exc.errno != zmq.ETERM:
                logger.exception("document socket failed; no more documents are received")
        except Exception:
            logger.exception("document reader failed; no more documents are received")
        finally:
            if monitor is not None:
                with contextlib.suppress(zmq.ZMQError):
                    sock.disable_monitor()
                monitor.close(linger=0)
            sock.close(linger=0)

    def _receive_queued(self, sock: zmq.Socket) -> None:
        while not self._stopping.is_set():
            try:
                message = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self.handle_message(message)

    def _on_monitor(self, monitor: zmq.Socket) -> bool:
        """Count and log disconnections; True if there was one."""
        from zmq.utils.monitor import recv_monitor_message

        dropped = False
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                return dropped
            if event["event"] == zmq.EVENT_DISCONNECTED:
                dropped = True
                self.counters.add("disconnects")
                logger.warning(
                    "document connection to %s dropped (a message over max_message_bytes=%d, "
                    "or the proxy went away); reconnecting",
                    self.address,
                    self.max_message_bytes,
                )

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.proxy is not None:
            self.proxy.stop(timeout)

    def describe(self) -> dict[str, Any]:
        return {
            "transport": "0mq",
            "address": self.address,
            "reading": self._thread.is_alive(),
            "prefix": self.prefix.decode(),
            "max_message_bytes": self.max_message_bytes,
            "proxy": None
            if self.proxy is None
            else {"in_address": self.proxy.in_address, "running": self.proxy.running},
            "counters": self.counters.snapshot(),
        }


#: Rejections logged one by one; after these, every 1000th (the counter has them all).
_LOGGED_REJECTIONS = 100


def _normalize_address(address: str | tuple[str, int], *, bind: bool = False) -> str:
    """``host:port``, ``(host, port)``, a port or a ZMQ endpoint, as a ZMQ endpoint.

    bluesky's forms: a bare port binds on all interfaces (as ``bluesky-0MQ-proxy
    --in-address 5577`` does) and connects to localhost.
    """
    if isinstance(address, tuple):
        return f"tcp://{address[0]}:{address[1]}"
    if address.strip().isdigit():
        return f"tcp://{'0.0.0.0' if bind else '127.0.0.1'}:{address.strip()}"
    return address if "://" in address else f"tcp://{address}"
