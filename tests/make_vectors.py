"""Write a golden vector of tests/vectors (once, when a format version appears: old vectors
must keep passing and are never regenerated).

    .venv/bin/python tests/make_vectors.py 1.2
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


def v1_1() -> None:
    """Format 1.1: a capsule that uses ``runtime.initializers`` ("copy"), so the packer writes 1.1."""
    import mlcapsule.packer as packer
    from mlcapsule.enclave.format.manifest import RuntimeConfig

    p = Provider(OUT / "_provider")
    packer.RUNTIME_CANDIDATES = (RuntimeConfig("extended", False, "copy"),)  # the one this vector needs
    model = tiny_model(seed=9)
    res = mlcapsule.pack(model, OUT / "v1.1-tiny.capsule", provider_key=p.key_path, name="golden-v1.1",
                         capsule_id=uuid.UUID("00000000-0000-4000-8000-000000000003"), chunk_size=64,
                         class_names=["a", "b", "c"], key_output=OUT / "v1.1-tiny.capsule.key")
    assert res.manifest.runtime.initializers == "copy"
    _expected(model, "v1.1-tiny", res)
    (OUT / "v1.1-tiny.provider.pem.pub").write_bytes((p.key_path.parent / "provider.pem.pub").read_bytes())
    import shutil

    shutil.rmtree(OUT / "_provider")


def v1_2() -> None:
    """Format 1.2: a capsule with a defense policy (top-k 2, rounding to 3 decimals); its expected
    outputs are the defended answers, so the vector pins the transforms' semantics too."""
    import mlcapsule.packer as packer
    from mlcapsule.enclave.format.manifest import RuntimeConfig

    p = Provider(OUT / "_provider")
    packer.RUNTIME_CANDIDATES = (RuntimeConfig("extended", False, "shared"),)
    model = tiny_model(seed=10)
    res = mlcapsule.pack(model, OUT / "v1.2-tiny.capsule", provider_key=p.key_path, name="golden-v1.2",
                         capsule_id=uuid.UUID("00000000-0000-4000-8000-000000000004"), chunk_size=64,
                         class_names=["a", "b", "c"], key_output=OUT / "v1.2-tiny.capsule.key",
                         defenses=["top-k:2", "round:3"])
    assert res.manifest.policy.defenses
    _expected(model, "v1.2-tiny", res, defended=True)
    (OUT / "v1.2-tiny.provider.pem.pub").write_bytes((p.key_path.parent / "provider.pem.pub").read_bytes())
    import shutil

    shutil.rmtree(OUT / "_provider")


def _expected(model, name: str, res, defended: bool = False) -> None:  # type: ignore[no-untyped-def]
    import onnxruntime as ort

    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"input": x})[0]
    if defended:
        from mlcapsule.enclave.defenses.outputs import transform
        from mlcapsule.enclave.defenses.policy import DefensePolicy

        y = transform(DefensePolicy.from_dict(res.manifest.policy.defenses), y).astype(np.float32)
    (OUT / f"{name}.expected.json").write_text(json.dumps({"input": x.tolist(), "output": y.tolist(),
                                                           "capsule_id": str(res.manifest.capsule_id)}, indent=1))


# v1.0-initializers-0.1.0.*: a 1.0 capsule as mlcapsule 0.1.0 wrote it, with runtime.initializers
# "copy" under a 1.0 header (the field shipped before the minor bump). It was made with the 0.1.0
# source, never regenerated:  git archive 9106ca0 src | tar -x -C /tmp/old && PYTHONPATH=/tmp/old/src
# python: as v1_1() with seed=8, capsule id ...0002, name "golden-v1.0-initializers".


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
    # Only the vector named on the command line; the old ones stay as they were written.
    {"1.0": main, "1.1": v1_1, "1.2": v1_2}[sys.argv[1] if len(sys.argv) > 1 else "1.1"]()
