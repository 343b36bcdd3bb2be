"""An in-memory provider for enclave tests: answers setup and signs vouchers, no server, no network.

Like python-tuf's repository simulator: the real signing and HPKE code, no I/O, so tests reach
the enclave's checks directly.
"""

from __future__ import annotations

import datetime as dt
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from onnx import TensorProto, helper, numpy_helper

import mlcapsule
from mlcapsule.enclave._util import b64d, b64e
from mlcapsule.enclave.crypto.keys import ContentKey, generate_provider_key, load_provider_key
from mlcapsule.enclave.messages.license import License
from mlcapsule.enclave.messages.setup import seal_payload
from mlcapsule.enclave.messages.voucher import Voucher


def tiny_model(seed: int = 0, n_in: int = 8, n_out: int = 3) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_in, n_out)).astype(np.float32)
    b = rng.standard_normal(n_out).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Gemm", ["input", "W", "B"], ["logits"]), helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", n_in])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_out])],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "B")])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


@dataclass
class Provider:
    root: Path
    key_path: Path = field(init=False)
    key: Ed25519PrivateKey = field(init=False)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.key_path = self.root / "provider.pem"
        if not self.key_path.exists():
            generate_provider_key(self.key_path)
        self.key = load_provider_key(self.key_path)

    def pack(self, name: str = "tiny", model: onnx.ModelProto | None = None, **kw: Any) -> tuple[Path, ContentKey]:
        path = self.root / f"{name}.capsule"
        res = mlcapsule.pack(model or tiny_model(), path, provider_key=self.key_path, **kw)
        return path, ContentKey.load(res.key_path)

    def license(self, ckey: ContentKey, receipt_pub: bytes, *, budget: int | None = 10, lease_size: int = 4,
                expires: dt.datetime | None = None, capsule_id: uuid.UUID | None = None, version: int | None = None,
                key: Ed25519PrivateKey | None = None, defenses: list[str] | None = None) -> dict[str, Any]:
        lic = License(license_id=str(uuid.uuid4()), capsule_id=capsule_id or ckey.capsule_id,
                      version=ckey.version if version is None else version, device_id=str(uuid.uuid4()),
                      account="alice", receipt_key=receipt_pub, budget=budget, expires=expires,
                      issued=dt.datetime.now(dt.timezone.utc), lease_size=lease_size,
                      policy={"defenses": list(defenses)} if defenses else {})
        return lic.sign(key or self.key)

    def answer(self, begin: dict[str, Any], nonce: bytes, ckey: ContentKey, **kw: Any) -> tuple[bytes, dict[str, Any]]:
        """(HPKE payload, license envelope) for the enclave's setup_begin reply."""
        env = self.license(ckey, b64d(begin["receipt_pub"]), **kw)
        return seal_payload(b64d(begin["hpke_pub"]), nonce, ckey.key, env), env

    def voucher(self, license_env: dict[str, Any], seq: int, queries: int) -> dict[str, Any]:
        body = license_env["body"]
        return Voucher(body["license_id"], body["device_id"], seq, queries).sign(self.key)

    def unlock(self, license_env: dict[str, Any], seq: int, reset: bool = False) -> dict[str, Any]:
        """An unlock voucher: numbered in the device's voucher sequence, like top-ups."""
        from mlcapsule.enclave.messages.unlock import Unlock

        body = license_env["body"]
        return Unlock(body["license_id"], body["device_id"], seq, reset).sign(self.key)


def b64(x: bytes) -> str:
    return b64e(x)
