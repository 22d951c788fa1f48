"""`python -m cli ...`: the same as the `pbft` command."""

import sys

from cli.main import main

sys.exit(main())
