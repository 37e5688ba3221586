"""``python -m asyncdump`` is the ``asyncdump`` command."""

import sys

from .cli import main

sys.exit(main())
