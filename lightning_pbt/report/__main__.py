import sys

from lightning_pbt.tools.report import main

sys.exit(main())
