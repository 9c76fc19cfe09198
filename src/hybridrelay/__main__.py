"""``python -m hybridrelay``."""

import sys

from hybridrelay.cli.main import main

sys.exit(main())
