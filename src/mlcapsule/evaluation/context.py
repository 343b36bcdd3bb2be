"""What every part of the evaluation shares: the sizes (full or quick), the cache, the data,
the victims, and capsules packed and opened with a dev key."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .report import Clock

__all__ = ["Sizes", "FULL", "QUICK", "Context", "default_cache_dir", "CIFAR10_CLASSES"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@dataclass(frozen=True)
class Sizes:
    """Every size the evaluation uses; :data:`FULL` fits 60 min on 2 cores, :data:`QUICK` a few minutes."""

    name: str
    # the MNIST victim (a small CNN)
    mnist_train: int
    mnist_epochs: int
    # kennen-io: the crafting zoo and the detector's data
    zoo_nets: int
    zoo_train_images: int
    zoo_epochs: int
    kennen_queries: int  # queries per crafting session
    kennen_rounds: int
    kennen_meta_epochs: int
    kennen_query_steps: int
    kennen_batch_models: int
    detector_train: int  # crafted training rows (the paper: 4,500)
    detector_test: int  # crafted test rows (the paper: 500)
    detector_epochs: int
    benign_denials: int  # MNIST test images checked for false denials (the paper: 10,000)
    # PRADA
    jbda_seeds_per_class: int
    jbda_rounds: int
    benign_streams: int
    benign_stream_len: int
    detector_stream_len: int  # Knockoff and uniform streams against PRADA and ood
    # membership (Figure 4)
    cifar_members: int  # CIFAR-10 training images of the overfit CNN (members)
    cifar_epochs: int
    mnist_members: int
    mnist_member_epochs: int
    mi_candidates: int  # members and as many non-members scored
    # Tramèr et al.
    mlp_big: bool
    retrain_alphas: tuple[float, ...]
    label_budgets: tuple[int, ...]  # label-only retraining: uniform vs line search vs adaptive, equal budgets
    label_converged: bool  # also with a substitute trained to convergence (200 epochs at lr 0.1)
    # Shokri et al.'s shadow models (beside the entropy attack of Figure 4)
    shadow_k: int
    shadow_attack_epochs: int
    shadow_c: tuple[float, ...]
    # budgets
    budgets: tuple[int, ...]
    substitute_epochs: int


FULL = Sizes(
    name="full", mnist_train=20_000, mnist_epochs=3,
    zoo_nets=40, zoo_train_images=1000, zoo_epochs=2, kennen_queries=100, kennen_rounds=2, kennen_meta_epochs=30,
    kennen_query_steps=10, kennen_batch_models=10, detector_train=4500, detector_test=500, detector_epochs=10,
    benign_denials=10_000,
    jbda_seeds_per_class=10, jbda_rounds=4, benign_streams=10, benign_stream_len=1000, detector_stream_len=2000,
    cifar_members=2500, cifar_epochs=40, mnist_members=1000, mnist_member_epochs=60, mi_candidates=1000,
    mlp_big=True, retrain_alphas=(0.5, 1.0, 2.0, 5.0, 10.0),
    label_budgets=(65, 130, 260, 650, 1300), label_converged=True,
    shadow_k=4, shadow_attack_epochs=30, shadow_c=(0.0, 0.3, 0.5, 1.0),
    budgets=(100, 300, 1000, 3000, 10_000), substitute_epochs=20,
)

QUICK = Sizes(
    name="quick", mnist_train=3000, mnist_epochs=2,
    zoo_nets=6, zoo_train_images=300, zoo_epochs=1, kennen_queries=20, kennen_rounds=1, kennen_meta_epochs=4,
    kennen_query_steps=3, kennen_batch_models=3, detector_train=100, detector_test=100, detector_epochs=6,
    benign_denials=2000,
    jbda_seeds_per_class=10, jbda_rounds=2, benign_streams=10, benign_stream_len=150, detector_stream_len=300,
    cifar_members=500, cifar_epochs=15, mnist_members=300, mnist_member_epochs=40, mi_candidates=300,
    mlp_big=False, retrain_alphas=(1.0, 2.0),
    label_budgets=(130, 650), label_converged=False,
    shadow_k=2, shadow_attack_epochs=20, shadow_c=(0.0, 1.0),
    budgets=(100, 300, 1000), substitute_epochs=8,
)


def default_cache_dir() -> Path:
    """``$MLCAPSULE_CACHE/evaluation``, else ``~/.cache/mlcapsule/evaluation``."""
    if os.environ.get("MLCAPSULE_CACHE"):
        return Path(os.environ["MLCAPSULE_CACHE"]) / "evaluation"
    return Path.home() / ".cache" / "mlcapsule" / "evaluation"


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Context:
    """Shared state of one evaluation run."""

    def __init__(self, sizes: Sizes, cache: Path, work: Path, log: Callable[[str], None]) -> None:
        self.sizes = sizes
        self.cache = cache
        self.work = work
        self.log = log
        self.clock = Clock(log)
        self.cached: dict[str, bool] = {}  # victim name -> loaded from the cache
        self._memo: dict[str, Any] = {}
        self._provider_key: Path | None = None

    # -- data ------------------------------------------------------------------------------------
    def mnist(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """MNIST as float32 [n, 1, 28, 28] in [0, 1] and int64 labels."""
        key = f"mnist-{split}"
        if key not in self._memo:
            from ..attacks.data import load_idx_dataset

            x, y = load_idx_dataset("mnist", split)
            self._memo[key] = ((x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28), y)
        out: tuple[np.ndarray, np.ndarray] = self._memo[key]
        return out

    def fashion(self, split: str = "test") -> tuple[np.ndarray, np.ndarray]:
        key = f"fashion-{split}"
        if key not in self._memo:
            from ..attacks.data import load_idx_dataset

            x, y = load_idx_dataset("fashion-mnist", split)
            self._memo[key] = ((x.astype(np.float32) / 255.0).reshape(-1, 1, 28, 28), y)
        out: tuple[np.ndarray, np.ndarray] = self._memo[key]
        return out

    def cifar10(self, split: str, per_class: int) -> tuple[np.ndarray, np.ndarray]:
        """The first ``per_class`` images of each class (by file name) of the shared CIFAR-10
        JPEG copy, float32 [n, 3, 32, 32] in [0, 1]; decoded once and cached as .npy."""
        from ..attacks.data import shared_datasets_dir

        path = self.cache / "data" / f"cifar10-{split}-{per_class}.npz"
        if path.exists():
            with np.load(path) as blob:
                return blob["x"].astype(np.float32) / 255.0, blob["y"].astype(np.int64)
        import io

        from PIL import Image

        archive = shared_datasets_dir() / "cifar10" / "cifar10-jpg.tar.gz"
        chosen: dict[str, list[tuple[str, bytes]]] = {c: [] for c in CIFAR10_CLASSES}
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                parts = Path(member.name).parts
                parts = tuple(p for p in parts if p != ".")
                if not member.isfile() or len(parts) != 3 or parts[0] != split or parts[1] not in chosen:
                    continue
                f = tar.extractfile(member)
                if f is not None:
                    chosen[parts[1]].append((parts[2], f.read()))
        xs, ys = [], []
        for label, cls in enumerate(CIFAR10_CLASSES):
            files = sorted(chosen[cls])[:per_class]
            for _, data in files:
                img = Image.open(io.BytesIO(data)).convert("RGB")
                xs.append(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))
                ys.append(label)
        x8 = np.stack(xs)
        y = np.asarray(ys, np.int64)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npz")
        np.savez(tmp, x=x8, y=y)
        os.replace(tmp, path)
        return x8.astype(np.float32) / 255.0, y

    # -- victims ---------------------------------------------------------------------------------
    def victim(self, name: str, spec: dict[str, Any], train: Callable[[], Any], example: np.ndarray) -> Any:
        """The ONNX model of a victim: from the cache (keyed by ``spec``), else ``train()`` (a torch
        module with probabilities out), exported and cached."""
        import onnx

        path = self.cache / "victims" / f"{name}-{_key(spec)}.onnx"
        if path.exists():
            self.cached.setdefault(name, True)  # a victim trained earlier in this run stays "trained"
            return onnx.load(str(path))
        from ..export import torch_to_onnx

        module = train()
        model = torch_to_onnx(module, np.ascontiguousarray(example[:2], dtype=np.float32),
                              output_name="probabilities")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_bytes(model.SerializeToString())
        os.replace(tmp, path)
        self.cached[name] = False
        return model

    # -- capsules --------------------------------------------------------------------------------
    def pack(self, name: str, model: Any, defenses: Sequence[str], **kwargs: Any) -> Path:
        """A capsule of ``model`` with ``defenses`` (a throwaway provider key in the work folder)."""
        import mlcapsule

        if self._provider_key is None:
            self._provider_key = self.work / "provider.pem"
            mlcapsule.generate_provider_key(self._provider_key)
        out = self.work / "capsules" / f"{name}-{uuid.uuid4().hex[:8]}.capsule"
        out.parent.mkdir(parents=True, exist_ok=True)
        mlcapsule.pack(model, out, provider_key=self._provider_key, name=name, defenses=list(defenses),
                       tune_runtime=False, **kwargs)
        return out

    @contextmanager
    def open(self, capsule: Path) -> Iterator[Any]:
        """The capsule opened with its dev key, in a fresh state folder (a fresh defense state)."""
        import mlcapsule

        state = self.work / "state" / uuid.uuid4().hex[:8]
        with mlcapsule.open_capsule(capsule, trust=mlcapsule.UnsafeTrustManifestKey(),
                                    unsafe_dev_key=str(capsule) + ".key", state_dir=state) as c:
            yield c

    def settings(self) -> dict[str, Any]:
        return asdict(self.sizes)
