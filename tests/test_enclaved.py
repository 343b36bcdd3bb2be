"""The enclave service under its own system user, end to end, attacked by a real second user.

Root (the test) installs the service with `mlcapsule enclaved install` (a real system user, its
folders 0700), starts `mlcapsule enclaved run` as that user, and a provider server on loopback.
A separate unprivileged client user then sets up and predicts through the service, and runs the
red team's attacks against it (issue 9, item 7): each must fail while the client's legitimate
predictions work. The per-user mode's weakness is shown beside it: the same attacks succeed
against a worker that runs under the client's own uid.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from _server_support import harness, platform, provider_files, serve_in_thread  # noqa: F401  (fixtures)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create the service's and the client's users")

SERVICE_USER = "mlcapsule-ci"
CLIENT_USER = "mlcclient-ci"


def _ensure_user(name: str, home: Path) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--system", "--user-group", "--home-dir", str(home), "--no-create-home",
                        "--shell", "/usr/sbin/nologin", name], check=True, capture_output=True)
        return pwd.getpwnam(name)


def _grant_passage(users: list[str], paths: list[Path]) -> list[tuple[str, Path]]:
    """Let ``users`` traverse the folders above ``paths`` that others cannot (this machine's
    Python lives under /root, 0700): an ACL entry for each test user, removed at teardown."""
    granted = []
    for target in paths:
        for d in [*reversed(Path(os.path.realpath(target)).parents)]:
            if d.stat().st_mode & 0o001:
                continue
            for u in users:
                subprocess.run(["setfacl", "-m", f"u:{u}:x", str(d)], check=True)
                granted.append((u, d))
    return granted


@dataclass
class Deployment:
    base: Path
    socket: Path
    state: Path
    service: pwd.struct_passwd
    client: pwd.struct_passwd
    client_home: Path
    proc: subprocess.Popen[bytes]

    def as_client(self, code: str, *, env: dict[str, str] | None = None, timeout: float = 120,
                  stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        script = self.client_home / f"script-{time.monotonic_ns()}.py"
        script.write_text(textwrap.dedent(code))
        os.chown(script, self.client.pw_uid, self.client.pw_gid)
        e = {"PATH": "/usr/bin:/bin", "HOME": str(self.client_home), "MLCAPSULE_HOME": str(self.client_home / "mlc"),
             "MLCAPSULE_ENCLAVED_SOCKET": str(self.socket), **(env or {})}
        return subprocess.run([sys.executable, str(script)], user=self.client.pw_uid, group=self.client.pw_gid,
                              extra_groups=[], env=e, capture_output=True, text=True, timeout=timeout,
                              cwd=self.client_home, input=stdin)


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    base = Path(tempfile.mkdtemp(prefix="mlc-enclaved-", dir="/tmp"))
    os.chmod(base, 0o755)
    state, sock = base / "state", base / "run" / "enclaved.sock"
    client_home = base / "client"
    client_home.mkdir(mode=0o700)
    client = _ensure_user(CLIENT_USER, client_home)
    _ensure_user(SERVICE_USER, state)
    import mlcapsule

    granted = _grant_passage([SERVICE_USER, CLIENT_USER], [Path(sys.executable), Path(mlcapsule.__file__)])
    install = subprocess.run([sys.executable, "-m", "mlcapsule", "enclaved", "install", "--user", SERVICE_USER,
                              "--state-dir", str(state), "--socket", str(sock), "--unit-dir", str(base / "unit")],
                             capture_output=True, text=True, timeout=60)
    assert install.returncode == 0, install.stderr
    service = pwd.getpwnam(SERVICE_USER)
    unit = (base / "unit" / "mlcapsule-enclaved.service").read_text()
    assert f"User={SERVICE_USER}" in unit and "ExecStart=" in unit
    assert (state.stat().st_mode & 0o777) == 0o700 and state.stat().st_uid == service.pw_uid
    os.chown(client_home, client.pw_uid, client.pw_gid)
    # The service's own environment is clean: nothing of the test runner's.
    proc = subprocess.Popen([sys.executable, "-I", "-m", "mlcapsule", "enclaved", "run", "--socket", str(sock),
                             "--state-dir", str(state)], user=service.pw_uid, group=service.pw_gid, extra_groups=[],
                            env={"PATH": "/usr/bin:/bin", "HOME": str(state)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            out = proc.stdout.read().decode() if proc.stdout else ""
            proc.kill()
            raise AssertionError(f"the enclave service did not start: {out}")
        time.sleep(0.05)
    d = Deployment(base, sock, state, service, client, client_home, proc)
    try:
        yield d
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(base, ignore_errors=True)
        for u, path in granted:
            subprocess.run(["setfacl", "-x", f"u:{u}", str(path)], check=False)


@pytest.fixture(scope="module")
def provider_server(deployment: Deployment, provider_files: Any, platform: Any,  # noqa: F811
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    """A real provider server on loopback, and the capsule in the client's home (0600, its own)."""
    db = tmp_path_factory.mktemp("enclaved-db") / "server.db"
    with harness(f"sqlite:///{db}", provider_files, platform, budget=50) as h, serve_in_thread(h.app) as url:
        cap = deployment.client_home / "tiny.capsule"
        shutil.copy(provider_files.capsule_path, cap)
        os.chown(cap, deployment.client.pw_uid, deployment.client.pw_gid)
        os.chmod(cap, 0o600)  # the service cannot open it by path: it gets the client's descriptor
        yield url, h.token, cap


