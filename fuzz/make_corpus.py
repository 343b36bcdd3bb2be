"""Build the fuzzers' seed corpora and fixed context from real objects (issue 15, part 6).

    .venv/bin/python fuzz/make_corpus.py          # MLCAPSULE_SHARED=/work/shared for the recordings

Everything is made by the project's own code, as in production: a capsule by the real packer
(with a defense policy, so format 1.2), a setup by the real enclave core on the software backend
(its sealed state, license, receipts, voucher, unlock and acknowledgement), IPC frames by the real
encoders, software evidence by the real backend, TPM evidence by the real tpm backend on a swtpm
manufactured with EK certificates from a private CA (when swtpm is installed), and provider
server request bodies as the real client sends them. The recorded SGX/TDX/SNP/Nitro evidence
and its collateral are copied from the shared attestation vectors (Apache-2.0 / MIT; their
README lists each origin). The output is committed: ``fuzz/data/`` (context) and
``fuzz/corpus/<target>/`` (seeds, each starting with the harness's mode byte where it has modes).
Running this again replaces both (new keys: the old seeds then no longer match the context), except
the ``finding-*`` inputs of past findings, which stay.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import numpy as np

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent
DATA = FUZZ / "data"
CORPUS = FUZZ / "corpus"
SHARED = Path(os.environ.get("MLCAPSULE_SHARED", ROOT.parent / "shared")) / "attestation-vectors"
#: The software evidence and TPM evidence seeds bind this report_data (the harnesses expect it).
REPORT_DATA = bytes(range(32))


def seed(target: str, name: str, data: bytes, mode: int | None = None) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes((bytes([mode]) if mode is not None else b"") + data)


def jbytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def tiny_model() -> Any:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])], [w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main() -> int:
    import mlcapsule.packer as packer
    from mlcapsule.enclave._util import b64d, b64e
    from mlcapsule.enclave.backends.software import SoftwareBackend
    from mlcapsule.enclave.core import EnclaveCore
    from mlcapsule.enclave.crypto.keys import generate_provider_key, load_provider_key, raw_public
    from mlcapsule.enclave.format.container import CapsuleFile
    from mlcapsule.enclave.format.manifest import Policy
    from mlcapsule.enclave.format.trust import UnsafeTrustManifestKey
    from mlcapsule.enclave.messages.license import License
    from mlcapsule.enclave.messages.receipts import Ack
    from mlcapsule.enclave.messages.setup import seal_payload
    from mlcapsule.enclave.messages.unlock import Unlock
    from mlcapsule.enclave.messages.voucher import Voucher
    from mlcapsule.enclave.state import STATE_FILE

    # The inputs of past findings stay (they must keep raising only our errors); the rest is remade.
    findings = {p.relative_to(CORPUS): p.read_bytes() for p in CORPUS.glob("*/finding-*")}
    shutil.rmtree(DATA, ignore_errors=True)
    shutil.rmtree(CORPUS, ignore_errors=True)
    for rel, data in findings.items():
        (CORPUS / rel).parent.mkdir(parents=True, exist_ok=True)
        (CORPUS / rel).write_bytes(data)
    DATA.mkdir(parents=True)
    ctx: dict[str, Any] = {"report_data": REPORT_DATA.hex()}
    work = Path(tempfile.mkdtemp(prefix="mlcapsule-corpus-"))
    try:
        # -- provider key and capsules (the real packer) ---------------------------------------------------
        key_path = DATA / "provider-key.pem"
        generate_provider_key(key_path)
        provider = load_provider_key(key_path)
        ctx["provider_public"] = raw_public(provider.public_key()).hex()
        rng = np.random.default_rng(0)
        res = packer.pack(tiny_model(), DATA / "tiny.capsule", provider_key=key_path, name="tiny",
                          policy=Policy(lease_size=10), defenses=["prada:delta=0.9,action=lock", "ood"],
                          defense_data=rng.normal(size=(300, 4)).astype(np.float32), tune_runtime=False)
        plain = packer.pack(tiny_model(), work / "plain.capsule", provider_key=key_path, name="plain",
                            tune_runtime=False)
        m = res.manifest
        content_key = json.loads(Path(res.key_path).read_text())
        ctx["capsule_id"], ctx["version"] = str(m.capsule_id), m.version
        ctx["content_key"] = content_key["key"]
        for i, path in enumerate([res.capsule_path, plain.capsule_path]):
            seed("container", f"{i:02d}-{Path(path).name}", Path(path).read_bytes())
        for v in sorted((ROOT / "tests" / "vectors").glob("*.capsule")):  # the golden vectors of each version
            seed("container", f"vector-{v.name}", v.read_bytes())
        for i, path in enumerate([res.capsule_path, plain.capsule_path]):
            with CapsuleFile(path, trust=UnsafeTrustManifestKey()) as cf:
                seed("manifest", f"{i:02d}-manifest.json", cf.manifest_bytes)

        # -- a real setup on the software backend (the enclave core, in process) ---------------------------
        backend = SoftwareBackend(platform_dir=DATA / "platform")
        ctx["measurement"] = backend.measurement().hex()
        state_dir, run_dir = work / "state", work / "run"
        state_dir.mkdir()
        run_dir.mkdir()
        core = EnclaveCore(backend, Path(res.capsule_path), state_dir, run_dir)
        nonce = os.urandom(32)
        begin = core.setup_begin(nonce=nonce)
        license_id, device_id = str(uuid.uuid4()), str(uuid.uuid4())
        lic = License(license_id=license_id, capsule_id=m.capsule_id, version=m.version, device_id=device_id,
                      account="fuzz", receipt_key=b64d(begin["receipt_pub"]), budget=1000, expires=None,
                      issued=dt.datetime(2030, 1, 1, tzinfo=dt.UTC), lease_size=10,
                      policy={"defenses": ["prada:delta=0.95,action=lock"]})
        envelope = lic.sign(provider)
        payload = seal_payload(b64d(begin["hpke_pub"]), nonce, b64d(content_key["key"]), envelope)
        finish = core.setup_finish(payload=payload)
        for _ in range(3):
            core.infer_arrays([rng.normal(size=(2, 4)).astype(np.float32)])
        voucher = Voucher(license_id, device_id, 1, 50).sign(provider)
        core.apply_voucher(voucher=voucher)
        unlock = Unlock(license_id, device_id, 2, reset=True).sign(provider)
        report = core.usage_report()
        receipts = report["receipts"]
        from mlcapsule.enclave.messages.receipts import entry_hash

        head = receipts[-1]
        ack = Ack(license_id, device_id, head["body"]["seq"], entry_hash(head)).sign(provider)
        core.usage_ack(ack=ack)
        core.close()
        ctx["license_id"], ctx["device_id"] = license_id, device_id
        ctx["receipt_key"] = b64e(b64d(begin["receipt_pub"]))
        from mlcapsule.enclave.state import SealedStore

        store = SealedStore(backend, state_dir, str(m.capsule_id), m.version)
        ctx["receipt_private"] = b64e(store.load().receipt_key)
        sealed = (state_dir / STATE_FILE).read_bytes()
        seed("state", "00-sealed", sealed, mode=0)
        seed("state", "01-payload", backend.unseal(sealed, label=store.label), mode=1)
        seed("state", "02-defense-state", backend.unseal(sealed, label=store.label).partition(b"\0")[2], mode=2)
        with CapsuleFile(res.capsule_path, trust=UnsafeTrustManifestKey()) as cf:
            seed("state", "03-ood-stats", bytes(cf.plaintext("defense.ood", b64d(content_key["key"]))), mode=2)
        # The provisioning payload, encrypted to fuzz_setup.py's fixed enclave key (mode 0) and in clear (mode 1).
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        from mlcapsule.enclave._util import canonical_json
        from mlcapsule.enclave.messages.setup import HPKE_INFO, SUITE

        plaintext = canonical_json({"content_key": content_key["key"], "license": envelope})
        fuzz_enclave = X25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()
        seed("setup", "00-ciphertext", SUITE.encrypt(plaintext, fuzz_enclave, info=HPKE_INFO + bytes(32)), mode=0)
        seed("setup", "01-plaintext.json", plaintext, mode=1)
        seed("license", "00-license.json", jbytes(envelope))
        seed("voucher", "00-voucher.json", jbytes(voucher), mode=0)
        seed("voucher", "01-unlock.json", jbytes(unlock), mode=1)
        seed("voucher", "02-ack.json", jbytes(ack), mode=2)
        seed("receipts", "00-chain.json", jbytes(receipts))
        seed("receipts", "01-first.json", jbytes(receipts[:1]))

        # -- IPC frames, by the real encoders ---------------------------------------------------------------
        from mlcapsule.enclave import protocol

        def body(parts: list[Any]) -> bytes:
            return b"".join(bytes(p) for p in parts[1:])

        requests = {
            "hello": {}, "status": {}, "load": {"dev_key": "/tmp/tiny.capsule.key"}, "load-licensed": {},
            "setup_begin": {"nonce": b64e(nonce)}, "setup_finish": {"payload": b64e(payload)},
            "setup_finish-tpm": {"payload": b64e(payload), "credential": {"blob": "AAAA", "secret": "AAAA"}},
            "apply_voucher": {"voucher": voucher}, "usage_report": {}, "usage_ack": {"ack": ack}, "shutdown": {},
        }
        for i, (op, args) in enumerate(requests.items()):
            name = op.split("-")[0]
            seed("ipc", f"{i:02d}-{op}", body(protocol.encode(protocol.REQUEST, {"op": name, "args": args})), mode=0)
        seed("ipc", "20-reply-setup", body(protocol.encode(protocol.REPLY, {"ok": begin})), mode=0)
        seed("ipc", "21-reply-finish", body(protocol.encode(protocol.REPLY, {"ok": finish})), mode=0)
        seed("ipc", "22-reply-error", body(protocol.encode(protocol.REPLY, {"error": {
            "type": "BudgetExhaustedError", "message": "no budget left", "hint": "buy more"}})), mode=0)
        x = rng.normal(size=(2, 4)).astype(np.float32)
        tensors = [x, np.arange(6, dtype=np.int64).reshape(2, 3), np.zeros((0, 3), np.float32), np.array(True)]
        seed("ipc", "30-tensors-request", body(protocol.encode_tensors(protocol.TENSOR_REQUEST, [x])), mode=1)
        seed("ipc", "31-tensors-reply", body(protocol.encode_tensors(protocol.TENSOR_REPLY, tensors)), mode=1)
        arena = protocol.SharedArena.create()
        try:
            shared = protocol.encode_tensors(protocol.TENSOR_REQUEST, [x, tensors[1]], arena, inline_max=16)
            seed("ipc", "40-tensors-shared", body(shared), mode=2)
        finally:
            arena.close()

        for i, msg in enumerate([{"op": "info"}, {"op": "open", "arena": True, "threads": 0, "memory_limit_mb": 0.0},
                                 {"op": "kill"}, {"ok": {"uid": 1000, "backend": "software"}},
                                 {"error": {"type": "UsageError", "message": "m", "hint": None}}]):
            seed("ipc", f"50-service-{i}", jbytes(msg), mode=3)  # the enclave service's socket messages

        # -- software evidence (the real backend) ---------------------------------------------------------
        seed("software", "00-evidence.json", jbytes(backend.evidence(REPORT_DATA)))
        seed("software", "01-setup-evidence.json", jbytes(begin["evidence"]))

        # -- provider server request bodies (as the client sends them) ---------------------------------------
        seed("server", "00-challenge.json", jbytes({"capsule_id": "@CAPSULE@", "version": m.version}), mode=0)
        seed("server", "01-provision.json", jbytes({
            "capsule_id": "@CAPSULE@", "version": m.version, "nonce": "@NONCE@", "hpke_pub": "@HPKE@",
            "receipt_pub": "@RECEIPT@", "evidence": "@EVIDENCE@"}), mode=1)
        seed("server", "02-provision-verbatim.json", jbytes({
            "capsule_id": str(m.capsule_id), "version": m.version, "nonce": b64e(nonce),
            "hpke_pub": begin["hpke_pub"], "receipt_pub": begin["receipt_pub"], "evidence": begin["evidence"]}),
            mode=1)
        seed("server", "03-usage.json", jbytes({"protocol": 2, "license_id": "@LICENSE@", "device_id": "@DEVICE@",
                                                "receipts": receipts}), mode=2)
        seed("server", "04-usage-empty.json", jbytes({"protocol": 2, "license_id": "@LICENSE@",
                                                      "device_id": "@DEVICE@", "receipts": []}), mode=2)
        capsule_b64 = b64e(Path(plain.capsule_path).read_bytes())
        admin = [({"name": "bob"}, 3),
                 ({"capsule": capsule_b64, "key": b64e(Path(plain.key_path).read_bytes())}, 4),
                 ({"account": "fuzz", "capsule": "@CAPSULE@", "budget": 100, "devices": 1_000_000,
                   "expires": "2031-01-01T00:00:00Z", "defenses": ["prada:delta=0.95"]}, 5),
                 ({"account": "bob", "capsule": "@CAPSULE@:1"}, 6),
                 ({"license_id": "@LICENSE@", "queries": 10}, 7),
                 ({"license_id": "@LICENSE@", "device_id": "@DEVICE@", "reset_detectors": True}, 8),
                 ({"license_id": "@LICENSE@", "device_id": "@DEVICE@", "receipts": receipts}, 9),
                 ({"name": "reader-1", "role": "reader"}, 10)]
        for body_, mode_ in admin:
            seed("server", f"{mode_:02d}-admin.json", jbytes(body_), mode=mode_)

        # -- TPM evidence from the real tpm backend on a swtpm (if installed) ------------------------------------
        _tpm_seeds(work)

        # -- recorded hardware evidence (copied from the shared vectors) -------------------------------------
        _recorded()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    (DATA / "context.json").write_text(json.dumps(ctx, indent=1, sort_keys=True) + "\n")
    for f in DATA.rglob("*"):
        if f.is_file() and f.stat().st_size > 64 * 1024:
            print(f"warning: {f} is {f.stat().st_size} bytes", file=sys.stderr)
    n = sum(1 for _ in CORPUS.rglob("*") if _.is_file())
    print(f"{n} seeds in {CORPUS}, context in {DATA}")
    return 0


def _tpm_seeds(work: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from swtpm import Swtpm, make_ca_config, manufacture, swtpm_available
    finally:
        sys.path.pop(0)
    gcp = SHARED / "tpm" / "windows_gcp_shielded_vm.json"
    if gcp.exists():  # a real GCP vTPM's AK, quote and signature (no EK: refused, after the parsers)
        d = json.loads(gcp.read_text())
        pcrs = {"sha1": {str(p["Index"]): base64.b64decode(p["Digest"]).hex() for p in d["Log"]["PCRs"]}}
        seed("tpm", "10-gcp-vtpm.json", jbytes({
            "type": "tpm", "version": 1, "measurement": "00" * 32, "ak_public": d["AK"]["Public"],
            "quote": d["Quote"]["Quote"], "signature": d["Quote"]["Signature"], "pcrs": pcrs,
            "ek_public": d["AK"]["Public"], "ek_certificate": "", "ek_chain": []}))
    if not swtpm_available():
        print("swtpm is not installed: no TPM evidence seeds from a real TPM backend", file=sys.stderr)
        return
    ca = make_ca_config(work / "tpm-ca")
    state = manufacture(work / "tpm-state", ca)
    shutil.copy(ca.root_cert, DATA / "tpm-root.pem")
    shutil.copy(ca.issuer_cert, DATA / "tpm-intermediate.pem")
    with Swtpm(state) as t:
        for i, kind in enumerate([{}, {"ak": "rsa"}, {"ek": "EK-HIGH-ECC384"}]):
            with t.backend(**kind) as b:
                seed("tpm", f"{i:02d}-swtpm-{'-'.join(kind.values()) or 'ecc'}.json", jbytes(b.evidence(REPORT_DATA)))


def _recorded() -> None:
    if not SHARED.is_dir():
        raise SystemExit(f"the shared attestation vectors are missing ({SHARED}); set MLCAPSULE_SHARED")

    def v(rel: str) -> bytes:
        return (SHARED / rel).read_bytes()

    # SGX: mode 0 fuzzes the quote (with the recorded collateral), mode 1 the collateral (with the quote).
    shutil.copy(SHARED / "dcapqvl/sgx_quote", DATA / "sgx_quote")
    shutil.copy(SHARED / "dcapqvl/sgx_quote_collateral.json", DATA / "sgx_collateral.json")
    seed("sgx", "00-dcapqvl-quote", v("dcapqvl/sgx_quote"), mode=0)
    seed("sgx", "01-intel-quote-v3", v("inteldcap/quote_v3_4533.dat"), mode=0)
    seed("sgx", "02-intel-qvl-quote", v("inteldcap/qvl_quote_1054.dat"), mode=0)
    seed("sgx", "03-oe-bad-report", v("oe/sgx_report_bad.bin"), mode=0)
    seed("sgx", "10-collateral.json", v("dcapqvl/sgx_quote_collateral.json"), mode=1)
    # TDX: the same two modes.
    shutil.copy(SHARED / "dcapqvl/tdx_quote", DATA / "tdx_quote")
    shutil.copy(SHARED / "dcapqvl/tdx_quote_collateral.json", DATA / "tdx_collateral.json")
    for i, rel in enumerate(["dcapqvl/tdx_quote", "dcapqvl/tdx_quote_outdated", "tdx/tdx_prod_quote_SPR_E4.dat",
                             "tdx/quote_v5_sample.dat", "trustee/td-quote.bin", "oe/tdx_quote_v5.bin"]):
        seed("tdx", f"{i:02d}-{rel.replace('/', '-')}", v(rel), mode=0)
    seed("tdx", "10-collateral.json", v("dcapqvl/tdx_quote_collateral.json"), mode=1)
    # SEV-SNP: mode 0 the report, 1 the VCEK (DER), 2 the ASK+ARK chain (PEM).
    for name, rel in (("snp_report", "snp/attestation.bin"), ("snp_vcek.der", "snp/vcek.testcer"),
                      ("snp_chain.pem", "snp/ask_ark_milan.pem")):
        shutil.copy(SHARED / rel, DATA / name)
    seed("snp", "00-go-sev-guest-milan", v("snp/attestation.bin"), mode=0)
    seed("snp", "01-virtee-milan", v("snp/virtee_report_milan.bin"), mode=0)
    seed("snp", "02-trustee-vlek", v("trustee/test-vlek-report.bin"), mode=0)
    seed("snp", "10-vcek.der", v("snp/vcek.testcer"), mode=1)
    seed("snp", "11-vlek.der", v("trustee/test-vlek.der"), mode=1)
    seed("snp", "20-ask-ark-milan.pem", v("snp/ask_ark_milan.pem"), mode=2)
    seed("snp", "21-ask-ark-milan-vlek.pem", v("snp/ask_ark_milan_vlek.pem"), mode=2)
    # Nitro: the raw COSE_Sign1 document.
    for name in ("example_attestation", "invalid_attestation"):
        seed("nitro", f"{name}.cbor", base64.b64decode(v(f"nitro/{name}.b64")))
    # The same recordings in the evidence wire format (fuzz_hardware.py), with and without collateral.
    def b(rel: str) -> str:
        return base64.b64encode(v(rel)).decode()

    wire = {"00-sgx.json": {"type": "sgx", "version": 1, "quote": b("dcapqvl/sgx_quote"),
                            "collateral": json.loads(v("dcapqvl/sgx_quote_collateral.json"))},
            "01-sgx-no-collateral.json": {"type": "sgx", "version": 1, "quote": b("dcapqvl/sgx_quote"),
                                          "collateral": None},
            "02-tdx.json": {"type": "tdx", "version": 1, "quote": b("dcapqvl/tdx_quote"),
                            "collateral": json.loads(v("dcapqvl/tdx_quote_collateral.json"))},
            "03-snp.json": {"type": "snp", "version": 1, "report": b("snp/attestation.bin"),
                            "vcek": b("snp/vcek.testcer"), "chain": v("snp/ask_ark_milan.pem").decode()},
            "04-snp-no-certificates.json": {"type": "snp", "version": 1, "report": b("snp/attestation.bin"),
                                            "vcek": None, "chain": None},
            "05-nitro.json": {"type": "nitro", "version": 1, "document": base64.b64encode(
                base64.b64decode(v("nitro/example_attestation.b64"))).decode()}}
    for name, evidence in wire.items():
        seed("hardware", name, jbytes(evidence))


if __name__ == "__main__":
    sys.exit(main())
