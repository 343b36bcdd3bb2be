"""Evidence from hardware TEEs (``sgx``, ``tdx``, ``snp``, ``nitro``) behind the one verifier interface.

Each function here has the signature of a :class:`~mlcapsule.attestation.Verifier`: it takes the
evidence object a client sent, the 32-byte binding the server expects, the provider's
:class:`~mlcapsule.attestation.AttestationPolicy` and the verification time, and returns a
:class:`~mlcapsule.attestation.VerifiedEvidence` or raises
:class:`~mlcapsule.enclave.errors.AttestationError` naming the check that failed. The
cryptography and the hardware-specific checks are in :mod:`.dcap`, :mod:`.snp` and
:mod:`.nitro`; this module decodes the wire format, finds the collateral, and maps claims.

Binding. A hardware report carries 64 bytes of report data (Nitro: ``user_data``), which the
enclave fills with ``binding || measurement``: the setup binding
(:func:`mlcapsule.enclave.messages.setup.report_data` of the nonce and the enclave's keys) and
the 32-byte mlcapsule code measurement the enclave computed of itself. The first half proves
freshness and ties the answer to keys inside the TEE; the second half goes through the same
measurement allow-list as ``software`` and ``tpm`` evidence. The hardware measurement (MRENCLAVE,
MRTD and RTMRs, the SNP launch digest, Nitro PCRs) is checked against the per-type policy, so
a provider pins both the TEE image and the mlcapsule release inside it.

Wire format (JSON objects; exactly these fields; ``b64`` is standard base64)::

    {"type": "sgx",   "version": 1, "quote": b64, "collateral": {dcap-qvl collateral} | null}
    {"type": "tdx",   "version": 1, "quote": b64, "collateral": {...} | null}
    {"type": "snp",   "version": 1, "report": b64, "vcek": b64(DER) | null, "chain": "PEM ASK+ARK" | null}
    {"type": "nitro", "version": 1, "document": b64(COSE_Sign1)}

A ``null`` collateral or chain makes the server use what it was configured with (a directory
of Intel PCS responses; AMD's ASK/ARK chains and VCEKs per product): the server never fetches
anything from the internet.
"""

from __future__ import annotations

import binascii
import datetime as dt
import hashlib
import hmac
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..enclave._util import b64d
from ..enclave.errors import AttestationError
from .policy import AttestationPolicy, VerifiedEvidence, check_evidence_header

log = logging.getLogger("mlcapsule.attestation")

__all__ = ["BINDING_LEN", "REPORT_DATA_LEN", "DcapCollateral", "SnpCertificates", "bound_report_data",
           "verify_nitro_evidence", "verify_sgx_evidence", "verify_snp_evidence", "verify_tdx_evidence"]

BINDING_LEN = 32
REPORT_DATA_LEN = 64
MAX_QUOTE_B64 = 4 * 64 * 1024 // 3 + 4
MAX_REPORT_B64 = 4 * 4096 // 3 + 4
MAX_DER_B64 = 4 * 16 * 1024 // 3 + 4
MAX_PEM = 64 * 1024
MAX_DOCUMENT_B64 = 4 * 16 * 1024 // 3 + 4
MAX_COLLATERAL_FILES = 256
MAX_COLLATERAL_FILE = 1024 * 1024


def bound_report_data(binding: bytes, measurement: bytes) -> bytes:
    """The 64 bytes an enclave puts in a hardware report: the setup binding, then its measurement."""
    if len(binding) != BINDING_LEN or len(measurement) != 32:
        raise ValueError("binding and measurement must be 32 bytes each")
    return binding + measurement


def _b64(evidence: Mapping[str, Any], kind: str, name: str, max_len: int) -> bytes:
    value = evidence[name]
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise AttestationError(f"{kind} evidence: {name} is malformed")
    try:
        return b64d(value)
    except (ValueError, binascii.Error, UnicodeEncodeError) as e:
        raise AttestationError(f"{kind} evidence: {name} is not base64") from e


