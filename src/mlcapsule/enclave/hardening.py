"""Self-hardening of the software enclave worker (Linux only, stdlib + ctypes).

The worker calls :func:`harden` once, early, before it starts any thread and before it
touches a key or decrypts a capsule. The layers, in the order they are applied:

1. **Non-dumpable** (``prctl(PR_SET_DUMPABLE, 0)``): no core dumps; processes of the same
   uid without ``CAP_SYS_PTRACE`` can no longer ``ptrace`` the worker, open
   ``/proc/PID/mem`` or call ``process_vm_readv`` on it.
2. **mlock**: keeps decrypted weights and keys out of swap. ``mlockall`` when the memlock
   limit does not apply (``RLIMIT_MEMLOCK`` unlimited, or ``CAP_IPC_LOCK``); otherwise only
   the buffers passed to :func:`mlock_buffer`, within the limit.
3. **Landlock** (``no_new_privs`` first): the filesystem is read-only beneath ``read_paths``
   plus :data:`SYSTEM_READ_PATHS`, read-write beneath ``write_paths`` plus
   :data:`SYSTEM_WRITE_PATHS`, and closed elsewhere. ABI >= 4 also denies TCP bind/connect;
   ABI >= 6 forbids abstract unix sockets and signals to processes outside the sandbox.
4. **seccomp** (installed with ``SECCOMP_FILTER_FLAG_TSYNC``, so on every thread): denies
   with ``EPERM`` the syscalls in :data:`DENIED_SYSCALLS` (all socket calls, io_uring,
   ptrace, cross-process memory access, ``pidfd_getfd``) and every syscall made through a
   foreign ABI (i386 ``int 0x80``, x32), which would otherwise bypass a per-number list.

All of it is inherited by threads created later and by any program the worker executes.

What this does NOT stop:

* root, or anyone with ``CAP_SYS_PTRACE``/``CAP_SYS_ADMIN``: they can attach a debugger
  regardless of the dumpable flag, read ``/proc/kcore`` or ``/dev/mem``, load a kernel
  module, or snapshot the VM. The machine owner can always read the worker's memory;
  only a hardware enclave (SGX/TDX/SEV) changes that. This is defence in depth against
  *other* local code and against a model or input that subverts the worker.
* data written to the allowed write paths (state directory, ``/dev/shm``): the host can
  read those, so the worker must only write sealed (encrypted) state there.
* the pipes inherited from the host: ``read``/``write`` on them stay allowed by design.
  Note that ``recvfrom``/``sendto`` are denied, so a channel that is a socket must be used
  with ``os.read``/``os.write`` (as ``multiprocessing.connection.Connection`` does).
* threads that already exist when Landlock is applied keep their old rights (Landlock
  restricts only the calling thread and its future children); :func:`harden` reports it.
* timing and other side channels.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import resource
import site
import stat
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import EnclaveError

__all__ = [
    "DENIED_SYSCALLS",
    "SYSTEM_READ_PATHS",
    "SYSTEM_WRITE_PATHS",
    "HardeningReport",
    "harden",
    "landlock_abi",
    "mlock_buffer",
    "python_read_paths",
]

#: Read-only (read, list, execute) paths every worker gets, beyond the caller's list.
#: Missing ones are skipped. ``/proc/self`` is resolved when the rules are made, so it
#: grants the worker's own ``/proc/PID`` only.
SYSTEM_READ_PATHS: tuple[str, ...] = (
    "/etc/ld.so.cache",  # the dynamic loader, for libraries loaded after hardening
    "/lib",  # system shared libraries: numpy and onnxruntime load libstdc++ from here
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/etc/localtime",  # time.localtime (log timestamps); UTC without it
    "/dev/urandom",
    "/proc/self",  # own status/maps only
    "/proc/cpuinfo",  # CPU features, read by onnxruntime
    "/sys/devices/system/cpu",  # CPU topology, read by OpenBLAS and onnxruntime to size thread pools
)

#: Read-write paths every worker gets. Writing to ``/dev/null`` leaks nothing.
SYSTEM_WRITE_PATHS: tuple[str, ...] = ("/dev/null",)

#: Syscalls denied with EPERM: name -> (x86_64 number, aarch64 number).
DENIED_SYSCALLS: dict[str, tuple[int, int]] = {
    # Network: every way to create, connect or use a socket.
    "socket": (41, 198),
    "socketpair": (53, 199),
    "connect": (42, 203),
    "bind": (49, 200),
    "listen": (50, 201),
    "accept": (43, 202),
    "accept4": (288, 242),
    "sendto": (44, 206),
    "sendmsg": (46, 211),
    "sendmmsg": (307, 269),
    "recvfrom": (45, 207),
    "recvmsg": (47, 212),
    "recvmmsg": (299, 243),
    "setsockopt": (54, 208),
    "getsockopt": (55, 209),
    # io_uring performs socket and file operations without going through the filter.
    "io_uring_setup": (425, 425),
    "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    # Reading or writing another process's memory or file descriptors.
    "ptrace": (101, 117),
    "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271),
    "pidfd_getfd": (438, 438),
}

# -- constants (linux/prctl.h, linux/seccomp.h, linux/filter.h, linux/landlock.h) ---------
_PR_SET_DUMPABLE = 4
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_SET_MODE_FILTER = 1
_SECCOMP_FILTER_FLAG_TSYNC = 1
_SECCOMP_RET_ALLOW = 0x7FFF0000
_SECCOMP_RET_ERRNO = 0x00050000
_BPF_LD_W_ABS = 0x20
_BPF_JEQ_K = 0x15
_BPF_JSET_K = 0x45
_BPF_RET_K = 0x06
_X32_SYSCALL_BIT = 0x40000000
_MCL_CURRENT, _MCL_FUTURE, _MCL_ONFAULT = 1, 2, 4
_CAP_IPC_LOCK = 14

# machine -> (AUDIT_ARCH_*, index into DENIED_SYSCALLS, NR_seccomp)
_ARCHES: dict[str, tuple[int, int, int]] = {
    "x86_64": (0xC000003E, 0, 317),
    "aarch64": (0xC00000B7, 1, 277),
}

_NR_LANDLOCK_CREATE_RULESET = 444  # same number on every architecture
_NR_LANDLOCK_ADD_RULE = 445
_NR_LANDLOCK_RESTRICT_SELF = 446
_LANDLOCK_CREATE_RULESET_VERSION = 1
_LANDLOCK_RULE_PATH_BENEATH = 1
_FS_EXECUTE = 1 << 0
_FS_WRITE_FILE = 1 << 1
_FS_READ_FILE = 1 << 2
_FS_READ_DIR = 1 << 3
_FS_REFER = 1 << 13  # ABI 2
_FS_TRUNCATE = 1 << 14  # ABI 3
_FS_IOCTL_DEV = 1 << 15  # ABI 5
_FS_ABI1 = (1 << 13) - 1  # EXECUTE .. MAKE_SYM
_FS_READ = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
_FS_FILE_ONLY = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _Unavailable(Exception):
    """A layer could not be applied; the message is the reason."""


class _SockFilter(ctypes.Structure):
    _fields_ = [
        ("code", ctypes.c_uint16),
        ("jt", ctypes.c_uint8),
        ("jf", ctypes.c_uint8),
        ("k", ctypes.c_uint32),
    ]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),  # ABI 4
        ("scoped", ctypes.c_uint64),  # ABI 6
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


@dataclass(frozen=True)
class HardeningReport:
    """What :func:`harden` achieved, one human-readable line per layer."""

    nondumpable: bool
    seccomp: str
    landlock: str
    mlock: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _syscall(nr: int, *args: object) -> int:
    """Raw syscall; raises OSError on failure."""
    ret = _libc.syscall(ctypes.c_long(nr), *args)
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return int(ret)


def _prctl(option: int, arg2: int = 0) -> None:
    zero = ctypes.c_ulong(0)
    if _libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), zero, zero, zero) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _native_arch() -> str:
    machine = platform.machine()
    if machine not in _ARCHES or ctypes.sizeof(ctypes.c_void_p) != 8:
        bits = 8 * ctypes.sizeof(ctypes.c_void_p)
        raise _Unavailable(f"no syscall table for {machine} ({bits}-bit)")
    return machine


def _thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


# -- non-dumpable --------------------------------------------------------------------------
def _set_nondumpable() -> bool:
    try:
        _prctl(_PR_SET_DUMPABLE, 0)
    except OSError:
        return False
    return True


# -- mlock ---------------------------------------------------------------------------------
def _has_cap_ipc_lock() -> bool:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    except (OSError, ValueError):
        pass
    return False


def _lock_memory() -> str:
    soft, _hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and not _has_cap_ipc_lock():
        # Locking everything would make allocations fail once the limit is reached.
        limit = f"{soft >> 20} MiB" if soft % (1 << 20) == 0 else f"{soft >> 10} KiB"
        return f"per-buffer, limit {limit}"
    if _libc.mlockall(ctypes.c_int(_MCL_CURRENT | _MCL_FUTURE | _MCL_ONFAULT)) != 0:
        return f"unavailable: mlockall: {os.strerror(ctypes.get_errno())}"
    return "mlockall(MCL_CURRENT|MCL_FUTURE|MCL_ONFAULT)"


def mlock_buffer(buf: object) -> bool:
    """Best-effort ``mlock`` of a writable, C-contiguous buffer (bytearray, numpy array,
    memoryview). Returns whether its pages are now locked. Lock fixed-size buffers only:
    a bytearray that is later resized moves to unlocked memory."""
    try:
        with memoryview(buf) as mv, mv.cast("B") as view:  # type: ignore[arg-type]
            if view.readonly:
                return False
            if view.nbytes == 0:
                return True
            first = ctypes.c_char.from_buffer(view)
            addr = ctypes.addressof(first)
            del first  # release the export before the views close
            return _libc.mlock(ctypes.c_void_p(addr), ctypes.c_size_t(view.nbytes)) == 0
    except (TypeError, ValueError, BufferError):
        return False


# -- Landlock ------------------------------------------------------------------------------
def _landlock_version() -> int:
    flags = ctypes.c_uint32(_LANDLOCK_CREATE_RULESET_VERSION)
    return _syscall(_NR_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), flags)


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 when Landlock is missing or disabled."""
    try:
        return _landlock_version()
    except OSError:
        return 0


