"""The enclave on the tpm backend: setup with credential activation, offline predictions, and a
budget that restoring old sealed state cannot refill.

The provider is simulated in memory (tests/provider_sim.py) and answers exactly as the server
does for tpm evidence: it verifies the evidence (mlcapsule.attestation.tpm), then gates the HPKE
payload on credential activation (``credential_challenge``). The enclave is the real hardened
worker process talking to a private swtpm, except in the stateful test, which runs the enclave
core in-process for speed (same backend, same TPM).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from provider_sim import Provider, b64
from swtpm import other_swtpm, swtpm, tpm_ca, tpm_factory, tpm_policy  # noqa: F401  (fixtures)

from mlcapsule.enclave._util import b64d
from mlcapsule.attestation import AttestationPolicy
from mlcapsule.attestation.tpm import credential_challenge, verify_tpm
from mlcapsule.host import EnclaveProcess
from mlcapsule.enclave.state import STATE_FILE
from mlcapsule.enclave.errors import BudgetExhaustedError, IntegrityError
from mlcapsule.enclave.messages.setup import report_data
from mlcapsule.enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey  # noqa: F401

pytestmark = pytest.mark.tpm


@pytest.fixture()
def provider(tmp_path: Path) -> Provider:
    return Provider(tmp_path / "provider")


def tpm_enclave(cap: Path, state: Path, tpm: Any) -> EnclaveProcess:
    return EnclaveProcess(cap, state_dir=state, backend="tpm", tcti=tpm.tcti)


def provider_answer(begin: dict[str, Any], nonce: bytes, provider: Provider, ckey: Any, tp: Any,
                    **license_kw: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """What the server does with tpm evidence: verify it, then gate the payload on activation."""
    rd = report_data(nonce, b64d(begin["hpke_pub"]), b64d(begin["receipt_pub"]))
    ev = begin["evidence"]
    verify_tpm(ev, expected_report_data=rd, policy=AttestationPolicy(measurements={ev["measurement"]}), tpm_policy=tp)
    payload, lic = provider.answer(begin, nonce, ckey, **license_kw)
    return credential_challenge(ev, payload), lic


def set_up(e: EnclaveProcess, provider: Provider, ckey: Any, tp: Any, **kw: Any) -> dict[str, Any]:
    nonce = os.urandom(32)
    begin = e.call("setup_begin", {"nonce": b64(nonce)})
    answer, _ = provider_answer(begin, nonce, provider, ckey, tp, **kw)
    return e.call("setup_finish", {"payload": answer["payload"], "credential": answer["credential"]})


def query(e: EnclaveProcess, n: int = 1) -> np.ndarray:
    return e.infer([np.ones((n, 8), np.float32)])[0]


def counter_name(cap: Path) -> str:
    from mlcapsule.enclave.format.container import CapsuleFile

    with CapsuleFile(cap, trust=UnsafeTrustManifestKey()) as cf:
        return f"c-{cf.manifest.capsule_id}-v{cf.manifest.version}"


def snapshot(state: Path, dest: Path) -> None:
    shutil.copytree(state, dest, ignore=shutil.ignore_patterns("run-*"))


def restore(src: Path, state: Path) -> None:
    shutil.rmtree(state)
    shutil.copytree(src, state)


# -- setup and offline use ------------------------------------------------------------------------
def test_setup_with_the_tpm_backend_then_offline_predictions(tmp_path, provider, swtpm, tpm_policy) -> None:  # noqa: F811
    cap, ckey = provider.pack()
    state = tmp_path / "state"
    with tpm_enclave(cap, state, swtpm) as e:
        assert e.info["backend"] == "tpm"
        info = set_up(e, provider, ckey, tpm_policy, budget=10, lease_size=4)
        assert info["budget"] == 10 and info["rollback_protected"] is False  # swtpm: honest about itself
        assert query(e, 2).shape == (2, 3)
        hardening = e.call("status")["hardening"]
    assert hardening["seccomp"].startswith("enforced")  # the TPM was used after sockets were denied
    with tpm_enclave(cap, state, swtpm) as e:  # offline: a new worker, no provider
        e.call("load", {"dev_key": None})
        s = e.call("status")["license_status"]
        assert s["charged"] == 4 and s["answered"] == 2  # the clean close kept the rest of the lease
        assert query(e, 3).shape == (3, 3)
        assert e.call("status")["license_status"]["charged"] == 8
    # The sealed state names this TPM: the software backend, or another TPM, cannot open it.
    with EnclaveProcess(cap, state_dir=state, platform_dir=tmp_path / "platform") as e:
        with pytest.raises(IntegrityError):
            e.call("load", {"dev_key": None})


def test_setup_against_the_real_server_then_offline_predictions(tmp_path, provider, swtpm, tpm_policy,  # noqa: F811
                                                                 cli) -> None:
    """`setup --backend tpm` through the client API against the provider server (uvicorn), which
    verifies the quote and EK chain and gates the payload on credential activation; then offline
    predictions in new enclave processes, which find the backend the setup used."""
    pytest.importorskip("fastapi")
    from _server_support import serve_in_thread

    import mlcapsule
    from mlcapsule.enclave.crypto.keys import raw_public
    from mlcapsule.enclave.format.container import CapsuleFile
    from mlcapsule.enclave.format.manifest import Policy
    from mlcapsule.server.app import create_app
    from mlcapsule.server.settings import ServerSettings

    cap, _ = provider.pack(policy=Policy(lease_size=2))
    with CapsuleFile(cap, trust=UnsafeTrustManifestKey()) as cf:
        capsule_id = str(cf.manifest.capsule_id)
    state = tmp_path / "state"
    with mlcapsule.open_capsule(cap, trust=UnsafeTrustManifestKey(), state_dir=state, backend="tpm", tcti=swtpm.tcti) as c:
        # The server allows exactly the measurement this enclave reports (`mlcapsule status` shows it).
        settings = ServerSettings(database_url=f"sqlite:///{tmp_path / 'server.db'}",
                                  provider_key_path=provider.key_path, allow_software_evidence=False,
                                  allowed_measurements=frozenset([c.status()["measurement"]]))
        app = create_app(settings, tpm_policy=tpm_policy)
        svc = app.state.service
        _, token = svc.add_account("alice")
        svc.register_capsule(cap, cap.with_name(cap.name + ".key"),
                             provider_public=raw_public(provider.key.public_key()))
        svc.grant("alice", capsule_id, budget=6, devices=1, expires=None)
        try:
            with serve_in_thread(app) as url:
                info = c.setup(token=token, server=url)
            assert info["budget"] == 6
            [device] = svc.usage()
            assert device["evidence"] == "tpm"
        finally:
            app.state.engine.dispose()
    with mlcapsule.open_capsule(cap, trust=UnsafeTrustManifestKey(), state_dir=state) as c:  # offline; backend and TCTI remembered
        assert c.backend == "tpm" and c.is_set_up
        assert c.predict(np.ones((4, 8), np.float32)).shape == (4, 3)
    r = cli("status", cap, "--state-dir", state, "--json")
    assert r.code == 0, r.err
    st_ = json.loads(r.out)
    assert st_["backend"] == "tpm" and st_["license_status"]["answered"] == 4
    with mlcapsule.open_capsule(cap, trust=UnsafeTrustManifestKey(), state_dir=state) as c:
        assert c.predict(np.ones((2, 8), np.float32)).shape == (2, 3)
        with pytest.raises(BudgetExhaustedError):
            c.predict(np.ones((1, 8), np.float32))


def test_setup_refused_when_the_ak_is_not_bound_to_the_certified_ek(tmp_path, provider, swtpm, other_swtpm,  # noqa: F811
                                                                    tpm_policy) -> None:  # noqa: F811
    """A client presenting another (genuine) TPM's EK gets a payload its own TPM cannot activate."""
    with other_swtpm.backend() as b:
        ek_b = b.evidence(bytes(32))
    cap, ckey = provider.pack()
    state = tmp_path / "state"
    with tpm_enclave(cap, state, swtpm) as e:
        nonce = os.urandom(32)
        begin = e.call("setup_begin", {"nonce": b64(nonce)})
        begin["evidence"] = {**begin["evidence"], "ek_public": ek_b["ek_public"],
                             "ek_certificate": ek_b["ek_certificate"]}
        answer, _ = provider_answer(begin, nonce, provider, ckey, tpm_policy)  # the evidence checks pass
        with pytest.raises(IntegrityError, match="not bound to this TPM's endorsement key"):
            e.call("setup_finish", {"payload": answer["payload"], "credential": answer["credential"]})
        # Without the credential the wrapped payload is not an HPKE message for the enclave either.
        e.call("setup_begin", {"nonce": b64(nonce)})
        with pytest.raises(IntegrityError):
            e.call("setup_finish", {"payload": answer["payload"]})
    assert not (state / STATE_FILE).exists()


