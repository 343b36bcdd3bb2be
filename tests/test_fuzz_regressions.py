"""Regression tests for what the fuzzers found (fuzz/README.md), and a replay of every seed.

Each finding has a test that fails on the code before its fix, and its input is in the corpus of
the harness that found it (``fuzz/corpus/<target>/finding-*``). The replay runs every committed
seed through its harness's ``TestOneInput`` without atheris: a seed that makes a harness raise
(an exception that is not ours, a 500 from the server) fails here too, so a regression shows in
pytest even where the fuzzers do not run.
"""

from __future__ import annotations

import base64
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from mlcapsule.enclave.errors import FormatError
from mlcapsule.enclave.state import EnclaveState

FUZZ = Path(__file__).resolve().parents[1] / "fuzz"
TARGETS = ("container", "manifest", "state", "license", "voucher", "setup", "receipts", "ipc", "software", "tpm", "sgx",
           "tdx", "snp", "nitro", "hardware", "server")


def _state(**changes: Any) -> bytes:
    state = EnclaveState(capsule_id="c", version=1, content_key=bytes(32), license={}, license_id="l", device_id="d",
                         receipt_key=bytes(32), budget=10, expires="2031-01-01T00:00:00+00:00", lease_size=5,
                         last_time="2030-01-01T00:00:00+00:00")
    d = json.loads(state.to_bytes())
    d.update(changes)
    return json.dumps(d).encode()


def test_sealed_state_of_the_seeds_shape_parses() -> None:
    assert EnclaveState.from_bytes(_state()).receipt_key == bytes(32)
    assert EnclaveState.from_bytes(_state(last_time="", expires=None)).expires is None


# -- finding 1 (fuzz_state): a receipt key that is not 32 bytes escaped load() as pyca's ValueError ------
@pytest.mark.parametrize("field", ["receipt_key", "content_key"])
def test_sealed_state_with_a_key_of_another_length_is_a_format_error(field: str) -> None:
    with pytest.raises(FormatError, match="sealed state is malformed"):
        EnclaveState.from_bytes(_state(**{field: base64.b64encode(bytes(16)).decode()}))


# -- findings 2-4 and 14 (fuzz_state): a time the ledger cannot compare escaped as ValueError / TypeError ----
# (14, libFuzzer's: an empty ``expires``, which the first fix let through)
@pytest.mark.parametrize(("field", "value"), [("last_time", "yesterday"), ("last_time", "2030-01-01T00:00:00"),
                                              ("expires", "never"), ("expires", "2030-01-01T00:00:00"),
                                              ("expires", "")],
                         ids=["last-time-not-iso", "last-time-naive", "expires-not-iso", "expires-naive",
                              "expires-empty"])
def test_sealed_state_with_a_time_that_is_not_aware_iso_is_a_format_error(field: str, value: str) -> None:
    with pytest.raises(FormatError, match="sealed state is malformed"):
        EnclaveState.from_bytes(_state(**{field: value}))


# -- finding 15 (fuzz_state, by libFuzzer): a lease size of 0 divided by zero at the next charge -------------
@pytest.mark.parametrize("lease_size", [0, -1, 1_000_001])
def test_sealed_state_with_a_lease_size_out_of_range_is_a_format_error(lease_size: int) -> None:
    with pytest.raises(FormatError, match="sealed state is malformed"):
        EnclaveState.from_bytes(_state(lease_size=lease_size))


# -- finding 13 (fuzz_state, by libFuzzer): a license id with a lone surrogate escaped where the license's
# counters are named (UnicodeEncodeError from str.encode) -------------------------------------------------------
@pytest.mark.parametrize("field", ["license_id", "device_id", "capsule_id"])
def test_sealed_state_with_text_that_has_no_utf8_is_a_format_error(field: str) -> None:
    raw = _state().replace(b'"%s": "' % field.encode(), b'"%s": "\\ud800' % field.encode())
    with pytest.raises(FormatError, match="sealed state is malformed"):
        EnclaveState.from_bytes(raw)


