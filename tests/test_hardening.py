"""Hardening of the software enclave worker, tested attack by attack.

Every hardened run happens in a subprocess (tests/_hardened_probe.py) so pytest itself is
never sandboxed: the probe hardens itself exactly as the enclave worker does (read paths:
the Python installation and the capsule file; write paths: the state directory and
/dev/shm), then tries the attack and prints what happened as JSON.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mlcapsule.enclave import hardening
from mlcapsule.enclave.errors import EnclaveError

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the software enclave backend is Linux-only")

HERE = Path(__file__).resolve().parent
PROBE = HERE / "_hardened_probe.py"
SRC = HERE.parent / "src"
MACHINE = platform.machine()
SECRET = "the provider's secret, outside the sandbox"


# -- kernel features, checked independently of the module under test ----------------------
def _kernel_has_seccomp() -> bool:
    return "Seccomp:" in Path("/proc/self/status").read_text()


LANDLOCK_ABI = hardening.landlock_abi()
needs_landlock = pytest.mark.skipif(
    LANDLOCK_ABI == 0, reason="kernel has no Landlock (needs Linux 5.13+ with landlock in lsm=)"
)
needs_seccomp = pytest.mark.skipif(
    not _kernel_has_seccomp() or MACHINE not in ("x86_64", "aarch64"),
    reason=f"kernel lacks seccomp, or no syscall table for {MACHINE}",
)


def probe_env() -> dict[str, str]:
    pythonpath = os.pathsep.join(filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))
    return dict(os.environ, PYTHONPATH=pythonpath)


def run_probe(cfg: dict[str, Any], *, timeout: float = 180) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, str(PROBE), json.dumps(cfg)], capture_output=True, text=True, timeout=timeout, env=probe_env()
    )
    assert proc.returncode == 0, f"probe failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _write_model(path: Path) -> bool:
    """A 1-node ONNX model, Y = X + [1, 2, 3, 4]; False if onnx is not installed."""
    try:
        from onnx import TensorProto, helper
    except ImportError:
        path.write_bytes(b"not a model")
        return False
    x = helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])
    y = helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, 4])
    b = helper.make_tensor("B", TensorProto.FLOAT, [4], [1.0, 2.0, 3.0, 4.0])
    graph = helper.make_graph([helper.make_node("Add", ["X", "B"], ["Y"])], "add", [x], [y], [b])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return True


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    capsule_dir = tmp_path_factory.mktemp("capsule")
    state_dir = tmp_path_factory.mktemp("state")
    outside_dir = tmp_path_factory.mktemp("outside")
    (outside_dir / "secret.txt").write_text(SECRET)
    capsule = capsule_dir / "model.mlcapsule"
    has_model = _write_model(capsule)
    return {
        "capsule": str(capsule),
        "state_dir": str(state_dir),
        "outside_dir": str(outside_dir),
        "has_model": has_model,
    }


@pytest.fixture(scope="module")
def worker(dirs: dict[str, Any]) -> dict[str, Any]:
    """One hardened worker run with every check; the loopback listener is the exfiltration target."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(0.5)
        cfg = {**dirs, "mode": "worker", "listen_port": listener.getsockname()[1], "run_model": dirs["has_model"]}
        result = run_probe(cfg)
        try:
            conn, _ = listener.accept()
            conn.close()
            result["listener_got_connection"] = True
        except TimeoutError:
            result["listener_got_connection"] = False
    return result


def denied(check: dict[str, Any], errnos: tuple[str, ...] = ("EPERM",)) -> bool:
    return check["ok"] is False and check["errno"] in errnos


# -- network ---------------------------------------------------------------------------------
@needs_seccomp
def test_exfiltration_via_socket_is_denied(worker: dict[str, Any]) -> None:
    after = worker["after"]
    for name in ("socket_inet", "socket_inet6", "socket_udp", "socket_unix", "socketpair", "create_connection"):
        assert denied(after[name]), (name, after[name])
        assert after[name]["exc"] == "PermissionError"
    assert denied(after["raw_socket_syscall"])  # not just Python's socket module
    assert worker["listener_got_connection"] is False


@needs_seccomp
@pytest.mark.skipif(MACHINE != "x86_64", reason="x32 and i386 ABIs exist only on x86_64")
def test_exfiltration_via_x32_syscall_abi_is_denied(worker: dict[str, Any]) -> None:
    # socket | __X32_SYSCALL_BIT: the same socket() through the x32 ABI's numbering
    assert denied(worker["after"]["x32_socket"]), worker["after"]["x32_socket"]


