"""``mlcapsule enclaved``: the enclave service, under its own system user.

In per-user mode the enclave worker runs under the client's own uid, so the client's account
can read the software platform secret, talk to the TPM that seals the state key, restore the
sealed state, and read the worker's memory (red team, issue 9). The service closes that: it
runs as a dedicated user (``mlcapsule``) that alone owns the platform secret, the sealed states
and the TPM access, and starts one hardened worker per session. Only root can reach past it.

Protocol (``AF_UNIX``, ``SOCK_SEQPACKET``, so each message keeps its boundaries and carries its
descriptors with ``SCM_RIGHTS``): the client sends one JSON request with the capsule's open
descriptor (and the shared-memory arena's), the service identifies the caller with
``SO_PEERCRED``, keeps each uid's licenses in its own folder, starts the worker with those
descriptors, and answers with the two pipe ends the client then talks to the worker through
directly (the hot path does not pass through the service). The connection stays open as the
session's control channel: closing it kills the worker, as the death of its host does in
per-user mode; the service reports the worker's exit on it.

The service never sees a key or a tensor: it relays nothing but descriptors.
"""

from __future__ import annotations

import json
import os
import pwd
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .enclave.errors import EnclaveError, MlcapsuleError, UsageError

DEFAULT_SOCKET = "/run/mlcapsule/enclaved.sock"
DEFAULT_BASE = "/var/lib/mlcapsule"
DEFAULT_USER = "mlcapsule"
UNIT_NAME = "mlcapsule-enclaved.service"
#: The client looks for the service here; MLCAPSULE_ENCLAVED=off forces per-user mode.
SOCKET_ENV = "MLCAPSULE_ENCLAVED_SOCKET"
MODE_ENV = "MLCAPSULE_ENCLAVED"
MAX_MESSAGE = 64 * 1024
MAX_FDS = 2

SERVICE_PROTECTS = ("the model, the keys and the sealed license state are held by the service's own user: "
                    "the client's user account cannot read them, restore them, read the worker's memory or "
                    "ptrace it, talk to its TPM, or inject code into it (LD_PRELOAD, PYTHONPATH)")
SERVICE_DOES_NOT = "root, and whoever controls the service's user, can do all of that"
PER_USER_PROTECTS = ("other local users (0600 files, a non-dumpable worker); the client application's code "
                     "reading weights through the enclave interface")
PER_USER_DOES_NOT = ("the client's own user account: it can read the software platform secret, unseal the "
                     "TPM state key (empty auth), restore the sealed state and read the worker's memory")


