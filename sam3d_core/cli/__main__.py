"""`python -m sam3d_core.cli ...` = the `sam3d` command."""

import sys

from sam3d_core.cli.main import main

sys.exit(main())
