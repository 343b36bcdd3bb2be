"""Regenerate tests/vectors (only when the format version changes: old vectors must keep passing).

    .venv/bin/python tests/make_vectors.py
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from provider_sim import Provider, tiny_model  # noqa: E402

import mlcapsule  # noqa: E402

OUT = Path(__file__).parent / "vectors"


def main() -> None:
    OUT.mkdir(exist_ok=True)
    p = Provider(OUT / "_provider")
    model = tiny_model(seed=7)
    res = mlcapsule.pack(model, OUT / "v1.0-tiny.capsule", provider_key=p.key_path, name="golden-v1.0",
                         capsule_id=uuid.UUID("00000000-0000-4000-8000-000000000001"), chunk_size=64,
                         class_names=["a", "b", "c"], key_output=OUT / "v1.0-tiny.capsule.key")
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
    import onnxruntime as ort

    y = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    (OUT / "v1.0-tiny.expected.json").write_text(json.dumps({"input": x.tolist(), "output": y.tolist(),
                                                             "capsule_id": str(res.manifest.capsule_id)}, indent=1))
    (OUT / "v1.0-tiny.provider.pem.pub").write_bytes((p.key_path.parent / "provider.pem.pub").read_bytes())
    import shutil

    shutil.rmtree(OUT / "_provider")


if __name__ == "__main__":
    main()