def send_msg(sock: socket.socket, obj: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise UsageError("message too large for the enclave service")
    socket.send_fds(sock, [data], list(fds))


def recv_msg(sock: socket.socket) -> tuple[dict[str, Any] | None, list[int]]:
    """One message and the descriptors it carried; (None, []) at end of stream. A malformed
    message closes every descriptor that came with it and raises ValueError."""
    data, fds, flags, _ = socket.recv_fds(sock, MAX_MESSAGE, MAX_FDS)
    if not data and not fds:
        return None, []
    try:
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            raise ValueError("truncated message")
        try:
            msg = json.loads(data)
        except RecursionError as e:  # nested too deep: it escaped the session and leaked the fds (fuzzing)
            raise ValueError("nested too deep") from e
        if not isinstance(msg, dict):
            raise ValueError("not an object")
        return msg, fds
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise


# -- client side -----------------------------------------------------------------------------------
def service_socket() -> Path | None:
    """The service's socket if the client should use it (it exists and MLCAPSULE_ENCLAVED is not
    ``off``), else None: per-user mode."""
    if os.environ.get(MODE_ENV, "").lower() in ("off", "0", "no", "false"):
        return None
    path = Path(os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET)
    return path if path.exists() else None


class ServiceWorker:
    """The client's handle on a worker the service started: the session's control connection."""

    def __init__(self, conn: socket.socket, info: dict[str, Any]) -> None:
        self.conn = conn
        self.pid = int(info.get("worker_pid", -1))
        self.returncode: int | None = None
        self._log = ""

    def _read_exit(self, timeout: float | None) -> None:
        if self.returncode is not None:
            return
        ready, _, _ = select.select([self.conn], [], [], timeout)
        if not ready:
            return
        try:
            msg, fds = recv_msg(self.conn)
        except (OSError, ValueError):
            msg, fds = None, []
        for fd in fds:
            os.close(fd)
        if msg is None:
            self.returncode = -signal.SIGKILL if self.returncode is None else self.returncode
            return
        if "exit" in msg:
            self.returncode = int(msg["exit"])
            self._log = str(msg.get("log", ""))[:500]

    def poll(self) -> int | None:
        self._read_exit(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        self._read_exit(timeout)
        if self.returncode is None:
            raise subprocess.TimeoutExpired("enclave worker", timeout or 0)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            try:
                send_msg(self.conn, {"op": "kill"})
            except OSError:
                pass
            self._read_exit(10)

    def log_tail(self) -> str:
        return self._log or "no output"

    def close(self) -> None:
        self.conn.close()


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except OSError as e:
        sock.close()
        raise EnclaveError(f"the enclave service at {path} is not answering ({e.strerror})",
                           hint="start it (systemctl start mlcapsule-enclaved), or set MLCAPSULE_ENCLAVED=off "
                                "to run the enclave under your own user (weaker: see `mlcapsule status`)") from e
    return sock


def _request(sock: socket.socket, msg: dict[str, Any], fds: list[int]) -> tuple[dict[str, Any], list[int]]:
    send_msg(sock, msg, fds)
    try:
        reply, got = recv_msg(sock)
    except ValueError as e:
        raise EnclaveError("the enclave service sent a malformed reply") from e
    if reply is None:
        raise EnclaveError("the enclave service closed the connection",
                           hint="see its log (journalctl -u mlcapsule-enclaved)")
    if "error" in reply:
        for fd in got:
            os.close(fd)
        from .host import EnclaveProcess

        EnclaveProcess._raise_error(reply)
    return reply["ok"], got


def service_info(path: Path) -> dict[str, Any]:
    with _connect(path) as sock:
        return _request(sock, {"op": "info"}, [])[0]


def connect(path: Path, capsule: Path, *, arena_fd: int | None, threads: int | None,
            memory_limit_mb: float | None) -> tuple[ServiceWorker, int, int, dict[str, Any]]:
    """Open ``capsule`` in a worker of the service: (handle, to_worker, from_worker, info)."""
    sock = _connect(path)
    try:
        cfd = os.open(capsule, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        sock.close()
        raise UsageError(f"cannot open {capsule}: {e.strerror}") from e
    try:
        fds = [cfd] + ([arena_fd] if arena_fd is not None else [])
        info, got = _request(sock, {"op": "open", "arena": arena_fd is not None, "threads": threads or 0,
                                    "memory_limit_mb": float(memory_limit_mb or 0)}, fds)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(cfd)
    if len(got) != 2:
        for fd in got:
            os.close(fd)
        sock.close()
        raise EnclaveError("the enclave service did not hand over the worker's pipes")
    return ServiceWorker(sock, info), got[0], got[1], info


# -- the service -----------------------------------------------------------------------------------
@dataclass
class ServiceConfig:
    socket_path: Path
    base_dir: Path
    backend: str = "software"
    tcti: str | None = None
    max_sessions_per_user: int = 8
    require_hardening: bool = False

    @property
    def platform_dir(self) -> Path:
        return self.base_dir / "platform" / self.backend

    def users_dir(self) -> Path:
        return self.base_dir / "users"


class EnclaveService:
    def __init__(self, config: ServiceConfig) -> None:
        self.config = config
        self._sessions: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.user = pwd.getpwuid(os.getuid()).pw_name

    def info(self) -> dict[str, Any]:
        return {"mode": "service", "service_user": self.user, "backend": self.config.backend,
                "protects_against": SERVICE_PROTECTS, "does_not_protect_against": SERVICE_DOES_NOT}

    def prepare(self) -> socket.socket:
        c = self.config
        for d in (c.base_dir, c.users_dir(), c.base_dir / "run", c.platform_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(d, 0o700)
        c.socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        try:
            c.socket_path.unlink()
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.bind(str(c.socket_path))
        os.chmod(c.socket_path, 0o666)  # any local user may ask; each gets only its own licenses
        sock.listen(64)
        return sock

    def serve_forever(self, sock: socket.socket) -> None:
        sock.settimeout(0.5)
        while not self._stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stop.is_set():
                    break
                raise
            threading.Thread(target=self._session, args=(conn,), daemon=True).start()
        sock.close()

    def stop(self) -> None:
        self._stop.set()

    # -- one connection ---------------------------------------------------------------------------
    def _session(self, conn: socket.socket) -> None:
        fds: list[int] = []
        with conn:
            try:
                pid, uid, gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                    struct.calcsize("3i")))
                msg, fds = recv_msg(conn)
                if msg is None:
                    return
                op = msg.get("op")
                if op == "info":
                    send_msg(conn, {"ok": self.info()})
                elif op == "open":
                    self._open(conn, uid, msg, fds)
                    fds = []
                else:
                    raise UsageError(f"unknown request {op!r}")
            except MlcapsuleError as e:
                self._reply_error(conn, e.__class__.__name__, e.message, e.hint)
            except (ValueError, TypeError, KeyError) as e:
                self._reply_error(conn, "ProtocolError", f"malformed request ({type(e).__name__})", None)
            except OSError:
                pass  # the client went away
            finally:
                for fd in fds:
                    os.close(fd)

    @staticmethod
    def _reply_error(conn: socket.socket, kind: str, message: str, hint: str | None) -> None:
        try:
            send_msg(conn, {"error": {"type": kind, "message": message, "hint": hint}})
        except OSError:
            pass

    def _open(self, conn: socket.socket, uid: int, msg: dict[str, Any], fds: list[int]) -> None:
        import stat

        from .enclave.format.container import CapsuleFile
        from .enclave.format.trust import UnsafeTrustManifestKey
        from .host import worker_argv, worker_env

        want_arena = bool(msg.get("arena"))
        if len(fds) != 1 + int(want_arena):
            raise UsageError("send the capsule's descriptor (and the arena's, if any)")
        cfd, afd = fds[0], (fds[1] if want_arena else None)
        if not stat.S_ISREG(os.fstat(cfd).st_mode):
            raise UsageError("the capsule descriptor is not a regular file")
        threads = int(msg.get("threads") or 0)
        memory = float(msg.get("memory_limit_mb") or 0)
        if not 0 <= threads <= 256 or not 0 <= memory <= 1 << 20:
            raise UsageError("threads or memory limit out of range")
        # The public manifest only, to pick the license folder: the worker's license check pins the key.
        with CapsuleFile(cfd, trust=UnsafeTrustManifestKey()) as cf:
            m = cf.manifest
        with self._lock:
            if self._sessions.get(uid, 0) >= self.config.max_sessions_per_user:
                raise EnclaveError(f"too many enclave sessions for this user (at most "
                                   f"{self.config.max_sessions_per_user})", hint="close one and try again")
            self._sessions[uid] = self._sessions.get(uid, 0) + 1
        run_dir = None
        try:
            user_dir = self.config.users_dir() / str(uid)
            user_dir.mkdir(exist_ok=True, mode=0o700)
            state_dir = user_dir / f"{m.capsule_id}-v{m.version}"
            state_dir.mkdir(exist_ok=True, mode=0o700)
            run_dir = Path(tempfile.mkdtemp(prefix=f"run-{uid}-", dir=self.config.base_dir / "run"))
            to_worker_r, to_worker_w = os.pipe()
            from_worker_r, from_worker_w = os.pipe()
            cmd = worker_argv(fd_in=to_worker_r, fd_out=from_worker_w, capsule_fd=cfd, state_dir=state_dir,
                              run_dir=run_dir, backend=self.config.backend, platform_dir=self.config.platform_dir,
                              tcti=self.config.tcti, threads=threads or None, memory_limit_mb=memory or None,
                              require_hardening=self.config.require_hardening, shm_fd=afd)
            passed = (to_worker_r, from_worker_w, cfd) + ((afd,) if afd is not None else ())
            with open(run_dir / "worker.log", "w+b") as log:
                try:
                    proc = subprocess.Popen(cmd, pass_fds=passed, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            env=worker_env(), close_fds=True, start_new_session=True)
                finally:
                    for fd in passed:
                        os.close(fd)
                    fds.clear()
                try:
                    from .enclave.state import STATE_FILE

                    send_msg(conn, {"ok": {**self.info(), "worker_pid": proc.pid,
                                           "set_up": (state_dir / STATE_FILE).exists(),
                                           "capsule_id": str(m.capsule_id), "version": m.version}},
                             [to_worker_w, from_worker_r])
                finally:
                    os.close(to_worker_w)
                    os.close(from_worker_r)
                self._watch(conn, proc)
                log.seek(0)
                lines = [ln for ln in log.read().decode(errors="replace").splitlines() if ln.strip()]
            try:
                send_msg(conn, {"exit": proc.returncode, "log": lines[-1][:300] if lines else ""})
            except OSError:
                pass
        finally:
            for fd in fds:
                os.close(fd)
            with self._lock:
                self._sessions[uid] -= 1
            if run_dir is not None:
                shutil.rmtree(run_dir, ignore_errors=True)

    @staticmethod
    def _watch(conn: socket.socket, proc: subprocess.Popen[bytes]) -> None:
        """Until the worker exits: a closed connection (the client died or is done) or a
        ``kill`` request kills it."""
        while proc.poll() is None:
            ready, _, _ = select.select([conn], [], [], 0.2)
            if not ready:
                continue
            try:
                msg, fds = recv_msg(conn)
            except (OSError, ValueError):
                msg, fds = None, []
            for fd in fds:
                os.close(fd)
            if msg is None or msg.get("op") == "kill":
                proc.kill()
                proc.wait()
                return
        proc.wait()


def run_service(config: ServiceConfig) -> None:
    service = EnclaveService(config)
    sock = service.prepare()
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    print(f"mlcapsule enclaved: serving on {config.socket_path} as user {service.user} "
          f"({config.backend} backend, state in {config.base_dir})", file=sys.stderr, flush=True)
    try:
        service.serve_forever(sock)
    except KeyboardInterrupt:
        pass
    finally:
        try:
            config.socket_path.unlink()
        except OSError:
            pass


# -- installation ----------------------------------------------------------------------------------
def unit_text(*, user: str, base_dir: Path, socket_path: Path, backend: str, tcti: str | None) -> str:
    exe = (f"{sys.executable} -I -m mlcapsule enclaved run --socket {socket_path} --state-dir {base_dir} "
           f"--backend {backend}")
    if tcti:
        exe += f" --tcti {tcti}"
    return f"""[Unit]
Description=mlcapsule enclave service (guarded offline ML inference)
After=local-fs.target

[Service]
Type=simple
User={user}
Group={user}
ExecStart={exe}
RuntimeDirectory={socket_path.parent.name}
RuntimeDirectoryMode=0755
UMask=0077
Restart=on-failure
NoNewPrivileges=yes
PrivateTmp=yes
ProtectSystem=strict
ProtectHome=read-only
ReadWritePaths={base_dir}
LimitMEMLOCK=infinity

[Install]
WantedBy=multi-user.target
"""


def install(*, user: str, base_dir: Path, socket_path: Path, unit_dir: Path, backend: str,
            tcti: str | None) -> dict[str, Any]:
    """Create the system user, its folders (0700) and the systemd unit. Root only."""
    if os.geteuid() != 0:
        raise UsageError("`enclaved install` must run as root", hint="sudo mlcapsule enclaved install")
    created = False
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        nologin = shutil.which("nologin") or "/usr/sbin/nologin"
        subprocess.run(["useradd", "--system", "--user-group", "--home-dir", str(base_dir), "--no-create-home",
                        "--shell", nologin, user], check=True, capture_output=True)
        pw = pwd.getpwnam(user)
        created = True
    if backend == "tpm":
        import grp

        try:
            grp.getgrnam("tss")
            subprocess.run(["usermod", "-a", "-G", "tss", user], check=True, capture_output=True)
        except KeyError:
            pass
    for d in (base_dir, base_dir / "users", base_dir / "run", base_dir / "platform"):
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chown(d, pw.pw_uid, pw.pw_gid)
        os.chmod(d, 0o700)
    socket_path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    os.chown(socket_path.parent, pw.pw_uid, pw.pw_gid)
    # The service runs this very installation: its user must be able to run it.
    probe = subprocess.run([sys.executable, "-I", "-c", "import mlcapsule.enclave.worker"], user=pw.pw_uid,
                           group=pw.pw_gid, extra_groups=[], env={"PATH": "/usr/bin:/bin"}, capture_output=True,
                           text=True, cwd="/")
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["it exited with " + str(probe.returncode)])[-1]
        raise UsageError(f"user {user} cannot run this mlcapsule installation ({sys.executable}): {why}",
                         hint="install mlcapsule where other users can read it (e.g. a venv under /opt), then "
                              "run `enclaved install` from there")
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit = unit_dir / UNIT_NAME
    unit.write_text(unit_text(user=user, base_dir=base_dir, socket_path=socket_path, backend=backend, tcti=tcti))
    return {"user": user, "uid": pw.pw_uid, "user_created": created, "state_dir": str(base_dir),
            "socket": str(socket_path), "unit": str(unit)}
