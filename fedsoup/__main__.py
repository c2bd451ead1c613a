"""``python -m fedsoup``: the same command line as the ``fedsoup`` console script."""

import sys

from fedsoup.cli import main

sys.exit(main())
