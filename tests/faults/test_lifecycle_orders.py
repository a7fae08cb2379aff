"""Property: whatever order documents come in (stops lost, duplicated or late; starts
duplicated; descriptors lost), every run reaches exactly one terminal state, with a
reason, within its bound, and its final write happens once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_lifecycle_states import Run, Sinks, make_engine

from hxn_liveptycho.pipeline.session import FINAL_STATUSES

pytestmark = pytest.mark.timeout(240)

IDLE_S = 1.0

run_plans = st.fixed_dictionaries(
    {
        "duplicate_start": st.booleans(),
        "frames": st.sampled_from([0, 4, 9]),
        "positions": st.sampled_from([0, 5, 9]),
        "end_streams": st.booleans(),
        "stop": st.sampled_from(["sent", "lost", "twice", "after_next_start"]),
        "exit_status": st.sampled_from(["success", "abort", "fail"]),
    }
)


def test_every_run_ends_once_whatever_the_order(tmp_path: Path) -> None:
    sinks = Sinks()
    engine = make_engine(tmp_path, sinks, run_idle_timeout_s=IDLE_S)
    seen: set[str] = set()

    @settings(
        max_examples=20,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(plans=st.lists(run_plans, min_size=1, max_size=3))
    def check(plans: list[dict[str, Any]]) -> None:
        runs: list[Run] = []
        late_stop: Run | None = None
        for plan in plans:
            run = Run(engine)
            if late_stop is not None:  # the previous run's stop, after this run's start
                late_stop.stop()
                late_stop = None
            runs.append(run)
            if plan["duplicate_start"]:
                engine.submit("start", run.bundle.start_doc)
            run.arm(eiger=plan["frames"] > 0, panda=plan["positions"] > 0)
            run.frames(range(plan["frames"]))
            if plan["positions"]:
                run.positions(n=plan["positions"])
            if plan["end_streams"]:
                run.end_streams()
            stop = plan["stop"]
            if stop in ("sent", "twice"):
                run.stop(plan["exit_status"])
            if stop == "twice":
                run.stop(plan["exit_status"])
            if stop == "after_next_start":
                late_stop = run
        if late_stop is not None:
            late_stop.stop()
        # idle bound + one second for streams + the final passes, with room for a slow CI
        assert engine.wait_idle(timeout=30), [s.summary() for s in engine.sessions()]
        for run in runs:
            seen.add(run.uid)
            summary = run.summary()
            assert summary["status"] in FINAL_STATUSES, summary
            assert summary["reason"], summary
            finals = [s for s in sinks.made if (s.final_metadata or {}).get("raw_uid") == run.uid]
            assert len(finals) == 1, (summary, len(finals))
            assert finals[0].final_metadata["status"] == summary["status"]
            assert finals[0].closed

    try:
        check()
        assert seen
    finally:
        engine.close(timeout=20)
