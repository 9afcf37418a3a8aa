import sys

from lightning_pbt.plugin.internals import main

sys.exit(main())
