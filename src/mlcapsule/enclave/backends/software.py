"""The `software` backend: a hardened worker process, with secrets in per-installation files.

What it protects against: other unprivileged processes of other users (file modes 0600, a
non-dumpable worker that they cannot ptrace or read), the client's *own application code*
reading weights by accident (nothing secret crosses the host interface), and data leaving the
machine from the enclave (seccomp denies networking).

What it does NOT protect against: the machine's owner or root. They can read the platform
secret and derive the sealing key, attach a debugger after changing the worker's dumpable
flag, read /proc/kcore, or restore an old copy of the counter and sealed state (rollback is not
detected). The provider's server accepts `software` evidence only when told to, loudly.

Platform folder (``$MLCAPSULE_HOME/platform/software``):
    secret            32 random bytes (0600): root of the sealing keys
    platform-key.pem  Ed25519 key (0600) that signs evidence
    counters/NAME     monotonic counters, one decimal number each
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .._util import atomic_write, b64e, canonical_json, data_home
from ..errors import EnclaveError, IntegrityError
from ..measurement import measurement
from .base import Backend, ThreatModel

SEAL_MAGIC = b"MLSEAL1\0"
EVIDENCE_TYPE = "software"


class SoftwareBackend(Backend):
    name = "software"
    threat_model = ThreatModel(
        protects_against=(
            "other unprivileged users' processes reading the model (0600 files, non-dumpable worker)",
            "the client application reading weights or keys through the enclave interface",
            "the enclave sending data over the network (seccomp denies sockets)",
            "the enclave reading files outside the capsule and its state (Landlock, where the kernel has it)",
        ),
        does_not_protect_against=(
            "the machine's owner or root: they can read the platform secret, the worker's memory and the keys",
            "restoring an old copy of the sealed state or counters (rollback is NOT detected)",
            "a modified mlcapsule installation (the measurement is self-reported)",
        ),
        rollback_protected=False,
    )

    def __init__(self, platform_dir: str | os.PathLike[str] | None = None) -> None:
        self.dir = Path(platform_dir) if platform_dir else data_home() / "platform" / "software"
        self._secret: bytes | None = None
        self._key: Ed25519PrivateKey | None = None

    # -- platform files ---------------------------------------------------------------------
    def _ensure(self) -> None:
        if self._secret is not None:
            return
        secret_path, key_path = self.dir / "secret", self.dir / "platform-key.pem"
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if not secret_path.exists():
                atomic_write(secret_path, os.urandom(32), mode=0o600)
            if not key_path.exists():
                pem = Ed25519PrivateKey.generate().private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
                atomic_write(key_path, pem, mode=0o600)
            secret = secret_path.read_bytes()
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except OSError as e:
            raise EnclaveError(f"cannot use the software platform folder {self.dir}: {e.strerror}",
                               hint="check its permissions, or set MLCAPSULE_HOME") from e
        if len(secret) != 32 or not isinstance(key, Ed25519PrivateKey):
            raise EnclaveError(f"the software platform folder {self.dir} is damaged",
                               hint="restore it from a backup; a new one cannot open existing sealed state")
        self._secret, self._key = secret, key

    def paths(self) -> tuple[list[str], list[str]]:
        return [], [str(self.dir)]

    def platform_public_key(self) -> bytes:
        self._ensure()
        assert self._key is not None
        return self._key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    # -- Backend ----------------------------------------------------------------------------
    def measurement(self) -> bytes:
        return measurement()

    def evidence(self, report_data: bytes) -> dict[str, Any]:
        self._ensure()
        assert self._key is not None
        body = {
            "type": EVIDENCE_TYPE,
            "version": 1,
            "measurement": self.measurement().hex(),
            "report_data": b64e(report_data),
            "platform_key": b64e(self.platform_public_key()),
        }
        return {**body, "signature": b64e(self._key.sign(b"mlcapsule-evidence/software/v1\0" + canonical_json(body)))}

    def _seal_key(self) -> AESGCM:
        self._ensure()
        # Bound to this installation's platform secret, not to the measurement: an upgraded
        # mlcapsule must open the state the previous one sealed (docs/design.md, "Sealing").
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"mlcapsule/seal/software/v2\0")
        return AESGCM(hkdf.derive(self._secret or b""))

    def seal(self, plaintext: bytes, *, label: bytes) -> bytes:
        nonce = os.urandom(12)
        return SEAL_MAGIC + nonce + self._seal_key().encrypt(nonce, plaintext, SEAL_MAGIC + label)

    def unseal(self, blob: bytes, *, label: bytes) -> bytes:
        if len(blob) < len(SEAL_MAGIC) + 12 + 16 or not blob.startswith(SEAL_MAGIC):
            raise IntegrityError("sealed state is not valid")
        nonce = blob[len(SEAL_MAGIC):len(SEAL_MAGIC) + 12]
        try:
            return self._seal_key().decrypt(nonce, blob[len(SEAL_MAGIC) + 12:], SEAL_MAGIC + label)
        except InvalidTag as e:
            raise IntegrityError("sealed state cannot be opened on this installation",
                                 hint="sealed state only opens on the installation that sealed it (states sealed "
                                      "by mlcapsule 0.1.0 were also bound to its exact version); "
                                      "run setup again") from e

    def _counter_path(self, name: str) -> Path:
        if not name.replace("-", "").replace("_", "").isalnum() or len(name) > 128:
            raise ValueError("bad counter name")
        return self.dir / "counters" / name

    def counter_read(self, name: str) -> int:
        self._ensure()
        try:
            return int(json.loads(self._counter_path(name).read_text()))
        except FileNotFoundError:
            return 0
        except (ValueError, OSError) as e:
            raise IntegrityError(f"counter {name} is damaged") from e

    def counter_increment(self, name: str) -> int:
        """Atomic across processes (an exclusive lock on a file beside the counter), as a TPM's
        NV increment is: two sessions of one license must never both step from the same value."""
        import fcntl

        self._ensure()
        path = self._counter_path(name)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path.with_name(path.name + ".lock"), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            value = self.counter_read(name) + 1
            atomic_write(path, str(value).encode(), mode=0o600)
            return value
        finally:
            os.close(fd)  # releases the lock
