"""Attacks on the capsule file. Each test is named after the attack it stops.

Every tampered capsule must be refused with FormatError (exit 3) or IntegrityError (exit 4), by
the host-side reader (``CapsuleFile``, ``open_capsule``) *and* by the enclave itself, which must
not trust the host's check: ``EnclaveCore`` in-process (fast, for many positions) and the real
hardened worker (``EnclaveProcess``). Never another exception type, never a silent wrong answer.

Attacks behind the signature (chunk swaps, moves, truncation) are reached with ``resign``: the
manifest's hashes are fixed and re-signed with the provider key, so only the AEAD can catch them.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    Packed,
    ProviderKey,
    assert_matches_reference,
    assert_one_line_error,
    b64,
    copy_packed,
    flip_byte,
    layout,
    pack_model,
    plain_ort,
    resign,
    write_at,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

import mlcapsule
from mlcapsule.enclave.crypto import chunks
from mlcapsule.enclave.crypto.keys import ContentKey
from mlcapsule.enclave.backends.software import SoftwareBackend
from mlcapsule.enclave.core import EnclaveCore
from mlcapsule.host import EnclaveProcess
from mlcapsule.enclave.errors import (
    FormatError,
    IntegrityError,
    KeyFileError,
    MlcapsuleError,
    SignatureError,
    UnsupportedVersionError,
)
from mlcapsule.enclave.format import CapsuleFile
from mlcapsule.enclave.format.container import MAX_MANIFEST
from mlcapsule.enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey

REFUSED = (FormatError, IntegrityError)
X = np.random.default_rng(7).standard_normal((3, 16)).astype(np.float32)


# -- ways to load a capsule ---------------------------------------------------------------------
def _outcome(fn: Callable[[], object]) -> BaseException | None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - we classify every exception type
        return e
    return None


def _open_with_capsulefile(path: Path) -> None:
    with CapsuleFile(path, trust=UnsafeTrustManifestKey()) as cf:
        cf.verify_segments()


class Core:
    """The enclave's logic in-process, with its own state and platform folders."""

    def __init__(self, packed: Packed, base: Path) -> None:
        d = packed.dirs(base, "core")
        run = base / "run-core"
        run.mkdir(parents=True, exist_ok=True)
        self.packed = packed
        self.core = EnclaveCore(SoftwareBackend(platform_dir=d["platform_dir"]), packed.path, d["state_dir"], run)

    def load(self, key_path: Path | None = None) -> None:
        self.core.load(dev_key=str(key_path or self.packed.key_path))
        assert self.core.model is not None
        self.core.model.close()
        self.core.model = None


@contextlib.contextmanager
def worker(packed: Packed, base: Path) -> Iterator[Callable[[], dict]]:
    """The real hardened worker on ``packed.path``; yields a function that loads the file in a
    fresh worker (a worker loads once: a second ``load`` is refused by its state table)."""
    d = packed.dirs(base, "worker")

    def load() -> dict:
        with EnclaveProcess(packed.path, dev_key=packed.key_path, **d) as enc:
            return enc.call("load", {"dev_key": str(packed.key_path.resolve())})

    yield load


def _open_capsule(packed: Packed, base: Path) -> None:
    with packed.open(base, "api") as cap:
        cap.predict(X)


def _classify(failures: list[str], what: str, pos: int, err: BaseException | None,
              expected: tuple[type[BaseException], ...] = REFUSED) -> None:
    if err is None:
        failures.append(f"{what}: byte {pos}: accepted")
    elif not isinstance(err, expected):
        failures.append(f"{what}: byte {pos}: {type(err).__name__}: {err}")


