"""``python -m hxn_liveptycho.cli``: the ``liveptycho`` command without its script."""

import sys

from hxn_liveptycho.cli import main

sys.exit(main())
