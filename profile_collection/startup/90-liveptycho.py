"""Live ptychographic reconstruction of every ptychography scan, for HXN's IPython profile.

Runs after the files that create ``RE`` (the RunEngine). Builds one
:class:`~hxn_liveptycho.callback.LivePtycho` from ``LIVEPTYCHO_*`` environment
variables and subscribes it. ``live_ptycho`` stays a name in the user
namespace: it keeps the callback alive and is the handle for
``live_ptycho.status()``, ``.configure(...)``, ``.disable()``, ``.stop_run()``.

Anything that goes wrong here is logged and leaves the profile usable: the
beamline must be able to scan without live reconstruction. Set
``HXN_LIVEPTYCHO_OFF=1`` to skip this file altogether.
"""

import atexit
import logging
import os

_liveptycho_log = logging.getLogger("hxn_liveptycho.profile")

live_ptycho = None  # the LivePtycho instance, or None when it could not be built
live_ptycho_token = None  # RE.subscribe's token, for RE.unsubscribe(live_ptycho_token)


def _start_live_ptycho():
    """Build, subscribe and return (LivePtycho, token); log and return (None, None) on failure."""
    if os.environ.get("HXN_LIVEPTYCHO_OFF", "").strip().lower() in ("1", "true", "yes", "on"):
        _liveptycho_log.info("live ptychography disabled by HXN_LIVEPTYCHO_OFF")
        return None, None
    engine = globals().get("RE")
    if engine is None:
        _liveptycho_log.error("live ptychography not started: the profile has no RunEngine 'RE'")
        return None, None
    try:
        from hxn_liveptycho import Settings
        from hxn_liveptycho.callback import LivePtycho

        live = LivePtycho(Settings())
    except Exception:
        _liveptycho_log.exception(
            "live ptychography not started (check the LIVEPTYCHO_* environment variables)"
        )
        return None, None
    try:
        # The LivePtycho object itself is subscribed (the registry keeps it); the global
        # name below keeps it reachable for status and control, and for unsubscribing.
        token = engine.subscribe(live)
    except Exception:
        _liveptycho_log.exception("live ptychography not subscribed to the RunEngine")
        live.close(timeout=5.0)
        return None, None
    atexit.register(live.close, 10.0)
    where = live.tiled.describe()["uri"] if live.tiled is not None else "a custom sink"
    _liveptycho_log.info(
        "live ptychography subscribed (token %s); results go to %s under %s",
        token,
        where or "an embedded Tiled server in " + str(live.settings.data_dir),
        live.settings.catalog_path,
    )
    return live, token


try:
    live_ptycho, live_ptycho_token = _start_live_ptycho()
except Exception:  # never let this file break the profile
    _liveptycho_log.exception("live ptychography not started")
