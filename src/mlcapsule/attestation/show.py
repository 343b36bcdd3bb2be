"""Print the identities in a piece of evidence, to put in a policy file: ``python -m mlcapsule.attestation.show FILE``.

FILE is an evidence JSON object as a client sends it (``{"type": "tdx", ...}``), or a raw SGX/TDX
quote, SEV-SNP report or Nitro attestation document (base64 text is accepted too). Nothing is
verified: this only parses, so that a provider can copy the MRTD/RTMRs, SNP measurement, SGX
MRENCLAVE/MRSIGNER or Nitro PCRs of a new image into ``policy.toml`` after checking them
against its own build. In a TDX or SEV-SNP guest, a quote or report comes from the kernel::

    d=/sys/kernel/config/tsm/report/new; mkdir $d
    head -c 64 /dev/zero > $d/inblob; cat $d/outblob > report.bin; rmdir $d
    python -m mlcapsule.attestation.show report.bin
"""

from __future__ import annotations

import binascii
import json
import sys
from pathlib import Path
from typing import Any

from ..enclave._util import b64d
from ..enclave.errors import AttestationError

MAX_FILE = 1024 * 1024


def _raw(evidence: dict[str, Any]) -> tuple[str, bytes]:
    kind = evidence.get("type")
    field = {"sgx": "quote", "tdx": "quote", "snp": "report", "nitro": "document"}.get(str(kind))
    if field is None or not isinstance(evidence.get(field), str):
        raise AttestationError(f"evidence of type {kind!r} has nothing to show here")
    return str(kind), b64d(evidence[field])


def describe(data: bytes) -> dict[str, Any]:
    """The identities in ``data`` (see the module docstring), by evidence type."""
    from .dcap import parse_sgx_quote, parse_tdx_quote
    from .nitro import parse_nitro_document
    from .snp import parse_snp_report

    kind: str | None = None
    text = data.strip()
    if text.startswith(b"{"):
        try:
            kind, data = _raw(json.loads(text))
        except (ValueError, binascii.Error) as e:
            raise AttestationError(f"not an evidence object: {e}") from e
    elif text and all(c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n\r" for c in text):
        try:
            data = b64d(text.replace(b"\n", b"").replace(b"\r", b"").decode())
        except (ValueError, binascii.Error):
            pass
    attempts = [kind] if kind else ["tdx", "sgx", "snp", "nitro"]
    for k in attempts:
        try:
            if k == "tdx":
                td = parse_tdx_quote(data)
                return {"type": "tdx", "mr_td": td.mr_td.hex(), **{f"rtmr{i}": r.hex() for i, r in enumerate(td.rtmrs)},
                        "td_attributes": td.td_attributes.hex(), "debug": td.debug,
                        "report_data": td.report_data.hex()}
            if k == "sgx":
                en = parse_sgx_quote(data)
                return {"type": "sgx", "mr_enclave": en.mr_enclave.hex(), "mr_signer": en.mr_signer.hex(),
                        "isv_prod_id": en.isv_prod_id, "isv_svn": en.isv_svn, "debug": en.debug,
                        "report_data": en.report_data.hex()}
            if k == "snp":
                rep = parse_snp_report(data)
                return {"type": "snp", "measurement": rep.measurement.hex(), "policy": hex(rep.policy),
                        "vmpl": rep.vmpl, "report_data": rep.report_data.hex()}
            if k == "nitro":
                doc = parse_nitro_document(data)
                pcrs = {f"pcr{i}": v.hex() for i, v in sorted(doc.pcrs.items()) if i in (0, 1, 2, 3, 4, 8)}
                return {"type": "nitro", **pcrs, "module_id": doc.module_id}
        except AttestationError:
            continue
    raise AttestationError("this is not an SGX or TDX quote, an SEV-SNP report or a Nitro attestation document")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mlcapsule.attestation.show FILE", file=sys.stderr)
        return 2
    try:
        path = Path(args[0])
        if path.stat().st_size > MAX_FILE:
            raise AttestationError(f"{path} is larger than {MAX_FILE} bytes")
        print(json.dumps(describe(path.read_bytes()), indent=2))
    except OSError as e:
        print(f"error: cannot read {args[0]}: {e.strerror}", file=sys.stderr)
        return 1
    except AttestationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
