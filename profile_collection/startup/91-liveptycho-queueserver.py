"""Queueserver functions that steer the LivePtycho built by ``90-liveptycho.py``.

Puts ``liveptycho_status``, ``liveptycho_enable``, ``liveptycho_disable``,
``liveptycho_configure``, ``liveptycho_select_model`` and ``liveptycho_stop``
into the namespace, for ``function_execute`` (list them under
``allowed_functions`` in ``user_group_permissions.yaml``). In plain IPython
they work too, and return what queueserver would send back.
"""

from hxn_liveptycho.control.queueserver import LivePtychoControl

globals().update(LivePtychoControl(globals().get("live_ptycho")).functions())