# -- rollback -------------------------------------------------------------------------------------
def test_budget_rollback_by_restoring_sealed_state(tmp_path, provider, swtpm, tpm_policy) -> None:  # noqa: F811
    """Copy the sealed state, spend queries, restore the copy: the enclave charges the lost leases,
    and never answers more queries in total than the budget."""
    budget, lease = 12, 4
    cap, ckey = provider.pack()
    state = tmp_path / "state"
    with tpm_enclave(cap, state, swtpm) as e:
        set_up(e, provider, ckey, tpm_policy, budget=budget, lease_size=lease)
    snapshot(state, tmp_path / "snap")
    answered = 0
    with tpm_enclave(cap, state, swtpm) as e:
        e.call("load", {"dev_key": None})
        for _ in range(8):
            answered += len(query(e, 1))
    restore(tmp_path / "snap", state)  # the attack: the state as it was right after setup
    with tpm_enclave(cap, state, swtpm) as e:
        e.call("load", {"dev_key": None})
        s = e.call("status")["license_status"]
        assert s["rollbacks_detected"] == 1
        assert s["charged"] == 8  # both leases spent after the snapshot are charged again
        while True:
            try:
                answered += len(query(e, 1))
            except BudgetExhaustedError:
                break
    assert answered == budget  # not one query more than the budget (and, here, none lost)
    # Restoring the same copy again does not help either.
    restore(tmp_path / "snap", state)
    with tpm_enclave(cap, state, swtpm) as e:
        e.call("load", {"dev_key": None})
        with pytest.raises(BudgetExhaustedError):
            query(e, 1)


