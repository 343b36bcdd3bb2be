"""Data for attack experiments: the shared datasets (MNIST, Fashion-MNIST) and digits helpers.

Nothing is downloaded. :func:`shared_datasets_dir` finds the read-only copies: the
``MLCAPSULE_DATASETS`` environment variable, else ``$MLCAPSULE_SHARED/datasets``, else
``../shared/datasets`` beside the checkout. :func:`load_idx_dataset` reads the gzip-compressed
IDX files (``train-images-idx3-ubyte.gz`` ...).

:func:`to_digits_format` turns 28x28 images into scikit-learn digits' 8x8 format (pad to
32x32, sum over 4x4 blocks, values 0..16), which is how ``load_digits`` was made from 32x32
bitmaps; so Fashion-MNIST becomes a natural-image transfer set against a digits model.
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np

from ..errors import UsageError

__all__ = ["shared_datasets_dir", "load_idx", "load_idx_dataset", "to_digits_format"]

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def shared_datasets_dir() -> Path:
    if os.environ.get("MLCAPSULE_DATASETS"):
        return Path(os.environ["MLCAPSULE_DATASETS"])
    if os.environ.get("MLCAPSULE_SHARED"):
        return Path(os.environ["MLCAPSULE_SHARED"]) / "datasets"
    # src/mlcapsule/attacks/data.py -> the checkout's parent directory
    return Path(__file__).resolve().parents[4] / "shared" / "datasets"


def load_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """One IDX file (gzip-compressed or not) of unsigned bytes."""
    p = Path(path)
    opener = gzip.open if p.suffix == ".gz" else open
    with opener(p, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0:2] != b"\0\0" or raw[2] != 0x08:
        raise UsageError(f"{p} is not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UsageError(f"{p}: the header announces {dims}, the file holds {data.size} values")
    return data.reshape(dims)


def load_idx_dataset(name: str, split: str = "test", *, root: str | os.PathLike[str] | None = None,
                     limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [n, 28, 28], labels int64 [n]) of ``"mnist"`` or ``"fashion-mnist"``."""
    if split not in _FILES:
        raise UsageError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else shared_datasets_dir()
    folder = folder / name
    img_file, lab_file = (folder / f for f in _FILES[split])
    if not img_file.exists():
        raise UsageError(f"{img_file} not found", hint="set MLCAPSULE_DATASETS to the folder of the datasets")
    x = load_idx(img_file)
    y = load_idx(lab_file).astype(np.int64)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


def to_digits_format(images: np.ndarray) -> np.ndarray:
    """28x28 uint8 images -> float32 [n, 64] in 0..16, like ``sklearn.datasets.load_digits``."""
    x = np.asarray(images, dtype=np.float32) / 255.0
    if x.shape[1:] != (28, 28):
        raise UsageError(f"expected [n, 28, 28] images, got {x.shape}")
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))
    blocks = x.reshape(len(x), 8, 4, 8, 4).sum(axis=(2, 4))
    return np.round(blocks).astype(np.float32).reshape(len(x), 64)
