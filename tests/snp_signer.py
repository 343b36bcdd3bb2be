"""A fake AMD key hierarchy that signs SEV-SNP attestation reports, for tests only.

Recorded SEV-SNP evidence cannot carry our report_data, so end-to-end and negative tests sign
their own reports with a fake ARK → ASK (or ASVK) → VCEK (or VLEK) chain shaped like AMD's, and
pass the fake ARK to :func:`mlcapsule.attestation.snp.verify_snp` through ``roots=``. Built with
pyca ``cryptography`` only.

API (other tests and the ``cvm`` backend's fake configfs-tsm tree rely on it)::

    amd = FakeAmd(product="Milan" | "Genoa" | "Turin", seed=0, signer="vcek" | "vlek")
    amd.roots        # {product: SHA-256 of the fake ARK's DER}: pass as verify_snp(..., roots=amd.roots)
    amd.vcek_der     # the leaf (VCEK or VLEK) certificate, DER
    amd.chain_pem    # ASK (ASVK for a VLEK) then ARK, PEM, as AMD's kdsintf ``cert_chain``
    amd.tcb          # the leaf's TCB (SnpTcb), the default REPORTED_TCB
    amd.chip_id      # the 64-byte chip ID of the VCEK's hwID extension
    amd.report(report_data, *, measurement=DEFAULT_MEASUREMENT, policy=DEFAULT_POLICY, debug=False, vmpl=0,
               reported_tcb=None, version=3, chip_id=None, ...) -> bytes   # 1184-byte signed report
    amd.cert_table() -> bytes   # the GHCB certificate table (configfs-tsm ``auxblob``): ARK, ASK, VCEK/VLEK (DER)
    parse_cert_table(table) -> dict[str, bytes]   # {"ark": DER, "ask": DER, "vcek" or "vlek": DER}

The chain: ARK and ASK/ASVK are RSA-4096 certificates signed with RSASSA-PSS/SHA-384 (salt 48),
named like AMD's (``CN=ARK-Milan``, ``CN=SEV-Milan``, ``CN=SEV-VLEK-Milan``); the leaf is an ECDSA
P-384 key in a certificate ``CN=SEV-VCEK`` (or ``SEV-VLEK``) carrying AMD's extensions (publication
57230): structVersion, productName, the TCB components (blSPL, teeSPL, snpSPL, ucodeSPL, and fmcSPL on
Turin) as DER INTEGERs, and the hwID (the 64-byte chip ID; its first 8 bytes on Turin) for a VCEK.
The report is the ATTESTATION_REPORT of the SEV-SNP ABI specification (publication 56860), signed
with ECDSA P-384/SHA-384 over bytes ``[0, 0x2A0)``, r and s little-endian in 72-byte fields.

Determinism: the leaf key and chip ID derive from ``(product, seed)``, and reports are signed with
RFC 6979 deterministic ECDSA, so equal arguments give equal bytes. pyca cannot derive an RSA key
from a seed, and RSA-PSS signatures are salted, so for seeds 0 and 1 (with the default CA validity)
the RSA keys and the ARK/ASK/ASVK certificates are loaded from ``tests/vectors/fake_amd.json``
(regenerate with ``python tests/snp_signer.py --regenerate``): ``roots`` and ``chain_pem`` are then
the same in every process, so a subprocess (an enclave daemon serving a fake configfs-tsm tree) and
the test that configures the server agree on the root. Other seeds, or a non-default
``ca_validity``, generate fresh RSA keys (cached per process): stable within one process only.

Keyword-only extras for negative tests: ``tcb`` (the leaf's TCB), ``leaf_validity`` and
``ca_validity`` (``(not_before, not_after)``, for expired certificates).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import json
import struct
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from mlcapsule.attestation.snp import POLICY_DEBUG, REPORT_SIZE, SIGNED_SIZE, SnpTcb

__all__ = ["CA_VALIDITY", "CERT_GUIDS", "DEFAULT_MEASUREMENT", "DEFAULT_POLICY", "DEFAULT_TCB", "LEAF_VALIDITY",
           "PRODUCTS", "FakeAmd", "parse_cert_table"]

PRODUCTS = ("Milan", "Genoa", "Turin")
#: (family, model, stepping) of each product's CPUID, as a v3 report carries it.
CPUID = {"Milan": (0x19, 0x01, 0x01), "Genoa": (0x19, 0x11, 0x01), "Turin": (0x1A, 0x02, 0x00)}
PRODUCT_NAME = {"Milan": "Milan-B0", "Genoa": "Genoa-B1", "Turin": "Turin"}  # the productName extension
#: The default leaf TCB (Turin adds an FMC SVN).
DEFAULT_TCB = {"Milan": SnpTcb(bootloader=4, tee=0, snp=24, microcode=219),
               "Genoa": SnpTcb(bootloader=9, tee=0, snp=23, microcode=72),
               "Turin": SnpTcb(bootloader=1, tee=1, snp=3, microcode=9, fmc=1)}
DEFAULT_POLICY = 0x30000  # SMT allowed, bit 17 (reserved, must be one); no debug, no migration agent
DEFAULT_MEASUREMENT = hashlib.sha384(b"mlcapsule fake SEV-SNP guest").digest()
CA_VALIDITY = (dt.datetime(2020, 10, 22, tzinfo=dt.UTC), dt.datetime(2045, 10, 22, tzinfo=dt.UTC))  # as AMD's ARKs
LEAF_VALIDITY = (dt.datetime(2021, 1, 1, tzinfo=dt.UTC), dt.datetime(2044, 1, 1, tzinfo=dt.UTC))
STORED_SEEDS = (0, 1)
KEYS_FILE = Path(__file__).resolve().parent / "vectors" / "fake_amd.json"

PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA384()), salt_length=48)
_ECDSA = ec.ECDSA(hashes.SHA384(), deterministic_signing=True)
_P384_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFC7634D81F4372DDF581A0DB248B0A77AECEC196ACCC52973

_OID = "1.3.6.1.4.1.3704.1."
OID_STRUCT_VERSION, OID_PRODUCT_NAME, OID_HWID = _OID + "1", _OID + "2", _OID + "4"
OID_BL, OID_TEE, OID_SNP, OID_UCODE, OID_FMC = (_OID + "3.1", _OID + "3.2", _OID + "3.3", _OID + "3.8",
                                                _OID + "3.9")

Validity = tuple[dt.datetime, dt.datetime]

#: The GUIDs of the GHCB specification's certificate table (big-endian byte order, as Linux's uuid_t).
CERT_GUIDS = {"ark": uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"),
              "ask": uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"),  # the ASVK in a VLEK's table
              "vcek": uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"),
              "vlek": uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1")}


def parse_cert_table(table: bytes) -> dict[str, bytes]:
    """The certificates of a GHCB certificate table: 24-byte entries (GUID, offset, length) up to an all-zero one."""
    names = {g.bytes: n for n, g in CERT_GUIDS.items()}
    out: dict[str, bytes] = {}
    for at in range(0, len(table) - 23, 24):
        guid = table[at:at + 16]
        if guid == bytes(16):
            return out
        offset, length = struct.unpack_from("<II", table, at + 16)
        out[names.get(guid, str(uuid.UUID(bytes=guid)))] = table[offset:offset + length]
    raise ValueError("the certificate table has no terminating all-zero entry")


def _name(cn: str) -> x509.Name:
    """AMD's distinguished names: OU=Engineering, C=US, L=Santa Clara, ST=CA, O=Advanced Micro Devices, CN=..."""
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "Engineering"),
                      x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                      x509.NameAttribute(NameOID.LOCALITY_NAME, "Santa Clara"),
                      x509.NameAttribute(NameOID.STATE_OR_PROVINCE_NAME, "CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Advanced Micro Devices"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def der_int(v: int) -> bytes:
    """A small non-negative DER INTEGER (AMD's TCB extensions)."""
    body = v.to_bytes(v.bit_length() // 8 + 1, "big")
    return bytes([0x02, len(body)]) + body


def _ia5(s: str) -> bytes:
    return bytes([0x16, len(s)]) + s.encode("ascii")


def _derive(*label: object) -> bytes:
    return hashlib.sha512(repr(("mlcapsule-fake-amd", *label)).encode()).digest()


def _ca_cert(subject: str, issuer: str, key: rsa.RSAPublicKey, signer: rsa.RSAPrivateKey, serial: int,
             validity: Validity, *, root: bool) -> x509.Certificate:
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer)).public_key(key)
         .serial_number(serial).not_valid_before(validity[0]).not_valid_after(validity[1])
         .add_extension(x509.BasicConstraints(ca=True, path_length=None if root else 0), critical=True)
         .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                      data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                      crl_sign=root, encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False))
    return b.sign(signer, hashes.SHA384(), rsa_padding=PSS)


