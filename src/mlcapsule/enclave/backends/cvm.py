"""The `cvm` backend: an enclave worker inside a confidential VM guest (Intel TDX or AMD SEV-SNP).

Evidence comes from the guest kernel's configfs-tsm interface (Linux 6.7 and later,
``/sys/kernel/config/tsm/report``): the worker makes a fresh report entry (a directory), writes
the 64 bytes of report data to its ``inblob``, reads ``provider`` (``tdx_guest`` or
``sev_guest``), ``outblob`` (the TDX quote, or the SEV-SNP attestation report) and, on SEV-SNP,
``auxblob`` (the host's certificate table: VCEK or VLEK, ASK, ARK), then ``generation``, and
removes the entry. ``generation`` counts the writes to the entry; if it is not the number of
ours (1; 2 on an SEV-SNP guest above VMPL 0, which first writes ``privlevel`` with the value of
``privlevel_floor``), another program wrote to the entry between our write and our read, the report may carry
its data, and the worker tries again with a new entry (the kernel's documented race check).

Report data: ``binding (32) || mlcapsule measurement (32)`` (docs: notes/evidence_wire.md), so
the server checks the binding and the measurement of the trusted directory, and the hardware
measurement (MRTD and RTMRs, or the SNP launch measurement) against its per-type policy.

Sealing and counters: the guest's vTPM, through the `tpm` backend's code, when one is given
(``tcti``) or found (``/dev/tpmrm0``); otherwise a key file kept on the guest's disk, as the
`software` backend does, and then there is NO rollback protection (TDX and SEV-SNP give a guest
no monotonic counter). :attr:`CvmBackend.threat_model` says which, and what neither protects
against; docs/cvm.md explains it at length.

The worker makes its entries after it hardened itself: the tsm folder is one of its read-write
paths (:meth:`CvmBackend.paths`). It probes the folder once when the backend is created, before
hardening, so that a missing tree or a guest of another kind fails at start with a clear error.
"""

from __future__ import annotations

import base64
import errno
import os
import struct
import textwrap
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._util import b64e, data_home
from ..errors import EnclaveError, UsageError
from ..measurement import measurement
from .base import Backend, ThreatModel

DEFAULT_TSM_PATH = "/sys/kernel/config/tsm/report"
DEFAULT_VTPM = "/dev/tpmrm0"
#: configfs-tsm provider name -> evidence type (notes/evidence_wire.md).
PROVIDERS = {"tdx_guest": "tdx", "sev_guest": "snp"}
EVIDENCE_VERSION = 1
REPORT_DATA_LEN = 64
#: A report entry is made again at most this many times when another writer races us.
TRIES = 3
#: configfs creates an entry's attributes with the directory (the wait is then zero); a tree
#: that fills a new entry in asynchronously (the tests' fake tree) gets this long.
ATTRIBUTE_WAIT = 10.0
MAX_BLOB = 1 << 20
#: GUIDs of the SEV-SNP certificate table (GHCB specification, "SNP Extended Guest Request").
CERT_GUIDS = {
    uuid.UUID("63da758d-e664-4564-adc5-f4b93be8accd"): "vcek",
    uuid.UUID("a8074bc2-a25a-483e-aae6-39c045a0b8a1"): "vlek",
    uuid.UUID("4ab7b379-bbac-4fe4-a02f-05aef327c782"): "ask",
    uuid.UUID("c0b406a4-a803-4952-9743-3fb6014cd0ae"): "ark",
}
_TABLE_ENTRY = struct.Struct("<16sII")

_NOT_A_GUEST_HINT = ("the cvm backend runs inside an Intel TDX or AMD SEV-SNP guest with Linux 6.7 or later "
                     "(configfs mounted at /sys/kernel/config, the tdx_guest or sev_guest driver loaded); "
                     "elsewhere choose --backend software or tpm, or pass --tsm-path to another tree")


def parse_cert_table(blob: bytes) -> dict[str, bytes]:
    """The SEV-SNP certificate table (``auxblob``): entries of (GUID, offset, length), ended by an
    all-zero entry, offsets from the table's start. Returns ``{"vcek"|"vlek"|"ask"|"ark": DER}``;
    unknown GUIDs are skipped. The GUIDs are read in RFC 4122 byte order (as AMD's tools and
    the hosts write them) and, failing that, in the little-endian order of Windows GUIDs."""
    out: dict[str, bytes] = {}
    pos = 0
    while True:
        if pos + _TABLE_ENTRY.size > len(blob):
            if not blob:
                return out
            raise EnclaveError("the SEV-SNP certificate table (auxblob) has no terminating entry",
                               hint="the host's certificate blob is damaged; ask its operator to load it again")
        raw, off, length = _TABLE_ENTRY.unpack_from(blob, pos)
        pos += _TABLE_ENTRY.size
        if raw == bytes(16) and off == 0 and length == 0:
            return out
        if off + length > len(blob) or length == 0:
            raise EnclaveError("the SEV-SNP certificate table (auxblob) points outside itself",
                               hint="the host's certificate blob is damaged; ask its operator to load it again")
        name = CERT_GUIDS.get(uuid.UUID(bytes=raw)) or CERT_GUIDS.get(uuid.UUID(bytes_le=raw))
        if name is not None:
            out.setdefault(name, blob[off:off + length])