def _add_path_rule(ruleset_fd: int, path: str, access: int, handled: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # missing (or unreachable) paths are skipped: that only removes access
    try:
        if not stat.S_ISDIR(os.fstat(fd).st_mode):
            access &= _FS_FILE_ONLY
        access &= handled
        if access:
            attr = _PathBeneathAttr(access, fd)
            rule = ctypes.c_int(_LANDLOCK_RULE_PATH_BENEATH)
            _syscall(_NR_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset_fd), rule, ctypes.byref(attr), ctypes.c_uint32(0))
    finally:
        os.close(fd)


def _apply_landlock(read_paths: Sequence[str], write_paths: Sequence[str]) -> str:
    try:
        abi = _landlock_version()
    except OSError as exc:
        reason = "disabled at boot" if exc.errno == errno.EOPNOTSUPP else "not supported by this kernel"
        raise _Unavailable(f"Landlock {reason} ({exc.strerror})") from exc
    handled_fs = _FS_ABI1
    if abi >= 2:
        handled_fs |= _FS_REFER
    if abi >= 3:
        handled_fs |= _FS_TRUNCATE
    if abi >= 5:
        handled_fs |= _FS_IOCTL_DEV
    # TCP bind/connect are handled with no rule allowing them, i.e. denied.
    attr = _RulesetAttr(
        handled_fs,
        _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0,
        _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0,
    )
    size = 8 if abi < 4 else 16 if abi < 6 else 24
    threads = _thread_count()  # before the ruleset: /proc is closed afterwards
    try:
        ruleset_fd = _syscall(
            _NR_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)
        )
    except OSError as exc:
        raise _Unavailable(f"landlock_create_ruleset: {exc.strerror}") from exc
    try:
        for path in (*SYSTEM_READ_PATHS, *read_paths):
            _add_path_rule(ruleset_fd, path, _FS_READ, handled_fs)
        for path in (*SYSTEM_WRITE_PATHS, *write_paths):
            _add_path_rule(ruleset_fd, path, handled_fs, handled_fs)
        _syscall(_NR_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset_fd), ctypes.c_uint32(0))
    except OSError as exc:
        raise _Unavailable(f"Landlock: {exc.strerror}") from exc
    finally:
        os.close(ruleset_fd)
    if threads > 1:
        raise _Unavailable(
            f"partial (ABI {abi}): {threads - 1} thread(s) started before harden() are not restricted"
        )
    return f"enforced (ABI {abi})"


