"""swtpm for tests: manufactured TPMs with EK certificates from a private CA, run on Unix sockets.

* :func:`make_ca_config` writes swtpm_setup and swtpm-localca configuration into a temporary
  folder, so the EK certificates chain to a private root CA made for the test session
  (``swtpm-localca-rootca-cert.pem``) and to no system-wide state.
* :func:`manufacture` runs ``swtpm_setup --create-ek-cert --create-platform-cert`` once per
  distinct TPM (about a second each: it makes RSA and ECC EKs and signs their certificates).
  Tests then start :class:`Swtpm` on a *copy* of a manufactured state: identical seeds, fresh NV.
* :class:`Swtpm` runs ``swtpm socket --flags not-need-init,startup-clear`` on a Unix socket in a
  short temporary folder. The kernel kills it when the test runner dies (PR_SET_PDEATHSIG set in
  ``preexec_fn``), and :meth:`Swtpm.stop` kills it at the end of each test.

swtpm serves one connection at a time: a test must close its own connection (:meth:`Swtpm.esapi`
is a context manager) before an enclave worker connects, and the other way round.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1


def swtpm_available() -> bool:
    return all(shutil.which(t) for t in ("swtpm", "swtpm_setup", "swtpm_localca"))


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


@dataclass(frozen=True)
class LocalCa:
    dir: Path
    setup_conf: Path

    @property
    def root_cert(self) -> Path:
        return self.dir / "swtpm-localca-rootca-cert.pem"

    @property
    def issuer_cert(self) -> Path:
        return self.dir / "issuercert.pem"


def make_ca_config(base: Path) -> LocalCa:
    """Configuration for swtpm_setup that signs EK certificates with a CA kept in ``base/ca``."""
    ca = base / "ca"
    ca.mkdir(parents=True, exist_ok=True)
    (base / "swtpm-localca.conf").write_text(
        f"statedir = {ca}\nsigningkey = {ca}/signkey.pem\nissuercert = {ca}/issuercert.pem\n"
        f"certserial = {ca}/certserial\n")
    (base / "swtpm-localca.options").write_text(
        "--platform-manufacturer mlcapsule-tests\n--platform-version 2.1\n--platform-model swtpm\n")
    conf = base / "swtpm_setup.conf"
    conf.write_text(f"create_certs_tool = {shutil.which('swtpm_localca')}\n"
                    f"create_certs_tool_config = {base}/swtpm-localca.conf\n"
                    f"create_certs_tool_options = {base}/swtpm-localca.options\n"
                    "active_pcr_banks = sha256\n")
    return LocalCa(ca, conf)


def manufacture(state_dir: Path, ca: LocalCa) -> Path:
    """A new TPM (fresh seeds) with RSA-2048 and ECC EKs and certificates, in ``state_dir``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    cmd = ["swtpm_setup", "--tpm2", "--tpm-state", str(state_dir), "--config", str(ca.setup_conf),
           "--create-ek-cert", "--create-platform-cert", "--pcr-banks", "sha256", "--overwrite"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=_die_with_parent,
                         stdin=subprocess.DEVNULL, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"swtpm_setup failed ({res.returncode}): {res.stdout}\n{res.stderr}")
    return state_dir


