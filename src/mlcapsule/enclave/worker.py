"""The enclave worker process: ``python -m mlcapsule.enclave.worker``.

Started by :mod:`mlcapsule.host` with two inherited pipe descriptors. In order, it:

1. asks the kernel to kill it when the host dies (PR_SET_PDEATHSIG);
2. imports everything it will ever need (ONNX Runtime, numpy, onnx, cryptography);
3. hardens itself (non-dumpable, mlock, Landlock, seccomp: :mod:`.hardening`) *before* it
   touches any secret: the platform secret, a key file, or the capsule's ciphertext;
4. serves ECALLs from the host until ``shutdown`` or end of input.

It has no network code, and after step 3 the kernel would refuse it any.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Step 2: import everything up front, so nothing is loaded from disk after Landlock applies.
import numpy as np  # noqa: F401
import onnx  # noqa: F401
import onnxruntime  # noqa: F401

from . import ecalls, errors, protocol
from .backends import get_backend
from .core import EnclaveCore
from .hardening import harden, python_read_paths

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the host died before we got here
        os._exit(1)


def _error_reply(e: BaseException) -> dict[str, Any]:
    if isinstance(e, errors.MlcapsuleError):
        return {"error": {"type": type(e).__name__, "message": e.message, "hint": e.hint}}
    # Unexpected: say so without leaking internals; the detail goes to the worker's stderr log.
    traceback.print_exc(file=sys.stderr)
    return {"error": {"type": "EnclaveError", "message": f"internal enclave error ({type(e).__name__})", "hint": None}}


def _setup_finish(core: EnclaveCore, req: ecalls.SetupFinish) -> dict[str, Any]:
    payload = req.payload
    if req.credential is not None:  # tpm: the payload is gated on credential activation
        activate = getattr(core.backend, "activate_payload", None)
        if activate is None:
            raise errors.ProtocolError("this backend takes no credential challenge")
        payload = activate(req.credential, payload)
    return core.setup_finish(payload=payload)


#: The dispatch table: one entry per JSON ECALL (``infer`` has its own binary frame).
DISPATCH: dict[type, Callable[[EnclaveCore, Any], dict[str, Any]]] = {
    ecalls.Hello: lambda core, _: core.hello(),
    ecalls.Status: lambda core, _: core.status(),
    ecalls.Load: lambda core, r: core.load(dev_key=r.dev_key),
    ecalls.SetupBegin: lambda core, r: core.setup_begin(nonce=r.nonce),
    ecalls.SetupFinish: _setup_finish,
    ecalls.ApplyVoucher: lambda core, r: core.apply_voucher(voucher=r.voucher),
    ecalls.UsageReport: lambda core, _: core.usage_report(),
    ecalls.UsageAck: lambda core, r: core.usage_ack(ack=r.ack),
}
_INFER = ecalls.Infer()


def _infer_frame(core: EnclaveCore, machine: ecalls.EcallState, body: memoryview,
                 arena: protocol.SharedArena | None, inputs: list[Any]) -> list[memoryview | bytes]:
    """The fast path of `infer`: binary tensors in the manifest's input order."""
    prof = core.ecall_profile  # where an infer ECALL spends its time, for `status`
    t0 = time.perf_counter()
    try:
        machine.check(_INFER)
        arrays = protocol.decode_tensors(body, arena, reuse=inputs)[1]
        t1 = time.perf_counter()
        outputs = core.infer_arrays(arrays)
        t2 = time.perf_counter()
        frame = protocol.encode_tensors(protocol.TENSOR_REPLY, outputs, arena)
        prof["decode"] += t1 - t0
        prof["infer"] += t2 - t1
        prof["encode"] += time.perf_counter() - t2
    except Exception as e:  # every failure becomes a reply; the worker keeps serving
        frame = protocol.encode(protocol.REPLY, _error_reply(e))
    return frame