# -- seccomp -------------------------------------------------------------------------------
def _seccomp_program(arch: str) -> list[tuple[int, int, int, int]]:
    """Classic BPF: foreign arch -> EPERM; x32 (x86_64) -> EPERM; denied nr -> EPERM; else allow."""
    audit_arch, column, _ = _ARCHES[arch]
    deny_ret = (_BPF_RET_K, 0, 0, _SECCOMP_RET_ERRNO | errno.EPERM)
    prog = [
        (_BPF_LD_W_ABS, 0, 0, 4),  # seccomp_data.arch
        (_BPF_JEQ_K, 1, 0, audit_arch),
        deny_ret,
        (_BPF_LD_W_ABS, 0, 0, 0),  # seccomp_data.nr
    ]
    checks = [(_BPF_JSET_K, _X32_SYSCALL_BIT)] if arch == "x86_64" else []
    checks += [(_BPF_JEQ_K, nrs[column]) for nrs in DENIED_SYSCALLS.values()]
    # Each check jumps to the final deny_ret; the instruction after the checks allows.
    for i, (code, k) in enumerate(checks):
        prog.append((code, len(checks) - i, 0, k))
    prog += [(_BPF_RET_K, 0, 0, _SECCOMP_RET_ALLOW), deny_ret]
    return prog


