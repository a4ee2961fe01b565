"""``python -m vfiofs``: the same as the ``vfiofs`` command."""

import sys

from vfiofs.cli import main

sys.exit(main())
