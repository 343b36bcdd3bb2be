"""The `cvm` backend (TDX / SEV-SNP guests) against a fake configfs-tsm tree (tests/fake_tsm.py).

No TDX or SEV-SNP hardware here: the tree is a folder served by a thread of this process, fed
with recorded quotes/reports (shared attestation vectors) or with quotes/reports signed by the
test signers (tests/dcap_signer.py, tests/snp_signer.py) over the report data written. The vTPM
is swtpm. The headline test runs a real server (``mlcapsule serve --policy``) on loopback that
accepts tdx/snp evidence under the fake roots, then ``setup --backend cvm`` and an offline
``predict`` through the CLI, each a separate process, the enclave being the hardened worker.
"""

from __future__ import annotations

import json
import os
import re
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from _server_support import ProviderFiles, provider_files  # noqa: F401  (fixture)
from conftest import assert_one_line_error, cli_env
from fake_tsm import FakeTsm, cert_table, recorded_snp, recorded_tdx, signed_snp, signed_tdx, vectors
from mlcapsule.enclave._util import b64d
from mlcapsule.enclave.backends.cvm import TRIES, CvmBackend, parse_cert_table
from mlcapsule.enclave.errors import EnclaveError, IntegrityError
from mlcapsule.enclave.measurement import measurement
from mlcapsule.host import EnclaveProcess
from swtpm import Swtpm, swtpm, tpm_ca, tpm_factory  # noqa: F401  (fixtures)

BINDING = bytes(range(32))
MR_TD = bytes.fromhex("a5" * 48)
SNP_MEASUREMENT = bytes.fromhex("5c" * 48)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    return tmp_path / "tsm" / "report"


def cvm(tree: Path, tmp_path: Path, tcti: str = "none") -> CvmBackend:
    return CvmBackend(tree, tcti, platform_dir=tmp_path / "platform")


# -- evidence ---------------------------------------------------------------------------------------
def test_tdx_evidence_carries_the_kernels_quote_and_binding_then_measurement(tree: Path, tmp_path: Path) -> None:
    with recorded_tdx(tree) as fake:
        ev = cvm(tree, tmp_path).evidence(BINDING)
        assert fake.leftovers() == []  # every entry (the probe's and the report's) was removed
    assert set(ev) == {"type", "version", "quote", "collateral"}
    assert (ev["type"], ev["version"], ev["collateral"]) == ("tdx", 1, None)
    assert b64d(ev["quote"]) == (vectors() / "dcapqvl" / "tdx_quote").read_bytes()
    assert fake.inblobs == [BINDING + measurement()]  # report_data = binding || mlcapsule measurement


def test_snp_evidence_carries_report_vcek_and_ask_ark_from_the_certificate_table(tree: Path, tmp_path: Path) -> None:
    from cryptography import x509

    v = vectors() / "snp"
    with recorded_snp(tree) as fake:
        ev = cvm(tree, tmp_path).evidence(BINDING)
        assert fake.leftovers() == []
    assert set(ev) == {"type", "version", "report", "vcek", "chain"}
    assert (ev["type"], ev["version"]) == ("snp", 1)
    assert b64d(ev["report"]) == (v / "attestation.bin").read_bytes()
    assert b64d(ev["vcek"]) == (v / "vcek.testcer").read_bytes()
    chain = x509.load_pem_x509_certificates(ev["chain"].encode())
    assert [c.subject.rfc4514_string() for c in chain] == [
        c.subject.rfc4514_string() for c in x509.load_pem_x509_certificates((v / "ask_ark_milan.pem").read_bytes())]
    assert fake.inblobs == [BINDING + measurement()]


