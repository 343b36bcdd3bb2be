"""Subprocess helper for tests/test_hardening.py: hardens itself like an enclave worker, then
tries attacks and normal work, and prints one JSON object on its last stdout line.

Usage: python _hardened_probe.py '<json config>'; config["mode"] selects what to do.
Only the stdlib and mlcapsule.enclave.hardening are imported before harden(), as in a worker.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import site
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlcapsule.enclave import hardening

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
PR_GET_DUMPABLE = 3
PR_GET_NO_NEW_PRIVS = 39
X32_BIT = 0x40000000
NR = {"x86_64": {"socket": 41, "io_uring_setup": 425}, "aarch64": {"socket": 198, "io_uring_setup": 425}}


def emit(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def attempt(fn: Callable[[], Any]) -> dict[str, Any]:
    """{"ok": True, "value": ...} or {"ok": False, "errno": "EPERM", "exc": "PermissionError"}."""
    try:
        value = fn()
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        return {"ok": False, "errno": name, "exc": type(exc).__name__, "msg": str(exc)}
    except Exception as exc:  # noqa: BLE001 - reported to the test
        return {"ok": False, "errno": None, "exc": type(exc).__name__, "msg": str(exc)}
    return {"ok": True, "value": value}


def syscall_fd(nr: int, *args: object) -> int:
    """A raw syscall that returns a file descriptor (closed again); OSError on failure."""
    ret = libc.syscall(ctypes.c_long(nr), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    os.close(ret)
    return int(ret)


def drop_all_capabilities() -> None:
    """capset(2) to empty sets: a root process becomes an ordinary same-uid process."""

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]

    data = (Data * 2)()
    if libc.capset(ctypes.byref(Header(0x20080522, 0)), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def worker_harden(cfg: dict[str, Any], require: bool = False) -> hardening.HardeningReport:
    """Exactly what the enclave worker passes."""
    return hardening.harden(
        read_paths=[*hardening.python_read_paths(), cfg["capsule"]],
        write_paths=[cfg["state_dir"], "/dev/shm"],
        require=require,
    )


def status_field(name: str) -> str | None:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    return None


def create(path: str) -> str:
    with open(path, "x") as f:
        f.write("x")
    return path


# -- modes ---------------------------------------------------------------------------------
def mode_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    machine = os.uname().machine
    nrs = NR.get(machine, {})
    outside = Path(cfg["outside_dir"])
    capsule = Path(cfg["capsule"])
    state = Path(cfg["state_dir"])
    io_params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed

    def io_uring() -> int:
        return syscall_fd(nrs["io_uring_setup"], ctypes.c_uint(4), io_params)

    before = {
        "read_outside": attempt(lambda: (outside / "secret.txt").read_text()),
        "io_uring_setup": attempt(io_uring) if nrs else None,
        "x32_socket": attempt(lambda: syscall_fd(nrs["socket"] | X32_BIT, 2, 1, 0)) if machine == "x86_64" else None,
    }
    # onnxruntime 1.32 otherwise opens a 1DS telemetry database in ~/.cache/Microsoft/DeveloperTools
    # (Landlock denies it anyway); a worker should set this before importing onnxruntime.
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    report = worker_harden(cfg)

    after: dict[str, Any] = {}
    # Network.
    after["socket_inet"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).close())
    after["socket_inet6"] = attempt(lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close())
    after["socket_udp"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close())
    after["socket_unix"] = attempt(lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).close())
    after["socketpair"] = attempt(lambda: [s.close() for s in socket.socketpair()])
    after["create_connection"] = attempt(
        lambda: socket.create_connection(("127.0.0.1", cfg["listen_port"]), timeout=2).close()
    )
    if nrs:
        after["raw_socket_syscall"] = attempt(lambda: syscall_fd(nrs["socket"], 2, 1, 0))
        after["io_uring_setup"] = attempt(io_uring)
    if machine == "x86_64":
        after["x32_socket"] = attempt(lambda: syscall_fd(nrs["socket"] | X32_BIT, 2, 1, 0))
    # Inheritance: a thread and a child process started after hardening.
    box: dict[str, Any] = {}
    t = threading.Thread(target=lambda: box.update(r=attempt(lambda: socket.socket().close())))
    t.start()
    t.join()
    after["socket_in_new_thread"] = box["r"]
    child = subprocess.run(
        [sys.executable, "-c", "import socket; socket.socket()"], capture_output=True, text=True, timeout=60
    )
    after["socket_in_child_process"] = {"returncode": child.returncode, "stderr_tail": child.stderr[-300:]}
    child = subprocess.run(
        [sys.executable, "-c", f"open({str(outside / 'secret.txt')!r}).read()"],
        capture_output=True, text=True, timeout=60,
    )
    after["read_outside_in_child_process"] = {"returncode": child.returncode, "stderr_tail": child.stderr[-300:]}
    # Files that must stay closed.
    after["read_outside"] = attempt(lambda: (outside / "secret.txt").read_text())
    after["list_outside"] = attempt(lambda: os.listdir(outside))
    after["read_etc_hostname"] = attempt(lambda: Path("/etc/hostname").read_text())
    after["read_etc_passwd"] = attempt(lambda: Path("/etc/passwd").read_text()[:10])
    after["read_home"] = attempt(lambda: os.listdir(Path.home()))
    after["write_outside"] = attempt(lambda: create(str(outside / "dropped.txt")))
    after["write_tmp"] = attempt(lambda: create(f"/tmp/mlcapsule-probe-{os.getpid()}"))
    after["write_capsule_dir"] = attempt(lambda: create(str(capsule.parent / "dropped.txt")))
    after["overwrite_capsule"] = attempt(lambda: open(capsule, "r+b").close())
    after["write_site_packages"] = attempt(
        lambda: create(str(Path(site.getsitepackages()[0]) / "dropped.py"))
    )
    after["read_proc_1_environ"] = attempt(lambda: Path("/proc/1/environ").read_bytes()[:10].hex())
    # Files that must stay usable.
    after["read_capsule"] = attempt(lambda: len(capsule.read_bytes()))

    def state_roundtrip() -> str:
        (state / "sub").mkdir()
        (state / "sub" / "tmp").write_bytes(b"sealed")
        os.replace(state / "sub" / "tmp", state / "sealed.bin")
        os.rmdir(state / "sub")
        data = (state / "sealed.bin").read_bytes()
        os.unlink(state / "sealed.bin")
        return data.decode()

    after["state_roundtrip"] = attempt(state_roundtrip)

    def shm_roundtrip() -> int:
        path = f"/dev/shm/mlcapsule-probe-{os.getpid()}"
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, 4096)
            import mmap

            with mmap.mmap(fd, 4096) as m:
                m[:5] = b"hello"
                return len(m)
        finally:
            os.close(fd)
            os.unlink(path)

    after["shm_roundtrip"] = attempt(shm_roundtrip)
    after["write_dev_null"] = attempt(lambda: open(os.devnull, "w").write("x"))
    # Process state.
    after["dumpable"] = libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0)
    after["no_new_privs"] = libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
    after["status"] = attempt(lambda: {k: status_field(k) for k in ("Seccomp", "NoNewPrivs")})
    after["mlock_bytearray"] = hardening.mlock_buffer(bytearray(4096))
    after["mlock_bytes"] = hardening.mlock_buffer(b"read-only")
    after["status_vmlck"] = attempt(lambda: status_field("VmLck"))

    # numpy and onnxruntime, imported after hardening, as the worker does.
    def run_model() -> list[list[float]]:
        import numpy as np
        import onnxruntime as ort

        key = np.zeros(32, dtype=np.uint8)
        after["mlock_numpy"] = hardening.mlock_buffer(key)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(capsule.read_bytes(), opts, providers=["CPUExecutionProvider"])
        (y,) = sess.run(None, {"X": np.ones((2, 4), dtype=np.float32)})
        # threads created by onnxruntime must inherit the filter too
        after["socket_after_ort_threads"] = attempt(lambda: socket.socket().close())
        return [[float(v) for v in row] for row in y]

    after["onnx_model"] = attempt(run_model) if cfg.get("run_model") else None
    return {"report": report.as_dict(), "before": before, "after": after}


def mode_int80(cfg: dict[str, Any]) -> dict[str, Any]:
    lib = ctypes.CDLL(cfg["int80_lib"])
    lib.int80.restype = ctypes.c_long
    lib.int80.argtypes = [ctypes.c_long] * 4

    def call(nr: int) -> int:  # i386 numbers: 359 socket, 20 getpid
        ret = int(lib.int80(nr, 2, 1, 0) if nr == 359 else lib.int80(nr, 0, 0, 0))
        if nr == 359 and ret >= 0:
            os.close(ret)
        return ret

    before = {"socket": call(359), "getpid": call(20)}
    emit({"stage": "before", "before": before})
    report = worker_harden(cfg)
    return {"report": report.as_dict(), "before": before, "after": {"socket": call(359), "getpid": call(20)}}


def mode_victim(cfg: dict[str, Any]) -> None:
    drop_all_capabilities()
    secret = bytearray(b"MLCAPSULE-SECRET-KEY-0123456789!")
    address = ctypes.addressof(ctypes.c_char.from_buffer(secret))
    report = worker_harden(cfg).as_dict() if cfg["harden"] else None
    emit({"pid": os.getpid(), "address": address, "length": len(secret), "report": report})
    sys.stdin.read()  # wait until the test closes stdin
    assert secret  # keep it alive


def mode_attacker(cfg: dict[str, Any]) -> dict[str, Any]:
    drop_all_capabilities()
    pid, address, length = cfg["target_pid"], cfg["address"], cfg["length"]

    def proc_mem() -> str:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
        try:
            return os.pread(fd, length, address).decode(errors="replace")
        finally:
            os.close(fd)

    class IoVec(ctypes.Structure):
        _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]

    def vm_readv() -> str:
        buf = ctypes.create_string_buffer(length)
        local, remote = IoVec(ctypes.addressof(buf), length), IoVec(address, length)
        libc.process_vm_readv.restype = ctypes.c_ssize_t
        n = libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if n < 0:
            raise OSError(ctypes.get_errno(), "process_vm_readv")
        return buf.raw[:n].decode(errors="replace")

    def seize() -> int:  # PTRACE_SEIZE does not stop the target; our exit detaches
        libc.ptrace.restype = ctypes.c_long
        if libc.ptrace(ctypes.c_long(0x4206), ctypes.c_long(pid), None, None) != 0:
            raise OSError(ctypes.get_errno(), "ptrace")
        return 0

    return {"proc_mem": attempt(proc_mem), "process_vm_readv": attempt(vm_readv), "ptrace_seize": attempt(seize)}


def mode_threads(cfg: dict[str, Any]) -> dict[str, Any]:
    """A thread started before harden(): Landlock cannot reach it, seccomp (TSYNC) can."""
    go, done = threading.Event(), threading.Event()
    box: dict[str, Any] = {}
    outside = Path(cfg["outside_dir"]) / "secret.txt"

    def early_thread() -> None:
        go.wait()
        box["read_outside"] = attempt(outside.read_text)
        box["socket"] = attempt(lambda: socket.socket().close())
        done.set()

    threading.Thread(target=early_thread, daemon=True).start()
    result: dict[str, Any] = {}
    if cfg["require"]:
        try:
            worker_harden(cfg, require=True)
            result["raised"] = None
        except Exception as exc:  # noqa: BLE001
            result["raised"] = type(exc).__name__
            result["message"] = str(exc)
        return result
    result["report"] = worker_harden(cfg).as_dict()
    go.set()
    done.wait(30)
    result["early_thread"] = box
    result["main_read_outside"] = attempt(outside.read_text)
    return result


def mode_no_landlock(cfg: dict[str, Any]) -> dict[str, Any]:
    """Simulate a kernel without Landlock: its syscalls answer ENOSYS."""
    hardening._NR_LANDLOCK_CREATE_RULESET = 0x3FFF_FFFF  # type: ignore[attr-defined]
    if cfg["require"]:
        try:
            worker_harden(cfg, require=True)
        except Exception as exc:  # noqa: BLE001
            return {"raised": type(exc).__name__, "message": str(exc), "hint": getattr(exc, "hint", None)}
        return {"raised": None}
    report = worker_harden(cfg)
    return {"report": report.as_dict(), "socket": attempt(lambda: socket.socket().close())}


def main() -> None:
    cfg = json.loads(sys.argv[1])
    mode = cfg["mode"]
    if mode == "victim":
        mode_victim(cfg)
        return
    handler = {
        "worker": mode_worker,
        "int80": mode_int80,
        "attacker": mode_attacker,
        "threads": mode_threads,
        "no_landlock": mode_no_landlock,
    }[mode]
    emit(handler(cfg))


if __name__ == "__main__":
    main()
