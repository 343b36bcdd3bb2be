"""The client's Python API: open a capsule and call it with numpy arrays.

    >>> import mlcapsule
    >>> with mlcapsule.open_capsule("digits.capsule", unsafe_dev_key="digits.capsule.key") as cap:
    ...     probs = cap.predict(x)            # x: np.ndarray batch

The capsule runs in an enclave worker process that lives as long as the ``Capsule`` object, so
repeated calls reuse one session. This process (the host) only ever sees outputs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ._util import data_home
from .enclave.host import EnclaveProcess
from .errors import InputError
from .format.container import CapsuleFile
from .format.manifest import Manifest


def default_state_dir(manifest: Manifest) -> Path:
    return data_home() / "state" / f"{manifest.capsule_id}-v{manifest.version}"


class Capsule:
    """An opened capsule, served by its own enclave worker."""

    def __init__(self, path: str | os.PathLike[str], *, unsafe_dev_key: str | os.PathLike[str] | None = None,
                 state_dir: str | os.PathLike[str] | None = None, backend: str = "software",
                 platform_dir: str | os.PathLike[str] | None = None, threads: int | None = None,
                 trusted_provider_key: bytes | None = None) -> None:
        self.path = Path(path)
        with CapsuleFile(self.path, trusted_key=trusted_provider_key) as cf:
            self.manifest = cf.manifest
        self.state_dir = Path(state_dir) if state_dir else default_state_dir(self.manifest)
        self._enclave = EnclaveProcess(self.path, state_dir=self.state_dir, backend=backend,
                                       platform_dir=platform_dir, dev_key=unsafe_dev_key, threads=threads)
        try:
            self.load_info = self._enclave.call("load", {"dev_key": str(Path(unsafe_dev_key).resolve()) if unsafe_dev_key else None})
        except BaseException:
            self._enclave.close()
            raise

    # -- inference ----------------------------------------------------------------------------
    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on named inputs; returns every output by name."""
        prepared = {}
        for spec in self.manifest.inputs:
            if spec.name not in feeds:
                raise InputError(f"missing input {spec.name!r}")
            prepared[spec.name] = np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
        return self._enclave.call("infer", tensors=prepared)["tensors"]

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


def open_capsule(path: str | os.PathLike[str], **kwargs: Any) -> Capsule:
    """Open ``path`` in an enclave worker. See :class:`Capsule` for the options."""
    return Capsule(path, **kwargs)