INT80_SRC = r"""
long int80(long nr, long a, long b, long c) {
    long ret;
    __asm__ volatile ("int $0x80" : "=a"(ret) : "a"(nr), "b"(a), "c"(b), "d"(c)
                      : "memory", "r8", "r9", "r10", "r11");
    return ret;
}
"""


@needs_seccomp
@pytest.mark.skipif(MACHINE != "x86_64", reason="int 0x80 (i386 ABI) exists only on x86_64")
def test_exfiltration_via_32bit_syscall_abi_is_denied(dirs: dict[str, Any], tmp_path: Path) -> None:
    """int 0x80 enters the i386 syscall table (socket is 359 there, not 41), so a filter on
    x86_64 numbers alone would let it through; the arch check denies every i386 call."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler to build the int 0x80 probe")
    (tmp_path / "int80.c").write_text(INT80_SRC)
    lib = tmp_path / "libint80.so"
    subprocess.run([gcc, "-O1", "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "int80.c")], check=True)
    proc = subprocess.run(
        [sys.executable, str(PROBE), json.dumps({**dirs, "mode": "int80", "int80_lib": str(lib)})],
        capture_output=True, text=True, timeout=120, env=probe_env(),
    )
    lines = proc.stdout.strip().splitlines()
    if not lines:  # died before hardening: int 0x80 itself faults
        pytest.skip(f"kernel has no IA32 emulation (int 0x80 probe died with {proc.returncode})")
    first = json.loads(lines[0])
    if first.get("before", {}).get("socket") == -38:
        pytest.skip("kernel has no IA32 emulation (int 0x80 answers ENOSYS)")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(lines[-1])
    assert result["before"]["socket"] >= 0  # control: the bypass works on an unhardened process
    assert result["before"]["getpid"] > 0
    assert result["after"] == {"socket": -1, "getpid": -1}  # -EPERM for every i386 syscall


@needs_seccomp
def test_io_uring_is_denied(worker: dict[str, Any]) -> None:
    """io_uring runs socket and file operations without syscalls the filter could see."""
    assert denied(worker["after"]["io_uring_setup"]), worker["after"]["io_uring_setup"]


@needs_seccomp
@needs_landlock
def test_sandbox_is_inherited_by_threads_and_child_processes(worker: dict[str, Any]) -> None:
    after = worker["after"]
    assert denied(after["socket_in_new_thread"])
    if worker["after"]["onnx_model"] is not None:
        assert denied(after["socket_after_ort_threads"])
    child = after["socket_in_child_process"]
    assert child["returncode"] != 0 and "PermissionError" in child["stderr_tail"], child
    child = after["read_outside_in_child_process"]
    assert child["returncode"] != 0 and "PermissionError" in child["stderr_tail"], child


# -- filesystem ------------------------------------------------------------------------------
@needs_landlock
def test_reading_files_outside_allowed_paths_is_denied(worker: dict[str, Any]) -> None:
    before, after = worker["before"], worker["after"]
    assert before["read_outside"] == {"ok": True, "value": SECRET}  # control
    for name in ("read_outside", "list_outside", "read_etc_passwd", "read_home", "read_proc_1_environ"):
        assert denied(after[name], ("EACCES",)), (name, after[name])
    if Path("/etc/hostname").exists():
        assert denied(after["read_etc_hostname"], ("EACCES",)), after["read_etc_hostname"]


@needs_landlock
def test_writing_outside_state_dir_is_denied(worker: dict[str, Any], dirs: dict[str, Any]) -> None:
    after = worker["after"]
    for name in ("write_outside", "write_tmp", "write_capsule_dir", "overwrite_capsule", "write_site_packages"):
        assert denied(after[name], ("EACCES",)), (name, after[name])
    assert not (Path(dirs["outside_dir"]) / "dropped.txt").exists()
    assert not (Path(dirs["capsule"]).parent / "dropped.txt").exists()


def test_state_dir_and_capsule_remain_usable(worker: dict[str, Any], dirs: dict[str, Any]) -> None:
    after = worker["after"]
    assert after["read_capsule"] == {"ok": True, "value": Path(dirs["capsule"]).stat().st_size}
    assert after["state_roundtrip"] == {"ok": True, "value": "sealed"}
    if Path("/dev/shm").is_dir():
        assert after["shm_roundtrip"] == {"ok": True, "value": 4096}
    assert after["write_dev_null"]["ok"] is True


def test_onnxruntime_runs_a_model_after_hardening(worker: dict[str, Any], dirs: dict[str, Any]) -> None:
    if not dirs["has_model"]:
        pytest.skip("onnx is not installed, so no test model could be built")
    result = worker["after"]["onnx_model"]
    assert result == {"ok": True, "value": [[2.0, 3.0, 4.0, 5.0]] * 2}, result
    assert worker["after"]["mlock_numpy"] is True


# -- memory ----------------------------------------------------------------------------------
def test_worker_is_not_dumpable(worker: dict[str, Any]) -> None:
    after = worker["after"]
    assert after["dumpable"] == 0  # prctl(PR_GET_DUMPABLE); /proc/PID/status has no such field


def _spawn_victim(dirs: dict[str, Any], *, harden: bool) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    proc = subprocess.Popen(
        [sys.executable, str(PROBE), json.dumps({**dirs, "mode": "victim", "harden": harden})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=probe_env(),
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        proc.kill()
        raise AssertionError(f"victim died: {proc.communicate()[1]}")
    return proc, json.loads(line)


def _attack(dirs: dict[str, Any], *, harden: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    victim, info = _spawn_victim(dirs, harden=harden)
    try:
        return info, run_probe(
            {"mode": "attacker", "target_pid": info["pid"], "address": info["address"], "length": info["length"]},
            timeout=60,
        )
    finally:
        victim.communicate("", timeout=30)


def test_memory_of_worker_cannot_be_read_by_sibling_process(dirs: dict[str, Any]) -> None:
    """A same-uid process without CAP_SYS_PTRACE (both drop all capabilities) tries to read
    the worker's key via /proc/PID/mem, process_vm_readv and ptrace."""
    _, control = _attack(dirs, harden=False)
    if not control["proc_mem"]["ok"]:
        pytest.skip(f"this system already forbids same-uid memory access (e.g. Yama): {control['proc_mem']}")
    assert control["proc_mem"]["value"] == "MLCAPSULE-SECRET-KEY-0123456789!"
    assert control["process_vm_readv"]["value"] == "MLCAPSULE-SECRET-KEY-0123456789!"
    assert control["ptrace_seize"]["ok"] is True

    victim, attack = _attack(dirs, harden=True)
    assert denied(attack["proc_mem"], ("EACCES", "EPERM")), attack["proc_mem"]
    assert denied(attack["process_vm_readv"]), attack["process_vm_readv"]
    assert denied(attack["ptrace_seize"]), attack["ptrace_seize"]
    # Without CAP_IPC_LOCK the victim falls back to per-buffer locking (unless unlimited).
    assert victim["report"]["nondumpable"] is True
    assert victim["report"]["mlock"].startswith(_expected_mlock(cap_ipc_lock=False))


