"""The benchmark suites. Each returns a JSON-ready dict; :mod:`.report` renders them."""

from __future__ import annotations

import math
import os
import re
import time
import uuid
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from ..demo import models
from ..enclave.errors import UsageError
from . import paper
from ._common import (
    MiB,
    Workspace,
    capsule_cold_start,
    enclave_memory,
    interleaved,
    load_average,
    max_rel_diff,
    open_capsule,
    plain_cold_start,
    plain_session,
    ratio,
    stats,
)

RNG = np.random.default_rng(1234)


def _counts(fns: dict[str, Callable[[], Any]], *, round_seconds: float, max_per_round: int = 200) -> int:
    """Calls per round so that a round of the slowest function lasts about ``round_seconds``."""
    slowest = 0.0
    for f in fns.values():
        f()
        t0 = time.perf_counter()
        f()
        slowest = max(slowest, time.perf_counter() - t0)
    return max(1, min(max_per_round, int(round_seconds / max(slowest, 1e-6))))


def _open_streaming(packed: dict[str, Any], ws: Workspace, tag: str, target_mb: float) -> tuple[Any, float]:
    """A streaming capsule at ``target_mb`` or, if that is too small, at the smallest limit the
    enclave accepts (it says how much it needs)."""
    limit = max(8.0, float(math.ceil(target_mb)))
    try:
        return open_capsule(packed, ws, tag, memory_limit_mb=limit), limit
    except UsageError as e:
        m = re.search(r"at least (\d+) MB", e.message)
        if not m:
            raise
        limit = float(m.group(1))
        return open_capsule(packed, ws, tag, memory_limit_mb=limit), limit


def _layer_rows(ws: Workspace, kind: str, configs: list[Any], build: Callable[[Any], Any],
                shape: Callable[[Any], tuple[int, ...]], weight_bytes: Callable[[Any], int],
                paper_of: Callable[[Any], Any], round_seconds: float, rounds: int) -> list[dict[str, Any]]:
    rows = []
    for cfg in configs:
        name = f"{kind}-{'x'.join(map(str, cfg)) if isinstance(cfg, tuple) else cfg}"
        ws.log(f"  {name}: pack")
        packed = ws.pack(build(cfg), name)
        x = RNG.standard_normal(shape(cfg)).astype(np.float32)
        wbytes = weight_bytes(cfg)
        plain = plain_session(packed["plain"], ws.threads)
        res = open_capsule(packed, ws, name + "-resident")
        stream, limit = _open_streaming(packed, ws, name + "-streaming", wbytes / MiB / 2)
        try:
            ref = plain.run(None, {"input": x})[0]
            diffs = {"resident": max_rel_diff(ref, res.predict(x)), "streaming": max_rel_diff(ref, stream.predict(x))}
            fns: dict[str, Callable[[], Any]] = {"plain": partial(plain.run, None, {"input": x}),
                                                 "resident": partial(res.predict, x),
                                                 "streaming": partial(stream.predict, x)}
            per_round = _counts(fns, round_seconds=round_seconds)
            ws.log(f"  {name}: timing {rounds} rounds x {per_round}")
            samples = interleaved(fns, rounds=rounds, per_round=per_round)
            st = stream.status()
        finally:
            res.close()
            stream.close()
        s = {k: stats(v) for k, v in samples.items()}
        model = st.get("model") or {}
        rows.append({
            "config": list(cfg) if isinstance(cfg, tuple) else cfg, "weights_mb": wbytes / MiB,
            "runtime": packed["runtime"], "plain_ms": s["plain"], "resident_ms": s["resident"],
            "streaming_ms": s["streaming"], "resident_ratio": ratio(s["resident"], s["plain"]),
            "streaming_ratio": ratio(s["streaming"], s["plain"]), "streaming_limit_mb": limit,
            "limit_below_weights": limit < wbytes / MiB,
            "streaming_memory": enclave_memory(st), "streaming_plan": {
                "segments": model.get("segments"), "split_nodes": model.get("split_nodes"),
                "scratch_mb": (model.get("scratch_bytes") or 0) / MiB},
            "max_rel_diff": diffs, "paper_ms": paper_of(cfg),
        })
    return rows


