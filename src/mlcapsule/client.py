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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._util import b64d, b64e, data_home
from .enclave.host import EnclaveProcess
from .enclave.state import STATE_FILE
from .errors import InputError, UsageError
from .format.container import CapsuleFile
from .format.manifest import Manifest


def default_state_dir(manifest: Manifest) -> Path:
    return data_home() / "state" / f"{manifest.capsule_id}-v{manifest.version}"


class Capsule:
    """An opened capsule, served by its own enclave worker."""

    def __init__(self, path: str | os.PathLike[str], *, unsafe_dev_key: str | os.PathLike[str] | None = None,
                 state_dir: str | os.PathLike[str] | None = None, backend: str | None = None,
                 platform_dir: str | os.PathLike[str] | None = None, threads: int | None = None,
                 trusted_provider_key: bytes | None = None, tcti: str | None = None,
                 memory_limit_mb: float | None = None) -> None:
        self.path = Path(path)
        self.memory_limit_mb = memory_limit_mb  # streaming mode: the enclave stays within this many MiB
        with CapsuleFile(self.path, trusted_key=trusted_provider_key) as cf:
            self.manifest = cf.manifest
        self.state_dir = Path(state_dir) if state_dir else default_state_dir(self.manifest)
        # The backend that set this capsule up is remembered next to its state (backend.json):
        # state sealed by one backend does not open in another.
        remembered = _read_backend_choice(self.state_dir)
        self.backend = backend or remembered.get("backend") or "software"
        self.tcti = tcti or (remembered.get("tcti") if self.backend == remembered.get("backend") else None)
        if self.tcti and self.backend != "tpm":
            raise UsageError("--tcti is for the tpm backend", hint="add --backend tpm")
        self._enclave = EnclaveProcess(self.path, state_dir=self.state_dir, backend=self.backend,
                                       platform_dir=platform_dir, dev_key=unsafe_dev_key, threads=threads,
                                       tcti=self.tcti, memory_limit_mb=memory_limit_mb)
        self.load_info: dict[str, Any] | None = None
        try:
            if unsafe_dev_key is not None:
                self.load_info = self._enclave.call("load", {"dev_key": str(Path(unsafe_dev_key).resolve())})
            elif (self.state_dir / STATE_FILE).exists():
                self.load_info = self._enclave.call("load", {"dev_key": None})
        except BaseException:
            self._enclave.close()
            raise

    # -- setup phase (online, once per device) -------------------------------------------------
    @property
    def is_set_up(self) -> bool:
        return self.load_info is not None

    def setup(self, *, token: str, server: str | None = None) -> dict[str, Any]:
        """Attest the enclave to the provider's server and receive the key and license.

        The host relays messages; the key and the license secrets go from the server straight
        into the enclave (HPKE), which seals them. Returns the license status.
        """
        from .server.client import ProviderClient

        url = server or self.manifest.server_url
        if not url:
            raise UsageError("the capsule names no provider server", hint="pass --server URL")
        m = self.manifest
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
        _write_backend_choice(self.state_dir, self.backend, self.tcti)
        return status

    def sync(self, *, token: str, server: str | None = None) -> dict[str, Any]:
        """Upload the signed usage receipts to the provider (when online)."""
        from .server.client import ProviderClient

        url = server or self.manifest.server_url
        if not url:
            raise UsageError("the capsule names no provider server", hint="pass --server URL")
        report = self._enclave.call("usage_report")
        with ProviderClient(url, token) as provider:
            ack = provider.upload_usage(report["license_id"], report["device_id"], report["receipts"])
        self._enclave.call("usage_ack", {"seq": int(ack["seq"])})
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
            prepared[spec.name] = np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
        # The fast path: a binary frame, positional, large tensors through shared memory.
        outputs = self._enclave.infer(list(prepared.values()))
        return {spec.name: out for spec, out in zip(self.manifest.outputs, outputs)}

    def predict(self, x: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        """The model's first output for a batch ``x`` (or a dict of inputs)."""
        if not isinstance(x, Mapping):
            if len(self.manifest.inputs) != 1:
                raise InputError("this model has several inputs: pass a dict of arrays")
            x = {self.manifest.inputs[0].name: x}
        return self.run(x)[self.manifest.outputs[0].name]

    # -- information --------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self._enclave.call("status")

    def close(self) -> None:
        self._enclave.close()

    def __enter__(self) -> "Capsule":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


BACKEND_FILE = "backend.json"


def _read_backend_choice(state_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((state_dir / BACKEND_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if k in ("backend", "tcti") and isinstance(v, str)} \
        if isinstance(data, dict) else {}


def _write_backend_choice(state_dir: Path, backend: str, tcti: str | None) -> None:
    from ._util import atomic_write

    choice = {"backend": backend, **({"tcti": tcti} if tcti else {})}
    atomic_write(state_dir / BACKEND_FILE, json.dumps(choice).encode(), mode=0o600)


def open_capsule(path: str | os.PathLike[str], **kwargs: Any) -> Capsule:
    """Open ``path`` in an enclave worker. See :class:`Capsule` for the options."""
    return Capsule(path, **kwargs)
