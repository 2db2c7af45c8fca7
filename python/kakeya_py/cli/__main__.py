"""``python -m kakeya_py.cli``: the ``kakeya`` command."""

import sys

from . import main

sys.exit(main())
