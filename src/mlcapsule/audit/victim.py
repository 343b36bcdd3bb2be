"""The victim as the audit sees it: the plain model (decrypted in memory with the provider's
content key), the capsule's signed defense policy, and an oracle that watches the defenses.

The provider owns the content key (``CAPSULE.key``), so the audit may decrypt the capsule: the
plain graph and weights are reassembled in this process's memory (never written to disk) and
run by ONNX Runtime. That is the *undefended* baseline, and the reference that fidelity is
measured against. The defended victim is the capsule itself, opened with the dev key in an
enclave worker (fresh defense state per session), or set up with a license (``--state-dir``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..attacks.oracle import CapsuleOracle, QueryBudgetExhausted
from ..errors import DefenseError, IntegrityError, UsageError

__all__ = ["CapsuleFacts", "read_capsule", "plain_model", "defense_parts", "WatchedCapsuleOracle", "FlagLog"]


@dataclass(frozen=True)
class CapsuleFacts:
    """What the audit needs from the capsule's signed manifest."""

    path: Path
    name: str
    capsule_id: str
    version: int
    input_shape: tuple[int, ...]  # one query, without the batch axis
    n_classes: int
    defenses: dict[str, Any]  # the signed policy (manifest.policy.defenses), {} when none
    described: list[str]  # the policy in words
    budget: int | None


def read_capsule(path: str | os.PathLike[str]) -> CapsuleFacts:
    """The manifest's facts (its signature and integrity are checked; its key is not pinned:
    the audit is the provider's, run on its own capsule)."""
    from ..enclave.defenses.policy import DefensePolicy
    from ..enclave.format.container import CapsuleFile
    from ..enclave.format.trust import UnsafeTrustManifestKey

    with CapsuleFile(path, trust=UnsafeTrustManifestKey()) as cap:
        m = cap.manifest
    if len(m.inputs) != 1 or not m.outputs:
        raise UsageError("the audit needs a capsule with one input and a class-probability output")
    shape = tuple(int(d) if isinstance(d, int) and d > 0 else -1 for d in m.inputs[0].shape[1:])
    out = m.outputs[0].shape
    n_classes = int(out[-1]) if out and isinstance(out[-1], int) and out[-1] > 0 else -1
    if -1 in shape or n_classes < 2:
        raise UsageError("the audit needs fixed input and output sizes in the manifest",
                         hint="pack the model with fixed non-batch dimensions")
    policy = DefensePolicy.from_dict(m.policy.defenses) if m.policy.defenses else None
    return CapsuleFacts(Path(path), m.name, str(m.capsule_id), int(m.version), shape, n_classes,
                        dict(m.policy.defenses or {}), policy.describe() if policy is not None else [],
                        m.policy.budget)


def _segment_plain(capsule: Any, name: str, key: bytes) -> bytes:
    """A segment's plaintext, decrypted exactly as the enclave decrypts it."""
    return bytes(capsule.plaintext(name, key))


def _open_with_key(path: str | os.PathLike[str], dev_key: str | os.PathLike[str]) -> tuple[Any, bytes]:
    from ..enclave.crypto.keys import ContentKey
    from ..enclave.format.container import CapsuleFile
    from ..enclave.format.trust import UnsafeTrustManifestKey

    cap = CapsuleFile(path, trust=UnsafeTrustManifestKey())
    key = ContentKey.load(dev_key)
    m = cap.manifest
    if key.capsule_id != m.capsule_id or key.version != m.version:
        cap.close()
        raise IntegrityError("the content key belongs to another capsule or version",
                             hint="pass the .key file written when this capsule version was packed")
    return cap, key.key


def plain_model(path: str | os.PathLike[str], dev_key: str | os.PathLike[str]) -> bytes:
    """The capsule's model as plain ONNX bytes, reassembled in memory with the content key."""
    import onnx
    from onnx import TensorProto

    from ..enclave.runtime.resident import placeholder_views
    from ..enclave.runtime.weights import WeightReader

    cap, key = _open_with_key(path, dev_key)
    try:
        model = onnx.ModelProto.FromString(_segment_plain(cap, "graph", key))
        reader = WeightReader(cap, key, release_pages=False)
        try:
            weights = np.empty(reader.plain_length, dtype=np.uint8)
            reader.read_into(weights, 0)
        finally:
            reader.close()
    finally:
        cap.close()
    views = placeholder_views(model, weights)
    for t in model.graph.initializer:
        if t.name in views:
            v = views[t.name]
            del t.external_data[:]
            t.data_location = TensorProto.DEFAULT
            t.raw_data = np.ascontiguousarray(v, dtype=v.dtype.newbyteorder("<")).tobytes()
    return bytes(model.SerializeToString())


