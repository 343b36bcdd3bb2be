"""The `tpm` backend: sealing, a monotonic counter and attestation from a TPM 2.0 (tpm2-pytss).

What it gives, beyond the `software` backend's hardened worker:

* **Sealing bound to this TPM.** The state is encrypted (AES-256-GCM) under a *state key* that
  the TPM seals: a keyed-hash data object under the owner hierarchy's storage key (SRK, ECC
  P-256, re-derived from the owner seed on demand). The sealed object only loads on the TPM whose
  seed made it, and only unseals while the PCRs match if a PCR policy was chosen. The blob of
  the sealed object travels inside the sealed state file: no platform files.
* **A monotonic counter.** One NV index of type TPM_NT_COUNTER per capsule version. The
  enclave increments it once per persisted lease (``enclave/state.py``). A deleted and re-made
  index starts at least at the largest value any deleted counter had (TPM 2.0 Part 1, 37.2.4),
  so deleting it does not reset it.
* **Evidence.** A TPM2_Quote by a fresh attestation key (AK, a restricted signing key made under
  the SRK) over the chosen PCRs, with extraData = SHA-256(context || report_data ||
  measurement); plus the EK public key and certificate. The provider binds the AK to the EK with
  a credential the TPM must activate (:meth:`TpmBackend.activate_payload`).

What it does not give: isolation of the worker's memory from root (a TPM is not an enclave),
and, when the TPM is swtpm, anything against the owner of swtpm's state file, who can copy and
restore it together with the sealed state.

TCTI: ``device:/dev/tpmrm0`` (the kernel's resource manager; the default), ``swtpm:path=SOCKET``
or ``swtpm:host=127.0.0.1,port=2321`` (swtpm's raw command channel). The backend opens the
connection when it is created, i.e. *before* the worker hardens itself, and then only uses
``read``/``write`` on it: seccomp denies socket() and connect() afterwards, and these
descriptors stay usable. swtpm serves one connection at a time and has three transient object
slots and no resource manager, so every operation flushes every handle it loaded.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("TSS2_LOG", "all+NONE")  # before the TSS loads: esys logs expected misses on stderr

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from tpm2_pytss import ESAPI
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_CC,
    TPM2_NT,
    TPM2_RC,
    TPM2_SE,
    TPMA_NV,
    TPMA_OBJECT,
)
from tpm2_pytss.TCTI import PyTCTI
from tpm2_pytss.TSS2_Exception import TSS2_Exception
from tpm2_pytss.types import (
    TPM2B_DIGEST,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_NV_PUBLIC,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_PCR_SELECTION,
    TPMS_NV_PUBLIC,
    TPMS_SENSITIVE_CREATE,
    TPMT_PUBLIC,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import NoSuchIndex, create_ek_template

from .._util import b64d, b64e
from ..errors import EnclaveError, IntegrityError, ProtocolError, UsageError
from ..measurement import measurement
from .base import Backend, ThreatModel

EVIDENCE_TYPE = "tpm"
EVIDENCE_VERSION = 1
#: Also in mlcapsule.attestation.tpm (the verifier is not part of the enclave); a test pins both.
EXTRA_DATA_CONTEXT = b"mlcapsule-evidence/tpm/v1\0"
WRAP_CONTEXT = b"mlcapsule-tpm-activation/v1\0"
SEAL_MAGIC = b"MLTPMSL1"
DEFAULT_TCTI = "device:/dev/tpmrm0"
DEFAULT_QUOTE_PCRS = "sha256:0,1,2,3,4,5,6,7"
#: Counter NV indices: in the owner range, 22 bits from a hash of the counter's name.
NV_BASE, NV_SPAN = 0x01000000, 1 << 22
NV_ATTRIBUTES = (TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA
                 | (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT))
#: EK certificate NV indices (TCG EK Credential Profile 2.5), in order of preference.
EK_TYPES = (("EK-RSA2048", 0x01C00002), ("EK-ECC256", 0x01C0000A), ("EK-HIGH-RSA2048", 0x01C00012),
            ("EK-HIGH-ECC256", 0x01C00014), ("EK-HIGH-ECC384", 0x01C00016), ("EK-HIGH-ECC521", 0x01C00018),
            ("EK-HIGH-RSA3072", 0x01C0001C), ("EK-HIGH-RSA4096", 0x01C0001E))
_SRK_ATTRS = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.DECRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
              | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA)
_AK_ATTRS = (TPMA_OBJECT.RESTRICTED | TPMA_OBJECT.SIGN_ENCRYPT | TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT
             | TPMA_OBJECT.SENSITIVEDATAORIGIN | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.NODA)
_AK_TEMPLATES = {"ecc": "ecc256:ecdsa-sha256:null", "rsa": "rsa2048:rsassa-sha256:null"}
_MAX_RESPONSE = 4096
_BANKS = {int(TPM2_ALG.SHA1): "sha1", int(TPM2_ALG.SHA256): "sha256", int(TPM2_ALG.SHA384): "sha384",
          int(TPM2_ALG.SHA512): "sha512"}
_HASHLIB = {int(TPM2_ALG.SHA1): hashlib.sha1, int(TPM2_ALG.SHA256): hashlib.sha256,
            int(TPM2_ALG.SHA384): hashlib.sha384, int(TPM2_ALG.SHA512): hashlib.sha512}


# -- transport ------------------------------------------------------------------------------------
class FdTransport(PyTCTI):
    """A TCTI over one already-open descriptor, using only read(2) and write(2).

    ``stream`` (a socket to swtpm): responses are framed by their header's size field.
    Otherwise (a TPM character device): one read returns one whole response.
    Counts the commands it sends, by command code (``commands``), to measure NV wear.
    """

    def __init__(self, fd: int, *, stream: bool, description: str) -> None:
        super().__init__(max_size=_MAX_RESPONSE)
        self.fd, self.stream, self.description = fd, stream, description
        self.commands: Counter[int] = Counter()

    def do_transmit(self, command: bytes) -> None:
        if len(command) >= 10:
            self.commands[int.from_bytes(command[6:10], "big")] += 1
        view = memoryview(command)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def _read_exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = os.read(self.fd, n - len(out))
            if not chunk:
                raise EnclaveError(f"the TPM connection ({self.description}) was closed",
                                   hint="restart the enclave; check that the TPM (or swtpm) is running")
            out += chunk
        return bytes(out)

    def do_receive(self, timeout: int) -> bytes:
        if not self.stream:
            data = os.read(self.fd, _MAX_RESPONSE)
            if len(data) < 10:
                raise EnclaveError(f"the TPM ({self.description}) sent a short response")
            return data
        header = self._read_exact(10)
        size = int.from_bytes(header[2:6], "big")
        if not 10 <= size <= _MAX_RESPONSE:
            raise EnclaveError(f"the TPM ({self.description}) sent a malformed response")
        return header + self._read_exact(size - 10)

    def close(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            finally:
                self.fd = -1


def parse_tcti(spec: str) -> tuple[str, dict[str, str]]:
    """``device:/dev/tpmrm0`` -> ("device", {"path": ...}); ``swtpm:host=h,port=p`` or
    ``swtpm:path=/run/swtpm.sock`` -> ("swtpm", {...})."""
    kind, _, conf = spec.partition(":")
    if kind == "device":
        return kind, {"path": conf or "/dev/tpmrm0"}
    if kind == "swtpm":
        opts: dict[str, str] = {}
        for part in filter(None, conf.split(",")):
            k, eq, v = part.partition("=")
            if not eq or k not in ("host", "port", "path"):
                raise UsageError(f"bad TCTI option {part!r} in {spec!r}",
                                 hint="use swtpm:path=SOCKET or swtpm:host=HOST,port=PORT")
            opts[k] = v
        if "path" not in opts:
            opts.setdefault("host", "127.0.0.1")
            opts.setdefault("port", "2321")
        return "swtpm", opts
    raise UsageError(f"unknown TCTI {spec!r}",
                     hint="use device:/dev/tpmrm0, swtpm:path=SOCKET or swtpm:host=HOST,port=PORT")


def open_transport(spec: str) -> FdTransport:
    kind, opts = parse_tcti(spec)
    try:
        if kind == "device":
            fd = os.open(opts["path"], os.O_RDWR | os.O_CLOEXEC)
            return FdTransport(fd, stream=False, description=spec)
        if "path" in opts:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(opts["path"])
        else:
            sock = socket.create_connection((opts["host"], int(opts["port"])), timeout=10)
            sock.settimeout(None)
        return FdTransport(sock.detach(), stream=True, description=spec)
    except (OSError, ValueError) as e:
        raise EnclaveError(f"cannot open the TPM {spec}: {getattr(e, 'strerror', None) or e}",
                           hint="check that the TPM exists and that you may use it (group 'tss' for /dev/tpmrm0), "
                                "or pass --tcti") from e


# -- helpers --------------------------------------------------------------------------------------
def quote_extra_data(report_data: bytes, measurement_hex: str) -> bytes:
    return hashlib.sha256(EXTRA_DATA_CONTEXT + report_data + bytes.fromhex(measurement_hex)).digest()


def nv_index_for(name: str) -> int:
    h = hashlib.sha256(b"mlcapsule-counter/v1\0" + name.encode()).digest()
    return NV_BASE | (int.from_bytes(h[:4], "big") % NV_SPAN)


def _parse_selection(spec: str | None) -> TPML_PCR_SELECTION:
    if not spec:
        return TPML_PCR_SELECTION()
    try:
        return TPML_PCR_SELECTION.parse(spec)
    except (ValueError, TypeError, KeyError) as e:
        raise UsageError(f"bad PCR selection {spec!r}", hint="write it like sha256:0,1,2,7") from e


@dataclass
class _Ak:
    private: TPM2B_PRIVATE
    public: TPM2B_PUBLIC
    name: bytes


class TpmBackend(Backend):
    name = "tpm"

    def __init__(self, tcti: str | None = None, *, platform_dir: Any = None, quote_pcrs: str | None = None,
                 seal_pcrs: str | None = None, ak: str = "ecc", ek: str = "auto") -> None:
        del platform_dir  # nothing of this backend lives in files: the TPM holds it
        self.tcti = tcti or os.environ.get("MLCAPSULE_TPM_TCTI") or DEFAULT_TCTI
        self.emulated = parse_tcti(self.tcti)[0] == "swtpm"
        if ak not in _AK_TEMPLATES:
            raise UsageError(f"unknown AK type {ak!r}", hint="use ecc or rsa")
        self.ak_type, self.ek_type = ak, ek
        self.quote_pcrs = quote_pcrs or os.environ.get("MLCAPSULE_TPM_QUOTE_PCRS") or DEFAULT_QUOTE_PCRS
        self.seal_pcrs = seal_pcrs if seal_pcrs is not None else os.environ.get("MLCAPSULE_TPM_SEAL_PCRS") or None
        _parse_selection(self.quote_pcrs)  # fail early on a bad PCR selection
        _parse_selection(self.seal_pcrs)
        self.threat_model = self._threat_model()
        self.transport = open_transport(self.tcti)  # now: before the worker hardens itself
        self.esapi = ESAPI(self.transport)
        self._lock = threading.RLock()
        self._state_key: tuple[bytes, bytes] | None = None  # (sealed-object header, key)
        self._ak: _Ak | None = None
        self._ek_template: TPM2B_PUBLIC | None = None
        self._ek_cert: bytes | None = None

    def _threat_model(self) -> ThreatModel:
        gives = (
            "restoring an old copy of the sealed state: the TPM's NV counter shows it and the lost leases are charged",
            ("opening the sealed state on another machine (the state key is sealed by this TPM), or after the PCRs "
             "change when a PCR policy is set"),
            ("a provider trusting a machine without a genuine TPM: the quote's key is bound to a certified EK "
             "by credential activation"),
            "the enclave sending data over the network (seccomp denies sockets)",
        )
        not_given = [
            "the machine's owner or root reading the worker's memory at run time: a TPM does not isolate memory",
            ("a modified mlcapsule installation: the measurement is self-reported, unless the platform's "
             "measured boot puts it into a quoted PCR"),
        ]
        if self.emulated:
            not_given.insert(0, "this TPM is swtpm, a software emulator: whoever can copy its state file can restore "
                                "it together with the sealed state, and the rollback is NOT detected")
        return ThreatModel(protects_against=gives, does_not_protect_against=tuple(not_given),
                           rollback_protected=not self.emulated)

    # -- TPM plumbing -----------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            try:
                self.esapi.close()
            finally:
                self.transport.close()

    @property
    def nv_increments(self) -> int:
        """TPM2_NV_Increment commands this backend sent (the NV writes it caused)."""
        return self.transport.commands[int(TPM2_CC.NV_Increment)]

    @contextmanager
    def _flushing(self) -> Iterator[list[ESYS_TR]]:
        """Collects transient handles and flushes all of them on the way out (swtpm: 3 slots)."""
        handles: list[ESYS_TR] = []
        try:
            yield handles
        finally:
            for h in reversed(handles):
                try:
                    self.esapi.flush_context(h)
                except TSS2_Exception:
                    pass

    def _tpm_error(self, what: str, e: Exception) -> EnclaveError:
        return EnclaveError(f"the TPM failed to {what} ({e})",
                            hint="check the TPM with `mlcapsule status`; swtpm serves one connection at a time")

    def _srk(self, handles: list[ESYS_TR]) -> ESYS_TR:
        """The storage root key: ECC P-256 under the owner hierarchy, re-derived (not persisted)."""
        template = TPM2B_PUBLIC(TPMT_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=_SRK_ATTRS, nameAlg="sha256"))
        handle = self.esapi.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.OWNER)[0]
        handles.append(handle)
        return handle

    def _flush_now(self, handles: list[ESYS_TR], handle: ESYS_TR) -> None:
        self.esapi.flush_context(handle)
        handles.remove(handle)

    def _policy_session(self, handles: list[ESYS_TR], trial: bool = False) -> ESYS_TR:
        s = self.esapi.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL if trial else TPM2_SE.POLICY,
                                          TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
        handles.append(s)
        return s

    def _nv_exists(self, index: int) -> bool:
        _, data = self.esapi.get_capability(TPM2_CAP.HANDLES, index, 1)
        return any(int(h) == index for h in data.data.handles)

    def _nv_read_all(self, index: int) -> bytes:
        if not self._nv_exists(index):
            raise NoSuchIndex(index)
        tr = self.esapi.tr_from_tpmpublic(index)
        try:
            nv_public, _ = self.esapi.nv_read_public(tr)  # keep the parent alive: it owns the memory
            size = nv_public.nvPublic.dataSize
            out = b""
            while len(out) < size:
                out += bytes(self.esapi.nv_read(tr, min(768, size - len(out)), len(out), auth_handle=tr))
            return out
        finally:
            self.esapi.tr_close(tr)

    # -- Backend ----------------------------------------------------------------------------------
    def measurement(self) -> bytes:
        return measurement()

    # Sealing --------------------------------------------------------------------------------------
    def _new_state_key(self) -> tuple[bytes, bytes]:
        """Make a fresh 32-byte key and have the TPM seal it: (header, key)."""
        key = os.urandom(32)
        selection = _parse_selection(self.seal_pcrs)
        attrs = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.NODA
        with self._flushing() as handles:
            policy = b""
            if selection.count:
                trial = self._policy_session(handles, trial=True)
                self.esapi.policy_pcr(trial, TPM2B_DIGEST(), selection)
                policy = bytes(self.esapi.policy_get_digest(trial))
            else:
                attrs |= TPMA_OBJECT.USERWITHAUTH
            public = TPM2B_PUBLIC(TPMT_PUBLIC.parse("keyedhash", objectAttributes=attrs, nameAlg="sha256"))
            public.publicArea.authPolicy = TPM2B_DIGEST(policy)
            sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=key))
            private, public, _, _, _ = self.esapi.create(self._srk(handles), sensitive, public)
        sel = selection.marshal()
        pub, priv = public.marshal(), private.marshal()
        header = SEAL_MAGIC + b"".join(struct.pack(">H", len(x)) + x for x in (pub, priv, sel))
        return header, key

    def _unseal_state_key(self, header: bytes) -> bytes:
        r = memoryview(header)[len(SEAL_MAGIC):]
        parts = []
        for _ in range(3):
            n = struct.unpack(">H", r[:2])[0]
            parts.append(bytes(r[2:2 + n]))
            r = r[2 + n:]
        public, _ = TPM2B_PUBLIC.unmarshal(parts[0])
        private, _ = TPM2B_PRIVATE.unmarshal(parts[1])
        selection, _ = TPML_PCR_SELECTION.unmarshal(parts[2])
        with self._flushing() as handles:
            srk = self._srk(handles)
            obj = self.esapi.load(srk, private, public)
            handles.append(obj)
            self._flush_now(handles, srk)
            session = ESYS_TR.PASSWORD
            if selection.count:
                session = self._policy_session(handles)
                self.esapi.policy_pcr(session, TPM2B_DIGEST(), selection)
            return bytes(self.esapi.unseal(obj, session1=session))

    def _split_blob(self, blob: bytes) -> tuple[bytes, bytes, bytes]:
        """(header, nonce, ciphertext) of a sealed blob."""
        try:
            if not blob.startswith(SEAL_MAGIC):
                raise ValueError
            pos = len(SEAL_MAGIC)
            for _ in range(3):
                pos += 2 + struct.unpack(">H", blob[pos:pos + 2])[0]
            if pos + 12 + 16 > len(blob):
                raise ValueError
            return blob[:pos], blob[pos:pos + 12], blob[pos + 12:]
        except (ValueError, struct.error) as e:
            raise IntegrityError("sealed state is not valid") from e

    def _aad(self, header: bytes, label: bytes) -> bytes:
        # Not bound to the measurement: an upgraded mlcapsule opens what the last one sealed.
        return SEAL_MAGIC + label + b"\0v2\0" + hashlib.sha256(header).digest()

    def configure_from_license(self, policy: dict[str, Any]) -> None:
        """Take the seal policy from the license's ``policy["tpm"]["seal_pcrs"]`` (e.g.
        ``"sha256:0,2,4,7"``), before the first seal of a setup. The provider chooses: a state
        sealed to PCRs no longer opens after a firmware or boot-loader update (the license must
        then be set up again), in exchange for refusing to run on a changed boot chain."""
        tpm = policy.get("tpm") if isinstance(policy, dict) else None
        pcrs = tpm.get("seal_pcrs") if isinstance(tpm, dict) else None
        if pcrs is None:
            return
        if not isinstance(pcrs, str):
            raise UsageError("the license's tpm.seal_pcrs must be a PCR selection like sha256:0,7")
        _parse_selection(pcrs)
        with self._lock:
            self.seal_pcrs, self._state_key = pcrs, None

    def seal(self, plaintext: bytes, *, label: bytes) -> bytes:
        with self._lock:
            if self._state_key is None:
                try:
                    self._state_key = self._new_state_key()
                except TSS2_Exception as e:
                    raise self._tpm_error("seal the state key", e) from e
            header, key = self._state_key
        nonce = os.urandom(12)
        return header + nonce + AESGCM(key).encrypt(nonce, plaintext, self._aad(header, label))

    def unseal(self, blob: bytes, *, label: bytes) -> bytes:
        header, nonce, ct = self._split_blob(blob)
        with self._lock:
            if self._state_key is not None and self._state_key[0] == header:
                key = self._state_key[1]
            else:
                try:
                    key = self._unseal_state_key(header)
                except TSS2_Exception as e:
                    raise IntegrityError(
                        "sealed state cannot be opened by this TPM",
                        hint="sealed state only opens on the TPM that sealed it, with the PCR values it was "
                             "sealed to; run setup again") from e
                except (ValueError, struct.error, TypeError) as e:
                    raise IntegrityError("sealed state is not valid") from e
        try:
            plaintext = AESGCM(key).decrypt(nonce, ct, self._aad(header, label))
        except (InvalidTag, ValueError) as e:
            raise IntegrityError("sealed state cannot be opened by this enclave",
                                 hint="it was altered, or sealed for another capsule, or by mlcapsule 0.1.0 "
                                      "(whose states were bound to its exact version); run setup again") from e
        with self._lock:
            self._state_key = (header, key)  # later seals reuse this sealed object: no TPM2_Create per lease
        return plaintext

    # Counter --------------------------------------------------------------------------------------
    def _counter_handle(self, name: str) -> ESYS_TR:
        """The counter's NV index, defined (owner auth: empty) and initialized if it is not yet."""
        index = nv_index_for(name)
        if not self._nv_exists(index):
            info = TPM2B_NV_PUBLIC(TPMS_NV_PUBLIC(nvIndex=index, nameAlg=TPM2_ALG.SHA256, attributes=NV_ATTRIBUTES,
                                                  dataSize=8))
            try:
                self.esapi.tr_close(self.esapi.nv_define_space(b"", info, ESYS_TR.OWNER))
            except TSS2_Exception as e:
                if e.error != TPM2_RC.NV_DEFINED:
                    raise EnclaveError(f"cannot create the TPM NV counter {index:#010x} ({e})",
                                       hint="the TPM's owner authorization must be empty for mlcapsule to "
                                            "define its counter") from e
        tr = self.esapi.tr_from_tpmpublic(index)
        nv_public, _ = self.esapi.nv_read_public(tr)  # keep the parent alive: it owns the memory
        pub = nv_public.nvPublic
        if (int(pub.attributes) & ~int(TPMA_NV.WRITTEN)) != int(NV_ATTRIBUTES) or pub.dataSize != 8 \
                or pub.nameAlg != TPM2_ALG.SHA256:
            self.esapi.tr_close(tr)
            raise EnclaveError(f"the TPM NV index {index:#010x} exists but is not mlcapsule's counter",
                               hint="another program uses this index; it must not be reused")
        if not int(pub.attributes) & int(TPMA_NV.WRITTEN):
            # A new counter starts at the highest value any deleted counter had: never below an old state.
            self.esapi.nv_increment(tr, auth_handle=tr)
        return tr

    def counter_read(self, name: str) -> int:
        with self._lock:
            try:
                tr = self._counter_handle(name)
                try:
                    return int.from_bytes(bytes(self.esapi.nv_read(tr, 8, 0, auth_handle=tr)), "big")
                finally:
                    self.esapi.tr_close(tr)
            except TSS2_Exception as e:
                raise self._tpm_error("read the NV counter", e) from e

    def counter_increment(self, name: str) -> int:
        with self._lock:
            try:
                tr = self._counter_handle(name)
                try:
                    self.esapi.nv_increment(tr, auth_handle=tr)
                    return int.from_bytes(bytes(self.esapi.nv_read(tr, 8, 0, auth_handle=tr)), "big")
                finally:
                    self.esapi.tr_close(tr)
            except TSS2_Exception as e:
                raise self._tpm_error("increment the NV counter", e) from e

    # Evidence -------------------------------------------------------------------------------------
    def _ek(self) -> tuple[TPM2B_PUBLIC, bytes]:
        """(EK template, EK certificate DER), from the first EK type whose certificate is in NV."""
        if self._ek_template is not None and self._ek_cert is not None:
            return self._ek_template, self._ek_cert
        kinds = [k for k in EK_TYPES if self.ek_type in ("auto", k[0])]
        for kind, cert_index in kinds:
            if not self._nv_exists(cert_index):
                continue
            cert, template = create_ek_template(kind, self._nv_read_all)
            if cert:
                self._ek_template, self._ek_cert = template, bytes(cert)
                return template, bytes(cert)
        raise EnclaveError("this TPM has no EK certificate in NV",
                           hint="the provider cannot tell a genuine TPM without one; ask the TPM's maker or "
                                "provision one (swtpm_setup --create-ek-cert)")

    def _create_ek(self, handles: list[ESYS_TR]) -> tuple[ESYS_TR, TPM2B_PUBLIC]:
        template, _ = self._ek()
        handle, public, _, _, _ = self.esapi.create_primary(TPM2B_SENSITIVE_CREATE(), template, ESYS_TR.ENDORSEMENT)
        handles.append(handle)
        return handle, public

    def _read_pcrs(self, selection: TPML_PCR_SELECTION) -> dict[str, dict[str, str]]:
        want = {(int(s.hash), i) for s in selection for i in range(8 * s.sizeofSelect)
                if s.pcrSelect[i // 8] >> (i % 8) & 1}
        out: dict[str, dict[str, str]] = {}
        while want:
            spec = "+".join(f"{_BANKS[h]}:{','.join(str(i) for h2, i in sorted(want) if h2 == h)}"
                            for h in sorted({h for h, _ in want}))
            _, got_sel, digests = self.esapi.pcr_read(TPML_PCR_SELECTION.parse(spec))
            values = iter(list(digests))
            got_any = False
            for s in got_sel:
                for i in range(8 * s.sizeofSelect):
                    if s.pcrSelect[i // 8] >> (i % 8) & 1:
                        out.setdefault(_BANKS[int(s.hash)], {})[str(i)] = bytes(next(values)).hex()
                        want.discard((int(s.hash), i))
                        got_any = True
            if not got_any:
                raise EnclaveError(f"the TPM has no PCR bank for {spec}", hint="choose PCRs of an active bank")
        return out

    def evidence(self, report_data: bytes) -> dict[str, Any]:
        m = self.measurement().hex()
        selection = _parse_selection(self.quote_pcrs)
        with self._lock:
            try:
                with self._flushing() as handles:
                    srk = self._srk(handles)
                    template = TPM2B_PUBLIC(TPMT_PUBLIC.parse(_AK_TEMPLATES[self.ak_type], objectAttributes=_AK_ATTRS,
                                                              nameAlg="sha256"))
                    private, public, _, _, _ = self.esapi.create(srk, TPM2B_SENSITIVE_CREATE(), template)
                    ak = self.esapi.load(srk, private, public)
                    handles.append(ak)
                    self._flush_now(handles, srk)
                    name = bytes(self.esapi.tr_get_name(ak))
                    for _ in range(3):  # a PCR may change between the quote and the read: try again
                        attest, signature = self.esapi.quote(ak, selection, quote_extra_data(report_data, m))
                        pcrs = self._read_pcrs(selection)
                        if self._digest_matches(attest, signature, pcrs):
                            break
                    else:
                        raise EnclaveError("the PCRs kept changing while the TPM quoted them")
                with self._flushing() as handles:
                    _, ek_public = self._create_ek(handles)
                _, ek_cert = self._ek()
            except TSS2_Exception as e:
                raise self._tpm_error("make a quote", e) from e
            self._ak = _Ak(private, public, name)
        return {
            "type": EVIDENCE_TYPE, "version": EVIDENCE_VERSION, "measurement": m,
            "ak_public": b64e(public.publicArea.marshal()),
            "quote": b64e(attest.marshal()[2:]),  # the TPMS_ATTEST, without the TPM2B size
            "signature": b64e(signature.marshal()),
            "pcrs": pcrs,
            "ek_public": b64e(ek_public.publicArea.marshal()),
            "ek_certificate": b64e(ek_cert),
            "ek_chain": [],
        }

    @staticmethod
    def _digest_matches(attest: Any, signature: Any, pcrs: dict[str, dict[str, str]]) -> bool:
        from tpm2_pytss.types import TPMS_ATTEST

        info, _ = TPMS_ATTEST.unmarshal(attest.marshal()[2:])
        q = info.attested.quote
        values = [bytes.fromhex(pcrs[_BANKS[int(s.hash)]][str(i)])
                  for s in q.pcrSelect for i in range(8 * s.sizeofSelect) if s.pcrSelect[i // 8] >> (i % 8) & 1]
        h = _HASHLIB[int(signature.signature.any.hashAlg)]
        return h(b"".join(values)).digest() == bytes(q.pcrDigest)

    def activate_payload(self, credential: dict[str, Any], wrapped: bytes) -> bytes:
        """Recover the provider's credential with TPM2_ActivateCredential and unwrap the payload.

        Succeeds only on the TPM that holds both the certified EK and the AK of the last
        :meth:`evidence`: this is what binds the quote's AK to a genuine TPM.
        """
        if self._ak is None:
            raise ProtocolError("credential activation without evidence")
        try:
            id_object, _ = TPM2B_ID_OBJECT.unmarshal(b64d(credential["id_object"]))
            secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(b64d(credential["encrypted_secret"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ProtocolError("the credential challenge is malformed") from e
        ak_data = self._ak
        with self._lock:
            try:
                with self._flushing() as handles:
                    srk = self._srk(handles)
                    ak = self.esapi.load(srk, ak_data.private, ak_data.public)
                    handles.append(ak)
                    self._flush_now(handles, srk)
                    ek, ek_public = self._create_ek(handles)
                    ek_session = ESYS_TR.PASSWORD
                    if not ek_public.publicArea.objectAttributes & TPMA_OBJECT.USERWITHAUTH:
                        ek_session = self._policy_session(handles)  # the EK's policy: PolicySecret(endorsement)
                        self.esapi.policy_secret(ESYS_TR.ENDORSEMENT, ek_session, b"", b"", b"", 0)
                    key = bytes(self.esapi.activate_credential(ak, ek, id_object, secret, session1=ESYS_TR.PASSWORD,
                                                               session2=ek_session))
            except TSS2_Exception as e:
                raise IntegrityError("the TPM cannot activate the provider's credential: the attestation key is "
                                     "not bound to this TPM's endorsement key",
                                     hint="the server's answer was made for another TPM, or was damaged") from e
        if len(key) != 32 or len(wrapped) < 12 + 16:
            raise IntegrityError("the activated credential does not open the payload")
        try:
            return AESGCM(key).decrypt(wrapped[:12], wrapped[12:], WRAP_CONTEXT + ak_data.name)
        except InvalidTag as e:
            raise IntegrityError("the activated credential does not open the payload") from e
        finally:
            self._ak = None  # one activation per evidence


__all__ = [
    "EVIDENCE_TYPE",
    "EXTRA_DATA_CONTEXT",
    "WRAP_CONTEXT",
    "FdTransport",
    "TpmBackend",
    "nv_index_for",
    "open_transport",
    "parse_tcti",
    "quote_extra_data",
]
