"""Host-side input loading and output formatting for ``mlcapsule predict`` / ``run``.

This code runs in the untrusted host process, never in the enclave: it turns the user's files
into one float32 batch for the model's input, and the model's output into something a person
can read. Every failure is an :class:`~mlcapsule.enclave.errors.InputError` (a file that cannot be read
or does not fit the model), a :class:`~mlcapsule.enclave.errors.FormatError` (a bad preprocessing
description in a manifest) or a :class:`~mlcapsule.enclave.errors.UsageError` (a bad argument): the
parsers never let another exception escape, whatever bytes a file holds.

Public API:

* :class:`Preprocessing` — what the manifest says about the input (``to_dict``/``from_dict``).
* :func:`load_inputs` — ``.npy``, ``.npz``, ``.csv``, ``.json`` and ``.png``/``.jpg``/``.jpeg``
  files → one batch, validated against the model's input shape.
* :func:`format_outputs` — model outputs → one dict per row (class, index, probabilities, top-k).
* :func:`write_outputs` — save outputs as ``.npy``, ``.json`` or ``.csv``.
* :func:`check_output_path` — refuse an output path before anything is computed or charged.

How array files map onto the batch: an array whose rank equals the model input's rank is a
batch; one with one dimension fewer is a single sample. A 1-D or 2-D array whose last dimension
holds exactly the number of values of one sample is reshaped to samples (so a CSV row of 784
values feeds a ``[N, 1, 28, 28]`` model). Several files are concatenated into one batch.

One scaling rule for every format: *pixels* get the manifest's image preprocessing
(``invert``, ``scale``, ``mean``/``std``), *values* are taken as model-ready. Pixels are images,
and ``uint8`` arrays (``.npy``/``.npz``) when the manifest describes images; everything else
(float arrays, CSV, JSON) is values. Non-finite inputs (NaN, ±inf) are refused, in every format.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .enclave.errors import FormatError, InputError, MlcapsuleError, UsageError

__all__ = [
    "Preprocessing",
    "load_inputs",
    "format_outputs",
    "write_outputs",
    "check_output_path",
    "OUTPUT_SUFFIXES",
    "ARRAY_SUFFIXES",
    "IMAGE_SUFFIXES",
]

ARRAY_SUFFIXES = (".npy", ".npz", ".csv", ".json")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

#: Largest input file read, and largest array inside an .npz (guards against zip bombs).
MAX_INPUT_BYTES = 4 << 30
#: Largest image, in pixels, that is decoded (Pillow's own bomb limit is about 179 Mpx).
MAX_IMAGE_PIXELS = 64_000_000
#: Deepest JSON nesting accepted for an input array.
_MAX_JSON_DEPTH = 32

_KINDS = ("tensor", "image")
_LAYOUTS = ("NCHW", "NHWC", "flat")
_DTYPES = ("float32",)
_PREP_KEYS = ("kind", "image_size", "channels", "layout", "scale", "mean", "std", "dtype", "invert")


# =============================================================================================
# Preprocessing
# =============================================================================================
@dataclass(frozen=True)
class Preprocessing:
    """How the host turns the user's files into the model's input (stored in the manifest).

    * ``kind``: ``"tensor"`` — the user supplies model-ready arrays; ``"image"`` — image files
      are decoded, resized and normalised as below (array files are still accepted as-is).
    * ``image_size``: ``(height, width)`` the images are resized to (bilinear); required for
      ``"image"``.
    * ``channels``: 1 (grayscale, Pillow mode ``L``) or 3 (``RGB``; alpha is dropped).
    * ``layout``: ``"NCHW"``, ``"NHWC"`` or ``"flat"`` (``[N, H*W*C]`` in row-major HWC order,
      as the digits/MNIST MLPs take).
    * ``scale``: pixel values 0..255 are multiplied by this (1/255 → 0..1; 16/255 → the 0..16
      of scikit-learn's digits).
    * ``mean``/``std``: optional per-channel normalisation applied after scaling,
      ``(x - mean) / std`` (e.g. ImageNet's).
    * ``dtype``: the model input's element type; only ``"float32"``.
    * ``invert``: use ``255 - pixel`` before scaling (dark ink on white paper for a model
      trained on bright ink on black).
    """

    kind: Literal["tensor", "image"] = "tensor"
    image_size: tuple[int, int] | None = None
    channels: int = 3
    layout: Literal["NCHW", "NHWC", "flat"] = "NCHW"
    scale: float = 1.0 / 255.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    dtype: Literal["float32"] = "float32"
    invert: bool = False

    def __post_init__(self) -> None:
        for name in ("image_size", "mean", "std"):  # accept lists, store tuples (hashable, frozen)
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        problem = self._problem()
        if problem is not None:
            raise UsageError(f"preprocessing: {problem}")

    def _problem(self) -> str | None:
        if self.kind not in _KINDS:
            return f"kind must be one of {list(_KINDS)}, not {self.kind!r}"
        if self.image_size is not None:
            if (not isinstance(self.image_size, tuple) or len(self.image_size) != 2
                    or not all(_is_int(v) and 1 <= v <= 16384 for v in self.image_size)):
                return f"image_size must be (height, width) with sides 1..16384, not {self.image_size!r}"
        elif self.kind == "image":
            return "image_size (height, width) is required when kind is 'image'"
        if not _is_int(self.channels) or self.channels not in (1, 3):
            return f"channels must be 1 or 3, not {self.channels!r}"
        if self.layout not in _LAYOUTS:
            return f"layout must be one of {list(_LAYOUTS)}, not {self.layout!r}"
        if not _is_number(self.scale) or not math.isfinite(self.scale) or self.scale <= 0:
            return f"scale must be a positive finite number, not {self.scale!r}"
        for name, vals in (("mean", self.mean), ("std", self.std)):
            if vals is None:
                continue
            if (not isinstance(vals, tuple) or len(vals) != self.channels
                    or not all(_is_number(v) and math.isfinite(v) for v in vals)):
                return f"{name} must list {self.channels} finite numbers (one per channel), not {vals!r}"
        if self.std is not None and not all(v > 0 for v in self.std):
            return f"std values must be positive, not {self.std!r}"
        if self.dtype not in _DTYPES:
            return f"dtype must be one of {list(_DTYPES)}, not {self.dtype!r}"
        if not isinstance(self.invert, bool):
            return f"invert must be true or false, not {self.invert!r}"
        return None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the manifest's ``model.preprocessing``)."""
        return {
            "kind": self.kind,
            "image_size": list(self.image_size) if self.image_size is not None else None,
            "channels": self.channels,
            "layout": self.layout,
            "scale": float(self.scale),
            "mean": [float(v) for v in self.mean] if self.mean is not None else None,
            "std": [float(v) for v in self.std] if self.std is not None else None,
            "dtype": self.dtype,
            "invert": self.invert,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Preprocessing:
        """Parse :meth:`to_dict`'s output. Unknown keys or bad values raise ``FormatError``.

        Missing keys take the defaults, so older manifests stay readable.
        """
        if not isinstance(d, Mapping):
            raise FormatError("manifest: model.preprocessing must be a JSON object")
        extra = sorted(str(k) for k in d if k not in _PREP_KEYS)
        if extra:
            raise FormatError(f"manifest: model.preprocessing has unknown keys {extra}")
        kw: dict[str, Any] = {}
        for key in _PREP_KEYS:
            if key not in d:
                continue
            v = d[key]
            if key in ("image_size", "mean", "std") and v is not None and not isinstance(v, (list, tuple)):
                raise FormatError(f"manifest: model.preprocessing.{key} must be a list")
            kw[key] = tuple(v) if isinstance(v, list) else v
        try:
            return cls(**kw)
        except UsageError as e:
            raise FormatError(f"manifest: model.{e.message}") from None

    # -- image pipeline ---------------------------------------------------------------------
    def sample_shape(self) -> tuple[int, ...] | None:
        """Shape of one preprocessed image (without the batch dimension), or None for tensors."""
        if self.image_size is None:
            return None
        h, w = self.image_size
        c = self.channels
        return {"NCHW": (c, h, w), "NHWC": (h, w, c), "flat": (h * w * c,)}[self.layout]


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


# =============================================================================================
# Loading
# =============================================================================================
def load_inputs(
    paths: Sequence[str | Path], prep: Preprocessing, input_shape: Sequence[int | str | None],
) -> np.ndarray:
    """Read ``paths`` into one batch for a model input of shape ``input_shape``.

    ``input_shape`` lists the model input's dimensions; a ``str`` (symbolic), ``None`` or
    non-positive entry is dynamic. Formats, chosen by suffix:

    * ``.npy`` — one array; ``.npz`` — its only array, or the one named ``x`` or ``input``;
      pickled (object) arrays are refused.
    * ``.csv`` — rows of comma-separated numbers, one sample per row; a first line that is not
      numeric is a header and skipped.
    * ``.json`` — a (nested) list of numbers, or ``{"inputs": <that>}``.
    * ``.png``/``.jpg``/``.jpeg`` — one image each, decoded and preprocessed as ``prep`` says
      (needs ``prep.kind == "image"``).

    Returns a C-contiguous float32 array whose shape fits ``input_shape``.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise InputError("no input files given")
    if not isinstance(prep, Preprocessing):
        raise UsageError(f"prep must be a Preprocessing, not {type(prep).__name__}")
    shape = _normalise_shape(input_shape)
    parts: list[np.ndarray] = []
    for raw in paths:
        path = Path(raw)
        suffix = path.suffix.lower()
        pixels = False
        if suffix in IMAGE_SUFFIXES:
            arr = _load_image(path, prep)[None, ...]
        elif suffix in ARRAY_SUFFIXES:
            arr = _load_array(path, suffix)
            pixels = arr.dtype == np.uint8 and prep.kind == "image"
        else:
            raise InputError(
                f"{path}: unsupported input file type {path.suffix or '(no suffix)'!r}",
                hint=f"use one of {', '.join(ARRAY_SUFFIXES + IMAGE_SUFFIXES)}",
            )
        part = _fit(arr, input_shape, path)
        if pixels:  # the same rule as for images: pixel values get the manifest's preprocessing
            part = _preprocess_pixels(part, prep)
        if not np.all(np.isfinite(part)):
            bad = int(np.size(part) - np.count_nonzero(np.isfinite(part)))
            raise InputError(f"{path}: the input holds {bad} non-finite value(s) (NaN or infinity)",
                             hint="nothing was charged; replace or drop those samples")
        parts.append(part)
    if len(parts) == 1:
        batch = parts[0]
    else:
        shapes = {p.shape[1:] for p in parts}
        if len(shapes) > 1:
            raise InputError("the input files hold samples of different shapes: "
                             + ", ".join(f"{Path(p)} {_fmt(a.shape[1:])}" for p, a in zip(paths, parts, strict=True)))
        batch = np.concatenate(parts, axis=0)
    if shape and shape[0] is not None and batch.shape[0] != shape[0]:
        raise InputError(
            f"the model takes batches of exactly {shape[0]} sample(s), got {batch.shape[0]} "
            f"(expected shape {_fmt_expected(input_shape)}, got {_fmt(batch.shape)})",
            hint=f"pass {shape[0]} sample(s) per run",
        )
    return np.ascontiguousarray(batch, dtype=np.float32)


def _normalise_shape(input_shape: Sequence[int | str | None]) -> list[int | None]:
    if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence):
        raise UsageError(f"input_shape must be a sequence of dimensions, not {input_shape!r}")
    out: list[int | None] = []
    for d in input_shape:
        if _is_int(d):
            out.append(int(d) if int(d) > 0 else None)  # type: ignore[arg-type]
        elif d is None or isinstance(d, str):
            out.append(None)
        else:
            raise UsageError(f"input_shape has a dimension that is neither an int nor a name: {d!r}")
    return out


def _fmt(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _fmt_expected(input_shape: Sequence[int | str | None]) -> str:
    dims = []
    for d in input_shape:
        if _is_int(d) and int(d) > 0:  # type: ignore[arg-type]
            dims.append(str(int(d)))  # type: ignore[arg-type]
        elif isinstance(d, str) and d:
            dims.append(d)
        else:
            dims.append("?")
    return "[" + ", ".join(dims) + "]"


def _fit(arr: np.ndarray, input_shape: Sequence[int | str | None], path: Path) -> np.ndarray:
    """Make ``arr`` a batch for ``input_shape`` (add the batch axis, reshape flat rows) or raise."""
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{path}: the array holds {arr.dtype} values, not numbers")
    shape = _normalise_shape(input_shape)
    rank = len(shape)
    sample = shape[1:]

    def fits(a: np.ndarray) -> bool:
        return a.ndim == rank and all(d is None or d == n for d, n in zip(sample, a.shape[1:], strict=True))

    candidates = [arr]
    if rank >= 1 and arr.ndim == rank - 1:  # one sample
        candidates.append(arr[None, ...])
    static = [d for d in sample if d is not None]
    if rank > 2 and len(static) == len(sample) and arr.ndim in (1, 2) and arr.shape[-1] == math.prod(static):
        candidates.append(arr.reshape(-1, *static))  # flat rows of samples (e.g. CSV)
    for cand in candidates:
        if fits(cand):
            if rank >= 1 and cand.shape[0] == 0:
                raise InputError(f"{path}: the file holds no samples (shape {_fmt(arr.shape)})")
            return _to_float32(cand)
    raise InputError(
        f"{path}: expected input of shape {_fmt_expected(input_shape)} "
        f"(or one sample of shape {_fmt_expected(input_shape[1:])}), got {_fmt(arr.shape)}",
    )


def _preprocess_pixels(batch: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """A batch of pixel values 0..255 (already in the model's layout) → what the image pipeline
    makes of decoded images: invert, scale, then per-channel mean/std along the layout's channel axis."""
    x = batch.astype(np.float32)
    if prep.invert:
        x = np.float32(255.0) - x
    x = x * np.float32(prep.scale)
    for vals, op in ((prep.mean, np.subtract), (prep.std, np.divide)):
        if vals is None:
            continue
        v = np.asarray(vals, dtype=np.float32)
        if prep.layout == "NCHW" and x.ndim >= 2:
            v = v.reshape((1, -1) + (1,) * (x.ndim - 2))
        elif prep.layout == "flat" and x.ndim == 2 and x.shape[1] % v.size == 0:
            x = op(x.reshape(x.shape[0], -1, v.size), v).reshape(x.shape)
            continue
        x = op(x, v)
    return np.ascontiguousarray(x, dtype=np.float32)


def _to_float32(arr: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return arr.astype(np.float32, copy=False)


def _read_bytes(path: Path) -> bytes:
    try:
        size = path.stat().st_size
        if size > MAX_INPUT_BYTES:
            raise InputError(f"{path}: the file is larger than {MAX_INPUT_BYTES >> 20} MiB")
        with open(path, "rb") as f:
            return f.read(MAX_INPUT_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file", hint="check the path") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a folder, not a file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read the file ({e.strerror or e})") from None


def _load_array(path: Path, suffix: str) -> np.ndarray:
    data = _read_bytes(path)
    try:
        if suffix == ".npy":
            return _parse_npy(data, str(path))
        if suffix == ".npz":
            return _parse_npz(data, str(path))
        if suffix == ".csv":
            return _parse_csv(data, str(path))
        return _parse_json(data, str(path))
    except MlcapsuleError:
        raise
    except Exception as e:  # a parser bug must still surface as a clean input error
        raise InputError(f"{path}: cannot read the file as {suffix} ({type(e).__name__}: {e})") from None


def _parse_npy(data: bytes, where: str) -> np.ndarray:
    from numpy.lib import format as npformat

    fp = io.BytesIO(data)
    try:
        version = npformat.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = npformat.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = npformat.read_array_header_2_0(fp)
        else:
            raise InputError(f"{where}: unsupported .npy format version {version[0]}.{version[1]}")
    except MlcapsuleError:
        raise
    except Exception as e:
        raise InputError(f"{where}: not a valid .npy file ({e})") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise InputError(f"{where}: the .npy file holds {dtype} values (object or structured arrays are refused)")
    if dtype.kind not in "biuf":
        raise InputError(f"{where}: the .npy file holds {dtype} values, not numbers")
    if not all(isinstance(n, int) and 0 <= n for n in shape):
        raise InputError(f"{where}: the .npy header has an invalid shape {shape!r}")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    offset = fp.tell()
    if nbytes > len(data) - offset:
        raise InputError(f"{where}: the .npy file is truncated: its header promises {nbytes} bytes of data, "
                         f"it holds {len(data) - offset}")
    arr = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return arr.reshape(shape, order="F" if fortran else "C")


def _parse_npz(data: bytes, where: str) -> np.ndarray:
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = [i for i in zf.infolist() if not i.is_dir()]
    except Exception as e:
        raise InputError(f"{where}: not a valid .npz file ({e})") from None
    arrays = {i.filename.removesuffix(".npy"): i for i in infos}
    if not arrays:
        raise InputError(f"{where}: the .npz file holds no arrays")
    if len(arrays) == 1:
        (info,) = arrays.values()
    else:
        key = next((k for k in ("x", "input") if k in arrays), None)
        if key is None:
            raise InputError(f"{where}: the .npz file holds several arrays {sorted(arrays)[:10]}; "
                             "name the input array 'x' or 'input'")
        info = arrays[key]
    if info.file_size > MAX_INPUT_BYTES:
        raise InputError(f"{where}: the array in the .npz file is larger than {MAX_INPUT_BYTES >> 20} MiB")
    try:
        with zf.open(info) as member:
            member_data = member.read(MAX_INPUT_BYTES + 1)
    except Exception as e:
        raise InputError(f"{where}: the .npz file is damaged ({type(e).__name__}: {e})") from None
    return _parse_npy(member_data, f"{where}[{info.filename}]")


def _decode_text(data: bytes, where: str) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{where}: the file is not UTF-8 text") from None
    if "\x00" in text:
        raise InputError(f"{where}: the file is binary, not text")
    return text


def _parse_csv(data: bytes, where: str) -> np.ndarray:
    text = _decode_text(data, where)
    rows: list[list[float]] = []
    first = True
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        cells = line.split(",")
        try:
            row = [float(c) for c in cells]
        except ValueError:
            if first:  # a header line
                first = False
                continue
            raise InputError(f"{where}: line {lineno} has a value that is not a number") from None
        first = False
        if rows and len(row) != len(rows[0]):
            raise InputError(f"{where}: line {lineno} has {len(row)} values, the first data row has {len(rows[0])}")
        rows.append(row)
    if not rows:
        raise InputError(f"{where}: the CSV file holds no rows of numbers")
    return np.array(rows, dtype=np.float64)


def _parse_json(data: bytes, where: str) -> np.ndarray:
    text = _decode_text(data, where)
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise InputError(f"{where}: not valid JSON ({str(e)[:200]})") from None
    if isinstance(obj, dict):
        if set(obj) != {"inputs"}:
            raise InputError(f"{where}: a JSON object must have exactly one key, 'inputs'")
        obj = obj["inputs"]
    _check_json_numbers(obj, where)
    try:
        with np.errstate(over="ignore"):
            arr = np.array(obj, dtype=np.float64)
    except (ValueError, OverflowError, TypeError):
        raise InputError(f"{where}: the JSON lists do not form a rectangular array of numbers") from None
    return arr


def _check_json_numbers(obj: Any, where: str) -> None:
    stack: list[tuple[Any, int]] = [(obj, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, list):
            if depth >= _MAX_JSON_DEPTH:
                raise InputError(f"{where}: the JSON lists are nested more than {_MAX_JSON_DEPTH} deep")
            stack.extend((e, depth + 1) for e in item)
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            raise InputError(f"{where}: the JSON input holds {json.dumps(item)[:40]}, not a number")


def _load_image(path: Path, prep: Preprocessing) -> np.ndarray:
    if prep.kind != "image" or prep.image_size is None:
        raise InputError(
            f"{path}: this model takes tensors, not images",
            hint="pass .npy, .npz, .csv or .json files with the model's input values",
        )
    data = _read_bytes(path)
    try:
        from PIL import Image, ImageOps
    except ImportError as e:  # pragma: no cover - pillow is a core dependency
        raise UsageError(f"reading images needs Pillow ({e})", hint="pip install pillow") from e
    h, w = prep.image_size
    pixels: np.ndarray
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            with Image.open(io.BytesIO(data)) as opened:
                if opened.width * opened.height > MAX_IMAGE_PIXELS:
                    raise InputError(f"{path}: the image is {opened.width}x{opened.height}, larger than "
                                     f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels")
                img: Image.Image = ImageOps.exif_transpose(opened)
                img = img.convert("L" if prep.channels == 1 else "RGB")
                if img.size != (w, h):
                    img = img.resize((w, h), Image.Resampling.BILINEAR)
                pixels = np.asarray(img, dtype=np.float32)
    except MlcapsuleError:
        raise
    except Exception as e:  # UnidentifiedImageError, DecompressionBombError, truncated files, ...
        raise InputError(f"{path}: cannot read the image: {_image_problem(e)}",
                         hint="check that it is a PNG or JPEG image (open it in an image viewer), or convert it; "
                              ".npy, .npz, CSV and JSON inputs are read too") from None
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if prep.invert:
        pixels = np.float32(255.0) - pixels
    pixels = pixels * np.float32(prep.scale)
    if prep.mean is not None:
        pixels = pixels - np.asarray(prep.mean, dtype=np.float32)
    if prep.std is not None:
        pixels = pixels / np.asarray(prep.std, dtype=np.float32)
    if prep.layout == "NCHW":
        pixels = pixels.transpose(2, 0, 1)
    elif prep.layout == "flat":
        pixels = pixels.reshape(-1)
    return np.ascontiguousarray(pixels, dtype=np.float32)


# =============================================================================================
# Output formatting
# =============================================================================================
def _looks_like_probabilities(rows: np.ndarray) -> bool:
    """True when every value is in [0, 1] and every row sums to 1 (within 1e-3)."""
    if not np.all(np.isfinite(rows)):
        return False
    if np.any(rows < 0) or np.any(rows > 1):
        return False
    return bool(np.all(np.abs(rows.sum(axis=1, dtype=np.float64) - 1.0) <= 1e-3))


def _softmax(rows: np.ndarray) -> np.ndarray:
    """Row-wise softmax. NaN scores get NaN probability and are left out of the others;
    +inf scores share all the probability."""
    x = rows.astype(np.float64)
    nan = np.isnan(x)
    x = np.where(nan, -np.inf, x)
    posinf = np.isposinf(x)
    m = np.max(x, axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        e = np.exp(x - m)
        e = np.where(posinf.any(axis=1, keepdims=True), posinf.astype(np.float64), e)
        p: np.ndarray = e / e.sum(axis=1, keepdims=True)
    p[nan] = np.nan
    return p


def _num(v: Any) -> float | None:
    f = float(v)
    return f if math.isfinite(f) else None


def format_outputs(
    outputs: np.ndarray, class_names: Sequence[str] | None, *, top_k: int = 5,
) -> list[dict[str, Any]]:
    """One dict per sample, for printing or JSON.

    For a classifier output ``[N, C]`` (C ≥ 2) each row becomes::

        {"class": "cat", "index": 3, "probability": 0.91,
         "probabilities": [...C floats...], "top": [{"class", "index", "probability"} × top_k]}

    ``"class"`` is the class name when ``class_names`` is given, otherwise the index.
    The batch is taken as probabilities when every value is in [0, 1] and every row sums to 1
    (within 1e-3). Otherwise the values are scores (logits): they are reported under
    ``"scores"`` and ``"probabilities"`` is their softmax. A non-finite value is ``None``.

    Other shapes: ``[N]`` or ``[N, 1]`` → ``{"value": float}`` per sample; more than two
    dimensions → ``{"shape": [...], "values": nested lists}`` per sample.
    """
    if not _is_int(top_k) or top_k < 1:
        raise UsageError(f"top_k must be a positive integer, not {top_k!r}")
    arr = np.asarray(outputs)
    if arr.dtype.kind not in "biuf":
        raise InputError(f"the model output holds {arr.dtype} values, not numbers")
    if arr.ndim == 0:
        arr = arr.reshape(1)
    if arr.ndim == 1 or (arr.ndim == 2 and arr.shape[1] == 1):
        return [{"value": _num(v)} for v in arr.reshape(-1)]
    if arr.ndim > 2:
        return [{"shape": list(row.shape), "values": _nested(row)} for row in arr]
    n_classes = arr.shape[1]
    if class_names is not None and len(class_names) != n_classes:
        raise FormatError(
            f"the capsule lists {len(class_names)} class names but the model outputs {n_classes} values per sample",
            hint="the capsule is inconsistent; ask the provider for a corrected one",
        )
    rows = arr.astype(np.float64)
    is_prob = _looks_like_probabilities(rows)
    probs = rows if is_prob else _softmax(rows)
    k = min(int(top_k), n_classes)
    result: list[dict[str, Any]] = []
    for i in range(rows.shape[0]):
        p = probs[i]
        order = np.argsort(-np.nan_to_num(p, nan=-np.inf), kind="stable")
        best = int(order[0])

        def label(j: int) -> str | int:
            return class_names[j] if class_names is not None else j

        entry: dict[str, Any] = {
            "class": label(best),
            "index": best,
            "probability": _num(p[best]),
            "probabilities": [_num(v) for v in p],
        }
        if not is_prob:
            entry["scores"] = [_num(v) for v in rows[i]]
        entry["top"] = [{"class": label(int(j)), "index": int(j), "probability": _num(p[j])} for j in order[:k]]
        result.append(entry)
    return result


def _nested(a: np.ndarray) -> Any:
    if a.ndim == 0:
        return _num(a)
    return [_nested(x) for x in a]


OUTPUT_SUFFIXES = (".npy", ".json", ".csv")


def check_output_path(path: str | Path) -> Path:
    """Check that outputs can be written to ``path`` (a supported suffix, an existing folder, not
    a folder itself), so a bad ``-o`` is refused before anything is charged. Creates nothing."""
    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise UsageError(f"{path}: cannot write outputs as {path.suffix or '(no suffix)'!r}; "
                         f"outputs are written as {', '.join(OUTPUT_SUFFIXES)}",
                         hint="nothing was charged; use a .npy, .json or .csv file name")
    parent = path.parent
    if not parent.is_dir():
        raise UsageError(f"{path}: the folder {parent} does not exist",
                         hint="nothing was charged; create the folder first, or write somewhere else")
    if path.is_dir():
        raise UsageError(f"{path}: is a folder", hint="nothing was charged; give a file name")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{path}: the folder {parent} is not writable",
                         hint="nothing was charged; write somewhere else")
    return path


def _csv_rows(outputs: np.ndarray) -> bytes:
    arr = np.asarray(outputs)
    if arr.ndim == 0:
        arr = arr.reshape(1, 1)
    elif arr.ndim == 1:
        arr = arr.reshape(-1, 1)
    else:
        arr = arr.reshape(arr.shape[0], -1)
    lines = []
    for row in arr:
        lines.append(",".join("nan" if isinstance(v, float) and math.isnan(v) else repr(v) for v in row.tolist()))
    return ("\n".join(lines) + "\n").encode("ascii")


def write_outputs(outputs: np.ndarray | Sequence[Mapping[str, Any]], path: str | Path) -> None:
    """Write ``outputs`` to ``path``: ``.npy`` (an array), ``.json`` or ``.csv`` (one row of
    numbers per sample, as :func:`load_inputs` reads CSV; an array only).

    JSON gets a nested list of numbers for an array (non-finite values as ``null``; it reads
    back with :func:`load_inputs`), or the list of dicts from :func:`format_outputs` as is.
    The file is replaced atomically.
    """
    from .enclave._util import atomic_write

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        if not isinstance(outputs, np.ndarray):
            raise UsageError("only an array can be written as .npy; use a .json file for formatted outputs")
        buf = io.BytesIO()
        np.save(buf, outputs, allow_pickle=False)
        data = buf.getvalue()
    elif suffix == ".json":
        obj: Any = _nested(np.asarray(outputs)) if isinstance(outputs, np.ndarray) else list(outputs)
        try:
            data = (json.dumps(obj, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")
        except (TypeError, ValueError) as e:
            raise UsageError(f"cannot write the outputs as JSON: {e}") from None
    elif suffix == ".csv":
        if not isinstance(outputs, np.ndarray):
            raise UsageError("only an array can be written as .csv; use a .json file for formatted outputs")
        data = _csv_rows(outputs)
    else:
        check_output_path(path)
        raise AssertionError("unreachable")
    if not path.parent.is_dir():  # never create folders the user did not ask for
        check_output_path(path)
    try:
        atomic_write(path, data, mode=0o644)
    except OSError as e:
        raise UsageError(f"{path}: cannot write the file ({e.strerror or e})") from None


def _image_problem(e: BaseException) -> str:
    """What went wrong reading an image, in words (never a Python object's repr)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "it is not a PNG or JPEG image (its bytes are no image format Pillow reads)"
    if isinstance(e, Image.DecompressionBombError):
        return "it declares more pixels than mlcapsule reads"
    if isinstance(e, (OSError, SyntaxError, ValueError)):  # Pillow's "image file is truncated", bad chunks
        text = str(e).split(" (")[0].strip() or type(e).__name__
        text = re.sub(r"<[^<>]*\bat 0x[0-9a-fA-F]+>", "the image", text)
        return f"it is damaged or truncated ({text})"
    return f"Pillow failed with {type(e).__name__}"