def _new_rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=4096)


def _rsa_from_prime(cert: x509.Certificate, p: int) -> rsa.RSAPrivateKey:
    """The RSA private key of ``cert`` from one of its primes (pyca's CRT helpers; n = p * q is checked here)."""
    pub = cert.public_key()
    assert isinstance(pub, rsa.RSAPublicKey)
    n, e = pub.public_numbers().n, pub.public_numbers().e
    q, rem = divmod(n, p)
    if rem or p in (1, n):
        raise ValueError(f"{KEYS_FILE} does not match its certificate: regenerate it")
    d = rsa.rsa_recover_private_exponent(e, p, q)
    return rsa.RSAPrivateNumbers(p, q, d, rsa.rsa_crt_dmp1(d, p), rsa.rsa_crt_dmq1(d, q), rsa.rsa_crt_iqmp(p, q),
                                 rsa.RSAPublicNumbers(e, n)).private_key(unsafe_skip_rsa_key_validation=True)


class _Cas:
    """One product's ARK, ASK and ASVK (keys and certificates)."""

    def __init__(self, ark: tuple[rsa.RSAPrivateKey, x509.Certificate],
                 ask: tuple[rsa.RSAPrivateKey, x509.Certificate],
                 asvk: tuple[rsa.RSAPrivateKey, x509.Certificate]) -> None:
        self.ark_key, self.ark = ark
        self.ask_key, self.ask = ask
        self.asvk_key, self.asvk = asvk

    @classmethod
    def generate(cls, product: str, validity: Validity,
                 keys: tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey, rsa.RSAPrivateKey] | None = None) -> _Cas:
        ark_key, ask_key, asvk_key = keys or (_new_rsa(), _new_rsa(), _new_rsa())
        ark = _ca_cert(f"ARK-{product}", f"ARK-{product}", ark_key.public_key(), ark_key, 0x10000, validity, root=True)
        ask = _ca_cert(f"SEV-{product}", f"ARK-{product}", ask_key.public_key(), ark_key, 0x10001, validity,
                       root=False)
        asvk = _ca_cert(f"SEV-VLEK-{product}", f"ARK-{product}", asvk_key.public_key(), ark_key, 0x10101, validity,
                        root=False)
        return cls((ark_key, ark), (ask_key, ask), (asvk_key, asvk))

    def to_json(self) -> dict[str, dict[str, str]]:
        out = {}
        for role, key, cert in (("ark", self.ark_key, self.ark), ("ask", self.ask_key, self.ask),
                                ("asvk", self.asvk_key, self.asvk)):
            p = key.private_numbers().p
            out[role] = {"cert": base64.b64encode(cert.public_bytes(Encoding.DER)).decode(),
                         "p": p.to_bytes((p.bit_length() + 7) // 8, "big").hex()}
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Mapping[str, str]]) -> _Cas:
        parts = []
        for role in ("ark", "ask", "asvk"):
            cert = x509.load_der_x509_certificate(base64.b64decode(data[role]["cert"]))
            parts.append((_rsa_from_prime(cert, int(data[role]["p"], 16)), cert))
        return cls(parts[0], parts[1], parts[2])


