"""One way to turn nested run state into plain JSON (Tiled metadata, API and queue replies)."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["json_safe"]


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON types; anything JSON does not know becomes its ``str``."""
    return json.loads(json.dumps(value, default=str))
