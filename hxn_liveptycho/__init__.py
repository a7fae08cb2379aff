"""Live ptychographic reconstruction for the HXN nanoprobe, as a Bluesky callback.

from hxn_liveptycho import LivePtycho
RE.subscribe(LivePtycho())
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from hxn_liveptycho.callback import LivePtycho
    from hxn_liveptycho.config.settings import Settings

__all__ = ["LivePtycho", "Settings", "__version__"]


def __getattr__(name: str) -> Any:
    """Import lazily so ``liveptycho --help`` and the profile stay fast."""
    if name == "LivePtycho":
        from hxn_liveptycho.callback import LivePtycho

        return LivePtycho
    if name == "Settings":
        from hxn_liveptycho.config.settings import Settings

        return Settings
    raise AttributeError(name)
