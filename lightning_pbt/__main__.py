"""``python -m lightning_pbt best RUN_DIR``: the public command that reads a finished run folder. The code
lives in :mod:`lightning_pbt.tools.command`; this module keeps the command where the docs name it.
"""

import sys

from lightning_pbt.tools.command import main

sys.exit(main())
