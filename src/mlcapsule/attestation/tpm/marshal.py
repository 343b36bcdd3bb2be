"""TPM 2.0 structures (TPM 2.0 Library, Part 2), parsed and marshalled in pure Python.

TPMT_PUBLIC (:func:`parse_public`), TPMS_ATTEST (:func:`parse_attest`) and TPMT_SIGNATURE
(:func:`parse_signature`), the algorithm and attribute constants, and the TPM name. Every
parser refuses structures larger than :data:`MAX_STRUCT` and trailing bytes
(:class:`TpmFormatError`). No checks of what the structures say: see :mod:`.verify`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ...enclave.errors import AttestationError

MAX_STRUCT = 8192  # no TPM structure we read is larger (TPM2 buffers are at most 4 KiB)

# -- TPM 2.0 constants (Part 2) -------------------------------------------------------------------
TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ST_ATTEST_CREATION = 0x801A
TPM_ST_ATTEST_CERTIFY = 0x8017

ALG_RSA, ALG_SHA1, ALG_HMAC, ALG_AES, ALG_KEYEDHASH, ALG_XOR = 0x0001, 0x0004, 0x0005, 0x0006, 0x0008, 0x000A
ALG_SHA256, ALG_SHA384, ALG_SHA512, ALG_NULL = 0x000B, 0x000C, 0x000D, 0x0010
ALG_RSASSA, ALG_RSAES, ALG_RSAPSS, ALG_OAEP = 0x0014, 0x0015, 0x0016, 0x0017
ALG_ECDSA, ALG_ECDH, ALG_ECDAA, ALG_SM2, ALG_ECSCHNORR = 0x0018, 0x0019, 0x001A, 0x001B, 0x001C
ALG_ECC, ALG_SYMCIPHER, ALG_CFB = 0x0023, 0x0025, 0x0043

HASHES: dict[int, tuple[str, type[hashes.HashAlgorithm]]] = {
    ALG_SHA1: ("sha1", hashes.SHA1),
    ALG_SHA256: ("sha256", hashes.SHA256),
    ALG_SHA384: ("sha384", hashes.SHA384),
    ALG_SHA512: ("sha512", hashes.SHA512),
}
BANKS = {name: alg for alg, (name, _) in HASHES.items()}
CURVES: dict[int, ec.EllipticCurve] = {0x0003: ec.SECP256R1(), 0x0004: ec.SECP384R1(), 0x0005: ec.SECP521R1()}

# TPMA_OBJECT bits
FIXED_TPM, ST_CLEAR, FIXED_PARENT, SENSITIVE_DATA_ORIGIN = 1 << 1, 1 << 2, 1 << 4, 1 << 5
USER_WITH_AUTH, ADMIN_WITH_POLICY, NO_DA, ENCRYPTED_DUPLICATION = 1 << 6, 1 << 7, 1 << 10, 1 << 11
RESTRICTED, DECRYPT, SIGN = 1 << 16, 1 << 17, 1 << 18
#: Reserved TPMA_OBJECT bits (bit 19 is x509sign since Library 1.59): a TPM never sets them.
RESERVED_ATTRIBUTES = 0x00000001 | 0x00000008 | 0x00000300 | 0x0000F000 | 0xFFF00000


class TpmFormatError(AttestationError):
    """A TPM structure does not parse."""


# -- parsing ----------------------------------------------------------------------------------------
class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise TpmFormatError(f"{self.what} is truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def u64(self) -> int:
        return int(struct.unpack(">Q", self.take(8))[0])

    def tpm2b(self) -> bytes:
        return self.take(self.u16())

    def done(self) -> None:
        if self.pos != len(self.data):
            raise TpmFormatError(f"{self.what} has {len(self.data) - self.pos} trailing bytes")


def _tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


@dataclass(frozen=True)
class TpmPublic:
    """A parsed TPMT_PUBLIC (RSA or ECC)."""

    raw: bytes  # the marshalled TPMT_PUBLIC, as hashed into the name
    type: int
    name_alg: int
    attributes: int
    auth_policy: bytes
    symmetric: tuple[int, int, int]  # (algorithm, key bits, mode); (ALG_NULL, 0, 0) if none
    scheme: tuple[int, int]  # (scheme, hash); (ALG_NULL, 0) if none
    key_bits: int = 0  # RSA
    exponent: int = 0  # RSA; 0 means 65537
    curve: int = 0  # ECC
    unique: tuple[bytes, ...] = ()  # RSA: (modulus,); ECC: (x, y)

    @property
    def name(self) -> bytes:
        """The TPM name: nameAlg || H_nameAlg(TPMT_PUBLIC)."""
        return struct.pack(">H", self.name_alg) + _digest(self.name_alg, self.raw)

    def public_key(self) -> rsa.RSAPublicKey | ec.EllipticCurvePublicKey:
        try:
            if self.type == ALG_RSA:
                return rsa.RSAPublicNumbers(self.exponent or 65537, int.from_bytes(self.unique[0], "big")).public_key()
            curve = CURVES.get(self.curve)
            if curve is None:
                raise TpmFormatError(f"TPM ECC curve {self.curve:#06x} is not supported")
            x, y = (int.from_bytes(v, "big") for v in self.unique)
            return ec.EllipticCurvePublicNumbers(x, y, curve).public_key()
        except (ValueError, IndexError) as e:
            raise TpmFormatError("the TPM public key is not a valid key") from e


def _sym_def(r: _Reader) -> tuple[int, int, int]:
    alg = r.u16()
    if alg == ALG_NULL:
        return (ALG_NULL, 0, 0)
    if alg == ALG_XOR:
        return (alg, r.u16(), 0)  # hash algorithm in place of key bits, no mode
    return (alg, r.u16(), r.u16())


def _scheme(r: _Reader) -> tuple[int, int]:
    scheme = r.u16()
    if scheme in (ALG_NULL, ALG_RSAES):
        return (scheme, 0)
    hash_alg = r.u16()
    if scheme == ALG_ECDAA:
        r.u16()  # count
    return (scheme, hash_alg)


def parse_public(data: bytes) -> TpmPublic:
    """Parse a marshalled TPMT_PUBLIC of an RSA or ECC key (a TPM2B_PUBLIC is accepted too)."""
    if len(data) > MAX_STRUCT:
        raise TpmFormatError("TPM public area is too large")
    if len(data) >= 4 and int.from_bytes(data[:2], "big") == len(data) - 2 \
            and int.from_bytes(data[2:4], "big") in (ALG_RSA, ALG_ECC):
        data = data[2:]  # a TPM2B_PUBLIC: drop the size
    r = _Reader(data, "TPM public area")
    kind, name_alg, attrs, policy = r.u16(), r.u16(), r.u32(), r.tpm2b()
    if name_alg not in HASHES:
        raise TpmFormatError(f"TPM public area: name algorithm {name_alg:#06x} is not supported")
    if attrs & RESERVED_ATTRIBUTES:
        raise TpmFormatError("TPM public area: reserved attribute bits are set")
    if kind == ALG_RSA:
        sym, scheme = _sym_def(r), _scheme(r)
        bits, exponent = r.u16(), r.u32()
        pub = TpmPublic(data, kind, name_alg, attrs, policy, sym, scheme, key_bits=bits, exponent=exponent,
                        unique=(r.tpm2b(),))
    elif kind == ALG_ECC:
        sym, scheme = _sym_def(r), _scheme(r)
        curve = r.u16()
        kdf = r.u16()
        if kdf != ALG_NULL:
            r.u16()
        pub = TpmPublic(data, kind, name_alg, attrs, policy, sym, scheme, curve=curve, unique=(r.tpm2b(), r.tpm2b()))
    else:
        raise TpmFormatError(f"TPM public area: key type {kind:#06x} is not RSA or ECC")
    r.done()
    return pub


@dataclass(frozen=True)
class PcrSelection:
    hash_alg: int
    pcrs: tuple[int, ...]

    @property
    def bank(self) -> str:
        return HASHES[self.hash_alg][0] if self.hash_alg in HASHES else f"{self.hash_alg:#06x}"


@dataclass(frozen=True)
class Attest:
    """A parsed TPMS_ATTEST."""

    raw: bytes
    type: int
    qualified_signer: bytes
    extra_data: bytes
    clock: int
    reset_count: int
    restart_count: int
    safe: bool
    firmware_version: int
    pcr_select: tuple[PcrSelection, ...] = ()  # quote
    pcr_digest: bytes = b""  # quote
    object_name: bytes = b""  # creation, certify
    creation_hash: bytes = b""  # creation


def _pcr_selection_list(r: _Reader) -> tuple[PcrSelection, ...]:
    count = r.u32()
    if count > 16:
        raise TpmFormatError("TPM PCR selection lists too many banks")
    out = []
    for _ in range(count):
        alg, size = r.u16(), r.u8()
        if size > 8:
            raise TpmFormatError("TPM PCR selection is too large")
        bitmap = r.take(size)
        out.append(PcrSelection(alg, tuple(i for i in range(8 * size) if bitmap[i // 8] >> (i % 8) & 1)))
    return tuple(out)


def parse_attest(data: bytes) -> Attest:
    """Parse a marshalled TPMS_ATTEST (quote, creation or certify; a TPM2B_ATTEST is accepted too)."""
    if len(data) > MAX_STRUCT:
        raise TpmFormatError("TPM attestation structure is too large")
    if len(data) >= 6 and int.from_bytes(data[:2], "big") == len(data) - 2 \
            and int.from_bytes(data[2:6], "big") == TPM_GENERATED_VALUE:
        data = data[2:]
    r = _Reader(data, "TPM attestation structure")
    if r.u32() != TPM_GENERATED_VALUE:
        raise TpmFormatError("TPM attestation structure: magic is not TPM_GENERATED_VALUE")
    kind = r.u16()
    signer, extra = r.tpm2b(), r.tpm2b()
    clock, resets, restarts, safe = r.u64(), r.u32(), r.u32(), r.u8()
    firmware = r.u64()
    common: dict[str, Any] = {"raw": data, "type": kind, "qualified_signer": signer, "extra_data": extra,
                              "clock": clock, "reset_count": resets, "restart_count": restarts, "safe": bool(safe),
                              "firmware_version": firmware}
    if kind == TPM_ST_ATTEST_QUOTE:
        att = Attest(**common, pcr_select=_pcr_selection_list(r), pcr_digest=r.tpm2b())
    elif kind == TPM_ST_ATTEST_CREATION:
        att = Attest(**common, object_name=r.tpm2b(), creation_hash=r.tpm2b())
    elif kind == TPM_ST_ATTEST_CERTIFY:
        att = Attest(**common, object_name=r.tpm2b())
        r.tpm2b()  # qualified name
    else:
        raise TpmFormatError(f"TPM attestation structure of type {kind:#06x} is not supported")
    r.done()
    return att


@dataclass(frozen=True)
class Signature:
    """A parsed TPMT_SIGNATURE (RSASSA, RSAPSS or ECDSA)."""

    alg: int
    hash_alg: int
    rsa: bytes = b""
    ecc: tuple[int, int] = (0, 0)


def parse_signature(data: bytes) -> Signature:
    if len(data) > MAX_STRUCT:
        raise TpmFormatError("TPM signature is too large")
    r = _Reader(data, "TPM signature")
    alg, hash_alg = r.u16(), r.u16()
    if alg in (ALG_RSASSA, ALG_RSAPSS):
        sig = Signature(alg, hash_alg, rsa=r.tpm2b())
    elif alg == ALG_ECDSA:
        sig = Signature(alg, hash_alg, ecc=(int.from_bytes(r.tpm2b(), "big"), int.from_bytes(r.tpm2b(), "big")))
    else:
        raise TpmFormatError(f"TPM signature scheme {alg:#06x} is not supported")
    r.done()
    return sig


def _digest(alg: int, data: bytes) -> bytes:
    if alg not in HASHES:
        raise TpmFormatError(f"TPM hash algorithm {alg:#06x} is not supported")
    h = hashes.Hash(HASHES[alg][1]())
    h.update(data)
    return h.finalize()

