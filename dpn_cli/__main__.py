"""`python -m dpn_cli ...`: the same as `dpn ...`."""

import sys

from dpn_cli import main

sys.exit(main())
