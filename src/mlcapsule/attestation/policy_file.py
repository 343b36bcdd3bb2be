"""The provider's evidence policy file (``mlcapsule serve --policy policy.toml``).

One TOML file says which evidence types the server accepts, and what it accepts of each::

    accept = ["tdx", "snp", "tpm"]          # optional: default, every type configured below
    measurements = ["3f9a...", "local"]      # mlcapsule code measurements (added to --allow-measurement)

    [sgx]
    mr_enclave = ["<64 hex>"]                # and/or mr_signer + isv_prod_id (+ min_isv_svn)
    mr_signer = ["<64 hex>"]
    isv_prod_id = [1]
    min_isv_svn = 2
    allow_tcb_status = ["SWHardeningNeeded"] # besides UpToDate; default none
    reject_advisories = ["INTEL-SA-00615"]
    allow_debug = false                      # default false
    root_ca = "intel-root.der"               # default: Intel's SGX Root CA, pinned in the code

    [tdx]
    mr_td = ["<96 hex>"]
    rtmr0 = []  rtmr1 = ["<96 hex>"]  rtmr2 = ["<96 hex>"]  rtmr3 = []   # empty: unchecked
    td_attributes = "0000001000000000"
    allow_tcb_status = []
    allow_debug = false

    [dcap]
    collateral_dir = "pcs/"                  # PCS responses (*.json) for clients that send none

    [snp]
    measurement = ["<96 hex>"]
    min_tcb = {bootloader = 3, tee = 0, snp = 8, microcode = 115}
    max_vmpl = 0
    allow_debug = false
    certificates_dir = "amd/"                # ask_ark_<product>.pem and VCEK/VLEK *.der
    ark_sha256 = {Milan = "<64 hex>"}        # default: AMD's real ARKs, pinned in the code

    [nitro]
    pcr0 = ["<96 hex>"]  pcr1 = ["<96 hex>"]  pcr2 = ["<96 hex>"]  pcr8 = []   # empty pcr3/4/8: unchecked
    allow_debug = false
    root_ca = "nitro-root.der"               # default: the AWS Nitro root, pinned in the code

    [tpm]
    ek_roots = ["tpm-roots/"]
    ek_intermediates = []
    pcr_policy = "pcr-policy.json"

    [capsule."6f1c...-uuid"]                 # per capsule: the same keys, replacing the server-wide ones
    accept = ["tdx"]
    [capsule."6f1c...-uuid".tdx]
    mr_td = ["<96 hex>"]

Relative paths are relative to the file. Unknown keys are refused (a typo must not loosen or
silently drop a rule). ``software`` evidence is never enabled from this file: only the server's
``--UNSAFE-allow-software-evidence`` does that.
"""

from __future__ import annotations

import tomllib
import uuid
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..enclave.errors import AttestationError, UsageError
from .policy import AttestationPolicy, normalize_measurement

__all__ = ["EVIDENCE_TYPES", "PolicyFile", "load_policy_file", "parse_policy"]

EVIDENCE_TYPES = ("software", "tpm", "sgx", "tdx", "snp", "nitro")
_TOP = {"accept", "measurements", "sgx", "tdx", "dcap", "snp", "nitro", "tpm", "capsule"}
_SGX = {"mr_enclave", "mr_signer", "isv_prod_id", "min_isv_svn", "allow_tcb_status", "reject_advisories",
        "allow_debug", "root_ca"}
_TDX = {"mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3", "td_attributes", "allow_tcb_status", "reject_advisories",
        "allow_debug", "root_ca"}
_SNP = {"measurement", "min_tcb", "max_vmpl", "allow_debug", "certificates_dir", "ark_sha256"}
_NITRO = {"pcr0", "pcr1", "pcr2", "pcr3", "pcr4", "pcr8", "allow_debug", "root_ca", "bind_to"}
_TPM = {"ek_roots", "ek_intermediates", "pcr_policy"}
_DCAP = {"collateral_dir"}


