"""The public, signed manifest of a capsule.

Pure code: dict <-> dataclasses with strict validation. Anything that does not validate raises
:class:`~mlcapsule.enclave.errors.FormatError`, because a manifest that fails to parse is not trusted.
The manifest never names or shapes the model's tensors: that would reveal the architecture,
which is encrypted by default. It describes only what a client needs to call the model.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError

MANIFEST_FORMAT = "mlcapsule-manifest/v1"
MAX_SEGMENTS = 64
MAX_NAME = 256
MAX_CLASSES = 100_000
_DTYPES = {"float32", "float64", "float16", "int64", "int32", "int8", "uint8", "bool", "string"}
_OPT_LEVELS = ("disable", "basic", "extended", "all")
_INITIALIZER_MODES = ("shared", "copy")


def _req(d: Any, key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(d, dict):
        raise FormatError(f"manifest: {where} must be an object")
    if key not in d:
        raise FormatError(f"manifest: {where}.{key} is missing")
    v = d[key]
    if typ is int and isinstance(v, bool):
        raise FormatError(f"manifest: {where}.{key} must be an integer")
    if not isinstance(v, typ):
        raise FormatError(f"manifest: {where}.{key} has the wrong type")
    return v


def _opt(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str) -> Any:
    if d.get(key) is None:
        return None
    return _req(d, key, typ, where)


def _no_extra(d: dict[str, Any], allowed: set[str], where: str) -> None:
    extra = set(d) - allowed
    if extra:
        raise FormatError(f"manifest: unknown field(s) in {where}: {', '.join(sorted(extra))}")


def _str(v: str, where: str, limit: int = MAX_NAME) -> str:
    if len(v) > limit:
        raise FormatError(f"manifest: {where} is too long")
    return v


def parse_time(text: str | None, where: str) -> dt.datetime | None:
    if text is None:
        return None
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError as e:
        raise FormatError(f"manifest: {where} is not an ISO 8601 time") from e
    if t.tzinfo is None:
        raise FormatError(f"manifest: {where} must carry a time zone")
    return t


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int | str | None, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, d: Any, where: str) -> TensorSpec:
        _no_extra(d if isinstance(d, dict) else {}, {"name", "dtype", "shape"}, where)
        name = _str(_req(d, "name", str, where), where + ".name")
        dtype = _req(d, "dtype", str, where)
        if dtype not in _DTYPES:
            raise FormatError(f"manifest: {where}.dtype {dtype!r} is not supported")
        shape = _req(d, "shape", list, where)
        if len(shape) > 16:
            raise FormatError(f"manifest: {where}.shape has too many dimensions")
        for s in shape:
            if not (s is None or (isinstance(s, int) and not isinstance(s, bool) and s >= 0)
                    or (isinstance(s, str) and len(s) < 64)):
                raise FormatError(f"manifest: {where}.shape has a bad dimension")
        return cls(name, dtype, tuple(shape))


@dataclass(frozen=True)
class Policy:
    """The provider's default terms. The license of each device may override them."""

    budget: int | None = None  # queries; None means unlimited
    expires: dt.datetime | None = None
    lease_size: int = 100  # queries charged per persisted lease (see docs/design.md)
    #: The provider's defense policy (format 1.2), as ``DefensePolicy.to_dict()``; {} for none.
    #: Validated here: a capsule whose policy this build does not understand does not load.
    defenses: dict[str, Any] = field(default_factory=dict)
    #: What a query costs (issue 16), as ``ChargePolicy.to_dict()`` (enclave/detect.py); {} (the
    #: default, left out of the manifest) charges every row. ``{"per": "detection", ...}``: the
    #: enclave runs the detector itself and charges only its detections (format 1.2).
    charge: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "budget": self.budget,
            "expires": self.expires.isoformat() if self.expires else None,
            "lease_size": self.lease_size,
            "defenses": self.defenses,
        }
        if self.charge:
            d["charge"] = self.charge
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "policy") -> Policy:
        _no_extra(d if isinstance(d, dict) else {}, {"budget", "expires", "lease_size", "defenses", "charge"}, where)
        budget = _opt(d, "budget", int, where)
        if budget is not None and budget < 0:
            raise FormatError(f"manifest: {where}.budget must be >= 0")
        lease = _req(d, "lease_size", int, where)
        if not 1 <= lease <= 1_000_000:
            raise FormatError(f"manifest: {where}.lease_size must be between 1 and 1000000")
        defenses = _req(d, "defenses", dict, where)
        if defenses:
            from ..defenses.policy import DefensePolicy
            from ..errors import MlcapsuleError

            try:
                DefensePolicy.from_dict(defenses)
            except MlcapsuleError as e:
                raise FormatError(f"manifest: {where}.defenses is not a defense policy this build knows: {e.message}",
                                  hint="upgrade mlcapsule, or ask the provider for a capsule packed for it") from e
        charge = _opt(d, "charge", dict, where) or {}
        if charge:
            from ..detect import ChargePolicy

            ChargePolicy.from_dict(charge, where + ".charge")
        return cls(budget, parse_time(_opt(d, "expires", str, where), where + ".expires"), lease, defenses, charge)