# -- Table 1 ----------------------------------------------------------------------------------
def suite_dense(ws: Workspace) -> dict[str, Any]:
    sizes = [256, 1024] if ws.quick else [256, 512, 1024, 2048, 4096]
    rows = _layer_rows(
        ws, "dense", sizes, lambda n: models.dense_layer(n), lambda n: (1, n), lambda n: n * n * 4 + n * 4,
        lambda n: {"o3": paper.TABLE1_O3[n], "no_o3": paper.TABLE1_NO_O3[n]},
        round_seconds=0.05, rounds=3 if ws.quick else 10)
    return {"suite": "dense", "title": "Table 1: dense layers, batch 1", "rows": rows,
            "notes": "Each capsule call is a full ECALL (IPC to the enclave process), so small layers are "
                     "dominated by the fixed cost per query; see the fixed-cost suite."}


# -- Table 2 ----------------------------------------------------------------------------------
def _conv_build(cfg: tuple[int, int], *, dw: bool) -> Any:
    return models.conv_layer(cfg[0], cfg[1], depthwise_separable=dw)


def _conv_weight_bytes(cfg: tuple[int, int], *, dw: bool) -> int:
    return ((cfg[0] * 9 + cfg[0] + cfg[0] * cfg[0] + cfg[0]) if dw else (cfg[0] * cfg[0] * 9 + cfg[0])) * 4


def _paper_ms(table: dict[Any, Any], cfg: Any) -> dict[str, Any]:
    return {"ms": table[cfg]}


def suite_conv(ws: Workspace) -> dict[str, Any]:
    configs = [(256, 56), (512, 14)] if ws.quick else [(64, 224), (128, 112), (256, 56), (512, 28), (512, 14)]
    out: dict[str, Any] = {
        "suite": "conv", "title": "Table 2: 3x3 convolution and depthwise-separable convolution, batch 1",
        "notes": "Input and output are C×H×W float32 (12.25 MB each at 64×224×224). A capsule call copies each "
                 "large tensor twice on its way (host → shared memory → enclave, and back): the enclave never "
                 "computes on memory the host can change. Those copies, not the convolution, are most of the "
                 "capsule's extra time on the large layers; plain ORT copies nothing."}
    for kind, dw, table in (("conv", False, paper.TABLE2_CONV), ("dwsep", True, paper.TABLE2_DEPTHWISE_SEPARABLE)):
        out[kind] = _layer_rows(
            ws, kind, configs, partial(_conv_build, dw=dw), lambda cfg: (1, cfg[0], cfg[1], cfg[1]),
            partial(_conv_weight_bytes, dw=dw), partial(_paper_ms, table), round_seconds=0.1,
            rounds=2 if ws.quick else 8)
    return out


