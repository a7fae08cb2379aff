"""Time from ``final()`` to a run's result being readable in Tiled, with the embedded server.

A simulated run is handed to a real :class:`~hxn_liveptycho.store.tiled.TiledSink`
as a session hands it over: ``--frames`` diffraction frames of
``--size``² (sqrt of Poisson speckle, scan indices in arrival order), in
batches of ``--batch`` at ``--rate`` frames per second, then one ``final()``
with an object of ``--object``² complex64 (plus the amplitude and phase views
the sink derives), a probe, positions and an error history. The server is
the project's embedded one, started before the run (as ``LivePtycho`` starts
it). A second client polls the container's metadata every 20 ms; the figure is
the time from ``final()`` to the metadata saying ``finished`` (the final
write's last step, after every array is in place).

Modes (``--modes``, default both):

``before``  every frame kept for the final write (``diffraction_chunk_frames=0``),
            as the sink behaved before it appended while running;
``after``   whole chunks appended while the run goes on (the default sink).

Also reported: the frames still queued when ``final()`` was called, the
longest ``diffraction()`` call (it must not block the caller), and how the
frames were split between appends and the final write. Run::

    python benchmarks/tiled_final_write.py [--frames 4096 --size 256 --rate 500]

With ``--legacy-path PATH`` (a checkout of an earlier commit) the same run is
measured against that commit's ``TiledSink`` and embedded server instead (it
then has no modes: that code wrote everything at the end).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger("benchmarks.tiled_final_write")


def speckle_pool(count: int, size: int, seed: int = 0) -> np.ndarray:
    """``count`` frames of sqrt(Poisson counts) of a speckle pattern, float32."""
    rng = np.random.default_rng(seed)
    yy, xx = np.indices((size, size)) - size / 2
    envelope = 2e4 * np.exp(-(yy**2 + xx**2) / (2 * (size / 6) ** 2)) + 2.0
    pool = np.empty((count, size, size), np.float32)
    for k in range(count):
        field = rng.normal(size=(size, size)) + 1j * rng.normal(size=(size, size))
        intensity = envelope * np.abs(field) ** 2 / 2
        pool[k] = np.sqrt(rng.poisson(intensity)).astype(np.float32)
    return pool


def final_snapshot(object_size: int, size: int, frames: int) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    phase = rng.random((object_size, object_size), dtype=np.float32)
    return {
        "object": np.exp(1j * phase).astype(np.complex64),
        "probe": (rng.random((size, size)) + 1j).astype(np.complex64),
        "positions_m": rng.random((frames, 2)) * 1e-5,
        "error_history": rng.random(200).astype(np.float32),
        "iteration": 200,
    }


class MetadataPoller(threading.Thread):
    """Notes when the container's metadata first says ``finished``: one light GET per 50 ms."""

    def __init__(self, base_url: str, api_key: str, path: list[str]) -> None:
        super().__init__(name="bench-poller", daemon=True)
        self.url = f"{base_url}/api/v1/metadata/{'/'.join(path)}"
        self.headers = {"Authorization": f"Apikey {api_key}"}
        self.seen_at: float | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        import httpx

        with httpx.Client(trust_env=False, headers=self.headers, timeout=10.0) as client:
            while not self.stop.is_set():
                try:
                    reply = client.get(self.url)
                    if reply.status_code == 200:
                        metadata = reply.json()["data"]["attributes"]["metadata"]
                        if "finished" in metadata:
                            self.seen_at = time.monotonic()
                            return
                except httpx.HTTPError as exc:  # a busy server may time out a poll
                    logger.debug("poll failed: %s", exc)
                time.sleep(0.05)