def _measurement_of(kind: str, report_data: bytes | None, expected: bytes) -> str:
    """Check the binding half of ``report_data``; return the measurement half (hex)."""
    if report_data is None or len(report_data) < REPORT_DATA_LEN:
        raise AttestationError(f"{kind} report_data check failed: it does not hold a setup binding and a "
                               "measurement (64 bytes)", hint="the evidence was not made by an mlcapsule enclave")
    if not hmac.compare_digest(report_data[:BINDING_LEN], expected):
        raise AttestationError(f"{kind} report_data check failed: the evidence does not bind this challenge "
                               "and these keys", hint="the evidence was made for another session; run setup again")
    return report_data[BINDING_LEN:REPORT_DATA_LEN].hex()


def _now(now: dt.datetime | None) -> dt.datetime:
    when = dt.datetime.now(dt.UTC) if now is None else now
    return when if when.tzinfo else when.replace(tzinfo=dt.UTC)


def _not_accepted(kind: str, name: str) -> AttestationError:
    return AttestationError(f"this server does not accept {name} evidence",
                            hint=f"ask the provider to configure a [{kind}] section in its policy file")


# -- server-side collateral ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DcapCollateral:
    """Intel PCS responses the server holds, so that clients need not send collateral.

    Keyed by (``"sgx"`` or ``"tdx"``, FMSPC in upper-case hex): each value is the JSON object
    dcap-qvl reads (``tcb_info``, ``qe_identity``, CRLs and issuer chains). Load it with
    :meth:`from_dir` from a directory of ``*.json`` files, one per platform family.
    """

    entries: Mapping[tuple[str, str], Mapping[str, Any]] = field(default_factory=dict)

    @classmethod
    def from_dir(cls, path: str | Path) -> DcapCollateral:
        folder = Path(path)
        try:
            files = sorted(p for p in folder.iterdir() if p.suffix == ".json" and p.is_file())
        except OSError as e:
            raise ValueError(f"cannot read the collateral directory {folder}: {e.strerror}") from e
        if len(files) > MAX_COLLATERAL_FILES:
            raise ValueError(f"{folder} holds more than {MAX_COLLATERAL_FILES} collateral files")
        entries: dict[tuple[str, str], Mapping[str, Any]] = {}
        for p in files:
            try:
                if p.stat().st_size > MAX_COLLATERAL_FILE:
                    raise ValueError("too large")
                obj = json.loads(p.read_text(encoding="utf-8"))
                info = json.loads(obj["tcb_info"])
                kind = str(info.get("id", "SGX")).lower()
                fmspc = str(info["fmspc"]).upper()
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{p} is not a dcap-qvl collateral file (tcb_info with an fmspc): {e}") from e
            if kind not in ("sgx", "tdx"):
                raise ValueError(f"{p}: tcb_info id {kind!r} is neither SGX nor TDX")
            entries[(kind, fmspc)] = MappingProxyType(obj)
        return cls(MappingProxyType(entries))

    def for_quote(self, kind: str, quote: bytes) -> Mapping[str, Any] | None:
        import dcap_qvl

        try:
            fmspc = str(dcap_qvl.parse_quote(quote).fmspc()).upper()
        except BaseException as e:  # noqa: B036 -- a Rust panic surfaces as a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            raise AttestationError(f"{kind.upper()} quote refused: quote format failed (no PCK certificate "
                                   "with an FMSPC)") from e
        return self.entries.get((kind, fmspc))


