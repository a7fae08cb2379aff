"""Environment and command-line mistakes end in one clear line and a non-zero exit status.

Before: ``LIVEPTYCHO_SERVE_PORT=abc`` or ``LIVEPTYCHO_ARRAY_BACKEND=gpu`` gave a
pydantic traceback; a misspelt ``LIVEPTYCHO_*`` name was ignored silently;
``liveptycho replay <scan_id>`` without ``--tiled-uri`` ended after a minute in
a 109-line ``ConnectError``; a wrong option printed the whole usage block.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hxn_liveptycho import cli
from hxn_liveptycho.config.settings import Settings, warn_unknown_environment
from hxn_liveptycho.errors import ConfigurationError

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("LIVEPTYCHO_SERVE_PORT", "abc", "'abc' refused: Input should be a valid integer"),
        ("LIVEPTYCHO_ARRAY_BACKEND", "gpu", "'gpu' refused: Input should be 'auto', 'numpy'"),
        ("LIVEPTYCHO_OVERRIDES", "{bad", "cannot parse: Expecting property name"),
        ("LIVEPTYCHO_GPU_PLACEMENT__ITERATIVE", "x", "'x' refused: Input should be 'auto'"),
    ],
)
def test_a_bad_variable_is_one_line_naming_it(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    name: str,
    value: str,
    says: str,
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigurationError) as raised:
        Settings()
    assert f"{name}: {says}" in str(raised.value)
    assert "\n" not in str(raised.value)
    assert cli.main(["settings"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("liveptycho settings: invalid settings: ")
    assert name in err


def test_a_field_given_in_code_is_named_as_a_field(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match=r"setting serve_port: 70000 refused"):
        Settings(serve_port=70000, data_dir=tmp_path)


def test_the_cli_shows_no_traceback(tmp_path: Path) -> None:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        "LIVEPTYCHO_SERVE_PORT": "abc",
    }
    for command in (["settings"], ["status"], ["serve"]):
        done = subprocess.run(
            [sys.executable, "-m", "hxn_liveptycho.cli", *command],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (command, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "LIVEPTYCHO_SERVE_PORT: 'abc' refused" in lines[0], lines


def test_a_misspelt_variable_is_warned_about_once_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setenv("LIVEPTYCHO_TILED_URL", "http://tiled:8000")
    monkeypatch.setenv("LIVEPTYCHO_OVERRIDES__RECON__ITERATIONS", "5")  # nested: valid
    monkeypatch.setenv("HXN_LIVEPTYCHO_OFF", "1")  # not ours
    with caplog.at_level(logging.WARNING, logger="hxn_liveptycho.config.settings"):
        settings = Settings(data_dir=tmp_path)
        Settings(data_dir=tmp_path)
    assert settings.tiled_uri is None  # the misspelt name was not read
    assert settings.overrides == {"recon": {"iterations": 5}}
    assert [r.getMessage() for r in caplog.records] == [
        "environment variable LIVEPTYCHO_TILED_URL is not a liveptycho setting; "
        "did you mean LIVEPTYCHO_TILED_URI?"
    ]
    assert warn_unknown_environment({"LIVEPTYCHO_TEST_ARTIFACTS": "/tmp"}) == []


def test_a_misspelt_nested_variable_is_an_error_with_the_closest_name(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setenv("LIVEPTYCHO_GPU_PLACEMENT__ITERATVE", "1")
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigurationError) as raised:
        Settings(data_dir=tmp_path)
    assert str(raised.value) == (
        "invalid settings: LIVEPTYCHO_GPU_PLACEMENT__ITERATVE: GpuPlacement has no field "
        "'iteratve'; did you mean 'iterative'? (fields: iterative, nn)"
    )
    assert not caplog.records  # one message, not a warning and an error


def test_replay_of_a_scan_id_without_tiled_is_one_line_at_once(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.delenv("LIVEPTYCHO_TILED_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    began = time.monotonic()
    assert cli.main(["replay", "12345"]) == 2
    assert time.monotonic() - began < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--tiled-uri" in err and "LIVEPTYCHO_TILED_URI" in err


def test_a_missing_archive_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["replay", str(tmp_path / "no-such-archive")]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [["stop", "--bogus"], ["nosuchcommand"], ["status", "--url"], ["models", "nothing"]],
)
def test_a_wrong_option_is_one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.endswith("(see --help)\n"), err


def test_serve_unreachable_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["status", "--url", "http://127.0.0.1:9"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach liveptycho serve" in err