def run_case(args: argparse.Namespace, mode: str, server: Any, directory: Path) -> dict:
    from tiled.client import from_uri

    from hxn_liveptycho.store.tiled import TiledSink

    tiled_uri = server.uri
    base_url, api_key = tiled_uri.split("/api/v1")[0], tiled_uri.split("api_key=")[1]
    client = from_uri(tiled_uri)
    kwargs: dict[str, Any] = {}
    if "diffraction_chunk_frames" in inspect.signature(TiledSink).parameters:
        kwargs["diffraction_chunk_frames"] = 0 if mode == "before" else None
    sink = TiledSink(
        lambda: client,
        catalog_path=f"processed/bench_{mode}",
        backup_dir=directory / "backup",
        **kwargs,
    )
    pool = speckle_pool(args.pool, args.size)
    snapshot = final_snapshot(args.object, args.size, args.frames)
    sink.open(None, {"raw_uid": f"bench-{mode}-{os.getpid()}", "scan_id": 1})
    path = ["processed", f"bench_{mode}", str(sink.key)]
    rng = np.random.default_rng(2)
    positions = rng.random((args.frames, 2)) * 1e-5
    longest_call = 0.0
    began = time.monotonic()
    for start in range(0, args.frames, args.batch):
        due = began + start / args.rate
        time.sleep(max(0.0, due - time.monotonic()))
        indices = np.arange(start, min(start + args.batch, args.frames))
        batch = pool[indices % args.pool]  # a fresh array per batch, as a session makes
        t0 = time.perf_counter()
        sink.diffraction(indices, batch, positions[indices])
        longest_call = max(longest_call, time.perf_counter() - t0)
    acquisition_s = time.monotonic() - began
    stored_at_final = getattr(sink, "diffraction_rows_stored", 0)
    poller = MetadataPoller(base_url, api_key, path)
    poller.start()
    final_at = time.monotonic()
    sink.final(snapshot, {"status": "complete"})
    sink.close(timeout=args.timeout)
    written_at = time.monotonic()
    poller.join(args.timeout)
    poller.stop.set()
    counters = sink.counters.snapshot()
    node = client
    for part in path:
        node = node[part]
    stored_frames = node["diffraction"]["amplitude"].shape[0]
    result = {
        "mode": mode,
        "load_average_1min": round(os.getloadavg()[0], 2),
        "frames": args.frames,
        "frame_shape": [args.size, args.size],
        "batch": args.batch,
        "feed_hz": args.rate,
        "object_shape": [args.object, args.object],
        "acquisition_s": round(acquisition_s, 2),
        "frames_stored_when_final_called": stored_at_final,
        "final_to_written_s": round(written_at - final_at, 2),
        "final_to_readable_s": (
            round(poller.seen_at - final_at, 2) if poller.seen_at is not None else None
        ),
        "longest_diffraction_call_ms": round(longest_call * 1e3, 2),
        "diffraction_appended": counters.get("diffraction_appended", 0),
        "diffraction_in_final": counters.get("diffraction_in_final", args.frames),
        "frames_in_tiled": int(stored_frames),
        "amplitude_dtype": str(node["diffraction"]["amplitude"].dtype),
        "write_errors": counters.get("write_errors", 0),
        "backup": str(sink.backup_path) if sink.backup_path else None,
    }
    logger.info("%s", json.dumps(result))
    return result


def startup_s(directory: Path, busy: bool) -> float:
    """Seconds until a fresh embedded server answers, started off the main thread while
    the main thread idles or (``busy``) runs pure-Python work, as a RunEngine or a
    solver's launch loop does."""
    from hxn_liveptycho.store.server import EmbeddedTiledServer

    ready: dict[str, Any] = {}

    def start() -> None:
        began = time.monotonic()
        ready["server"] = EmbeddedTiledServer(directory)
        ready["s"] = time.monotonic() - began

    starter = threading.Thread(target=start, name="bench-start", daemon=True)
    starter.start()
    while starter.is_alive():
        if busy:
            sum(i * i for i in range(200_000))
        else:
            starter.join(0.05)
    ready["server"].close()
    return float(ready["s"])


def start_server(directory: Path) -> tuple[Any, str]:
    from hxn_liveptycho.store.server import EmbeddedTiledServer

    began = time.monotonic()
    server = EmbeddedTiledServer(directory / "tiled")
    where = "child process" if getattr(server, "pid", None) else "thread of this process"
    logger.info("embedded Tiled ready in %.1f s (%s)", time.monotonic() - began, where)
    return server, where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4096)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rate", type=float, default=500.0, help="frames per second fed")
    parser.add_argument("--object", type=int, default=2000, help="object side, pixels")
    parser.add_argument("--pool", type=int, default=64, help="distinct frames generated")
    parser.add_argument("--modes", default="before,after")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--legacy-path", type=Path, help="measure the code checked out here")
    parser.add_argument("--data-dir", type=Path, help="default: a temporary directory")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--startup", action="store_true", help="also time the server's start, idle and busy"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for noisy in ("httpx", "tiled", "uvicorn"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    modes = ["legacy"] if args.legacy_path else [m for m in args.modes.split(",") if m]
    if args.legacy_path:
        sys.path.insert(0, str(args.legacy_path.resolve()))
    import hxn_liveptycho

    code = str(Path(hxn_liveptycho.__file__).resolve().parent)
    with tempfile.TemporaryDirectory(prefix="tiled-final-write-") as tmp:
        directory = args.data_dir or Path(tmp)
        startup: dict[str, float] = {}
        if args.startup:
            for busy in (False, True):
                key = "busy_parent_s" if busy else "idle_parent_s"
                startup[key] = round(startup_s(directory / f"startup-{key}", busy), 2)
                logger.info("embedded Tiled started in %s s (%s)", startup[key], key)
        server, where = start_server(directory)
        try:
            results = [run_case(args, mode, server, directory) for mode in modes]
        finally:
            server.close()
    report = {
        "benchmark": "tiled_final_write",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "code": code,
        "tiled_server": where,
        "startup": startup,
        "device": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": datetime.date.today().isoformat(),
        "cases": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    for case in results:
        logger.info(
            "%-6s final() -> readable %s s (written %s s); %d of %d frames in Tiled when "
            "final() was called; longest diffraction() %.2f ms",
            case["mode"],
            case["final_to_readable_s"],
            case["final_to_written_s"],
            case["frames_stored_when_final_called"],
            case["frames"],
            case["longest_diffraction_call_ms"],
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
