"""``python -m flows.cli``: the same as the ``zhllama`` console script."""

import sys

from .main import main

sys.exit(main())
