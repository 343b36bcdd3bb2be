"""The enclave measurement: a hash of the enclave's code and its pinned runtime versions.

The provider's server keeps an allow-list of accepted measurements. Any change to the trusted
code, or to the versions of the libraries it runs on, changes the measurement.
"""

from __future__ import annotations

import hashlib
import platform
from functools import lru_cache
from importlib import metadata
from pathlib import Path

#: The trusted package: this directory, ``mlcapsule/enclave/``. The measurement hashes every
#: file below it, with no exclusion list; nothing outside it runs in the enclave (the worker boots
#: with ``mlcapsule`` as a bare namespace, so not even the package's ``__init__.py`` runs there).
TRUSTED_ROOT = Path(__file__).resolve().parent
PACKAGE_ROOT = TRUSTED_ROOT.parent
PINNED = ("onnxruntime", "onnx", "numpy", "cryptography")


def tcb_files() -> list[Path]:
    """Every Python file of the trusted package, sorted."""
    return sorted(TRUSTED_ROOT.rglob("*.py"))


def runtime_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "implementation": platform.python_implementation()}
    for dist in PINNED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = "missing"
    return versions


@lru_cache(maxsize=1)
def measurement() -> bytes:
    h = hashlib.sha256(b"mlcapsule-measurement/v1\0")
    for f in tcb_files():
        rel = f.relative_to(PACKAGE_ROOT).as_posix().encode()
        data = f.read_bytes()
        h.update(len(rel).to_bytes(4, "big") + rel + len(data).to_bytes(8, "big") + data)
    for k, v in sorted(runtime_versions().items()):
        h.update(f"{k}={v}\0".encode())
    return h.digest()
