"""``mlcapsule serve --workers N``: N server processes on one listening socket (pre-fork).

The parent builds the app once (settings, provider key, database migrations), closes its own
database connections, binds the socket, and forks N workers; each runs uvicorn on the shared
socket and the kernel spreads the connections between them. The workers keep no state of their
own: nonces, grants, device slots and receipt chains are all in the database, so N workers (or
N instances on several machines, on one PostgreSQL) behave as one server (see
:meth:`~mlcapsule.server.service.ProviderService.provision` for how the locks hold across
processes).

The parent only supervises: a worker that dies (a crash, the OOM killer, a SIGKILL) is
replaced at once; SIGTERM or SIGINT (Ctrl-C) stops every worker gracefully (uvicorn finishes
the requests in flight), a second one kills them. Workers that keep dying at start-up stop the
server instead of being restarted in a loop.

Fork rather than uvicorn's own ``workers=`` (which spawns fresh interpreters and re-imports an
app factory by name): the provider key is loaded, and its passphrase read, once in the parent,
and never passes through the environment or a file.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from typing import Any

from ..enclave.errors import ServerError

log = logging.getLogger("mlcapsule.server")

#: A worker that exits within this many seconds of its start counts as a start-up failure.
_FAST_DEATH = 2.0
#: This many start-up failures in a row stop the server.
_MAX_FAST_DEATHS = 5


def serve(app: Any, sock: socket.socket, *, workers: int = 1, log_level: str = "info",
          log_config: dict[str, Any] | None = None) -> None:
    """Serve ``app`` on the bound, listening ``sock`` with ``workers`` processes (1: this one).
    ``log_config`` (:func:`~mlcapsule.server.observability.log_config`) replaces uvicorn's own."""
    import uvicorn

    if workers < 1:
        raise ValueError("workers must be at least 1")
    logs: dict[str, Any] = {"log_config": log_config} if log_config is not None else {}
    if workers == 1:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level, **logs)).run(sockets=[sock])
        return
    engine = getattr(getattr(app, "state", None), "engine", None)
    if engine is not None:
        engine.dispose()  # the parent's pooled connections must not be shared with the workers
    _Supervisor(app, sock, workers, log_level, logs).run()


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(sig).name}"
        except ValueError:
            return f"killed by signal {sig}"
    return f"exit status {os.WEXITSTATUS(status)}" if os.WIFEXITED(status) else f"status {status}"


class _Supervisor:
    def __init__(self, app: Any, sock: socket.socket, workers: int, log_level: str,
                 logs: dict[str, Any] | None = None) -> None:
        self.app, self.sock, self.workers, self.log_level = app, sock, workers, log_level
        self.logs: dict[str, Any] = logs or {}
        self.children: dict[int, float] = {}  # pid -> when it started (monotonic)
        self.signals = 0

    def _worker(self) -> None:
        """In the child: serve until told to stop; never returns."""
        code = 1
        try:
            for sig in (signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            import uvicorn

            uvicorn.Server(uvicorn.Config(self.app, log_level=self.log_level, **self.logs)).run(sockets=[self.sock])
            code = 0
        except KeyboardInterrupt:
            code = 0
        except BaseException:
            log.exception("server worker %d failed", os.getpid())
        finally:
            os._exit(code)

    def _spawn(self) -> None:
        pid = os.fork()
        if pid == 0:
            self._worker()
        self.children[pid] = time.monotonic()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.signals += 1
        sig = signal.SIGTERM if self.signals == 1 else signal.SIGKILL
        for pid in list(self.children):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def run(self) -> None:
        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        previous = {sig: signal.signal(sig, self._on_signal) for sig in handled}
        fast_deaths = 0
        try:
            for _ in range(self.workers):
                self._spawn()
            log.info("started %d server workers: %s", self.workers, ", ".join(map(str, self.children)))
            while self.children:
                try:
                    pid, status = os.wait()
                except ChildProcessError:
                    break
                started = self.children.pop(pid, None)
                if started is None or self.signals:
                    continue
                fast_deaths = fast_deaths + 1 if time.monotonic() - started < _FAST_DEATH else 0
                if fast_deaths >= _MAX_FAST_DEATHS:
                    self._on_signal(signal.SIGTERM, None)
                    raise ServerError(f"server workers keep dying as they start (the last: {_describe(status)})",
                                      hint="the server log above says why; fix that and start it again")
                log.warning("server worker %d stopped (%s); starting another", pid, _describe(status))
                self._spawn()
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
            while self.children:  # after an error above: reap the workers told to stop
                try:
                    pid, _ = os.wait()
                except ChildProcessError:
                    break
                self.children.pop(pid, None)