def der_to_pem(der: bytes) -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode(), 64))
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n"


def _read(path: Path, *, limit: int = MAX_BLOB) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        out = bytearray()
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return bytes(out)
            out += chunk
            if len(out) > limit:
                raise EnclaveError(f"{path} is larger than {limit} bytes")
    finally:
        os.close(fd)


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)  # configfs hands a binary attribute's bytes to the driver on close


@dataclass(frozen=True)
class CvmThreatModel(ThreatModel):
    """The threat model, plus what the backend detected (``status`` shows both: ``hello`` sends
    ``threat_model.as_dict()``)."""

    platform: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "platform": dict(self.platform)}


class CvmBackend(Backend):
    name = "cvm"

    def __init__(self, tsm_path: str | os.PathLike[str] | None = None, tcti: str | None = None, *,
                 platform_dir: str | os.PathLike[str] | None = None) -> None:
        """``tsm_path``: the configfs-tsm report folder (default :data:`DEFAULT_TSM_PATH`).
        ``tcti``: the vTPM (``device:/dev/tpmrm0``, ``swtpm:...``), ``"none"`` for no vTPM, or
        None to use ``/dev/tpmrm0`` when it exists. ``platform_dir``: where the sealing key file
        lives when there is no vTPM (default ``$MLCAPSULE_HOME/platform/cvm``)."""
        self.tsm_path = Path(tsm_path or DEFAULT_TSM_PATH)
        self.provider = self._probe()  # now: before the worker hardens itself
        self.tee = PROVIDERS[self.provider]
        self.store: Backend
        self.vtpm: str | None = None
        if tcti is None and os.path.exists(DEFAULT_VTPM):
            tcti = f"device:{DEFAULT_VTPM}"
        if tcti and tcti != "none":
            try:
                from .tpm import TpmBackend
            except ImportError as e:
                raise UsageError(f"this guest has a vTPM ({tcti}) and the cvm backend needs tpm2-pytss to use it",
                                 hint="pip install 'mlcapsule[tpm]', or pass --tcti none to run without the vTPM "
                                      "(then there is no rollback protection)") from e
            try:
                self.store = TpmBackend(tcti)
            except EnclaveError as e:
                raise EnclaveError(f"the cvm backend cannot use the vTPM: {e.message}",
                                   hint=(e.hint or "") + "; or pass --tcti none to run without the vTPM "
                                        "(then there is no rollback protection)") from e
            self.vtpm = tcti
        else:
            from .software import SoftwareBackend

            self.store = SoftwareBackend(platform_dir or data_home() / "platform" / "cvm")
        self.threat_model = self._threat_model()

    # -- what this guest is -----------------------------------------------------------------
    def _threat_model(self) -> ThreatModel:
        tee = "Intel TDX" if self.tee == "tdx" else "AMD SEV-SNP"
        gives = [
            (f"the cloud host, hypervisor or another VM reading the model from this guest's memory: {tee} "
             "encrypts and integrity-protects it (provided the provider's policy pins this guest's measured "
             "firmware and kernel, so that the guest is one the client cannot log into as root)"),
            (f"a provider trusting a machine that is not a genuine {tee} guest: the report is signed by a key "
             "that chains to the CPU vendor's root, and carries this setup's binding and the mlcapsule "
             "measurement as report data"),
            "the enclave sending data over the network (seccomp denies sockets)",
        ]
        not_given = [
            ("the guest's root user, and so a client who owns the guest: a confidential VM protects the guest "
             "from the host, not from whoever controls the guest's OS; root in the guest can read the worker's "
             "memory and the keys, and write any report data to configfs-tsm (the mlcapsule measurement in the "
             "report data is vouched for only by the guest's kernel). This backend protects the model only in a "
             "guest image the provider pins (MRTD/RTMRs or the SNP launch measurement) in which the client "
             "has no root"),
            ("a modified mlcapsule installation in a guest whose measured image does not cover it: the "
             "hardware measures the firmware and what the boot chain extends into RTMRs, not this folder"),
        ]
        if self.vtpm is None:
            gives.append("opening the sealed state on another installation (the sealing key is a file in this "
                         "guest)")
            not_given += [
                ("restoring an old copy of the sealed state and its counters (rollback is NOT detected): this "
                 "guest has no vTPM, and TDX and SEV-SNP give a guest no monotonic counter, so a snapshot of the "
                 "guest's disk (or of the whole VM) brings the budget back"),
                ("whoever can read the guest's disk: the sealing key is a file there, so the sealed state "
                 "(content key and license) is only as confidential as that disk; use disk encryption keyed "
                 "inside the guest"),
            ]
        else:
            gives.append(f"restoring an old copy of the sealed state, as far as the vTPM ({self.vtpm}) keeps its "
                         "NV counters: its counter shows the rollback")
            not_given += [
                ("the vTPM itself: the report does not bind the vTPM to this guest, and a vTPM that the "
                 "hypervisor emulates (as on most clouds) is outside the TEE: whoever runs the hypervisor can "
                 "read its seeds (and so open the sealed state with a copy of the disk) and restore its NV with a "
                 "snapshot, undoing the rollback protection. A client who runs its own TDX/SNP host is such a "
                 "party. Only a vTPM inside the TEE (an SVSM or paravisor vTPM) with fresh storage avoids it"),
            ]
            not_given += [s for s in self.store.threat_model.does_not_protect_against if "swtpm" in s]
        rollback = self.vtpm is not None and self.store.threat_model.rollback_protected
        return CvmThreatModel(protects_against=tuple(gives), does_not_protect_against=tuple(not_given),
                              rollback_protected=rollback, platform=self.platform_info(rollback))

    def platform_info(self, rollback_protected: bool | None = None) -> dict[str, Any]:
        """What the backend detected, for ``mlcapsule status``."""
        if rollback_protected is None:
            rollback_protected = self.threat_model.rollback_protected
        return {"tee": self.tee, "provider": self.provider, "tsm_path": str(self.tsm_path),
                "vtpm": self.vtpm is not None, "vtpm_tcti": self.vtpm, "rollback_protected": rollback_protected}

    def paths(self) -> tuple[list[str], list[str]]:
        read, write = self.store.paths()
        return read, [*write, str(self.tsm_path)]

    # -- configfs-tsm -----------------------------------------------------------------------
    def _tsm_error(self, e: OSError, doing: str) -> EnclaveError:
        if e.errno == errno.ENOENT:
            return EnclaveError(f"there is no configfs-tsm report folder at {self.tsm_path}", hint=_NOT_A_GUEST_HINT)
        if e.errno in (errno.EACCES, errno.EPERM):
            return EnclaveError(f"no permission to {doing} in {self.tsm_path}",
                                hint="configfs-tsm belongs to root: run the enclave as a user who may write "
                                     "there (e.g. the enclave service's user, given the folder by the guest's "
                                     "administrator)")
        if e.errno in (errno.ENXIO, errno.ENODEV, errno.EOPNOTSUPP):
            return EnclaveError(f"the kernel has no attestation provider behind {self.tsm_path} ({e.strerror})",
                                hint=_NOT_A_GUEST_HINT)
        return EnclaveError(f"configfs-tsm failed to {doing} in {self.tsm_path}: {e.strerror or e}",
                            hint="check the guest kernel's log (dmesg) for the tdx_guest / sev_guest driver")

    def _new_entry(self) -> Path:
        entry = self.tsm_path / f"mlcapsule-{os.getpid()}-{os.urandom(8).hex()}"
        try:
            os.mkdir(entry, 0o700)
        except OSError as e:
            raise self._tsm_error(e, "make a report entry") from e
        return entry

    @staticmethod
    def _remove(entry: Path) -> None:
        try:
            os.rmdir(entry)
        except OSError:
            pass  # a leftover entry costs the kernel a little memory; it never makes a report wrong

    def _read_provider(self, entry: Path) -> str:
        attr = entry / "provider"
        deadline = time.monotonic() + ATTRIBUTE_WAIT
        delay = 0.0005
        while not attr.exists():
            if time.monotonic() > deadline:
                raise EnclaveError(f"{entry} has no 'provider' attribute: {self.tsm_path} is not a configfs-tsm "
                                   "report folder", hint=_NOT_A_GUEST_HINT)
            time.sleep(delay)
            delay = min(delay * 2, 0.02)
        try:
            provider = _read(attr, limit=256).decode(errors="replace").strip()
        except OSError as e:
            raise self._tsm_error(e, "read the provider") from e
        if provider not in PROVIDERS:
            raise EnclaveError(f"this guest's attestation provider is {provider[:64]!r}, not Intel TDX "
                               "(tdx_guest) or AMD SEV-SNP (sev_guest)",
                               hint="the cvm backend supports TDX and SEV-SNP guests only; choose another backend")
        return provider

    def _probe(self) -> str:
        """Make an entry, read its provider and generation, remove it."""
        if not self.tsm_path.is_dir():
            raise EnclaveError(f"there is no configfs-tsm report folder at {self.tsm_path}", hint=_NOT_A_GUEST_HINT)
        entry = self._new_entry()
        try:
            provider = self._read_provider(entry)
            _read(entry / "generation", limit=64)
            return provider
        except OSError as e:
            raise self._tsm_error(e, "read a report entry") from e
        finally:
            self._remove(entry)

    def _report(self, inblob: bytes) -> tuple[bytes, bytes] | None:
        """(outblob, auxblob) for ``inblob`` from a fresh entry; None if another writer raced us."""
        entry = self._new_entry()
        try:
            provider = self._read_provider(entry)
            if provider != self.provider:
                raise EnclaveError(f"the attestation provider changed from {self.provider} to {provider}")
            writes = 0
            if self.tee == "snp":
                # A guest under an SVSM runs above VMPL 0 and may only ask for reports at its own
                # level or a less privileged one: ask at the floor the kernel gives.
                floor = self._privlevel_floor(entry)
                if floor:
                    _write(entry / "privlevel", f"{floor}\n".encode())
                    writes += 1
            _write(entry / "inblob", inblob)
            writes += 1
            outblob = _read(entry / "outblob")
            auxblob = b""
            if self.tee == "snp":
                try:
                    auxblob = _read(entry / "auxblob")
                except FileNotFoundError:
                    pass  # a kernel without auxblob: the server uses its configured certificates
            generation = _read(entry / "generation", limit=64).strip()
        except OSError as e:
            raise self._tsm_error(e, "make a report") from e
        finally:
            self._remove(entry)
        if generation != str(writes).encode():  # our writes; more: someone else wrote in between
            return None
        if not outblob:
            raise EnclaveError("the kernel returned an empty report", hint="check dmesg for the guest driver's error")
        return outblob, auxblob

    @staticmethod
    def _privlevel_floor(entry: Path) -> int:
        try:
            text = _read(entry / "privlevel_floor", limit=64)
        except FileNotFoundError:
            return 0
        try:
            floor = int(text.strip() or b"0")
        except ValueError as e:
            raise EnclaveError(f"{entry}/privlevel_floor is not a number") from e
        if not 0 <= floor <= 3:
            raise EnclaveError(f"{entry}/privlevel_floor is {floor}, not a VMPL (0-3)")
        return floor

    def report(self, report_data64: bytes) -> tuple[bytes, bytes]:
        """(outblob, auxblob) for 64 bytes of report data, retried when another writer races us."""
        if len(report_data64) != REPORT_DATA_LEN:
            raise ValueError("report data must be 64 bytes")
        for _ in range(TRIES):
            got = self._report(report_data64)
            if got is not None:
                return got
        raise EnclaveError(f"another program wrote to the report entry while the kernel made the report, "
                           f"{TRIES} times in a row (its generation moved)",
                           hint="stop whatever else writes under " + str(self.tsm_path) + ", then run setup again")

    # -- Backend ----------------------------------------------------------------------------
    def measurement(self) -> bytes:
        return measurement()

    def evidence(self, report_data: bytes) -> dict[str, Any]:
        if len(report_data) != 32:
            raise ValueError("report_data must be 32 bytes")
        outblob, auxblob = self.report(report_data + self.measurement())
        if self.tee == "tdx":
            return {"type": "tdx", "version": EVIDENCE_VERSION, "quote": b64e(outblob), "collateral": None}
        certs = parse_cert_table(auxblob)
        leaf = certs.get("vcek") or certs.get("vlek")
        chain = "".join(der_to_pem(certs[k]) for k in ("ask", "ark") if k in certs)
        return {"type": "snp", "version": EVIDENCE_VERSION, "report": b64e(outblob),
                "vcek": b64e(leaf) if leaf else None, "chain": chain or None}

    def seal(self, plaintext: bytes, *, label: bytes) -> bytes:
        return self.store.seal(plaintext, label=label)

    def unseal(self, blob: bytes, *, label: bytes) -> bytes:
        return self.store.unseal(blob, label=label)

    def counter_read(self, name: str) -> int:
        return self.store.counter_read(name)

    def counter_increment(self, name: str) -> int:
        return self.store.counter_increment(name)

    def configure_from_license(self, policy: dict[str, Any]) -> None:
        """With a vTPM: the license's ``tpm.seal_pcrs`` apply to it (see the tpm backend)."""
        configure = getattr(self.store, "configure_from_license", None)
        if configure is not None:
            configure(policy)

    def close(self) -> None:
        close = getattr(self.store, "close", None)
        if close is not None:
            close()


__all__ = ["CERT_GUIDS", "DEFAULT_TSM_PATH", "PROVIDERS", "CvmBackend", "CvmThreatModel", "der_to_pem",
           "parse_cert_table"]
