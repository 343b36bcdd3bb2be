"""The interface every isolated-execution backend implements.

A backend gives the enclave four things: a measurement of the code it runs, evidence that binds
data to that measurement, sealing of secrets to the platform and measurement, and monotonic
counters. The software backend implements them with files and keys on disk; a TPM backend with
TPM2 objects; hardware TEEs with their own primitives.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ThreatModel:
    protects_against: tuple[str, ...]
    does_not_protect_against: tuple[str, ...]
    rollback_protected: bool

    def as_dict(self) -> dict[str, Any]:
        return {"protects_against": list(self.protects_against),
                "does_not_protect_against": list(self.does_not_protect_against),
                "rollback_protected": self.rollback_protected}


class Backend(ABC):
    name: str
    threat_model: ThreatModel

    @abstractmethod
    def measurement(self) -> bytes:
        """Hash of the enclave code and pinned runtime versions this backend vouches for."""

    @abstractmethod
    def evidence(self, report_data: bytes) -> dict[str, Any]:
        """Evidence that ``report_data`` was produced by this measurement on this platform."""

    @abstractmethod
    def seal(self, plaintext: bytes, *, label: bytes) -> bytes:
        """Encrypt to this platform and measurement. ``label`` is authenticated context."""

    @abstractmethod
    def unseal(self, blob: bytes, *, label: bytes) -> bytes:
        """Inverse of :meth:`seal`; raises IntegrityError on any other platform or measurement."""

    @abstractmethod
    def counter_read(self, name: str) -> int:
        """Current value of the monotonic counter ``name`` (0 if it does not exist yet)."""

    @abstractmethod
    def counter_increment(self, name: str) -> int:
        """Increment the counter and return the new value."""

    def paths(self) -> tuple[list[str], list[str]]:
        """(read-only, read-write) paths the hardened worker needs for this backend."""
        return [], []
