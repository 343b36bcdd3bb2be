"""The ECALL layer (enclave/ecalls.py): typed requests parsed at the boundary, and the state table.

Pure tests drive the table directly; the worker tests check that the real hardened worker
refuses an illegal call and is unchanged by it (``load`` twice, ``setup_finish`` without
``setup_begin``, ``infer`` before ``load``, ``load`` after a setup, a JSON ``infer``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from provider_sim import Provider, b64

from mlcapsule.enclave import ecalls
from mlcapsule.host import EnclaveProcess
from mlcapsule.enclave.errors import NotProvisionedError, ProtocolError

EXAMPLE = {
    ecalls.Hello: ecalls.Hello(), ecalls.Status: ecalls.Status(), ecalls.Load: ecalls.Load(None),
    ecalls.SetupBegin: ecalls.SetupBegin(b"n" * 32), ecalls.SetupFinish: ecalls.SetupFinish(b"p", None),
    ecalls.ApplyVoucher: ecalls.ApplyVoucher({}), ecalls.UsageReport: ecalls.UsageReport(),
    ecalls.UsageAck: ecalls.UsageAck({}), ecalls.Shutdown: ecalls.Shutdown(), ecalls.Infer: ecalls.Infer(),
}


@pytest.mark.parametrize("state", sorted(ecalls.ALLOWED))
def test_every_illegal_transition_is_refused_and_changes_nothing(state: str) -> None:
    for cls, req in EXAMPLE.items():
        m = ecalls.EcallState()
        m.state = state
        if cls in ecalls.ALLOWED[state]:
            m.check(req)
            continue
        with pytest.raises((ProtocolError, NotProvisionedError)):
            m.check(req)
        assert m.state == state


def test_state_table_walks() -> None:
    m = ecalls.EcallState()
    m.done(ecalls.Load(None), {"license": "license"})
    assert m.state == "licensed"
    m.done(ecalls.SetupBegin(b"n" * 32))
    assert m.state == "replacing"  # a deliberate `setup --replace` on a loaded license
    m.done(ecalls.SetupFinish(b"p", None))
    assert m.state == "licensed"
    m = ecalls.EcallState()
    m.done(ecalls.Load("k"), {"license": "unsafe-dev-key"})
    assert m.state == "dev"
    for req in (ecalls.Load(None), ecalls.SetupBegin(b"n" * 32), ecalls.ApplyVoucher({})):
        with pytest.raises(ProtocolError):
            m.check(req)
    m.done(ecalls.Shutdown())
    assert m.state == "closed"
    with pytest.raises(ProtocolError):
        m.check(ecalls.Hello())


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=8)


@settings(max_examples=400, deadline=None)  # derandomized in CI: the "ci" profile, conftest.py
@given(header=st.one_of(_JSON, st.fixed_dictionaries({"op": st.sampled_from([*ecalls.OPS, "infer", "x"]),
                                                      "args": st.dictionaries(
                                                          st.sampled_from(["nonce", "payload", "credential",
                                                                           "voucher", "ack", "dev_key", "seq"]),
                                                          _JSON, max_size=3)})))
def test_arbitrary_request_headers_raise_only_protocol_error(header: Any) -> None:
    try:
        req = ecalls.parse(header)
    except ProtocolError:
        return
    assert type(req) in EXAMPLE


def test_a_huge_base64_argument_is_refused_before_it_is_decoded() -> None:
    with pytest.raises(ProtocolError):
        ecalls.parse({"op": "setup_finish", "args": {"payload": "A" * (8 * ecalls.MAX_BLOB)}})


# -- the real worker ----------------------------------------------------------------------------------
@pytest.fixture()
def provider(tmp_path: Path) -> Provider:
    return Provider(tmp_path / "provider")


def _enclave(tmp_path: Path, cap: Path) -> EnclaveProcess:
    return EnclaveProcess(cap, state_dir=tmp_path / "state", platform_dir=tmp_path / "platform")


def test_worker_refuses_illegal_calls_and_is_unchanged(tmp_path: Path, provider: Provider) -> None:
    cap, ckey = provider.pack()
    x = [np.ones((1, 8), np.float32)]
    with _enclave(tmp_path, cap) as e:
        with pytest.raises(NotProvisionedError):
            e.infer(x)  # before load: what the user must hear is "not set up"
        with pytest.raises(ProtocolError):
            e.call("setup_finish", {"payload": b64(b"x")})  # without setup_begin
        with pytest.raises(ProtocolError):
            e.call("infer", {"tensors": []})  # the JSON infer path is gone
        with pytest.raises(NotProvisionedError):
            e.call("load", {"dev_key": None})  # a call that fails changes nothing either
        nonce = os.urandom(32)
        begin = e.call("setup_begin", {"nonce": b64(nonce)})
        payload, _ = provider.answer(begin, nonce, ckey, budget=10, lease_size=2)
        e.call("setup_finish", {"payload": b64(payload)})
        with pytest.raises(ProtocolError):
            e.call("load", {"dev_key": None})  # load after setup would replace the model unclosed
        assert e.infer(x)[0].shape == (1, 3)  # still licensed and serving
        assert e.call("status")["license_status"]["answered"] == 1
    with _enclave(tmp_path, cap) as e:
        e.call("load", {"dev_key": None})
        with pytest.raises(ProtocolError):
            e.call("load", {"dev_key": None})  # load twice
        assert e.infer(x)[0].shape == (1, 3)


def test_dev_key_enclave_accepts_no_license_calls(tmp_path: Path, provider: Provider) -> None:
    cap, ckey = provider.pack()
    key = provider.root / "tiny.capsule.key"
    with EnclaveProcess(cap, state_dir=tmp_path / "state", platform_dir=tmp_path / "platform", dev_key=key) as e:
        e.call("load", {"dev_key": str(key)})
        for op, args in (("usage_report", {}), ("apply_voucher", {"voucher": {}}), ("setup_begin", {"nonce": b64(b"n" * 32)})):
            with pytest.raises(ProtocolError):
                e.call(op, args)
        assert e.infer([np.ones((2, 8), np.float32)])[0].shape == (2, 3)
