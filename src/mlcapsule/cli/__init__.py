"""Command line interface."""

# Ctrl-C while the command line is still importing (about 0.3 s) must not show a traceback.
# Installed first, with only built-in modules (`_signal`, and `os`, which the interpreter has
# already loaded): `signal` and `threading` would cost milliseconds of unguarded start-up.
import _signal
import os as _os


def _interrupted_while_starting(signum: int, frame: object) -> None:
    """Nothing has happened yet: say so in one line and stop, instead of a KeyboardInterrupt traceback."""
    try:
        _os.write(2, b"aborted\n")
    finally:
        _os._exit(130)


# Only in a process that has Python's default handler (not, say, under a test runner that set its
# own), and only in the main thread (elsewhere signal() raises ValueError); cli.main puts the
# default back once its imports are done.
_interrupted_while_starting._mlcapsule_startup = True  # type: ignore[attr-defined]
_current = _signal.getsignal(_signal.SIGINT)
if _current is _signal.default_int_handler or getattr(_current, "_mlcapsule_startup", False):
    try:
        _signal.signal(_signal.SIGINT, _interrupted_while_starting)
    except ValueError:
        pass
