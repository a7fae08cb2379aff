"""Several ``liveptycho serve`` workers on one document stream: each run taken exactly once.

Why: a facility with several GPU nodes (or several GPUs of one node) runs one serve
per device, all subscribed to the same bluesky 0MQ proxy and the same detector PUB
streams, and wants any free worker to take the next scan and another to take over
when one dies. The choice is made in Redis, the coordination service the project
already runs for bluesky-queueserver, never by a protocol of our own:

- **Claims.** When the engine admits a run (its start document, after the settings
  chose it), the worker tries ``SET <prefix>:claim:<uid> <worker> NX PX <ttl>``
  (a worker still finishing a run waits a moment first, so a free one wins).
  The one that sets it reconstructs the run; the others leave it (the engine counts
  it ``runs_skipped`` with the reason ``taken by serve worker ...``, one log line) and
  its frames reach no session of theirs (``orphan_frames``).
- **Heartbeats.** Every ``heartbeat_s`` a worker refreshes the claims of its runs
  still going (only while the claim still names it: a Lua compare-and-expire),
  releases those that ended, and refreshes its registration (a hash
  ``<prefix>:worker:<name>`` with its runs, URL and heartbeat time).
- **Take-over.** Claimed runs are listed in the set ``<prefix>:runs:open`` until
  their holder releases them. A run in that set whose claim has expired lost its
  holder (SIGKILL, a node down, a network cut longer than ``claim_ttl_s``): the
  first live worker to claim it again takes it over, from its checkpoint when the
  shared ``checkpoint_dir`` holds one (``Engine.resume``, docs/resume.md), else by
  marking the container the dead worker left ``incomplete``. Either way Tiled ends
  with one container of the run that is not ``incomplete`` at most.

Redis unreachable when a run starts: the worker reconstructs it (a run is never lost
for want of Redis; other workers may then reconstruct it too), logged and counted as
``redis_errors``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from hxn_liveptycho.config.settings import Settings, redact_uri
from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.store.checkpoint import Checkpoint, CheckpointStore
from hxn_liveptycho.store.left_behind import mark_left_behind, stored_frames
from hxn_liveptycho.util.counters import Counters

if TYPE_CHECKING:
    from hxn_liveptycho.control.service import ServeService

__all__ = ["WorkerCoordinator", "default_worker_name", "list_workers", "redis_client"]

logger = logging.getLogger(__name__)

#: The prefix of every key the workers keep in Redis.
KEY_PREFIX = "liveptycho"
#: How long a worker's registration stays listed after its last heartbeat, in claim TTLs:
#: a dead worker is shown as dead for a while before it disappears from the list.
_REGISTRATION_TTLS = 20
#: How many of a worker's recent runs its registration lists.
_RUNS_LISTED = 10
#: How long (in claim TTLs) a claimed run may wait for its session before it is released.
_PENDING_TTLS = 4

#: How long a worker still finishing a run waits before it claims the next one, so that
#: a free worker takes it when there is one.
_BUSY_DEFER_S = 0.25

#: Refresh a key's expiry only while it holds this worker's name.
_REFRESH = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
#: Delete a key only while it holds this worker's name.
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


def default_worker_name() -> str:
    """``host:pid``: unique among the workers of one Redis."""
    return f"{socket.gethostname()}:{os.getpid()}"


def redis_client(url: str) -> Any:
    """A ``redis.Redis`` for ``url`` with short timeouts (a worker never hangs on Redis)."""
    try:
        import redis
    except ImportError:  # pragma: no cover - redis comes with the workers extra
        raise ConfigurationError(
            "redis_url is set but the 'redis' package is missing: "
            "pip install 'hxn_liveptycho[workers]' (or redis)"
        ) from None
    return redis.Redis.from_url(
        url, socket_timeout=2.0, socket_connect_timeout=2.0, decode_responses=True
    )


def _keys(prefix: str) -> dict[str, str]:
    return {
        "open": f"{prefix}:runs:open",
        "workers": f"{prefix}:workers",
    }


def list_workers(client: Any, ttl_s: float, prefix: str = KEY_PREFIX) -> list[dict[str, Any]]:
    """Every registered worker (alive or recently dead), by name: its URL, heartbeat age,
    whether it is alive (a heartbeat within its own claim TTL, else ``ttl_s``) and its
    recent runs."""
    now = time.time()
    found = []
    for name in sorted(client.smembers(_keys(prefix)["workers"])):
        entry = client.hgetall(f"{prefix}:worker:{name}")
        if not entry:
            client.srem(_keys(prefix)["workers"], name)  # its registration expired
            continue
        beat = float(entry.get("heartbeat", 0.0))
        age = max(0.0, now - beat)
        found.append(
            {
                "name": name,
                "url": entry.get("url"),
                "host": entry.get("host"),
                "pid": int(entry.get("pid", 0)),
                "started_at": float(entry.get("started_at", 0.0)),
                "heartbeat_age_s": round(age, 1),
                "alive": entry.get("state") == "serving"
                and age <= float(entry.get("claim_ttl_s", ttl_s)),
                "state": entry.get("state"),
                "runs": json.loads(entry.get("runs") or "[]"),
            }
        )
    return found


class WorkerCoordinator:
    """This serve worker's part in the shared Redis: claims, heartbeats, take-overs.

    :meth:`start` sets itself as the engine's run admission and starts the heartbeat
    thread (``liveptycho-workers``), whose first beat takes over the runs dead workers
    left; :meth:`close` (after the service has closed) releases the claims of the runs
    that ended and marks this worker stopped.
    """

    def __init__(self, settings: Settings, service: ServeService, *, client: Any = None) -> None:
        if settings.redis_url is None and client is None:
            raise ConfigurationError("a worker coordinator needs redis_url")
        if settings.heartbeat_s >= settings.claim_ttl_s:
            raise ConfigurationError(
                f"heartbeat_s ({settings.heartbeat_s:g}) must be shorter than claim_ttl_s "
                f"({settings.claim_ttl_s:g}), or claims expire between heartbeats"
            )
        self.settings = settings
        self.service = service
        self.name = settings.worker_name or default_worker_name()
        self.prefix = KEY_PREFIX
        self.redis_url = redact_uri(settings.redis_url) if settings.redis_url else None
        self.client = client if client is not None else redis_client(str(settings.redis_url))
        self.store = CheckpointStore.at(settings.checkpoint_dir, settings.data_dir)
        self.counters = Counters(
            [
                "runs_claimed",
                "runs_taken_elsewhere",
                "runs_taken_over",
                "runs_resumed",
                "runs_marked_incomplete",
                "claims_lost",
                "redis_errors",
            ]
        )
        self._ttl_ms = int(settings.claim_ttl_s * 1000)
        self._instance = f"{default_worker_name()}:{time.time():.6f}"
        self._started_at = time.time()
        #: Runs this worker holds the claim of: uid → time.monotonic() of the claim.
        self._mine: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="liveptycho-workers", daemon=True)
        try:
            self.client.ping()
            self._refresh = self.client.register_script(_REFRESH)
            self._release = self.client.register_script(_RELEASE)
            self._check_name()
        except ConfigurationError:
            raise
        except Exception as exc:
            raise ConfigurationError(f"cannot use Redis at {self.redis_url}: {exc}") from None

    # ---- keys
    def _claim_key(self, uid: str) -> str:
        return f"{self.prefix}:claim:{uid}"

    def _run_key(self, uid: str) -> str:
        return f"{self.prefix}:run:{uid}"

    def _worker_key(self, name: str | None = None) -> str:
        return f"{self.prefix}:worker:{name or self.name}"

    def _check_name(self) -> None:
        """Refuse a name another live worker has; a dead process of this host (a restart
        with a fixed ``worker_name``) leaves it free."""
        entry = self.client.hgetall(self._worker_key())
        beat = float(entry.get("heartbeat", 0.0)) if entry else 0.0
        here = bool(entry) and entry.get("host") == socket.gethostname()
        if here and not _process_alive(int(entry.get("pid", 0))):
            return
        if entry and entry.get("state") == "serving" and time.time() - beat <= self._ttl_ms / 1e3:
            raise ConfigurationError(
                f"another serve worker named {self.name!r} is alive in Redis (pid "
                f"{entry.get('pid')} on {entry.get('host')}): give each worker its own worker_name"
            )

    # ---- life
    def start(self) -> None:
        """Claim the runs the engine admits from now on; take over the dead workers' runs."""
        self.service.live.engine.admit = self.admit
        self._register("serving")
        if not self.settings.tiled_uri:
            logger.warning(
                "serve worker %s has no tiled_uri: its results go to its own embedded Tiled, "
                "not to one the workers share",
                self.name,
            )
        logger.info(
            "serve worker %s: runs claimed in Redis at %s (claims live %g s, heartbeat %g s), "
            "checkpoints in %s",
            self.name,
            self.redis_url,
            self.settings.claim_ttl_s,
            self.settings.heartbeat_s,
            self.store.directory,
        )
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """After the service closed: release the ended runs' claims, mark this worker stopped."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        try:
            self._beat(take_over=False)
            self._register("stopped")
        except Exception as exc:
            logger.warning("serve worker %s: could not say goodbye to Redis: %s", self.name, exc)
        self.client.close()

    def _run(self) -> None:
        while True:
            try:
                self._beat(take_over=True)
            except Exception as exc:
                self.counters.add("redis_errors")
                logger.warning("serve worker %s: heartbeat failed: %s", self.name, exc)
            if self._stop.wait(self.settings.heartbeat_s):
                return

    # ---- the engine's run admission (its dispatcher thread)
    def admit(self, start: Mapping[str, Any]) -> str | None:
        """Claim run ``start['uid']``: None when this worker takes it, else why not."""
        uid = str(start["uid"])
        if any(not session.finished for session in self.service.sessions()):
            # Still finishing a run: a free worker, if there is one, claims this one first.
            time.sleep(_BUSY_DEFER_S)
        try:
            won = self.client.set(self._claim_key(uid), self.name, nx=True, px=self._ttl_ms)
            if won:
                with self._lock:
                    self._mine[uid] = time.monotonic()
                pipe = self.client.pipeline()
                pipe.hset(
                    self._run_key(uid),
                    mapping={
                        "uid": uid,
                        "scan_id": str(start.get("scan_id")),
                        "worker": self.name,
                        "status": "running",
                        "claimed_at": time.time(),
                    },
                )
                pipe.sadd(f"{self.prefix}:runs:open", uid)
                pipe.set(
                    f"{self.prefix}:runs:latest",
                    json.dumps([uid, float(start.get("time") or 0.0)]),
                )
                pipe.execute()
                self.counters.add("runs_claimed")
                logger.info("scan %s (%s) claimed by this worker", start.get("scan_id"), uid[:8])
                return None
            holder = self.client.get(self._claim_key(uid))
        except Exception as exc:
            self.counters.add("redis_errors")
            logger.warning(
                "scan %s (%s): Redis did not answer the claim (%s); reconstructed here",
                start.get("scan_id"),
                uid[:8],
                exc,
            )
            return None
        self.counters.add("runs_taken_elsewhere")
        return f"taken by serve worker {holder}"

    # ---- the heartbeat
    def _beat(self, *, take_over: bool) -> None:
        sessions = {s.uid: s for s in self.service.sessions()}
        with self._lock:
            mine = dict(self._mine)
        now = time.monotonic()
        for uid, since in mine.items():
            session = sessions.get(uid)
            if session is None and now - since < _PENDING_TTLS * self.settings.claim_ttl_s:
                self._refresh(keys=[self._claim_key(uid)], args=[self.name, self._ttl_ms])
            elif session is None or session.finished:
                self._end(uid, session.summary() if session is not None else None)
            elif not self._hold(uid):
                self._lost(uid, session)
            else:
                summary = session.summary()
                self.client.hset(
                    self._run_key(uid),
                    mapping={
                        "status": str(summary.get("status")),
                        "container_path": str(summary.get("container_path") or ""),
                    },
                )
        self._register("serving" if not self._stop.is_set() else "stopping")
        if take_over:
            for uid in self.client.smembers(f"{self.prefix}:runs:open"):
                if uid in mine or self.client.exists(self._claim_key(uid)):
                    continue
                if self.client.set(self._claim_key(uid), self.name, nx=True, px=self._ttl_ms):
                    self._take_over(uid)

    def _hold(self, uid: str) -> bool:
        """Refresh run ``uid``'s claim; claim it again when it expired with nobody taking it
        (Redis was away for a while). False when another worker holds it now."""
        key = self._claim_key(uid)
        if self._refresh(keys=[key], args=[self.name, self._ttl_ms]):
            return True
        return bool(self.client.set(key, self.name, nx=True, px=self._ttl_ms))

    def _end(self, uid: str, summary: Mapping[str, Any] | None) -> None:
        """The run ended here (its final write done): its record says how; claim released."""
        record: dict[str, Any] = {"ended_at": time.time()}
        if summary is not None:
            record["status"] = str(summary.get("status"))
            record["container_path"] = str(summary.get("container_path") or "")
        pipe = self.client.pipeline()
        pipe.hset(self._run_key(uid), mapping=record)
        pipe.srem(f"{self.prefix}:runs:open", uid)
        pipe.execute()
        self._release(keys=[self._claim_key(uid)], args=[self.name])
        with self._lock:
            self._mine.pop(uid, None)

    def _lost(self, uid: str, session: Any) -> None:
        """Another worker holds the claim now (this one was silent past the TTL): stop here,
        so that the run is not finished twice."""
        holder = self.client.get(self._claim_key(uid))
        self.counters.add("claims_lost")
        logger.error(
            "run %s: its claim expired and worker %s took it over; stopped here", uid[:8], holder
        )
        session.cancel(f"its claim passed to serve worker {holder} (this worker fell silent)")
        with self._lock:
            self._mine.pop(uid, None)

    # ---- taking a dead worker's run over
    def _take_over(self, uid: str) -> None:
        record = self.client.hgetall(self._run_key(uid))
        previous = record.get("worker", "?")
        self.counters.add("runs_taken_over")
        try:
            checkpoint: Checkpoint | None = self.store.load(uid)
        except FileNotFoundError:
            checkpoint = None
        except Exception as exc:  # CheckpointError, OSError: mark it instead
            logger.error("run %s: its checkpoint cannot be read (%s)", uid[:8], exc)
            checkpoint = None
        self.client.hset(
            self._run_key(uid),
            mapping={
                "worker": self.name,
                "taken_over_from": previous,
                "taken_over_at": time.time(),
            },
        )
        newer = None if checkpoint is None else self._newer_run(checkpoint)
        if checkpoint is not None and newer is None:
            with self._lock:
                self._mine[uid] = time.monotonic()
            self._resume(checkpoint, previous)
            return
        # Nothing to go on from, or nowhere to go: the run ends here, incomplete.
        if newer is None:
            why = "left no checkpoint"
        else:
            # Resumed now, it would take the newer run's frames (the newest open run does).
            why = f"the scan had ended before the take-over (run {newer[:8]} began since)"
            self.store.remove(uid)
        self._end(uid, {"status": "incomplete", "container_path": record.get("container_path")})
        self.counters.add("runs_marked_incomplete")
        logger.warning(
            "run %s (scan %s): worker %s died holding it and %s; its container is marked "
            "incomplete",
            uid[:8],
            record.get("scan_id"),
            previous,
            why,
        )
        threading.Thread(
            target=self._mark_incomplete,
            args=(uid, previous, why),
            name=f"liveptycho-workers-mark-{uid[:8]}",
            daemon=True,
        ).start()

    def _newer_run(self, checkpoint: Checkpoint) -> str | None:
        """A run that began after ``checkpoint``'s (its scan is then over), seen here or
        claimed by any worker; None when there is none."""
        began = float(checkpoint.start.get("time") or 0.0)
        latest = [self.service.latest_start]
        with contextlib.suppress(ValueError, TypeError):
            uid, at = json.loads(self.client.get(f"{self.prefix}:runs:latest") or "null")
            latest.append((str(uid), float(at)))
        for found in latest:
            if found is not None and found[0] != checkpoint.uid and found[1] > began:
                return found[0]
        return None

    def _resume(self, checkpoint: Checkpoint, previous: str) -> None:
        tiled = self.service.live.tiled
        reader = None
        if tiled is not None and checkpoint.container_path:
            path = checkpoint.container_path
            reader = lambda: stored_frames(tiled.client(), path)  # noqa: E731
        self.service.adopt_runs(
            {checkpoint.uid: [d["uid"] for name, d in checkpoint.documents if name == "descriptor"]}
        )
        self.service.live.engine.resume(checkpoint, stored_frames=reader)
        self.counters.add("runs_resumed")
        logger.warning("taking over from dead worker %s: %s", previous, checkpoint.describe())
        if tiled is not None and checkpoint.container_path:
            threading.Thread(
                target=self._retry,
                args=(lambda: mark_left_behind(tiled.client(), checkpoint), checkpoint.uid),
                name=f"liveptycho-workers-mark-{checkpoint.uid[:8]}",
                daemon=True,
            ).start()

    def _mark_incomplete(self, uid: str, previous: str, why: str) -> None:
        tiled = self.service.live.tiled
        if tiled is None:
            return
        reason = (
            f"serve worker {previous} stopped mid-run and {why}; worker {self.name} took "
            "the run over and ended it incomplete with what was stored"
        )
        self._retry(
            lambda: mark_running_incomplete(tiled.client(), self.settings, uid, reason), uid
        )

    def _retry(self, mark: Any, uid: str, attempts: int = 10) -> None:
        for attempt in range(attempts):
            if self._stop.is_set() and attempt:
                return
            try:
                if mark():
                    logger.info("run %s: the container left behind is marked incomplete", uid[:8])
                return
            except Exception as exc:
                if attempt == attempts - 1:
                    logger.warning("run %s: container left behind not marked: %s", uid[:8], exc)
                    return
                self._stop.wait(min(1.0 + attempt, 10.0))

    # ---- status
    def _recent_runs(self) -> list[dict[str, Any]]:
        runs = []
        for session in self.service.sessions()[-_RUNS_LISTED:]:
            summary = session.summary()
            runs.append(
                {
                    "uid": session.uid,
                    "scan_id": summary.get("scan_id"),
                    "status": summary.get("status"),
                    "iteration": summary.get("iteration"),
                }
            )
        return runs

    def _url(self) -> str:
        host = self.settings.serve_host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        return f"http://{host}:{self.settings.serve_port}"

    def _register(self, state: str) -> None:
        key = self._worker_key()
        pipe = self.client.pipeline()
        pipe.hset(
            key,
            mapping={
                "name": self.name,
                "instance": self._instance,
                "state": state,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "url": self._url(),
                "started_at": self._started_at,
                "heartbeat": time.time(),
                "claim_ttl_s": self.settings.claim_ttl_s,
                "runs": json.dumps(self._recent_runs(), default=str),
            },
        )
        pipe.pexpire(key, self._ttl_ms * _REGISTRATION_TTLS)
        pipe.sadd(f"{self.prefix}:workers", self.name)
        pipe.execute()

    def describe(self) -> dict[str, Any]:
        """This worker: its name, the Redis it uses (no password), its counters and runs."""
        with self._lock:
            holding = sorted(self._mine)
        return {
            "name": self.name,
            "redis": self.redis_url,
            "claim_ttl_s": self.settings.claim_ttl_s,
            "heartbeat_s": self.settings.heartbeat_s,
            "checkpoint_dir": str(self.store.directory),
            "holding": holding,
            **self.counters.snapshot(),
        }

    def workers(self) -> list[dict[str, Any]]:
        """Every worker registered in Redis (see :func:`list_workers`)."""
        return list_workers(self.client, self.settings.claim_ttl_s, self.prefix)


def _process_alive(pid: int) -> bool:
    if pid <= 0 or pid == os.getpid():
        return pid == os.getpid()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def mark_running_incomplete(root: Any, settings: Settings, raw_uid: str, reason: str) -> bool:
    """Mark ``incomplete`` every container of run ``raw_uid`` still ``running`` under the
    catalog path (what a dead worker left without a checkpoint); True if any was marked."""
    from tiled.queries import Eq

    node = root
    for part in (p for p in settings.catalog_path.split("/") if p):
        if part not in node:
            return False
        node = node[part]
    marked = False
    for container in node.search(Eq("raw_uid", raw_uid)).values():
        metadata = dict(container.metadata)
        if metadata.get("status") != "running":
            continue
        metadata.update(
            status="incomplete", reason=reason, left_behind_at=datetime.now(UTC).isoformat()
        )
        container.update_metadata(metadata=metadata)
        marked = True
    return marked
