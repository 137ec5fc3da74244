"""``python -m lion8bit ...``: the ``lion8bit`` console script."""

import sys

from .budget.cli import main

sys.exit(main())