def test_restoring_the_swtpm_state_file_as_well_is_not_detected(tmp_path, provider, swtpm, tpm_policy) -> None:  # noqa: F811
    """Documented limitation: swtpm keeps its NV in a file; whoever restores that file together with
    the sealed state rolls the counter back too. A hardware TPM's NV cannot be copied back."""
    cap, ckey = provider.pack()
    state = tmp_path / "state"
    with tpm_enclave(cap, state, swtpm) as e:
        set_up(e, provider, ckey, tpm_policy, budget=4, lease_size=2)
    swtpm.stop()
    snapshot(state, tmp_path / "snap")
    shutil.copytree(swtpm.state_dir, tmp_path / "snap-tpm")
    swtpm.start()
    with tpm_enclave(cap, state, swtpm) as e:
        e.call("load", {"dev_key": None})
        query(e, 4)
    swtpm.stop()
    restore(tmp_path / "snap", state)
    shutil.rmtree(swtpm.state_dir)
    shutil.copytree(tmp_path / "snap-tpm", swtpm.state_dir)
    swtpm.start()
    with tpm_enclave(cap, state, swtpm) as e:
        e.call("load", {"dev_key": None})
        assert query(e, 4).shape == (4, 3)  # the attack works against an emulated TPM


def test_rollback_over_a_batch_larger_than_a_lease_is_charged_in_full(tmp_path, provider, swtpm,  # noqa: F811
                                                                     tpm_policy) -> None:  # noqa: F811
    budget, lease = 12, 3
    cap, ckey = provider.pack()
    state = tmp_path / "state"
    with tpm_enclave(cap, state, swtpm) as e:
        set_up(e, provider, ckey, tpm_policy, budget=budget, lease_size=lease)
    snapshot(state, tmp_path / "snap")
    with tpm_enclave(cap, state, swtpm) as e:
        e.call("load", {"dev_key": None})
        answered = len(query(e, 6))  # one persist, two leases
    restore(tmp_path / "snap", state)
    with tpm_enclave(cap, state, swtpm) as e:
        e.call("load", {"dev_key": None})
        while True:
            try:
                answered += len(query(e, 1))
            except BudgetExhaustedError:
                break
    assert answered <= budget


# -- NV wear --------------------------------------------------------------------------------------
def test_nv_increments_at_most_one_per_lease_plus_restarts(tmp_path, provider, swtpm, tpm_policy) -> None:  # noqa: F811
    lease, restarts, per_run = 5, 3, 9
    cap, ckey = provider.pack()
    state = tmp_path / "state"
    with tpm_enclave(cap, state, swtpm) as e:
        set_up(e, provider, ckey, tpm_policy, budget=None, lease_size=lease)
    before = swtpm.counter_value(counter_name(cap))
    queries = 0
    for _ in range(restarts):
        with tpm_enclave(cap, state, swtpm) as e:
            e.call("load", {"dev_key": None})
            for _ in range(per_run):
                queries += len(query(e, 1))
    increments = swtpm.counter_value(counter_name(cap)) - before
    with tpm_enclave(cap, state, swtpm) as e:
        e.call("load", {"dev_key": None})
        charged = e.call("status")["license_status"]["charged"]
    assert increments <= math.ceil(queries / lease) + restarts, (increments, queries)
    # Exactly one per lease charged, plus one per later run that spends the rest of a lease
    # kept at the previous clean close (9 is not a multiple of 5: each run leaves a rest).
    assert increments == charged // lease + (restarts - 1)
    print(f"\nNV increments: {increments} for {queries} queries, lease {lease}: "
          f"{increments / queries:.3f} per query (bound 1/N + restarts/queries = "
          f"{1 / lease + restarts / queries:.3f})")