SESSION = """
import json, sys
import numpy as np
import mlcapsule
from mlcapsule.enclave.format.trust import UnsafeTrustManifestKey
with mlcapsule.open_capsule({cap!r}, trust=UnsafeTrustManifestKey()) as c:
    if not c.is_set_up:
        c.setup(token={token!r}, server={url!r})
    out = c.predict(np.ones(({n}, 4), np.float32))
    st = c.status()
    print(json.dumps({{"shape": list(out.shape), "mode": st["mode"]["mode"], "worker": c._enclave.proc.pid,
                      "license": st["license_status"]}}), flush=True)
    sys.stdin.readline()  # hold the session open while the attacks run
"""


def _open_session(d: Deployment, url: str, token: str, cap: Path, n: int = 3) -> tuple[subprocess.Popen[str], dict]:
    script = d.client_home / f"session-{time.monotonic_ns()}.py"
    script.write_text(SESSION.format(cap=str(cap), token=token, url=url, n=n))
    os.chown(script, d.client.pw_uid, d.client.pw_gid)
    env = {"PATH": "/usr/bin:/bin", "HOME": str(d.client_home), "MLCAPSULE_HOME": str(d.client_home / "mlc"),
           "MLCAPSULE_ENCLAVED_SOCKET": str(d.socket)}
    p = subprocess.Popen([sys.executable, str(script)], user=d.client.pw_uid, group=d.client.pw_gid, extra_groups=[],
                         env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=d.client_home)
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        p.kill()
        raise AssertionError(f"client session failed: {p.stderr.read() if p.stderr else ''}")
    return p, json.loads(line)


def _close_session(p: subprocess.Popen[str]) -> None:
    assert p.stdin is not None
    p.stdin.write("\n")
    p.stdin.flush()
    assert p.wait(60) == 0, p.stderr.read() if p.stderr else ""


def test_client_predicts_through_the_service_under_its_own_user(deployment, provider_server):
    url, token, cap = provider_server
    p, info = _open_session(deployment, url, token, cap, n=3)
    try:
        assert info["shape"] == [3, 3] and info["mode"] == "service"
        assert info["license"]["answered"] == 3
        # The worker runs as the service's user, with a clean environment.
        status = Path(f"/proc/{info['worker']}/status").read_text()
        uid_line = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
        assert int(uid_line.split()[1]) == deployment.service.pw_uid
    finally:
        _close_session(p)
    # The sealed state lives in the service's folder for this client's uid, nowhere in the client's home.
    user_dir = deployment.state / "users" / str(deployment.client.pw_uid)
    assert any(user_dir.glob("*/state.sealed"))
    assert not list(deployment.client_home.rglob("state.sealed"))
    # A new session of the same client finds its license (offline).
    p, info = _open_session(deployment, url, token, cap, n=2)
    _close_session(p)
    assert info["license"]["answered"] == 5


ATTACKS = """
import ctypes, json, os, socket, sys
worker, state, sock = int(sys.argv[1]), sys.argv[2], sys.argv[3]
res = {}
def attempt(name, fn):
    try:
        fn()
        res[name] = "succeeded"
    except OSError as e:
        res[name] = "refused: " + (e.strerror or str(e))
def read_mem():
    with open(f"/proc/{worker}/maps") as m:
        first = m.readline()
    start = int(first.split("-")[0], 16)
    with open(f"/proc/{worker}/mem", "rb") as f:
        f.seek(start)
        f.read(64)
attempt("read /proc/PID/mem", read_mem)
libc = ctypes.CDLL(None, use_errno=True)
def ptrace():
    if libc.ptrace(16, worker, None, None) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
attempt("ptrace the worker", ptrace)
def read_states():
    for root, dirs, files in os.walk(state, onerror=lambda e: (_ for _ in ()).throw(e)):
        for f in files:
            open(os.path.join(root, f), "rb").read()
    os.listdir(state)
attempt("read the service's state and platform files", read_states)
attempt("read the platform secret", lambda: open(os.path.join(state, "platform", "software", "secret"), "rb").read())
attempt("signal the worker", lambda: os.kill(worker, 0))
print(json.dumps(res))
"""