class PolicyFile:
    """A parsed policy file: the server-wide policy and the per-capsule ones."""

    def __init__(self, policy: AttestationPolicy, capsules: Mapping[str, AttestationPolicy]) -> None:
        self.policy = policy
        self.capsules = dict(capsules)


def read_toml(path: Path, what: str) -> dict[str, Any]:
    """The TOML table in ``path``; UsageError naming ``what`` ("policy file") when it is missing,
    unreadable or not TOML."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise UsageError(f"no {what} at {path}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"cannot read the {what} {path}: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"the {what} {path} is not valid TOML: {e}") from e


def load_policy_file(path: str | Path, *, base: AttestationPolicy) -> PolicyFile:
    """Read and parse ``path`` over ``base`` (the policy the server's other settings give)."""
    p = Path(path)
    return parse_policy(read_toml(p, "policy file"), base=base, root=p.parent, name=str(p))


def parse_policy(data: Mapping[str, Any], *, base: AttestationPolicy, root: Path = Path("."),
                 name: str = "the policy file") -> PolicyFile:
    """Parse policy-file data (already decoded from TOML) over ``base``."""
    try:
        policy = _section(data, base=base, root=root, where=name, top=True)
        capsules: dict[str, AttestationPolicy] = {}
        caps = data.get("capsule", {})
        if not isinstance(caps, Mapping):
            raise UsageError(f"{name}: [capsule] must hold one table per capsule ID")
        for cid, sub in caps.items():
            try:
                key = str(uuid.UUID(str(cid)))
            except ValueError as e:
                raise UsageError(f"{name}: [capsule.{cid!r}] is not a capsule ID (a UUID)") from e
            if not isinstance(sub, Mapping):
                raise UsageError(f"{name}: [capsule.{cid!r}] must be a table")
            capsules[key] = _section(sub, base=policy, root=root, where=f"{name} [capsule.{key}]", top=False)
    except AttestationError as e:  # a malformed measurement in a sub-policy
        raise UsageError(f"{name}: {e}") from e
    except (ValueError, TypeError) as e:
        raise UsageError(f"{name}: {e}") from e
    return PolicyFile(policy, capsules)


def _keys(table: Mapping[str, Any], allowed: set[str], where: str) -> None:
    bad = set(table) - allowed
    if bad:
        raise UsageError(f"{where}: unknown key(s) {', '.join(sorted(bad))}",
                         hint=f"known keys: {', '.join(sorted(allowed))}")


def _list(table: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise UsageError(f"{where}: {key} must be a list")
    return value


def _hexes(table: Mapping[str, Any], key: str, length: int, where: str) -> frozenset[bytes]:
    out = set()
    for v in _list(table, key, where):
        try:
            raw = bytes.fromhex(str(v).strip())
        except ValueError:
            raw = b""
        if len(raw) != length:
            raise UsageError(f"{where}: {key} value {str(v)[:40]!r} is not {2 * length} hex digits")
        out.add(raw)
    return frozenset(out)


def _bool(table: Mapping[str, Any], key: str, where: str) -> bool:
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise UsageError(f"{where}: {key} must be true or false")
    return value


def _int(table: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = table.get(key, default)
    if type(value) is not int:
        raise UsageError(f"{where}: {key} must be an integer")
    return value


def _strings(table: Mapping[str, Any], key: str, where: str) -> frozenset[str]:
    values = _list(table, key, where)
    if not all(isinstance(v, str) for v in values):
        raise UsageError(f"{where}: {key} must be a list of strings")
    return frozenset(values)


def _read(root: Path, value: Any, key: str, where: str) -> Path:
    if not isinstance(value, str) or not value:
        raise UsageError(f"{where}: {key} must be a path")
    return root / Path(value).expanduser()


def _cert_der(path: Path, where: str) -> bytes:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UsageError(f"{where}: cannot read {path}: {e.strerror}") from e
    try:
        cert = x509.load_pem_x509_certificate(raw) if b"-----BEGIN" in raw else x509.load_der_x509_certificate(raw)
    except ValueError as e:
        raise UsageError(f"{where}: {path} is not a certificate (PEM or DER)") from e
    return cert.public_bytes(Encoding.DER)


def _sgx(t: Mapping[str, Any], root: Path, where: str) -> Any:
    from .dcap import SgxPolicy

    _keys(t, _SGX, where)
    prods = _list(t, "isv_prod_id", where)
    if not all(type(p) is int for p in prods):
        raise UsageError(f"{where}: isv_prod_id must be a list of integers")
    extra: dict[str, Any] = {}
    if "root_ca" in t:
        extra["root_ca_der"] = _cert_der(_read(root, t["root_ca"], "root_ca", where), where)
    return SgxPolicy(mr_enclaves=_hexes(t, "mr_enclave", 32, where), mr_signers=_hexes(t, "mr_signer", 32, where),
                     isv_prod_ids=frozenset(prods), min_isv_svn=_int(t, "min_isv_svn", 0, where),
                     allow_tcb_statuses=_strings(t, "allow_tcb_status", where),
                     reject_advisories=_strings(t, "reject_advisories", where),
                     allow_debug=_bool(t, "allow_debug", where), **extra)


def _tdx(t: Mapping[str, Any], root: Path, where: str) -> Any:
    from .dcap import TdxPolicy

    _keys(t, _TDX, where)
    attrs = t.get("td_attributes")
    if attrs is not None:
        try:
            attrs = bytes.fromhex(str(attrs))
        except ValueError:
            attrs = b""
        if len(attrs) != 8:
            raise UsageError(f"{where}: td_attributes must be 16 hex digits")
    extra: dict[str, Any] = {f"rtmr{i}": _hexes(t, f"rtmr{i}", 48, where) for i in range(4)}
    if "root_ca" in t:
        extra["root_ca_der"] = _cert_der(_read(root, t["root_ca"], "root_ca", where), where)
    return TdxPolicy(mr_tds=_hexes(t, "mr_td", 48, where), td_attributes=attrs,
                     allow_tcb_statuses=_strings(t, "allow_tcb_status", where),
                     reject_advisories=_strings(t, "reject_advisories", where),
                     allow_debug=_bool(t, "allow_debug", where), **extra)


def _snp(t: Mapping[str, Any], where: str) -> Any:
    from .snp import SnpPolicy, SnpTcb

    _keys(t, _SNP, where)
    min_tcb = t.get("min_tcb")
    if min_tcb is not None:
        if not isinstance(min_tcb, Mapping) or not {"bootloader", "tee", "snp", "microcode"} <= set(min_tcb) \
                or not set(min_tcb) <= {"bootloader", "tee", "snp", "microcode", "fmc"} \
                or not all(type(v) is int and 0 <= v < 256 for v in min_tcb.values()):
            raise UsageError(f"{where}: min_tcb must be {{bootloader, tee, snp, microcode[, fmc]}} of 0-255")
        min_tcb = SnpTcb(**min_tcb)
    return SnpPolicy(measurements=_strings(t, "measurement", where), allow_debug=_bool(t, "allow_debug", where),
                     min_tcb=min_tcb, max_vmpl=_int(t, "max_vmpl", 0, where))


def _nitro(t: Mapping[str, Any], where: str) -> Any:
    from .nitro import NitroPolicy

    _keys(t, _NITRO, where)
    pcrs: dict[int, frozenset[str]] = {}
    for i in (0, 1, 2, 3, 4, 8):
        values = _strings(t, f"pcr{i}", where)
        if values or i in (0, 1, 2):
            pcrs[i] = values
    bind_to = t.get("bind_to", "user_data")
    return NitroPolicy(pcrs=pcrs, allow_debug=_bool(t, "allow_debug", where), bind_to=bind_to)


def _measurement(value: Any, where: str) -> str:
    if value == "local":  # development convenience: the measurement of this installation's enclave code
        from ..enclave.measurement import measurement

        return measurement().hex()
    try:
        return normalize_measurement(str(value))
    except AttestationError as e:
        raise UsageError(f"{where}: measurement {str(value)[:80]!r} is not 64 hex digits") from e


def _section(t: Mapping[str, Any], *, base: AttestationPolicy, root: Path, where: str, top: bool) -> AttestationPolicy:
    _keys(t, _TOP if top else _TOP - {"capsule"}, where)
    changes: dict[str, Any] = {}
    if "accept" in t:
        accept = _strings(t, "accept", where)
        bad = accept - set(EVIDENCE_TYPES)
        if bad:
            raise UsageError(f"{where}: unknown evidence type(s) {', '.join(sorted(bad))}",
                             hint=f"evidence types: {', '.join(EVIDENCE_TYPES)}")
        changes["accept"] = accept
    if "measurements" in t:
        changes["measurements"] = base.measurements | {_measurement(m, where) for m in _list(t, "measurements", where)}
    for key, parse in (("sgx", lambda s, w: _sgx(s, root, w)), ("tdx", lambda s, w: _tdx(s, root, w)),
                       ("snp", _snp), ("nitro", _nitro)):
        if key in t:
            sub = t[key]
            if not isinstance(sub, Mapping):
                raise UsageError(f"{where}: [{key}] must be a table")
            changes[key] = parse(sub, f"{where} [{key}]")
    snp = t.get("snp")
    if isinstance(snp, Mapping):
        if "certificates_dir" in snp:
            from .hardware import SnpCertificates

            changes["snp_certificates"] = SnpCertificates.from_dir(
                _read(root, snp["certificates_dir"], "certificates_dir", where))
        if "ark_sha256" in snp:
            arks = snp["ark_sha256"]
            if not isinstance(arks, Mapping) or not all(isinstance(v, str) for v in arks.values()):
                raise UsageError(f"{where} [snp]: ark_sha256 maps product names to hex SHA-256 values")
            try:
                changes["snp_roots"] = {str(k): bytes.fromhex(v) for k, v in arks.items()}
            except ValueError as e:
                raise UsageError(f"{where} [snp]: ark_sha256 values must be hex") from e
    nitro = t.get("nitro")
    if isinstance(nitro, Mapping) and "root_ca" in nitro:
        changes["nitro_root_der"] = _cert_der(_read(root, nitro["root_ca"], "root_ca", where), where)
    if "dcap" in t:
        dcap = t["dcap"]
        if not isinstance(dcap, Mapping):
            raise UsageError(f"{where}: [dcap] must be a table")
        _keys(dcap, _DCAP, f"{where} [dcap]")
        if "collateral_dir" in dcap:
            from .hardware import DcapCollateral

            changes["dcap_collateral"] = DcapCollateral.from_dir(
                _read(root, dcap["collateral_dir"], "collateral_dir", where))
    if "tpm" in t:
        tpm = t["tpm"]
        if not isinstance(tpm, Mapping):
            raise UsageError(f"{where}: [tpm] must be a table")
        _keys(tpm, _TPM, f"{where} [tpm]")
        from .tpm import TpmPolicy

        pcr = tpm.get("pcr_policy")
        try:
            inter = [_read(root, v, "ek_intermediates", where) for v in _list(tpm, "ek_intermediates", where)]
            changes["tpm"] = TpmPolicy.from_files(
                [_read(root, v, "ek_roots", where) for v in _list(tpm, "ek_roots", where)], intermediates=inter,
                pcr_policy=None if pcr is None else _read(root, pcr, "pcr_policy", where))
        except OSError as e:
            raise UsageError(f"{where} [tpm]: cannot read the EK roots or PCR policy: {e}") from e
    return replace(base, **changes)
