"""Golden vectors: this build must keep reading capsules of every format version it supports."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization

from mlcapsule.enclave.backends.software import SoftwareBackend
from mlcapsule.enclave.core import EnclaveCore
from mlcapsule.enclave.errors import SignatureError
from mlcapsule.enclave.format.container import CapsuleFile
from mlcapsule.enclave.format.trust import TrustProviderKey

VEC = Path(__file__).parent / "vectors"


def _pinned() -> bytes:
    pub = serialization.load_pem_public_key((VEC / "v1.0-tiny.provider.pem.pub").read_bytes())
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_v1_0_golden_capsule_still_reads_and_predicts(tmp_path):
    expected = json.loads((VEC / "v1.0-tiny.expected.json").read_text())
    with CapsuleFile(VEC / "v1.0-tiny.capsule", trust=TrustProviderKey(_pinned())) as cf:
        cf.verify_segments()
        assert str(cf.manifest.capsule_id) == expected["capsule_id"]
        assert cf.manifest.segment("weights").chunk_size == 64
    key = tmp_path / "k"
    key.write_bytes((VEC / "v1.0-tiny.capsule.key").read_bytes())
    os.chmod(key, 0o600)
    (tmp_path / "run").mkdir()
    core = EnclaveCore(SoftwareBackend(tmp_path / "platform"), VEC / "v1.0-tiny.capsule", tmp_path / "state", tmp_path / "run")
    core.load(dev_key=str(key))
    out = core.infer({"input": np.array(expected["input"], dtype=np.float32)})["probabilities"]
    np.testing.assert_allclose(out, np.array(expected["output"], dtype=np.float32), rtol=1e-6)


def test_v1_0_golden_capsule_refused_under_another_pinned_key():
    with pytest.raises(SignatureError):
        CapsuleFile(VEC / "v1.0-tiny.capsule", trust=TrustProviderKey(bytes(32)))