# -- header, manifest, signature -----------------------------------------------------------------
def test_any_flipped_bit_in_header_manifest_or_signature_is_rejected(tmp_path: Path, capsule_copy: Packed) -> None:
    """Every byte of the signed region (header, manifest) and of the signature, XOR 0x01."""
    lay = layout(capsule_copy.path)
    core = Core(capsule_copy, tmp_path)
    failures: list[str] = []
    with worker(capsule_copy, tmp_path) as worker_load:
        worker_load()  # the intact capsule loads: the checks below are not vacuous
        for pos in range(lay.signed_end):
            flip_byte(capsule_copy.path, pos)
            try:
                _classify(failures, "CapsuleFile", pos, _outcome(lambda: _open_with_capsulefile(capsule_copy.path)))
                _classify(failures, "open_capsule", pos, _outcome(lambda: _open_capsule(capsule_copy, tmp_path)))
                _classify(failures, "EnclaveCore", pos, _outcome(core.load))
                if pos < 64 or pos % 29 == 0:  # the worker runs EnclaveCore's code; a fresh one per load
                    _classify(failures, "worker", pos, _outcome(worker_load))
            finally:
                flip_byte(capsule_copy.path, pos)
        worker_load()
    assert not failures, f"{len(failures)} failures, e.g.:\n" + "\n".join(failures[:20])
    with capsule_copy.open(tmp_path, "after") as cap:  # restored: still fine
        assert_matches_reference(cap.predict(X), plain_ort(capsule_copy.model, {"input": X})[0])


def _padding_range(path: Path) -> range:
    lay = layout(path)
    assert lay.data_offset > lay.signed_end, "test needs a capsule with padding"
    return range(lay.signed_end, lay.data_offset)


def test_flipped_padding_byte_never_changes_what_is_loaded(tmp_path: Path, capsule_copy: Packed) -> None:
    """The zero padding between the signature and the data is not signed. Flipping it must never
    change the model that runs: either the capsule is refused (FormatError), or it is the same
    capsule, byte for byte in everything that is interpreted."""
    original = CapsuleFile(capsule_copy.path, trust=UnsafeTrustManifestKey())
    want_manifest = original.manifest
    original.close()
    failures: list[str] = []
    for pos in _padding_range(capsule_copy.path):
        flip_byte(capsule_copy.path, pos)
        try:
            try:
                with CapsuleFile(capsule_copy.path, trust=UnsafeTrustManifestKey()) as cf:
                    cf.verify_segments()
                    if cf.manifest != want_manifest:
                        failures.append(f"byte {pos}: accepted with another manifest")
            except FormatError:
                pass
            except Exception as e:  # noqa: BLE001
                failures.append(f"byte {pos}: {type(e).__name__}: {e}")
        finally:
            flip_byte(capsule_copy.path, pos)
    assert not failures, "\n".join(failures[:20])


def test_nonzero_padding_is_rejected(tmp_path: Path, capsule_copy: Packed) -> None:
    """Decided behaviour: the reader requires the padding after the signature to be all zeros.

    It is not covered by the signature, so without this check a capsule is malleable: anyone can
    change up to 4 KiB of a signed capsule (a covert channel, a polyglot file, a file hash that no
    longer identifies the capsule) and it still verifies. The check costs one read of < 4 KiB.
    """
    rng = random.Random(5)
    positions = rng.sample(list(_padding_range(capsule_copy.path)), 16)
    core = Core(capsule_copy, tmp_path)
    for pos in positions:
        flip_byte(capsule_copy.path, pos)
        try:
            with pytest.raises(FormatError):
                CapsuleFile(capsule_copy.path, trust=UnsafeTrustManifestKey())
            with pytest.raises(FormatError):
                core.load()
        finally:
            flip_byte(capsule_copy.path, pos)


# -- ciphertext ----------------------------------------------------------------------------------
def _data_positions(path: Path, n: int, seed: int) -> list[int]:
    lay = layout(path)
    return sorted(random.Random(seed).sample(range(lay.data_offset, lay.data_offset + lay.data_length), n))


