"""The live page in a real headless Chromium, driven over the Chrome DevTools Protocol.

Chromium comes from Debian (``apt-get install chromium``); ``.ci/run`` installs
it. Without it the test fails under CI (``CI`` set) and is skipped elsewhere.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import zmq
from bluesky.callbacks.zmq import Publisher
from scans import fly, processed
from serve_helpers import ServeProcess
from waiting import wait_for

from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample

#: Reads the amplitude and quality pictures' pixels back through a canvas and hashes them.
_PICTURE_STATE = """(() => {
  const hashOf = (kind) => {
    const img = document.querySelector(`figure[data-kind="${kind}"] img`);
    if (!img.complete || !img.naturalWidth) return null;
    const canvas = document.createElement('canvas');
    canvas.width = img.naturalWidth; canvas.height = img.naturalHeight;
    const g = canvas.getContext('2d');
    g.drawImage(img, 0, 0);
    const data = g.getImageData(0, 0, canvas.width, canvas.height).data;
    let hash = 0;
    for (let i = 0; i < data.length; i++) hash = (hash * 31 + data[i]) >>> 0;
    return hash;
  };
  const img = document.querySelector('figure[data-kind="amplitude"] img');
  const progress = document.getElementById('run-progress').textContent;
  const loaded = [...document.querySelectorAll('#pictures figure:not([hidden]) img')]
    .filter((i) => i.naturalWidth > 0).map((i) => i.alt);
  return {progress, hash: hashOf('amplitude'), coverage: hashOf('coverage'),
          error_map: hashOf('error_map'), version: img.dataset.version, loaded,
          convergence: document.getElementById('run-convergence').textContent,
          resolution: document.getElementById('run-resolution').textContent};
})()"""


#: The finished run's state: progress line, pictures shown and the Tiled link of the run.
_FINAL_STATE = """(() => {
  const loaded = [...document.querySelectorAll('#pictures figure:not([hidden]) img')]
    .filter((i) => i.complete && i.naturalWidth > 0).map((i) => i.alt);
  const link = document.querySelector('#runs tbody a');
  return {progress: document.getElementById('run-progress').textContent, loaded,
          link: link ? link.href : null,
          convergence: document.getElementById('run-convergence').textContent,
          resolution: document.getElementById('run-resolution').textContent};
})()"""
#: What the page shows once the run is complete.
FINAL_PICTURES = {
    "object amplitude",
    "object phase",
    "probe amplitude",
    "error curve",
    "illumination map",
    "data error map",
    "constrained amplitude",
}


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
    pytest.skip("chromium is not installed (apt-get install chromium); CI installs and runs it")


class DevTools:
    """A minimal CDP client: one page target, commands answered in order."""

    def __init__(self, executable: str, profile: Path) -> None:
        from websockets.sync.client import connect

        self.process = subprocess.Popen(
            [
                executable,
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "--window-size=1400,1000",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"

        def port_written() -> bool:
            assert self.process.poll() is None, "chromium exited"
            return port_file.exists() and bool(port_file.read_text().strip())

        wait_for(port_written, timeout=30, interval=0.05, what="chromium's DevTools port")
        port = port_file.read_text().split()[0]
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
        page = next(t for t in targets if t["type"] == "page")
        self.socket = connect(page["webSocketDebuggerUrl"], max_size=None)
        self._ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        self.socket.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=30))
            if message.get("id") == call_id:
                assert "error" not in message, message
                return message["result"]

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def close(self) -> None:
        self.socket.close()
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[DevTools]:
    tools = DevTools(_chromium(), tmp_path / "chromium-profile")
    yield tools
    tools.close()


class _PageWatcher(threading.Thread):
    """Samples the page while the scan runs: which amplitude pictures it showed."""

    def __init__(self, browser: DevTools) -> None:
        super().__init__(name="liveptycho-test-page", daemon=True)
        self.browser = browser
        self.stop = threading.Event()
        self.samples: list[dict[str, Any]] = []

    def run(self) -> None:
        while not self.stop.wait(0.25):
            self.samples.append(self.browser.evaluate(_PICTURE_STATE))


def test_live_page_shows_pictures_that_change_during_the_scan(
    browser, tmp_path, tiled_server, hxn_detectors, RE, monkeypatch
):
    eiger, panda = hxn_detectors
    # The half-set resolution estimate on: its line must reach the page (serve reads the
    # setting from the environment it inherits).
    monkeypatch.setenv("LIVEPTYCHO_LIVE_QUALITY__RESOLUTION", "true")
    serve = ServeProcess(tmp_path, tiled_server.uri, eiger, panda, token="pagetoken", iterations=5)
    publisher = Publisher(serve.proxy_in)
    try:
        serve.wait_ready(eiger, panda)
        serve.connect(publisher)
        RE.subscribe(publisher)
        browser.call("Page.navigate", url=f"{serve.url}/?token=pagetoken")
        watcher = _PageWatcher(browser)
        watcher.start()
        beamline = SimulatedBeamline(x_num=10, y_num=10, photons_per_frame=2e5)
        # 0.12 s a point (12 s for the scan): at 0.05 s, one CI run on two loaded cores drew
        # a single picture while the run was still running.
        result = fly(RE, eiger, panda, SimulatedSample(beamline), dwell=0.12)
        raw_uid = result.run_start_uids[0]
        serve.wait_finished(raw_uid)
        watcher.stop.set()  # the run is over; one DevTools caller at a time from here
        watcher.join(10)
        # The page learns of the end at its next event: wait for the final picture and the
        # Tiled link to be shown, not for a time that is usually enough.
        seen: list[dict[str, Any]] = []

        def final_shown() -> bool:
            seen.append(browser.evaluate(_FINAL_STATE))
            state = seen[-1]
            return (
                state["progress"].startswith("complete: 100/100 positions")
                and set(state["loaded"]) >= FINAL_PICTURES
                and "/api/v1/metadata/processed/liveptycho/scan" in (state["link"] or "")
                and ("converged" in state["convergence"] or "improving" in state["convergence"])
                and state["resolution"].startswith("resolution")
                and state["resolution"].endswith("(half-set FRC, half-bit)")
                and "not yet" not in state["resolution"]
            )

        wait_for(final_shown, timeout=30, interval=0.1, what=lambda: f"final page {seen[-1]}")

        running = [s for s in watcher.samples if s["hash"] and "running" in s["progress"]]
        assert len({s["hash"] for s in running}) >= 2, watcher.samples  # changed mid-scan
        # The quality maps are shown, and follow the scan, while it runs.
        for kind in ("coverage", "error_map"):
            hashes = {s[kind] for s in watcher.samples if s[kind] and "running" in s["progress"]}
            assert len(hashes) >= 2, (kind, watcher.samples)
        assert any(s["convergence"] for s in running), watcher.samples
        assert any("half-set FRC" in s["resolution"] for s in running), watcher.samples
        # ... and the final estimate is in the run's container metadata in Tiled.
        from tiled.client import from_uri

        stored = processed(from_uri(tiled_server.uri), raw_uid).metadata["resolution"]
        assert stored["estimated"] and stored["iteration"] >= 1
        # In nm from the run's pixel size, the same figure as in canvas pixels.
        if not stored["resolved_to_nyquist"]:
            assert stored["half_period_nm"] == pytest.approx(
                stored["half_period_px"] * stored["pixel_size_nm"], rel=1e-6
            )
        assert sum(stored["positions"]) == 100

        shot = browser.call("Page.captureScreenshot", format="png")["data"]
        picture = tmp_path / "live-page.png"
        picture.write_bytes(base64.b64decode(shot))
        kept = Path(os.environ.get("LIVEPTYCHO_TEST_ARTIFACTS", tempfile.gettempdir()))
        kept.mkdir(parents=True, exist_ok=True)
        shutil.copy(picture, kept / "liveptycho-live-page.png")
        sys.stdout.write(f"\nlive page screenshot: {kept / 'liveptycho-live-page.png'}\n")
    finally:
        publisher._socket.setsockopt(zmq.LINGER, 0)  # see tests/test_serve.py
        publisher.close()
        serve.close()


def test_quality_pictures_come_from_the_snapshot_maps():
    """The quality pictures show the snapshot's maps; the constrained amplitude is blank
    (NaN, drawn transparent) where the data do not constrain the object."""
    from hxn_liveptycho.control.render import picture_array, render_png

    obj = np.full((6, 8), 2.0 + 0j, dtype=np.complex64)
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[1:4, 2:6] = 1
    coverage = np.arange(48, dtype=np.float32).reshape(6, 8)
    snapshot = {"object": obj, "constrained": mask, "coverage": coverage}
    assert picture_array("error_map", snapshot, None) is None  # maps off: no picture
    np.testing.assert_array_equal(picture_array("coverage", snapshot, None), coverage)
    shown = picture_array("constrained", snapshot, None)
    assert shown is not None
    np.testing.assert_array_equal(np.isnan(shown), mask == 0)
    assert np.all(shown[mask == 1] == 2.0)
    assert render_png("constrained", shown).startswith(b"\x89PNG")
    assert picture_array("constrained", {"object": obj}, None) is None