def test_second_user_attacks_on_the_service_fail(deployment, provider_server):
    """The red team's attacks, as the client's own unprivileged user, against a live session."""
    url, token, cap = provider_server
    p, info = _open_session(deployment, url, token, cap, n=1)
    try:
        r = deployment.as_client(ATTACKS.replace("sys.argv[1]", str(info["worker"]))
                                 .replace("sys.argv[2]", repr(str(deployment.state)))
                                 .replace("sys.argv[3]", repr(str(deployment.socket))))
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        assert res and all(v.startswith("refused") for v in res.values()), res
    finally:
        _close_session(p)


PRELOAD_C = r"""
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void pwn(void) {
    char path[512];
    snprintf(path, sizeof path, "%s/pwned-%d", MARKER_DIR, (int)getpid());
    FILE *f = fopen(path, "w");
    if (f) { fputs("loaded", f); fclose(f); }
}
"""


def test_ld_preload_and_pythonpath_do_not_reach_the_service_worker(deployment, provider_server):
    """The client's LD_PRELOAD and PYTHONPATH run in its own process, never in the worker."""
    url, token, cap = provider_server
    cc = shutil.which("gcc") or shutil.which("cc")
    assert cc, "gcc is installed by scripts/test.sh"
    markers = deployment.base / "markers"
    markers.mkdir(mode=0o777)
    os.chmod(markers, 0o777)
    src = deployment.base / "pwn.c"
    src.write_text(PRELOAD_C.replace("MARKER_DIR", json.dumps(str(markers))))
    lib = deployment.base / "pwn.so"
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    os.chmod(lib, 0o755)
    evil = deployment.base / "evilpath"
    evil.mkdir(mode=0o755)
    (evil / "sitecustomize.py").write_text(f"open({str(markers / 'sitecustomize')!r} + str(__import__('os').getpid()), 'w')\n")
    r = deployment.as_client(f"""
        import json, numpy as np, mlcapsule
        from mlcapsule.enclave.format.trust import UnsafeTrustManifestKey
        with mlcapsule.open_capsule({str(cap)!r}, trust=UnsafeTrustManifestKey()) as c:
            if not c.is_set_up:
                c.setup(token={token!r}, server={url!r})
            c.predict(np.ones((1, 4), np.float32))
            print(json.dumps({{"worker": c._enclave.proc.pid, "client": __import__("os").getpid()}}))
        """, env={"LD_PRELOAD": str(lib), "PYTHONPATH": str(evil)})
    assert r.returncode == 0, r.stderr
    pids = json.loads(r.stdout.strip().splitlines()[-1])
    found = {p.name for p in markers.iterdir()}
    assert f"pwned-{pids['client']}" in found  # the library is real: it ran in the client's own process
    assert f"pwned-{pids['worker']}" not in found and f"sitecustomize{pids['worker']}" not in found, found


def test_each_callers_licenses_are_kept_apart(deployment, provider_server):
    """Another uid (here root, as a client) sees none of the client user's licenses."""
    url, token, cap = provider_server
    import mlcapsule

    from mlcapsule.enclave.format.trust import UnsafeTrustManifestKey

    with mlcapsule.open_capsule(cap, trust=UnsafeTrustManifestKey(), service=deployment.socket) as c:
        assert not c.is_set_up
        assert c.status()["mode"]["mode"] == "service"


def test_service_refuses_what_is_not_a_capsule_descriptor(deployment):
    from mlcapsule.enclaved import recv_msg, send_msg

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(deployment.socket))
        send_msg(s, {"op": "open", "arena": False})  # no descriptor at all
        reply, _ = recv_msg(s)
    assert reply is not None and reply["error"]["type"] == "UsageError"
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.connect(str(deployment.socket))
        s.send(b"not json")
        reply, _ = recv_msg(s)
    assert reply is not None and reply["error"]["type"] == "ProtocolError"
    assert deployment.proc.poll() is None  # the service keeps serving


def test_per_user_mode_is_exposed_to_the_clients_own_user(tmp_path, provider_server, deployment):
    """Why the service exists: with a per-user worker, the same user reads the platform secret
    that every sealed state's key derives from."""
    url, token, cap = provider_server
    r = deployment.as_client(f"""
        import os, numpy as np, mlcapsule
        from mlcapsule.enclave.format.trust import UnsafeTrustManifestKey
        with mlcapsule.open_capsule({str(cap)!r}, trust=UnsafeTrustManifestKey(), service=False) as c:
            c.setup(token={token!r}, server={url!r})
            print(c.status()["mode"]["mode"])
        secret = os.path.join(os.environ["MLCAPSULE_HOME"], "platform", "software", "secret")
        print(len(open(secret, "rb").read()))
        """)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["per-user", "32"]


