"""The suite-wide secrets check of ``conftest.py`` finds what it is meant to (issue 23).

"Reading any log file, status, config view or Tiled metadata produced by the whole test
suite finds no token or API key (a test greps them)": conftest registers every secret the
suite makes and, at the end of the session, searches everything the tests wrote. These
tests prove that search finds a planted secret (and says where, without showing it) and
passes a clean folder. Planted secrets live in a folder outside the session's temporary
folder, so the session's own search never meets them.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
import zmq
from conftest import SecretWatch, _SecretLogWatch, redacted_hint, scan_tree

from hxn_liveptycho.config.settings import Settings

PLANTED = "plantedKey0123456789abcdefXYZ"  # not a KEY/TOKEN name: the session never registers it
ORIGIN = {PLANTED: "planted by test_secrets_suite"}


@pytest.fixture
def outside() -> Iterator[Path]:
    """A folder outside the session's temporary folder, removed at the end of the test."""
    with tempfile.TemporaryDirectory(prefix="secrets-suite-") as folder:
        yield Path(folder)


def _clean_tree(root: Path) -> None:
    (root / "data" / "tiled").mkdir(parents=True)
    (root / "data" / "tiled" / "access.log").write_text(
        '127.0.0.1 - "GET /api/v1/?api_key=*** HTTP/1.1" 200\n'
        '127.0.0.1 - "GET /api/v1/metadata/?token=%2A%2A%2A HTTP/1.1" 200\n'
    )
    (root / "data" / "backup.json").write_text(
        json.dumps({"settings": {"api_token": "**********", "tiled_uri": "http://h/?api_key=***"}})
    )
    (root / "serve.log").write_text("INFO serve started; API behind a bearer token\n")


def test_a_clean_folder_passes(outside: Path) -> None:
    _clean_tree(outside)
    assert scan_tree(outside, ORIGIN) == []


def test_a_secret_in_a_log_file_is_found_with_its_line(outside: Path) -> None:
    _clean_tree(outside)
    log = outside / "data" / "tiled" / "server.log"
    log.write_text(f"line one\nline two\nGET /api/v1/metadata/{PLANTED} 404\n")
    finds = scan_tree(outside, ORIGIN)
    assert [f.where for f in finds] == [f"{log}:3"]
    assert PLANTED not in str(finds[0])  # the report shows a hint, never the secret
    assert redacted_hint(PLANTED) in finds[0].what
    assert "planted by test_secrets_suite" in finds[0].what


def test_a_secret_in_a_json_file_is_found_in_any_encoding(outside: Path) -> None:
    _clean_tree(outside)
    backup = outside / "data" / "backups" / "run.json"
    backup.parent.mkdir()
    backup.write_text(json.dumps({"uid": "u1", "config": {"key": PLANTED}}, indent=1))
    odd = "planted/Tok+en=é0123"  # as written, URL-quoted and JSON-escaped it differs
    (outside / "quoted.log").write_text(f"GET /x?q={quote(odd, safe='')}\n")
    (outside / "escaped.json").write_text(json.dumps({"x": odd}))
    finds = scan_tree(outside, {**ORIGIN, odd: "planted"})
    assert sorted(f.where for f in finds) == sorted(
        [f"{backup}:4", f"{outside / 'quoted.log'}:1", f"{outside / 'escaped.json'}:1"]
    )
    assert all(PLANTED not in str(f) and odd not in str(f) for f in finds)


def test_a_secret_in_tiled_metadata_is_found(outside: Path) -> None:
    """Tiled keeps metadata in SQLite: a binary file, the place is a byte offset."""
    with sqlite3.connect(outside / "catalog.db") as db:
        db.execute("CREATE TABLE nodes (key TEXT, metadata TEXT)")
        db.execute("INSERT INTO nodes VALUES (?, ?)", ("run", json.dumps({"uri": PLANTED})))
    db.close()
    finds = scan_tree(outside, ORIGIN)
    assert len(finds) == 1 and ":byte " in finds[0].where
    assert str(outside / "catalog.db") in finds[0].where


def test_a_secret_inside_binary_data_is_found_at_its_offset(outside: Path) -> None:
    """Binary files are searched in their printable runs; the place is the true offset."""
    noise = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8).tobytes()
    at = 700_001
    data = b"\0" + noise[:at] + PLANTED.encode() + noise[at:]
    (outside / "chunk.0.0").write_bytes(data)
    (outside / "clean.0.0").write_bytes(b"\0" + noise)
    finds = scan_tree(outside, ORIGIN)
    assert [f.where for f in finds] == [f"{outside / 'chunk.0.0'}:byte {at + 1}"]