# -- every seed, through its harness ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def harnesses() -> Any:
    sys.path.insert(0, str(FUZZ))
    try:
        yield lambda target: importlib.import_module(f"fuzz_{target}")
    finally:
        sys.path.remove(str(FUZZ))


def test_every_harness_has_a_seed_corpus() -> None:
    assert sorted(p.stem.removeprefix("fuzz_") for p in FUZZ.glob("fuzz_*.py")) == sorted([*TARGETS, "dcap"])
    for target in TARGETS:
        assert any((FUZZ / "corpus" / target).iterdir()), target


@pytest.mark.parametrize("target", TARGETS)
def test_every_seed_raises_only_our_errors_in_its_harness(harnesses: Any, target: str) -> None:
    harness = harnesses(target)
    for seed in sorted((FUZZ / "corpus" / target).iterdir()):
        harness.TestOneInput(seed.read_bytes())  # raises on a finding


# -- finding 5 (license, voucher, unlock, ack): a lone surrogate ("\ud800" in the JSON) escaped the
# signature check as UnicodeEncodeError (an "internal enclave error" for apply_voucher) --------------------
@pytest.mark.parametrize("kind", ["license/v1", "voucher/v1", "unlock/v1", "usage-ack/v1"])
def test_signed_message_with_a_lone_surrogate_is_a_format_error(kind: str) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from mlcapsule.enclave.messages import signed

    key = Ed25519PrivateKey.generate()
    envelope = {"type": kind, "body": json.loads('{"license_id": "\\ud800"}'), "signature": "AA=="}
    with pytest.raises(FormatError, match="not canonical JSON"):
        signed.verify(kind, envelope, key.public_key())
    with pytest.raises(FormatError, match="not canonical JSON"):
        signed.sign(kind, envelope["body"], key)


# -- finding 6 (fuzz_setup): a provisioning payload whose content key is not a string escaped as
# AttributeError, and one nested too deep as RecursionError (anyone can encrypt to the enclave's HPKE key) --
@pytest.mark.parametrize("plaintext", [b'{"content_key": 5, "license": {}}', b'{"content_key": null}',
                                       b"[" * 100_000], ids=["number", "null", "deep"])
def test_provisioning_payload_the_host_encrypted_is_a_format_error(plaintext: bytes) -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    from mlcapsule.enclave.messages.setup import HPKE_INFO, SUITE, open_payload

    key, nonce = X25519PrivateKey.generate(), bytes(32)
    ciphertext = SUITE.encrypt(plaintext, key.public_key(), info=HPKE_INFO + nonce)
    with pytest.raises(FormatError, match="provisioning payload is malformed"):
        open_payload(ciphertext, key, nonce)


# -- findings 7 and 9 (fuzz_server): an admin capsule upload whose key file does not parse answered 500, and
# one nested too deep escaped the app as RecursionError (ContentKey.from_json) ------------------------------
def test_admin_capsule_upload_with_a_key_that_does_not_parse_is_a_422(harnesses: Any) -> None:
    server = harnesses("server")
    capsule = base64.b64encode((FUZZ / "data" / "tiny.capsule").read_bytes()).decode()
    for key in (b"[1]", b"5", b'{"format": "mlcapsule-content-key/v1", "key": null}', b"[" * 5000):
        r = server._CLIENT.post("/v1/admin/capsules", headers=server._OPERATOR,
                                json={"capsule": capsule, "key": base64.b64encode(key).decode()})
        assert r.status_code == 422 and r.json()["error"]["type"] == "FormatError", r.text


# -- finding 8 (fuzz_state, mode 2): a defenses' blob whose JSON header nests too deep escaped as RecursionError
def test_defense_state_blob_with_a_deeply_nested_header_is_a_format_error() -> None:
    import struct

    from mlcapsule.enclave.defenses.pipeline import DefenseState
    from mlcapsule.enclave.defenses.policy import DefensePolicy

    policy = DefensePolicy.from_specs(["prada:delta=0.9,action=lock", "ood"])
    good = DefenseState.new(policy).to_bytes()
    header = b"[" * 100_000
    with pytest.raises(FormatError, match="header is not JSON"):
        DefenseState.from_bytes(good[:6] + struct.pack(">I", len(header)) + header, policy)