# -- whole networks ---------------------------------------------------------------------------
def suite_networks(ws: Workspace) -> dict[str, Any]:
    q = ws.quick
    nets = [
        # name, model, image size, (rounds, calls per round, untimed calls first) in steady state
        # and streaming: a round of a fast model is long enough for the other process's ORT
        # threads, which spin for a while after a run, to have stopped before timing starts
        ("VGG-16", lambda: models.vgg16(image_size=64 if q else 224), 64 if q else 224,
         (3, 1, 1) if q else (16, 2, 1), (2, 1, 1) if q else (8, 2, 1)),
        ("MobileNetV2", lambda: models.mobilenet_v2(image_size=96 if q else 224), 96 if q else 224,
         (5, 4, 2) if q else (40, 12, 4), (3, 4, 2) if q else (10, 8, 3)),
    ]
    limits = [64.0] if q else [256.0, 128.0, 64.0]
    colds = 1 if q else 5
    rows = []
    for name, build, size, steady_n, stream_n in nets:
        tag = name.lower().replace("-", "")
        ws.log(f"  {name}: build and pack ({size}x{size})")
        packed = ws.pack(build(), tag)
        shape = [1, 3, size, size]
        x = RNG.standard_normal(shape).astype(np.float32)
        row: dict[str, Any] = {"network": name, "image_size": size, "runtime": packed["runtime"],
                               "runtime_trials": packed["trials"], "pack_seconds": packed["pack_seconds"],
                               "weights_mb": packed["manifest"].segment("weights").plain_length / MiB}
        # Cold start: each in a fresh process (plain) or a fresh enclave worker (capsule), alternating.
        plain_colds, cap_colds = [], []
        for i in range(colds):
            ws.log(f"  {name}: cold start {i + 1}/{colds}")
            plain_colds.append(plain_cold_start(packed["plain"], ws.threads, shape))
            cap_colds.append(capsule_cold_start(packed, ws, f"{tag}-cold{i}", x))
        row["cold_plain"] = plain_colds
        row["cold_capsule"] = cap_colds
        row["cold_plain_s"] = stats([c["seconds"] for c in plain_colds], unit=1)
        row["cold_capsule_s"] = stats([c["seconds"] for c in cap_colds], unit=1)
        row["cold_ratio"] = ratio(row["cold_capsule_s"], row["cold_plain_s"])
        # Steady state.
        ws.log(f"  {name}: steady state")
        plain = plain_session(packed["plain"], ws.threads)
        res = open_capsule(packed, ws, f"{tag}-resident")
        try:
            ref = plain.run(None, {"input": x})[0]
            resident_out = res.predict(x)
            row["resident_max_rel_diff"] = max_rel_diff(ref, resident_out)
            host0, encl0 = dict(res._enclave.profile), res.status()["ecall_profile"]
            samples = interleaved({"plain": partial(plain.run, None, {"input": x}),
                                   "resident": partial(res.predict, x)},
                                  rounds=steady_n[0], per_round=steady_n[1], settle=steady_n[2])
            row["resident_profile_ms"] = _call_profile(host0, dict(res._enclave.profile), encl0,
                                                       res.status()["ecall_profile"])
            row["plain_ms"] = stats(samples["plain"])
            row["resident_ms"] = stats(samples["resident"])
            row["resident_ratio"] = ratio(row["resident_ms"], row["plain_ms"])
            row["resident_memory"] = enclave_memory(res.status())
            plain = None  # its memory back before the streaming runs
            # Streaming, against resident in the same rounds.
            row["streaming"] = []
            for limit in limits:
                ws.log(f"  {name}: streaming at {limit:g} MB")
                row["streaming"].append(_stream_row(packed, ws, f"{tag}-s{int(limit)}", limit, x, res, resident_out,
                                                    stream_n))
        finally:
            res.close()
        rows.append(row)
    return {"suite": "networks", "title": "Whole networks, 224x224, random weights, batch 1" if not q
            else "Whole networks (quick: small images), random weights, batch 1", "rows": rows}


def _call_profile(host0: dict[str, float], host1: dict[str, float], encl0: dict[str, float],
                  encl1: dict[str, float]) -> dict[str, float]:
    """Where a capsule call's time went between two snapshots of the host's and the enclave's
    profile counters: mean ms per call of each step (timed and untimed calls alike)."""
    hn = max(1, host1["calls"] - host0["calls"])
    en = max(1, encl1["calls"] - encl0["calls"])
    out = {f"host_{k}": 1e3 * (host1[k] - host0[k]) / hn for k in ("encode", "wait", "decode")}
    out |= {f"enclave_{k}": 1e3 * (encl1[k] - encl0[k]) / en for k in ("decode", "infer", "encode", "write")}
    out["calls"] = hn
    return out