def test_unregistered_credentials_in_clear_are_found_by_their_format(outside: Path) -> None:
    """A key made in a child process (serve's embedded Tiled) is not registered here: an
    ``api_key=``, ``token=``, bearer header or CurveZMQ secret key in clear is found anyway."""
    _, curve_secret = zmq.curve_keypair()
    lines = [
        "GET http://127.0.0.1:1/api/v1?api_key=0123456789abcdef0123456789abcdef",
        "GET /api/status?token=another-secret-token 200",
        "Authorization: Bearer s3cret-bearer-value",
        f'{{"curve_secret_key": "{curve_secret.decode()}"}}',
        "GET /api/v1/?api%5Fkey=urlquotedsecret99",
    ]
    (outside / "client.log").write_text("\n".join(lines) + "\n")
    finds = scan_tree(outside, {})
    assert [f.where.rpartition(":")[2] for f in finds] == ["1", "2", "3", "4", "5"]
    text = "\n".join(map(str, finds))
    for secret in ("0123456789abcdef0123456789abcdef", "another-secret-token", "s3cret-bearer"):
        assert secret not in text
    assert curve_secret.decode() not in text
    assert scan_tree(outside, {}, patterns=False) == []


def test_only_files_written_since_are_searched_when_asked(outside: Path) -> None:
    old = outside / "old.log"
    old.write_text(PLANTED)
    assert len(scan_tree(outside, ORIGIN)) == 1
    assert scan_tree(outside, ORIGIN, since=old.stat().st_mtime + 10) == []


def test_a_secret_in_a_log_record_is_found() -> None:
    watch = SecretWatch()
    watch.add(PLANTED, "planted by test_secrets_suite")
    logger = logging.getLogger("liveptycho-test-secrets-suite")
    logger.propagate = False  # the session's own watch must not see the planted secret
    handler = _SecretLogWatch(watch)
    logger.addHandler(handler)
    try:
        logger.warning("nothing to see")
        assert watch.finds == []
        logger.warning("connected with %s", PLANTED)
        logger.warning("GET /?token=from-a-child-process")
    finally:
        logger.removeHandler(handler)
    assert len(watch.finds) == 2
    assert all("log record of liveptycho-test-secrets-suite" in f.where for f in watch.finds)
    assert all(PLANTED not in str(f) for f in watch.finds)


def test_a_reply_echoing_the_requests_own_secret_is_no_leak() -> None:
    watch = SecretWatch()
    watch.add(PLANTED, "planted")
    watch.check_text(f"no such entry {PLANTED}", "reply", echoed=f"/metadata/{PLANTED}")
    assert watch.finds == []
    watch.check_text(f'{{"tiled_uri": "?api_key={PLANTED}"}}', "reply", echoed="/api/config")
    assert len(watch.finds) == 1 and PLANTED not in str(watch.finds[0])


def test_the_session_registers_secrets_where_they_are_made(secrets_watch: SecretWatch) -> None:
    """zmq.curve_keypair, Settings and the module constants feed the session's registry."""
    assert secrets_watch.active
    _, curve_secret = zmq.curve_keypair()
    Settings(api_token="registered-token-0123", data_dir=Path(tempfile.gettempdir()) / "x")
    known = secrets_watch.registry.secrets()
    assert curve_secret.decode() in known
    assert "registered-token-0123" in known
    from conftest import TILED_API_KEY

    assert TILED_API_KEY in known
    assert PLANTED not in known


def _run_session(
    folder: Path, test_source: str, workers: int = 0
) -> subprocess.CompletedProcess[str]:
    """A pytest session of one test file, with this suite's conftest, in ``folder``
    (``workers`` > 0: spread over that many pytest-xdist workers, as the suite runs)."""
    (folder / "conftest.py").write_text((Path(__file__).parents[1] / "conftest.py").read_text())
    (folder / "pytest.ini").write_text("[pytest]\n")
    (folder / "test_one.py").write_text(test_source)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    command += ["--basetemp", str(folder / "basetemp"), "test_one.py"]
    command += ["-n", str(workers)] if workers else ["-p", "no:xdist"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(
        command, cwd=folder, env=env, capture_output=True, text=True, timeout=120, check=False
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_a_session_that_wrote_a_secret_fails(outside: Path, workers: int) -> None:
    """End to end: every test passes, one wrote an API key to a log; the session fails,
    naming the file and line, without printing the key; also when a worker process of
    pytest-xdist ran the test (its check reaches the controller)."""
    leaked = "0123456789abcdef0123456789abcdef"
    done = _run_session(
        outside,
        "def test_writes_a_key(tmp_path):\n"
        "    (tmp_path / 'server.log').write_text('start\\n')\n"
        "    with open(tmp_path / 'server.log', 'a') as log:\n"
        f"        log.write('GET /?api_key={leaked}')\n",
        workers,
    )
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 passed" in done.stdout
    assert "secrets found in what the suite wrote" in done.stdout
    assert "server.log:2: credential in clear: api_key=" in done.stdout
    assert leaked not in done.stdout + done.stderr


@pytest.mark.parametrize("workers", [0, 2])
def test_a_clean_session_passes(outside: Path, workers: int) -> None:
    done = _run_session(
        outside, "def test_clean(tmp_path):\n    (tmp_path / 'x.log').write_text('ok')\n", workers
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "none found in 1 files" in done.stdout, done.stdout