def test_flipped_ciphertext_byte_fails_authentication_in_the_enclave(tmp_path: Path, chunked_capsule: Packed) -> None:
    """200 seeded positions across the data region (graph and every chunk of the weights)."""
    packed = copy_packed(chunked_capsule, tmp_path / "c")
    positions = _data_positions(packed.path, 200, seed=1)
    core = Core(packed, tmp_path)
    core.load()
    failures: list[str] = []
    for pos in positions:
        flip_byte(packed.path, pos)
        try:
            _classify(failures, "EnclaveCore", pos, _outcome(core.load), (IntegrityError,))
            _classify(failures, "verify_segments", pos, _outcome(lambda: _open_with_capsulefile(packed.path)),
                      (IntegrityError,))
        finally:
            flip_byte(packed.path, pos)
    core.load()
    assert not failures, f"{len(failures)} failures, e.g.:\n" + "\n".join(failures[:20])


def test_flipped_ciphertext_byte_fails_authentication_in_the_real_worker(tmp_path: Path, chunked_capsule: Packed) -> None:
    packed = copy_packed(chunked_capsule, tmp_path / "c")
    lay = layout(packed.path)
    g0, g1 = lay.segment_range("graph")
    w0, w1 = lay.segment_range("weights")
    # first and last byte of each segment, a tag byte, and some random ones
    positions = [g0, g1 - 1, w0, w1 - 1, w0 + 4096 + 3, *_data_positions(packed.path, 10, seed=2)]
    failures: list[str] = []
    with worker(packed, tmp_path) as worker_load:
        for k, pos in enumerate(positions):
            flip_byte(packed.path, pos)
            try:
                _classify(failures, "worker", pos, _outcome(worker_load), (IntegrityError,))
                if k < 3:  # the whole client path too (a new worker each time, so only a few)
                    _classify(failures, "open_capsule", pos, _outcome(lambda: _open_capsule(packed, tmp_path)),
                              (IntegrityError,))
            finally:
                flip_byte(packed.path, pos)
        worker_load()
    assert not failures, "\n".join(failures)


def test_flipped_byte_of_public_graph_is_rejected(tmp_path: Path, provider_key: ProviderKey, mlp_model) -> None:
    """With --public-architecture the graph is plaintext: its SHA-256 in the signed manifest guards it."""
    packed = pack_model(mlp_model, tmp_path / "public.capsule", provider_key, public_architecture=True)
    g0, g1 = layout(packed.path).segment_range("graph")
    core = Core(packed, tmp_path)
    failures: list[str] = []
    for pos in sorted(random.Random(3).sample(range(g0, g1), 40)):
        flip_byte(packed.path, pos)
        try:
            _classify(failures, "EnclaveCore", pos, _outcome(core.load), (IntegrityError,))
            _classify(failures, "verify_segments", pos, _outcome(lambda: _open_with_capsulefile(packed.path)),
                      (IntegrityError,))
        finally:
            flip_byte(packed.path, pos)
    assert not failures, "\n".join(failures)


# -- chunks moved, swapped, dropped (behind a valid signature) ------------------------------------
def _chunk_bounds(path: Path, seg_name: str, i: int) -> tuple[int, int]:
    lay = layout(path)
    seg = lay.segment(seg_name)
    start = lay.data_offset + seg["offset"]
    step = seg["chunk_size"] + chunks.TAG_LEN
    return start + i * step, min(start + (i + 1) * step, start + seg["length"])


def _n_chunks(path: Path, seg_name: str) -> int:
    seg = layout(path).segment(seg_name)
    return chunks.n_chunks(seg["plain_length"], seg["chunk_size"])


