"""``python -m chunkcache.cli``: the ``chunkcache`` command."""

import sys

from chunkcache.cli import main

sys.exit(main())
