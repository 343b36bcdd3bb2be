"""Shared fixtures for the mlcapsule test suite.

Isolation: every test gets ``MLCAPSULE_HOME`` pointing into its own ``tmp_path`` (autouse
fixture below), so nothing touches ``~/.local/share``; session-scoped fixtures pack into their
own ``tmp_path_factory`` folders with explicit paths and never read ``MLCAPSULE_HOME``. Each
capsule that is opened gets its own state and platform folders (:meth:`Packed.dirs`).

Helpers for attacks behind the signature check (as python-tuf's repository simulator does):

* :func:`resign` rewrites a capsule's manifest (and optionally header fields) and signs it again
  with any key, so a test can reach the AEAD or the enclave with a structurally valid capsule.
* :func:`layout`, :func:`flip_byte`, :func:`copy_packed` for byte-level tampering.

CLI helpers: the ``cli`` fixture runs ``mlcapsule.cli.main.main([...])`` in-process (exit code,
stdout, stderr via capsys); the ``run_cli`` fixture runs the installed ``mlcapsule`` script in a
subprocess with ``MLCAPSULE_HOME`` set.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import settings

from mlcapsule.enclave.crypto.keys import generate_provider_key, load_provider_key, raw_public

# -- hypothesis profiles ------------------------------------------------------------------------
# "ci" (the default, and always when CI=true): derandomized, so every run tries the same examples
# and CI never turns red on an unlucky seed. "dev" (HYPOTHESIS_PROFILE=dev): a fresh random seed
# every run and more examples, to hunt for bugs locally. Loaded here, before any test module is
# imported, so a test's own @settings(...) inherit derandomize from the profile (none sets it).
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", max_examples=2000, derandomize=False, deadline=None)
HYPOTHESIS_PROFILE = ("ci" if os.environ.get("CI", "").lower() == "true"
                      else os.environ.get("HYPOTHESIS_PROFILE") or "ci")
settings.load_profile(HYPOTHESIS_PROFILE)

# -- paths --------------------------------------------------------------------------------------
REPO = Path(__file__).resolve().parent.parent


def mlcapsule_exe() -> str:
    """The installed console script of the running environment (the dev venv's .venv/bin/mlcapsule)."""
    candidate = Path(sys.executable).parent / "mlcapsule"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("mlcapsule")
    if found:
        return found
    pytest.skip("the mlcapsule console script is not installed in this environment")
    raise AssertionError  # unreachable


# -- isolation ----------------------------------------------------------------------------------
@pytest.fixture(scope="session", autouse=True)
def _session_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A safety net: even session-scoped code never sees the real ~/.local/share/mlcapsule."""
    home = tmp_path_factory.mktemp("session-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLCAPSULE_HOME", str(home))
        mp.delenv("MLCAPSULE_PASSPHRASE", raising=False)
        mp.delenv("MLCAPSULE_DEBUG", raising=False)
        yield home


@pytest.fixture(autouse=True)
def mlcapsule_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Per-test MLCAPSULE_HOME inside tmp_path."""
    home = tmp_path / "mlcapsule-home"
    home.mkdir()
    monkeypatch.setenv("MLCAPSULE_HOME", str(home))
    monkeypatch.delenv("MLCAPSULE_PASSPHRASE", raising=False)
    monkeypatch.delenv("MLCAPSULE_DEBUG", raising=False)
    return home


# -- keys ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProviderKey:
    path: Path  # PKCS#8 PEM private key, mode 0600
    pub_path: Path  # SubjectPublicKeyInfo PEM (path + ".pub")
    private: Ed25519PrivateKey
    raw: bytes  # raw 32-byte public key, as the manifest names it

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)


def make_provider_key(path: Path, passphrase: bytes | None = None) -> ProviderKey:
    generate_provider_key(path, passphrase=passphrase)
    private = load_provider_key(path, passphrase=passphrase)
    return ProviderKey(path, Path(str(path) + ".pub"), private, raw_public(private.public_key()))


@pytest.fixture(scope="session")
def provider_key(tmp_path_factory: pytest.TempPathFactory) -> ProviderKey:
    return make_provider_key(tmp_path_factory.mktemp("provider") / "provider-key.pem")


@pytest.fixture(scope="session")
def other_provider_key(tmp_path_factory: pytest.TempPathFactory) -> ProviderKey:
    """Someone else's key (an attacker's, or another provider's)."""
    return make_provider_key(tmp_path_factory.mktemp("attacker") / "attacker-key.pem")


