"""``python -m cli``: the ``bizcenter`` command (cli/main.py)."""

import sys

from cli.main import main

sys.exit(main())
