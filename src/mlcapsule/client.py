"""The client's Python API: open a capsule and call it with numpy arrays.

    >>> import mlcapsule
    >>> with mlcapsule.open_capsule("digits.capsule") as cap:
    ...     if not cap.is_set_up:
    ...         cap.setup(token="...", server="https://provider.example")   # once, online
    ...     probs = cap.predict(x)            # offline; x: np.ndarray batch

The capsule runs in an enclave worker process that lives as long as the ``Capsule`` object, so
repeated calls reuse one session. This process (the host) only ever sees outputs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .enclave._util import b64d, b64e, data_home
from .enclave.errors import InputError, UsageError
from .enclave.format.container import CapsuleFile
from .enclave.format.manifest import Manifest
from .enclave.format.trust import Trust, TrustProviderKey, UnsafeTrustManifestKey, check_trust  # noqa: F401
from .enclave.state import STATE_FILE
from .host import EnclaveProcess


def default_state_dir(manifest: Manifest) -> Path:
    return data_home() / "state" / f"{manifest.capsule_id}-v{manifest.version}"


class Capsule:
    """An opened capsule, served by its own enclave worker.

    ``trust`` is required (no default): ``TrustProviderKey(provider_public_key)`` pins the
    provider; ``UnsafeTrustManifestKey()`` trusts the key the manifest names (integrity only).
    See :mod:`mlcapsule.enclave.format.trust`. The enclave itself accepts the capsule only with a
    license signed by the manifest's key (docs/design.md, "Trust decisions").
    """

    def __init__(self, path: str | os.PathLike[str], *, trust: Trust,
                 unsafe_dev_key: str | os.PathLike[str] | None = None,
                 state_dir: str | os.PathLike[str] | None = None, backend: str | None = None,
                 platform_dir: str | os.PathLike[str] | None = None, threads: int | None = None,
                 tcti: str | None = None, tsm_path: str | os.PathLike[str] | None = None,
                 memory_limit_mb: float | None = None, service: str | os.PathLike[str] | bool | None = None) -> None:
        self.path = Path(path)
        self.memory_limit_mb = memory_limit_mb  # streaming mode: the enclave stays within this many MiB
        self.trust = check_trust(trust)
        with CapsuleFile(self.path, trust=self.trust) as cf:
            self.manifest = cf.manifest
        self.state_dir = Path(state_dir) if state_dir else default_state_dir(self.manifest)
        # The backend that set this capsule up is remembered next to its state (backend.json):
        # state sealed by one backend does not open in another.
        remembered = self._remembered = _read_backend_choice(self.state_dir)
        self.backend = backend or remembered.get("backend") or "software"
        same = self.backend == remembered.get("backend")
        self.tcti = tcti or (remembered.get("tcti") if same else None)
        if self.tcti and self.backend not in ("tpm", "cvm"):
            raise UsageError("--tcti is for the tpm and cvm backends", hint="add --backend tpm (or cvm)")
        # cvm: the configfs-tsm report folder (--tsm-path, else $MLCAPSULE_TSM_PATH, else the one used at setup)
        self.tsm_path = (str(tsm_path) if tsm_path else None) or os.environ.get("MLCAPSULE_TSM_PATH") or (
            remembered.get("tsm_path") if same else None)
        if self.backend != "cvm":
            if tsm_path:
                raise UsageError("--tsm-path is for the cvm backend", hint="add --backend cvm")
            self.tsm_path = None
        self._made_state_dir = not self.state_dir.exists()
        _clean_leftovers(self.state_dir)  # run-* folders of killed sessions (issue 11, item 18)
        # The enclave service (`mlcapsule enclaved`, its own system user) when it runs, unless the
        # caller asked for something only a per-user worker does (a dev key, its own folders).
        sock = _service_for(service, local_only=bool(unsafe_dev_key or state_dir or platform_dir or backend or tcti
                                                       or tsm_path))
        if sock is not None:
            self.mode = "service"
            self._enclave = EnclaveProcess(self.path, service=sock, threads=threads, memory_limit_mb=memory_limit_mb)
            assert self._enclave.service is not None
            self.backend = str(self._enclave.service["backend"])
        else:
            self.mode = "per-user"
            self._enclave = EnclaveProcess(self.path, state_dir=self.state_dir, backend=self.backend,
                                           platform_dir=platform_dir, dev_key=unsafe_dev_key, threads=threads,
                                           tcti=self.tcti, memory_limit_mb=memory_limit_mb, tsm_path=self.tsm_path)
        self._run_lock = _hold_run(self._enclave)
        self._dev = unsafe_dev_key is not None
        self.load_info: dict[str, Any] | None = None
        try:
            if unsafe_dev_key is not None:
                self.load_info = self._enclave.call("load", {"dev_key": str(Path(unsafe_dev_key).resolve())})
            elif (self._enclave.service["set_up"] if self._enclave.service is not None
                  else (self.state_dir / STATE_FILE).exists()):
                self.load_info = self._enclave.call("load", {"dev_key": None})
        except BaseException:
            self.close()
            raise

    # -- setup phase (online, once per device) -------------------------------------------------
    @property
    def is_set_up(self) -> bool:
        return self.load_info is not None

    def setup(self, *, token: str, server: str | None = None, replace: bool = False,
              export_receipts: str | os.PathLike[str] | None = None) -> dict[str, Any]:
        """Attest the enclave to the provider's server and receive the key and license.

        The host relays messages; the key and the license secrets go from the server straight
        into the enclave (HPKE), which seals them. Returns the license status.

        A device that is already set up is refused (a second setup would throw its license
        away) unless ``replace=True``: then the old license's receipts are uploaded first (or,
        with ``export_receipts=FILE``, written to FILE for the provider), and the new license
        starts from nothing. Every segment of the capsule is checked against the signed
        manifest before the server is asked for anything, so a damaged file uses no device slot.
        """
        from .provider_client import ProviderClient

        url = self._server_url(server)
        m = self.manifest
        old = self._license_status() if self.is_set_up else None
        if old is not None and not replace:
            left = "unlimited" if old.get("remaining") is None else old.get("remaining")
            raise UsageError(
                f"{self.path.name} is already set up on this device (license {old.get('license_id')}, "
                f"{left} queries left, {old.get('receipts_pending', 0)} receipt(s) not synced); "
                "a second setup would replace that license",
                hint="nothing was changed; to replace the license deliberately, add --replace "
                     "(Python: replace=True), which syncs the old receipts first")
        self._check_capsule_bytes()
        if old is not None:
            self._retire(old, token=token, url=url, export_receipts=export_receipts)
        with ProviderClient(url, token) as provider:
            nonce, _ = provider.challenge(str(m.capsule_id), m.version)
            begin = self._enclave.call("setup_begin", {"nonce": b64e(nonce)})
            answer = provider.provision(capsule_id=str(m.capsule_id), version=m.version, nonce=nonce,
                                        hpke_pub=b64d(begin["hpke_pub"]), receipt_pub=b64d(begin["receipt_pub"]),
                                        evidence=begin["evidence"])
        finish: dict[str, Any] = {"payload": answer["payload"]}
        if answer.get("credential") is not None:  # tpm: the payload opens only after credential activation
            finish["credential"] = answer["credential"]
        status = self._enclave.call("setup_finish", finish)
        self.load_info = {"license": "license"}
        if self.backend == "cvm" and not self.tcti:  # remember the vTPM it found (or none): the state opens only there
            platform = (self._enclave.info.get("threat_model") or {}).get("platform") or {}
            self.tcti = str(platform.get("vtpm_tcti") or "none")
        self._remembered = {**self._remembered, "server": url}
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # service mode: not made yet
        _write_backend_choice(self.state_dir, self.backend, self.tcti, server=url, tsm_path=self.tsm_path)
        return status

    def _server_url(self, server: str | None) -> str:
        """The server given, else the one used at setup, else the capsule's."""
        url = server or self._remembered.get("server") or self.manifest.server_url
        if not url:
            raise UsageError("the capsule names no provider server", hint="pass --server URL")
        return url

    def _license_status(self) -> dict[str, Any]:
        try:
            return dict(self._enclave.call("status").get("license_status") or {})
        except Exception:  # a dev-key session: no license to lose
            return {}

    def _check_capsule_bytes(self) -> None:
        """Every segment against its SHA-256 in the signed manifest (the hashes cover the stored
        ciphertext, so this catches any changed byte, tags included, without the key)."""
        from .enclave.errors import IntegrityError

        with CapsuleFile(self.path, trust=self.trust) as cf:
            if cf.manifest.segments != self.manifest.segments:
                raise IntegrityError(f"{self.path} changed while it was open",
                                     hint="close other programs writing it, and run setup again")
            try:
                cf.verify_segments()
            except IntegrityError as e:
                raise IntegrityError(f"{self.path} is damaged: {e.message}",
                                     hint="nothing was sent to the server and no device slot was used; "
                                          "fetch the capsule again from the provider") from None

    def _retire(self, old: dict[str, Any], *, token: str, url: str,
                export_receipts: str | os.PathLike[str] | None) -> None:
        """Before a deliberate replacement: the old license's receipts reach the provider (or a file)."""
        from .enclave._util import atomic_write
        from .enclave.errors import MlcapsuleError

        if not old.get("receipts_pending"):
            return
        if export_receipts is not None:
            report = self._enclave.call("usage_report")
            atomic_write(export_receipts, json.dumps(report, indent=1).encode(), mode=0o600)
            return
        try:
            self.sync(token=token, server=url)
        except MlcapsuleError as e:
            raise type(e)(f"the old license's receipts could not be synced before replacing it: {e.message}",
                          hint="nothing was replaced; try again when the server is reachable, or add "
                               "--export-receipts FILE to save them for the provider instead") from None

    def sync(self, *, token: str, server: str | None = None) -> dict[str, Any]:
        """Upload the signed usage receipts to the provider (when online)."""
        from .provider_client import ProviderClient

        url = self._server_url(server)
        report = self._enclave.call("usage_report")
        with ProviderClient(url, token) as provider:
            ack = provider.upload_usage(report["license_id"], report["device_id"], report["receipts"])
        self._enclave.call("usage_ack", {"ack": ack["ack"]})  # the enclave checks the provider's signature
        return ack

    def topup(self, voucher: dict[str, Any]) -> dict[str, Any]:
        """Redeem a provider-signed voucher, offline."""
        return self._enclave.call("apply_voucher", {"voucher": voucher})

    def kill(self) -> None:
        """Kill the enclave worker abruptly (for crash tests)."""
        self._enclave.kill()

    # -- inference ----------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on named inputs; returns every output by name."""
        prepared = {}
        for spec in self.manifest.inputs:
            if spec.name not in feeds:
                raise InputError(f"missing input {spec.name!r}")
            # C order, native byte order, and the caller's rank: np.ascontiguousarray turns a 0-d
            # input into shape [1], which the enclave rightly refuses for a scalar input.
            prepared[spec.name] = np.asarray(feeds[spec.name], dtype=spec.dtype, order="C")
        # The fast path: a binary frame, positional, large tensors through shared memory.
        outputs = self._enclave.infer(list(prepared.values()))
        return {spec.name: out for spec, out in zip(self.manifest.outputs, outputs, strict=False)}

    def predict(self, x: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        """The model's first output for a batch ``x`` (or a dict of inputs)."""
        if not isinstance(x, Mapping):
            if len(self.manifest.inputs) != 1:
                raise InputError("this model has several inputs: pass a dict of arrays")
            x = {self.manifest.inputs[0].name: x}
        return self.run(x)[self.manifest.outputs[0].name]

    def stream(self, frames: Iterable[Any], **options: Any) -> Iterator[Any]:
        """Keyword spotting on an audio stream: a generator of detections (issue 16).

        ``frames``: chunks of 16 kHz mono audio (int16, or float in [-1, 1]) of any size; options
        ``hop`` (seconds, 0.25), ``smoothing`` (windows, 3), ``threshold`` (0.6), ``refractory``
        (seconds, 0.75). See :func:`mlcapsule.kws.stream.detect` for what is charged."""
        from .kws.stream import detect

        return detect(self, frames, **options)

    # -- information --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {**self._enclave.call("status"), "mode": mode_info(self._enclave.service)}

    def close(self) -> None:
        try:
            self._enclave.close()
        finally:
            from ._cleanup import release_run_dir, remove_if_empty

            release_run_dir(getattr(self, "_run_lock", None))
            self._run_lock = None
            if getattr(self, "_dev", False) and getattr(self, "_made_state_dir", False):
                remove_if_empty(self.state_dir)  # a dev-key run leaves no empty state folder behind

    def __enter__(self) -> Capsule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


BACKEND_FILE = "backend.json"


def _service_for(service: str | os.PathLike[str] | bool | None, *, local_only: bool) -> Path | None:
    """The enclave service's socket to use, or None for a per-user worker."""
    from .enclaved import service_socket

    if service is False or (service is None and local_only):
        return None
    if service is None or service is True:
        return service_socket()
    return Path(service)


def mode_info(service: dict[str, Any] | None) -> dict[str, Any]:
    """Which mode the enclave runs in, and what that protects against (for `status`)."""
    from .enclaved import PER_USER_DOES_NOT, PER_USER_PROTECTS

    if service is not None:
        return {"mode": "service", "service_user": service.get("service_user"),
                "protects_against": service.get("protects_against"),
                "does_not_protect_against": service.get("does_not_protect_against")}
    return {"mode": "per-user", "protects_against": PER_USER_PROTECTS, "does_not_protect_against": PER_USER_DOES_NOT}


def _read_backend_choice(state_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((state_dir / BACKEND_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if k in ("backend", "tcti", "server", "tsm_path") and isinstance(v, str)} \
        if isinstance(data, dict) else {}


def _write_backend_choice(state_dir: Path, backend: str, tcti: str | None, *, server: str | None = None,
                          tsm_path: str | None = None) -> None:
    from .enclave._util import atomic_write

    choice = {"backend": backend, **({"tcti": tcti} if tcti else {}), **({"server": server} if server else {}),
              **({"tsm_path": str(Path(tsm_path).resolve())} if tsm_path else {})}
    atomic_write(state_dir / BACKEND_FILE, json.dumps(choice).encode(), mode=0o600)


def _clean_leftovers(state_dir: Path) -> None:
    """Before an enclave starts: delete the run folders of killed sessions, and the empty state
    folders older dev-key runs left (never a live session's; see _cleanup)."""
    from ._cleanup import clean_empty_state_dirs, clean_stale_run_dirs

    clean_stale_run_dirs(state_dir)
    clean_empty_state_dirs(data_home() / "state")


def _hold_run(enclave: EnclaveProcess) -> int | None:
    """Hold the lock that marks this session's run folder as alive (see _cleanup)."""
    from ._cleanup import hold_run_dir

    run = getattr(enclave, "_run", None)
    name = getattr(run, "name", None)
    if not name:
        return None
    try:
        return hold_run_dir(name)
    except OSError:
        return None


def open_capsule(path: str | os.PathLike[str], *, trust: Trust, **kwargs: Any) -> Capsule:
    """Open ``path`` in an enclave worker under the trust decision ``trust`` (required). See
    :class:`Capsule` for the options."""
    return Capsule(path, trust=trust, **kwargs)
