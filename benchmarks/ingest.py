"""Sustained Eiger ingest over localhost ZMQ: receive + decode + ROI crop, next to a memcpy.

Publisher processes (``multiprocessing``, spawn: they never share the receiver's
GIL) send pre-encoded, realistic diffraction frames (Poisson speckle under a
bright central disc with a decaying halo, Eiger module-gap rows and hot pixels
at the dtype's maximum) as SIMPLON v1 image messages exactly as
``EigerPublisher`` lays them out. The receiving side is the project's
``EigerReceiver`` (one PULL socket, one thread) whose ``on_frame`` callback
crops the region of interest and takes the amplitude
(``preprocess.crop_window`` / ``to_amplitude``, what a run session does) or
just slices it (``--crop-mode slice``). With ``--processes N`` the receiving
side is ``EigerProcessReceiver`` instead: N spawned worker processes, each with
its own PULL socket (the publisher's PUSH deals frames out among them), decode
and (``--crop-in-pool``) crop; the parent keeps the series bookkeeping and runs
the callback. Its line then also reports the workers' CPU.

Two cases:

- ``1m``:  Eiger2 1M full frames, 1028 x 1062 (W x H) uint32, ``bs32-lz4<``
- ``roi``: 512 x 512 uint16 ``bs16-lz4<`` frames (a detector-side ROI)

Reported per case: frames/s and MB/s of decompressed pixels through the one
receiver thread, the accounting (frames sent == received + counted by the
receiver's counters, and "unaccounted" must be 0), the same run's single-thread
rates without ZMQ (the C decompressor alone, ``codecs.decode``, decode + crop),
and a plain numpy memcpy of the same bytes (the ratio ingest time / memcpy time
per frame). The targets
(>= 4,000 frames/s at 512^2 and >= 2,500 frames/s at 1028 x 1062, on a 16-core
node) are checked and the verdict printed: a single receiver thread is one core
whatever the node has, so a miss here is a miss there unless decoding moves to
a pool.

Run from the repository root (carry the repository to another machine the same way)::

    PYTHONPATH=. python benchmarks/ingest.py [--frames 4000] [--publishers 1] [--seconds 20]
        [--cases 1m roi] [--crop 256] [--crop-mode amplitude|slice|none] [--json out.json]
        [--decode-threads T | --processes N] [--crop-in-pool]

Needs only numpy, pyzmq, bitshuffle, dectris-compression and lz4 besides the
repository. (The receiver module also imports ``cbor2`` for the v2 CBOR flavour;
when it is missing, a placeholder is installed because this benchmark sends v1
JSON only, which never reaches the CBOR code.)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _ensure_importable() -> list[str]:
    """Install placeholders for optional modules the v1 JSON path never uses; say which."""
    placeholders = []
    try:
        import cbor2  # noqa: F401
    except ModuleNotFoundError:
        stub = types.ModuleType("cbor2")
        stub.__doc__ = "placeholder installed by benchmarks/ingest.py (v1 JSON only)"

        def _missing(name: str) -> Any:
            raise ModuleNotFoundError(f"cbor2 is not installed (cbor2.{name}: v2 CBOR needs it)")

        stub.__getattr__ = _missing  # type: ignore[attr-defined]
        sys.modules["cbor2"] = stub
        placeholders.append("cbor2")
    return placeholders


PLACEHOLDERS = _ensure_importable()

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from hxn_liveptycho.pipeline.preprocess import crop_window, to_amplitude  # noqa: E402
from hxn_liveptycho.streams import EigerFrame, EigerReceiver, decode, encode  # noqa: E402
from hxn_liveptycho.streams.eiger_processes import EigerProcessReceiver  # noqa: E402

#: Receiver counters that mean "this message was received and deliberately not delivered".
COUNTED_NOT_DELIVERED = ("malformed", "duplicates", "stale_series")
SERIES = 1


@dataclass(frozen=True)
class Case:
    name: str
    width: int
    height: int
    dtype: str
    encoding: str
    target_fps: float


CASES = {
    "1m": Case("1m", 1028, 1062, "uint32", "bs32-lz4<", 2500.0),
    "roi": Case("roi", 512, 512, "uint16", "bs16-lz4<", 4000.0),
}


# -- realistic frames ------------------------------------------------------------------------


def diffraction_frame(height: int, width: int, dtype: str, seed: int) -> np.ndarray:
    """A far-field ptychography frame: speckle under a bright disc and a decaying halo, counted.

    Fully developed speckle (grain ~4 px) modulates a bright central disc (the
    zone plate's cone, ~600 photons/px) and a halo falling as q^-3.5; Poisson
    counting noise; Eiger module-gap rows and a few hot pixels at the dtype's
    maximum (the detector's bad-pixel marker). Most of the frame holds 0-3 counts,
    as real frames do, which is what sets the compression ratio.
    """
    rng = np.random.default_rng(seed)
    sh, sw = max(1, height // 4), max(1, width // 4)
    field = np.zeros((height, width), np.complex64)
    field[:sh, :sw] = rng.standard_normal((sh, sw)) + 1j * rng.standard_normal((sh, sw))
    speckle = np.abs(np.fft.fft2(field)) ** 2
    speckle /= speckle.mean()
    rows, cols = np.ogrid[:height, :width]
    cy = height / 2 + rng.uniform(-3, 3)
    cx = width / 2 + rng.uniform(-3, 3)
    r = np.hypot(rows - cy, cols - cx)
    radius = 0.12 * min(height, width)
    disc = 1.0 / (1.0 + np.exp((r - radius) / 1.5))
    halo = 40.0 * (radius / np.maximum(r, radius)) ** 3.5
    expected = 600.0 * disc * (0.4 + 0.6 * speckle) + halo * speckle
    counts = rng.poisson(expected)
    top = np.iinfo(dtype).max
    counts = np.minimum(counts, top - 1)
    if height > 600:  # Eiger2 1M: two 514-row modules and a gap band between them
        counts[514 : height - 514, :] = top
    hot = rng.integers(0, counts.size, size=max(1, counts.size // 100_000))
    counts.flat[hot] = top
    return counts.astype(dtype)


# -- the wire (SIMPLON v1, as EigerPublisher.send_frame lays it out) -------------------------


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def header_parts(case: Case, series: int) -> list[bytes]:
    return [
        _dumps({"htype": "dheader-1.0", "series": series, "header_detail": "basic"}),
        _dumps(
            {
                "x_pixels_in_detector": case.width,
                "y_pixels_in_detector": case.height,
                "bit_depth_image": np.dtype(case.dtype).itemsize * 8,
                "frame_time": 0.0002,
                "count_time": 0.0002,
                "x_pixel_size": 75e-6,
                "y_pixel_size": 75e-6,
            }
        ),
    ]


def image_tail(case: Case, blob: bytes) -> list[bytes]:
    """Parts 2-4 of an image message (everything but dimage-1.0, which carries the number)."""
    return [
        _dumps(
            {
                "htype": "dimage_d-1.0",
                "shape": [case.width, case.height],
                "type": case.dtype,
                "encoding": case.encoding,
                "size": len(blob),
            }
        ),
        blob,
        _dumps(
            {"htype": "dconfig-1.0", "start_time": 0, "stop_time": 200_000, "real_time": 200_000}
        ),
    ]


# -- publisher and fan-in processes ----------------------------------------------------------


def publisher_main(
    index: int,
    n_publishers: int,
    case: Case,
    blobs: list[bytes],
    n_frames: int,
    seconds: float,
    endpoint: str,
    bind: bool,
    hwm: int,
    endpoint_out: Any,
    go: Any,
    sent_out: Any,
) -> None:
    """Send this publisher's share of the frames, then report how many it sent.

    One publisher sends series 1 with its header, frames 0, 1, 2, ... as a detector
    does. With several, publisher i sends series i+1 without a header (a header
    would supersede the other publishers' series), so each series arrives in order
    and the receiver counts its frames as ``unknown_series`` instead of logging
    interleaved frame numbers as late.
    """
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.SNDHWM, hwm)
    if bind:
        sock.bind(endpoint)
        endpoint_out.put(sock.getsockopt_string(zmq.LAST_ENDPOINT))
    else:
        sock.connect(endpoint)
    tails = [image_tail(case, blob) for blob in blobs]
    hashes = [hashlib.md5(blob).hexdigest() for blob in blobs]
    series = SERIES + index
    if n_publishers == 1:
        sock.send_multipart(header_parts(case, series))
    share = n_frames // n_publishers + (1 if index < n_frames % n_publishers else 0)
    go.wait()
    began = time.perf_counter()
    sent = 0
    for number in range(share):
        k = number % len(blobs)
        head = _dumps({"htype": "dimage-1.0", "series": series, "frame": number, "hash": hashes[k]})
        sock.send_multipart([head, *tails[k]], copy=False)
        sent += 1
        if sent % 64 == 0 and time.perf_counter() - began > seconds:
            break
    sent_out.put((index, sent, time.perf_counter() - began))
    sock.close(linger=60_000)  # until every queued frame has left
    ctx.term()


def fan_in_main(hwm: int, endpoints_out: Any) -> None:
    """PULL from every publisher, PUSH to the receiver (zmq.proxy runs in C, without the GIL)."""
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    front.setsockopt(zmq.RCVHWM, hwm)
    back.setsockopt(zmq.SNDHWM, hwm)
    front.bind("tcp://127.0.0.1:*")
    back.bind("tcp://127.0.0.1:*")
    endpoints_out.put(
        (front.getsockopt_string(zmq.LAST_ENDPOINT), back.getsockopt_string(zmq.LAST_ENDPOINT))
    )
    with contextlib.suppress(zmq.ContextTerminated):
        zmq.proxy(front, back)


# -- receiving side ----------------------------------------------------------------------------


class CropTransform:
    """The ROI crop (and amplitude) as a picklable object, so worker processes can run it."""

    def __init__(self, window: tuple[slice, slice], mode: str) -> None:
        self.window = window
        self.mode = mode

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        if self.mode == "amplitude":
            return to_amplitude(pixels, self.window)[0]
        if self.mode == "slice":
            return pixels[self.window].copy()
        return pixels


class Sink:
    """The receiver's on_frame: crop (and take the amplitude); time first/last; verify a few."""

    def __init__(
        self, case: Case, frames: list[np.ndarray], crop: int, mode: str, verify: int
    ) -> None:
        self.frames = frames
        self.mode = mode
        self.window = crop_window(
            (case.height, case.width), (case.height / 2, case.width / 2), crop
        )
        self.transform = CropTransform(self.window, mode)
        self.count = 0
        self.first = self.last = 0.0
        self.verify_left = verify
        self.verified = 0
        self.mismatches = 0
        #: True when the receiver's decode pool already applied :meth:`crop`.
        self.cropped_upstream = False

    def crop(self, pixels: np.ndarray) -> np.ndarray:
        return self.transform(pixels)

    def on_frame(self, frame: EigerFrame) -> None:
        now = time.perf_counter()
        if self.count == 0:
            self.first = now
        if not self.cropped_upstream:
            self.crop(frame.data)
        if self.verify_left > 0:
            self.verify_left -= 1
            self.verified += 1
            expected = self.frames[frame.frame % len(self.frames)]
            if self.cropped_upstream:
                expected = self.crop(expected)
            if not np.array_equal(frame.data, expected):
                self.mismatches += 1
        self.count += 1
        self.last = time.perf_counter()


# -- same-run references -------------------------------------------------------------------


def rate(fn: Callable[[int], None], min_seconds: float = 1.0, min_calls: int = 20) -> float:
    """Calls per second of fn(i), run for at least min_seconds and min_calls."""
    fn(0)  # warm
    calls, began = 0, time.perf_counter()
    while calls < min_calls or time.perf_counter() - began < min_seconds:
        fn(calls)
        calls += 1
    return calls / (time.perf_counter() - began)


def references(case: Case, frames: list[np.ndarray], blobs: list[bytes], crop: int, mode: str):
    shape = (case.height, case.width)
    window = crop_window(shape, (case.height / 2, case.width / 2), crop)

    def decode_only(i: int) -> None:
        decode(blobs[i % len(blobs)], encoding=case.encoding, shape=shape, dtype=case.dtype)

    def decode_crop(i: int) -> None:
        data = decode(blobs[i % len(blobs)], encoding=case.encoding, shape=shape, dtype=case.dtype)
        if mode == "amplitude":
            to_amplitude(data, window)
        elif mode == "slice":
            data[window].copy()

    from dectris.compression import decompress

    algorithm = "bslz4" if case.encoding.startswith("bs") else "lz4"
    elem = {"bs32-lz4<": 4, "bs16-lz4<": 2, "bs8-lz4<": 1}.get(case.encoding, 1)

    def decompress_only(i: int) -> None:
        decompress(blobs[i % len(blobs)], algorithm, elem_size=elem)

    src = frames[0]
    dst = np.empty_like(src)

    def memcpy(i: int) -> None:
        np.copyto(dst, src)

    return {
        "decompress_only_fps": rate(decompress_only) if case.encoding != "raw" else float("nan"),
        "decode_only_fps": rate(decode_only),
        "decode_crop_fps": rate(decode_crop),
        "memcpy_per_s": rate(memcpy, min_calls=200),
    }


# -- one case ----------------------------------------------------------------------------------


def run_case(case: Case, args: argparse.Namespace) -> dict[str, Any]:
    spawn = mp.get_context("spawn")
    frames = [
        diffraction_frame(case.height, case.width, case.dtype, seed) for seed in range(args.pool)
    ]
    blobs = [encode(f, case.encoding) for f in frames]
    nbytes = frames[0].nbytes
    wire_bytes = float(np.mean([len(b) for b in blobs]))
    refs = references(case, frames, blobs, args.crop, args.crop_mode)

    go = spawn.Event()
    endpoint_q, sent_q = spawn.Queue(), spawn.Queue()
    children: list[Any] = []
    fan_in = None
    if args.publishers > 1:
        fan_in = spawn.Process(target=fan_in_main, args=(args.hwm, endpoint_q), daemon=True)
        fan_in.start()
        front, receive_from = endpoint_q.get(timeout=60)
        targets = [(front, False)] * args.publishers
    else:
        targets = [("tcp://127.0.0.1:*", True)]
    for index, (endpoint, bind) in enumerate(targets):
        proc = spawn.Process(
            target=publisher_main,
            args=(
                index,
                args.publishers,
                case,
                blobs,
                args.frames,
                args.seconds,
                endpoint,
                bind,
                args.hwm,
                endpoint_q,
                go,
                sent_q,
            ),
            daemon=True,
        )
        proc.start()
        children.append(proc)
    if args.publishers == 1:
        receive_from = endpoint_q.get(timeout=60)

    sink = Sink(case, frames, args.crop, args.crop_mode, verify=2 * args.pool)
    receiver: EigerReceiver | EigerProcessReceiver
    if args.processes:
        receiver = EigerProcessReceiver(
            receive_from,
            on_series_start=lambda series, info: None,
            on_frame=sink.on_frame,
            on_series_end=lambda series: None,
            processes=args.processes,
            rcvhwm=args.hwm,
            name="ingest-bench",
            transform=sink.transform if args.crop_in_pool else None,
        )
    else:
        receiver = EigerReceiver(
            receive_from,
            on_series_start=lambda series, info: None,
            on_frame=sink.on_frame,
            on_series_end=lambda series: None,
            socket_type="pull",
            rcvhwm=args.hwm,
            name="ingest-bench",
            decode_threads=args.decode_threads,
            transform=sink.crop if args.crop_in_pool else None,
        )
    sink.cropped_upstream = args.crop_in_pool
    receiver.start()
    workers = receiver.worker_pids if isinstance(receiver, EigerProcessReceiver) else []
    try:
        deadline = time.monotonic() + 60
        while args.publishers == 1 and receiver.counters.get("headers") < 1:
            if time.monotonic() > deadline:
                raise RuntimeError("the series header never arrived")
            time.sleep(0.01)
        cpu0, wall0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        workers_cpu0 = cpu_seconds(workers)
        go.set()
        reports = [sent_q.get(timeout=args.seconds + 120) for _ in children]
        sent = sum(n for _, n, _ in reports)
        # Wait until every frame sent is either delivered or counted (or give up after 120 s:
        # then the shortfall shows as "unaccounted").
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            counts = receiver.counters.snapshot()
            if counts["frames"] + sum(counts.get(k, 0) for k in COUNTED_NOT_DELIVERED) >= sent:
                break
            time.sleep(0.02)
        wall1, cpu1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        workers_cpu1 = cpu_seconds(workers)
    finally:
        stopped = receiver.stop(timeout=10)
        for proc in children:
            proc.join(timeout=70)
        if fan_in is not None:
            fan_in.terminate()
            fan_in.join(timeout=10)
    counts = receiver.counters.snapshot()
    received = counts["frames"]
    counted = {k: counts.get(k, 0) for k in COUNTED_NOT_DELIVERED}
    elapsed = sink.last - sink.first if received > 1 else float("nan")
    fps = (received - 1) / elapsed if received > 1 else 0.0
    cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
    memcpy_s = 1.0 / refs["memcpy_per_s"]
    return {
        "case": case.name,
        "shape_wh": [case.width, case.height],
        "dtype": case.dtype,
        "encoding": case.encoding,
        "frame_mb": nbytes / 1e6,
        "wire_mb": wire_bytes / 1e6,
        "compression": nbytes / wire_bytes,
        "publishers": args.publishers,
        "sent": sent,
        "received": received,
        "counted_not_delivered": counted,
        "unaccounted": sent - received - sum(counted.values()),
        "callback_errors": counts.get("callback_errors", 0),
        "verified_frames": sink.verified,
        "verify_mismatches": sink.mismatches,
        "receiver_stopped": stopped,
        "seconds": elapsed,
        "fps": fps,
        "mb_per_s": fps * nbytes / 1e6,
        "wire_mb_per_s": fps * wire_bytes / 1e6,
        "receiver_process_cores": cpu / (wall1 - wall0),
        "worker_processes_cores": (workers_cpu1 - workers_cpu0) / (wall1 - wall0),
        "barrier_timeouts": counts.get("barrier_timeouts", 0),
        "worker_exits": counts.get("worker_exits", 0),
        "decompress_only_fps": refs["decompress_only_fps"],
        "decode_only_fps": refs["decode_only_fps"],
        "decode_crop_fps": refs["decode_crop_fps"],
        "memcpy_gb_per_s": refs["memcpy_per_s"] * nbytes / 1e9,
        "memcpy_us_per_frame": memcpy_s * 1e6,
        "ingest_us_per_frame": 1e6 / fps if fps else float("nan"),
        "ratio_to_memcpy": (1.0 / fps) / memcpy_s if fps else float("nan"),
        "target_fps": case.target_fps,
        "meets_target": fps >= case.target_fps,
        "crop": args.crop,
        "decode_threads": args.decode_threads,
        "processes": args.processes,
        "crop_in_pool": args.crop_in_pool,
        "crop_mode": args.crop_mode,
    }


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of running processes (Linux /proc; 0 where unreadable)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def receiver_kind(r: dict[str, Any]) -> str:
    if r["processes"]:
        return f"{r['processes']} worker processes"
    return f"decode threads {r['decode_threads']}"


def describe(r: dict[str, Any]) -> str:
    w, h = r["shape_wh"]
    counted = ", ".join(f"{k} {v}" for k, v in r["counted_not_delivered"].items())
    verdict = "MET" if r["meets_target"] else "NOT MET"
    return "\n".join(
        [
            f"== {r['case']}: {w}x{h} {r['dtype']} {r['encoding']}, "
            f"{r['frame_mb']:.2f} MB/frame, {r['wire_mb']:.3f} MB on the wire "
            f"(compression {r['compression']:.1f}x), {r['publishers']} publisher(s), "
            f"crop {r['crop']} ({r['crop_mode']})",
            f"   accounting: sent {r['sent']} = received {r['received']} + counted ({counted}) "
            f"+ unaccounted {r['unaccounted']}; callback errors {r['callback_errors']}; "
            f"bit-for-bit checked {r['verified_frames']} frames, "
            f"{r['verify_mismatches']} mismatches",
            f"   ingest (receive+decode+crop, {receiver_kind(r)}, crop in pool "
            f"{r['crop_in_pool']}): {r['fps']:,.0f} frames/s, "
            f"{r['mb_per_s']:,.0f} MB/s decompressed ({r['wire_mb_per_s']:,.0f} MB/s on the wire), "
            f"{r['ingest_us_per_frame']:.0f} us/frame, receiver process "
            f"{r['receiver_process_cores']:.2f} cores busy"
            + (
                f" + workers {r['worker_processes_cores']:.2f} cores (barrier timeouts "
                f"{r['barrier_timeouts']}, worker exits {r['worker_exits']})"
                if r["processes"]
                else ""
            ),
            f"   same run, 1 thread, no ZMQ: C decompress alone {r['decompress_only_fps']:,.0f}, "
            f"decode() {r['decode_only_fps']:,.0f}, decode()+crop "
            f"{r['decode_crop_fps']:,.0f} frames/s",
            f"   memcpy of the same bytes: {r['memcpy_gb_per_s']:.1f} GB/s, "
            f"{r['memcpy_us_per_frame']:.0f} us/frame; ingest / memcpy = "
            f"{r['ratio_to_memcpy']:.1f}x",
            f"   target >= {r['target_fps']:,.0f} frames/s: {verdict}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=4000, help="frames per case (all publishers)")
    parser.add_argument("--publishers", type=int, default=1, help="publisher processes per case")
    parser.add_argument("--seconds", type=float, default=20.0, help="cap on sending time per case")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=["1m", "roi"])
    parser.add_argument("--crop", type=int, default=256, help="ROI edge in pixels")
    parser.add_argument("--crop-mode", choices=["amplitude", "slice", "none"], default="amplitude")
    parser.add_argument("--pool", type=int, default=8, help="distinct frames each publisher cycles")
    parser.add_argument("--hwm", type=int, default=64, help="ZMQ high-water marks (messages)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--decode-threads", type=int, default=0, help="receiver decode pool (0: inline)"
    )
    parser.add_argument(
        "--crop-in-pool",
        action="store_true",
        help="crop in the receiver's decode pool (or its worker processes)",
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=0,
        help="EigerProcessReceiver with N worker processes (0: the threaded EigerReceiver)",
    )
    args = parser.parse_args(argv)
    if args.publishers < 1 or args.frames < 2:
        parser.error("need at least 1 publisher and 2 frames")
    if args.processes < 0:
        parser.error("--processes must be >= 0")

    import bitshuffle
    import dectris.compression
    import lz4

    env = {
        "date": datetime.date.today().isoformat(),
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "nproc": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "bitshuffle": getattr(bitshuffle, "__version__", "?"),
        "dectris_compression": getattr(dectris.compression, "__version__", "?"),
        "lz4": getattr(lz4, "__version__", "?"),
        "placeholders": PLACEHOLDERS,
        "argv": sys.argv,
    }
    print(
        f"ingest benchmark {env['date']}: {env['machine']} nproc={env['nproc']}, "
        f"Python {env['python']}, numpy {env['numpy']}, pyzmq {env['pyzmq']} "
        f"(libzmq {env['libzmq']}), bitshuffle {env['bitshuffle']}, lz4 {env['lz4']}"
        + (f"; placeholder modules: {', '.join(PLACEHOLDERS)}" if PLACEHOLDERS else ""),
        flush=True,
    )
    results = []
    for name in args.cases:
        result = run_case(CASES[name], args)
        results.append(result)
        print(describe(result), flush=True)
    ok = all(r["unaccounted"] == 0 and r["verify_mismatches"] == 0 for r in results)
    print("accounting: every frame sent was received or counted" if ok else "ACCOUNTING FAILED")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": results}, f, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