def test_mlock_buffer_locks_writable_buffers(worker: dict[str, Any]) -> None:
    after = worker["after"]
    assert after["mlock_bytearray"] is True
    assert after["mlock_bytes"] is False  # read-only: no address to lock
    assert after["status_vmlck"]["ok"] and after["status_vmlck"]["value"] != "0 kB"


# -- the report and the failure modes -----------------------------------------------------
def _expected_mlock(*, cap_ipc_lock: bool | None = None) -> str:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if cap_ipc_lock is None:
        match = re.search(r"CapEff:\s*([0-9a-f]+)", Path("/proc/self/status").read_text())
        cap_ipc_lock = match is not None and bool(int(match.group(1), 16) >> 14 & 1)
    return "mlockall" if soft == resource.RLIM_INFINITY or cap_ipc_lock else "per-buffer"


def test_report_is_truthful(worker: dict[str, Any]) -> None:
    report = worker["report"]
    status = worker["after"]["status"]["value"]
    assert report["nondumpable"] is True
    if LANDLOCK_ABI:
        assert report["landlock"] == f"enforced (ABI {LANDLOCK_ABI})"
    else:
        assert report["landlock"].startswith("unavailable: ")
    if _kernel_has_seccomp() and MACHINE in ("x86_64", "aarch64"):
        assert report["seccomp"].startswith("enforced: ") and MACHINE in report["seccomp"]
        assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
    else:
        assert report["seccomp"].startswith("unavailable: ")
    assert report["mlock"].startswith(_expected_mlock())


