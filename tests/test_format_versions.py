"""Issue 10, item 5: format 1.1 (``runtime.initializers``).

* This build (a 1.1 reader) reads every 1.0 capsule: the 1.0 golden vector, and a 1.0 capsule as
  mlcapsule 0.1.0 wrote it, with ``runtime.initializers`` under a 1.0 header.
* A 1.0 reader refuses a 1.1 capsule cleanly, from the header, before it parses the manifest.
* The packer writes 1.1 only when a capsule uses a 1.1 field, so other capsules stay 1.0.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

import mlcapsule
from mlcapsule.enclave.errors import FormatError, UnsupportedVersionError
from mlcapsule.enclave.format import CapsuleFile, TrustProviderKey, verify_capsule
from mlcapsule.enclave.format import trust as T

from conftest import resign

VEC = Path(__file__).parent / "vectors"
#: (vector, header version, runtime.initializers)
VECTORS = [("v1.0-tiny", (1, 0), "shared"), ("v1.0-initializers-0.1.0", (1, 0), "copy"), ("v1.1-tiny", (1, 1), "copy"),
           ("v1.2-tiny", (1, 2), "shared")]


def _pin(name: str) -> TrustProviderKey:
    return TrustProviderKey.from_pem((VEC / f"{name}.provider.pem.pub").read_bytes())


def _pieces(path: Path) -> tuple[bytes, bytes, bytes]:
    blob = path.read_bytes()
    mlen = struct.unpack_from("<I", blob, 16)[0]
    return blob[:64], blob[64:64 + mlen], blob[64 + mlen:128 + mlen]


@pytest.mark.parametrize("name,version,initializers", VECTORS)
def test_this_build_reads_every_golden_capsule_and_predicts_its_recorded_outputs(name, version, initializers, tmp_path):
    expected = json.loads((VEC / f"{name}.expected.json").read_text())
    with CapsuleFile(VEC / f"{name}.capsule", trust=_pin(name)) as cf:
        cf.verify_segments()
        assert cf.format_version == version
        assert cf.manifest.runtime.initializers == initializers
        assert str(cf.manifest.capsule_id) == expected["capsule_id"]
    key = tmp_path / "k"
    key.write_bytes((VEC / f"{name}.capsule.key").read_bytes())
    key.chmod(0o600)
    with mlcapsule.open_capsule(VEC / f"{name}.capsule", trust=_pin(name), unsafe_dev_key=key,
                                state_dir=tmp_path / "state", platform_dir=tmp_path / "platform") as cap:
        out = cap.predict(np.array(expected["input"], dtype=np.float32))
    np.testing.assert_allclose(out, np.array(expected["output"], dtype=np.float32), rtol=1e-6)


def test_a_1_0_reader_refuses_a_1_1_capsule_from_its_header(monkeypatch, cli):
    """A 1.0 reader is this reader with its supported minor version set to 0."""
    header, manifest, sig = _pieces(VEC / "v1.1-tiny.capsule")
    with pytest.raises(UnsupportedVersionError, match="1.1 is not supported"):
        verify_capsule(header, manifest, sig, trust=_pin("v1.1-tiny"), read_minor=0)
    # from the header alone: a manifest that is not even JSON is never looked at
    with pytest.raises(UnsupportedVersionError):
        verify_capsule(header, b"\xff" * len(manifest), sig, trust=_pin("v1.1-tiny"), read_minor=0)
    monkeypatch.setattr(T, "MINOR", 0)
    with pytest.raises(UnsupportedVersionError, match="upgrade|not supported"):
        CapsuleFile(VEC / "v1.1-tiny.capsule", trust=_pin("v1.1-tiny"))
    r = cli("verify", VEC / "v1.1-tiny.capsule", "--trust", VEC / "v1.1-tiny.provider.pem.pub")
    assert r.code == UnsupportedVersionError.exit_code and "not supported" in r.err and "Traceback" not in r.err
    # ... and that 1.0 reader still reads 1.0 capsules
    for name in ("v1.0-tiny", "v1.0-initializers-0.1.0"):
        with CapsuleFile(VEC / f"{name}.capsule", trust=_pin(name)) as cf:
            assert cf.format_version == (1, 0)


def test_a_future_minor_version_is_refused_by_this_build(tmp_path, capsule_copy, provider_key):
    """A validly signed 1.2 header: refused before the manifest, whatever it holds."""
    resign(capsule_copy.path, None, provider_key, minor=T.MINOR + 1)
    with pytest.raises(UnsupportedVersionError):
        CapsuleFile(capsule_copy.path, trust=TrustProviderKey(provider_key.raw))


def test_a_1_1_field_unknown_to_the_schema_is_still_refused_in_any_header(capsule_copy, provider_key):
    """The minor version gates fields; unknown fields stay refused (no silent ignoring)."""
    resign(capsule_copy.path, lambda m: m["runtime"].update(new_runtime_option=1), provider_key, minor=1)
    with pytest.raises(FormatError, match="unknown field"):
        CapsuleFile(capsule_copy.path, trust=TrustProviderKey(provider_key.raw))


def test_the_packer_writes_1_1_only_for_capsules_that_use_runtime_initializers(tmp_path, provider_key, monkeypatch):
    import mlcapsule.packer as packer
    from mlcapsule.enclave.format.manifest import RuntimeConfig

    from provider_sim import tiny_model

    shared = mlcapsule.pack(tiny_model(seed=1), tmp_path / "shared.capsule", provider_key=provider_key.path,
                            tune_runtime=False)
    monkeypatch.setattr(packer, "RUNTIME_CANDIDATES", (RuntimeConfig("extended", False, "copy"),))
    copy = mlcapsule.pack(tiny_model(seed=1), tmp_path / "copy.capsule", provider_key=provider_key.path,
                          tune_runtime=False)
    pin = TrustProviderKey(provider_key.raw)
    with CapsuleFile(shared.capsule_path, trust=pin) as a, CapsuleFile(copy.capsule_path, trust=pin) as b:
        assert (a.manifest.runtime.initializers, a.format_version) == ("shared", (1, 0))
        assert "initializers" not in json.loads(a.manifest_bytes)["runtime"]
        assert (b.manifest.runtime.initializers, b.format_version) == ("copy", (1, 1))
