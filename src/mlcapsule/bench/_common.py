"""Shared pieces of the benchmarks: environment, timing, statistics, packing, cold starts.

Host side only: the benchmarks drive capsules through the public client API, exactly as a
user would, and compare them with plain ONNX Runtime in this process (steady state) or in a
fresh process (cold start).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MiB = 1 << 20


# -- environment --------------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def environment(threads: int) -> dict[str, Any]:
    import cryptography
    import onnx
    import onnxruntime

    from .. import __version__

    return {
        "date": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "onnx": onnx.__version__,
        "numpy": np.__version__,
        "cryptography": cryptography.__version__,
        "mlcapsule": __version__,
        "backend": "software",
        "load_average_at_start": load_average(),
    }


# -- statistics ---------------------------------------------------------------------------------
def stats(seconds: list[float], *, unit: float = 1e3) -> dict[str, float]:
    """min, median, mean, p99, max (in ms by default; ``unit=1e6`` for µs) and n."""
    a = np.asarray(seconds, dtype=np.float64) * unit
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "min": float(a.min()), "median": float(np.median(a)), "mean": float(a.mean()),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def ratio(a: dict[str, float], b: dict[str, float]) -> float | None:
    if not a.get("n") or not b.get("n") or not b["median"]:
        return None
    return a["median"] / b["median"]


def interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int, per_round: int,
                warmup: int = 1, settle: int = 1) -> dict[str, list[float]]:
    """Time each function in turn, ``per_round`` calls at a time, for ``rounds`` rounds, the
    order reversed every other round: background load on a shared machine then falls on every
    variant alike, and the ratios of medians stay fair. The first ``settle`` calls of each
    round are not timed: ONNX Runtime's pool threads spin for a while after a run, and those of
    the variant that ran before would otherwise compete with this one's first call."""
    for f in fns.values():
        for _ in range(warmup):
            f()
    out: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            f = fns[k]
            samples = out[k]
            for _ in range(settle):
                f()
            for _ in range(per_round):
                t0 = time.perf_counter()
                f()
                samples.append(time.perf_counter() - t0)
    return out


def max_rel_diff(ref: np.ndarray, got: np.ndarray) -> float:
    ref = np.asarray(ref, dtype=np.float64)
    got = np.asarray(got, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(ref)))) if ref.size else 1.0
    return float(np.max(np.abs(ref - got)) / scale) if ref.size else 0.0


# -- workspace: a provider key, packed capsules -------------------------------------------------
@dataclass
class Workspace:
    root: Path
    threads: int
    quick: bool
    log: Callable[[str], None] = print
    provider_key: Path = field(init=False)

    def __post_init__(self) -> None:
        from ..enclave.crypto.keys import generate_provider_key

        self.root.mkdir(parents=True, exist_ok=True)
        self.provider_key = self.root / "provider-key.pem"
        if not self.provider_key.exists():
            generate_provider_key(self.provider_key)

    def pack(self, model: Any, name: str, **kw: Any) -> dict[str, Any]:
        """Save the plain ONNX file and pack it (with the runtime tuning the packer does)."""
        import onnx

        from ..packer import pack

        plain = self.root / f"{name}.onnx"
        onnx.save(model, str(plain))
        t0 = time.perf_counter()
        res = pack(model, self.root / f"{name}.capsule", provider_key=self.provider_key, name=name, **kw)
        return {"plain": plain, "capsule": res.capsule_path, "key": res.key_path, "manifest": res.manifest,
                "pack_seconds": time.perf_counter() - t0, "runtime": res.manifest.runtime.to_dict()
                | {"initializers": res.manifest.runtime.initializers}, "trials": list(res.runtime_trials)}

    def state(self, name: str) -> Path:
        p = self.root / "state" / name
        p.mkdir(parents=True, exist_ok=True)
        return p


def plain_session(path: Path, threads: int) -> Any:
    """``onnxruntime.InferenceSession(path)`` with default options but the thread count."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def workspace_trust(ws: Workspace) -> Any:
    """The trust decision for the workspace's capsules: its own provider key, pinned."""
    from ..enclave.crypto.keys import load_provider_key, raw_public
    from ..enclave.format.trust import TrustProviderKey

    return TrustProviderKey(raw_public(load_provider_key(ws.provider_key).public_key()))


def open_capsule(packed: dict[str, Any], ws: Workspace, tag: str, *, threads: int | None = None,
                 memory_limit_mb: float | None = None) -> Any:
    from ..client import open_capsule as _open

    return _open(packed["capsule"], trust=workspace_trust(ws), unsafe_dev_key=packed["key"], state_dir=ws.state(tag),
                 platform_dir=ws.root / "platform", threads=threads or ws.threads, memory_limit_mb=memory_limit_mb)


def enclave_memory(status: dict[str, Any]) -> dict[str, float]:
    """The enclave's memory from its ``status``: baseline, peak (VmHWM) and growth, in MiB."""
    mem = status.get("memory") or {}
    base = (mem.get("baseline") or {}).get("VmRSS", 0)
    now = mem.get("now") or {}
    return {"baseline_mb": base / MiB, "peak_mb": now.get("VmHWM", 0) / MiB,
            "peak_growth_mb": (now.get("VmHWM", 0) - base) / MiB, "rss_growth_mb": (now.get("VmRSS", 0) - base) / MiB,
            "limit_mb": (mem.get("limit") or 0) / MiB or None}


# -- cold start of plain ONNX Runtime, in a fresh process ----------------------------------------
_PLAIN_COLD = r"""
import json, sys, time
t_start = time.perf_counter()
import numpy as np
import onnxruntime as ort
def mem():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmRSS", "VmHWM"):
            d[k] = int(v.split()[0]) * 1024
    return d
path, threads, shape = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
before = mem()
t0 = time.perf_counter()
so = ort.SessionOptions()
so.intra_op_num_threads = threads
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
t1 = time.perf_counter()
s.run(None, {s.get_inputs()[0].name: x})
t2 = time.perf_counter()
after = mem()
print(json.dumps({"session_seconds": t1 - t0, "first_run_seconds": t2 - t1, "seconds": t2 - t0,
                  "seconds_with_import": t2 - t_start, "peak_growth_mb": (after["VmHWM"] - before["VmRSS"]) / 2**20,
                  "rss_growth_mb": (after["VmRSS"] - before["VmRSS"]) / 2**20}))
"""


def plain_cold_start(path: Path, threads: int, shape: list[int]) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", _PLAIN_COLD, str(path), str(threads), json.dumps(shape)],
                         capture_output=True, text=True, check=True, env={**os.environ, "ORT_DISABLE_TELEMETRY": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def capsule_cold_start(packed: dict[str, Any], ws: Workspace, tag: str, x: np.ndarray) -> dict[str, Any]:
    """From opening the capsule (the enclave worker is spawned) to the first answer."""
    t0 = time.perf_counter()
    cap = open_capsule(packed, ws, tag)
    try:
        t1 = time.perf_counter()
        cap.predict(x)
        t2 = time.perf_counter()
        st = cap.status()
    finally:
        cap.close()
    model = st.get("model") or {}
    return {"seconds": t2 - t0, "open_seconds": t1 - t0, "first_run_seconds": t2 - t1,
            "load_seconds": st.get("load_seconds"), "decrypt_seconds": model.get("decrypt_seconds"),
            "session_seconds": model.get("session_seconds"), **enclave_memory(st)}