@dataclass(frozen=True)
class RuntimeConfig:
    """How the enclave builds its ONNX Runtime session; chosen and checked at pack time.

    ``initializers`` says how the decrypted weights reach ONNX Runtime:

    * ``"shared"`` (the default, and what every manifest without the field means):
      ``add_initializer`` with zero-copy views of the enclave's decrypted buffer;
    * ``"copy"``: ``add_external_initializers`` with views of that buffer; ORT copies the
      weights into the graph while it builds the session (so graph optimizations see the real
      weights and are correct at every level) and the enclave then wipes and frees its buffer.
      The weights are held once after load, twice during it.

    ``initializers`` is the field format 1.1 adds (docs/format.md). ``to_dict`` leaves it out
    when it is ``"shared"``, and the writer then writes a 1.0 header, so such capsules stay
    readable by 1.0 readers.
    """

    optimization: str = "extended"
    prepacking: bool = False
    initializers: str = "shared"

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"optimization": self.optimization, "prepacking": self.prepacking}
        if self.initializers != "shared":
            d["initializers"] = self.initializers
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "runtime") -> RuntimeConfig:
        _no_extra(d if isinstance(d, dict) else {}, {"optimization", "prepacking", "initializers"}, where)
        level = _req(d, "optimization", str, where)
        if level not in _OPT_LEVELS:
            raise FormatError(f"manifest: {where}.optimization must be one of {', '.join(_OPT_LEVELS)}")
        inits = _opt(d, "initializers", str, where) or "shared"
        if inits not in _INITIALIZER_MODES:
            raise FormatError(f"manifest: {where}.initializers must be one of {', '.join(_INITIALIZER_MODES)}")
        return cls(level, _req(d, "prepacking", bool, where), inits)


@dataclass(frozen=True)
class SegmentInfo:
    """Where a segment lies in the data region, and how to check it without the key."""

    index: int
    name: str  # "graph" or "weights" (later: "detector.graph", ...)
    encrypted: bool
    offset: int  # from the start of the data region
    length: int  # stored bytes (ciphertext and tags when encrypted)
    plain_length: int
    chunk_size: int
    sha256: str  # of the stored bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index, "name": self.name, "encrypted": self.encrypted, "offset": self.offset,
            "length": self.length, "plain_length": self.plain_length, "chunk_size": self.chunk_size,
            "sha256": self.sha256,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str) -> SegmentInfo:
        keys = {"index", "name", "encrypted", "offset", "length", "plain_length", "chunk_size", "sha256"}
        _no_extra(d if isinstance(d, dict) else {}, keys, where)
        vals = {
            "index": _req(d, "index", int, where), "name": _str(_req(d, "name", str, where), where + ".name", 64),
            "encrypted": _req(d, "encrypted", bool, where), "offset": _req(d, "offset", int, where),
            "length": _req(d, "length", int, where), "plain_length": _req(d, "plain_length", int, where),
            "chunk_size": _req(d, "chunk_size", int, where), "sha256": _req(d, "sha256", str, where),
        }
        for k in ("index", "offset", "length", "plain_length", "chunk_size"):
            if vals[k] < 0 or vals[k] >= 1 << 62:
                raise FormatError(f"manifest: {where}.{k} is out of range")
        h = vals["sha256"]
        if len(h) != 64 or any(c not in "0123456789abcdef" for c in h):
            raise FormatError(f"manifest: {where}.sha256 is not a SHA-256 hex digest")
        return cls(**vals)