def _stream_row(packed: dict[str, Any], ws: Workspace, tag: str, limit: float, x: np.ndarray, res: Any,
                resident_out: np.ndarray, n: tuple[int, int, int]) -> dict[str, Any]:
    out: dict[str, Any] = {"limit_mb": limit}
    t0 = time.perf_counter()
    try:
        cap = open_capsule(packed, ws, tag, memory_limit_mb=limit)
    except UsageError as e:
        out["error"] = e.message
        return out
    try:
        t1 = time.perf_counter()
        y = cap.predict(x)
        t2 = time.perf_counter()
        out.update({"open_seconds": t1 - t0, "first_run_seconds": t2 - t1,
                    "max_rel_diff_vs_resident": max_rel_diff(resident_out, y)})
        before = cap.status()["model"]
        samples = interleaved({"resident": lambda: res.predict(x), "streaming": lambda: cap.predict(x)},
                              rounds=n[0], per_round=n[1], warmup=0, settle=n[2])
        st = cap.status()
    finally:
        cap.close()
    # An encrypted graph's status gives aggregates only (issue 9, item 4): per-step figures and
    # the plan are there only for capsules packed with a public architecture.
    model = st["model"]
    z = lambda d, k: d.get(k) or 0  # noqa: E731
    runs = max(1, z(model, "runs") - z(before, "runs"))
    out.update({
        "streaming_ms": stats(samples["streaming"]), "resident_ms": stats(samples["resident"]),
        "memory": enclave_memory(st),
        "architecture": model.get("architecture", "public"),
        "per_query": {
            "decrypt_ms": 1e3 * (z(model, "decrypt_seconds") - z(before, "decrypt_seconds")) / runs,
            "run_ms": 1e3 * (z(model, "run_seconds") - z(before, "run_seconds")) / runs,
            "decrypted_mb": (z(model, "weights_decrypted_bytes") - z(before, "weights_decrypted_bytes")) / runs / MiB,
            "steps": [{"kind": s1["kind"], "nodes": s1["nodes"], "weights_mb": s1["weight_bytes"] / MiB,
                       "decrypt_ms": 1e3 * (s1["decrypt_seconds"] - s0["decrypt_seconds"]) / runs,
                       "ms": 1e3 * (s1["seconds"] - s0["seconds"]) / runs}
                      for s0, s1 in zip(before.get("steps", []), model.get("steps", []), strict=False)]},
        "plan": {k: model.get(k) for k in ("segments", "split_nodes", "max_batch")}
        | {"scratch_mb": z(model, "scratch_bytes") / MiB,
           "activation_estimate_mb": z(model, "activation_estimate_bytes") / MiB,
           "reserve_mb": z(model, "reserve_bytes") / MiB, "pinned_mb": z(model, "pinned_bytes") / MiB},
    })
    out["ratio_vs_resident"] = ratio(out["streaming_ms"], out["resident_ms"])
    out["within_limit"] = out["memory"]["peak_growth_mb"] <= limit
    return out


# -- fixed cost per query ---------------------------------------------------------------------
def _provision(packed: dict[str, Any], ws: Workspace, tag: str, *, lease_size: int) -> None:
    """Set a capsule up with an in-memory provider (no server): the setup ECALLs, a license
    signed with the provider key, the HPKE payload."""
    import datetime as dt

    from ..enclave._util import b64d, b64e
    from ..enclave.crypto.keys import ContentKey, load_provider_key
    from ..enclave.messages.license import License
    from ..enclave.messages.setup import seal_payload
    from ..host import EnclaveProcess

    ckey = ContentKey.load(packed["key"])
    with EnclaveProcess(packed["capsule"], state_dir=ws.state(tag), platform_dir=ws.root / "platform") as e:
        nonce = os.urandom(32)
        begin = e.call("setup_begin", {"nonce": b64e(nonce)})
        lic = License(license_id=str(uuid.uuid4()), capsule_id=ckey.capsule_id, version=ckey.version,
                      device_id=str(uuid.uuid4()), account="bench", receipt_key=b64d(begin["receipt_pub"]),
                      budget=10**9, expires=None, issued=dt.datetime.now(dt.UTC), lease_size=lease_size)
        envelope = lic.sign(load_provider_key(ws.provider_key))
        payload = seal_payload(b64d(begin["hpke_pub"]), nonce, ckey.key, envelope)
        e.call("setup_finish", {"payload": b64e(payload)})


