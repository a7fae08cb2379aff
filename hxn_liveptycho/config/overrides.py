"""Overrides of a run's ScanConfig: one deep merge, checked where they enter.

Overrides reach a run from four places: ``LivePtycho(overrides=...)`` and
:meth:`LivePtycho.configure <hxn_liveptycho.callback.LivePtycho.configure>`
in process, ``PATCH /api/config/overrides`` (and ``liveptycho configure``) on
serve, ``liveptycho_configure`` from queueserver, and ``LIVEPTYCHO_OVERRIDES``.
All of them merge with :func:`deep_merge` and check the result with
:func:`check_overrides`, which validates the overrides exactly as a run will
(merged over a scan's derived configuration into a ``ScanConfig``) and refuses
them with one line naming each bad field and what it accepts. A refused change
leaves the previous overrides in place, so a typo never reaches the next scan.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from hxn_liveptycho.config.scan import ScanConfig
from hxn_liveptycho.errors import ConfigurationError
from hxn_liveptycho.util.validation import deep_merge, plain, validation_problems

# deep_merge and validation_problems live in hxn_liveptycho.util.validation; callers of the
# override checks find them here too.
__all__ = [
    "OverrideError",
    "check_overrides",
    "deep_merge",
    "merge_overrides",
    "validation_problems",
]

#: What a scan's documents always provide; overrides are validated merged over it, as on a run.
_DERIVED_STAND_IN: dict[str, Any] = {
    "uid": "override-check",
    "grid": {
        "kind": "mesh",
        "x_start_um": 0.0,
        "x_end_um": 1.0,
        "x_num": 2,
        "y_start_um": 0.0,
        "y_end_um": 1.0,
        "y_num": 2,
    },
    "energy_kev": 10.0,
    "distance_m": 1.0,
}


class OverrideError(ConfigurationError):
    """Overrides a run could not be configured with; ``problems`` holds (field path, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__(
            "invalid overrides: " + "; ".join(f"{path}: {text}" for path, text in problems)
        )

    @property
    def fields(self) -> list[str]:
        return [path for path, _ in self.problems]


def check_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides as plain dicts if a run can be configured with them, else :class:`OverrideError`.

    They are validated merged over what a scan's documents provide, the way
    :func:`~hxn_liveptycho.config.scan.scan_config_from_documents` merges them, so
    partial nested overrides (``{"recon": {"iterations": 50}}``) pass and any
    value ``ScanConfig`` would refuse on a run is refused now.
    """
    if not isinstance(overrides, Mapping):
        raise OverrideError([("(top level)", f"expected a mapping of fields, got {overrides!r}")])
    checked = plain(overrides)
    try:
        ScanConfig.model_validate(deep_merge(_DERIVED_STAND_IN, checked))
    except ValidationError as exc:
        raise OverrideError(validation_problems(exc, ScanConfig)) from None
    return checked


def merge_overrides(
    current: Mapping[str, Any], update: Mapping[str, Any], *, replace: bool = False
) -> dict[str, Any]:
    """The checked overrides after ``update``: deep-merged into ``current``, or replacing it."""
    return check_overrides(plain(update) if replace else deep_merge(current, update))