def test_signed_tdx_evidence_passes_the_servers_verifier_with_our_measurement(tree: Path, tmp_path: Path) -> None:
    from dcap_signer import FakeIntel
    from mlcapsule.attestation import AttestationPolicy, EvidenceVerifier
    from mlcapsule.attestation.dcap import TdxPolicy

    intel = FakeIntel(seed=3)
    with signed_tdx(tree, intel, mr_td=MR_TD):
        ev = cvm(tree, tmp_path).evidence(BINDING)
    ev["collateral"] = intel.collateral("tdx")
    policy = AttestationPolicy(measurements=frozenset({measurement().hex()}),
                               tdx=TdxPolicy(mr_tds=frozenset({MR_TD}), root_ca_der=intel.root_ca_der))
    verified = EvidenceVerifier(policy).verify(ev, expected_report_data=BINDING)
    assert verified.type == "tdx" and verified.measurement == measurement().hex()
    with pytest.raises(Exception, match="(?i)report.?data|binding"):
        EvidenceVerifier(policy).verify(ev, expected_report_data=bytes(32))  # another setup's binding


def test_signed_snp_evidence_passes_the_servers_verifier_with_our_measurement(tree: Path, tmp_path: Path) -> None:
    from mlcapsule.attestation import AttestationPolicy, EvidenceVerifier
    from mlcapsule.attestation.snp import SnpPolicy
    from snp_signer import FakeAmd

    amd = FakeAmd("Milan", seed=0)
    with signed_snp(tree, amd, measurement=SNP_MEASUREMENT):
        ev = cvm(tree, tmp_path).evidence(BINDING)
    assert b64d(ev["vcek"]) == amd.vcek_der
    policy = AttestationPolicy(measurements=frozenset({measurement().hex()}), snp_roots=dict(amd.roots),
                               snp=SnpPolicy(measurements=frozenset({SNP_MEASUREMENT.hex()})))
    verified = EvidenceVerifier(policy).verify(ev, expected_report_data=BINDING)
    assert verified.type == "snp" and verified.measurement == measurement().hex()
    with pytest.raises(Exception, match="(?i)report.?data|binding"):
        EvidenceVerifier(policy).verify(ev, expected_report_data=bytes(32))  # another setup's binding


def test_snp_guest_above_vmpl0_asks_at_its_privlevel_floor(tree: Path, tmp_path: Path) -> None:
    """A guest under an SVSM (VMPL 2 here) writes privlevel = privlevel_floor before inblob; the
    generation check then expects two writes of its own, and still catches a third."""
    from mlcapsule.attestation import AttestationPolicy, EvidenceVerifier
    from mlcapsule.attestation.snp import SnpPolicy
    from snp_signer import FakeAmd

    amd = FakeAmd("Milan", seed=0)
    with signed_snp(tree, amd, privlevel_floor=2, race=1, vmpl=2, measurement=SNP_MEASUREMENT) as fake:
        ev = cvm(tree, tmp_path).evidence(BINDING)
        assert fake.privlevels == [b"2\n", b"2\n"]  # the raced entry, then the clean one
        assert fake.leftovers() == []
    policy = AttestationPolicy(measurements=frozenset({measurement().hex()}), snp_roots=dict(amd.roots),
                               snp=SnpPolicy(measurements=frozenset({SNP_MEASUREMENT.hex()}), max_vmpl=2))
    assert EvidenceVerifier(policy).verify(ev, expected_report_data=BINDING).details["vmpl"] == 2


def test_snp_guest_without_host_certificates_sends_none(tree: Path, tmp_path: Path) -> None:
    from snp_signer import FakeAmd

    with signed_snp(tree, FakeAmd("Milan", seed=0), certs=False):
        ev = cvm(tree, tmp_path).evidence(BINDING)
    assert ev["vcek"] is None and ev["chain"] is None  # the server then uses its configured certificates


def test_generation_race_is_detected_and_the_report_made_again(tree: Path, tmp_path: Path) -> None:
    from dcap_signer import FakeIntel

    with signed_tdx(tree, FakeIntel(seed=3), race=1) as fake:
        backend = cvm(tree, tmp_path)
        entries = fake.entries
        ev = backend.evidence(BINDING)
        assert fake.entries - entries == 2  # the raced entry, then a fresh one
        assert fake.leftovers() == []
    assert b64d(ev["quote"])  # the second, clean report


def test_report_raced_every_time_is_refused(tree: Path, tmp_path: Path) -> None:
    with recorded_tdx(tree, race=TRIES) as fake:
        backend = cvm(tree, tmp_path)
        with pytest.raises(EnclaveError, match="another program wrote to the report entry") as e:
            backend.evidence(BINDING)
        assert fake.reports == TRIES
    assert "run setup again" in (e.value.hint or "")


