"""The tpm backend on swtpm: sealing bound to the TPM and its PCRs, the NV counter, handle hygiene."""

from __future__ import annotations

import pytest
from swtpm import other_swtpm, require_swtpm, swtpm, tpm_ca, tpm_factory  # noqa: F401  (fixtures)

from mlcapsule.enclave.errors import EnclaveError, IntegrityError, UsageError

pytestmark = pytest.mark.tpm

LABEL = b"mlcapsule-state/v1\0capsule\x001"


def _transient_and_sessions(t) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    from tpm2_pytss.constants import TPM2_CAP, TPM2_HC

    def count(first: int, last: int) -> int:
        _, cap = ctx.get_capability(TPM2_CAP.HANDLES, first, 64)  # keep `cap` alive: it owns the list
        return sum(1 for h in cap.data.handles if first <= int(h) <= last)

    with t.esapi() as ctx:
        return (count(TPM2_HC.TRANSIENT_FIRST, TPM2_HC.TRANSIENT_LAST),
                count(TPM2_HC.LOADED_SESSION_FIRST, TPM2_HC.LOADED_SESSION_LAST))


def test_parse_tcti() -> None:
    require_swtpm()
    from mlcapsule.enclave.backends.tpm import parse_tcti

    assert parse_tcti("device:/dev/tpmrm0") == ("device", {"path": "/dev/tpmrm0"})
    assert parse_tcti("device:") == ("device", {"path": "/dev/tpmrm0"})
    assert parse_tcti("swtpm:path=/run/x.sock") == ("swtpm", {"path": "/run/x.sock"})
    assert parse_tcti("swtpm:port=2400") == ("swtpm", {"port": "2400", "host": "127.0.0.1"})
    for bad in ("mssim:host=x", "swtpm:hots=x", "tabrmd"):
        with pytest.raises(UsageError):
            parse_tcti(bad)


def test_unreachable_tpm_is_a_clear_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    require_swtpm()
    from mlcapsule.enclave.backends.tpm import TpmBackend

    with pytest.raises(EnclaveError, match="cannot open the TPM"):
        TpmBackend(f"swtpm:path={tmp_path}/nothing.sock")
    with pytest.raises(EnclaveError, match="cannot open the TPM"):
        TpmBackend(f"device:{tmp_path}/tpmrm9")


def test_seal_roundtrip_reuses_one_sealed_key_and_flushes_every_handle(swtpm) -> None:  # noqa: F811
    from tpm2_pytss.constants import TPM2_CC

    with swtpm.backend() as b:
        blob1 = b.seal(b"state one", label=LABEL)
        blob2 = b.seal(b"state two", label=LABEL)
        assert b.transport.commands[int(TPM2_CC.Create)] == 1  # one TPM-sealed key, not one per lease
        assert blob1 != blob2 and b"state" not in blob1
    with swtpm.backend() as b:  # a new process: the key is unsealed by the TPM
        assert b.unseal(blob1, label=LABEL) == b"state one"
        assert b.unseal(blob2, label=LABEL) == b"state two"
        assert b.transport.commands[int(TPM2_CC.Unseal)] == 1
        b.seal(b"state three", label=LABEL)
        assert b.transport.commands[int(TPM2_CC.Create)] == 0  # reuses the unsealed key
        with pytest.raises(IntegrityError):
            b.unseal(blob1, label=b"another label")
        b.evidence(bytes(32))
        b.counter_increment("c-x")
    assert _transient_and_sessions(swtpm) == (0, 0)


def test_sealed_state_does_not_open_on_another_tpm(swtpm, other_swtpm) -> None:  # noqa: F811
    with swtpm.backend() as a:
        blob = a.seal(b"secret state", label=LABEL)
    with other_swtpm.backend() as b, pytest.raises(IntegrityError, match="cannot be opened by this TPM"):
        b.unseal(blob, label=LABEL)
    with swtpm.backend() as a:
        assert a.unseal(blob, label=LABEL) == b"secret state"


