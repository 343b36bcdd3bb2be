"""The ``defenses`` suite: what the enclave's defenses (issue 12) cost per query.

Two parts, in one run:

* **In the enclave's configuration** (a child process with the worker's thread settings,
  :func:`mlcapsule.host.worker_env`: OpenBLAS/OMP/MKL on one thread, ONNX Runtime on one
  thread), each defense module alone: PRADA's step on a state pre-filled to 3,000 stored queries
  at MNIST size (784 values) and CIFAR size (3,072), spread over 10 classes and all in one
  class; the kennen-io detector on one 1x28x28 input; Algorithm 1 (``mi-noise``) per posterior,
  alone and in batches; loading and saving ~20 MB of defense state; and ``pipeline.apply`` with
  the demo capsule's policy.
* **End to end**: the digits demo capsule packed with ``prada, ood, mi-noise:c=0.5, top-k:3``
  against the same model packed without defenses, both dev-key capsules, single-query
  ``predict`` in interleaved rounds; and, in licensed mode, the extra cost of the query that
  charges a lease (the sealed write that persists the defense state with the license state).

Every figure is reported with the undefended capsule's per-query time measured in the same run.
Synthetic inputs (uniform in [0, 1)) stand in for MNIST and CIFAR images: PRADA's cost depends
on the sizes (values per query, stored queries, distances in its window), not on the pixels.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from ..demo import models
from . import paper
from ._common import Workspace, interleaved, load_average, open_capsule, stats

#: The policy of the end-to-end comparison (and of the in-process ``pipeline.apply`` figure).
PIPELINE_POLICY = ["prada", "ood", "mi-noise:c=0.5", "top-k:3"]
#: The goals of issue 12, in µs, with the paper's figures (Hanzlik et al., Section 7).
GOALS_US = {"prada_mnist": 1000.0, "prada_cifar": 3000.0, "kennen": 300.0, "mi_noise": 10.0, "state_load": 50_000.0}


def _thread_env() -> dict[str, str]:
    """The worker's thread settings (OpenBLAS, OpenMP, MKL), as the enclave runs."""
    from ..host import worker_env

    return {k: v for k, v in worker_env().items() if k.endswith("_NUM_THREADS")}


def _each(f: Callable[[], Any], n: int, *, warmup: int = 20) -> list[float]:
    """Time ``n`` calls of ``f`` one by one (seconds)."""
    for _ in range(warmup):
        f()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        f()
        out.append(time.perf_counter() - t0)
    return out


