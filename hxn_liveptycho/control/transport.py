"""Document transport: how `liveptycho serve` receives the RunEngine's documents.

Serve depends only on :class:`DocumentSource` (start with a deliver callback,
stop, describe, counters). :class:`ZmqDocumentSource` is bluesky's own 0MQ
path: a ``bluesky.callbacks.zmq.Publisher`` subscribed to the RunEngine, a
0MQ proxy (``bluesky-0MQ-proxy``, or one serve starts itself), and a
``RemoteDispatcher`` here. A Kafka source (``bluesky_kafka.RemoteDispatcher``,
as NSLS-II's document pipeline runs it) fits the same protocol: its dispatcher
also calls subscribers with ``(name, doc)`` and runs a blocking poll loop.

bluesky's Publisher pickles documents. Unpickling network input can run code,
so documents are read with a restricted unpickler that builds only plain
containers and NumPy arrays; anything else is counted as rejected and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from hxn_liveptycho.counters import Counters

logger = logging.getLogger(__name__)

Deliver = Callable[[str, dict[str, Any]], None]

#: Globals a pickled bluesky document may refer to (NumPy arrays and scalars inside events).
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"),
        ("collections", "OrderedDict"),
        ("builtins", "complex"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
        ("builtins", "bytearray"),
    }
)


class _DocumentUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a document")
        return super().find_class(module, name)


def load_document(payload: bytes) -> Any:
    """Unpickle one document, refusing anything but plain data and NumPy arrays."""
    return _DocumentUnpickler(io.BytesIO(payload)).load()


class DocumentSource(Protocol):
    """What serve needs from a transport; one instance feeds one serve process."""

    counters: Counters

    def start(self, deliver: Deliver) -> None:
        """Begin delivering ``(name, doc)`` to ``deliver`` from a thread of the source's own."""
        ...

    def stop(self, timeout: float = 5.0) -> None: ...

    def describe(self) -> dict[str, Any]: ...


class ProxyProcess:
    """bluesky's 0MQ proxy (``bluesky-0MQ-proxy``) as a child process of serve.

    A child process, not a thread: the proxy blocks in ``zmq.proxy`` and cannot
    be interrupted cleanly from another thread, while a process ends on SIGTERM.
    """

    def __init__(self, in_address: str, out_address: str) -> None:
        self.in_address = in_address
        self.out_address = out_address
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        code = "import sys; from bluesky.commandline.zmq_proxy import main; sys.exit(main())"
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                code,
                "--in-address",
                self.in_address,
                "--out-address",
                self.out_address,
            ]
        )
        logger.info(
            "bluesky 0MQ proxy started (pid %d): publishers connect to %s, output on %s",
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


class ZmqDocumentSource:
    """Documents from a bluesky 0MQ proxy through ``bluesky.callbacks.zmq.RemoteDispatcher``.

    The dispatcher runs in its own thread and asyncio loop. If it dies (bluesky's
    dispatcher stops on a document name it does not know), it is logged, counted
    and started again a second later; subscribing is connectionless, so nothing
    but the documents sent during that second is lost.
    """

    def __init__(
        self, address: str, *, prefix: str = "", proxy_in_address: str | None = None
    ) -> None:
        self.address = address
        self.prefix = prefix.encode()
        self.proxy = ProxyProcess(proxy_in_address, address) if proxy_in_address else None
        self.counters = Counters(["documents", "rejected", "dispatcher_restarts"])
        self._deliver: Deliver | None = None
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="liveptycho-documents", daemon=True)

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        if self.proxy is not None:
            self.proxy.start()
        self._thread.start()

    def _decode(self, payload: bytes) -> Any:
        try:
            return load_document(payload)
        except Exception as exc:
            self.counters.add("rejected")
            logger.warning("document rejected (%d bytes): %s", len(payload), exc)
            return None

    def _on_document(self, name: str, doc: Any) -> None:
        if not isinstance(doc, dict):
            return  # _decode counted and logged it
        self.counters.add("documents")
        if self._deliver is not None:
            self._deliver(name, doc)

    def _run(self) -> None:
        from bluesky.callbacks.zmq import RemoteDispatcher

        while not self._stopping.is_set():
            dispatcher = RemoteDispatcher(
                self.address, prefix=self.prefix, deserializer=self._decode
            )
            dispatcher.subscribe(self._on_document)
            with self._lock:
                self._loop = dispatcher.loop
            if self._stopping.is_set():
                dispatcher.loop.close()
                return
            try:
                dispatcher.start()
            except asyncio.CancelledError:
                return
            except Exception:
                if self._stopping.is_set():
                    return
                self.counters.add("dispatcher_restarts")
                logger.exception("document dispatcher stopped; starting it again in 1 s")
                time.sleep(1.0)
            finally:
                with self._lock:
                    self._loop = None

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        with self._lock:
            loop = self._loop
            if loop is not None and not loop.is_closed():
                # RuntimeError: closed in the meantime, the dispatcher has ended by itself
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_cancel_all, loop)
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.proxy is not None:
            self.proxy.stop(timeout)

    def describe(self) -> dict[str, Any]:
        return {
            "transport": "0mq",
            "address": self.address,
            "prefix": self.prefix.decode(),
            "proxy": None
            if self.proxy is None
            else {"in_address": self.proxy.in_address, "running": self.proxy.running},
            "counters": self.counters.snapshot(),
        }


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        task.cancel()