# -- random schedules of queries, crashes, restarts and restores -----------------------------------
class _PowerCut(Exception):
    """The machine stops between writing the sealed state and incrementing the NV counter."""


class _CuttingBackend:
    """The real tpm backend, except that the next counter increment can be made to 'crash'."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.cut_next = inner, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def counter_increment(self, name: str) -> int:
        if self.cut_next:
            self.cut_next = False
            raise _PowerCut()
        return self.inner.counter_increment(name)


BUDGET, LEASE = 7, 3


def test_rollback_stateful(tmp_path, provider, swtpm, tpm_policy) -> None:  # noqa: F811
    """Hypothesis: whatever the schedule of queries, crashes (also between the state write and the
    NV increment), restarts and restores of ANY earlier sealed state, the enclave answers at most
    the budget in total; without restores, a crash loses at most the rest of a lease (or the batch
    it cut short)."""
    from mlcapsule.enclave.backends.tpm import TpmBackend
    from mlcapsule.enclave.core import EnclaveCore

    cap, ckey = provider.pack()
    seen = {"rollbacks": 0, "power_cuts": 0}

    class Machine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.dir = Path(tempfile.mkdtemp(dir=tmp_path))
            self.state = self.dir / "state"
            self.state.mkdir()
            self.backend = _CuttingBackend(TpmBackend(swtpm.tcti))
            self.core: Any = self._core()
            nonce = os.urandom(32)
            begin = self.core.setup_begin(nonce=nonce)
            answer, _ = provider_answer(begin, nonce, provider, ckey, tpm_policy, budget=BUDGET, lease_size=LEASE)
            self.core.setup_finish(payload=self.backend.activate_payload(answer["credential"], b64d(answer["payload"])))
            self.answered = 0
            self.slack = 0  # queries paid for that crashes may forget: the rest of a lease, or a cut batch
            self.restored = False
            self.snapshots = [(self.state / STATE_FILE).read_bytes()]

        def _core(self) -> Any:
            run = self.dir / "run"
            run.mkdir(exist_ok=True)
            self.backend.inner._state_key = None  # a new process: the state key is unsealed again
            return EnclaveCore(self.backend, cap, self.state, run)  # type: ignore[arg-type]

        @precondition(lambda self: self.core is not None)
        @rule(n=st.integers(1, 2 * LEASE + 1), cut=st.booleans())  # batches larger than a lease too
        def query(self, n: int, cut: bool) -> None:
            self.backend.cut_next = cut
            try:
                out = self.core.infer({"input": np.ones((n, 8), np.float32)})
            except BudgetExhaustedError:
                return
            except _PowerCut:  # the state was written, the counter not incremented: the machine is off
                self.core, self.slack = None, self.slack + (LEASE - 1) + n + (LEASE - 1)
                seen["power_cuts"] += 1
                return
            finally:
                self.backend.cut_next = False
            self.answered += len(out["probabilities"])

        @precondition(lambda self: self.core is not None)
        @rule()
        def crash(self) -> None:
            self.core, self.slack = None, self.slack + LEASE - 1

        @precondition(lambda self: self.core is None)
        @rule()
        def restart(self) -> None:
            core = self._core()
            core.load(dev_key=None)
            self.core = core
            seen["rollbacks"] += core.state.rollbacks_detected > 0

        @rule()
        def copy_state(self) -> None:
            self.snapshots.append((self.state / STATE_FILE).read_bytes())

        @rule(data=st.data())
        def restore_any_earlier_state(self, data: st.DataObject) -> None:
            blob = data.draw(st.sampled_from(self.snapshots))
            (self.state / STATE_FILE).write_bytes(blob)
            self.core, self.restored = None, True

        @invariant()
        def never_more_than_the_budget(self) -> None:
            assert self.answered <= BUDGET

        @invariant()
        def charged_never_falls_below_what_was_answered(self) -> None:
            """Whatever state was restored, the enclave counts as charged every query it ever answered."""
            if self.core is not None:
                assert self.core.state.charged >= self.answered

        @invariant()
        def paid_queries_are_not_lost_beyond_a_lease_per_crash(self) -> None:
            if self.core is None or self.restored:
                return
            s = self.core._license_status()
            assert s["charged"] <= BUDGET
            assert s["charged"] - self.answered <= self.slack + LEASE - 1

        def teardown(self) -> None:
            self.backend.inner.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    # The "ci" hypothesis profile (tests/conftest.py) derandomizes: the same schedules on every run,
    # so CI is stable (the coverage check below too).
    run_state_machine_as_test(Machine, settings=settings(max_examples=30, stateful_step_count=16, deadline=None,
                                                         suppress_health_check=list(HealthCheck)))
    assert seen["rollbacks"] and seen["power_cuts"], seen  # the schedules did exercise both paths
