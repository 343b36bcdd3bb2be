"""Red team, issue 9, item 6: parsers that let a stray Python exception out, and two small breaks.

Each test is named after the attack or defect it stops, and failed on the code before the fix:

* receipts whose ``signature`` is a number, null or a list made ``/v1/usage`` answer 500;
* mutated EK certificates escaped the TPM verifier as ``ValueError`` or ``UnsupportedAlgorithm``;
* ``decode_tensors`` raised numpy's ValueError on a zero-size tensor with huge dimensions, and
  ``unpack_tensors`` raised SyntaxError on the dtype ``",faot3l"`` (numpy parses dtype strings);
* ``License.from_dict`` and ``EnclaveState.from_bytes`` raised AttributeError or TypeError on
  fields of the wrong type;
* the worker created the platform folder 0755;
* a 0-d input could not go through ``Capsule.run``.

The fuzz tests are derandomized by the "ci" hypothesis profile (tests/conftest.py): the same
examples every run (``HYPOTHESIS_PROFILE=dev`` for fresh random ones).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import stat
import struct
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _server_support import FakeEnclave, ProviderFiles, _tiny_model, harness
from conftest import ProviderKey, pack_model
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from swtpm import swtpm, tpm_ca, tpm_factory, tpm_policy  # noqa: F401  (fixtures)

from mlcapsule.enclave import protocol as P
from mlcapsule.enclave.state import EnclaveState
from mlcapsule.enclave.errors import FormatError, InputError, IntegrityError, ProtocolError
from mlcapsule.enclave.messages.license import License
from mlcapsule.enclave.messages.receipts import GENESIS, ChainHead, entry_hash, make_entry, verify_chain
from mlcapsule.enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey  # noqa: F401

FIXED = settings(max_examples=300, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
T0 = dt.datetime(2030, 1, 1, tzinfo=dt.timezone.utc)
#: Values of every JSON type (and bool, which Python counts as an int).
WRONG = [None, 0, 7, -1, 1.5, True, False, "", "x", "0" * 64, [], [1], {}, {"a": 1}]


# -- receipts: /v1/usage answered 500 on a non-string signature --------------------------------------
def _receipts(n: int = 2, license_id: str = "lic") -> tuple[Ed25519PrivateKey, list[dict[str, Any]]]:
    key = Ed25519PrivateKey.generate()
    out, prev = [], GENESIS
    for s in range(1, n + 1):
        e = make_entry(key, seq=s, prev=prev, kind="setup" if s == 1 else "report", license_id=license_id,
                       time=T0.isoformat(), charged=0, answered=0)
        out.append(e)
        prev = entry_hash(e)
    return key, out


def _retyped(entries: list[dict[str, Any]], where: str, value: Any) -> list[dict[str, Any]]:
    bad = json.loads(json.dumps(entries))
    if where == "signature":
        bad[-1]["signature"] = value
    elif where == "entry":
        bad[-1] = value
    elif where == "body":
        bad[-1]["body"] = value
    else:
        bad[-1]["body"][where] = value
    return bad


@pytest.mark.parametrize("where", ["signature", "entry", "body", "seq", "prev", "kind", "license_id", "time",
                                   "charged", "answered", "data"])
def test_receipt_with_a_field_of_the_wrong_type_is_a_format_error_not_a_crash(where: str) -> None:
    key, entries = _receipts()
    head = ChainHead(0, GENESIS, 0, 0)
    assert verify_chain(entries, key.public_key(), license_id="lic", head=head).seq == 2
    for value in WRONG + ["\ud800", "ab\u00e9"]:
        bad = _retyped(entries, where, value)
        if bad == entries:
            continue
        with pytest.raises((FormatError, IntegrityError)):
            verify_chain(bad, key.public_key(), license_id="lic", head=head)


def test_receipt_signature_that_is_a_number_null_or_list_is_refused_with_4xx_not_500(tmp_path: Path) -> None:
    """Through the real app (SQLite): the upload is refused as a FormatError (422), and the
    stored chain does not move."""
    import mlcapsule
    from mlcapsule.enclave.crypto.keys import generate_provider_key
    from mlcapsule.enclave.backends.software import SoftwareBackend
    from mlcapsule.enclave.format.manifest import Policy

    key = tmp_path / "provider-key.pem"
    generate_provider_key(key)
    res = mlcapsule.pack(_tiny_model(), tmp_path / "tiny.capsule", provider_key=key, name="tiny",
                         policy=Policy(lease_size=25), tune_runtime=False)
    files = ProviderFiles(key, res.capsule_path, res.key_path, str(res.manifest.capsule_id), res.manifest.version, 25)
    backend = SoftwareBackend(platform_dir=tmp_path / "platform")
    with harness(f"sqlite:///{tmp_path / 'server.db'}", files, backend) as h:
        enc: FakeEnclave = h.enclave()
        r = h.provision(enc)
        assert r.status_code == 200, r.text
        lic = r.json()
        chain = enc.chain(lic["license_id"], 3)

        def upload(receipts: Any) -> Any:
            return h.client.post("/v1/usage", json={"protocol": 2, "license_id": lic["license_id"],
                                                    "device_id": lic["device_id"], "receipts": receipts},
                                 headers=h.auth())

        for value in (7, None, [], ["AAAA"], 1.5, True, {"a": 1}):
            bad = json.loads(json.dumps(chain))
            bad[1]["signature"] = value
            r = upload(bad)
            assert r.status_code == 422, (value, r.status_code, r.text)
            assert r.json()["error"]["type"] == "FormatError"
        for body in ({**chain[1]["body"], "seq": "2"}, {**chain[1]["body"], "charged": None}, "body", [1]):
            bad = json.loads(json.dumps(chain))
            bad[1]["body"] = body
            r = upload(bad)
            assert 400 <= r.status_code < 500, (body, r.status_code, r.text)
        r = upload(chain)  # the chain was never moved by the refused uploads
        assert r.status_code == 200, r.text
        assert r.json()["seq"] == 3


# -- TPM: mutated EK certificates escaped the verifier as ValueError / UnsupportedAlgorithm ---------------
def _ek_mutations(der: bytes) -> list[bytes]:
    """Every byte flipped (two ways), every truncation, and a few splices: deterministic."""
    out = []
    for i in range(len(der)):
        for mask in (0x01, 0x80):
            b = bytearray(der)
            b[i] ^= mask
            out.append(bytes(b))
    out += [der[:n] for n in range(0, len(der), 7)]
    out += [der + b"\0", der[:len(der) // 2] + der, der[:20] + bytes(len(der) - 20)]
    return out


@pytest.mark.tpm
@pytest.mark.filterwarnings("ignore:Parsed a serial number")  # a mutated serial: pyca warns, then parses
def test_mutated_ek_certificate_raises_only_attestation_error(swtpm: Any, tpm_policy: Any) -> None:
    """Mutations of the EK certificate (and of an intermediate the client sends): the verifier
    refuses each with AttestationError, never ValueError or UnsupportedAlgorithm."""
    from mlcapsule.enclave._util import b64d, b64e
    from mlcapsule.attestation import AttestationPolicy
    from mlcapsule.attestation import tpm as T
    from mlcapsule.enclave.errors import AttestationError
    from mlcapsule.enclave.messages.setup import report_data

    with swtpm.backend() as b:
        rd = report_data(os.urandom(32), os.urandom(32), os.urandom(32))
        ev = b.evidence(rd)
    policy = AttestationPolicy(measurements={ev["measurement"]})
    T.verify_tpm(ev, expected_report_data=rd, policy=policy, tpm_policy=tpm_policy)  # the good one verifies
    der = b64d(ev["ek_certificate"])
    escaped: dict[str, int] = {}
    accepted = 0
    for bad in _ek_mutations(der):
        try:
            T.verify_tpm({**ev, "ek_certificate": b64e(bad)}, expected_report_data=rd, policy=policy,
                         tpm_policy=tpm_policy)
            accepted += 1  # a change in bytes the certificate's signature does not cover (e.g. DER slack)
        except AttestationError:
            pass
        except Exception as e:  # noqa: BLE001  (what the test is about)
            escaped[type(e).__name__] = escaped.get(type(e).__name__, 0) + 1
    assert not escaped, f"exceptions other than AttestationError escaped: {escaped}"
    assert accepted < 8, accepted
    # The issuing CA's certificate sent by the client in ek_chain, mutated, with only the root trusted.
    roots_only = T.TpmPolicy(roots=tpm_policy.roots)
    inter = tpm_policy.intermediates[0].public_bytes(T.Encoding.DER)
    good = {**ev, "ek_chain": [b64e(inter)]}
    T.verify_tpm(good, expected_report_data=rd, policy=policy, tpm_policy=roots_only)
    for bad in _ek_mutations(inter)[::3]:
        try:
            T.verify_tpm({**ev, "ek_chain": [b64e(bad)]}, expected_report_data=rd, policy=policy, tpm_policy=roots_only)
        except AttestationError:
            pass
        except Exception as e:  # noqa: BLE001
            escaped[type(e).__name__] = escaped.get(type(e).__name__, 0) + 1
    assert not escaped, f"exceptions other than AttestationError escaped (ek_chain): {escaped}"


# -- License.from_dict and EnclaveState.from_bytes: AttributeError / TypeError on wrong types -----------
def _license() -> dict[str, Any]:
    return License(license_id=str(uuid.uuid4()), capsule_id=uuid.uuid4(), version=1, device_id="dev", account="acc",
                   receipt_key=os.urandom(32), budget=100, expires=T0, issued=T0, lease_size=10,
                   policy={"pcrs": {}}).to_dict()


#: What the optional license fields may hold (JSON types; bool is not an int); the others, only a
#: value of their good value's type.
_LICENSE_OK = {"budget": lambda v: v is None or (type(v) is int and v >= 0),
               "expires": lambda v: v is None, "issued": lambda v: v is None,
               "policy": lambda v: v is None or isinstance(v, dict)}


@pytest.mark.parametrize("field", sorted(_license()))
def test_license_field_of_the_wrong_type_raises_format_error_not_attribute_or_type_error(field: str) -> None:
    good = _license()
    assert License.from_dict(good).to_dict() == good
    for value in WRONG:
        try:
            License.from_dict({**good, field: value})
        except FormatError:
            continue
        ok = _LICENSE_OK.get(field, lambda v: type(v) is type(good[field]))  # the field's own JSON type
        assert ok(value), f"license.{field} = {value!r} was accepted"
    missing = {k: v for k, v in good.items() if k != field}
    for d in (None, [], "license", 3, *([missing] if field != "policy" else [])):  # policy is optional
        with pytest.raises(FormatError):
            License.from_dict(d)  # type: ignore[arg-type]


def _state() -> EnclaveState:
    return EnclaveState(capsule_id=str(uuid.uuid4()), version=1, content_key=os.urandom(32), license={"type": "x"},
                        license_id="lic", device_id="dev", receipt_key=os.urandom(32), budget=100, expires=None,
                        lease_size=10, receipts=[{"body": {"seq": 1}, "signature": "AA=="}])


@pytest.mark.parametrize("field", sorted(json.loads(_state().to_bytes())))
def test_sealed_state_field_of_the_wrong_type_raises_format_error_not_attribute_or_type_error(field: str) -> None:
    good = json.loads(_state().to_bytes())
    assert EnclaveState.from_bytes(json.dumps(good).encode()).to_bytes() == json.dumps(good, separators=(",", ":")).encode()
    accepted = []
    for value in WRONG + [[[]], [1, 2]]:
        raw = json.dumps({**good, field: value}).encode()
        try:
            EnclaveState.from_bytes(raw)
        except FormatError:
            continue
        accepted.append(value)
    optional = {"budget": int, "expires": str, "voucher_base": int, "expiry_base": int}
    for value in accepted:  # only values of the field's own JSON type get through
        kinds = (optional[field], type(None)) if field in optional else (type(good[field]),)
        assert type(value) in kinds, f"state.{field} = {value!r} was accepted"
    for raw in (b"[]", b"null", b"7", b'"x"', b"\xff\xfe", b"[" * 100_000, json.dumps({**good, "extra": 1}).encode(),
                json.dumps({k: v for k, v in good.items() if k != "format"}).encode()):
        with pytest.raises(FormatError):
            EnclaveState.from_bytes(raw)


# -- enclave protocol: numpy's ValueError and SyntaxError came out of the frame parsers ----------------
def _frame(parts: list[Any]) -> bytearray:
    return bytearray(b"".join(bytes(p) for p in parts))[4:]


def _tensor_frame(descs: list[tuple[int, int, int, int, int, tuple[int, ...]]], data: bytes = b"") -> bytearray:
    """A tensor frame with hand-made descriptors: (dtype code, ndim, place, offset, nbytes, shape)."""
    body = bytearray(struct.pack("<2sBBII", b"MC", P.PROTOCOL_VERSION, P.TENSOR_REQUEST, 0, len(descs)))
    for code, ndim, place, offset, nbytes, shape in descs:
        body += struct.pack("<BBBBIQQ", code, ndim, place, 0, 0, offset, nbytes)
        body += struct.pack(f"<{len(shape)}Q", *shape)
    return body + data


def test_zero_size_tensor_with_huge_dimensions_is_a_protocol_error_not_numpy_value_error() -> None:
    for shape in ((0, 2**62), (0, 2**62, 2**62), (2**63, 0), (0, 2**64 - 1), (0,) + (2**40,) * 3):
        with pytest.raises(ProtocolError):
            P.decode_tensors(_tensor_frame([(0, len(shape), 0, 0, 0, shape)]))
    # A modest zero-size tensor is still fine.
    (_, (x,)) = P.decode_tensors(_tensor_frame([(0, 2, 0, 0, 0, (0, 8))]))
    assert x.shape == (0, 8)


def test_json_frames_carry_no_tensors_and_no_infer() -> None:
    """The JSON tensor descriptions (and their dtype strings, which numpy parsed: ``",faot3l"``
    raised SyntaxError) are gone with the JSON infer path: the only tensors travel in the binary
    frame, whose dtypes are one-byte codes. A JSON ``infer``, or a JSON frame with buffers, is a
    ProtocolError."""
    from mlcapsule.enclave import ecalls

    assert not hasattr(P, "unpack_tensors") and "infer" not in ecalls.OPS
    with pytest.raises(ProtocolError):
        ecalls.parse({"op": "infer", "args": {"tensors": [{"name": "x", "dtype": ",faot3l", "shape": [1], "buf": 0}]}})


def test_shared_tensor_declaring_4_tib_allocates_nothing() -> None:
    host = P.SharedArena.create()
    enclave = P.SharedArena.adopt(os.dup(host.fd))
    try:
        host.reserve(1 << 20)
        four_tib = 4 << 40
        for shape, code in (((four_tib // 4,), 0), ((1 << 20, 1 << 20, 4), 7), ((1 << 21, 1 << 21), 0)):
            nbytes = int(np.prod(shape, dtype=object)) * np.dtype(P._T_DTYPES[code]).itemsize
            body = _tensor_frame([(code, len(shape), 1, 0, nbytes, shape)])
            tracemalloc.start()
            try:
                with pytest.raises(ProtocolError):
                    P.decode_tensors(body, enclave, reuse=[])
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert peak < 1 << 20, f"{peak} bytes allocated for a tensor that was refused"
        # An offset past the end of the shared memory, with a small size: refused as well.
        body = _tensor_frame([(0, 1, 1, 2**63, 4, (1,))])
        with pytest.raises(ProtocolError):
            P.decode_tensors(body, enclave)
    finally:
        enclave.close()
        host.close()


_DIMS = st.one_of(st.integers(0, 4), st.sampled_from([0, 1, 2**31, 2**32 + 1, 2**40, 2**62, 2**63, 2**64 - 1]))


@st.composite
def tensor_frames(draw: st.DrawFn) -> bytearray:
    descs = []
    data_len = draw(st.integers(0, 64))
    for _ in range(draw(st.integers(0, 4))):
        shape = tuple(draw(st.lists(_DIMS, max_size=draw(st.sampled_from([0, 1, 2, 3, 17])))))
        code = draw(st.integers(0, 10))
        size = (np.dtype(P._T_DTYPES[code]).itemsize if code < len(P._T_DTYPES) else 4)
        for d in shape:
            size *= d
        nbytes = draw(st.one_of(st.just(size % 2**64), st.integers(0, 2**64 - 1), st.integers(0, 64)))
        offset = draw(st.one_of(st.just(0), st.integers(0, 2**64 - 1), st.integers(0, 64)))
        place = draw(st.sampled_from([0, 0, 1, 2]))
        descs.append((code, draw(st.one_of(st.just(len(shape)), st.integers(0, 255))), place, offset, nbytes, shape))
    body = bytearray()
    try:
        body = _tensor_frame([(c, n, p, o, b, s) for c, n, p, o, b, s in descs if n <= 255], bytes(data_len))
    except struct.error:
        body = _tensor_frame([], bytes(data_len))
    if draw(st.booleans()):  # and a byte or two changed anywhere
        for _ in range(draw(st.integers(1, 2))):
            if body:
                i = draw(st.integers(0, len(body) - 1))
                body[i] = draw(st.integers(0, 255))
    if draw(st.booleans()) and body:
        body = body[:draw(st.integers(0, len(body)))]
    return body


@FIXED
@given(body=tensor_frames(), with_arena=st.booleans())
def test_arbitrary_tensor_frames_raise_only_protocol_error(body: bytearray, with_arena: bool) -> None:
    host = P.SharedArena.create() if with_arena else None
    enclave = P.SharedArena.adopt(os.dup(host.fd)) if host else None
    try:
        if host:
            host.reserve(4096)
        try:
            _, out = P.decode_tensors(body, enclave, reuse=[])
        except ProtocolError:
            return
        for arr in out:
            assert isinstance(arr, np.ndarray) and arr.nbytes <= max(len(body), 1 << 20)
    finally:
        for a in (enclave, host):
            if a:
                a.close()


# -- the worker created the platform folder 0755 -------------------------------------------------------
def _scalar_model() -> Any:
    """y = (x @ W) / temperature, with a 0-d input first: ``(temperature: float[], x: float[N, 8])``."""
    w = (np.arange(32, dtype=np.float32).reshape(8, 4) / 10).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Div", ["xw", "temperature"], ["y"])],
        "scalar_input",
        [helper.make_tensor_value_info("temperature", TensorProto.FLOAT, []),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(w, "W")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), w


@pytest.fixture(scope="module")
def scalar_capsule(tmp_path_factory: pytest.TempPathFactory, provider_key: ProviderKey) -> Any:
    model, w = _scalar_model()
    packed = pack_model(model, tmp_path_factory.mktemp("scalar") / "scalar.capsule", provider_key, tune_runtime=False)
    packed.extra["w"] = w
    return packed


def test_worker_creates_the_platform_folder_owner_only_not_0755(tmp_path: Path, scalar_capsule: Any) -> None:
    import mlcapsule

    platform = tmp_path / "fresh" / "nested" / "platform"
    with mlcapsule.open_capsule(scalar_capsule.path, trust=UnsafeTrustManifestKey(), unsafe_dev_key=scalar_capsule.key_path,
                                state_dir=tmp_path / "state", platform_dir=platform) as cap:
        cap.status()
        for d in (platform, platform.parent, platform.parent.parent, tmp_path / "state"):
            mode = stat.S_IMODE(d.stat().st_mode)
            assert mode == 0o700, f"{d} has mode {mode:o}"


# -- a 0-d input could not go through the public API -------------------------------------------------
def test_scalar_input_goes_through_capsule_run_end_to_end(tmp_path: Path, scalar_capsule: Any) -> None:
    import mlcapsule

    (t_spec, x_spec) = scalar_capsule.manifest.inputs
    assert t_spec.name == "temperature" and list(t_spec.shape) == []
    w = scalar_capsule.extra["w"]
    x = np.arange(5 * 8, dtype=np.float32).reshape(5, 8)
    with mlcapsule.open_capsule(scalar_capsule.path, trust=UnsafeTrustManifestKey(), unsafe_dev_key=scalar_capsule.key_path,
                                state_dir=tmp_path / "state", platform_dir=tmp_path / "platform") as cap:
        for temperature in (np.float32(2.0), np.array(4.0, np.float32), 0.5, np.array(8.0, np.float64)):
            y = cap.run({"temperature": temperature, "x": x})["y"]
            np.testing.assert_allclose(y, (x @ w) / np.float32(temperature), rtol=1e-6)
        # Large enough to travel through shared memory, and a non-contiguous, big-endian x.
        big = np.arange(20_000 * 8, dtype=">f4").reshape(20_000, 8)[::2]
        y = cap.run({"temperature": np.float32(3.0), "x": big})["y"]
        np.testing.assert_allclose(y, (big.astype(np.float32) @ w) / np.float32(3.0), rtol=1e-5)
        # A scalar still must be a scalar.
        with pytest.raises(InputError, match="0 dimensions"):
            cap.run({"temperature": np.array([2.0], np.float32), "x": x})


def test_scalar_tensor_frames_round_trip() -> None:
    arrays = [np.array(2.5, np.float32), np.arange(16, dtype=np.float32).reshape(2, 8), np.array(True)]
    _, out = P.decode_tensors(_frame(P.encode_tensors(P.TENSOR_REQUEST, arrays)))
    for a, b in zip(arrays, out):
        assert b.shape == a.shape and b.dtype == a.dtype
        np.testing.assert_array_equal(a, b)

