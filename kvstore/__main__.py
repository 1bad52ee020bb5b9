"""``python -m kvstore``: the ``kvstore`` command (see :mod:`kvstore.cli`)."""

import sys

from .cli import main

sys.exit(main())