from swtpm import tpm_ca, tpm_factory, tpm_policy  # noqa: E402,F401  (fixtures)


@pytest.mark.tpm
def test_tpm_service_predicts_and_the_client_user_cannot_reach_the_tpm(deployment, provider_files, platform,  # noqa: F811
                                                                       tpm_factory, tpm_policy, tmp_path):  # noqa: F811
    """On `tpm` in per-user mode the client's user could unseal the state key (empty auth) with
    tpm2-pytss. With the service, only the service's user reaches the TPM: the same attempt by
    the client's user is refused, while its predictions through the service work."""
    tpm = tpm_factory("A", tmp_path / "tpm")
    try:
        svc = deployment.service
        os.chown(tpm.socket.parent, svc.pw_uid, svc.pw_gid)
        os.chmod(tpm.socket.parent, 0o700)
        os.chown(tpm.socket, svc.pw_uid, svc.pw_gid)
        base = deployment.base / "tpm-service"
        base.mkdir(mode=0o700)
        os.chown(base, svc.pw_uid, svc.pw_gid)
        sock = base / "enclaved.sock"
        proc = subprocess.Popen([sys.executable, "-I", "-m", "mlcapsule", "enclaved", "run", "--socket", str(sock),
                                 "--state-dir", str(base / "state"), "--backend", "tpm", "--tcti", tpm.tcti],
                                user=svc.pw_uid, group=svc.pw_gid, extra_groups=[],
                                env={"PATH": "/usr/bin:/bin", "HOME": str(base)}, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT)
        os.chmod(base, 0o755)  # clients reach the socket; the state below stays 0700
        try:
            deadline = time.monotonic() + 30
            while not sock.exists():
                assert proc.poll() is None and time.monotonic() < deadline, "the tpm service did not start"
                time.sleep(0.05)
            db = tmp_path / "server.db"
            with harness(f"sqlite:///{db}", provider_files, platform, budget=20, tpm_policy=tpm_policy) as h, \
                    serve_in_thread(h.app) as url:
                cap = deployment.client_home / "tiny-tpm.capsule"
                shutil.copy(provider_files.capsule_path, cap)
                os.chown(cap, deployment.client.pw_uid, deployment.client.pw_gid)
                r = deployment.as_client(f"""
                    import json, numpy as np, mlcapsule
                    from mlcapsule.enclave.format.trust import UnsafeTrustManifestKey
                    with mlcapsule.open_capsule({str(cap)!r}, trust=UnsafeTrustManifestKey()) as c:
                        c.setup(token={h.token!r}, server={url!r})
                        out = c.predict(np.ones((2, 4), np.float32))
                        st = c.status()
                        print(json.dumps({{"shape": list(out.shape), "backend": st["backend"],
                                          "mode": st["mode"]["mode"], "answered": st["license_status"]["answered"]}}))
                    """, env={"MLCAPSULE_ENCLAVED_SOCKET": str(sock)})
                assert r.returncode == 0, r.stderr
                assert json.loads(r.stdout.strip().splitlines()[-1]) == {"shape": [2, 3], "backend": "tpm",
                                                                         "mode": "service", "answered": 2}
            attack = deployment.as_client(f"""
                import json
                res = {{}}
                try:
                    from tpm2_pytss import ESAPI, TCTILdr
                    with ESAPI(TCTILdr("swtpm", "path={tpm.socket}")) as e:
                        e.get_random(8)
                    res["talk to the TPM"] = "succeeded"
                except Exception as ex:
                    res["talk to the TPM"] = "refused: " + type(ex).__name__
                try:
                    import socket
                    socket.socket(socket.AF_UNIX).connect({str(tpm.socket)!r})
                    res["connect to the TPM socket"] = "succeeded"
                except OSError as ex:
                    res["connect to the TPM socket"] = "refused: " + (ex.strerror or "")
                try:
                    import os
                    os.listdir({str(base / "state")!r})
                    res["list the sealed states"] = "succeeded"
                except OSError as ex:
                    res["list the sealed states"] = "refused: " + (ex.strerror or "")
                print(json.dumps(res))
                """)
            assert attack.returncode == 0, attack.stderr
            res = json.loads(attack.stdout.strip().splitlines()[-1])
            assert all(v.startswith("refused") for v in res.values()), res
        finally:
            proc.terminate()
            proc.wait(10)
    finally:
        tpm.close()