def _read(path: Path, a: int, b: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(a)
        return f.read(b - a)


def _assert_enclave_refuses(packed: Packed, base: Path, expected: tuple[type[BaseException], ...] = (IntegrityError,)) -> None:
    # the host-side reader is satisfied: the signature and the (fixed-up) hashes are valid ...
    with CapsuleFile(packed.path, trust=UnsafeTrustManifestKey()) as cf:
        cf.verify_segments()
    # ... so only the enclave's authenticated decryption stands between the attacker and the model
    with pytest.raises(expected):
        Core(packed, base).load()
    with pytest.raises(expected):
        _open_capsule(packed, base)


def test_resigned_capsule_with_unchanged_chunks_still_loads(tmp_path: Path, chunked_capsule: Packed,
                                                            provider_key: ProviderKey) -> None:
    """Control for the tests below: re-signing alone breaks nothing."""
    packed = copy_packed(chunked_capsule, tmp_path / "c")
    resign(packed.path, None, provider_key, rehash=True)
    assert _n_chunks(packed.path, "weights") >= 3
    with packed.open(tmp_path) as cap:
        assert_matches_reference(cap.predict(X), plain_ort(packed.model, {"input": X})[0])


def test_chunk_swapped_from_another_capsule_is_rejected(tmp_path: Path, chunked_capsule: Packed,
                                                        provider_key: ProviderKey) -> None:
    """Same model, same provider, same chunk position, other capsule (other key and id)."""
    a = copy_packed(chunked_capsule, tmp_path / "a")
    b = pack_model(a.model, tmp_path / "b.capsule", provider_key, chunk_size=4096)
    lo, hi = _chunk_bounds(a.path, "weights", 1)
    assert _chunk_bounds(b.path, "weights", 1) == (lo, hi)
    stolen = _read(b.path, lo, hi)
    assert stolen != _read(a.path, lo, hi)
    write_at(a.path, lo, stolen)
    resign(a.path, None, provider_key, rehash=True)
    _assert_enclave_refuses(a, tmp_path)


@pytest.mark.parametrize("binding", ["capsule_id", "version", "total", "segment", "index"])
def test_chunk_reencrypted_for_another_context_is_rejected(tmp_path: Path, chunked_capsule: Packed,
                                                           provider_key: ProviderKey, binding: str) -> None:
    """Even under the capsule's own content key, a chunk made for another capsule id, version,
    segment, position or chunk count does not authenticate (what the AAD and nonce bind)."""
    packed = copy_packed(chunked_capsule, tmp_path / "c")
    m = packed.manifest
    key = ContentKey.load(packed.key_path).key
    seg = layout(packed.path).segment("weights")
    total = _n_chunks(packed.path, "weights")
    i = 1
    lo, hi = _chunk_bounds(packed.path, "weights", i)
    aead = AESGCM(key)
    plain = aead.decrypt(chunks.nonce(seg["index"], i), _read(packed.path, lo, hi),
                         chunks.aad(m.capsule_id, m.version, seg["index"], i, total))
    ctx = {"capsule_id": m.capsule_id, "version": m.version, "segment": seg["index"], "index": i, "total": total}
    ctx[binding] = {"capsule_id": uuid.uuid4(), "version": m.version + 1, "total": total + 1,
                    "segment": seg["index"] - 1, "index": i + 1}[binding]
    forged = aead.encrypt(chunks.nonce(ctx["segment"], ctx["index"]), plain,
                          chunks.aad(ctx["capsule_id"], ctx["version"], ctx["segment"], ctx["index"], ctx["total"]))
    assert len(forged) == hi - lo
    write_at(packed.path, lo, forged)
    resign(packed.path, None, provider_key, rehash=True)
    _assert_enclave_refuses(packed, tmp_path)


def test_chunk_moved_within_capsule_is_rejected(tmp_path: Path, chunked_capsule: Packed,
                                                provider_key: ProviderKey) -> None:
    packed = copy_packed(chunked_capsule, tmp_path / "c")
    (a0, a1), (b0, b1) = _chunk_bounds(packed.path, "weights", 0), _chunk_bounds(packed.path, "weights", 1)
    assert a1 - a0 == b1 - b0 == 4096 + chunks.TAG_LEN
    first, second = _read(packed.path, a0, a1), _read(packed.path, b0, b1)
    write_at(packed.path, a0, second)
    write_at(packed.path, b0, first)
    resign(packed.path, None, provider_key, rehash=True)
    _assert_enclave_refuses(packed, tmp_path)


def test_chunk_duplicated_within_capsule_is_rejected(tmp_path: Path, chunked_capsule: Packed,
                                                     provider_key: ProviderKey) -> None:
    packed = copy_packed(chunked_capsule, tmp_path / "c")
    a0, a1 = _chunk_bounds(packed.path, "weights", 0)
    b0, _ = _chunk_bounds(packed.path, "weights", 2)
    write_at(packed.path, b0, _read(packed.path, a0, a1))
    resign(packed.path, None, provider_key, rehash=True)
    _assert_enclave_refuses(packed, tmp_path)


def test_segment_truncated_at_a_chunk_boundary_is_rejected(tmp_path: Path, chunked_capsule: Packed,
                                                           provider_key: ProviderKey) -> None:
    """Drop the weights' last chunk and re-sign a consistent manifest: the chunk count in the AAD catches it."""
    packed = copy_packed(chunked_capsule, tmp_path / "c")
    lay = layout(packed.path)
    seg = lay.segment("weights")
    assert seg["index"] == len(lay.manifest["segments"]) - 1  # the last segment: dropping its tail keeps the tiling
    n = _n_chunks(packed.path, "weights")
    cut, _ = _chunk_bounds(packed.path, "weights", n - 1)
    data = packed.path.read_bytes()[lay.data_offset:cut]

    def shorten(m: dict) -> None:
        s = next(s for s in m["segments"] if s["name"] == "weights")
        s["plain_length"] = (n - 1) * s["chunk_size"]
        s["length"] = (n - 1) * (s["chunk_size"] + chunks.TAG_LEN)

    resign(packed.path, shorten, provider_key, data=data, rehash=True)
    _assert_enclave_refuses(packed, tmp_path)


# -- structure: truncation, lengths, versions --------------------------------------------------------
def test_truncated_capsule_is_rejected(tmp_path: Path, capsule_copy: Packed) -> None:
    original = capsule_copy.path.read_bytes()
    lay = layout(capsule_copy.path)
    cuts = sorted({0, 1, 8, 63, 64, 65, 64 + lay.manifest_length, lay.signed_end - 1, lay.signed_end,
                   lay.data_offset - 1, lay.data_offset, lay.data_offset + 1, len(original) // 2 + lay.data_offset // 2,
                   len(original) - 17, len(original) - 1})
    core = Core(capsule_copy, tmp_path)
    failures: list[str] = []
    with worker(capsule_copy, tmp_path) as worker_load:
        for cut in cuts:
            capsule_copy.path.write_bytes(original[:cut])
            _classify(failures, "CapsuleFile", cut, _outcome(lambda: _open_with_capsulefile(capsule_copy.path)), (FormatError,))
            _classify(failures, "open_capsule", cut, _outcome(lambda: _open_capsule(capsule_copy, tmp_path)), (FormatError,))
            _classify(failures, "EnclaveCore", cut, _outcome(core.load), (FormatError,))
            _classify(failures, "worker", cut, _outcome(worker_load), (FormatError,))
        for extra in (b"\0", b"x" * 4096):  # trailing bytes are refused too
            capsule_copy.path.write_bytes(original + extra)
            _classify(failures, "CapsuleFile(+trailing)", len(extra), _outcome(lambda: _open_with_capsulefile(capsule_copy.path)), (FormatError,))
            _classify(failures, "worker(+trailing)", len(extra), _outcome(worker_load), (FormatError,))
        capsule_copy.path.write_bytes(original)
        worker_load()
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("field,offset,fmt,value", [
    ("manifest length", 16, "<I", 0xFFFFFFFF),
    ("manifest length", 16, "<I", MAX_MANIFEST + 1),
    ("manifest length", 16, "<I", MAX_MANIFEST),
    ("manifest length", 16, "<I", 0),
    ("manifest length", 16, "<I", 1),
    ("data offset", 24, "<Q", 2**64 - 1),
    ("data offset", 24, "<Q", 2**40),
    ("data offset", 24, "<Q", 0),
    ("data length", 32, "<Q", 2**64 - 1),
    ("data length", 32, "<Q", 2**40),
])
def test_absurd_manifest_length_is_rejected(tmp_path: Path, capsule_copy: Packed, field: str, offset: int,
                                            fmt: str, value: int) -> None:
    """Absurd lengths are refused from the header alone: quickly, without reading or allocating them."""
    import struct

    write_at(capsule_copy.path, offset, struct.pack(fmt, value))
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(FormatError):
            CapsuleFile(capsule_copy.path, trust=UnsafeTrustManifestKey())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 1.0
    assert peak < 1 << 20, f"{field}={value}: reader allocated {peak} bytes"
    with pytest.raises(FormatError):
        Core(capsule_copy, tmp_path).load()


@pytest.mark.parametrize("major", [0, 2, 0xFFFF])
def test_unknown_major_version_is_rejected(tmp_path: Path, capsule_copy: Packed, provider_key: ProviderKey,
                                           cli, major: int) -> None:
    import struct

    write_at(capsule_copy.path, 8, struct.pack("<H", major))
    with pytest.raises(UnsupportedVersionError):
        CapsuleFile(capsule_copy.path, trust=UnsafeTrustManifestKey())
    with pytest.raises(UnsupportedVersionError):
        Core(capsule_copy, tmp_path).load()
    r = cli("verify", capsule_copy.path)
    assert r.code == UnsupportedVersionError.exit_code == 3
    assert "not supported" in assert_one_line_error(r.err)
    # a validly signed header with that version is refused just the same
    resign(capsule_copy.path, None, provider_key, major=major)
    with pytest.raises(UnsupportedVersionError):
        CapsuleFile(capsule_copy.path, trust=UnsafeTrustManifestKey())
    with pytest.raises(UnsupportedVersionError):
        _open_capsule(capsule_copy, tmp_path)


def test_unknown_manifest_field_is_rejected_even_when_signed(tmp_path: Path, capsule_copy: Packed,
                                                             provider_key: ProviderKey) -> None:
    """A manifest from a newer minor format with fields this build does not understand is refused,
    rather than silently ignoring (say) a new policy term."""
    resign(capsule_copy.path, lambda m: m["policy"].update(new_term=1), provider_key)
    with pytest.raises(FormatError):
        CapsuleFile(capsule_copy.path, trust=UnsafeTrustManifestKey())
    with pytest.raises(FormatError):
        Core(capsule_copy, tmp_path).load()


# -- keys -----------------------------------------------------------------------------------------
def test_manifest_signed_by_another_key_is_rejected(tmp_path: Path, capsule_copy: Packed,
                                                    other_provider_key: ProviderKey, provider_key: ProviderKey) -> None:
    """The attacker edits the manifest (here: a budget) and signs with its own key, keeping the
    provider's key in the manifest."""
    resign(capsule_copy.path, lambda m: m["policy"].update(budget=10**9), other_provider_key)
    assert layout(capsule_copy.path).manifest["provider"]["key"] == b64(provider_key.raw)
    with pytest.raises(SignatureError):
        CapsuleFile(capsule_copy.path, trust=UnsafeTrustManifestKey())
    with pytest.raises(SignatureError):
        CapsuleFile(capsule_copy.path, trust=TrustProviderKey(provider_key.raw))
    with pytest.raises(SignatureError):
        _open_capsule(capsule_copy, tmp_path)
    with pytest.raises(SignatureError):
        Core(capsule_copy, tmp_path).load()
    with worker(capsule_copy, tmp_path) as worker_load, pytest.raises(SignatureError):
        worker_load()


def test_capsule_rekeyed_by_attacker_is_refused_when_the_provider_is_pinned(
        tmp_path: Path, capsule_copy: Packed, mlp_capsule: Packed, other_provider_key: ProviderKey,
        provider_key: ProviderKey, cli) -> None:
    """The attacker replaces the provider key in the manifest with its own and re-signs: the capsule
    is self-consistent, so only pinning the provider's key tells it apart."""
    resign(capsule_copy.path, lambda m: m["provider"].update(key=b64(other_provider_key.raw), name="Evil Corp"),
           other_provider_key)
    with CapsuleFile(capsule_copy.path, trust=UnsafeTrustManifestKey()) as cf:  # integrity only: documented, origin is not checked
        assert cf.manifest.provider_key == other_provider_key.raw
    with pytest.raises(SignatureError):
        CapsuleFile(capsule_copy.path, trust=TrustProviderKey(provider_key.raw))
    with pytest.raises(SignatureError):
        _open_capsule_pinned(capsule_copy, tmp_path, provider_key.raw)
    r = cli("verify", capsule_copy.path, "--trust", provider_key.pub_path)
    assert r.code == SignatureError.exit_code == 4
    assert_one_line_error(r.err)
    assert "OK" not in r.out
    # control: the provider's untouched capsule passes the same pinned check
    ok = cli("verify", mlp_capsule.path, "--trust", provider_key.pub_path)
    assert ok.code == 0, ok.err
    assert "signed by the trusted provider key" in " ".join(ok.out.split())


def _open_capsule_pinned(packed: Packed, base: Path, trusted: bytes) -> None:
    with packed.open(base, "pinned", trust=TrustProviderKey(trusted)) as cap:
        cap.predict(X)


def test_content_key_of_another_capsule_is_rejected(tmp_path: Path, capsule_copy: Packed, chunked_capsule: Packed) -> None:
    wrong_key = chunked_capsule.key_path
    assert ContentKey.load(wrong_key).capsule_id != capsule_copy.manifest.capsule_id
    with pytest.raises(IntegrityError):
        Core(capsule_copy, tmp_path).load(wrong_key)
    with pytest.raises(IntegrityError):
        with mlcapsule.open_capsule(capsule_copy.path, trust=UnsafeTrustManifestKey(), unsafe_dev_key=wrong_key, **capsule_copy.dirs(tmp_path)) as cap:
            cap.predict(X)


def test_forged_content_key_for_this_capsule_is_rejected(tmp_path: Path, capsule_copy: Packed) -> None:
    """Right capsule id and version, wrong key bytes: the first chunk fails to authenticate."""
    m = capsule_copy.manifest
    forged = tmp_path / "forged.key"
    ContentKey(m.capsule_id, m.version, os.urandom(32)).save(forged)
    with pytest.raises(IntegrityError):
        Core(capsule_copy, tmp_path).load(forged)
    with pytest.raises(IntegrityError):
        with mlcapsule.open_capsule(capsule_copy.path, trust=UnsafeTrustManifestKey(), unsafe_dev_key=forged, **capsule_copy.dirs(tmp_path)) as cap:
            cap.predict(X)


@pytest.mark.parametrize("content", [b"", b"{}", b"not json", b'{"format": "mlcapsule-content-key/v1", "key": 5}',
                                     b'{"format": "mlcapsule-content-key/v1", "capsule_id": "x", "version": 1, "key": "AAAA"}'])
def test_malformed_content_key_file_is_rejected(tmp_path: Path, capsule_copy: Packed, content: bytes) -> None:
    bad = tmp_path / "bad.key"
    bad.write_bytes(content)
    os.chmod(bad, 0o600)
    err = _outcome(lambda: Core(capsule_copy, tmp_path).load(bad))
    assert isinstance(err, KeyFileError), repr(err)


def test_content_key_readable_by_others_is_rejected(tmp_path: Path, capsule_copy: Packed) -> None:
    os.chmod(capsule_copy.key_path, 0o644)
    with pytest.raises(KeyFileError):
        Core(capsule_copy, tmp_path).load()


def test_every_refusal_is_an_mlcapsule_error_with_the_documented_exit_code() -> None:
    assert FormatError.exit_code == 3 and IntegrityError.exit_code == 4
    assert issubclass(UnsupportedVersionError, FormatError) and issubclass(SignatureError, IntegrityError)
    assert all(issubclass(c, MlcapsuleError) for c in REFUSED)
