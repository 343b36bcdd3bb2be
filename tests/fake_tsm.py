"""A fake configfs-tsm report tree (``/sys/kernel/config/tsm/report``) in a temporary folder.

The kernel's tree (Linux 6.7+, drivers/virt/coco/tsm.c) works like this: ``mkdir report/NAME``
makes an entry whose attribute files appear with it (``provider``, ``generation``, ``inblob``,
``outblob``, and ``auxblob`` on SEV-SNP); writing ``inblob`` advances ``generation``; reading
``outblob`` (or ``auxblob``) makes the report for the last ``inblob``; ``rmdir`` removes the entry.

This fake does the same with an ordinary folder and a background thread of the test process, so
that the reader can be any process, the hardened enclave worker included (no hooks in it):

* the thread notices each new entry folder and fills it: ``inblob``, ``outblob``, ``auxblob``
  (SNP) and ``generation`` are FIFOs, made before ``provider``, a regular file, which is the
  last to appear (the backend waits for it; on a kernel it is there at once);
* with ``privlevel_floor`` (an SEV-SNP guest above VMPL 0) it also makes ``privlevel_floor``
  (a regular file) and ``privlevel`` (a FIFO, counted as inblob is);
* it keeps ``inblob``'s read end open; each writer that opens, writes and closes it is one write
  (``generation`` + 1), as configfs hands a binary attribute to the driver on close;
* when a reader opens ``outblob`` or ``auxblob``, the thread makes the blob from the last inblob
  (``outblob(inblob)``, ``auxblob(inblob)``) and writes it; each is served once per generation;
* when a reader opens ``generation``, the thread writes the count, removes the entry's files
  and only then closes its end: the reader sees end-of-file after the folder is empty, so its
  ``rmdir`` works as on configfs. Reading ``generation`` must therefore be the reader's last step
  on an entry, which is what the cvm backend does.

``race=N`` makes the next N entries look raced: while making their outblob, the thread counts an
extra write, as if another program had written ``inblob`` in between.

Blob makers:

* :func:`recorded_tdx` / :func:`recorded_snp`: recorded quotes / reports from the shared
  attestation vectors, returned whatever the inblob (they cannot carry our report data);
* :func:`signed_tdx` / :func:`signed_snp`: quotes / reports signed by the test signers
  (tests/dcap_signer.py ``FakeIntel``, tests/snp_signer.py ``FakeAmd``) over the inblob written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Blob = Callable[[bytes], bytes]

#: GHCB certificate-table GUIDs, RFC 4122 byte order.
GUIDS = {"vcek": "63da758d-e664-4564-adc5-f4b93be8accd", "vlek": "a8074bc2-a25a-483e-aae6-39c045a0b8a1",
         "ask": "4ab7b379-bbac-4fe4-a02f-05aef327c782", "ark": "c0b406a4-a803-4952-9743-3fb6014cd0ae"}


def cert_table(certs: dict[str, bytes]) -> bytes:
    """The SEV-SNP certificate table (auxblob) holding ``certs`` ({"vcek"|"vlek"|"ask"|"ark": DER})."""
    n = len(certs) + 1
    head, body = b"", b""
    offset = 24 * n
    for name, der in certs.items():
        head += uuid.UUID(GUIDS[name]).bytes + struct.pack("<II", offset + len(body), len(der))
        body += der
    return head + bytes(24) + body


def pem_certs(pem: bytes) -> list[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    return [c.public_bytes(Encoding.DER) for c in x509.load_pem_x509_certificates(pem)]


@dataclass
class _Entry:
    path: Path
    fds: dict[str, int]  # write-only attribute -> the read end the fake holds
    pending: dict[str, bytearray] = field(default_factory=dict)
    inblob: bytes = b""
    generation: int = 0
    served: dict[str, int] = field(default_factory=dict)  # blob name -> generation it was served at
    raced: bool = False


class FakeTsm:
    """The tree at ``root`` (made if missing), served until :meth:`stop` (or the ``with`` block ends)."""

    def __init__(self, root: Path, provider: str, outblob: Blob, auxblob: Blob | None = None, *,
                 race: int = 0, privlevel_floor: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.provider, self.outblob, self.auxblob = provider, outblob, auxblob
        self.race, self.privlevel_floor = race, privlevel_floor
        self.inblobs: list[bytes] = []  # every inblob written, in order
        self.privlevels: list[bytes] = []  # every privlevel written (with privlevel_floor: an SNP guest above VMPL 0)
        self.entries = 0  # entries made
        self.reports = 0  # outblobs served
        self.error: BaseException | None = None
        self._live: dict[str, _Entry] = {}
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="fake-tsm", daemon=True)
        self._thread.start()

    # -- the thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._scan()
                for entry in list(self._live.values()):
                    self._serve(entry)
                time.sleep(0.001)
        except BaseException as e:  # surfaced by stop()
            self.error = e

    def _scan(self) -> None:
        for d in os.scandir(self.root):
            if d.name in self._seen or not d.is_dir(follow_symlinks=False):
                continue
            self._seen.add(d.name)
            path = Path(d.path)
            writable = ["inblob"] + (["privlevel"] if self.privlevel_floor is not None else [])
            names = [*writable, "outblob", "generation"] + (["auxblob"] if self.auxblob is not None else [])
            for name in names:
                os.mkfifo(path / name, 0o600)
            fds = {name: os.open(path / name, os.O_RDONLY | os.O_NONBLOCK) for name in writable}
            if self.privlevel_floor is not None:
                (path / "privlevel_floor").write_text(f"{self.privlevel_floor}\n")
            tmp = path / ".provider"
            tmp.write_text(self.provider + "\n")
            tmp.rename(path / "provider")  # last: the reader waits for it
            with self._lock:
                self.entries += 1
            self._live[d.name] = _Entry(path, fds)

    def _drain(self, e: _Entry) -> None:
        """Read what writers wrote to inblob (and privlevel); a writer that closed is one write
        (generation + 1)."""
        for name, fd in e.fds.items():
            pending = e.pending.setdefault(name, bytearray())
            while True:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    break  # a writer is still attached
                if not chunk:  # no writer, nothing left
                    if pending:
                        data = bytes(pending)
                        pending.clear()
                        e.generation += 1
                        with self._lock:
                            if name == "inblob":
                                e.inblob = data
                                self.inblobs.append(data)
                            else:
                                self.privlevels.append(data)
                    break
                pending += chunk

    def _open_reader_side(self, e: _Entry, name: str) -> int | None:
        try:
            fd = os.open(e.path / name, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno in (errno.ENXIO, errno.ENOENT):
                return None  # nobody reads it (yet)
            raise
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return fd

    def _serve(self, e: _Entry) -> None:
        self._drain(e)
        for name in ("outblob", "auxblob"):
            maker = self.outblob if name == "outblob" else self.auxblob
            if maker is None or e.served.get(name) == e.generation:
                continue
            fd = self._open_reader_side(e, name)
            if fd is None:
                continue
            try:
                self._drain(e)  # the reader closed its inblob before it opened this
                if name == "outblob":
                    with self._lock:
                        if self.race > 0 and not e.raced:
                            self.race -= 1
                            e.raced = True
                            e.generation += 1  # another program's write, between ours and this read
                        self.reports += 1
                data = maker(e.inblob)
                e.served[name] = e.generation
                self._write_all(fd, data)
            finally:
                os.close(fd)
        fd = self._open_reader_side(e, "generation")
        if fd is not None:
            try:
                self._drain(e)
                self._write_all(fd, f"{e.generation}\n".encode())
                for name in ("provider", "inblob", "privlevel", "privlevel_floor", "outblob", "auxblob",
                             "generation"):
                    try:
                        os.unlink(e.path / name)
                    except FileNotFoundError:
                        pass
            finally:
                os.close(fd)  # after the files are gone: the reader's rmdir then works
            for wfd in e.fds.values():
                os.close(wfd)
            del self._live[e.path.name]

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
        except BrokenPipeError:
            pass  # the reader went away

    # -- the test's side --------------------------------------------------------------------
    def leftovers(self) -> list[str]:
        """Entry folders still in the tree (the reader did not remove them)."""
        return sorted(p.name for p in self.root.iterdir())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for e in self._live.values():
            for fd in e.fds.values():
                os.close(fd)
        self._live.clear()
        if self.error is not None:
            raise self.error

    def __enter__(self) -> FakeTsm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- blob makers ------------------------------------------------------------------------------
def vectors() -> Path:
    """The recorded attestation vectors: $MLCAPSULE_SHARED, else shared/ beside the checkout (as in CI)."""
    shared = Path(os.environ.get("MLCAPSULE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
    return shared / "attestation-vectors"


def recorded_tdx(root: Path, name: str = "dcapqvl/tdx_quote", **kw: Any) -> FakeTsm:
    """A TDX guest whose kernel returns a recorded quote, whatever the inblob."""
    quote = (vectors() / name).read_bytes()
    return FakeTsm(root, "tdx_guest", lambda _inblob: quote, **kw)


def recorded_snp(root: Path, **kw: Any) -> FakeTsm:
    """An SEV-SNP guest returning go-sev-guest's recorded Milan report and, as the host's
    certificates, its VCEK and the Milan ASK and ARK."""
    v = vectors() / "snp"
    report = (v / "attestation.bin").read_bytes()
    ask, ark = pem_certs((v / "ask_ark_milan.pem").read_bytes())
    table = cert_table({"vcek": (v / "vcek.testcer").read_bytes(), "ask": ask, "ark": ark})
    return FakeTsm(root, "sev_guest", lambda _inblob: report, lambda _inblob: table, **kw)


def signed_tdx(root: Path, intel: Any, **quote_kw: Any) -> FakeTsm:
    """A TDX guest whose quotes ``intel`` (a dcap_signer.FakeIntel) signs over the inblob."""
    race = quote_kw.pop("race", 0)
    return FakeTsm(root, "tdx_guest", lambda inblob: intel.tdx_quote(inblob, **quote_kw), race=race)


def signed_snp(root: Path, amd: Any, *, certs: bool = True, race: int = 0, privlevel_floor: int | None = None,
               **report_kw: Any) -> FakeTsm:
    """An SEV-SNP guest whose reports ``amd`` (a snp_signer.FakeAmd) signs over the inblob; with
    ``certs`` the host's certificate table holds its VCEK (or VLEK), ASK and ARK, else it is empty."""
    if certs:
        ask, ark = pem_certs(amd.chain_pem)
        table = cert_table({amd.signer: amd.vcek_der, "ask": ask, "ark": ark})
    else:
        table = b""
    return FakeTsm(root, "sev_guest", lambda inblob: amd.report(inblob, **report_kw), lambda _inblob: table,
                   race=race, privlevel_floor=privlevel_floor)