def serve(core: EnclaveCore, fd_in: int, fd_out: int, arena: protocol.SharedArena | None = None) -> None:
    """The transport: read a frame, parse it at the boundary (ecalls.parse), check it against the
    state table, dispatch, reply. An illegal or failed call changes no state."""
    reader = protocol.FrameReader(fd_in)
    machine = ecalls.EcallState()
    inputs: list[Any] = []  # input buffers, reused from one call to the next
    while True:
        try:
            body = reader.read()
            if protocol.frame_kind(body) == protocol.TENSOR_REQUEST:
                t0 = time.perf_counter()
                frame = _infer_frame(core, machine, body, arena, inputs)
                t3 = time.perf_counter()
                protocol.write_frame(fd_out, frame)
                t4 = time.perf_counter()
                core.ecall_profile["write"] += t4 - t3
                core.ecall_profile["calls"] += 1
                # Poll for the next request only after a quick one (see FrameReader._spin).
                reader.spin = protocol.SPIN_SECONDS if t4 - t0 < protocol.SPIN_IF_UNDER else 0.0
                continue
            msg = protocol.decode(body)
        except EOFError:
            return
        except errors.ProtocolError as e:  # the framing itself is broken: nothing more can be trusted
            protocol.write_frame(fd_out, protocol.encode(protocol.REPLY, _error_reply(e)))
            return
        try:
            if msg.kind != protocol.REQUEST or msg.buffers:
                raise errors.ProtocolError("malformed request")
            req = ecalls.parse(msg.header)
            machine.check(req)
            if isinstance(req, ecalls.Shutdown):
                core.close()
                machine.done(req)
                protocol.write_frame(fd_out, protocol.encode(protocol.REPLY, {"ok": {}}))
                return
            result = DISPATCH[type(req)](core, req)
            if isinstance(req, ecalls.Hello):
                result = {**result, "shared_memory": arena is not None}
            machine.done(req, result)
            reply: dict[str, Any] = {"ok": result}
        except Exception as e:  # every failure becomes a reply; the worker keeps serving
            reply = _error_reply(e)
        protocol.write_frame(fd_out, protocol.encode(protocol.REPLY, reply))


def main(argv: list[str] | None = None) -> int:
    _die_with_parent()
    # Ctrl-C in the client's terminal reaches the whole process group: the host decides what an
    # interrupt means (a clean close keeps the rest of the lease), not the enclave.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ap = argparse.ArgumentParser(prog="mlcapsule-enclave-worker")
    ap.add_argument("--fd-in", type=int, required=True)
    ap.add_argument("--fd-out", type=int, required=True)
    ap.add_argument("--capsule", help="the capsule's path")
    ap.add_argument("--capsule-fd", type=int, default=-1, help="or an inherited descriptor of it (service mode)")
    ap.add_argument("--state-dir", required=True)
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--backend", default="software")
    ap.add_argument("--platform-dir")
    ap.add_argument("--tcti")
    ap.add_argument("--tsm-path", help="cvm backend: the configfs-tsm report folder")
    ap.add_argument("--dev-key")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--require-hardening", action="store_true")
    ap.add_argument("--memory-limit-mb", type=float, default=0.0)
    ap.add_argument("--shm-fd", type=int, default=-1)
    a = ap.parse_args(argv)

    backend_args: dict[str, Any] = {"platform_dir": a.platform_dir} if a.platform_dir else {}
    if a.tcti:
        backend_args["tcti"] = a.tcti
    if a.tsm_path:
        backend_args["tsm_path"] = a.tsm_path
    try:
        backend = get_backend(a.backend, **backend_args)  # the tpm backend connects now, before hardening
    except errors.MlcapsuleError as e:  # one line: the host shows the log's last line
        print(f"{type(e).__name__}: {e.message}" + (f" (hint: {e.hint})" if e.hint else ""), file=sys.stderr)
        return 1
    b_read, b_write = backend.paths()
    if (a.capsule is None) == (a.capsule_fd < 0):
        ap.error("give --capsule or --capsule-fd")
    capsule: Path | int = Path(a.capsule) if a.capsule else a.capsule_fd
    read_paths = python_read_paths() + ([a.capsule] if a.capsule else []) + ([a.dev_key] if a.dev_key else []) + b_read
    write_paths = [a.state_dir, a.run_dir] + b_write
    for p in write_paths:
        # Owner-only (0700), and so is every parent this creates: the platform folder holds the
        # software backend's secret, and was created 0755 (red team, issue 9).
        for d in reversed([q for q in (Path(p), *Path(p).parents) if not q.exists()]):
            d.mkdir(mode=0o700, exist_ok=True)
            os.chmod(d, 0o700)  # whatever the umask
    report = harden(read_paths=read_paths, write_paths=write_paths, require=a.require_hardening)
    os.chdir(a.run_dir)
    if a.memory_limit_mb:
        # Streaming mode: ORT's shared arena and one-time initialization, before the baseline.
        from .runtime.streaming import configure_onnxruntime

        configure_onnxruntime()
    arena = None
    if a.shm_fd >= 0:
        try:
            arena = protocol.SharedArena.adopt(a.shm_fd, release=bool(a.memory_limit_mb))
        except (OSError, errors.ProtocolError) as e:  # tensors then travel inline
            print(f"shared memory refused: {e}", file=sys.stderr)
    core = EnclaveCore(backend, capsule, Path(a.state_dir), Path(a.run_dir),
                       hardening=report.as_dict(), threads=a.threads or None,
                       memory_limit_mb=a.memory_limit_mb or None)
    serve(core, a.fd_in, a.fd_out, arena)
    return 0


if __name__ == "__main__":
    sys.exit(main())
