"""Helpers of the serve tests: a real `liveptycho serve` subprocess and a RunEngine Publisher."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServeProcess:
    """``liveptycho serve`` in a subprocess, running bluesky's 0MQ proxy for the RE side."""

    def __init__(
        self,
        tmp_path: Path,
        tiled_uri: str,
        eiger: Any,
        panda: Any,
        *,
        token: str | None = None,
        iterations: int = 10,
        proxy_in: str | None = None,
        documents: str | None = None,
        data_dir: Path | None = None,
        name: str = "serve",
        env: dict[str, str] | None = None,
    ) -> None:
        """``proxy_in``/``documents``/``data_dir``: a second serve taking over from a first
        (the same addresses and folder); ``name`` names its log files; ``env`` adds
        settings."""
        self.port = free_port()
        self.proxy_in = proxy_in or f"tcp://127.0.0.1:{free_port()}"
        self.documents = documents or f"tcp://127.0.0.1:{free_port()}"
        self.data_dir = data_dir or tmp_path / "serve-data"
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = token
        self.log_file = tmp_path / f"{name}.log"
        self.output = tmp_path / f"{name}.out"
        extra = env or {}
        env = {
            **os.environ,
            "LIVEPTYCHO_TILED_URI": tiled_uri,
            "LIVEPTYCHO_OVERRIDES": json.dumps({"recon": {"iterations": iterations}}),
            "LIVEPTYCHO_LIVE_INTERVAL_S": "0.3",
            "LIVEPTYCHO_EIGER_DECODE_THREADS": "0",
            **extra,
        }
        if token:
            env["LIVEPTYCHO_API_TOKEN"] = token
        command = [
            sys.executable,
            "-m",
            "hxn_liveptycho.cli",
            "serve",
            "--port",
            str(self.port),
            "--proxy-in",
            self.proxy_in,
            "--documents",
            self.documents,
            "--eiger",
            eiger.endpoint,
            "--panda",
            panda.endpoint,
            "--data-dir",
            str(self.data_dir),
            "--log-file",
            str(self.log_file),
        ]
        with self.output.open("wb") as out:
            self.process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=10.0)

    def wait_ready(self, eiger: Any, panda: Any, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"serve exited early:\n{self.log()}"
            try:
                if self.http.get("/api/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError(f"serve did not come up in {timeout} s:\n{self.log()}")
        assert eiger.publisher.wait_for_subscribers(1, timeout=10)
        assert panda.publisher.wait_for_subscribers(1, timeout=10)

    def connect(self, publisher: Any, timeout: float = 20.0) -> None:
        """Send a harmless start document until serve has one (0MQ's slow joiner)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = {"uid": str(uuid.uuid4()), "time": time.time(), "plan_name": "ping"}
            publisher("start", probe)
            time.sleep(0.2)
            if self.status()["documents"]["counters"]["documents"] > 0:
                return
        raise AssertionError(f"no document reached serve in {timeout} s:\n{self.log()}")

    def status(self) -> dict[str, Any]:
        reply = self.http.get("/api/status")
        reply.raise_for_status()
        return reply.json()

    def run(self, raw_uid: str) -> dict[str, Any] | None:
        for run in self.status()["runs"]:
            if run["uid"] == raw_uid:
                return run
        return None

    def wait_finished(self, raw_uid: str, timeout: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.run(raw_uid)
            if run is not None and run.get("finished"):
                return run
            time.sleep(0.3)
        raise AssertionError(f"run {raw_uid} not finished in {timeout} s:\n{self.log()}")

    def terminate(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def log(self) -> str:
        return self.output.read_text(errors="replace") if self.output.exists() else ""

    def close(self) -> None:
        self.http.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
