"""Issue 9's budget breaks, as the red team ran them: each test is the attack, and fails on the
code before the fix.

* break 1: keep a copy of the sealed state from before voucher #1; when the budget is spent,
  restore it and redeem voucher #1 again; repeat (on `software` with only `state.sealed`
  restored, on `tpm` with the NV counter untouched, and through the real server, whose books
  must show the rollback);
* break 5: a batch charged as one query because the model's first input is 0-d.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from provider_sim import Provider, b64

from mlcapsule.enclave.backends.software import SoftwareBackend
from mlcapsule.enclave.core import EnclaveCore
from mlcapsule.host import EnclaveProcess
from mlcapsule.enclave.state import STATE_FILE
from mlcapsule.enclave.errors import BudgetExhaustedError, RollbackError
from mlcapsule.enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey  # noqa: F401

from swtpm import swtpm, tpm_ca, tpm_factory, tpm_policy  # noqa: F401  (fixtures)

from _server_support import (db_url, harness, pg_server, pg_url, platform, provider_files,  # noqa: F401
                             serve_in_thread)


@pytest.fixture()
def provider(tmp_path: Path) -> Provider:
    return Provider(tmp_path / "provider")


def _query(e: EnclaveProcess, n: int) -> int:
    return len(e.infer([np.ones((n, 8), np.float32)])[0])


def _drain(e: EnclaveProcess) -> int:
    answered = 0
    while True:
        try:
            answered += _query(e, 1)
        except BudgetExhaustedError:
            return answered


def _voucher_replay_attack(open_enclave: Any, set_up: Any, provider: Provider, state: Path, *,
                           budget: int, voucher: int, cycles: int) -> tuple[int, int, list[str]]:
    """The red team's loop. Returns (answered, paid for, what each replay got)."""
    with open_enclave() as e:
        lic = set_up(e, budget=budget)
        answered = _drain(e)
    snapshot = (state / STATE_FILE).read_bytes()  # budget spent, before voucher #1
    paid = budget + voucher
    with open_enclave() as e:
        e.call("load", {"dev_key": None})
        e.call("apply_voucher", {"voucher": provider.voucher(lic, 1, voucher)})
        answered += _drain(e)
    outcomes = []
    for _ in range(cycles):
        (state / STATE_FILE).write_bytes(snapshot)  # the attack: the state from before voucher #1
        with open_enclave() as e:
            e.call("load", {"dev_key": None})
            try:
                e.call("apply_voucher", {"voucher": provider.voucher(lic, 1, voucher)})
                outcomes.append("accepted")
            except RollbackError as err:
                outcomes.append(err.message)
            answered += _drain(e)
    return answered, paid, outcomes


def test_voucher_redeemed_again_after_restoring_the_state_is_refused(tmp_path, provider):
    """Measured before the fix on `software` (only state.sealed restored): 520 answered against
    120 paid for. The voucher counter refuses the voucher to every restored state."""
    cap, ckey = provider.pack()
    state, plat = tmp_path / "state", tmp_path / "platform"

    def open_enclave() -> EnclaveProcess:
        return EnclaveProcess(cap, state_dir=state, platform_dir=plat)

    def set_up(e: EnclaveProcess, budget: int) -> dict[str, Any]:
        nonce = os.urandom(32)
        begin = e.call("setup_begin", {"nonce": b64(nonce)})
        payload, lic = provider.answer(begin, nonce, ckey, budget=budget, lease_size=10)
        e.call("setup_finish", {"payload": b64(payload)})
        return lic

    answered, paid, outcomes = _voucher_replay_attack(open_enclave, set_up, provider, state,
                                                      budget=20, voucher=100, cycles=3)
    assert outcomes == ["voucher 1 was already redeemed on this device"] * 3
    assert answered <= paid, (answered, paid)
    # The next voucher in order still works for the restored state: nothing honest is lost.
    with open_enclave() as e:
        e.call("load", {"dev_key": None})
        status = e.call("status")["license_status"]
        assert status["rollbacks_detected"] >= 1 and status["vouchers_redeemed"] == 1


@pytest.mark.tpm
def test_voucher_replay_after_state_rollback_is_refused_on_tpm(tmp_path, provider, swtpm, tpm_policy):  # noqa: F811
    """Measured before the fix on `tpm`, the NV counter never restored: 420 answered against 120
    paid for."""
    from test_tpm_enclave import set_up as tpm_set_up
    from test_tpm_enclave import tpm_enclave

    cap, ckey = provider.pack()
    state = tmp_path / "state"

    def set_up(e: EnclaveProcess, budget: int) -> dict[str, Any]:
        captured: dict[str, Any] = {}
        real_answer = provider.answer

        def answer(begin: dict[str, Any], nonce: bytes, ck: Any, **kw: Any) -> tuple[bytes, dict[str, Any]]:
            payload, lic = real_answer(begin, nonce, ck, **kw)
            captured["lic"] = lic
            return payload, lic

        provider.answer = answer  # type: ignore[method-assign]
        try:
            tpm_set_up(e, provider, ckey, tpm_policy, budget=budget, lease_size=10)
        finally:
            provider.answer = real_answer  # type: ignore[method-assign]
        return captured["lic"]

    answered, paid, outcomes = _voucher_replay_attack(lambda: tpm_enclave(cap, state, swtpm), set_up, provider,
                                                      state, budget=20, voucher=100, cycles=3)
    assert outcomes == ["voucher 1 was already redeemed on this device"] * 3
    assert answered <= paid, (answered, paid)


