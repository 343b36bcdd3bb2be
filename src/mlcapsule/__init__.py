"""mlcapsule: guarded offline deployment of machine learning as a service.

A provider packs an ONNX model into an encrypted, signed capsule (:func:`pack`). A client runs it
inside an enclave worker process on its own machine (:func:`open_capsule`), so the client's data
stays local and the weights never leave the enclave in plaintext.
"""

from __future__ import annotations

# No `typing` import (15 ms): the command line installs its Ctrl-C handler right after this
# package is imported, so everything here delays it. Annotations are strings (see above), and
# mypy treats a name TYPE_CHECKING as typing.TYPE_CHECKING.
TYPE_CHECKING = False

__version__ = "0.1.0"

__all__ = ["__version__", "pack", "open_capsule", "Capsule", "TrustProviderKey", "UnsafeTrustManifestKey",
           "generate_provider_key"]

if TYPE_CHECKING:  # pragma: no cover
    from typing import Any

    from .client import Capsule, open_capsule
    from .enclave.crypto.keys import generate_provider_key
    from .enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey
    from .packer import pack


def __getattr__(name: str) -> Any:
    # Lazy, so `import mlcapsule` stays cheap and the enclave worker imports only what it needs.
    if name == "pack":
        from .packer import pack

        return pack
    if name in ("open_capsule", "Capsule"):
        from . import client

        return getattr(client, name)
    if name in ("TrustProviderKey", "UnsafeTrustManifestKey"):
        from .enclave.format import trust

        return getattr(trust, name)
    if name == "generate_provider_key":
        from .enclave.crypto.keys import generate_provider_key

        return generate_provider_key
    raise AttributeError(name)
