"""Command line interface."""

import os as _os
import signal as _signal
import threading as _threading


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Ctrl-C while the command line is still importing (about 0.3 s): nothing has happened
    yet, so say so in one line and stop, instead of a KeyboardInterrupt traceback."""
    try:
        _os.write(2, b"aborted\n")
    finally:
        _os._exit(130)


# Only in a process that has Python's default handler (not, say, under a test runner that set its
# own); cli.main puts the default back once its imports are done.
if (_threading.current_thread() is _threading.main_thread()
        and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler):
    _signal.signal(_signal.SIGINT, _interrupted_while_starting)
