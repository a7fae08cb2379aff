"""Starting the embedded Tiled leaves the host's logging alone (issue 23).

In-process, uvicorn's logging config closed every handler of the host (a
beamline profile's own log file silently stopped). The server now runs in a
child process; this holds it to that: a handler attached to the root logger
before the connection starts still writes after the server is up and a run
has been written to it, and nothing in this process reconfigures logging.
"""

from __future__ import annotations

import logging
import logging.config
import os
from pathlib import Path

from scans import SMALL, fly, make_live, processed

from hxn_liveptycho.sim import SimulatedSample

KEY = "hostLoggingKey0123456789abcdef"


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []
        self.closed = False

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def close(self) -> None:
        self.closed = True
        super().close()


def test_the_hosts_handlers_survive_the_embedded_server_and_a_run(
    RE, hxn_detectors, tmp_path: Path, monkeypatch
) -> None:
    for name in list(os.environ):
        if name.startswith("LIVEPTYCHO_"):
            monkeypatch.delenv(name)
    reconfigured: list[object] = []
    monkeypatch.setattr(logging.config, "dictConfig", lambda c: reconfigured.append(c))
    monkeypatch.setattr(logging.config, "fileConfig", lambda *a, **k: reconfigured.append(a))
    root = logging.getLogger()
    records = _Records()
    profile_log = tmp_path / "profile.log"
    file_handler = logging.FileHandler(profile_log)
    file_handler.setLevel(logging.INFO)
    old_level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(records)
    root.addHandler(file_handler)
    handlers_before = list(root.handlers)
    eiger, panda = hxn_detectors
    live = make_live(RE, eiger, panda, tmp_path, tiled_api_key=KEY)  # connect_in_background
    try:
        assert live.tiled is not None and live.tiled.embedded
        live.tiled.client()  # the server is up
        result = fly(RE, eiger, panda, SimulatedSample(SMALL))
        assert live.wait(timeout=240)
        node = processed(live.tiled.client(), result.run_start_uids[0])
        assert node.metadata["status"] == "complete"
        logging.getLogger("beamline.profile").info("still logging after the run")
        handlers_after = list(root.handlers)
    finally:
        live.close()
        root.removeHandler(records)
        root.removeHandler(file_handler)
        root.setLevel(old_level)
        assert not file_handler.stream.closed
        file_handler.close()
    assert reconfigured == []
    assert handlers_after == handlers_before  # none removed, replaced or added
    assert file_handler.stream is None  # closed by this test's own close(), not before
    assert not records.closed
    assert "still logging after the run" in records.messages
    assert any("embedded Tiled server at" in m for m in records.messages)
    text = profile_log.read_text()
    assert "still logging after the run" in text
    assert KEY not in text and all(KEY not in m for m in records.messages)
