"""The models that configure a run and a process.

``scan`` builds a run's :class:`~hxn_liveptycho.config.scan.ScanConfig` from its
documents; ``settings`` holds the process's ``LIVEPTYCHO_*`` settings; ``overrides``
and ``nn_params`` are the parts both of them share.
"""
