"""Overrides are deep-merged one way everywhere and validated where they enter.

Before: ``LivePtycho.configure`` replaced earlier overrides and accepted anything
(``recon.algorithm="epei"``, ``recon.iterations=-5``), so every later run failed
with a traceback; the engine laid ``configure``'s overrides over
``settings.overrides`` shallowly while serve merged deeply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hxn_liveptycho.callback import LivePtycho
from hxn_liveptycho.config.overrides import OverrideError, check_overrides, deep_merge
from hxn_liveptycho.config.settings import Settings
from hxn_liveptycho.control.queueserver import LivePtychoControl
from hxn_liveptycho.errors import ConfigurationError

pytestmark = pytest.mark.timeout(90)

HXN_SCAN_MD: dict[str, Any] = {
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


class NoSink:
    """A sink factory that refuses at once: these tests look at configuration, not results."""

    def __call__(self) -> Any:
        raise RuntimeError("no result store in this test")


def make_live(tmp_path: Path, **fields: Any) -> LivePtycho:
    settings = Settings(
        tiled_uri="http://127.0.0.1:9/", data_dir=tmp_path, stream_timeout_s=1.0, **fields
    )
    return LivePtycho(settings, sink_factory=NoSink())


@pytest.fixture
def live(tmp_path: Path) -> Any:
    live = make_live(tmp_path)
    yield live
    live.close()


def test_deep_merge_is_key_by_key_and_modifies_nothing() -> None:
    base = {"recon": {"iterations": 3, "batch_size": 8}, "roi": {"size": 64}}
    update = {"recon": {"algorithm": "lsqml"}, "mode": "both"}
    merged = deep_merge(base, update)
    assert merged == {
        "recon": {"iterations": 3, "batch_size": 8, "algorithm": "lsqml"},
        "roi": {"size": 64},
        "mode": "both",
    }
    assert base == {"recon": {"iterations": 3, "batch_size": 8}, "roi": {"size": 64}}
    merged["recon"]["iterations"] = 99
    assert base["recon"]["iterations"] == 3  # no shared nested dicts


def test_configure_merges_into_earlier_overrides(live: LivePtycho) -> None:
    live.configure(recon={"iterations": 7}, roi={"size": 64})
    result = live.configure(recon={"algorithm": "lsqml"})
    assert result == {"recon": {"iterations": 7, "algorithm": "lsqml"}, "roi": {"size": 64}}
    assert live.overrides == result
    live.configure({"recon": {"iterations": 9}})  # a mapping works as well as keywords
    assert live.overrides["recon"] == {"iterations": 9, "algorithm": "lsqml"}
    assert live.configure(replace=True) == {}  # replace=True alone clears them


@pytest.mark.parametrize(
    ("overrides", "field", "allowed"),
    [
        ({"recon": {"algorithm": "epei"}}, "recon.algorithm", "'epie', 'dm' or 'lsqml'"),
        ({"recon": {"iterations": -5}}, "recon.iterations", "greater than or equal to 0"),
        ({"roi": {"sise": 256}}, "roi.sise", "did you mean 'size'?"),
        ({"mode": "fast"}, "mode", "'iterative', 'nn' or 'both'"),
        ({"energy_kev": 200}, "energy_kev", "less than 100"),
    ],
)
def test_configure_refuses_invalid_overrides_and_keeps_the_previous(
    live: LivePtycho, overrides: dict[str, Any], field: str, allowed: str
) -> None:
    live.configure(recon={"iterations": 7})
    with pytest.raises(ConfigurationError) as raised:
        live.configure(overrides)
    message = str(raised.value)
    assert "\n" not in message
    assert f"{field}: " in message and allowed in message, message
    assert isinstance(raised.value, OverrideError) and raised.value.fields == [field]
    assert live.overrides == {"recon": {"iterations": 7}}


def test_the_merged_result_is_what_is_validated(live: LivePtycho) -> None:
    """Each change alone is valid; together DM and position refinement are not."""
    live.configure(recon={"position_refinement": True})
    with pytest.raises(ConfigurationError, match=r"recon: position_refinement works with"):
        live.configure(recon={"algorithm": "dm"})
    assert live.overrides == {"recon": {"position_refinement": True}}


def test_overrides_given_at_construction_and_in_the_environment_are_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError, match=r"recon\.iterations"):
        LivePtycho(
            Settings(tiled_uri="http://127.0.0.1:9/", data_dir=tmp_path),
            overrides={"recon": {"iterations": -5}},
            sink_factory=NoSink(),
        )
    monkeypatch.setenv("LIVEPTYCHO_OVERRIDES", '{"recon": {"algorithm": "epei"}}')
    with pytest.raises(ConfigurationError) as raised:
        Settings()
    assert "LIVEPTYCHO_OVERRIDES" in str(raised.value)
    assert "recon.algorithm: 'epei' refused" in str(raised.value)


def test_partial_nested_overrides_pass_as_on_a_run() -> None:
    """A run merges overrides over what its documents give: partial models are fine."""
    assert check_overrides({"grid": {"x_num": 5}}) == {"grid": {"x_num": 5}}
    assert check_overrides({"recon": {"schedule": [["dm", 0.3], ["lsqml", 0.7]]}})
    with pytest.raises(ConfigurationError, match="fractions must sum to 1"):
        check_overrides({"recon": {"schedule": [["dm", 0.3], ["lsqml", 0.3]]}})


def test_a_run_gets_settings_and_configure_deep_merged(RE: Any, tmp_path: Path) -> None:
    """settings.overrides' recon fields survive a configure(recon=...) (they were dropped)."""
    from bluesky.plans import count
    from ophyd.sim import det

    live = make_live(tmp_path, overrides={"recon": {"iterations": 3, "batch_size": 8}})
    try:
        live.configure(recon={"algorithm": "lsqml"})
        RE.subscribe(live)
        RE(count([det], num=3, md=HXN_SCAN_MD))
        assert live.wait(timeout=30)
        (session,) = live.engine.sessions()
        assert session.overrides["recon"] == {
            "iterations": 3,
            "batch_size": 8,
            "algorithm": "lsqml",
        }
    finally:
        live.close()