@dataclass(frozen=True)
class SnpCertificates:
    """AMD certificates the server holds: ASK+ARK chains (PEM) per product, and VCEK/VLEK DERs.

    ``chains`` maps a product name ("Milan", "Genoa", "Turin") to its chain; a client that sends
    no chain gets each tried (the ARK pins decide). ``leaves`` are VCEK/VLEK certificates in DER,
    tried when a client sends none.
    """

    chains: Mapping[str, bytes] = field(default_factory=dict)
    leaves: tuple[bytes, ...] = ()

    @classmethod
    def from_dir(cls, path: str | Path) -> SnpCertificates:
        """``ask_ark_<product>.pem`` (or ``cert_chain_<product>.pem``) and ``*.der`` VCEK/VLEK files."""
        folder = Path(path)
        try:
            files = sorted(p for p in folder.iterdir() if p.is_file())
        except OSError as e:
            raise ValueError(f"cannot read the SNP certificate directory {folder}: {e.strerror}") from e
        chains: dict[str, bytes] = {}
        leaves: list[bytes] = []
        for p in files[:MAX_COLLATERAL_FILES]:
            stem = p.stem.lower()
            if p.suffix == ".pem" and (stem.startswith("ask_ark_") or stem.startswith("cert_chain_")):
                product = stem.rsplit("_", 1)[1].capitalize()
                chains[product] = p.read_bytes()
            elif p.suffix == ".der":
                leaves.append(p.read_bytes())
        return cls(MappingProxyType(chains), tuple(leaves))


# -- the verifiers ---------------------------------------------------------------------------------------
DCAP_FIELDS = frozenset({"type", "version", "quote", "collateral"})


def _dcap(kind: str, evidence: Mapping[str, Any], policy: AttestationPolicy) -> tuple[bytes, Any]:
    check_evidence_header(evidence, evidence_type=kind, fields=DCAP_FIELDS, version=1)
    name = kind.upper()
    if getattr(policy, kind) is None:
        raise _not_accepted(kind, name)
    quote = _b64(evidence, name, "quote", MAX_QUOTE_B64)
    collateral = evidence["collateral"]
    if collateral is None:
        held = policy.dcap_collateral.for_quote(kind, quote) if policy.dcap_collateral is not None else None
        if held is None:
            raise AttestationError(f"{name} collateral check failed: the client sent no collateral and the server "
                                   "holds none for this platform (FMSPC)",
                                   hint="send the PCS collateral with the evidence, or ask the provider to add "
                                        "this platform's PCS responses to its collateral directory")
        collateral = held
    elif not isinstance(collateral, Mapping):
        raise AttestationError(f"{name} evidence: collateral must be a JSON object or null")
    return quote, collateral


def _log_advisories(kind: str, status: str, advisories: tuple[str, ...]) -> None:
    if status != "UpToDate" or advisories:
        log.warning("accepted %s evidence with TCB status %s, advisories: %s", kind, status,
                    ", ".join(advisories) or "none")


def _verify_dcap(kind: str, evidence: Mapping[str, Any], expected_report_data: bytes, policy: AttestationPolicy,
                 now: dt.datetime | None) -> VerifiedEvidence:
    from .dcap import verify_sgx, verify_tdx

    quote, collateral = _dcap(kind, evidence, policy)
    verify = verify_sgx if kind == "sgx" else verify_tdx
    claims: Any = verify(quote, collateral, policy=getattr(policy, kind), now=int(_now(now).timestamp()),
                         expected_report_data=expected_report_data)
    name = kind.upper()
    measurement = _measurement_of(name, claims.report_data, expected_report_data)
    _log_advisories(name, claims.tcb_status, claims.advisory_ids)
    identity = ({"hardware_measurement": claims.mr_enclave.hex(), "mr_signer": claims.body.mr_signer.hex()}
                if kind == "sgx" else
                {"hardware_measurement": claims.mr_td.hex(), "rtmrs": [r.hex() for r in claims.body.rtmrs]})
    return VerifiedEvidence(kind, measurement, hashlib.sha256(claims.ppid).hexdigest(), details={
        **identity, "tcb_status": claims.tcb_status, "advisories": list(claims.advisory_ids)})


def verify_sgx_evidence(evidence: Mapping[str, Any], *, expected_report_data: bytes, policy: AttestationPolicy,
                        now: dt.datetime | None = None) -> VerifiedEvidence:
    return _verify_dcap("sgx", evidence, expected_report_data, policy, now)