class Swtpm:
    """A running swtpm on a Unix socket. ``tcti`` is what the tpm backend takes."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        # Unix socket paths are limited to 108 bytes: pytest's tmp_path can be longer.
        self._sock_dir = Path(tempfile.mkdtemp(prefix="swtpm-"))
        self.socket = self._sock_dir / "tpm.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.socket}"

    def start(self) -> None:
        assert self.proc is None or self.proc.poll() is not None
        if self.socket.exists():
            self.socket.unlink()
        self._log = open(self._sock_dir / "swtpm.log", "ab")  # noqa: SIM115  (closed in stop())
        self.proc = subprocess.Popen(
            ["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={self.state_dir}",
             "--server", f"type=unixio,path={self.socket}", "--flags", "not-need-init,startup-clear"],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            preexec_fn=_die_with_parent)  # noqa: PLW1509  (no threads here; the kernel kills swtpm with us)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"swtpm exited with {self.proc.returncode}: {self.log()}")
            if self.socket.exists():
                try:
                    with socket.socket(socket.AF_UNIX) as probe:
                        probe.connect(str(self.socket))
                    return
                except OSError:
                    pass
            time.sleep(0.01)
        raise RuntimeError("swtpm did not start: " + self.log())

    def log(self) -> str:
        try:
            return (self._sock_dir / "swtpm.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        """Power off (SIGKILL: no orderly shutdown, as a power cut)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._log.close()

    def reboot(self) -> None:
        """Power cycle: PCRs return to their reset values, NV keeps its contents."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._sock_dir, ignore_errors=True)

    @contextmanager
    def esapi(self) -> Iterator[Any]:
        """A test-side connection (closed on exit: swtpm serves one connection at a time)."""
        from tpm2_pytss import ESAPI

        from mlcapsule.enclave.backends.tpm import open_transport

        transport = open_transport(self.tcti)
        ctx = ESAPI(transport)
        try:
            yield ctx
        finally:
            ctx.close()
            transport.close()

    @contextmanager
    def backend(self, **kw: Any) -> Iterator[Any]:
        """An in-process tpm backend on this swtpm, closed on exit."""
        from mlcapsule.enclave.backends.tpm import TpmBackend

        b = TpmBackend(self.tcti, **kw)
        try:
            yield b
        finally:
            b.close()

    def extend_pcr(self, index: int, data: bytes = b"mlcapsule-test") -> None:
        import hashlib

        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
        from tpm2_pytss.types import TPML_DIGEST_VALUES, TPMT_HA

        with self.esapi() as ctx:
            ha = TPMT_HA(hashAlg=TPM2_ALG.SHA256)
            ha.digest.sha256 = hashlib.sha256(data).digest()
            ctx.pcr_extend(ESYS_TR.PCR0 + index, TPML_DIGEST_VALUES([ha]))

    def counter_value(self, name: str) -> int | None:
        """The NV counter's value, read without changing it (None if it is not defined or written)."""
        from tpm2_pytss.constants import TPM2_CAP, TPMA_NV

        from mlcapsule.enclave.backends.tpm import nv_index_for

        index = nv_index_for(name)
        with self.esapi() as ctx:
            _, data = ctx.get_capability(TPM2_CAP.HANDLES, index, 1)
            if not any(int(h) == index for h in data.data.handles):
                return None
            tr = ctx.tr_from_tpmpublic(index)
            nv_public, _ = ctx.nv_read_public(tr)
            if not int(nv_public.nvPublic.attributes) & int(TPMA_NV.WRITTEN):
                return None
            return int.from_bytes(bytes(ctx.nv_read(tr, 8, 0, auth_handle=tr)), "big")

    def undefine_counter(self, name: str) -> None:
        """What an owner with empty owner authorization can do: delete the counter's NV index."""
        from tpm2_pytss.constants import ESYS_TR

        from mlcapsule.enclave.backends.tpm import nv_index_for

        with self.esapi() as ctx:
            tr = ctx.tr_from_tpmpublic(nv_index_for(name))
            ctx.nv_undefine_space(tr, ESYS_TR.OWNER)

    def __enter__(self) -> Swtpm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# -- pytest fixtures (imported by the tests/test_tpm_*.py modules) -----------------------------------
import pytest


def require_swtpm() -> None:
    """Skip without swtpm or tpm2-pytss, except under CI, where the TPM tests must run."""
    missing = []
    if not swtpm_available():
        missing.append("swtpm/swtpm-tools")
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError:
        missing.append("tpm2-pytss")
    if missing:
        msg = f"the TPM tests need {' and '.join(missing)} (bash scripts/test.sh installs them)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


@pytest.fixture(scope="session")
def tpm_ca(tmp_path_factory: pytest.TempPathFactory) -> LocalCa:
    require_swtpm()
    return make_ca_config(tmp_path_factory.mktemp("tpm-ca"))


@pytest.fixture(scope="session")
def tpm_factory(tmp_path_factory: pytest.TempPathFactory, tpm_ca: LocalCa) -> Any:
    """``tpm_factory(name, dest)``: start a swtpm on a fresh copy of the TPM called ``name``
    (manufactured once per session; different names are different TPMs)."""
    made: dict[str, Path] = {}
    base = tmp_path_factory.mktemp("tpm-templates")

    def start(name: str, dest: Path) -> Swtpm:
        if name not in made:
            made[name] = manufacture(base / name, tpm_ca)
        shutil.copytree(made[name], dest)
        return Swtpm(dest)

    made["A"] = manufacture(base / "A", tpm_ca)  # now: this also creates the CA's root certificate
    return start


@pytest.fixture()
def swtpm(tpm_factory: Any, tmp_path: Path) -> Iterator[Swtpm]:
    with tpm_factory("A", tmp_path / "tpm-A") as t:
        yield t


@pytest.fixture()
def other_swtpm(tpm_factory: Any, tmp_path: Path) -> Iterator[Swtpm]:
    with tpm_factory("B", tmp_path / "tpm-B") as t:
        yield t


@pytest.fixture(scope="session")
def tpm_policy(tpm_ca: LocalCa, tpm_factory: Any) -> Any:
    """The provider trusts the test session's private EK CA (root + its issuing CA)."""
    from mlcapsule.attestation.tpm import TpmPolicy, load_certificates

    return TpmPolicy(roots=tuple(load_certificates([tpm_ca.root_cert])),
                     intermediates=tuple(load_certificates([tpm_ca.issuer_cert])))
