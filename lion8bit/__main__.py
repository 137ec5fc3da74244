"""``python -m lion8bit ...``: the ``lion8bit`` console script."""

import sys

from .budget import main

sys.exit(main())
