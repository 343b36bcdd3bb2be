"""IEE backends. Each one states honestly what it protects against."""

from __future__ import annotations

from .base import Backend, ThreatModel

BACKENDS = ("software", "tpm", "cvm")


def get_backend(name: str, **kwargs: object) -> Backend:
    from ..errors import UsageError

    if name == "software":
        from .software import SoftwareBackend

        return SoftwareBackend(**kwargs)  # type: ignore[arg-type]
    if name == "tpm":
        try:
            from .tpm import TpmBackend
        except ImportError as e:
            raise UsageError("the tpm backend needs tpm2-pytss", hint="pip install 'mlcapsule[tpm]'") from e
        return TpmBackend(**kwargs)  # type: ignore[arg-type]
    if name == "cvm":
        from .cvm import CvmBackend

        return CvmBackend(**kwargs)  # type: ignore[arg-type]
    raise UsageError(f"unknown enclave backend {name!r}", hint=f"choose one of: {', '.join(BACKENDS)}")


__all__ = ["Backend", "ThreatModel", "BACKENDS", "get_backend"]
