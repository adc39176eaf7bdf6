"""``python -m headslim``: the same as the ``headslim`` command."""

import sys

from headslim.cli import main

sys.exit(main())
