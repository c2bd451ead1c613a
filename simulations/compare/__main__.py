"""``python -m simulations.compare`` (see :mod:`simulations.compare`)."""

import sys

from simulations.compare.cli import main

sys.exit(main())