@dataclass(frozen=True)
class Manifest:
    capsule_id: uuid.UUID
    version: int
    name: str
    created: dt.datetime
    provider_key: bytes  # raw Ed25519 public key that signs the manifest and the licenses
    provider_name: str
    server_url: str | None
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    preprocessing: dict[str, Any] | None
    class_names: tuple[str, ...] | None
    public_architecture: bool
    policy: Policy
    runtime: RuntimeConfig
    segments: tuple[SegmentInfo, ...]
    description: str = ""

    def segment(self, name: str) -> SegmentInfo:
        for s in self.segments:
            if s.name == name:
                return s
        raise FormatError(f"capsule has no {name!r} segment")

    def to_dict(self) -> dict[str, Any]:
        from .._util import b64e

        return {
            "format": MANIFEST_FORMAT,
            "capsule_id": str(self.capsule_id),
            "version": self.version,
            "name": self.name,
            "description": self.description,
            "created": self.created.isoformat(),
            "provider": {"key": b64e(self.provider_key), "name": self.provider_name, "server_url": self.server_url},
            "model": {
                "inputs": [t.to_dict() for t in self.inputs],
                "outputs": [t.to_dict() for t in self.outputs],
                "preprocessing": self.preprocessing,
                "class_names": list(self.class_names) if self.class_names is not None else None,
                "public_architecture": self.public_architecture,
            },
            "policy": self.policy.to_dict(),
            "runtime": self.runtime.to_dict(),
            "segments": [s.to_dict() for s in self.segments],
        }

    @classmethod
    def from_dict(cls, d: Any) -> Manifest:
        from .._util import b64d

        if not isinstance(d, dict):
            raise FormatError("manifest must be a JSON object")
        fmt = d.get("format")
        if fmt != MANIFEST_FORMAT:
            raise FormatError(f"manifest format {fmt!r} is not {MANIFEST_FORMAT!r}")
        _no_extra(d, {"format", "capsule_id", "version", "name", "description", "created", "provider", "model",
                      "policy", "runtime", "segments"}, "manifest")
        try:
            cid = uuid.UUID(_req(d, "capsule_id", str, "manifest"))
        except ValueError as e:
            raise FormatError("manifest: capsule_id is not a UUID") from e
        version = _req(d, "version", int, "manifest")
        if not 0 <= version < 1 << 31:
            raise FormatError("manifest: version is out of range")
        prov = _req(d, "provider", dict, "manifest")
        _no_extra(prov, {"key", "name", "server_url"}, "provider")
        try:
            pkey = b64d(_req(prov, "key", str, "provider"))
        except ValueError as e:
            raise FormatError("manifest: provider.key is not base64") from e
        if len(pkey) != 32:
            raise FormatError("manifest: provider.key is not an Ed25519 public key")
        model = _req(d, "model", dict, "manifest")
        _no_extra(model, {"inputs", "outputs", "preprocessing", "class_names", "public_architecture"}, "model")
        inputs = _req(model, "inputs", list, "model")
        outputs = _req(model, "outputs", list, "model")
        if not (1 <= len(inputs) <= 64 and 1 <= len(outputs) <= 64):
            raise FormatError("manifest: a model needs 1 to 64 inputs and outputs")
        classes = _opt(model, "class_names", list, "model")
        if classes is not None:
            if len(classes) > MAX_CLASSES or not all(isinstance(c, str) and len(c) <= MAX_NAME for c in classes):
                raise FormatError("manifest: model.class_names must be a list of short strings")
        segs = _req(d, "segments", list, "manifest")
        if not 1 <= len(segs) <= MAX_SEGMENTS:
            raise FormatError("manifest: bad number of segments")
        segments = tuple(SegmentInfo.from_dict(s, f"segments[{i}]") for i, s in enumerate(segs))
        if [s.index for s in segments] != list(range(len(segments))):
            raise FormatError("manifest: segments must be numbered 0, 1, 2, ... in order")
        if len({s.name for s in segments}) != len(segments):
            raise FormatError("manifest: segment names must be unique")
        created = parse_time(_req(d, "created", str, "manifest"), "created")
        assert created is not None
        return cls(
            capsule_id=cid,
            version=version,
            name=_str(_req(d, "name", str, "manifest"), "name"),
            description=(_str(d.get("description") or "", "description", 4096)
                         if isinstance(d.get("description", ""), str) else ""),
            created=created,
            provider_key=pkey,
            provider_name=_str(_req(prov, "name", str, "provider"), "provider.name"),
            server_url=_opt(prov, "server_url", str, "provider"),
            inputs=tuple(TensorSpec.from_dict(t, f"model.inputs[{i}]") for i, t in enumerate(inputs)),
            outputs=tuple(TensorSpec.from_dict(t, f"model.outputs[{i}]") for i, t in enumerate(outputs)),
            preprocessing=_opt(model, "preprocessing", dict, "model"),
            class_names=tuple(classes) if classes is not None else None,
            public_architecture=_req(model, "public_architecture", bool, "model"),
            policy=Policy.from_dict(_req(d, "policy", dict, "manifest")),
            runtime=RuntimeConfig.from_dict(_req(d, "runtime", dict, "manifest")),
            segments=segments,
        )
