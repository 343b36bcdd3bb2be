"""The capsule container, format v1: header, signed manifest, data region.

The byte layout is documented in docs/format.md. In short (all integers little-endian)::

    0   8  magic  b"\\x89MLCAPS\\n"
    8   2  major version (1)          10  2  minor version (0 or 1)
    12  4  flags (0 in v1)            16  4  manifest length (<= 4 MiB)
    20  2  signature length (64)      22  2  reserved (0)
    24  8  data offset (4096-aligned) 32  8  data length
    40 24  reserved (0)
    64  .  manifest (canonical JSON), then the Ed25519 signature, then zero padding
    data offset: the segments, at the offsets the manifest gives

The signature covers ``"mlcapsule-manifest-signature/v1\\0" || header || manifest``, so every
header field is signed too. The reader checks, in this order: magic, version, the fixed
fields, every length against its cap and against the file size, the JSON, the trust decision,
the signature, the manifest's schema, and that the segments tile the data region exactly (the
checks after the file size are the pure :func:`~mlcapsule.enclave.format.trust.verify_capsule`). Only
then does anything look at segment bytes, through a read-only mmap: the file is never read whole.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import BinaryIO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .._util import canonical_json
from ..crypto.keys import raw_public
from ..errors import FormatError, IntegrityError, SignatureError
from .manifest import Manifest, SegmentInfo
from .trust import (  # noqa: F401
    _HEADER,
    ALIGN,
    HEADER_LEN,
    MAGIC,
    MAJOR,
    MAX_MANIFEST,
    MINOR,
    SIG_LEN,
    Trust,
    TrustProviderKey,
    UnsafeTrustManifestKey,
    _align,
    check_segments,
    check_trust,
    manifest_minor,
    pack_header,
    parse_header as _parse_fixed_header,
    signed_message,
    verify_capsule,
)


def parse_header(header: bytes, file_size: int) -> tuple[int, int, int]:
    """Check the fixed header against the file; return (manifest length, data offset, data length)."""
    h = _parse_fixed_header(header)
    if h.data_offset > file_size or h.data_length != file_size - h.data_offset:
        raise FormatError("capsule file is truncated or has trailing bytes")
    return h.manifest_length, h.data_offset, h.data_length


class CapsuleFile:
    """A capsule opened for reading. Parses and verifies the header and manifest at open.

    ``trust`` is required: :class:`~mlcapsule.enclave.format.trust.TrustProviderKey` pins the provider;
    :class:`~mlcapsule.enclave.format.trust.UnsafeTrustManifestKey` checks the manifest against the key
    it names itself, which proves integrity but not origin.
    """

    def __init__(self, path: str | os.PathLike[str] | int, *, trust: Trust) -> None:
        trust = check_trust(trust)  # before any I/O: no decision, no open
        self.trust = trust
        if isinstance(path, int):
            # An open descriptor (the enclave service's workers get the client's capsule this
            # way: they could not open the client's path themselves). Ours is a duplicate.
            self.path = Path(f"/proc/self/fd/{path}")
            self._fd = os.dup(path)
            os.set_inheritable(self._fd, False)
            self._mmap: mmap.mmap | None = None
            try:
                self._open(trust)
            except BaseException:
                self.close()
                raise
            return
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError as e:
            raise FormatError(f"no capsule at {self.path}", hint="check the path") from e
        except IsADirectoryError as e:
            raise FormatError(f"{self.path} is a directory, not a capsule", hint="check the path") from e
        self._mmap = None
        try:
            self._open(trust)
        except BaseException:
            self.close()
            raise

    def _open(self, trust: Trust) -> None:
        size = os.fstat(self._fd).st_size
        header = os.pread(self._fd, HEADER_LEN, 0)
        mlen, self.data_offset, self.data_length = parse_header(header, size)
        body = os.pread(self._fd, mlen + SIG_LEN, HEADER_LEN)
        if len(body) != mlen + SIG_LEN:
            raise FormatError("capsule file is truncated")
        self.manifest_bytes, signature = body[:mlen], body[mlen:]
        pad_start = HEADER_LEN + mlen + SIG_LEN
        pad = os.pread(self._fd, self.data_offset - pad_start, pad_start)
        if pad.count(0) != len(pad):  # the padding is not signed: only zeros are allowed
            raise FormatError("capsule has non-zero bytes between the signature and the data")
        self.format_version = (MAJOR, header[10] | header[11] << 8)
        self.manifest = verify_capsule(header, self.manifest_bytes, signature, trust=trust)

    @property
    def origin_verified(self) -> bool:
        """True when the open pinned the provider key (not only the manifest's own key)."""
        return isinstance(self.trust, TrustProviderKey)

    def __enter__(self) -> CapsuleFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # a caller still holds a view; the mapping goes with it
                pass
            self._mmap = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def segment_view(self, seg: SegmentInfo) -> memoryview:
        """The stored bytes of a segment, as a read-only view of the mapped file (no copy)."""
        if self._mmap is None:
            if self.data_offset + self.data_length == 0:
                raise FormatError("capsule has no data")
            self._mmap = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        start = self.data_offset + seg.offset
        return memoryview(self._mmap)[start:start + seg.length]

    def plaintext(self, name: str, key: bytes) -> bytearray:
        """A whole segment's plaintext: decrypted and authenticated chunk by chunk with the
        content ``key``, or (a public graph) checked against its SHA-256. Whole-segment reads
        only: the weights go through the chunked reader of ``runtime/weights.py`` instead."""
        from ..crypto.chunks import SegmentCipher

        m = self.manifest
        seg = m.segment(name)
        stored = self.segment_view(seg)
        try:
            if not seg.encrypted:
                if hashlib.sha256(stored).hexdigest() != seg.sha256:
                    raise IntegrityError("the capsule failed its integrity check")
                return bytearray(stored)
            cipher = SegmentCipher(key, m.capsule_id, m.version, seg.index, seg.chunk_size)
            return cipher.decrypt(stored, seg.plain_length)
        finally:
            stored.release()

    def verify_segments(self) -> None:
        """Check every segment's SHA-256 against the signed manifest (no key needed)."""
        for seg in self.manifest.segments:
            h = hashlib.sha256()
            view = self.segment_view(seg)
            step = 8 * 1024 * 1024
            for i in range(0, len(view), step):
                h.update(view[i:i + step])
            view.release()
            if h.hexdigest() != seg.sha256:
                raise IntegrityError(f"segment {seg.index} ({seg.name}) does not match its hash in the manifest")


class SegmentWriter:
    """Collects segment bytes into a temporary file, tracking offsets and hashes."""

    def __init__(self, tmpdir: str | os.PathLike[str] | None = None) -> None:
        self._f: BinaryIO = tempfile.TemporaryFile(dir=tmpdir)
        self.segments: list[SegmentInfo] = []

    def begin(self) -> tuple[int, hashlib._Hash]:
        return self._f.tell(), hashlib.sha256()

    def write(self, data: bytes | memoryview, h: hashlib._Hash) -> None:
        self._f.write(data)
        h.update(data)

    @property
    def file(self) -> BinaryIO:
        return self._f

    def end(self, name: str, start: int, h: hashlib._Hash, *, encrypted: bool, plain_length: int,
            chunk_size: int) -> SegmentInfo:
        seg = SegmentInfo(index=len(self.segments), name=name, encrypted=encrypted, offset=start,
                          length=self._f.tell() - start, plain_length=plain_length, chunk_size=chunk_size,
                          sha256=h.hexdigest())
        self.segments.append(seg)
        return seg

    def finish(self, path: str | os.PathLike[str], manifest: Manifest, signing_key: Ed25519PrivateKey) -> Manifest:
        """Write the capsule atomically: header, manifest, signature, padding, data."""
        if raw_public(signing_key.public_key()) != manifest.provider_key:
            raise SignatureError("the signing key is not the provider key the manifest names")
        manifest = replace(manifest, segments=tuple(self.segments))
        mbytes = canonical_json(manifest.to_dict())
        if len(mbytes) > MAX_MANIFEST:
            raise FormatError("manifest is too large")
        data_len = self._f.tell()
        doff = _align(HEADER_LEN + len(mbytes) + SIG_LEN)
        header = pack_header(len(mbytes), doff, data_len, minor=manifest_minor(manifest))
        sig = signing_key.sign(signed_message(header, mbytes))
        path = Path(path)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(header + mbytes + sig)
                out.write(bytes(doff - out.tell()))
                self._f.seek(0)
                shutil.copyfileobj(self._f, out, 8 * 1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        finally:
            self._f.close()
        return manifest
