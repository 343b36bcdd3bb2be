"""The capsule file format: container (header, signed manifest, data region) and manifest schema."""

from .container import MAGIC, MAJOR, MINOR, CapsuleFile
from .manifest import Manifest, Policy, RuntimeConfig, SegmentInfo, TensorSpec
from .trust import Trust, TrustProviderKey, UnsafeTrustManifestKey, verify_capsule

__all__ = ["CapsuleFile", "MAGIC", "MAJOR", "MINOR", "Manifest", "Policy", "RuntimeConfig", "SegmentInfo", "TensorSpec",
           "Trust", "TrustProviderKey", "UnsafeTrustManifestKey", "verify_capsule"]