@needs_landlock
@needs_seccomp
def test_threads_started_before_hardening_are_refused(dirs: dict[str, Any]) -> None:
    """Landlock restricts only the calling thread: a thread started earlier keeps reading
    the filesystem. harden(require=True) refuses; otherwise the report says 'partial'."""
    refused = run_probe({**dirs, "mode": "threads", "require": True})
    assert refused["raised"] == "EnclaveError" and "thread" in refused["message"]

    partial = run_probe({**dirs, "mode": "threads", "require": False})
    assert partial["report"]["landlock"].startswith("partial")
    assert partial["early_thread"]["read_outside"] == {"ok": True, "value": SECRET}  # the gap is real
    assert denied(partial["early_thread"]["socket"])  # seccomp reached it (TSYNC)
    assert denied(partial["main_read_outside"], ("EACCES",))


@needs_seccomp
def test_missing_landlock_is_reported_or_refused(dirs: dict[str, Any]) -> None:
    result = run_probe({**dirs, "mode": "no_landlock", "require": False})
    assert result["report"]["landlock"].startswith("unavailable: Landlock not supported by this kernel")
    assert result["report"]["seccomp"].startswith("enforced")  # the other layers still apply
    assert denied(result["socket"])

    result = run_probe({**dirs, "mode": "no_landlock", "require": True})
    assert result["raised"] == EnclaveError.__name__
    assert "Landlock" in result["message"] and result["hint"]


def test_report_as_dict() -> None:
    fields = {"nondumpable": True, "seccomp": "enforced: x", "landlock": "enforced (ABI 7)", "mlock": "m"}
    assert hardening.HardeningReport(**fields).as_dict() == fields  # type: ignore[arg-type]


# -- the filter itself --------------------------------------------------------------------------
def _header_numbers(path: Path) -> dict[str, int]:
    return {m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+)\s+(\d+)\b", path.read_text())}


@pytest.mark.parametrize(
    ("column", "headers"),
    [
        (0, ["/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h"]),
        (1, ["/usr/include/asm-generic/unistd.h"]),
    ],
    ids=["x86_64", "aarch64"],
)
def test_denied_syscall_numbers_match_kernel_headers(column: int, headers: list[str]) -> None:
    header = next((Path(h) for h in headers if Path(h).exists()), None)
    if header is None:
        pytest.skip(f"kernel headers not installed ({headers[0]})")
    numbers = _header_numbers(header)
    for name, nrs in hardening.DENIED_SYSCALLS.items():
        assert numbers[name] == nrs[column], (name, numbers[name], nrs[column])


@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_seccomp_program_checks_arch_first_and_every_jump_lands_on_deny(arch: str) -> None:
    prog = hardening._seccomp_program(arch)
    deny = (0x06, 0, 0, 0x00050001)  # RET ERRNO|EPERM
    assert prog[0] == (0x20, 0, 0, 4)  # load seccomp_data.arch
    assert prog[1][0] == 0x15 and prog[1][1] == 1 and prog[2] == deny  # foreign arch -> EPERM
    assert prog[-1] == deny and prog[-2] == (0x06, 0, 0, 0x7FFF0000)
    checked = set()
    for i, (code, jt, jf, k) in enumerate(prog[4:-2], start=4):
        assert code in (0x15, 0x45) and jf == 0
        assert i + 1 + jt == len(prog) - 1  # every match jumps to the deny
        checked.add(k)
    column = 0 if arch == "x86_64" else 1
    assert {nrs[column] for nrs in hardening.DENIED_SYSCALLS.values()} <= checked
    assert (0x40000000 in checked) == (arch == "x86_64")  # x32 bit


def test_python_read_paths_cover_the_interpreter_and_the_package() -> None:
    paths = hardening.python_read_paths()
    assert sys.prefix in paths and sys.base_prefix in paths
    assert str(Path(hardening.__file__).resolve().parents[1]) in paths


def test_code_swap_outside_the_measured_files_is_impossible() -> None:
    """Every mlcapsule module the enclave worker imports (both backends) is among the files the
    measurement hashes: changing any code the enclave runs changes the measurement."""
    import subprocess
    import sys

    from mlcapsule.enclave.measurement import PACKAGE_ROOT, tcb_files
    from mlcapsule.host import BOOT_PRELUDE

    code = (BOOT_PRELUDE + "; import mlcapsule.enclave.worker, mlcapsule.enclave.backends.software, "
            "mlcapsule.enclave.backends.tpm\n"
            "print('\\n'.join(m.__file__ for n, m in sys.modules.items() "
            "if n.startswith('mlcapsule') and getattr(m, '__file__', None)))")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(PACKAGE_ROOT.parent)],
                         capture_output=True, text=True, check=True).stdout
    imported = {Path(p).resolve() for p in out.split()}
    measured = {f.resolve() for f in tcb_files()}
    assert imported and imported <= measured, sorted(str(p) for p in imported - measured)