def test_missing_tsm_tree_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EnclaveError, match="no configfs-tsm report folder") as e:
        cvm(tmp_path / "no-such-tree", tmp_path)
    assert "TDX" in (e.value.hint or "") and "--backend software or tpm" in (e.value.hint or "")


def test_guest_of_another_kind_is_refused(tree: Path, tmp_path: Path) -> None:
    with FakeTsm(tree, "arm_cca_guest", lambda _inblob: b"token"), \
            pytest.raises(EnclaveError, match="provider is 'arm_cca_guest', not Intel TDX"):
        cvm(tree, tmp_path)


def test_missing_tree_in_the_worker_names_the_cause(tmp_path: Path) -> None:
    cap = tmp_path / "none"
    cap.touch()
    with pytest.raises(EnclaveError, match="no configfs-tsm report folder"):
        EnclaveProcess(cap, state_dir=tmp_path / "state", backend="cvm", tsm_path=tmp_path / "missing", tcti="none")


def test_certificate_table_parsing() -> None:
    table = cert_table({"vlek": b"leaf", "ask": b"ask!", "ark": b"ark!!"})
    assert parse_cert_table(table) == {"vlek": b"leaf", "ask": b"ask!", "ark": b"ark!!"}
    assert parse_cert_table(b"") == {}
    unterminated = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes + struct.pack("<II", 24, 4) + b"leaf"
    with pytest.raises(EnclaveError, match="no terminating entry"):
        parse_cert_table(unterminated)
    # A table written with little-endian (Windows-style) GUIDs is read too.
    le = uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd").bytes_le + struct.pack("<II", 48, 4) + bytes(24) + b"leaf"
    assert parse_cert_table(le) == {"vcek": b"leaf"}
    bad = bytearray(table)
    bad[16:20] = (10_000).to_bytes(4, "little")  # the first entry's offset, past the end
    with pytest.raises(EnclaveError, match="outside itself"):
        parse_cert_table(bytes(bad))


# -- sealing and counters -----------------------------------------------------------------------------
def test_vtpm_seals_and_counts(tree: Path, tmp_path: Path, swtpm: Swtpm) -> None:  # noqa: F811
    with recorded_tdx(tree):
        b = cvm(tree, tmp_path, swtpm.tcti)
        try:
            blob = b.seal(b"license state", label=b"L")
            assert b.unseal(blob, label=b"L") == b"license state"
            with pytest.raises(IntegrityError):
                b.unseal(blob, label=b"other")
            start = b.counter_read("cvm-test")
            assert b.counter_increment("cvm-test") == start + 1
            info = b.threat_model.as_dict()
        finally:
            b.close()
    assert swtpm.counter_value("cvm-test") == start + 1  # the counter lives in the vTPM
    assert info["platform"]["vtpm"] is True and info["platform"]["vtpm_tcti"] == swtpm.tcti
    # swtpm is an emulator: its state file can be restored, and the backend says so.
    assert info["rollback_protected"] is False
    assert any("swtpm" in s for s in info["does_not_protect_against"])
    # Sealed by the vTPM: the key-file store of a cvm backend without vTPM cannot open it.
    with recorded_tdx(tree):
        with pytest.raises(IntegrityError):
            cvm(tree, tmp_path).unseal(blob, label=b"L")


def test_unreachable_vtpm_is_a_clear_error_naming_the_way_out(tree: Path, tmp_path: Path) -> None:
    with recorded_tdx(tree), pytest.raises(EnclaveError, match="cannot use the vTPM") as e:
        cvm(tree, tmp_path, f"swtpm:path={tmp_path / 'no-tpm.sock'}")
    assert "--tcti none" in (e.value.hint or "") and "no rollback protection" in (e.value.hint or "")