def test_queueserver_configure_merges_validates_and_replaces(live: LivePtycho) -> None:
    control = LivePtychoControl(live)
    first = control.configure(recon={"iterations": 10})
    assert first == {"overrides": {"recon": {"iterations": 10}}}
    assert control.configure(roi={"size": 64})["overrides"] == {
        "recon": {"iterations": 10},
        "roi": {"size": 64},
    }
    with pytest.raises(ConfigurationError, match=r"recon.algorithm: 'epei' refused"):
        control.configure(recon={"algorithm": "epei"})
    with pytest.raises(ConfigurationError, match="RoiConfig has no field 'sise'"):
        control.configure(roi={"sise": 256})
    assert control.status()["overrides"] == {"recon": {"iterations": 10}, "roi": {"size": 64}}
    assert control.configure(replace=True, mode="both") == {"overrides": {"mode": "both"}}
    assert control.configure(replace=True) == {"overrides": {}}


def test_reprocess_deep_merges_its_overrides_over_the_live_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reprocessing with recon={"iterations": 3} keeps the live recon.algorithm (was dropped)."""
    import hxn_liveptycho.replay as replay

    seen: list[Settings] = []

    def fake_replay_run(source: str, *, settings: Settings, pace: str) -> Any:
        seen.append(settings)
        raise RuntimeError("not replayed in this test")

    monkeypatch.setattr(replay, "replay_run", fake_replay_run)
    live = make_live(tmp_path, overrides={"roi": {"size": 64}})
    try:
        control = LivePtychoControl(live)
        control.configure(recon={"algorithm": "lsqml", "iterations": 50})
        with pytest.raises(ConfigurationError, match=r"recon\.iterations: -1 refused"):
            control.reprocess("archive", recon={"iterations": -1})
        control.reprocess("archive", recon={"iterations": 3})
        assert control.wait_reprocessing(timeout=10)
        (settings,) = seen
        assert settings.overrides == {
            "roi": {"size": 64},
            "recon": {"algorithm": "lsqml", "iterations": 3},
        }
    finally:
        live.close()
