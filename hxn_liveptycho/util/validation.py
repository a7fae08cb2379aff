"""How configuration models are combined and how their errors read, for every model.

:func:`deep_merge` combines a base configuration with partial updates key by
key; :func:`validation_problems` turns a pydantic ``ValidationError`` into one
(field path, message) pair per field, with the close match for a misspelt
name. Why a leaf module: ``ScanConfig`` (:mod:`~hxn_liveptycho.config.scan`),
``Settings`` and the override checks (:mod:`~hxn_liveptycho.config.overrides`) all
use them, and the override checks need ``ScanConfig``; with the shared tools
here the imports point one way (overrides -> scan -> validation).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

__all__ = ["deep_merge", "plain", "validation_problems"]


def plain(value: Any) -> Any:
    """Mappings (and pydantic models: the fields that were set) as plain, fresh dicts."""
    if isinstance(value, BaseModel):
        value = value.model_dump(exclude_unset=True)
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    return copy.deepcopy(value)


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``update`` merged into ``base``, nested mappings key by key; neither is modified.

    A mapping replaces a non-mapping (and the reverse); a model instance counts
    as the mapping of the fields it was given.
    """
    merged = plain(base)
    for key, value in plain(update).items():
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