# -- the child process: each module alone, BLAS and ORT on one thread ---------------------------
def _prada_rows(cfg: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
    """PRADA's step on states pre-filled (by the step itself) to ``prada_stored`` stored queries,
    the four configurations timed in interleaved rounds (the order reversed every other round),
    so that a burst of background load does not fall on one of them only. Each round starts from
    a copy of the pre-filled state: every timed step sees between ``prada_stored`` and
    ``prada_stored + prada_per_round`` stored queries."""
    from ..enclave.defenses import prada
    from ..enclave.defenses.policy import DefensePolicy

    params = DefensePolicy.from_specs(["prada"]).prada
    assert params is not None
    configs: list[dict[str, Any]] = []
    for dim, label in ((784, "MNIST size (784)"), (3072, "CIFAR size (3,072)")):
        for n_classes in (10, 1):
            st = prada.PradaState.new(params)
            q = 0
            t0 = time.perf_counter()
            while st.stored < cfg["prada_stored"]:
                prada.step(params, st, rng.random(dim, dtype=np.float32), q % n_classes)
                q += 1
            configs.append({"dim": dim, "size": label, "classes": n_classes, "snapshot": st, "fill_queries": q,
                            "fill_seconds": time.perf_counter() - t0, "samples": [], "stored_after": st.stored})
    for r in range(cfg["prada_rounds"]):
        for c in (configs if r % 2 == 0 else configs[::-1]):
            s = copy.deepcopy(c["snapshot"])
            xs = rng.random((cfg["prada_per_round"], c["dim"]), dtype=np.float32)
            q, n_classes, samples = c["fill_queries"], c["classes"], c["samples"]
            for i in range(len(xs)):
                t1 = time.perf_counter()
                prada.step(params, s, xs[i], (q + i) % n_classes)
                samples.append(time.perf_counter() - t1)
            c["stored_after"] = max(c["stored_after"], s.stored)
            del s
    rows = []
    for c in configs:
        snapshot = c.pop("snapshot")
        test = _each(partial(prada.window_statistic, snapshot, params.min_dists), 200, warmup=5)
        first = next(iter(snapshot.classes.values()))
        per_row = sum(a.itemsize * (a.size // max(len(a), 1)) for a in
                      (first.rows, first.sqnorms, first.gdists, first.ages))
        window = snapshot.d_values.nbytes + snapshot.d_classes.nbytes
        rows.append(c | {
            "stored": snapshot.stored, "distances_in_window": snapshot.d_count,
            "us": stats(c.pop("samples"), unit=1e6), "test_us": stats(test, unit=1e6),
            "memory": {"held_bytes": snapshot.memory_bytes(),
                       "held_per_stored": snapshot.memory_bytes() / snapshot.stored,
                       "row_bytes": per_row, "window_bytes": window,
                       "serialised_per_stored": len(snapshot.to_bytes()) / snapshot.stored}})
        del snapshot
    return rows


def _mi_noise(cfg: dict[str, Any], rng: np.random.Generator) -> list[dict[str, Any]]:
    from ..enclave.defenses import outputs
    from ..enclave.defenses.policy import DefensePolicy

    policy = DefensePolicy.from_specs(["mi-noise:c=0.5"])
    rows = []
    for batch, n in ((1, cfg["mi_single"]), (32, cfg["mi_batched"]), (1000, cfg["mi_batched"] // 10)):
        p32 = rng.dirichlet(np.full(10, 0.3), size=batch).astype(np.float32)
        p64 = outputs.as_distribution(p32)
        alone = _each(partial(outputs.mi_noise, p64, 0.5), n)
        full = _each(partial(outputs.transform, policy, p32), n)
        rows.append({"batch": batch, "classes": 10, "algorithm_us": stats(alone, unit=1e6 / batch),
                     "transform_us": stats(full, unit=1e6 / batch)})
    return rows


def _state_io(cfg: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    from ..enclave.defenses import prada
    from ..enclave.defenses.pipeline import DefenseState
    from ..enclave.defenses.policy import DefensePolicy

    policy = DefensePolicy.from_specs(["prada"])
    params = policy.prada
    assert params is not None
    state = DefenseState.new(policy)
    assert state.prada is not None
    q = 0
    while state.prada.stored < cfg["state_stored"]:
        prada.step(params, state.prada, rng.random(784, dtype=np.float32), q % 10)
        q += 1
    state.queries = q
    blob = state.to_bytes()
    back = DefenseState.from_bytes(blob, policy)
    assert back.to_bytes() == blob
    n = cfg["state_runs"]
    load = _each(lambda: DefenseState.from_bytes(blob, policy), n, warmup=2)
    save = _each(state.to_bytes, n, warmup=2)
    return {"bytes": len(blob), "mb": len(blob) / 1e6, "stored": state.prada.stored, "dim": 784,
            "load_ms": stats(load), "save_ms": stats(save)}


def _kennen(cfg: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()  # as the enclave opens it (enclave/core.py)
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(cfg["kennen_path"], so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [d if isinstance(d, int) else -1 for d in inp.shape]

    def scores(x: np.ndarray) -> np.ndarray:  # the worker's _kennen_scores
        batch = np.asarray(x, dtype=np.float32)
        probs = sess.run(None, {inp.name: batch.reshape([len(batch), *shape[1:]])})[0]
        return np.asarray(probs, dtype=np.float64)[:, 1]

    rng = np.random.default_rng(7)
    out: dict[str, Any] = {"input_shape": inp.shape}
    for batch, n in ((1, cfg["kennen_runs"]), (32, max(cfg["kennen_runs"] // 10, 20))):
        x = rng.random((batch, 1, 28, 28), dtype=np.float32)
        assert scores(x).shape == (batch,)
        out[f"batch{batch}_us"] = stats(_each(partial(scores, x), n), unit=1e6 / batch)
    return out


def _apply(cfg: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    from ..enclave.defenses import fit_ood_stats
    from ..enclave.defenses.pipeline import DefenseState, apply
    from ..enclave.defenses.policy import DefensePolicy

    data = np.load(cfg["digits_path"])
    x_train, pool, post = data["x_train"], data["queries"], data["posteriors"]
    policy = DefensePolicy.from_specs(PIPELINE_POLICY)
    ood = fit_ood_stats(x_train)
    state = DefenseState.new(policy)
    for i in range(cfg["apply_fill"]):
        j = i % len(pool)
        apply(policy, state, pool[j:j + 1], post[j:j + 1], ood_stats=ood)
    assert state.prada is not None
    stored_before = state.prada.stored
    k = [cfg["apply_fill"]]

    def one() -> None:
        j = k[0] % len(pool)
        k[0] += 1
        apply(policy, state, pool[j:j + 1], post[j:j + 1], ood_stats=ood)

    samples = _each(one, cfg["apply_runs"])
    assert state.prada is not None
    return {"policy": PIPELINE_POLICY, "values": int(pool.shape[1]), "stored_before": stored_before,
            "stored_after": state.prada.stored, "fill_queries": cfg["apply_fill"], "us": stats(samples, unit=1e6)}


def child_main() -> None:
    """The child process's entry: the configuration as JSON on stdin, the results on stdout."""
    cfg = json.loads(sys.stdin.read())
    rng = np.random.default_rng(cfg.get("seed", 0))
    out: dict[str, Any] = {"thread_env": {k: os.environ.get(k) for k in _thread_env()}}
    out["prada"] = _prada_rows(cfg, rng)
    out["mi_noise"] = _mi_noise(cfg, rng)
    out["state"] = _state_io(cfg, rng)
    out["kennen"] = _kennen(cfg)
    out["apply"] = _apply(cfg, rng)
    # Numpy only in the defenses' hot path: nothing heavier was imported by them in this process.
    out["other_modules_loaded"] = [m for m in ("scipy", "torch", "sklearn", "numba") if m in sys.modules]
    sys.stdout.write(json.dumps(out) + "\n")


def _run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    code = "from mlcapsule.bench.defenses import child_main; child_main()"
    env = {**os.environ, **_thread_env(), "ORT_DISABLE_TELEMETRY": "1"}
    res = subprocess.run([sys.executable, "-c", code], input=json.dumps(cfg), capture_output=True, text=True,
                         env=env)
    if res.returncode:
        raise RuntimeError(f"the defenses benchmark's child process failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# -- the kennen-io detector ---------------------------------------------------------------------
def _kennen_by_hand(seed: int = 0) -> Any:
    """The paper's detector architecture, untrained (He-initialised weights), built with onnx.helper:
    standardise, conv5x5(10)-maxpool2-relu, conv5x5(20)-maxpool2-relu, fc50-relu, (dropout: the
    identity at inference), fc2, softmax; input [N, 1, 28, 28], output [N, 2]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int) -> onnx.TensorProto:
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
        return numpy_helper.from_array((rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32), name)

    inits = [numpy_helper.from_array(np.array(0.13, np.float32), "mean"),
             numpy_helper.from_array(np.array(0.31, np.float32), "std"),
             w("c1w", 10, 1, 5, 5), numpy_helper.from_array(np.zeros(10, np.float32), "c1b"),
             w("c2w", 20, 10, 5, 5), numpy_helper.from_array(np.zeros(20, np.float32), "c2b"),
             w("f1w", 320, 50), numpy_helper.from_array(np.zeros(50, np.float32), "f1b"),
             w("f2w", 50, 2), numpy_helper.from_array(np.zeros(2, np.float32), "f2b")]
    nodes = [helper.make_node("Sub", ["input", "mean"], ["s"]), helper.make_node("Div", ["s", "std"], ["z"]),
             helper.make_node("Conv", ["z", "c1w", "c1b"], ["c1"], kernel_shape=[5, 5]),
             helper.make_node("MaxPool", ["c1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Relu", ["p1"], ["r1"]),
             helper.make_node("Conv", ["r1", "c2w", "c2b"], ["c2"], kernel_shape=[5, 5]),
             helper.make_node("MaxPool", ["c2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Relu", ["p2"], ["r2"]), helper.make_node("Flatten", ["r2"], ["f"]),
             helper.make_node("MatMul", ["f", "f1w"], ["m1"]), helper.make_node("Add", ["m1", "f1b"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["h"]),
             helper.make_node("MatMul", ["h", "f2w"], ["m2"]), helper.make_node("Add", ["m2", "f2b"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)]
    graph = helper.make_graph(nodes, "kennen_detector",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 28, 28])],
                              [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 2])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model


def _kennen_detector(ws: Workspace) -> tuple[Path, str]:
    """The detector to time: trained briefly by :func:`mlcapsule.defense_training.train_kennen_detector`
    when PyTorch is there, else the same architecture built by hand, untrained."""
    import onnx

    path = ws.root / "kennen-detector.onnx"
    rng = np.random.default_rng(3)
    n = 128 if ws.quick else 512
    try:
        from ..defense_training import train_kennen_detector

        benign = rng.random((n, 1, 28, 28), dtype=np.float32)
        malicious = np.clip(rng.normal(0.5, 0.5, (n, 1, 28, 28)), 0, 1).astype(np.float32)
        model = train_kennen_detector(benign, malicious, epochs=1, seed=0)
        how = (f"`defense_training.train_kennen_detector`, trained for 1 epoch on {n} + {n} synthetic 1×28×28 "
               "inputs (weights that detect nothing in particular: the cost does not depend on them)")
    except Exception as e:  # noqa: BLE001 - no torch, or the trainer is not there: the architecture by hand
        model = _kennen_by_hand()
        how = (f"the paper's architecture built with onnx.helper, untrained ({type(e).__name__} from the trainer: "
               f"{str(e)[:120]})")
    onnx.save(model, str(path))
    return path, how


# -- end to end -----------------------------------------------------------------------------------
def _query_pool(info: dict[str, Any], n: int, rng: np.random.Generator) -> np.ndarray:
    """Digits inputs with a little noise, so a long stream does not repeat a query exactly."""
    base = np.concatenate([info["x_test"], info["x_train"]])
    rows = base[rng.integers(0, len(base), n)] + rng.normal(0, 0.5, (n, base.shape[1]))
    return np.ascontiguousarray(np.clip(rows, 0, 16), dtype=np.float32)


def _lease_cost(samples: list[float], lease: int) -> dict[str, Any]:
    """The query in each lease that charges it: the offset within the lease whose median is the
    highest; its median (p99) minus the other offsets' median (p99), in µs."""
    a = np.asarray(samples[: len(samples) // lease * lease]).reshape(-1, lease)
    offset = int(np.argmax(np.median(a, axis=0)))
    charged = a[:, offset]
    others = np.delete(a, offset, axis=1).ravel()
    return {"offset": offset, "leases": int(a.shape[0]), "charging_us": stats(list(charged), unit=1e6),
            "other_us": stats(list(others), unit=1e6),
            "extra_median_us": float(np.median(charged) - np.median(others)) * 1e6}


def _licensed(ws: Workspace, packed: dict[str, dict[str, Any]], pool: np.ndarray) -> dict[str, Any]:
    """Licensed mode: per-query times over whole leases, defended and undefended, interleaved by
    lease; the query that charges a lease writes the sealed state (with the defense state)."""
    from ..client import open_capsule as open_
    from ._common import workspace_trust
    from .suites import _provision

    lease = 50 if ws.quick else 100
    leases = 6 if ws.quick else 30
    caps = {}
    try:
        for k, p in packed.items():
            _provision(p, ws, f"digits-{k}-licensed", lease_size=lease)
            caps[k] = open_(p["capsule"], trust=workspace_trust(ws), state_dir=ws.state(f"digits-{k}-licensed"),
                            platform_dir=ws.root / "platform", threads=1)
        samples: dict[str, list[float]] = {k: [] for k in caps}
        i = 0
        for r in range(leases):
            for k in (list(caps) if r % 2 == 0 else list(caps)[::-1]):
                cap = caps[k]
                for j in range(lease):
                    x = pool[(i + j) % len(pool)][None, :]
                    t0 = time.perf_counter()
                    cap.predict(x)
                    samples[k].append(time.perf_counter() - t0)
            i += lease
        st = caps["defended"].status()
        state = (st.get("defenses") or {}).get("state") or {}
        stored = int(state.get("prada_stored", 0))
    finally:
        for c in caps.values():
            c.close()
    out: dict[str, Any] = {"lease": lease, "leases": leases, "prada_stored_at_end": stored,
                           # DefenseState.to_bytes: (4 * 64 + 20) bytes per stored query, the window, the header
                           "state_bytes_at_end_approx": stored * (4 * pool.shape[1] + 20) + 5000 * 12}
    for k, v in samples.items():
        out[k] = _lease_cost(v, lease)
    out["persist_extra_us"] = out["defended"]["extra_median_us"] - out["undefended"]["extra_median_us"]
    return out


def suite_defenses(ws: Workspace) -> dict[str, Any]:
    q = ws.quick
    ws.log("  digits: train and pack, with and without defenses")
    model, info = models.digits_classifier()
    rng = np.random.default_rng(11)
    packed = {"undefended": ws.pack(model, "digits-plain"),
              "defended": ws.pack(model, "digits-defended", defenses=PIPELINE_POLICY, defense_data=info["x_train"])}
    pool = _query_pool(info, 2000 if q else 20000, rng)
    kennen_path, kennen_how = _kennen_detector(ws)
    # The in-process pipeline figure uses the model's own posteriors, as the worker does.
    import onnxruntime as ort

    sess = ort.InferenceSession(str(packed["undefended"]["plain"]), providers=["CPUExecutionProvider"])
    posteriors = sess.run(None, {"input": pool[:2000]})[0]
    digits_path = ws.root / "digits-queries.npz"
    np.savez(digits_path, x_train=info["x_train"], queries=pool[:2000], posteriors=posteriors)
    cfg = {"seed": 5, "prada_stored": 300 if q else 3000, "prada_rounds": 3 if q else 20,
           "prada_per_round": 20 if q else 50, "mi_single": 2000 if q else 20000, "mi_batched": 200 if q else 5000,
           "state_stored": 800 if q else 6500, "state_runs": 4 if q else 30, "kennen_path": str(kennen_path),
           "kennen_runs": 300 if q else 5000, "digits_path": str(digits_path), "apply_fill": 300 if q else 1000,
           "apply_runs": 300 if q else 3000}

    # The undefended capsule first: the baseline every figure of this run stands beside.
    ws.log("  end to end: dev-key capsules with and without defenses, interleaved")
    dev = {k: open_capsule(p, ws, f"digits-{k}-dev", threads=1) for k, p in packed.items()}
    try:
        idx = {k: [0] for k in dev}

        def call(k: str) -> Callable[[], Any]:
            cap, pos = dev[k], idx[k]

            def f() -> Any:
                j = pos[0] % len(pool)
                pos[0] += 1
                return cap.predict(pool[j:j + 1])
            return f

        y_plain = dev["undefended"].predict(pool[:1])
        y_def = dev["defended"].predict(pool[:1])
        rounds, per_round = (4, 100) if q else (20, 250)
        samples = interleaved({k: call(k) for k in dev}, rounds=rounds, per_round=per_round, warmup=50, settle=0)
        st = dev["defended"].status()
    finally:
        for c in dev.values():
            c.close()
    e2e = {k: stats(v, unit=1e6) for k, v in samples.items()}
    added = {s: e2e["defended"][s] - e2e["undefended"][s] for s in ("median", "mean", "p99", "min")}
    state = ((st.get("defenses") or {}).get("state")) or {}
    end_to_end = {"us": e2e, "added_us": added, "rounds": rounds, "per_round": per_round,
                  "policy": PIPELINE_POLICY, "described": (st.get("defenses") or {}).get("policy"),
                  "prada_stored_at_end": state.get("prada_stored"), "alarms": state.get("alarms"),
                  "answer_sum": float(np.sum(y_def)), "answer_top_k_nonzero": int(np.count_nonzero(y_def)),
                  "argmax_same": bool(np.argmax(y_def) == np.argmax(y_plain))}

    ws.log("  each defense alone, in a child process with the worker's thread settings (BLAS on 1 thread)")
    micro = _run_child(cfg)

    licensed: dict[str, Any] | None
    try:
        ws.log("  licensed: the persist cost per lease")
        licensed = _licensed(ws, packed, pool)
    except Exception as e:  # noqa: BLE001 - optional figure: say why it is missing
        licensed = {"error": f"{type(e).__name__}: {e}"}

    base = e2e["undefended"]["median"]
    return {"suite": "defenses", "title": "Defenses (issue 12): cost per query, beside the undefended capsule",
            "baseline_us": e2e["undefended"], "baseline_median_us": base, "end_to_end": end_to_end,
            "thread_env": micro["thread_env"], "prada": micro["prada"], "mi_noise": micro["mi_noise"],
            "state": micro["state"], "kennen": micro["kennen"] | {"detector": kennen_how}, "apply": micro["apply"],
            "other_modules_loaded": micro["other_modules_loaded"], "licensed": licensed, "goals_us": GOALS_US,
            "paper": paper.DEFENSES, "config": cfg | {"kennen_path": kennen_path.name, "digits_path": digits_path.name},
            "load_average_after": load_average()}