def suite_fixed(ws: Workspace) -> dict[str, Any]:
    from ..client import open_capsule as open_

    ws.log("  digits: train and pack")
    model, info = models.digits_classifier()
    packed = ws.pack(model, "digits")
    lease = 1000
    _provision(packed, ws, "digits-licensed", lease_size=lease)
    x = np.ascontiguousarray(info["x_test"][:1])
    plain = plain_session(packed["plain"], 1)
    dev = open_capsule(packed, ws, "digits-dev", threads=1)
    from ._common import workspace_trust

    lic = open_(packed["capsule"], trust=workspace_trust(ws), state_dir=ws.state("digits-licensed"),
                platform_dir=ws.root / "platform", threads=1)
    try:
        assert lic.load_info and lic.load_info.get("license") == "license"
        ref = plain.run(None, {"input": x})[0]
        diffs = {"dev": max_rel_diff(ref, dev.predict(x)), "licensed": max_rel_diff(ref, lic.predict(x))}
        echo = _Echo(len(b"".join(bytes(part) for part in _request_frame(x))))
        fns = {
            "plain": lambda: plain.run(None, {"input": x}),
            "capsule": lambda: dev.predict(x),
            "capsule_licensed": lambda: lic.predict(x),
            # The floor: the same bytes there and back between two Python processes, nothing else.
            "bare_round_trip": echo.round_trip,
        }
        rounds, per_round = (4, 100) if ws.quick else (20, 250)
        ws.log(f"  digits: timing {rounds} rounds x {per_round}")
        try:
            samples = interleaved(fns, rounds=rounds, per_round=per_round, warmup=50, settle=0)
        finally:
            echo.close()
        license_status = lic.status().get("license_status")
    finally:
        dev.close()
        lic.close()
    from . import wakeups

    ws.log("  wake-up mechanisms: pipe, seqpacket, eventfd, spin")
    wake = wakeups.run(*((3, 200) if ws.quick else (10, 500)))
    s = {k: stats(v, unit=1e6) for k, v in samples.items()}
    fixed = {k: {"median_us": s[k]["median"] - s["plain"]["median"], "mean_us": s[k]["mean"] - s["plain"]["mean"],
                 "p99_us": s[k]["p99"] - s["plain"]["p99"]}
             for k in ("capsule", "capsule_licensed")}
    bare = s["bare_round_trip"]
    goal = {k: {"ratio_median": fixed[k]["median_us"] / bare["median"],
                "ratio_mean": fixed[k]["mean_us"] / bare["mean"]}
            for k in fixed}
    return {"suite": "fixed", "title": "Fixed cost per query: digits MLP (64-64-10), batch 1, 1 thread",
            "us": s, "fixed_cost": fixed, "vs_bare_round_trip": goal, "lease_size": lease, "max_rel_diff": diffs,
            "license_status": license_status, "breakdown_us": _breakdown(x, ref), "wakeups_us": wake,
            "load_average_after": load_average()}


def _request_frame(x: np.ndarray) -> list[Any]:
    from ..enclave import protocol as P

    return P.encode_tensors(P.TENSOR_REQUEST, [x])