def test_content_key_file_nested_too_deep_is_a_key_file_error() -> None:
    from mlcapsule.enclave.crypto.keys import ContentKey
    from mlcapsule.enclave.errors import KeyFileError

    with pytest.raises(KeyFileError, match="not a valid mlcapsule content key file"):
        ContentKey.from_json(b'{"format": "mlcapsule-content-key/v1", "key": ' + b"[" * 5000)


# -- finding 10 (fuzz_server): an admin grant of more devices or queries than the database's integers hold
# answered 500 (OverflowError on SQLite, DataError on PostgreSQL) ------------------------------------------
@pytest.mark.parametrize(("devices", "budget"), [(2**63, 100), (2**31, 100), (2, 2**64)],
                         ids=["devices-2^63", "devices-2^31", "budget-2^64"])
def test_admin_grant_beyond_the_database_integers_is_a_422(harnesses: Any, devices: int, budget: int) -> None:
    server = harnesses("server")
    r = server._CLIENT.post("/v1/admin/grants", headers=server._OPERATOR, json={
        "account": "fuzz", "capsule": server._CTX["capsule_id"], "budget": budget, "devices": devices})
    assert r.status_code == 422, r.text


# -- finding 11 (fuzz_server): a validly signed receipt whose counters exceed 64 bits answered 500 where the
# server stores them (OverflowError on SQLite); a software-backend client can sign any receipt ----------------
@pytest.mark.parametrize("field", ["charged", "answered", "seq"])
def test_receipt_counter_beyond_64_bits_is_a_format_error(field: str) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from mlcapsule.enclave.messages.receipts import GENESIS, ChainHead, make_entry, verify_chain

    key = Ed25519PrivateKey.generate()
    big = 2**64
    head = ChainHead(big - 1, GENESIS, 0, 0) if field == "seq" else ChainHead(0, GENESIS, 0, 0)
    counters = {"seq": big if field == "seq" else 1, "charged": big, "answered": big if field == "answered" else 0}
    entry = make_entry(key, prev=GENESIS, kind="setup", license_id="l", time="2030-01-01T00:00:00+00:00", **counters)
    with pytest.raises(FormatError, match="a receipt is malformed"):
        verify_chain([entry], key.public_key(), license_id="l", head=head)


def test_usage_upload_with_a_counter_beyond_64_bits_is_a_4xx(harnesses: Any) -> None:
    server = harnesses("server")
    server.TestOneInput((FUZZ / "corpus" / "server" / "finding-11-usage-receipt-charged-2-64").read_bytes())


# -- finding 12 (fuzz_ipc, mode 3): an enclave service message nested too deep escaped recv_msg as
# RecursionError (not its documented ValueError), killing the session thread and leaking the passed fds --
def test_enclave_service_message_nested_too_deep_is_a_value_error_and_closes_its_fds() -> None:
    import os
    import socket

    from mlcapsule import enclaved

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    with a, b:
        socket.send_fds(a, [b"[" * 5000], [r])
        before = set(os.listdir("/proc/self/fd"))
        with pytest.raises(ValueError):
            enclaved.recv_msg(b)
        assert set(os.listdir("/proc/self/fd")) == before  # the descriptor it received is closed again
    os.close(r)
    os.close(w)


def test_local_admin_grant_beyond_the_database_integers_is_a_usage_error(tmp_path: Path) -> None:
    """Finding 10 again, through the service the local CLI calls (the API bounded its model only)."""
    from mlcapsule.enclave.errors import UsageError
    from mlcapsule.server.db import make_engine, session_factory
    from mlcapsule.server.service import ProviderService
    from mlcapsule.attestation import AttestationPolicy

    engine = make_engine(f"sqlite:///{tmp_path / 's.db'}")
    svc = ProviderService(session_factory(engine), policy=AttestationPolicy())
    for devices, budget in ((2**31, 10), (1, 2**63)):
        with pytest.raises(UsageError, match="below 2"):
            svc.grant("nobody", "00000000-0000-4000-8000-000000000000", budget=budget, devices=devices, expires=None)
    engine.dispose()