# -- models and capsules ------------------------------------------------------------------------
@dataclass
class Packed:
    """A packed capsule and what a test needs to open it."""

    path: Path
    key_path: Path
    model: onnx.ModelProto
    manifest: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def dirs(self, base: Path, tag: str = "") -> dict[str, Path]:
        """Own state and platform folders for this capsule under ``base``."""
        name = self.path.stem + (f"-{tag}" if tag else "")
        return {"state_dir": base / f"state-{name}", "platform_dir": base / f"platform-{name}"}

    def open(self, base: Path, tag: str = "", **kwargs: Any) -> Any:
        import mlcapsule

        from mlcapsule.enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey

        kwargs.setdefault("unsafe_dev_key", self.key_path)
        # The key the packer signed with (a pin taken at pack time, not from the file opened).
        kwargs.setdefault("trust", TrustProviderKey(self.manifest.provider_key) if self.manifest is not None
                          else UnsafeTrustManifestKey())
        return mlcapsule.open_capsule(self.path, **self.dirs(base, tag), **kwargs)


def pack_model(model: onnx.ModelProto | str | Path, out: Path, key: ProviderKey, **kwargs: Any) -> Packed:
    import mlcapsule

    res = mlcapsule.pack(model, out, provider_key=key.path, **kwargs)
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    return Packed(res.capsule_path, res.key_path, proto, res.manifest)


def copy_packed(p: Packed, dest_dir: Path, name: str | None = None) -> Packed:
    """A private copy (capsule and key file, modes kept) that a test may damage."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    name = name or p.path.name
    path = dest_dir / name
    key = dest_dir / (name + ".key")
    shutil.copy2(p.path, path)
    shutil.copy2(p.key_path, key)
    os.chmod(key, 0o600)
    return Packed(path, key, p.model, p.manifest, dict(p.extra))


@pytest.fixture(scope="session")
def mlp_model() -> onnx.ModelProto:
    from mlcapsule.demo import models

    # 16 -> 64 -> 32 -> 5: about 13 KB of float32 weights (4 chunks at chunk_size=4096).
    return models.mlp(16, [64, 32], 5, seed=1)


@pytest.fixture(scope="session")
def mlp_capsule(tmp_path_factory: pytest.TempPathFactory, provider_key: ProviderKey, mlp_model: onnx.ModelProto) -> Packed:
    """Read-only: tests that modify it must use :func:`copy_packed` first."""
    return pack_model(mlp_model, tmp_path_factory.mktemp("mlp") / "mlp.capsule", provider_key, name="mlp",
                      class_names=["a", "b", "c", "d", "e"])


@pytest.fixture(scope="session")
def chunked_capsule(tmp_path_factory: pytest.TempPathFactory, provider_key: ProviderKey,
                    mlp_model: onnx.ModelProto) -> Packed:
    """The MLP with 4 KiB chunks, so its weights segment has several chunks. Read-only."""
    return pack_model(mlp_model, tmp_path_factory.mktemp("chunked") / "chunked.capsule", provider_key,
                      chunk_size=4096)


@pytest.fixture
def capsule_copy(tmp_path: Path, mlp_capsule: Packed) -> Packed:
    return copy_packed(mlp_capsule, tmp_path / "copy")


@pytest.fixture(scope="session")
def mobilenet_model() -> onnx.ModelProto:
    from mlcapsule.demo import models

    return models.mobilenet_v2(num_classes=1000, image_size=224, seed=0)


@pytest.fixture(scope="session")
def mobilenet_capsule(tmp_path_factory: pytest.TempPathFactory, provider_key: ProviderKey,
                      mobilenet_model: onnx.ModelProto) -> Packed:
    """MobileNetV2 packed once per session through the Python API."""
    return pack_model(mobilenet_model, tmp_path_factory.mktemp("mobilenet") / "mobilenet.capsule", provider_key)


def plain_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Plain ONNX Runtime on the unprotected model: the reference every capsule must equal."""
    import onnxruntime

    sess = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_matches_reference(got: np.ndarray, ref: np.ndarray) -> None:
    """≤ 1e-5 relative, with an absolute floor of 1e-5 * max|ref| (exact for non-floats)."""
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape and got.dtype == ref.dtype, (got.shape, got.dtype, ref.shape, ref.dtype)
    if ref.dtype.kind in "fc":
        scale = float(np.max(np.abs(ref))) if ref.size else 0.0
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * scale)
    else:
        np.testing.assert_array_equal(got, ref)


# -- byte-level tampering -----------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    manifest_length: int
    data_offset: int
    data_length: int
    manifest: dict[str, Any]

    @property
    def signature_offset(self) -> int:
        return 64 + self.manifest_length

    @property
    def signed_end(self) -> int:
        """End of header + manifest + signature; the zero padding follows, up to data_offset."""
        return 64 + self.manifest_length + 64

    def segment(self, name: str) -> dict[str, Any]:
        return next(s for s in self.manifest["segments"] if s["name"] == name)

    def segment_range(self, name: str) -> tuple[int, int]:
        """Absolute file offsets [start, end) of a segment's stored bytes."""
        s = self.segment(name)
        return self.data_offset + s["offset"], self.data_offset + s["offset"] + s["length"]


