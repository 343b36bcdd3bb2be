"""Provider signing keys and per-capsule content keys, as files.

* Provider key: Ed25519, PKCS#8 PEM, optionally encrypted with a passphrase, file mode 0600.
* Content key: 32 random bytes for AES-256-GCM, one per capsule version, in a small JSON file
  (mode 0600) that stays with the provider and never travels with the capsule.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .._util import atomic_write, b64d, b64e
from ..errors import KeyFileError, SignatureError, UsageError

CONTENT_KEY_FORMAT = "mlcapsule-content-key/v1"
CONTENT_KEY_LEN = 32


def _check_private_file(path: Path) -> None:
    st = path.stat()
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} is readable by other users (mode {stat.S_IMODE(st.st_mode):o})",
            hint=f"run `chmod 600 {path}`",
        )


def generate_provider_key(path: str | os.PathLike[str], *, passphrase: bytes | None = None,
                          overwrite: bool = False) -> Ed25519PublicKey:
    path = Path(path)
    if path.exists() and not overwrite:
        raise UsageError(f"{path} already exists", hint="choose another path, or pass --force to replace it")
    key = Ed25519PrivateKey.generate()
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    atomic_write(path, pem, mode=0o600)
    pub = key.public_key()
    atomic_write(path.with_suffix(path.suffix + ".pub"), public_key_pem(pub), mode=0o644)
    return pub


def load_provider_key(path: str | os.PathLike[str], *, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    path = Path(path)
    if not path.is_file():
        raise KeyFileError(f"no provider key at {path}", hint="create one with `mlcapsule provider init`")
    _check_private_file(path)
    data = path.read_bytes()
    try:
        key = serialization.load_pem_private_key(data, password=passphrase or None)
    except TypeError as e:
        if b"ENCRYPTED" in data and not passphrase:
            raise KeyFileError(f"provider key {path} is protected by a passphrase",
                               hint="pass it with --passphrase-file or MLCAPSULE_PASSPHRASE") from e
        raise KeyFileError(f"provider key {path} is not protected by a passphrase, but one was given",
                           hint="omit the passphrase") from e
    except ValueError as e:
        raise KeyFileError(f"cannot read provider key {path}: wrong passphrase or not a PEM private key") from e
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"provider key {path} is not an Ed25519 key")
    return key


def public_key_pem(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def raw_public(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def ed25519_public_from_raw(raw: bytes) -> Ed25519PublicKey:
    if len(raw) != 32:
        raise SignatureError("an Ed25519 public key must be 32 bytes")
    return Ed25519PublicKey.from_public_bytes(raw)


def verify_ed25519(pub: Ed25519PublicKey, signature: bytes, message: bytes, *, what: str) -> None:
    try:
        pub.verify(signature, message)
    except InvalidSignature as e:
        raise SignatureError(f"the {what} signature does not verify") from e


def key_id(pub: Ed25519PublicKey) -> str:
    """A short, stable name for a public key: the first 16 hex digits of SHA-256 of its raw bytes."""
    from hashlib import sha256

    return sha256(raw_public(pub)).hexdigest()[:16]


@dataclass(frozen=True)
class ContentKey:
    capsule_id: uuid.UUID
    version: int
    key: bytes

    def to_json(self) -> bytes:
        return json.dumps({
            "format": CONTENT_KEY_FORMAT,
            "capsule_id": str(self.capsule_id),
            "version": self.version,
            "key": b64e(self.key),
        }, indent=1).encode()

    def save(self, path: str | os.PathLike[str]) -> None:
        atomic_write(path, self.to_json(), mode=0o600)

    @classmethod
    def generate(cls, capsule_id: uuid.UUID, version: int) -> ContentKey:
        return cls(capsule_id, version, os.urandom(CONTENT_KEY_LEN))

    @classmethod
    def from_json(cls, data: bytes) -> ContentKey:
        try:
            obj = json.loads(data)
            if obj.get("format") != CONTENT_KEY_FORMAT:
                raise ValueError("format")
            key = b64d(obj["key"])
            if len(key) != CONTENT_KEY_LEN:
                raise ValueError("length")
            return cls(uuid.UUID(obj["capsule_id"]), int(obj["version"]), key)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:  # deep nesting (fuzzing)
            raise KeyFileError("not a valid mlcapsule content key file") from e

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ContentKey:
        path = Path(path)
        if not path.is_file():
            raise KeyFileError(f"no content key file at {path}",
                               hint="`mlcapsule pack` writes it next to the capsule as NAME.capsule.key")
        _check_private_file(path)
        return cls.from_json(path.read_bytes())
