"""Chunked AES-256-GCM for capsule segments.

Wire format of one encrypted segment (see docs/format.md)::

    chunk_0 || chunk_1 || ... || chunk_{n-1}
    chunk_i = AES-256-GCM(key, nonce_i, plaintext_i, aad_i)   # ciphertext || 16-byte tag
    nonce_i = u32be(segment_index) || u64be(i)                 # 12 bytes
    aad_i   = "mlcapsule/chunk/v1" || capsule_id (16 bytes) || u32be(version)
              || u32be(segment_index) || u64be(i) || u64be(n)

Every plaintext chunk but the last is exactly ``chunk_size`` bytes. The content key is fresh for
each capsule version and each (segment, chunk) pair is encrypted once, so the deterministic
nonce never repeats under one key. Binding ``n`` in every chunk stops truncation; binding the
capsule id, version, segment and index stops chunks from being swapped or moved.
"""

from __future__ import annotations

import struct
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import IntegrityError

TAG_LEN = 16
MAX_CHUNK_SIZE = 2 * 1024 * 1024
_AAD_PREFIX = b"mlcapsule/chunk/v1"


def n_chunks(plain_length: int, chunk_size: int) -> int:
    """Number of chunks for a plaintext; an empty plaintext still has one (tag-only) chunk."""
    return max(1, -(-plain_length // chunk_size))


def stored_length(plain_length: int, chunk_size: int) -> int:
    return plain_length + TAG_LEN * n_chunks(plain_length, chunk_size)


def nonce(segment_index: int, chunk_index: int) -> bytes:
    return struct.pack(">IQ", segment_index, chunk_index)


def aad(capsule_id: uuid.UUID, version: int, segment_index: int, chunk_index: int, total: int) -> bytes:
    return _AAD_PREFIX + capsule_id.bytes + struct.pack(">IIQQ", version, segment_index, chunk_index, total)


class SegmentCipher:
    """Encrypts and decrypts the chunks of one segment of one capsule version."""

    def __init__(self, key: bytes, capsule_id: uuid.UUID, version: int, segment_index: int, chunk_size: int) -> None:
        if not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError("chunk size out of range")
        self._aead = AESGCM(key)
        self.capsule_id = capsule_id
        self.version = version
        self.segment_index = segment_index
        self.chunk_size = chunk_size

    def _params(self, i: int, total: int) -> tuple[bytes, bytes]:
        return nonce(self.segment_index, i), aad(self.capsule_id, self.version, self.segment_index, i, total)

    def encrypt_to(self, plaintext: memoryview, out: BinaryIO) -> Iterator[int]:
        """Encrypt ``plaintext`` chunk by chunk into ``out``; yields bytes of plaintext done."""
        cs = self.chunk_size
        total = n_chunks(len(plaintext), cs)
        buf = bytearray(cs + TAG_LEN)
        for i in range(total):
            piece = plaintext[i * cs:(i + 1) * cs]
            view = memoryview(buf)[: len(piece) + TAG_LEN]
            n, a = self._params(i, total)
            self._aead.encrypt_into(n, piece, a, view)
            out.write(view)
            yield len(piece)

    def decrypt_chunk_into(self, ciphertext: memoryview, i: int, total: int, out: memoryview) -> None:
        """Decrypt chunk ``i`` of ``total`` into ``out`` (exactly its plaintext length)."""
        n, a = self._params(i, total)
        try:
            self._aead.decrypt_into(n, ciphertext, a, out)
        except (InvalidTag, ValueError) as e:
            raise IntegrityError("the capsule failed its integrity check") from e

    def decrypt_into(self, stored: memoryview, out: memoryview) -> None:
        """Decrypt a whole segment (``stored`` = all its chunks) straight into ``out``.

        ``out`` must be exactly the plaintext length; no intermediate buffer is allocated.
        """
        cs = self.chunk_size
        plain_length = len(out)
        total = n_chunks(plain_length, cs)
        if len(stored) != plain_length + TAG_LEN * total:
            raise IntegrityError("the capsule failed its integrity check")
        step = cs + TAG_LEN
        for i in range(total):
            ct = stored[i * step: i * step + min(step, len(stored) - i * step)]
            self.decrypt_chunk_into(ct, i, total, out[i * cs: i * cs + len(ct) - TAG_LEN])

    def decrypt(self, stored: memoryview, plain_length: int) -> bytearray:
        out = bytearray(plain_length)
        self.decrypt_into(stored, memoryview(out))
        return out