def test_sealed_state_under_a_pcr_policy_does_not_open_after_a_pcr_extend(swtpm) -> None:  # noqa: F811
    with swtpm.backend(seal_pcrs="sha256:7,16") as b:
        blob = b.seal(b"secret state", label=LABEL)
    with swtpm.backend() as b:  # the policy travels with the blob
        assert b.unseal(blob, label=LABEL) == b"secret state"
    swtpm.extend_pcr(7, b"another boot loader")
    with swtpm.backend() as b, pytest.raises(IntegrityError, match="cannot be opened by this TPM"):
        b.unseal(blob, label=LABEL)
    assert _transient_and_sessions(swtpm) == (0, 0)
    swtpm.reboot()  # PCRs back to their boot values: the state opens again
    with swtpm.backend() as b:
        assert b.unseal(blob, label=LABEL) == b"secret state"


def test_the_license_can_choose_the_seal_pcrs(swtpm) -> None:  # noqa: F811
    with swtpm.backend() as b:
        b.configure_from_license({"tpm": {"seal_pcrs": "sha256:7"}})
        blob = b.seal(b"secret state", label=LABEL)
        b.configure_from_license({"defenses": {}})  # no tpm policy: nothing changes
        assert b.seal_pcrs == "sha256:7"
        with pytest.raises(UsageError):
            b.configure_from_license({"tpm": {"seal_pcrs": 7}})
    swtpm.extend_pcr(7)
    with swtpm.backend() as b, pytest.raises(IntegrityError):
        b.unseal(blob, label=LABEL)


def test_sealed_state_without_a_pcr_policy_survives_pcr_changes_and_reboots(swtpm) -> None:  # noqa: F811
    with swtpm.backend() as b:
        blob = b.seal(b"secret state", label=LABEL)
    swtpm.extend_pcr(7)
    swtpm.reboot()
    with swtpm.backend() as b:
        assert b.unseal(blob, label=LABEL) == b"secret state"


@pytest.mark.parametrize("where", [0, 12, 40, -40, -1])
def test_tampered_sealed_blob_refused(swtpm, where) -> None:  # noqa: F811
    with swtpm.backend() as b:
        blob = bytearray(b.seal(b"secret state", label=LABEL))
        blob[where] ^= 1
    with swtpm.backend() as b, pytest.raises(IntegrityError):
        b.unseal(bytes(blob), label=LABEL)


def test_nv_counter_is_monotonic_and_survives_a_power_cut(swtpm) -> None:  # noqa: F811
    with swtpm.backend() as b:
        first = b.counter_read("c-test")
        assert first >= 1 and b.counter_read("c-test") == first  # reading writes nothing
        assert b.counter_increment("c-test") == first + 1
        assert b.counter_increment("c-test") == first + 2
        assert b.nv_increments == 3  # the first use initialises (one write), then one per increment
    swtpm.reboot()
    with swtpm.backend() as b:
        assert b.counter_read("c-test") == first + 2


def test_deleting_the_counter_does_not_reset_it(swtpm) -> None:  # noqa: F811
    """The owner (empty owner auth) can delete the NV index; a new one starts above the old value."""
    with swtpm.backend() as b:
        for _ in range(5):
            value = b.counter_increment("c-test")
    swtpm.undefine_counter("c-test")
    assert swtpm.counter_value("c-test") is None
    with swtpm.backend() as b:
        assert b.counter_read("c-test") > value


def test_a_foreign_nv_index_is_not_taken_for_the_counter(swtpm) -> None:  # noqa: F811
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_NV
    from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    from mlcapsule.enclave.backends.tpm import nv_index_for

    with swtpm.esapi() as ctx:  # an ordinary index, whose contents its owner could set at will
        info = TPM2B_NV_PUBLIC(TPMS_NV_PUBLIC(nvIndex=nv_index_for("c-test"), nameAlg=TPM2_ALG.SHA256,
                                              attributes=TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD, dataSize=8))
        ctx.tr_close(ctx.nv_define_space(b"", info, ESYS_TR.OWNER))
    with swtpm.backend() as b, pytest.raises(EnclaveError, match="not mlcapsule's counter"):
        b.counter_read("c-test")


def test_threat_model_is_honest_about_swtpm(swtpm) -> None:  # noqa: F811
    with swtpm.backend() as b:
        tm = b.threat_model
        assert b.name == "tpm" and tm.rollback_protected is False
        assert any("swtpm" in s for s in tm.does_not_protect_against)
        assert any("root" in s for s in tm.does_not_protect_against)
        assert any("rollback" in s or "old copy" in s for s in tm.protects_against)
