"""`python -m aem_kernels.train ...`: see `cli.py`."""

import sys

from .cli import main

sys.exit(main())