def _apply_seccomp() -> str:
    arch = _native_arch()
    prog = _seccomp_program(arch)
    filters = (_SockFilter * len(prog))(*(_SockFilter(*ins) for ins in prog))
    fprog = _SockFprog(len(prog), ctypes.cast(filters, ctypes.POINTER(_SockFilter)))
    try:
        ret = _syscall(
            _ARCHES[arch][2],  # seccomp(2): unlike prctl, it can apply the filter to every thread
            ctypes.c_uint(_SECCOMP_SET_MODE_FILTER),
            ctypes.c_uint(_SECCOMP_FILTER_FLAG_TSYNC),
            ctypes.byref(fprog),
        )
    except OSError as exc:
        raise _Unavailable(f"seccomp filter: {exc.strerror}") from exc
    if ret != 0:  # TSYNC failed: thread `ret` has an incompatible filter
        raise _Unavailable(f"seccomp filter could not be synchronised to thread {ret}")
    return f"enforced: network, io_uring, ptrace and foreign-ABI syscalls denied ({arch})"


# -- entry point ---------------------------------------------------------------------------
def python_read_paths() -> list[str]:
    """The Python installation and the directory holding the ``mlcapsule`` package: what a
    worker must be able to read to import modules after hardening."""
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages()]
    if site.ENABLE_USER_SITE:
        paths.append(site.getusersitepackages())
    paths.append(str(Path(__file__).resolve().parents[1]))
    return list(dict.fromkeys(paths))


def harden(
    *,
    read_paths: Sequence[os.PathLike[str] | str],
    write_paths: Sequence[os.PathLike[str] | str],
    require: bool = False,
) -> HardeningReport:
    """Harden the calling process; see the module docstring. Call it before starting threads:
    ``import numpy`` starts OpenBLAS threads (unless ``OPENBLAS_NUM_THREADS=1``) and
    ``import onnxruntime`` a telemetry thread (unless ``ORT_DISABLE_TELEMETRY=1``).

    ``read_paths`` become readable (and executable), ``write_paths`` readable and writable,
    recursively; nothing else is, except :data:`SYSTEM_READ_PATHS`/:data:`SYSTEM_WRITE_PATHS`.
    With ``require=True`` a missing or partial seccomp or Landlock layer (or a failure of the
    dumpable flag) raises :class:`EnclaveError`; mlock is always best-effort.
    """
    reads = [os.fspath(p) for p in read_paths]
    writes = [os.fspath(p) for p in write_paths]
    failures: list[str] = []
    if sys.platform != "linux":
        if require:
            raise EnclaveError(f"enclave worker hardening needs Linux, not {sys.platform}")
        off = f"unavailable: not Linux ({sys.platform})"
        return HardeningReport(nondumpable=False, seccomp=off, landlock=off, mlock=off)

    nondumpable = _set_nondumpable()
    if not nondumpable:
        failures.append("prctl(PR_SET_DUMPABLE, 0) failed")
    mlock = _lock_memory()

    try:
        _prctl(_PR_SET_NO_NEW_PRIVS, 1)  # required by both Landlock and seccomp
        no_new_privs = ""
    except OSError as exc:
        no_new_privs = f"unavailable: prctl(PR_SET_NO_NEW_PRIVS): {exc.strerror}"
        failures.append(no_new_privs)

    def layer(apply: Callable[[], str]) -> str:
        if no_new_privs:
            return no_new_privs
        try:
            return apply()
        except _Unavailable as exc:
            failures.append(str(exc))
            return str(exc) if str(exc).startswith("partial") else f"unavailable: {exc}"

    landlock = layer(lambda: _apply_landlock(reads, writes))
    seccomp = layer(_apply_seccomp)

    if require and failures:
        raise EnclaveError(
            "enclave worker hardening failed: " + "; ".join(failures),
            hint="the software backend needs Linux 5.13+ with seccomp and Landlock enabled, "
            "and harden() must run before the worker starts any thread",
        )
    return HardeningReport(nondumpable=nondumpable, seccomp=seccomp, landlock=landlock, mlock=mlock)