def verify_tdx_evidence(evidence: Mapping[str, Any], *, expected_report_data: bytes, policy: AttestationPolicy,
                        now: dt.datetime | None = None) -> VerifiedEvidence:
    return _verify_dcap("tdx", evidence, expected_report_data, policy, now)


SNP_FIELDS = frozenset({"type", "version", "report", "vcek", "chain"})


def verify_snp_evidence(evidence: Mapping[str, Any], *, expected_report_data: bytes, policy: AttestationPolicy,
                        now: dt.datetime | None = None) -> VerifiedEvidence:
    from .snp import verify_snp

    check_evidence_header(evidence, evidence_type="snp", fields=SNP_FIELDS, version=1)
    report = _b64(evidence, "SNP", "report", MAX_REPORT_B64)
    vcek = None if evidence["vcek"] is None else _b64(evidence, "SNP", "vcek", MAX_DER_B64)
    chain = evidence["chain"]
    if chain is not None and (not isinstance(chain, str) or not 0 < len(chain) <= MAX_PEM):
        raise AttestationError("SNP evidence: chain must be PEM text or null")
    if policy.snp is None:
        raise _not_accepted("snp", "SEV-SNP")
    held = policy.snp_certificates or SnpCertificates()
    leaves = [vcek] if vcek is not None else list(held.leaves)
    chains = [chain.encode("ascii", "replace")] if chain is not None else list(held.chains.values())
    if not leaves or not chains:
        raise AttestationError("SNP certificate check failed: the client sent no VCEK/VLEK or no ASK/ARK chain, "
                               "and the server holds none", hint="send the certificates with the evidence (the "
                               "extended report's certificate table), or ask the provider to configure them")
    first: AttestationError | None = None
    for leaf in leaves:
        for pem in chains:
            try:
                claims = verify_snp(report, leaf, pem, policy=policy.snp, expected_report_data=expected_report_data,
                                    roots=policy.snp_roots, now=_now(now))
            except AttestationError as e:
                first = first or e
                continue
            measurement = _measurement_of("SNP", claims.report_data, expected_report_data)
            chip = claims.chip_id if claims.chip_id.strip("0") else claims.signer_key_sha256
            return VerifiedEvidence("snp", measurement, hashlib.sha256(bytes.fromhex(chip)).hexdigest(), details={
                "hardware_measurement": claims.measurement, "product": claims.product, "signer": claims.signer,
                "reported_tcb": str(claims.reported_tcb), "vmpl": claims.vmpl})
    assert first is not None
    raise first


NITRO_FIELDS = frozenset({"type", "version", "document"})


def verify_nitro_evidence(evidence: Mapping[str, Any], *, expected_report_data: bytes, policy: AttestationPolicy,
                          now: dt.datetime | None = None) -> VerifiedEvidence:
    from .nitro import verify_nitro

    check_evidence_header(evidence, evidence_type="nitro", fields=NITRO_FIELDS, version=1)
    document = _b64(evidence, "Nitro", "document", MAX_DOCUMENT_B64)
    if policy.nitro is None:
        raise _not_accepted("nitro", "Nitro")
    kwargs: dict[str, Any] = {} if policy.nitro_root_der is None else {"root_der": policy.nitro_root_der}
    # Certificates valid at the document's time *and* now: the leaf lives hours, bounding its age.
    claims = verify_nitro(document, policy=policy.nitro, expected_report_data=expected_report_data, now=_now(now),
                          **kwargs)
    bound = claims.user_data if policy.nitro.bind_to == "user_data" else claims.nonce
    measurement = _measurement_of("Nitro", bound, expected_report_data)
    return VerifiedEvidence("nitro", measurement, hashlib.sha256(claims.module_id.encode()).hexdigest(), details={
        "hardware_measurement": claims.measurement, "module_id": claims.module_id,
        "pcrs": {str(k): v for k, v in claims.pcrs.items() if k in (0, 1, 2, 3, 4, 8)}})