def test_rollback_and_voucher_replay_are_seen_by_the_provider_through_the_real_server(
        tmp_path, provider_files, platform, db_url):  # noqa: F811
    """Through the real server: the restored state's receipts reach the provider, whose books
    (`admin usage`) count the rollback, also when the client had synced in between (the chain
    then forks from the one the server holds, and the fork is recorded, not refused)."""
    import mlcapsule
    from mlcapsule.enclave.messages.voucher import verify_voucher  # noqa: F401  (the real voucher path)

    with harness(db_url, provider_files, platform, budget=60) as h, serve_in_thread(h.app) as url:
        state = tmp_path / "state"

        def open_capsule() -> Any:
            return mlcapsule.open_capsule(provider_files.capsule_path, trust=UnsafeTrustManifestKey(), state_dir=state, platform_dir=platform.dir)

        x = np.ones((1, 4), np.float32)
        with open_capsule() as cap:
            cap.setup(token=h.token, server=url)
            for _ in range(30):
                cap.predict(x)
        lic = h.service.usage()[0]["license_id"]
        snapshot = (state / STATE_FILE).read_bytes()
        voucher = h.service.issue_voucher(lic, 100)
        with open_capsule() as cap:
            cap.topup(voucher)
            for _ in range(60):
                cap.predict(x)
            cap.sync(token=h.token, server=url)
        (state / STATE_FILE).write_bytes(snapshot)  # the attack, after a sync
        with open_capsule() as cap:
            with pytest.raises(RollbackError):
                cap.topup(voucher)
            answered_after = 0
            while True:
                try:
                    cap.predict(x)
                    answered_after += 1
                except BudgetExhaustedError:
                    break
            cap.sync(token=h.token, server=url)
        row = h.service.usage()[0]
        assert row["rollbacks"] == 1 and row["forks"] == 1, row
        assert 30 + 60 + answered_after <= 60 + 100
        # And in the provider's table.
        from click.testing import CliRunner

        from mlcapsule.cli.main import cli

        out = CliRunner().invoke(cli, ["admin", "usage", "--json", "--database-url", db_url])
        assert out.exit_code == 0, out.output
        assert '"rollbacks": 1' in out.output


# -- break 5: the batch size ------------------------------------------------------------------------
def _two_input_model(first_rank: int) -> Any:
    """``temperature`` (of rank ``first_rank``) first, then ``input[N, 8]``: y = softmax(x W / t)."""
    w = numpy_helper.from_array(np.eye(8, 3, dtype=np.float32), "W")
    t_shape: list[Any] = {0: [], 1: ["N"], 2: ["N", 1]}[first_rank]
    nodes = [helper.make_node("MatMul", ["input", "W"], ["logits"])]
    if first_rank == 2:
        nodes.append(helper.make_node("Div", ["logits", "temperature"], ["scaled"]))
    elif first_rank == 1:
        nodes += [helper.make_node("Unsqueeze", ["temperature", "axes"], ["t2"]),
                  helper.make_node("Div", ["logits", "t2"], ["scaled"])]
    else:
        nodes.append(helper.make_node("Div", ["logits", "temperature"], ["scaled"]))
    nodes.append(helper.make_node("Softmax", ["scaled"], ["probabilities"], axis=1))
    inits = [w] + ([numpy_helper.from_array(np.array([1], np.int64), "axes")] if first_rank == 1 else [])
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("temperature", TensorProto.FLOAT, t_shape),
                                         helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 8])],
                          [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])], inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def _licensed_core(tmp_path: Path, provider: Provider, name: str, model: Any, *, budget: int,
                   lease: int) -> EnclaveCore:
    """An in-process enclave core with ``model`` packed and licensed by ``provider``."""
    cap, ckey = provider.pack(name=name, model=model)
    run = tmp_path / "run"
    run.mkdir()
    core = EnclaveCore(SoftwareBackend(tmp_path / "platform"), cap, tmp_path / "state", run)
    nonce = os.urandom(32)
    begin = core.setup_begin(nonce=nonce)
    payload, _ = provider.answer(begin, nonce, ckey, budget=budget, lease_size=lease)
    core.setup_finish(payload=payload)
    return core


@pytest.mark.parametrize("first_rank", [0, 1, 2])
def test_batch_behind_a_0d_first_input_is_charged_every_row(tmp_path, provider, first_rank):
    """Measured before the fix: a batch of 5,000 rows behind a 0-d first input was charged 1 query."""
    core = _licensed_core(tmp_path, provider, f"two{first_rank}", _two_input_model(first_rank), budget=100, lease=10)

    def feeds(n: int) -> dict[str, np.ndarray]:
        t = {0: np.array(2.0, np.float32), 1: np.full((n,), 2.0, np.float32),
             2: np.full((n, 1), 2.0, np.float32)}[first_rank]
        return {"temperature": t, "input": np.ones((n, 8), np.float32)}

    with pytest.raises(BudgetExhaustedError):
        core.infer(feeds(5000))
    out = core.infer(feeds(30))
    assert out["probabilities"].shape == (30, 3)
    status = core._license_status()
    assert status["answered"] == 30 and status["charged"] == 30
    core.close()


def test_model_with_only_0d_inputs_is_charged_one_query_per_call(tmp_path, provider):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [])
    g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["y"])], "scalar", [x], [y],
                          [numpy_helper.from_array(np.array(2.0, np.float32), "two")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    core = _licensed_core(tmp_path, provider, "scalar", model, budget=3, lease=1)
    for _ in range(3):
        assert float(core.infer({"x": np.array(1.5, np.float32)})["y"]) == 3.0
    with pytest.raises(BudgetExhaustedError):
        core.infer({"x": np.array(1.5, np.float32)})
    core.close()
