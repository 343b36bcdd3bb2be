"""``python -m mlcapsule``: the command line. ``mlcapsule.cli`` (imported first, by the line
below) installs the start-up Ctrl-C handler before anything heavy is imported."""

import sys

from .cli.main import main

sys.exit(main())
