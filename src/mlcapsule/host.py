"""Host side (untrusted): start the enclave worker and make ECALLs to it.

Nothing here ever sees the content key, the plaintext graph or the weights: it passes paths to
the worker, and gets back public status and model outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .enclave import errors, protocol

_ERRORS: dict[str, type[errors.MlcapsuleError]] = {
    name: cls for name, cls in vars(errors).items()
    if isinstance(cls, type) and issubclass(cls, errors.MlcapsuleError)
}


def worker_env() -> dict[str, str]:
    """The worker's whole environment: nothing inherited from the host (no ``LD_PRELOAD``, no
    ``PYTHONPATH``, nothing else that runs code), only what makes it behave.

    No BLAS worker threads: Landlock restricts only the thread that applies it and threads
    started after, so helper threads started by imports would escape it.
    ORT_DISABLE_TELEMETRY: onnxruntime's telemetry thread, and its writes under ~/.cache."""
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1", "ORT_DISABLE_TELEMETRY": "1"}


#: The worker's first lines: the directory holding the package goes first on ``sys.path``, and
#: ``mlcapsule`` itself becomes a bare namespace, so that the package's ``__init__.py`` (the
#: untrusted client API) never runs in the enclave: the only mlcapsule code it imports is the
#: trusted package, ``mlcapsule/enclave/``, which is exactly what the measurement hashes.
BOOT_PRELUDE = ("import sys, types; src = sys.argv.pop(1); sys.path.insert(0, src); "
                "pkg = types.ModuleType('mlcapsule'); pkg.__path__ = [src + '/mlcapsule']; "
                "sys.modules['mlcapsule'] = pkg")
BOOT = BOOT_PRELUDE + "; import runpy; runpy.run_module(sys.argv.pop(1), run_name='__main__', alter_sys=True)"


def boot_argv(module: str) -> list[str]:
    """``python -I`` running ``module`` of the trusted package as the worker runs it."""
    src = str(Path(__file__).resolve().parent.parent)
    return [sys.executable, "-I", "-c", BOOT, src, module]


def worker_argv(*, fd_in: int, fd_out: int, state_dir: Path, run_dir: str | Path, backend: str,
                capsule: Path | None = None, capsule_fd: int | None = None,
                platform_dir: str | os.PathLike[str] | None = None,
                dev_key: str | os.PathLike[str] | None = None, tcti: str | None = None, threads: int | None = None,
                require_hardening: bool = False, memory_limit_mb: float | None = None,
                shm_fd: int | None = None, tsm_path: str | os.PathLike[str] | None = None) -> list[str]:
    """The worker's command line. ``python -I`` ignores every PYTHON* variable and the user's
    site-packages; the package is imported from where this one was (the measured files)."""
    cmd = [*boot_argv("mlcapsule.enclave.worker"),
           "--fd-in", str(fd_in), "--fd-out", str(fd_out), "--state-dir", str(state_dir),
           "--run-dir", str(run_dir), "--backend", backend]
    cmd += ["--capsule", str(capsule)] if capsule is not None else ["--capsule-fd", str(capsule_fd)]
    if platform_dir:
        cmd += ["--platform-dir", str(Path(platform_dir).resolve())]
    if dev_key:
        cmd += ["--dev-key", str(Path(dev_key).resolve())]
    if tcti:  # tpm backend: how the worker reaches the TPM (it connects before hardening itself)
        cmd += ["--tcti", tcti]
    if tsm_path:  # cvm backend: the configfs-tsm report folder (the worker may write beneath it)
        cmd += ["--tsm-path", str(Path(tsm_path).resolve())]
    if threads:
        cmd += ["--threads", str(threads)]
    if require_hardening:
        cmd.append("--require-hardening")
    if memory_limit_mb:  # streaming mode; the worker prepares ONNX Runtime for it at start
        cmd += ["--memory-limit-mb", repr(float(memory_limit_mb))]
    if shm_fd is not None:
        cmd += ["--shm-fd", str(shm_fd)]
    return cmd