class _Echo:
    """A second Python process that sends back whatever it reads: ``round_trip`` writes
    ``size`` bytes to it and reads them back, blocking like any two processes would."""

    def __init__(self, size: int) -> None:
        import subprocess
        import sys

        code = (f"import os\nn={int(size)}\nwhile True:\n    b=os.read(0,n)\n    if not b: break\n"
                "    while len(b)<n: b+=os.read(0,n-len(b))\n    os.write(1,b)\n")
        self.proc = subprocess.Popen([sys.executable, "-I", "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.w, self.r, self.msg, self.size = self.proc.stdin.fileno(), self.proc.stdout.fileno(), b"x" * size, size

    def round_trip(self) -> None:
        os.write(self.w, self.msg)
        got = os.read(self.r, self.size)
        while len(got) < self.size:
            got += os.read(self.r, self.size - len(got))

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _breakdown(x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Where the fixed cost goes: each step of the ECALL path timed alone, in this process
    (medians in µs), and a pipe round trip between two processes. The enclave worker itself
    cannot be profiled from outside (it is non-dumpable: no ptrace, so no py-spy), so this
    reproduces its steps."""
    import subprocess
    import sys

    from ..enclave import protocol as P
    from ..enclave.core import check_inputs
    from ..enclave.format.manifest import TensorSpec

    def med(f: Callable[[], Any], n: int = 20000) -> float:
        for _ in range(500):
            f()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            f()
            ts.append(time.perf_counter_ns() - t0)
        return float(np.median(ts)) / 1e3

    req = P.encode_tensors(P.TENSOR_REQUEST, [x])
    req_body = bytearray(b"".join(bytes(p) for p in req)[4:])
    rep = P.encode_tensors(P.TENSOR_REPLY, [y])
    rep_body = bytearray(b"".join(bytes(p) for p in rep)[4:])
    specs = (TensorSpec("input", "float32", ("N", 64)),)
    out = {
        "host_encode_request": med(lambda: P.encode_tensors(P.TENSOR_REQUEST,
                                                            [np.ascontiguousarray(x, dtype="float32")])),
        "enclave_decode_request": med(lambda: P.decode_tensors(req_body)),
        "enclave_check_inputs": med(lambda: check_inputs(specs, {"input": x})),
        "enclave_encode_reply": med(lambda: P.encode_tensors(P.TENSOR_REPLY, [y])),
        "host_decode_reply": med(lambda: P.decode_tensors(rep_body, copy=True)),
    }
    # A pipe round trip of the same two frames between two Python processes (no model).
    echo = ("import os,sys\nfrom mlcapsule.enclave import protocol as P\nr=P.FrameReader(0)\n"
            "while True:\n    b=r.read()\n    P.write_frame(1,[len(b).to_bytes(4,'little'),bytes(b)])\n")
    p = subprocess.Popen([sys.executable, "-c", echo], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdin is not None and p.stdout is not None
    reader = P.FrameReader(p.stdout.fileno())
    wfd = p.stdin.fileno()

    def rtt() -> None:
        P.write_frame(wfd, req)
        reader.read()

    try:
        out["pipe_round_trip"] = med(rtt, 5000)
    finally:
        p.kill()
        p.wait()
    return out


# -- tpm backend: NV counter wear ---------------------------------------------------------------
def suite_tpm(ws: Workspace) -> dict[str, Any]:
    """NV counter increments per query on the tpm backend (a private swtpm), at lease sizes N:
    the budget's rollback protection must cost at most 1/N increments per query (plus one per
    restart), because TPM NV memory wears out. Needs swtpm and the repository's ``tests/``
    helpers (which manufacture a TPM with EK certificates); skipped, and says so, without them."""
    import shutil
    import sys
    from pathlib import Path

    from ..enclave._util import b64e

    title = "TPM backend: NV counter increments per query (swtpm)"
    tests = Path(__file__).resolve().parents[3] / "tests"
    missing = [t for t in ("swtpm", "swtpm_setup", "swtpm_localca") if not shutil.which(t)]
    try:
        import tpm2_pytss  # noqa: F401
    except ImportError:
        missing.append("tpm2-pytss (pip install 'mlcapsule[tpm]')")
    if not (tests / "swtpm.py").exists():
        missing.append("the repository's tests/ folder (run from a checkout)")
    if missing:
        return {"suite": "tpm", "title": title, "skipped": "needs " + ", ".join(missing)}
    sys.path.insert(0, str(tests))
    try:
        from provider_sim import Provider  # type: ignore[import-not-found]
        from swtpm import Swtpm, make_ca_config, manufacture  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(tests))
    from ..attestation.tpm import credential_challenge
    from ..host import EnclaveProcess

    ws.log("  tpm: manufacture a swtpm")
    tpm_state = manufacture(ws.root / "tpm-state", make_ca_config(ws.root / "tpm-ca"))
    provider = Provider(ws.root / "tpm-provider")
    x = np.ones((1, 8), np.float32)
    plan = [(1, 2, 25), (10, 2, 100), (100, 2, 500)] if not ws.quick else [(1, 2, 5), (10, 2, 20)]
    rows = []
    with Swtpm(tpm_state) as tpm:
        for lease, restarts, per_run in plan:
            cap, ckey = provider.pack(name=f"tiny-lease{lease}")
            state = ws.state(f"tpm-lease{lease}")
            with EnclaveProcess(cap, state_dir=state, backend="tpm", tcti=tpm.tcti) as e:
                nonce = os.urandom(32)
                begin = e.call("setup_begin", {"nonce": b64e(nonce)})
                payload, _ = provider.answer(begin, nonce, ckey, budget=None, lease_size=lease)
                answer = credential_challenge(begin["evidence"], payload)
                e.call("setup_finish", {"payload": answer["payload"], "credential": answer["credential"]})
            name = f"c-{ckey.capsule_id}-v{ckey.version}"
            before = tpm.counter_value(name) or 0
            times: list[float] = []
            for _ in range(restarts):
                with EnclaveProcess(cap, state_dir=state, backend="tpm", tcti=tpm.tcti) as e:
                    e.call("load", {"dev_key": None})
                    for _ in range(per_run):
                        t0 = time.perf_counter()
                        e.infer([x])
                        times.append(time.perf_counter() - t0)
            increments = (tpm.counter_value(name) or 0) - before
            queries = restarts * per_run
            ws.log(f"  tpm: lease {lease}: {increments} increments for {queries} queries")
            rows.append({"lease": lease, "restarts": restarts, "queries": queries, "increments": increments,
                         "per_query": increments / queries, "bound": 1 / lease + restarts / queries,
                         "within_bound": increments / queries <= 1 / lease + restarts / queries + 1e-12,
                         "query_us": stats(times, unit=1e6)})
    return {"suite": "tpm", "title": title, "rows": rows,
            "notes": "Each run of a restart: a fresh enclave worker loads the sealed state, then answers queries one "
                     "at a time; the NV counter is read through the TPM before and after all runs."}


def suite_defenses(ws: Workspace) -> dict[str, Any]:
    """The defenses' cost per query (issue 12): see :mod:`.defenses`."""
    from .defenses import suite_defenses as run

    return run(ws)


def suite_server(ws: Workspace) -> dict[str, Any]:
    """The provider server under load (issue 15): see :mod:`.server`."""
    from .server import suite_server as run

    return run(ws)


def suite_kws(ws: Workspace) -> dict[str, Any]:
    """Keyword spotting (issue 16): see :mod:`mlcapsule.kws.bench`."""
    from ..kws.bench import suite

    return suite(ws)


SUITES: dict[str, Callable[[Workspace], dict[str, Any]]] = {
    "dense": suite_dense, "conv": suite_conv, "networks": suite_networks, "fixed": suite_fixed, "tpm": suite_tpm,
    "defenses": suite_defenses, "server": suite_server, "kws": suite_kws}