def test_without_vtpm_the_threat_model_says_no_rollback_protection(tree: Path, tmp_path: Path) -> None:
    with recorded_snp(tree):
        b = cvm(tree, tmp_path)
        blob = b.seal(b"x", label=b"L")
        assert b.unseal(blob, label=b"L") == b"x"
        assert b.counter_increment("c") == 1 and b.counter_read("c") == 1
    tm = b.threat_model.as_dict()
    assert tm["rollback_protected"] is False
    assert tm["platform"] == {"tee": "snp", "provider": "sev_guest", "tsm_path": str(tree), "vtpm": False,
                              "vtpm_tcti": None, "rollback_protected": False}
    assert any("rollback is NOT detected" in s for s in tm["does_not_protect_against"])
    assert any("root" in s and "guest" in s for s in tm["does_not_protect_against"])


def test_status_shows_the_detected_guest_vtpm_and_rollback(tree: Path, tmp_path: Path, run_cli: Any,
                                                           swtpm: Swtpm) -> None:  # noqa: F811
    with recorded_tdx(tree):
        p = run_cli(["status", "--backend", "cvm", "--tsm-path", tree, "--tcti", "none"])
        assert p.returncode == 0, p.stderr
        assert re.search(r"platform: Intel TDX guest .*vTPM: no; rollback protection: NO", p.stdout), p.stdout
        assert "rollback is NOT detected" in p.stdout
        p = run_cli(["status", "--backend", "cvm", "--tcti", swtpm.tcti, "--json"], MLCAPSULE_TSM_PATH=str(tree))
        assert p.returncode == 0, p.stderr
        platform = json.loads(p.stdout)["threat_model"]["platform"]
        assert platform["tee"] == "tdx" and platform["vtpm"] is True and platform["vtpm_tcti"] == swtpm.tcti
    p = run_cli(["status", "--backend", "cvm", "--tsm-path", tmp_path / "missing", "--tcti", "none"])
    assert p.returncode != 0
    assert "no configfs-tsm report folder" in assert_one_line_error(p.stderr)


# -- end to end ------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _mlcapsule(home: Path, *args: str | os.PathLike[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mlcapsule", *map(str, args)], capture_output=True, text=True,
                          timeout=180, env=cli_env(home, **env), stdin=subprocess.DEVNULL)