class _LocalWorker:
    """A worker this process started (per-user mode)."""

    def __init__(self, cmd: list[str], pass_fds: tuple[int, ...], run_dir: Path) -> None:
        self._log = open(run_dir / "worker.log", "w+b")  # noqa: SIM115  (closed in close())
        self.proc = subprocess.Popen(cmd, pass_fds=pass_fds, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log, env=worker_env(), close_fds=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def log_tail(self) -> str:
        self._log.flush()
        self._log.seek(0)
        lines = [ln for ln in self._log.read().decode(errors="replace").splitlines() if ln.strip()]
        return lines[-1] if lines else "no output"

    def close(self) -> None:
        self._log.close()


class EnclaveProcess:
    """One enclave worker serving one capsule. Use as a context manager, or call :meth:`close`.

    Per-user mode (default): this process starts the worker, under the caller's own uid.
    Service mode (``service=SOCKET``): the enclave service (``mlcapsule enclaved``, under its own
    system user) starts it and hands back the two pipes; the state lives in the service's
    folders, which the caller can neither read nor restore. Calls then go straight to the worker."""

    def __init__(self, capsule: str | os.PathLike[str], *, state_dir: str | os.PathLike[str] | None = None,
                 backend: str = "software", platform_dir: str | os.PathLike[str] | None = None,
                 dev_key: str | os.PathLike[str] | None = None, threads: int | None = None,
                 require_hardening: bool = False, tcti: str | None = None,
                 memory_limit_mb: float | None = None, shared_memory: bool = True,
                 service: str | os.PathLike[str] | None = None,
                 tsm_path: str | os.PathLike[str] | None = None) -> None:
        self.capsule = Path(capsule).resolve()
        self._lock = threading.Lock()
        #: Seconds the host spends in each part of :meth:`infer` (encode, wait for the reply, decode).
        self.profile: dict[str, float] = {"calls": 0, "encode": 0.0, "wait": 0.0, "decode": 0.0}
        # Large tensors travel through a sealed memfd, passed to the worker at spawn.
        self._arena = protocol.SharedArena.create() if shared_memory else None
        self._run: tempfile.TemporaryDirectory[str] | None = None
        #: What the enclave service said about itself (service mode), else None.
        self.service: dict[str, Any] | None = None
        self.state_dir: Path | None = None
        self.closed = True
        self.proc: Any
        try:
            if service is not None:
                from .enclaved import connect

                self.proc, self._to_worker, self._from_worker, self.service = connect(
                    Path(service), self.capsule, arena_fd=self._arena.fd if self._arena else None,
                    threads=threads, memory_limit_mb=memory_limit_mb)
            else:
                if state_dir is None:
                    raise ValueError("state_dir is required without the enclave service")
                self.state_dir = Path(state_dir).resolve()
                self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
                if platform_dir is None and backend in ("software", "cvm"):
                    # Resolved here: the worker inherits no environment (no MLCAPSULE_HOME).
                    from .enclave._util import data_home

                    platform_dir = data_home() / "platform" / backend
                self._run = tempfile.TemporaryDirectory(prefix="run-", dir=self.state_dir)
                to_worker_r, self._to_worker = os.pipe()
                self._from_worker, from_worker_w = os.pipe()
                pass_fds = (to_worker_r, from_worker_w) + ((self._arena.fd,) if self._arena else ())
                cmd = worker_argv(fd_in=to_worker_r, fd_out=from_worker_w, capsule=self.capsule,
                                  state_dir=self.state_dir, run_dir=self._run.name, backend=backend,
                                  platform_dir=platform_dir, dev_key=dev_key, tcti=tcti, threads=threads,
                                  require_hardening=require_hardening, memory_limit_mb=memory_limit_mb,
                                  shm_fd=self._arena.fd if self._arena else None, tsm_path=tsm_path)
                try:
                    self.proc = _LocalWorker(cmd, pass_fds, Path(self._run.name))
                finally:
                    os.close(to_worker_r)
                    os.close(from_worker_w)
        except BaseException:
            if self._arena is not None:
                self._arena.close()
            if self._run is not None:
                self._run.cleanup()
            raise
        self._reader = protocol.FrameReader(self._from_worker)
        self.closed = False
        try:
            self.info = self.call("hello")
        except BaseException:
            self.kill()
            raise
        if self._arena is not None and not self.info.get("shared_memory"):
            self._arena.close()  # the worker refused it: tensors travel inline
            self._arena = None

    # -- calls --------------------------------------------------------------------------------
    def call(self, op: str, args: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Make one ECALL (``infer`` has its own binary frame: :meth:`infer`). Returns the reply's
        result; raises the enclave's error as our own."""
        frame = protocol.encode(protocol.REQUEST, {"op": op, "args": dict(args or {})})
        with self._lock:
            if self.closed:
                raise errors.EnclaveError("the enclave has been closed")
            try:
                protocol.write_frame(self._to_worker, frame)
                reply = protocol.decode(bytearray(self._reader.read()))  # a copy: the buffer is reused
            except (EOFError, BrokenPipeError, OSError) as e:
                raise errors.EnclaveError(f"the enclave worker stopped: {self._log_tail()}") from e
        self._raise_error(reply.header)
        result = reply.header.get("ok")
        if not isinstance(result, dict):
            raise errors.ProtocolError("malformed reply from the enclave")
        return result

    def infer(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """The ``infer`` ECALL on its fast path: a binary tensor frame, inputs in the manifest's
        order (C-contiguous arrays of the manifest's dtypes), outputs likewise; tensors of
        :data:`protocol.INLINE_MAX` bytes or more go through shared memory. The outputs are
        the caller's own arrays."""
        with self._lock:
            if self.closed:
                raise errors.EnclaveError("the enclave has been closed")
            try:
                prof = self.profile
                t0 = time.perf_counter()
                frame = protocol.encode_tensors(protocol.TENSOR_REQUEST, arrays, self._arena)
                protocol.write_frame(self._to_worker, frame)
                t1 = time.perf_counter()
                body = self._reader.read()
                t2 = time.perf_counter()
                # Poll before blocking only for calls that are quick (see FrameReader._spin): on a
                # long one, polling takes a CPU from the enclave's threads for nothing.
                self._reader.spin = protocol.SPIN_SECONDS if t2 - t0 < protocol.SPIN_IF_UNDER else 0.0
                if protocol.frame_kind(body) == protocol.TENSOR_REPLY:
                    out = protocol.decode_tensors(body, self._arena, copy=True)[1]
                    prof["encode"] += t1 - t0
                    prof["wait"] += t2 - t1
                    prof["decode"] += time.perf_counter() - t2
                    prof["calls"] += 1
                    return out
                reply = protocol.decode(bytearray(body))
            except (EOFError, BrokenPipeError, OSError) as e:
                raise errors.EnclaveError(f"the enclave worker stopped: {self._log_tail()}") from e
        self._raise_error(reply.header)
        raise errors.ProtocolError("malformed reply from the enclave")

    @staticmethod
    def _raise_error(header: dict[str, Any]) -> None:
        if "error" in header:
            err = header["error"]
            cls = (_ERRORS.get(str(err.get("type")), errors.EnclaveError) if isinstance(err, dict)
                   else errors.EnclaveError)
            raise cls(str(err.get("message") if isinstance(err, dict) else err),
                      hint=err.get("hint") if isinstance(err, dict) else None)

    def _log_tail(self) -> str:
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        code = self.proc.poll()
        return self.proc.log_tail() + (f" (exit status {code})" if code is not None else "")

    def kill(self) -> None:
        """Kill the worker without a clean shutdown (as a crash would)."""
        self.proc.kill()
        self._cleanup()

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self.proc.poll() is None:
                with self._lock:
                    bye = protocol.encode(protocol.REQUEST, {"op": "shutdown", "args": {}})
                    protocol.write_frame(self._to_worker, bye)
                    self._reader.read()
                self.proc.wait(timeout=10)
        except (EOFError, OSError, subprocess.TimeoutExpired, errors.MlcapsuleError):
            self.proc.kill()
        self._cleanup()

    def _cleanup(self) -> None:
        if self.closed:
            return
        self.closed = True
        for fd in (self._to_worker, self._from_worker):
            try:
                os.close(fd)
            except OSError:
                pass
        if self._arena is not None:
            self._arena.close()
        self.proc.close()
        if self._run is not None:
            self._run.cleanup()

    def __enter__(self) -> EnclaveProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
