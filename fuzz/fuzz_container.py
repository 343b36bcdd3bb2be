"""Fuzz the capsule container: header, manifest length, signature, padding, segments, chunks.

Input: a whole capsule file. It is opened from a memfd, as the enclave opens the client's file by
descriptor, under both trust decisions (the pinned provider key, and the manifest's own key);
when it opens, every segment is checked against its hash and decrypted with the context's
content key (the chunked AEAD reader). Seeds: capsules from the real packer (format 1.0, 1.2 with
a defense policy) and the golden vectors of every format version.
"""

from __future__ import annotations

import os
import sys

from _common import b64, context, instrumented, main, ours

with instrumented(__name__ == "__main__"):
    from mlcapsule.enclave.format.container import CapsuleFile
    from mlcapsule.enclave.format.trust import TrustProviderKey, UnsafeTrustManifestKey

_CTX = context()
_PINNED = TrustProviderKey(bytes.fromhex(_CTX["provider_public"]))
_KEY = b64(_CTX["content_key"])


def TestOneInput(data: bytes) -> None:  # noqa: N802  (atheris's name)
    fd = os.memfd_create("capsule", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        for trust in (_PINNED, UnsafeTrustManifestKey()):
            with ours(), CapsuleFile(fd, trust=trust) as cf:
                cf.verify_segments()
                for seg in cf.manifest.segments:
                    with ours():
                        cf.plaintext(seg.name, _KEY)
    finally:
        os.close(fd)


if __name__ == "__main__":
    main(TestOneInput)
    sys.exit(0)
