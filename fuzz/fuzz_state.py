"""Fuzz the sealed state: the software backend's seal, the state's JSON, the ledger, the defenses' blob.

Input: a mode byte, then
  0: a sealed state file (what is on the client's disk): unsealed by the real software backend;
  1: the plaintext payload (state JSON, then NUL and the defenses' blob): sealed by the harness
     with the backend's key first, so the fuzzer reaches the parsers behind the AEAD;
  2: a defenses' blob alone: ``DefenseState.from_bytes`` under the policy, and
     ``OodStats.from_bytes`` (the OOD statistics the capsule carries, same container).
Then what ``EnclaveCore.load`` does with it, in its order, without the model: ``SealedStore.load``
(``EnclaveState.from_bytes``), the capsule check, ``bind`` (the counters), the receipt key, the
license (``verify_license`` under the provider key), ``Ledger.open``, then a charge, a voucher, a
recorded defense gap, a report and its acknowledgement, the status and a close,
and ``DefenseState.from_bytes`` under the capsule's defense policy as the license tightens it.
Seeds: the state the real enclave core sealed after a setup, three queries, a voucher and a report,
its defenses' blob, and the OOD statistics of the real packer's capsule.
"""

from __future__ import annotations

import atexit
import datetime as dt
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from _common import DATA, context, instrumented, main, ours, split

with instrumented(__name__ == "__main__"):
    from mlcapsule.enclave.backends.software import SoftwareBackend
    from mlcapsule.enclave.crypto.keys import ed25519_public_from_raw
    from mlcapsule.enclave.defenses.ood import OodStats
    from mlcapsule.enclave.defenses.pipeline import DefenseState
    from mlcapsule.enclave.defenses.policy import DefensePolicy, tighten
    from mlcapsule.enclave.ledger import Ledger
    from mlcapsule.enclave.messages import receipts as R
    from mlcapsule.enclave.messages.license import verify_license
    from mlcapsule.enclave.messages.receipts import Ack
    from mlcapsule.enclave.messages.voucher import Voucher
    from mlcapsule.enclave.state import STATE_FILE, SealedStore

_CTX = context()
_WORK = Path(tempfile.mkdtemp(prefix="mlcapsule-fuzz-state-"))
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)  # a replay in pytest; run.py sets TMPDIR
shutil.copytree(DATA / "platform", _WORK / "platform")  # the counters move: never in fuzz/data
_BACKEND = SoftwareBackend(platform_dir=_WORK / "platform")
_CAPSULE_ID, _VERSION = _CTX["capsule_id"], _CTX["version"]
_PROVIDER = ed25519_public_from_raw(bytes.fromhex(_CTX["provider_public"]))
_BASE_POLICY = DefensePolicy.from_specs(["prada:delta=0.9,action=lock", "ood"])
_NOW = dt.datetime(2030, 1, 2, tzinfo=dt.UTC)


def TestOneInput(data: bytes) -> None:  # noqa: N802
    mode, rest = split(data, 3)
    if mode == 2:
        with ours():
            DefenseState.from_bytes(rest, _BASE_POLICY)
        with ours():
            OodStats.from_bytes(rest)
        return
    store = SealedStore(_BACKEND, _WORK, _CAPSULE_ID, _VERSION)
    blob = rest if mode == 0 else _BACKEND.seal(rest, label=store.label)
    (_WORK / STATE_FILE).write_bytes(blob)
    with ours():
        state = store.load()
        if state.capsule_id != _CAPSULE_ID or state.version != _VERSION:
            return
        state = store.bind(state)
        lic = verify_license(state.license, _PROVIDER, capsule_id=uuid.UUID(_CAPSULE_ID), version=_VERSION,
                             receipt_key=state.receipt_key_public())
        policy = tighten(_BASE_POLICY, lic.defenses) if lic.defenses else _BASE_POLICY
        extra = store.loaded_extra
        ledger, _ = Ledger.open(state, store.counters(state))
        with ours():
            ledger.charge(1, _NOW)
        with ours():
            ledger.voucher(Voucher(state.license_id, state.device_id, state.voucher_seq + 1, 10))
        with ours():
            ledger.record("defense-gap", {"queries": 1, "reason": "crash"})
        with ours():
            receipts, _ = ledger.report()
            last = receipts[-1] if receipts and isinstance(receipts[-1], dict) else {}
            seq = last.get("body", {}).get("seq") if isinstance(last.get("body"), dict) else None
            if type(seq) is int:  # an acknowledgement as verify_ack returns them: of the head it was sent
                ledger.ack(Ack(state.license_id, state.device_id, seq, R.entry_hash(last)))
        with ours():
            ledger.status(rollback_protected=False)
        with ours():
            ledger.close()
        if extra:
            DefenseState.from_bytes(extra, policy)


if __name__ == "__main__":
    main(TestOneInput, json_input=True, prefix=1, nul_tail=True)
    sys.exit(0)