def _ok(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, f"{p.args}: {p.stdout}\n{p.stderr}"
    return p.stdout


class _Server:
    def __init__(self, home: Path, port: int, db: str, key: Path, policy: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlcapsule", "serve", "--port", str(port), "--database-url", db,
             "--provider-key", str(key), "--policy", str(policy), "--allow-measurement", "local"],
            env=cli_env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise AssertionError(f"the server did not start: {self.output()}") from None
                time.sleep(0.1)

    def output(self) -> str:
        return self.proc.stdout.read() if self.proc.stdout and self.proc.poll() is not None else ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture()
def guest(request: pytest.FixtureRequest, tree: Path, tmp_path: Path) -> Iterator[tuple[str, FakeTsm, Path]]:
    """(tee, the fake tree serving test-signed reports, the server's policy file)."""
    kind = request.param
    conf = tmp_path / "policy"
    conf.mkdir()
    if kind == "tdx":
        from dcap_signer import FakeIntel

        intel = FakeIntel(seed=5)
        (conf / "intel-root.der").write_bytes(intel.root_ca_der)
        (conf / "pcs").mkdir()
        (conf / "pcs" / "tdx.json").write_text(json.dumps(intel.collateral("tdx")))
        (conf / "policy.toml").write_text(
            'accept = ["tdx"]\n[tdx]\n'
            f'mr_td = ["{MR_TD.hex()}"]\nroot_ca = "intel-root.der"\n[dcap]\ncollateral_dir = "pcs"\n')
        fake = signed_tdx(tree, intel, mr_td=MR_TD)
    else:
        from snp_signer import FakeAmd

        amd = FakeAmd("Milan", seed=0)
        (conf / "policy.toml").write_text(
            'accept = ["snp"]\n[snp]\n'
            f'measurement = ["{SNP_MEASUREMENT.hex()}"]\nmax_vmpl = 0\n'
            f'ark_sha256 = {{Milan = "{amd.roots["Milan"].hex()}"}}\n')
        fake = signed_snp(tree, amd, measurement=SNP_MEASUREMENT)
    with fake:
        yield kind, fake, conf / "policy.toml"


def _set_up_then_predict(guest: tuple[str, FakeTsm, Path], tree: Path, tmp_path: Path, files: ProviderFiles,
                         *setup_args: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Provider: capsule, account and grant, then ``serve --policy`` on loopback; client:
    ``setup --backend cvm`` against it, the server stopped, an offline ``predict`` (checked against
    the model), ``status --json``. Returns (backend.json, status)."""
    kind, fake, policy = guest
    prov, client = tmp_path / "provider-home", tmp_path / "client-home"
    port, db = _free_port(), f"sqlite:///{tmp_path / 'server.db'}"
    admin = ["--database-url", db]
    cap, key = files.capsule_path, files.key_path
    _ok(_mlcapsule(prov, "admin", "capsule", "add", cap, "--key", files.content_key_path, *admin,
                   "--provider-key", key))
    token = re.search(r"[A-Za-z0-9_\-]{30,}", _ok(_mlcapsule(prov, "admin", "account", "add", "clinic", *admin)))
    assert token
    _ok(_mlcapsule(prov, "admin", "grant", "clinic", cap, "--budget", "40", "--devices", "1", *admin))

    server = _Server(prov, port, db, key, policy)
    try:
        out = _ok(_mlcapsule(client, "setup", cap, "--token", token.group(0), "--server", f"http://127.0.0.1:{port}",
                             "--backend", "cvm", "--tsm-path", tree, *setup_args))
        assert "set up: license" in out
    finally:
        server.stop()
    measurement.cache_clear()  # other work on the enclave folder in this process's lifetime changes it
    assert fake.inblobs and all(b[32:] == measurement() for b in fake.inblobs)
    assert fake.leftovers() == []
    choice = json.loads((client / "state" / f"{files.capsule_id}-v{files.version}" / "backend.json").read_text())
    assert choice["backend"] == "cvm" and choice["tsm_path"] == str(tree.resolve())

    # Offline: the server is gone; the backend, tree and vTPM come from what setup remembered.
    x = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    np.save(tmp_path / "x.npy", x)
    _ok(_mlcapsule(client, "predict", cap, tmp_path / "x.npy", "-o", tmp_path / "y.npy"))
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), x @ w, rtol=1e-6)

    status = json.loads(_ok(_mlcapsule(client, "status", cap, "--json")))
    assert status["backend"] == "cvm" and status["threat_model"]["platform"]["tee"] == kind
    assert status["license_status"]["charged"] >= 3
    return choice, status


@pytest.mark.parametrize("guest", ["tdx", "snp"], indirect=True)
def test_cvm_setup_against_a_real_server_then_offline_predict_with_a_vtpm(
        guest: tuple[str, FakeTsm, Path], tree: Path, tmp_path: Path, provider_files: ProviderFiles,  # noqa: F811
        swtpm: Swtpm) -> None:  # noqa: F811
    choice, status = _set_up_then_predict(guest, tree, tmp_path, provider_files, "--tcti", swtpm.tcti)
    assert choice["tcti"] == swtpm.tcti
    assert status["threat_model"]["platform"]["vtpm_tcti"] == swtpm.tcti
    # The budget's counter is the vTPM's: it moved with the leases.
    assert (swtpm.counter_value(f"c-{provider_files.capsule_id}-v{provider_files.version}") or 0) > 0


@pytest.mark.parametrize("guest", ["tdx"], indirect=True)
def test_cvm_without_vtpm_remembers_that_and_has_no_rollback_protection(
        guest: tuple[str, FakeTsm, Path], tree: Path, tmp_path: Path, provider_files: ProviderFiles) -> None:  # noqa: F811
    found = "device:/dev/tpmrm0" if os.path.exists("/dev/tpmrm0") else "none"
    args = () if found == "none" else ("--tcti", "none")  # a machine with a TPM: ask for none explicitly
    choice, status = _set_up_then_predict(guest, tree, tmp_path, provider_files, *args)
    assert choice["tcti"] == "none"  # what setup found is remembered, so later runs use the same store
    platform = status["threat_model"]["platform"]
    assert platform["vtpm"] is False and platform["rollback_protected"] is False
    assert status["license_status"]["rollback_protected"] is False
