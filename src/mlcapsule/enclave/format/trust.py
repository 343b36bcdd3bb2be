"""Trust decisions for opening a capsule, and :func:`verify_capsule`. Pure code, no I/O.

Every open of a capsule names who it trusts to have signed the manifest:

* :class:`TrustProviderKey` pins the provider's Ed25519 key: the manifest must name that key
  and its signature must verify under it. This proves origin and integrity.
* :class:`UnsafeTrustManifestKey` trusts whatever key the manifest names. The signature then
  proves integrity only: anyone can re-sign a modified capsule with a key of their own. Use it
  only where another check pins the key (the enclave: the provider-signed license) or where the
  user asked for it explicitly (the CLI's ``--unsafe-trust-manifest-key``, which warns).

There is no default: :func:`verify_capsule` and :class:`~mlcapsule.enclave.format.container.CapsuleFile`
raise :class:`TypeError` without a decision. docs/design.md, "Trust decisions", lists the
decision of every caller.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass

from .._util import b64d
from ..crypto.chunks import MAX_CHUNK_SIZE, stored_length
from ..crypto.keys import ed25519_public_from_raw, verify_ed25519
from ..errors import FormatError, SignatureError, UnsupportedVersionError
from .manifest import Manifest, SegmentInfo

MAGIC = b"\x89MLCAPS\n"
MAJOR = 1
#: The highest minor version of format 1 this build reads (and the highest it writes). A reader
#: refuses a capsule of a higher minor version before it parses the manifest.
MINOR = 2
HEADER_LEN = 64
SIG_LEN = 64
MAX_MANIFEST = 4 * 1024 * 1024
ALIGN = 4096
_HEADER = struct.Struct("<8sHHIIHHQQ24s")
_SIG_CONTEXT = b"mlcapsule-manifest-signature/v1\x00"
assert _HEADER.size == HEADER_LEN


class UntrustedProviderKey(SignatureError):
    """The capsule names (and is signed by) a provider key other than the pinned one."""

    default_hint = "check that the capsule comes from the provider you expect"


@dataclass(frozen=True)
class TrustProviderKey:
    """Open only capsules signed by this provider key (raw 32-byte Ed25519 public key)."""

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != 32:
            raise TypeError("TrustProviderKey needs a raw 32-byte Ed25519 public key")

    def __repr__(self) -> str:
        return f"TrustProviderKey({self.key.hex()[:16]}...)"

    @classmethod
    def from_pem(cls, pem: bytes) -> TrustProviderKey:
        """From the provider's public key in PEM (``provider-key.pem.pub``)."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            pub = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError) as e:
            raise FormatError("not a PEM public key") from e
        if not isinstance(pub, Ed25519PublicKey):
            raise FormatError("not an Ed25519 public key")
        return cls(pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


@dataclass(frozen=True)
class UnsafeTrustManifestKey:
    """UNSAFE: trust whatever provider key the manifest names (integrity only, not origin)."""


Trust = TrustProviderKey | UnsafeTrustManifestKey


def check_trust(trust: object) -> Trust:
    """``trust`` if it is a trust decision; TypeError otherwise (None included: no silent default)."""
    if not isinstance(trust, (TrustProviderKey, UnsafeTrustManifestKey)):
        raise TypeError("opening a capsule needs a trust decision: trust=TrustProviderKey(provider_public_key) "
                        f"or trust=UnsafeTrustManifestKey() (integrity only), not {type(trust).__name__}")
    return trust


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


@dataclass(frozen=True)
class Header:
    major: int
    minor: int
    manifest_length: int
    data_offset: int
    data_length: int


def pack_header(manifest_len: int, data_offset: int, data_length: int, *, minor: int) -> bytes:
    return _HEADER.pack(MAGIC, MAJOR, minor, 0, manifest_len, SIG_LEN, 0, data_offset, data_length, bytes(24))


def signed_message(header: bytes, manifest_bytes: bytes) -> bytes:
    return _SIG_CONTEXT + header + manifest_bytes


def parse_header(header: bytes, *, read_minor: int | None = None) -> Header:
    """The fixed header's checks that need no file: magic, version, flags, lengths and caps.

    ``read_minor`` is the highest minor version the reader supports (default :data:`MINOR`, read
    at call time, so tests can play an older reader)."""
    if read_minor is None:
        read_minor = MINOR
    if len(header) < HEADER_LEN:
        raise FormatError("file is too short to be a capsule")
    magic, major, minor, flags, mlen, slen, res1, doff, dlen, res2 = _HEADER.unpack(header[:HEADER_LEN])
    if magic != MAGIC:
        raise FormatError("not an mlcapsule file (bad magic number)")
    if major != MAJOR or minor > read_minor:
        raise UnsupportedVersionError(f"capsule format version {major}.{minor} is not supported (this build reads "
                                      f"{MAJOR}.0 to {MAJOR}.{read_minor})",
                                      hint="upgrade mlcapsule to open this capsule")
    if flags != 0 or res1 != 0 or res2 != bytes(24):
        raise FormatError("capsule header has unknown flags or non-zero reserved bytes")
    if slen != SIG_LEN:
        raise FormatError("capsule header has a bad signature length")
    if not 2 <= mlen <= MAX_MANIFEST:
        raise FormatError("capsule manifest length is out of range")
    if doff != _align(HEADER_LEN + mlen + SIG_LEN):
        raise FormatError("capsule data offset does not follow the manifest")
    return Header(major, minor, mlen, doff, dlen)


def check_segments(segments: tuple[SegmentInfo, ...], data_length: int) -> None:
    """Segments must tile the data region in order, with consistent lengths."""
    pos = 0
    for s in segments:
        if s.offset != pos:
            raise FormatError(f"segment {s.index} does not start where the previous one ends")
        if s.encrypted:
            if not 16 <= s.chunk_size <= MAX_CHUNK_SIZE:
                raise FormatError(f"segment {s.index} has a chunk size out of range")
            if s.length != stored_length(s.plain_length, s.chunk_size):
                raise FormatError(f"segment {s.index} length does not match its chunking")
        elif s.length != s.plain_length:
            raise FormatError(f"segment {s.index} length does not match")
        pos += s.length
    if pos != data_length:
        raise FormatError("segments do not cover the data region exactly")


def manifest_minor(manifest: Manifest) -> int:
    """The lowest minor version that describes ``manifest``: 2 if it carries a defense policy or
    a charge policy (issue 16), 1 if it uses ``runtime.initializers``, else 0.

    Capsules that need no newer field stay readable by older readers; a capsule with defenses
    must not be: a 1.1 reader would answer without them."""
    if manifest.policy.defenses or manifest.policy.charge:
        return 2
    return 1 if manifest.runtime.initializers != "shared" else 0


def verify_capsule(header: bytes, manifest: bytes, signature: bytes, *, trust: Trust,
                   read_minor: int | None = None) -> Manifest:
    """Check a capsule's header, manifest and signature under ``trust``; return the manifest.

    Pure: the caller reads the bytes (and checks the header's lengths against the file). Order:
    the header (version before anything else), the manifest's JSON and the key it names, the
    trust decision, the signature, the schema, and that the segments tile the data region.
    """
    trust = check_trust(trust)
    h = parse_header(header, read_minor=read_minor)
    if len(manifest) != h.manifest_length or len(signature) != SIG_LEN:
        raise FormatError("capsule manifest or signature does not have the length the header gives")
    try:
        raw = json.loads(manifest.decode("utf-8"))
        named = b64d(raw["provider"]["key"])
        pub = ed25519_public_from_raw(named)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError, AttributeError, RecursionError) as e:
        raise FormatError("capsule manifest is not valid") from e
    except SignatureError as e:
        raise FormatError("capsule manifest names an invalid provider key") from e
    if isinstance(trust, TrustProviderKey):
        if named != trust.key:
            raise UntrustedProviderKey("capsule is signed by a provider key that is not the trusted one")
        pub = ed25519_public_from_raw(trust.key)
    verify_ed25519(pub, signature, signed_message(header[:HEADER_LEN], manifest), what="capsule manifest")
    m = Manifest.from_dict(raw)
    if m.policy.defenses and h.minor < 2:
        # A reader of the header's version would answer without the defenses. (Format 1.0
        # capsules of mlcapsule 0.1.0 carry runtime.initializers under a 1.0 header: still read.)
        raise FormatError(f"capsule manifest carries a defense policy (format {MAJOR}.2) under a "
                          f"{MAJOR}.{h.minor} header")
    check_segments(m.segments, h.data_length)
    return m