def defense_parts(path: str | os.PathLike[str], dev_key: str | os.PathLike[str]) -> tuple[Any, Any]:
    """The capsule's OOD statistics and kennen-io detector session (``None`` when absent), for
    simulating the pipeline on the plain model's answers."""
    from ..enclave.defenses.ood import OodStats

    cap, key = _open_with_key(path, dev_key)
    try:
        names = {s.name for s in cap.manifest.segments}
        ood = OodStats.from_bytes(_segment_plain(cap, "defense.ood", key)) if "defense.ood" in names else None
        kennen = None
        if "defense.kennen" in names:
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            kennen = ort.InferenceSession(_segment_plain(cap, "defense.kennen", key), so,
                                          providers=["CPUExecutionProvider"])
    finally:
        cap.close()
    return ood, kennen


def kennen_scores(session: Any, x: np.ndarray) -> np.ndarray:
    """The kennen-io detector's probe probability per query (as the enclave computes it)."""
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else -1 for d in inp.shape]
    batch = np.asarray(x, dtype=np.float32)
    probs = session.run(None, {inp.name: batch.reshape([len(batch), *shape[1:]])})[0]
    return np.asarray(probs, dtype=np.float64)[:, 1]


@dataclass
class FlagLog:
    """What the defenses did to one query stream, read from ``capsule.status()`` after each check."""

    first_alarm: dict[str, int] = field(default_factory=dict)  # detector -> queries spent at the check
    first_refused: int | None = None  # queries spent (answered) when the first refusal came
    refused_by: str | None = None
    degraded_at: int | None = None
    locked: bool = False
    state: dict[str, Any] = field(default_factory=dict)  # the last status()["defenses"]["state"]

    @property
    def first_flagged(self) -> int | None:
        values = [*self.first_alarm.values(), *([self.first_refused] if self.first_refused is not None else [])]
        return min(values) if values else None

    def to_dict(self) -> dict[str, Any]:
        return {"first_flagged": self.first_flagged, "first_alarm": dict(self.first_alarm),
                "first_refused": self.first_refused, "refused_by": self.refused_by, "degraded_at": self.degraded_at,
                "locked": self.locked, "state": self.state}


class WatchedCapsuleOracle(CapsuleOracle):
    """A :class:`CapsuleOracle` that sends ``check_every`` rows at a time and reads the capsule's
    defense state after each, so the audit knows at which query each detector raised its first
    alarm (to within ``check_every`` queries).

    A refusal by the defenses (:class:`~mlcapsule.errors.DefenseError`) ends the attack the way
    a budget does: :class:`QueryBudgetExhausted` with ``source="capsule"`` and the answered
    rows, so the attacks build what they can; :attr:`flags` says it was a defense.
    """

    def __init__(self, capsule: Any, *, check_every: int = 10, **kwargs: Any) -> None:
        super().__init__(capsule, **kwargs)
        if check_every < 1:
            raise UsageError(f"check_every must be positive, got {check_every}")
        self.check_every = check_every
        self.flags = FlagLog()

    def _check(self) -> None:
        try:
            st: Mapping[str, Any] = (self.capsule.status().get("defenses") or {}).get("state") or {}
        except Exception:  # noqa: BLE001 - a capsule that cannot say
            return
        self.flags.state = dict(st)
        for det, count in (st.get("alarms") or {}).items():
            if count and det not in self.flags.first_alarm:
                self.flags.first_alarm[det] = self.queries_spent
        if st.get("degraded") and self.flags.degraded_at is None:
            self.flags.degraded_at = self.queries_spent
        self.flags.locked = bool(st.get("locked"))

    def query(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=self.dtype)
        if x.ndim == 0:
            raise UsageError("a query batch needs a first (batch) axis")
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        for start in range(0, max(1, x.shape[0]), self.check_every):
            part = x[start:start + self.check_every]
            try:
                ys.append(CapsuleOracle.query(self, part))
                xs.append(part)
            except QueryBudgetExhausted as e:
                if e.answered_x is not None and e.answered_y is not None and len(e.answered_y):
                    xs.append(e.answered_x)
                    ys.append(e.answered_y)
                self._check()
                raise self._stop(e.source, xs, ys, e.message) from e
            except DefenseError as e:
                if self.flags.first_refused is None:
                    self.flags.first_refused = self.queries_spent
                    self.flags.refused_by = _detector_named(e.message)
                self._check()
                raise self._stop("capsule", xs, ys, f"refused by the capsule's defenses after "
                                                   f"{self.queries_spent} queries ({e.message})") from e
            self._check()
        return ys[0] if len(ys) == 1 else np.concatenate(ys, axis=0)


def _detector_named(message: str) -> str:
    for det in ("kennen", "prada", "ood"):
        if det in message:
            return det
    return "lock" if "lock" in message else "defense"
