"""`python -m sam3d_core.serve [--model NAME] [--device DEV]`: the worker, as `sam3d serve` runs it."""

import sys

from sam3d_core.cli.serve import main

sys.exit(main())
