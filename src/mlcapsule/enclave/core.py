"""The enclave's logic behind the ECALLs: load a capsule, check inputs, run the model.

Runs inside the hardened worker. It holds the content key and the plaintext model and never
returns either: every reply is built from public manifest fields, status, and model outputs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..crypto.chunks import SegmentCipher
from ..crypto.keys import ContentKey
from ..errors import InputError, IntegrityError, NotProvisionedError, ProtocolError
from ..format.container import CapsuleFile
from ..format.manifest import Manifest, TensorSpec
from ..runtime.resident import ResidentModel, aligned_empty
from .backends.base import Backend
from .protocol import PROTOCOL_VERSION


class EnclaveCore:
    def __init__(self, backend: Backend, capsule_path: Path, state_dir: Path, run_dir: Path,
                 *, hardening: dict[str, Any] | None = None, threads: int | None = None) -> None:
        self.backend = backend
        self.capsule_path = capsule_path
        self.state_dir = state_dir
        self.run_dir = run_dir
        self.hardening = hardening or {}
        self.threads = threads
        self.manifest: Manifest | None = None
        self.model: ResidentModel | None = None
        self.license_mode = "none"
        self.queries = 0
        self.load_seconds = 0.0

    # -- ECALLs -------------------------------------------------------------------------------
    def hello(self) -> dict[str, Any]:
        return {
            "protocol": PROTOCOL_VERSION,
            "backend": self.backend.name,
            "measurement": self.backend.measurement().hex(),
            "threat_model": self.backend.threat_model.as_dict(),
            "hardening": self.hardening,
        }

    def load(self, *, dev_key: str | None) -> dict[str, Any]:
        t0 = time.perf_counter()
        capsule = CapsuleFile(self.capsule_path)
        try:
            m = capsule.manifest
            if dev_key is None:
                raise NotProvisionedError("this capsule has no license on this device")
            key = ContentKey.load(dev_key)
            if key.capsule_id != m.capsule_id or key.version != m.version:
                raise IntegrityError("the content key belongs to another capsule or version",
                                     hint="use the .key file written when this capsule version was packed")
            graph = self._decrypt(capsule, "graph", key.key)
            weights_seg = m.segment("weights")
            weights = aligned_empty(weights_seg.plain_length)
            SegmentCipher(key.key, m.capsule_id, m.version, weights_seg.index, weights_seg.chunk_size).decrypt_into(
                capsule.segment_view(weights_seg), memoryview(weights))
            self.model = ResidentModel(graph, weights, m.runtime, placeholder_dir=self.run_dir, threads=self.threads)
            del graph
        finally:
            capsule.close()
        self.manifest = m
        self.license_mode = "unsafe-dev-key"
        self.load_seconds = time.perf_counter() - t0
        return {"capsule_id": str(m.capsule_id), "version": m.version, "license": self.license_mode,
                "load_seconds": self.load_seconds}

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.model is None or self.manifest is None:
            raise NotProvisionedError("no capsule is loaded in the enclave")
        feeds = check_inputs(self.manifest.inputs, inputs)
        outputs = self.model.run(feeds)
        self.queries += _batch_size(feeds)
        return {spec.name: out for spec, out in zip(self.manifest.outputs, outputs)}

    def status(self) -> dict[str, Any]:
        m = self.manifest
        return {
            **self.hello(),
            "loaded": self.model is not None,
            "capsule": None if m is None else {"capsule_id": str(m.capsule_id), "version": m.version, "name": m.name},
            "license": self.license_mode,
            "queries_this_session": self.queries,
            "load_seconds": self.load_seconds,
            "runtime": None if m is None else m.runtime.to_dict(),
        }

    # -- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _decrypt(capsule: CapsuleFile, name: str, key: bytes) -> bytearray:
        m = capsule.manifest
        seg = m.segment(name)
        stored = capsule.segment_view(seg)
        try:
            if not seg.encrypted:
                import hashlib

                if hashlib.sha256(stored).hexdigest() != seg.sha256:
                    raise IntegrityError("the capsule failed its integrity check")
                return bytearray(stored)
            return SegmentCipher(key, m.capsule_id, m.version, seg.index, seg.chunk_size).decrypt(stored, seg.plain_length)
        finally:
            stored.release()


def _batch_size(feeds: dict[str, np.ndarray]) -> int:
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1


def check_inputs(specs: tuple[TensorSpec, ...], inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs must match the manifest exactly: names, dtypes, ranks and fixed dimensions."""
    names = {s.name for s in specs}
    if set(inputs) != names:
        raise InputError(f"the model takes inputs {sorted(names)}, got {sorted(inputs)}")
    batch = None
    for s in specs:
        x = inputs[s.name]
        if x.dtype.name != s.dtype:
            raise InputError(f"input {s.name!r} must be {s.dtype}, got {x.dtype.name}")
        if x.ndim != len(s.shape):
            raise InputError(f"input {s.name!r} must have {len(s.shape)} dimensions, got shape {list(x.shape)}")
        for want, got in zip(s.shape, x.shape):
            if isinstance(want, int) and want > 0 and want != got:
                raise InputError(f"input {s.name!r} must have shape {list(s.shape)}, got {list(x.shape)}")
        if x.ndim:
            if batch is not None and x.shape[0] != batch:
                raise InputError("all inputs must have the same batch size")
            batch = x.shape[0]
    if batch == 0:
        raise InputError("the batch is empty")
    return inputs


__all__ = ["EnclaveCore", "check_inputs", "ProtocolError"]
