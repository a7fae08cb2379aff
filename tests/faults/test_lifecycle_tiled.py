"""Through a real RunEngine and Tiled: a run that received no frames is not 'complete'.

Was: the scan below (ptychography metadata, but no detector series ever armed) ended
``complete`` in Tiled and in status(), with only a warning in the log.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.config.settings import Settings

pytestmark = pytest.mark.timeout(120)

HXN_MD: dict[str, Any] = {
    "ptychography": True,
    "motors": ["zpssx", "zpssy"],
    "scan": {
        "type": "2D_FLY_PANDA",
        "scan_input": [-1.0, 1.0, 3, -1.0, 1.0, 3, 0.01],
        "detector_distance": 2.0,
        "detectors": ["eiger2"],
        "energy": 12.0,
    },
}


def test_run_without_frames_is_incomplete_in_tiled(
    RE: Any, tmp_path: Path, tiled_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from bluesky.plans import count
    from ophyd.sim import det
    from tiled.queries import Eq

    settings = Settings(tiled_uri=tiled_server.uri, data_dir=tmp_path, stream_timeout_s=1.0)
    live = LivePtycho(settings)
    try:
        RE.subscribe(live)
        with caplog.at_level(logging.CRITICAL, logger="hxn_liveptycho"):
            result = RE(count([det], num=2, md=HXN_MD))
            assert result.exit_status == "success"
            assert live.wait(timeout=60)
        raw_uid = result.run_start_uids[0]
        (run,) = live.status()["runs"]
        assert run["status"] == "incomplete", run
        assert run["reason"].startswith("no detector frames were received")
        assert run["finished"]
        found = live.tiled.client()["processed"]["liveptycho"].search(Eq("raw_uid", raw_uid))
        assert len(found) == 1
        metadata = found.values().first().metadata
        assert metadata["status"] == "incomplete"
        assert metadata["reason"] == run["reason"]
        assert metadata["counters"]["frames_received"] == 0
    finally:
        live.close()


def test_plan_that_raises_is_aborted_with_the_error_text(
    RE: Any, tmp_path: Path, tiled_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Was: 'aborted' with no error text anywhere."""
    import bluesky.plan_stubs as bps
    import bluesky.preprocessors as bpp
    from ophyd.sim import det
    from tiled.queries import Eq

    @bpp.run_decorator(md=HXN_MD)
    def plan_that_raises() -> Any:
        yield from bps.trigger_and_read([det])
        raise RuntimeError("motor zpssx did not reach its target")

    settings = Settings(tiled_uri=tiled_server.uri, data_dir=tmp_path, stream_timeout_s=1.0)
    live = LivePtycho(settings)
    uids: list[str] = []
    try:
        RE.subscribe(live)
        RE.subscribe(lambda name, doc: uids.append(doc["uid"]) if name == "start" else None)
        with caplog.at_level(logging.CRITICAL, logger="hxn_liveptycho"):
            with pytest.raises(RuntimeError, match="did not reach"):
                RE(plan_that_raises())
            assert live.wait(timeout=60)
        (run,) = live.status()["runs"]
        assert run["status"] == "aborted", run
        assert "'fail'" in run["reason"] and "did not reach its target" in run["reason"]
        found = live.tiled.client()["processed"]["liveptycho"].search(Eq("raw_uid", uids[0]))
        metadata = found.values().first().metadata
        assert metadata["status"] == "aborted"
        assert metadata["reason"] == run["reason"]
    finally:
        live.close()
