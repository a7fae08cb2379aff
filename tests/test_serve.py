"""`liveptycho serve` in its own process, fed by a RunEngine's 0MQ Publisher in this one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from bluesky.callbacks.zmq import Publisher
from scans import SMALL, fly, processed
from serve_helpers import ServeProcess

from hxn_liveptycho import cli
from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample


@pytest.fixture
def serve(tmp_path: Path, tiled_server: Any, hxn_detectors: Any) -> Iterator[ServeProcess]:
    eiger, panda = hxn_detectors
    process = ServeProcess(tmp_path, tiled_server.uri, eiger, panda)
    try:
        process.wait_ready(eiger, panda)
        yield process
    finally:
        process.close()


@pytest.fixture
def publisher(serve: ServeProcess, RE: Any) -> Iterator[Publisher]:
    """bluesky's own Publisher on the RunEngine, connected to the proxy serve runs."""
    pub = Publisher(serve.proxy_in)
    serve.connect(pub)
    RE.subscribe(pub)
    yield pub
    # A PUB socket that connected keeps documents for a proxy that went away, and its
    # close() waits for them forever (zmq's default linger); the tests drop them.
    pub._socket.setsockopt(zmq.LINGER, 0)
    pub.close()


def _listening_addresses(port: int) -> set[str]:
    """Local addresses with a TCP socket listening on ``port`` (from /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def test_scan_published_over_0mq_is_reconstructed_by_serve(
    serve, publisher, RE, hxn_detectors, tiled_server, capsys
):
    eiger, panda = hxn_detectors
    assert _listening_addresses(serve.port) == {"0100007F"}  # 127.0.0.1 only, by default

    result = fly(RE, eiger, panda, SimulatedSample(SMALL))
    raw_uid = result.run_start_uids[0]
    run = serve.wait_finished(raw_uid)
    assert run["status"] == "complete", serve.log()
    assert run["positions"] == SMALL.x_num * SMALL.y_num

    from tiled.client import from_uri

    node = processed(from_uri(tiled_server.uri), raw_uid)
    assert node.metadata["raw_uid"] == raw_uid
    assert node.metadata["status"] == "complete"
    assert node["final"]["object"].read().shape == tuple(node.metadata["canvas"]["shape"])
    assert run["tiled_url"].endswith(run["container_path"])

    status = serve.status()
    assert status["serve"]["documents_of_unknown_runs"] == 0
    assert status["documents"]["counters"]["rejected"] == 0
    assert status["engine"]["runs_skipped"] >= 1  # the connection probes
    details = serve.http.get(f"/api/runs/{raw_uid[:8]}").json()
    assert details["uid"] == raw_uid and details["config"]["grid"]["x_num"] == SMALL.x_num

    # the CLI client talks to the same API
    assert cli.main(["status", "--url", serve.url]) == 0
    assert f"{raw_uid[:8]} complete: 64/64 positions" in capsys.readouterr().out
    assert cli.main(["configure", "--url", serve.url, "recon.iterations=12", "roi.size=64"]) == 0
    assert '"iterations": 12' in capsys.readouterr().out
    assert serve.http.get("/api/config").json()["overrides"] == {
        "recon": {"iterations": 12},
        "roi": {"size": 64},
    }
    assert cli.main(["configure", "--url", serve.url, "nosuchfield=1"]) == 1
    assert "no field 'nosuchfield'" in capsys.readouterr().err
    assert cli.main(["stop", "--url", serve.url]) == 0
    assert '"stopped": null' in capsys.readouterr().out  # nothing is running
    assert "liveptycho serve" in serve.log_file.read_text()


class _SigtermMidScan(threading.Thread):
    """SIGTERMs serve once its run has live results in Tiled and frames still to come;
    ``signalled`` is set when it has (or has given up)."""

    def __init__(self, serve: ServeProcess) -> None:
        super().__init__(name="liveptycho-test-sigterm", daemon=True)
        self.serve = serve
        self.positions_at_signal: int | None = None
        self.signalled = threading.Event()

    def run(self) -> None:
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                runs = self.serve.status()["runs"]
                running = [r for r in runs if r["status"] == "running"]
                if running and running[0]["counters"]["snapshots"] >= 2:
                    self.positions_at_signal = running[0]["positions"]
                    self.serve.terminate()
                    return
                time.sleep(0.1)
        finally:
            self.signalled.set()


def _release_when(until: threading.Event, *devices: Any) -> None:
    """The simulated detectors, held before a frame (the flyer's ``hold_before``), go on only
    once ``until`` is set: the scan is surely mid-way when serve is signalled, however slowly
    the machine runs (waiting on time alone, a loaded CI machine once took its second
    snapshot only after the last frame)."""

    def release() -> None:
        until.wait(60)
        for device in devices:
            device.release()

    threading.Thread(target=release, name="liveptycho-test-release", daemon=True).start()


def test_sigterm_mid_scan_ends_the_run_aborted_with_what_was_written(
    serve, publisher, RE, hxn_detectors, tiled_server
):
    eiger, panda = hxn_detectors
    beamline = SimulatedBeamline(x_num=12, y_num=12, photons_per_frame=2e5)
    killer = _SigtermMidScan(serve)
    half = beamline.x_num * beamline.y_num // 2
    _release_when(killer.signalled, eiger, panda)
    killer.start()
    result = fly(RE, eiger, panda, SimulatedSample(beamline), dwell=0.03, hold_before=half)
    killer.join(30)
    raw_uid = result.run_start_uids[0]
    assert result.exit_status == "success"  # the RunEngine never noticed
    assert killer.positions_at_signal is not None, serve.log()
    assert serve.process.wait(60) == 0, serve.log()
    assert killer.positions_at_signal <= half

    from tiled.client import from_uri

    node = processed(from_uri(tiled_server.uri), raw_uid)
    md = node.metadata
    assert md["status"] == "aborted"
    assert md["error"] == "serve shutting down"
    used = md["counters"]["frames_used"]
    assert used >= killer.positions_at_signal
    assert {"live", "final", "diffraction"} <= set(node)
    assert node["final"]["positions_m"].read().shape == (used, 2)
    assert node["diffraction"]["amplitude"].read().shape[0] == used
    assert node["live"]["object_amplitude"].read().shape == tuple(md["canvas"]["shape"])
    log = serve.log_file.read_text()
    assert "received SIGTERM" in log and "serve stopped; 1 running reconstruction" in log
