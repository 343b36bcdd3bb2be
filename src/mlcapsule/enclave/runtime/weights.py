"""The weights reader and the buffers it fills, shared by resident and streaming mode.

Enclave side. :class:`WeightReader` gives random access to the plaintext of the capsule's
encrypted weights segment without keeping it: resident mode reads it whole, once, into one
:func:`mapped_buffer` (see :meth:`mlcapsule.enclave.core.EnclaveCore`); streaming mode reads the
weights of each step, for each query, into its scratch (:mod:`.streaming`).
"""

from __future__ import annotations

import mmap
import os
import time
from typing import Any

import numpy as np

from .._util import munlock
from ..crypto.chunks import TAG_LEN, SegmentCipher, n_chunks, stored_length
from ..errors import FormatError, IntegrityError

PAGE = mmap.PAGESIZE
#: Reads of at least this many whole chunks are decrypted by two threads.
PARALLEL_CHUNKS = 4
BUFFER_ALIGN = 64


def aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer whose data pointer is 64-byte aligned."""
    raw = np.empty(nbytes + BUFFER_ALIGN, dtype=np.uint8)
    shift = (-raw.ctypes.data) % BUFFER_ALIGN
    return raw[shift:shift + nbytes]


def mapped_buffer(nbytes: int) -> np.ndarray:
    """A zeroed uint8 buffer of its own anonymous mapping (page-aligned), populated up front.

    For the large buffers the enclave fills once (resident weights, the streaming scratch):
    ``MAP_POPULATE`` faults all pages in with one call, several times faster on this VM than a
    page fault at a time while decrypting, and ``munmap`` gives the memory back to the system
    as soon as the last view of the buffer is gone (a large ``malloc`` may stay in the heap).
    """
    if nbytes == 0:
        return np.empty(0, dtype=np.uint8)
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
    try:
        mm = mmap.mmap(-1, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError):
        return aligned_empty(nbytes)
    return np.frombuffer(mm, dtype=np.uint8)  # the array keeps the mapping alive


class WeightReader:
    """Random access to the plaintext of the encrypted weights segment, without keeping it.

    ``read_into(out, start)`` fills ``out`` with plaintext bytes ``[start, start + len(out))``:
    whole chunks are decrypted straight into ``out``; a chunk only partly wanted is decrypted
    into a 2 MiB bounce buffer, which is kept, so the next read that starts inside the same
    chunk does not decrypt it again. Ciphertext pages are dropped from the process after use.
    """

    def __init__(self, capsule: Any, key: bytes, segment: str = "weights", *, release_pages: bool = True,
                 threads: int | None = None) -> None:
        m = capsule.manifest
        seg = m.segment(segment)
        if not seg.encrypted:
            raise IntegrityError("the capsule failed its integrity check")
        self.plain_length = seg.plain_length
        self.chunk_size = seg.chunk_size
        self.total = n_chunks(seg.plain_length, seg.chunk_size)
        self._view = capsule.segment_view(seg)
        if len(self._view) != stored_length(seg.plain_length, seg.chunk_size):
            self._view.release()
            raise IntegrityError("the capsule failed its integrity check")
        self._mmap = self._view.obj if isinstance(self._view.obj, mmap.mmap) else None
        self._base = capsule.data_offset + seg.offset
        self._cipher = SegmentCipher(key, m.capsule_id, m.version, seg.index, seg.chunk_size)
        self._bounce: np.ndarray | None = None
        self._bounce_index = -1
        #: The graph is public (packed with --public-architecture, stored in the clear): only
        #: then may per-layer facts appear in status and error messages.
        self.public_architecture = bool(m.public_architecture) and not m.segment("graph").encrypted
        self._release_pages = release_pages and self._mmap is not None
        if self._release_pages:
            munlock(self._mmap)  # ciphertext is public; locked pages could not be dropped
        self.bytes_decrypted = 0
        self.seconds = 0.0
        self.threads = min(2, threads or os.cpu_count() or 1)
        self._pool: Any = None

    def read_into(self, out: memoryview | np.ndarray, start: int) -> None:
        out = out.data.cast("B") if not isinstance(out, memoryview) else out
        n = len(out)
        stop = start + n
        if start < 0 or stop > self.plain_length:
            raise FormatError("a tensor lies outside the weights segment")
        if n == 0:
            return
        t0 = time.perf_counter()
        cs = self.chunk_size
        whole: list[int] = []  # chunks wanted whole: decrypted straight into `out`
        for i in range(start // cs, (stop - 1) // cs + 1):
            c_lo = i * cs
            c_len = min(cs, self.plain_length - c_lo)
            a, b = max(start, c_lo), min(stop, c_lo + c_len)
            if a == c_lo and b == c_lo + c_len and i != self._bounce_index:
                whole.append(i)
                continue
            if i != self._bounce_index:  # wanted in part: through the bounce buffer, which keeps it
                if self._bounce is None:
                    self._bounce = mapped_buffer(cs)
                self._bounce_index = -1
                self._decrypt(i, self._bounce.data[:c_len])
                self._bounce_index = i
                self.bytes_decrypted += c_len
            assert self._bounce is not None
            out[a - start:b - start] = self._bounce.data[a - c_lo:b - c_lo]
        if len(whole) >= PARALLEL_CHUNKS and self.threads > 1:
            # AES-GCM releases the GIL: a second thread decrypts half of the chunks.
            if self._pool is None:
                import threading
                from concurrent.futures import ThreadPoolExecutor

                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlcapsule-decrypt")
                # A small stack: an 8 MB one may be backed by 2 MB huge pages, which count.
                old = threading.stack_size(512 * 1024)
                try:
                    self._pool.submit(int).result()  # start the thread now, with that stack
                finally:
                    threading.stack_size(old)
            half = len(whole) // 2
            job = self._pool.submit(self._decrypt_whole, whole[:half], out, start)
            try:
                self._decrypt_whole(whole[half:], out, start)
            finally:
                job.result()
        else:
            self._decrypt_whole(whole, out, start)
        self.bytes_decrypted += sum(min(cs, self.plain_length - i * cs) for i in whole)
        self.seconds += time.perf_counter() - t0

    def _decrypt_whole(self, chunks: list[int], out: memoryview, start: int) -> None:
        cs = self.chunk_size
        for i in chunks:
            c_lo = i * cs
            self._decrypt(i, out[c_lo - start:c_lo - start + min(cs, self.plain_length - c_lo)])

    def _decrypt(self, i: int, dst: memoryview) -> None:
        step = self.chunk_size + TAG_LEN
        ct = self._view[i * step: i * step + len(dst) + TAG_LEN]
        self._cipher.decrypt_chunk_into(ct, i, self.total, dst)
        self._drop(i * step, i * step + len(dst) + TAG_LEN)

    def _drop(self, lo: int, hi: int) -> None:
        """Unmap the pages of ciphertext ``[lo, hi)`` of this segment from the process (the page
        cache keeps them); pages shared with the next chunk stay mapped until it is read."""
        if not self._release_pages:
            return
        a = (self._base + lo) // PAGE * PAGE
        b = (self._base + hi) // PAGE * PAGE
        if b > a:
            try:
                self._mmap.madvise(mmap.MADV_DONTNEED, a, b - a)  # type: ignore[union-attr]
            except (OSError, ValueError):
                self._release_pages = False

    def close(self) -> None:
        if self._bounce is not None:
            self._bounce.fill(0)
            self._bounce = None
        self._bounce_index = -1
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        self._mmap = None
        self._view.release()


__all__ = ["PAGE", "WeightReader", "aligned_empty", "mapped_buffer"]
