"""Overrides of :class:`~hxn_liveptycho.scan.ScanConfig`: one deep merge, checked where they enter.

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

import copy
import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from hxn_liveptycho.errors import ConfigurationError

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


def _plain(value: Any) -> Any:
    """Mappings (and pydantic models: the fields that were set) as plain, fresh dicts."""
    if isinstance(value, BaseModel):
        value = value.model_dump(exclude_unset=True)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    return copy.deepcopy(value)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` merged into ``base``, nested mappings key by key; neither is modified.

    A mapping replaces a non-mapping (and the reverse); a model instance counts
    as the mapping of the fields it was given.
    """
    merged = _plain(base)
    for key, value in _plain(update).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _model_of(annotation: Any) -> type[BaseModel] | None:
    return (
        annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    )


def _describe(error: Any, root: type[BaseModel]) -> tuple[str, str]:
    """A pydantic error as (dotted field path, one-line message with what is allowed)."""
    model: type[BaseModel] | None = root
    path: list[str] = []
    for part in error["loc"]:
        if model is not None:
            field = model.model_fields.get(str(part))
            if field is None:
                if error["type"] == "extra_forbidden":
                    path.append(str(part))
                    fields = sorted(model.model_fields)
                    close = difflib.get_close_matches(str(part), fields, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else ""
                    text = (
                        f"{model.__name__} has no field {str(part)!r}{hint} "
                        f"(fields: {', '.join(fields)})"
                    )
                    return ".".join(path), text
                break
            path.append(str(part))
            model = _model_of(field.annotation)
        elif isinstance(part, int):
            path.append(str(part))
        # other parts name the member of a union pydantic tried ("constrained-int"): skip
    return ".".join(path) or "(top level)", str(error["msg"]).removeprefix("Value error, ")


def validation_problems(exc: ValidationError, root: type[BaseModel]) -> list[tuple[str, str]]:
    """Each field of ``exc`` once, with the value refused (union alternatives joined by 'or')."""
    grouped: dict[str, list[str]] = {}
    values: dict[str, str] = {}
    for error in exc.errors():
        path, text = _describe(error, root)
        texts = grouped.setdefault(path, [])
        if text not in texts:
            texts.append(text)
        if error["type"] != "extra_forbidden" and not isinstance(error.get("input"), Mapping):
            values.setdefault(path, f"{error.get('input')!r} refused: ")
    return [(path, values.get(path, "") + " or ".join(texts)) for path, texts in grouped.items()]


def check_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides as plain dicts if a run can be configured with them, else :class:`OverrideError`.

    They are validated merged over what a scan's documents provide, the way
    :func:`~hxn_liveptycho.scan.scan_config_from_documents` merges them, so
    partial nested overrides (``{"recon": {"iterations": 50}}``) pass and any
    value ``ScanConfig`` would refuse on a run is refused now.
    """
    from hxn_liveptycho.scan import ScanConfig  # scan imports this module's deep_merge

    if not isinstance(overrides, Mapping):
        raise OverrideError([("(top level)", f"expected a mapping of fields, got {overrides!r}")])
    plain = _plain(overrides)
    try:
        ScanConfig.model_validate(deep_merge(_DERIVED_STAND_IN, plain))
    except ValidationError as exc:
        raise OverrideError(validation_problems(exc, ScanConfig)) from None
    return plain


def merge_overrides(
    current: Mapping[str, Any], update: Mapping[str, Any], *, replace: bool = False
) -> dict[str, Any]:
    """The checked overrides after ``update``: deep-merged into ``current``, or replacing it."""
    return check_overrides(_plain(update) if replace else deep_merge(current, update))
