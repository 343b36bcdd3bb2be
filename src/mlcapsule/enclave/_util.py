"""Small helpers shared by provider, host and enclave code: atomic files, canonical JSON, base64."""

from __future__ import annotations

import base64
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically: temporary file in the same folder, fsync, rename.

    A crash leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no spaces, UTF-8. What gets signed."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def data_home() -> Path:
    """Where mlcapsule keeps per-user state: $MLCAPSULE_HOME, else $XDG_DATA_HOME/mlcapsule."""
    env = os.environ.get("MLCAPSULE_HOME")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(xdg) / "mlcapsule"


def munlock(mapping: Any) -> None:
    """Best-effort ``munlock`` of a buffer (an mmap, even a read-only one): undoes the hardened
    worker's ``mlockall(MCL_FUTURE)`` for memory that must be droppable (``MADV_DONTNEED``
    refuses locked pages)."""
    try:
        import ctypes

        import numpy as np

        addr = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
        ctypes.CDLL(None).munlock(ctypes.c_void_p(addr), ctypes.c_size_t(len(mapping)))
    except (OSError, ValueError, AttributeError, TypeError):
        pass