@functools.cache
def _stored() -> Mapping[str, Mapping[str, Mapping[str, str]]]:
    if not KEYS_FILE.exists():
        return {}
    data: Mapping[str, Mapping[str, Mapping[str, str]]] = json.loads(KEYS_FILE.read_text())
    return data


@functools.cache
def _rsa_keys(product: str, seed: int) -> tuple[rsa.RSAPrivateKey, rsa.RSAPrivateKey, rsa.RSAPrivateKey]:
    stored = _stored().get(f"{product}/{seed}")
    if stored is not None:
        cas = _Cas.from_json(stored)
        return cas.ark_key, cas.ask_key, cas.asvk_key
    return _new_rsa(), _new_rsa(), _new_rsa()


@functools.cache
def _cas(product: str, seed: int, validity: Validity) -> _Cas:
    stored = _stored().get(f"{product}/{seed}")
    if stored is not None and validity == CA_VALIDITY:
        return _Cas.from_json(stored)
    return _Cas.generate(product, validity, _rsa_keys(product, seed))


class FakeAmd:
    """A fake AMD product line (ARK, ASK, ASVK) and one chip's VCEK, or a cloud's VLEK; see the module docstring."""

    def __init__(self, product: str = "Milan", seed: int = 0, signer: str = "vcek", *, tcb: SnpTcb | None = None,
                 leaf_validity: Validity = LEAF_VALIDITY, ca_validity: Validity = CA_VALIDITY) -> None:
        if product not in PRODUCTS:
            raise ValueError(f"product must be one of {', '.join(PRODUCTS)}, not {product!r}")
        if signer not in ("vcek", "vlek"):
            raise ValueError(f"signer must be 'vcek' or 'vlek', not {signer!r}")
        if type(seed) is not int or seed < 0:
            raise ValueError("seed must be a non-negative int")
        self.product, self.seed, self.signer = product, seed, signer
        self.tcb = tcb if tcb is not None else DEFAULT_TCB[product]
        if (self.tcb.fmc is None) != (product != "Turin"):
            raise ValueError("a Turin TCB has an FMC SVN (fmc=...), a Milan or Genoa TCB has none")
        cas = _cas(product, seed, (ca_validity[0], ca_validity[1]))
        self.ark, self.ask = cas.ark, cas.asvk if signer == "vlek" else cas.ask
        ca_key = cas.asvk_key if signer == "vlek" else cas.ask_key
        self.chip_id = _derive("chip", product, seed)  # 64 bytes
        scalar = int.from_bytes(_derive("leaf", product, seed, signer, self.tcb), "big") % (_P384_ORDER - 1) + 1
        self._leaf_key = ec.derive_private_key(scalar, ec.SECP384R1())
        t = self.tcb
        exts = [(OID_STRUCT_VERSION, der_int(1 if product == "Turin" else 0)),
                (OID_PRODUCT_NAME, _ia5(PRODUCT_NAME[product]))]
        if product == "Turin":
            exts.append((OID_FMC, der_int(t.fmc or 0)))
        exts += [(OID_BL, der_int(t.bootloader)), (OID_TEE, der_int(t.tee)), (OID_SNP, der_int(t.snp)),
                 (OID_UCODE, der_int(t.microcode))]
        if signer == "vcek":
            exts.append((OID_HWID, self.chip_id[:8] if product == "Turin" else self.chip_id))
        b = (x509.CertificateBuilder().subject_name(_name("SEV-VLEK" if signer == "vlek" else "SEV-VCEK"))
             .issuer_name(self.ask.subject).public_key(self._leaf_key.public_key()).serial_number(1)
             .not_valid_before(leaf_validity[0]).not_valid_after(leaf_validity[1]))
        for oid, value in exts:
            b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(oid), value), critical=False)
        self.leaf = b.sign(ca_key, hashes.SHA384(), rsa_padding=PSS)

    @property
    def roots(self) -> Mapping[str, bytes]:
        """``{product: SHA-256 of the fake ARK's DER}``, for ``verify_snp(..., roots=...)``."""
        return MappingProxyType({self.product: hashlib.sha256(self.ark.public_bytes(Encoding.DER)).digest()})

    @property
    def vcek_der(self) -> bytes:
        """The leaf certificate (the VCEK, or the VLEK when ``signer="vlek"``), DER."""
        return self.leaf.public_bytes(Encoding.DER)

    @property
    def chain_pem(self) -> bytes:
        """The ASK (or ASVK) then the ARK, PEM: what ``https://kdsintf.amd.com/vcek/v1/<product>/cert_chain`` serves."""
        return self.ask.public_bytes(Encoding.PEM) + self.ark.public_bytes(Encoding.PEM)

    def cert_table(self) -> bytes:
        """The GHCB certificate table a host hands out with an extended report (configfs-tsm ``auxblob``)."""
        certs = [("ark", self.ark.public_bytes(Encoding.DER)), ("ask", self.ask.public_bytes(Encoding.DER)),
                 (self.signer, self.vcek_der)]
        offset = 24 * (len(certs) + 1)
        head, body = b"", b""
        for name, der in certs:
            head += CERT_GUIDS[name].bytes + struct.pack("<II", offset + len(body), len(der))
            body += der
        return head + bytes(24) + body

    def tcb_raw(self, tcb: SnpTcb) -> bytes:
        """The 8-byte TCB_VERSION of ``tcb`` in this product's layout."""
        if self.product == "Turin":  # FMC, BL, TEE, SNP, 3 reserved, microcode
            return bytes([tcb.fmc or 0, tcb.bootloader, tcb.tee, tcb.snp, 0, 0, 0, tcb.microcode])
        return bytes([tcb.bootloader, tcb.tee, 0, 0, 0, 0, tcb.snp, tcb.microcode])

    def report(self, report_data: bytes, *, measurement: bytes = DEFAULT_MEASUREMENT, policy: int = DEFAULT_POLICY,
               debug: bool = False, vmpl: int = 0, reported_tcb: SnpTcb | None = None, version: int = 3,
               chip_id: bytes | None = None, mask_chip_id: bool = False, host_data: bytes = bytes(32),
               guest_svn: int = 0) -> bytes:
        """A 1184-byte ATTESTATION_REPORT carrying ``report_data`` (at most 64 bytes, zero-padded), signed by the leaf.

        ``policy`` is the guest policy word; ``debug=True`` sets its DEBUG bit (19). ``reported_tcb``
        defaults to the leaf's TCB (another one no longer matches the VCEK). ``chip_id`` defaults to
        the VCEK's (zeros for a VLEK or with ``mask_chip_id``). ``version`` 2 leaves CPUID zero.
        """
        if not isinstance(report_data, bytes) or len(report_data) > 64:
            raise ValueError("report_data must be at most 64 bytes")
        if not isinstance(measurement, bytes) or len(measurement) != 48:
            raise ValueError("measurement must be 48 bytes")
        if version not in (2, 3):
            raise ValueError("version must be 2 or 3")
        if not isinstance(host_data, bytes) or len(host_data) != 32:
            raise ValueError("host_data must be 32 bytes")
        if chip_id is None:
            chip_id = bytes(64) if self.signer == "vlek" or mask_chip_id else self.chip_id
        if not isinstance(chip_id, bytes) or len(chip_id) != 64:
            raise ValueError("chip_id must be 64 bytes")
        tcb = self.tcb_raw(reported_tcb if reported_tcb is not None else self.tcb)
        key_info = (1 << 2 if self.signer == "vlek" else 0) | (2 if mask_chip_id else 0)
        r = bytearray(REPORT_SIZE)
        struct.pack_into("<IIQ", r, 0x00, version, guest_svn, policy | (POLICY_DEBUG if debug else 0))
        struct.pack_into("<II", r, 0x30, vmpl, 1)  # VMPL, signature algorithm 1: ECDSA P-384 with SHA-384
        r[0x38:0x40] = tcb  # CURRENT_TCB
        struct.pack_into("<QI", r, 0x40, 0x1, key_info)  # PLATFORM_INFO: SMT enabled; KEY_INFO
        r[0x50:0x50 + len(report_data)] = report_data
        r[0x90:0xC0] = measurement
        r[0xC0:0xE0] = host_data
        r[0x140:0x160] = hashlib.sha256(b"report id" + chip_id + report_data).digest()  # REPORT_ID
        r[0x160:0x180] = b"\xff" * 32  # REPORT_ID_MA: no migration agent
        r[0x180:0x188] = tcb  # REPORTED_TCB
        if version >= 3:
            r[0x188:0x18B] = bytes(CPUID[self.product])
        r[0x1A0:0x1E0] = chip_id
        r[0x1E0:0x1E8] = tcb  # COMMITTED_TCB
        r[0x1E8:0x1EB] = bytes([4, 55, 1])  # CURRENT_BUILD, _MINOR, _MAJOR: firmware 1.55.4
        r[0x1EC:0x1EF] = bytes([4, 55, 1])  # COMMITTED_BUILD, _MINOR, _MAJOR
        r[0x1F0:0x1F8] = tcb  # LAUNCH_TCB
        rr, ss = decode_dss_signature(self._leaf_key.sign(bytes(r[:SIGNED_SIZE]), _ECDSA))
        r[0x2A0:0x2E8] = rr.to_bytes(72, "little")
        r[0x2E8:0x330] = ss.to_bytes(72, "little")
        return bytes(r)


def regenerate() -> None:
    """Write fresh RSA keys and CA certificates for seeds 0 and 1 of each product to ``KEYS_FILE``."""
    data = {f"{product}/{seed}": _Cas.generate(product, CA_VALIDITY).to_json()
            for product in PRODUCTS for seed in STORED_SEEDS}
    KEYS_FILE.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] != ["--regenerate"]:
        sys.exit("usage: python tests/snp_signer.py --regenerate   (rewrites tests/vectors/fake_amd.json)")
    regenerate()
