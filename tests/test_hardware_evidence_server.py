"""Setups through the real server (uvicorn on loopback, HTTP) with hardware evidence signed by test roots.

Recorded evidence cannot carry our nonce, so each evidence type is signed by a fake vendor
hierarchy (tests/dcap_signer.py, snp_signer.py, nitro_signer.py) that the server trusts through its
policy file (``serve --policy``). The evidence binds ``report_data(nonce, hpke_pub, receipt_pub)``
and the mlcapsule measurement, exactly as an enclave would. Each attack is refused with a reason
that names the check: a replayed nonce, evidence made for another challenge, a debug TEE, a
hardware or mlcapsule measurement the provider did not allow, a TCB below the policy, a type the
policy (or the capsule's policy) does not accept.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from _server_support import Clock, ProviderFiles, provider_files, raw, serve_in_thread  # noqa: F401
from dcap_signer import FakeIntel
from mlcapsule.attestation.hardware import bound_report_data
from mlcapsule.enclave._util import b64d, b64e
from mlcapsule.enclave.crypto.keys import load_provider_key, raw_public
from mlcapsule.enclave.errors import IntegrityError
from mlcapsule.enclave.measurement import measurement
from mlcapsule.enclave.messages.setup import open_payload, report_data

MEASUREMENT = measurement()
MR_ENCLAVE = hashlib.sha256(b"mlcapsule sgx enclave").digest()
MR_SIGNER = hashlib.sha256(b"mlcapsule provider signer").digest()
MR_TD = hashlib.sha384(b"mlcapsule td firmware").digest()
RTMR1 = hashlib.sha384(b"mlcapsule guest kernel").digest()
SNP_MEASUREMENT = hashlib.sha384(b"mlcapsule snp guest").digest()
PCRS = {i: hashlib.sha384(f"mlcapsule nitro image pcr{i}".encode()).digest() for i in (0, 1, 2)}
OTHER_CAPSULE = "00000000-0000-4000-8000-000000000001"


@dataclass
class Enclave:
    hpke: X25519PrivateKey
    receipt: Ed25519PrivateKey

    @classmethod
    def new(cls) -> Enclave:
        return cls(X25519PrivateKey.generate(), Ed25519PrivateKey.generate())

    def binding(self, nonce: bytes) -> bytes:
        return report_data(nonce, raw(self.hpke.public_key()), raw(self.receipt.public_key()))


# -- evidence makers: (64-byte report data, options) -> evidence JSON ----------------------------------
INTEL = FakeIntel(seed=0)


def sgx(rd: bytes, *, debug: bool = False, hw: bytes = MR_ENCLAVE, tcb: str = "UpToDate",
        collateral: bool = True) -> dict[str, Any]:
    quote = INTEL.sgx_quote(rd, mr_enclave=hw, mr_signer=MR_SIGNER, debug=debug)
    return {"type": "sgx", "version": 1, "quote": b64e(quote),
            "collateral": INTEL.collateral("sgx", tcb_status=tcb) if collateral else None}


def tdx(rd: bytes, *, debug: bool = False, hw: bytes = MR_TD, tcb: str = "UpToDate",
        collateral: bool = True) -> dict[str, Any]:
    quote = INTEL.tdx_quote(rd, mr_td=hw, rtmrs=(bytes(48), RTMR1, bytes(48), bytes(48)), debug=debug)
    return {"type": "tdx", "version": 1, "quote": b64e(quote),
            "collateral": INTEL.collateral("tdx", tcb_status=tcb) if collateral else None}


def _amd() -> Any:
    from snp_signer import FakeAmd

    return FakeAmd("Milan", seed=0)


def snp(rd: bytes, *, debug: bool = False, hw: bytes = SNP_MEASUREMENT, tcb: str = "UpToDate",
        collateral: bool = True) -> dict[str, Any]:
    amd = _amd()
    kwargs: dict[str, Any] = {}
    if tcb != "UpToDate":  # a platform below the provider's minimum TCB
        from mlcapsule.attestation.snp import SnpTcb

        kwargs["reported_tcb"] = SnpTcb(bootloader=1, tee=0, snp=1, microcode=1)
    report = amd.report(rd, measurement=hw, debug=debug, **kwargs)
    return {"type": "snp", "version": 1, "report": b64e(report),
            "vcek": b64e(amd.vcek_der) if collateral else None,
            "chain": amd.chain_pem.decode() if collateral else None}


def _nitro() -> Any:
    from nitro_signer import FakeNitro

    return FakeNitro(seed=0)


def nitro(rd: bytes, *, debug: bool = False, hw: bytes = PCRS[0], tcb: str = "UpToDate",
          collateral: bool = True, age: float = 5) -> dict[str, Any]:
    pcrs = {0: bytes(48), 1: bytes(48), 2: bytes(48)} if debug else {**PCRS, 0: hw}
    doc = _nitro().document(pcrs=pcrs, user_data=rd, nonce=None,
                            timestamp=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=age))
    return {"type": "nitro", "version": 1, "document": b64e(doc)}


def policy_toml(tmp: Path) -> str:
    """A policy accepting all four types, each with the fake vendor root."""
    (tmp / "intel-root.der").write_bytes(INTEL.root_ca_der)
    sections = [f'''
        accept = ["sgx", "tdx", "snp", "nitro"]
        measurements = ["{MEASUREMENT.hex()}"]
        [sgx]
        mr_enclave = ["{MR_ENCLAVE.hex()}"]
        root_ca = "intel-root.der"
        [tdx]
        mr_td = ["{MR_TD.hex()}"]
        rtmr1 = ["{RTMR1.hex()}"]
        root_ca = "intel-root.der"
        [dcap]
        collateral_dir = "pcs"
    ''']
    pcs = tmp / "pcs"
    pcs.mkdir(exist_ok=True)

    (pcs / "sgx.json").write_text(json.dumps(INTEL.collateral("sgx")))
    (pcs / "tdx.json").write_text(json.dumps(INTEL.collateral("tdx")))
    try:
        amd = _amd()
        sections.append(f'''
        [snp]
        measurement = ["{SNP_MEASUREMENT.hex()}"]
        min_tcb = {{bootloader = 2, tee = 0, snp = 2, microcode = 2}}
        ark_sha256 = {{Milan = "{amd.roots["Milan"].hex()}"}}
        ''')
    except ImportError:
        pass
    try:
        fake = _nitro()
        (tmp / "nitro-root.der").write_bytes(fake.root_der)
        sections.append(f'''
        [nitro]
        pcr0 = ["{PCRS[0].hex()}"]
        pcr1 = ["{PCRS[1].hex()}"]
        pcr2 = ["{PCRS[2].hex()}"]
        root_ca = "nitro-root.der"
        ''')
    except ImportError:
        pass
    return "".join(textwrap.dedent(s) for s in sections)


KINDS: dict[str, Callable[..., dict[str, Any]]] = {"sgx": sgx, "tdx": tdx, "snp": snp, "nitro": nitro}


# -- a real server with the policy file -------------------------------------------------------------
@dataclass
class Server:
    url: str
    http: httpx.Client
    token: str
    files: ProviderFiles
    service: Any

    def nonce(self, capsule_id: str | None = None) -> bytes:
        r = self.http.post(f"{self.url}/v1/challenge", json={"capsule_id": capsule_id or self.files.capsule_id,
                                                              "version": self.files.version},
                           headers={"Authorization": f"Bearer {self.token}"})
        assert r.status_code == 200, r.text
        return b64d(r.json()["nonce"])

    def provision(self, enclave: Enclave, nonce: bytes, evidence: dict[str, Any]) -> httpx.Response:
        body = {"capsule_id": self.files.capsule_id, "version": self.files.version, "nonce": b64e(nonce),
                "hpke_pub": b64e(raw(enclave.hpke.public_key())),
                "receipt_pub": b64e(raw(enclave.receipt.public_key())), "evidence": evidence}
        return self.http.post(f"{self.url}/v1/provision", json=body,
                              headers={"Authorization": f"Bearer {self.token}"})


def start(tmp: Path, files: ProviderFiles, toml: str) -> Iterator[Server]:
    from mlcapsule.server.app import create_app
    from mlcapsule.server.settings import ServerSettings

    (tmp / "policy.toml").write_text(toml)
    settings = ServerSettings(database_url=f"sqlite:///{tmp / 'server.db'}", provider_key_path=files.key_path,
                              policy_file=tmp / "policy.toml")
    app = create_app(settings, clock=Clock(dt.datetime.now(dt.UTC)))
    svc = app.state.service
    _, token = svc.add_account("alice")
    svc.register_capsule(files.capsule_path, files.content_key_path,
                         provider_public=raw_public(load_provider_key(files.key_path).public_key()))
    svc.grant("alice", files.capsule_id, budget=100, devices=20, expires=None)
    with serve_in_thread(app) as url, httpx.Client(timeout=30) as http:
        yield Server(url, http, token, files, svc)
    app.state.engine.dispose()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, provider_files: ProviderFiles) -> Iterator[Server]:  # noqa: F811
    tmp = tmp_path_factory.mktemp("hwserver")
    yield from start(tmp, provider_files, policy_toml(tmp))


def available(kind: str) -> None:
    """The SNP and Nitro signers are separate test modules; all four exist in CI."""
    {"snp": _amd, "nitro": _nitro}.get(kind, lambda: None)()


def refused(r: httpx.Response, *words: str) -> str:
    assert r.status_code in (403, 409), r.text
    detail = r.text.lower()
    for w in words:
        assert w.lower() in detail, f"{w!r} not in {r.text}"
    return detail


# -- tests ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(KINDS))
def test_setup_with_hardware_evidence_is_accepted_and_answer_opens_only_in_that_enclave(server: Server,
                                                                                           kind: str) -> None:
    available(kind)
    enclave = Enclave.new()
    nonce = server.nonce()
    r = server.provision(enclave, nonce, KINDS[kind](bound_report_data(enclave.binding(nonce), MEASUREMENT)))
    assert r.status_code == 200, r.text
    body = r.json()
    content_key, license_env = open_payload(b64d(body["payload"]), enclave.hpke, nonce)
    assert len(content_key) == 32 and body["license_id"] in json.dumps(license_env)
    with pytest.raises(IntegrityError):  # another enclave's key cannot open it
        open_payload(b64d(body["payload"]), X25519PrivateKey.generate(), nonce)
    devices = server.service.usage()
    assert any(d["license_id"] == body["license_id"] and d["evidence"] == kind for d in devices)


@pytest.mark.parametrize("kind", list(KINDS))
def test_replayed_nonce_with_hardware_evidence_is_refused(server: Server, kind: str) -> None:
    """A spent nonce cannot set up another enclave. (An identical retry of the same request gets
    the same sealed answer back, which only the first enclave can open, and takes no new slot.)"""
    available(kind)
    enclave = Enclave.new()
    nonce = server.nonce()
    evidence = KINDS[kind](bound_report_data(enclave.binding(nonce), MEASUREMENT))
    first = server.provision(enclave, nonce, evidence)
    assert first.status_code == 200
    before = len(server.service.usage())
    second = Enclave.new()
    refused(server.provision(second, nonce, KINDS[kind](bound_report_data(second.binding(nonce), MEASUREMENT))),
            "already used")
    retry = server.provision(enclave, nonce, evidence)
    if retry.status_code == 200:
        assert retry.json()["license_id"] == first.json()["license_id"]
    else:
        refused(retry, "already used")
    assert len(server.service.usage()) == before


@pytest.mark.parametrize("kind", list(KINDS))
def test_evidence_made_for_another_challenge_is_refused(server: Server, kind: str) -> None:
    available(kind)
    enclave = Enclave.new()
    old, nonce = server.nonce(), server.nonce()
    r = server.provision(enclave, nonce, KINDS[kind](bound_report_data(enclave.binding(old), MEASUREMENT)))
    refused(r, "report_data" if kind in ("sgx", "tdx") else "bound")
    other = Enclave.new()  # a relay: the right nonce, but the keys of another enclave
    nonce = server.nonce()
    r = server.provision(enclave, nonce, KINDS[kind](bound_report_data(other.binding(nonce), MEASUREMENT)))
    assert r.status_code == 403, r.text


@pytest.mark.parametrize("kind", list(KINDS))
def test_debug_tee_is_refused(server: Server, kind: str) -> None:
    available(kind)
    enclave = Enclave.new()
    nonce = server.nonce()
    refused(server.provision(enclave, nonce, KINDS[kind](bound_report_data(enclave.binding(nonce), MEASUREMENT),
                                                         debug=True)), "debug")


@pytest.mark.parametrize("kind", list(KINDS))
def test_hardware_measurement_not_on_the_allow_list_is_refused(server: Server, kind: str) -> None:
    available(kind)
    enclave = Enclave.new()
    nonce = server.nonce()
    wrong = hashlib.sha384(b"a tampered image").digest()[: 32 if kind == "sgx" else 48]
    r = server.provision(enclave, nonce, KINDS[kind](bound_report_data(enclave.binding(nonce), MEASUREMENT),
                                                     hw=wrong))
    refused(r, "allow-list")


@pytest.mark.parametrize("kind", list(KINDS))
def test_mlcapsule_measurement_not_on_the_allow_list_is_refused(server: Server, kind: str) -> None:
    """The TEE image is allowed, but the mlcapsule release inside it reports another measurement."""
    available(kind)
    enclave = Enclave.new()
    nonce = server.nonce()
    r = server.provision(enclave, nonce, KINDS[kind](bound_report_data(enclave.binding(nonce), bytes(32))))
    refused(r, "measurement", "allow-list")


@pytest.mark.parametrize("kind", ["sgx", "tdx", "snp"])
def test_platform_below_the_tcb_policy_is_refused(server: Server, kind: str) -> None:
    available(kind)
    enclave = Enclave.new()
    nonce = server.nonce()
    r = server.provision(enclave, nonce, KINDS[kind](bound_report_data(enclave.binding(nonce), MEASUREMENT),
                                                     tcb="OutOfDate"))
    refused(r, "tcb")


@pytest.mark.parametrize("kind", ["sgx", "tdx"])
def test_server_held_collateral_is_used_when_the_client_sends_none(server: Server, kind: str) -> None:
    enclave = Enclave.new()
    nonce = server.nonce()
    r = server.provision(enclave, nonce, KINDS[kind](bound_report_data(enclave.binding(nonce), MEASUREMENT),
                                                     collateral=False))
    assert r.status_code == 200, r.text


def test_per_capsule_policy_narrows_the_accepted_types(tmp_path: Path, provider_files: ProviderFiles) -> None:  # noqa: F811
    toml = policy_toml(tmp_path) + textwrap.dedent(f'''
        [capsule."{provider_files.capsule_id}"]
        accept = ["tdx"]
    ''')
    for srv in start(tmp_path, provider_files, toml):
        enclave = Enclave.new()
        nonce = srv.nonce()
        r = srv.provision(enclave, nonce, sgx(bound_report_data(enclave.binding(nonce), MEASUREMENT)))
        detail = refused(r, "not accepted", "for this capsule")
        assert "tdx" in detail  # the hint names what is accepted
        nonce = srv.nonce()
        r = srv.provision(enclave, nonce, tdx(bound_report_data(enclave.binding(nonce), MEASUREMENT)))
        assert r.status_code == 200, r.text


def test_policy_file_typo_is_refused_at_start(tmp_path: Path, provider_files: ProviderFiles) -> None:  # noqa: F811
    from mlcapsule.enclave.errors import UsageError
    from mlcapsule.server.settings import ServerSettings

    (tmp_path / "policy.toml").write_text('[tdx]\nmr_td = []\nalow_debug = true\n')
    settings = ServerSettings(database_url=f"sqlite:///{tmp_path / 's.db'}", provider_key_path=provider_files.key_path,
                              policy_file=tmp_path / "policy.toml")
    with pytest.raises(UsageError, match="alow_debug"):
        settings.evidence_verifier()
    (tmp_path / "policy.toml").write_text('accept = ["software"]\n')
    with pytest.raises(UsageError, match="UNSAFE"):
        settings.evidence_verifier()
    (tmp_path / "policy.toml").write_text('accept = ["sgx"]\n')
    with pytest.raises(UsageError, match="without a policy"):
        settings.evidence_verifier()


def test_stale_nitro_document_is_refused(server: Server) -> None:
    """A document whose short-lived leaf certificate expired before now (4 hours old) is refused."""
    enclave = Enclave.new()
    nonce = server.nonce()
    r = server.provision(enclave, nonce, nitro(bound_report_data(enclave.binding(nonce), MEASUREMENT), age=4 * 3600))
    refused(r, "valid")
