"""``python -m mlcapsule``: the command line.

The start-up Ctrl-C handler goes in first, with built-in modules only: importing
``mlcapsule.cli`` (which installs the same handler) takes long enough for a Ctrl-C to land
before it does. ``cli.main`` puts Python's handler back once its imports are done.
"""

import _signal
import os as _os
import sys


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Nothing has happened yet: say so in one line and stop, instead of a KeyboardInterrupt traceback."""
    try:
        _os.write(2, b"aborted\n")
    finally:
        _os._exit(130)


_interrupted_while_starting._mlcapsule_startup = True  # type: ignore[attr-defined]
if _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
    try:
        _signal.signal(_signal.SIGINT, _interrupted_while_starting)
    except ValueError:
        pass

from .cli.main import main  # noqa: E402

sys.exit(main())