def layout(path: Path) -> Layout:
    """Parse a (possibly re-signed) capsule's header and manifest without verifying anything."""
    with open(path, "rb") as f:
        header = f.read(64)
        mlen, doff, dlen = struct.unpack_from("<I", header, 16)[0], *struct.unpack_from("<QQ", header, 24)
        manifest = json.loads(f.read(mlen))
    return Layout(mlen, doff, dlen, manifest)


def flip_byte(path: Path, offset: int, mask: int = 0x01) -> None:
    """XOR one byte of a file in place (call twice to undo)."""
    fd = os.open(path, os.O_RDWR)
    try:
        b = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([b[0] ^ mask]), offset)
    finally:
        os.close(fd)


def write_at(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _signer(key: ProviderKey | Ed25519PrivateKey | str | Path) -> Ed25519PrivateKey:
    if isinstance(key, ProviderKey):
        return key.private
    if isinstance(key, Ed25519PrivateKey):
        return key
    return load_provider_key(key)


def resign(
    capsule_path: str | Path,
    change: dict[str, Any] | Callable[[dict[str, Any]], dict[str, Any] | None] | None,
    key: ProviderKey | Ed25519PrivateKey | str | Path,
    *,
    out: str | Path | None = None,
    data: bytes | None = None,
    rehash: bool = False,
    major: int | None = None,
    minor: int | None = None,
) -> Path:
    """Rewrite a capsule's manifest and sign it again with ``key``.

    ``change`` is a new manifest dict, or a function that edits the manifest dict in place (or
    returns a replacement). ``data`` replaces the data region (default: the current one, as it
    is in the file). ``rehash`` recomputes every segment's ``sha256`` from the data, so only the
    AEAD can catch a change to ciphertext. ``major``/``minor`` override the header's version.
    The provider key the manifest names is *not* changed: edit ``manifest["provider"]["key"]``
    in ``change`` for a fully re-keyed capsule. Writes to ``out`` (default: in place).
    """
    from mlcapsule.enclave._util import canonical_json
    from mlcapsule.enclave.format import container as ct

    capsule_path = Path(capsule_path)
    blob = capsule_path.read_bytes()
    lay = layout(capsule_path)
    manifest = json.loads(json.dumps(lay.manifest))
    if callable(change):
        replaced = change(manifest)
        if replaced is not None:
            manifest = replaced
    elif change is not None:
        manifest = change
    body = blob[lay.data_offset:] if data is None else data
    if rehash:
        for s in manifest["segments"]:
            s["sha256"] = hashlib.sha256(body[s["offset"]:s["offset"] + s["length"]]).hexdigest()
    mbytes = canonical_json(manifest)
    doff = ct._align(ct.HEADER_LEN + len(mbytes) + ct.SIG_LEN)
    header = ct._HEADER.pack(ct.MAGIC, ct.MAJOR if major is None else major, ct.MINOR if minor is None else minor,
                             0, len(mbytes), ct.SIG_LEN, 0, doff, len(body), bytes(24))
    sig = _signer(key).sign(ct.signed_message(header, mbytes))
    head = header + mbytes + sig
    target = Path(out) if out is not None else capsule_path
    target.write_bytes(head + bytes(doff - len(head)) + body)
    return target


def b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode("ascii")


# -- CLI ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str

    @property
    def err_lines(self) -> list[str]:
        return [ln for ln in self.err.splitlines() if ln.strip()]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., CliResult]:
    """Run the CLI in-process: ``cli("verify", path)`` -> CliResult(code, out, err)."""
    from mlcapsule.cli.main import main

    def run(*args: str | os.PathLike[str]) -> CliResult:
        capsys.readouterr()  # drop whatever came before
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    return run


def cli_env(home: str | os.PathLike[str] | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"})
    env.pop("MLCAPSULE_PASSPHRASE", None)
    env.pop("MLCAPSULE_DEBUG", None)
    if home is not None:
        env["MLCAPSULE_HOME"] = str(home)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the installed ``mlcapsule`` script: ``run_cli(["verify", path], home=...)``.

    ``home`` defaults to the current MLCAPSULE_HOME (the calling test's own folder).
    """
    exe = mlcapsule_exe()

    def run(args: list[str | os.PathLike[str]], *, home: str | os.PathLike[str] | None = None,
            cwd: str | os.PathLike[str] | None = None, timeout: float = 300, **extra_env: str,
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                              env=cli_env(home, **extra_env), stdin=subprocess.DEVNULL)

    return run


def assert_one_line_error(stderr: str, *, allow_warning: bool = False) -> str:
    """stderr has exactly one error line and no traceback; returns it.

    ``allow_warning``: `run --unsafe-dev-key` prints its warning line first, by design.
    """
    assert "Traceback" not in stderr, stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    if allow_warning:
        lines = [ln for ln in lines if not ln.startswith("warning:")]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:"), stderr
    return lines[0]
