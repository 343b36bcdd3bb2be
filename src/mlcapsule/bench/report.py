"""Render the benchmark results (``benchmarks/results/*.json``) as ``BENCHMARKS.md``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import paper

ORDER = ("dense", "conv", "networks", "fixed", "tpm", "defenses", "server", "kws")


def load_results(folder: Path) -> dict[str, dict[str, Any]]:
    out = {}
    for name in ORDER:
        p = folder / f"{name}.json"
        if p.exists():
            out[name] = json.loads(p.read_text())
    return out


def _f(v: float | None, digits: int = 2) -> str:
    if v is None:
        return "–"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.{digits}f}"


def _mmm(s: dict[str, float] | None, digits: int = 2) -> str:
    if not s or not s.get("n"):
        return "–"
    return f"{_f(s['min'], digits)} / **{_f(s['median'], digits)}** / {_f(s['max'], digits)}"


def _x(r: float | None) -> str:
    return "–" if r is None else f"{r:.2f}×"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


# -- goals ------------------------------------------------------------------------------------
def goals(results: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each goal of the issue with its measured figure and whether it is met."""
    out: list[dict[str, Any]] = []
    nets = {r["network"]: r for r in results.get("networks", {}).get("rows", [])}
    for name in ("VGG-16", "MobileNetV2"):
        r = nets.get(name)
        if r:
            out.append({"id": f"steady-{name}", "goal": f"{name}: steady state, capsule resident ÷ plain ORT",
                        "target": "≤ 1.05×", "measured": _x(r.get("resident_ratio")),
                        "met": r.get("resident_ratio") is not None and r["resident_ratio"] <= 1.05})
    r = nets.get("VGG-16")
    if r:
        out.append({"id": "cold-VGG-16", "goal": "VGG-16: cold start, capsule ÷ plain `InferenceSession(path)`",
                    "target": "≤ 1.0×", "measured": _x(r.get("cold_ratio")),
                    "met": r.get("cold_ratio") is not None and r["cold_ratio"] <= 1.0})
    fx = results.get("fixed")
    if fx:
        for k, label in (("capsule", "dev key"), ("capsule_licensed", "licensed: budget lease")):
            v = fx["fixed_cost"][k]["median_us"]
            out.append({"id": f"fixed-{k}", "goal": f"Fixed cost per query over plain ORT, median ({label})",
                        "target": "≤ 100 µs", "measured": f"{v:.0f} µs", "met": v <= 100})
    for name in ("VGG-16", "MobileNetV2"):
        r = nets.get(name)
        if not r:
            continue
        streams = r.get("streaming", [])
        ok = bool(streams) and all(s.get("within_limit") for s in streams)
        worst = ", ".join(f"{_f(s['memory']['peak_growth_mb'], 1)}/{s['limit_mb']:g}" if "memory" in s
                          else f"refused at {s['limit_mb']:g}" for s in streams)
        out.append({"id": f"stream-mem-{name}",
                    "goal": f"{name}: streaming peak memory within the limit (MB used/limit)",
                    "target": "every limit down to 64 MB", "measured": worst or "–", "met": ok})
    r = nets.get("VGG-16")
    if r:
        s128 = next((s for s in r.get("streaming", []) if s["limit_mb"] == 128 and "ratio_vs_resident" in s), None)
        if s128:
            out.append({"id": "stream-speed-VGG-16", "goal": "VGG-16: streaming at 128 MB ÷ resident",
                        "target": "≤ 2×", "measured": _x(s128["ratio_vs_resident"]),
                        "met": s128["ratio_vs_resident"] <= 2.0})
    tp = results.get("tpm")
    if tp and tp.get("rows"):
        out.append({"id": "tpm-nv-wear", "goal": "TPM: NV counter increments per query at lease N (issue 5)",
                    "target": "≤ 1/N + restarts/queries",
                    "measured": ", ".join(f"N={r['lease']}: {r['per_query']:.3f}" for r in tp["rows"]),
                    "met": all(r["within_bound"] for r in tp["rows"])})
    out += defense_goals(results.get("defenses"))
    return out


def _us(v: float | None) -> str:
    """A time given in µs, in µs below 1 ms, else in ms."""
    if v is None:
        return "–"
    if abs(v) < 1:
        return f"{v:.2f} µs"
    return f"{_f(v / 1e3)} ms" if abs(v) >= 1000 else f"{_f(v, 1)} µs"


def _prada_rows(res: dict[str, Any], dim: int) -> list[dict[str, Any]]:
    return [r for r in res.get("prada", []) if r["dim"] == dim]


def defense_goals(res: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The goals of issue 12's Speed section (medians)."""
    if not res:
        return []
    g = res["goals_us"]
    out = []
    for dim, key, label in ((784, "prada_mnist", "MNIST-size (784)"), (3072, "prada_cifar", "CIFAR-size (3,072)")):
        rows = _prada_rows(res, dim)
        if rows:
            stored = rows[0]["stored"]
            out.append({"id": f"def-{key}", "goal": f"PRADA per query, {stored:,} stored {label} queries (median; "
                        "10 classes / one class)", "target": f"≤ {_us(g[key])}",
                        "measured": " / ".join(_us(r["us"]["median"]) for r in rows),
                        "met": all(r["us"]["median"] <= g[key] for r in rows)})
    k = res.get("kennen", {}).get("batch1_us")
    if k:
        out.append({"id": "def-kennen", "goal": "kennen-io detector per query, 1×28×28, ORT on 1 thread (median)",
                    "target": f"≤ {_us(g['kennen'])}", "measured": _us(k["median"]), "met": k["median"] <= g["kennen"]})
    mi = next((r for r in res.get("mi_noise", []) if r["batch"] == 1), None)
    if mi:
        out.append({"id": "def-mi-noise", "goal": "Algorithm 1 per posterior, one posterior alone (median)",
                    "target": f"≤ {_us(g['mi_noise'])}", "measured": _us(mi["algorithm_us"]["median"]),
                    "met": mi["algorithm_us"]["median"] <= g["mi_noise"]})
    st = res.get("state")
    if st:
        out.append({"id": "def-state-load", "goal": f"Loading {st['mb']:.1f} MB of defense state (median)",
                    "target": f"≤ {_us(g['state_load'])}", "measured": f"{_f(st['load_ms']['median'])} ms",
                    "met": st["load_ms"]["median"] * 1e3 <= g["state_load"]})
    return out


# -- sections ---------------------------------------------------------------------------------
def _env(results: dict[str, dict[str, Any]]) -> list[str]:
    env = next(iter(results.values()))["environment"]
    loads = [f"{k}: start {r['environment'].get('load_average_at_start')}, end {r.get('load_average_after', '–')}"
             for k, r in results.items()]
    rows = [
        ["CPU", f"{env['cpu']}, {env['logical_cpus']} logical CPUs"],
        ["threads", f"{env['threads']} intra-op threads for plain ORT and the capsule alike "
                    "(the fixed-cost and defenses suites: 1)"],
        ["versions", f"Python {env['python']}, onnxruntime {env['onnxruntime']}, onnx {env['onnx']}, "
                     f"numpy {env['numpy']}, cryptography {env['cryptography']}, mlcapsule {env['mlcapsule']}, "
                     f"Linux {env['kernel']}"],
        ["enclave", f"`{env['backend']}` backend: a separate, hardened worker process "
                    "(seccomp, Landlock, non-dumpable)"],
        ["date", env["date"]],
        ["load average (1, 5, 15 min)", "; ".join(loads)],
    ]
    return _table(["", ""], rows)


def _layers(title: str, rows: list[dict[str, Any]], *, label: Any, paper_cols: Any) -> list[str]:
    out = [f"### {title}", ""]
    header = ["layer", "weights MB", "plain ORT ms (min / **med** / max)", "resident ms", "× plain",
              "streaming limit MB", "streaming ms", "× plain", "streaming peak MB", *paper_cols[0]]
    body = []
    for r in rows:
        mem = r.get("streaming_memory") or {}
        lim = f"{r['streaming_limit_mb']:g}" + ("" if r["limit_below_weights"] else " ¹")
        body.append([label(r), _f(r["weights_mb"]), _mmm(r["plain_ms"], 3), _mmm(r["resident_ms"], 3),
                     _x(r["resident_ratio"]), lim, _mmm(r["streaming_ms"], 3), _x(r["streaming_ratio"]),
                     _f(mem.get("peak_growth_mb"), 1),
                     *paper_cols[1](r)])
    return out + _table(header, body) + [""]


def _dense(res: dict[str, Any]) -> list[str]:
    def cols(r: dict[str, Any]) -> list[str]:
        o3, no = r["paper_ms"]["o3"], r["paper_ms"]["no_o3"]
        return [f"{o3[0]:.3f} → {o3[1]:.3f} ({o3[1] / o3[0]:.1f}×)",
                f"{no[0]:.3f} → {no[1]:.3f} ({no[1] / no[0]:.1f}×)"]

    out = [f"## {res['title']}", "", res.get("notes", ""), ""]
    out += _layers("Dense n×n (MatMul + Add)", res["rows"], label=lambda r: f"{r['config']}²",
                   paper_cols=(["paper -O3: Standard → MLCapsule ms", "paper without -O3"], cols))
    out += ["¹ The limit is not below the layer's weights: the streaming enclave needs a fixed few MB (sessions, "
            "a 2 MiB chunk buffer) before any weight, so for small layers the smallest limit it accepts is "
            "larger than the layer. It still decrypts the layer's weights for every query, as the paper's "
            "MLCapsule layer does.", ""]
    return out


def _conv(res: dict[str, Any]) -> list[str]:
    out = [f"## {res['title']}", "", res.get("notes", ""), ""]
    for kind, title in (("conv", "3×3 convolution, C → C channels, stride 1"),
                        ("dwsep", "Depthwise-separable: depthwise 3×3 then pointwise 1×1")):
        if kind not in res:
            continue
        out += _layers(title, res[kind], label=lambda r: f"{r['config'][0]}×{r['config'][1]}×{r['config'][1]}",
                       paper_cols=(["paper: Standard → MLCapsule ms"],
                                   lambda r: [f"{r['paper_ms']['ms'][0]} → {r['paper_ms']['ms'][1]} "
                                              f"({r['paper_ms']['ms'][1] / r['paper_ms']['ms'][0]:.2f}×)"]))
    out += ["¹ The smallest limit the enclave accepts: the input and output activations (and a fixed few MB) "
            "must fit beside the weights. Convolutions larger than the room left are split over output channels.", ""]
    return out


def _networks(res: dict[str, Any]) -> list[str]:
    rows = res["rows"]
    out = [f"## {res['title']}", ""]
    out += ["### Cold start", "",
            "Plain: a fresh Python process with onnxruntime imported; `InferenceSession(path)` and the first answer "
            "(the time with the imports in the last column). Capsule: from `open_capsule` (spawning and hardening the "
            "enclave worker, which imports numpy, onnx and onnxruntime itself) to the first answer.", ""]
    body = []
    for r in rows:
        c = r["cold_capsule"]
        med = sorted(c, key=lambda v: v["seconds"])[len(c) // 2]
        pl = sorted(r["cold_plain"], key=lambda v: v["seconds"])[len(r["cold_plain"]) // 2]
        body.append([r["network"], _mmm(r["cold_plain_s"]), _mmm(r["cold_capsule_s"]), _x(r["cold_ratio"]),
                     f"worker start {_f(med['open_seconds'] - (med['load_seconds'] or 0))}, "
                     f"decrypt {_f(med['decrypt_seconds'])}, "
                     f"session {_f(med['session_seconds'])}, first run {_f(med['first_run_seconds'])}",
                     f"session {_f(pl['session_seconds'])}, first run {_f(pl['first_run_seconds'])}; "
                     f"with imports {_f(pl['seconds_with_import'])}"])
    out += _table(["network", "plain s (min / **med** / max)", "capsule s", "× plain", "capsule, median run (s)",
                   "plain, median run (s)"], body) + [""]
    out += ["### Steady state", ""]
    body = []
    for r in rows:
        rt = r["runtime"]
        body.append([r["network"],
                     f"{rt['initializers']}, {rt['optimization']}, prepacking {'on' if rt['prepacking'] else 'off'}",
                     _mmm(r["plain_ms"], 1), _mmm(r["resident_ms"], 1), _x(r["resident_ratio"]),
                     _x(r["resident_ms"]["min"] / r["plain_ms"]["min"]), f"{r['resident_max_rel_diff']:.1e}"])
    out += _table(["network", "runtime chosen by the packer", "plain ORT ms", "capsule resident ms",
                   "× plain (medians)", "× plain (minima)", "max rel. diff of outputs"], body) + [""]
    out += ["The two processes share two CPUs with each other and with other jobs, so single runs scatter "
            "widely; the minima show the undisturbed cost, the medians what a run typically got.", ""]
    prof_rows = [r for r in rows if r.get("resident_profile_ms")]
    if prof_rows:
        out += ["Where a resident capsule call's time goes (mean ms per call over the steady-state runs, from the "
                "host's and the enclave's own counters; plain ORT's mean beside it):", ""]
        body = []
        for r in prof_rows:
            p = r["resident_profile_ms"]
            body.append([r["network"], _f(r["plain_ms"]["mean"]), _f(r["resident_ms"]["mean"]), _f(p["enclave_infer"]),
                         _f(p["host_encode"]), _f(p["enclave_decode"]), _f(p["enclave_encode"]), _f(p["enclave_write"]),
                         _f(p["host_decode"])])
        out += _table(["network", "plain ORT: run", "capsule: whole call", "enclave: budget + model run",
                       "host: encode + send (wakes the enclave)", "enclave: copy inputs in", "enclave: encode reply",
                       "enclave: send reply (wakes the host)", "host: copy outputs out"], body) + [""]
        out += ["A send that wakes the other process can return only after that process has run for a while (it "
                "may take the sender's CPU), so the two sends overlap the steps next to them: the columns do not "
                "add up to the whole call.", ""]
    out += ["The packer times every correct ONNX Runtime configuration on the model and records the fastest in "
            "the signed manifest (runtime trials: the fastest of a few runs at batch 1, ms, on the packing machine, "
            "during this benchmark):", ""]
    for r in rows:
        trials = ", ".join(f"{t['config']['initializers']}/{t['config']['optimization']}"
                           f"{'/prepack' if t['config']['prepacking'] else ''}: "
                           + (f"{1e3 * t['seconds']:.1f}" if "seconds" in t else t.get("status", "?"))
                           + (" ✔" if t.get("chosen") else "") for t in r.get("runtime_trials", []))
        out.append(f"* {r['network']}: {trials}")
    out += ["", "### Memory of the enclave process", "",
            "Peak = VmHWM of the process; growth is counted from its memory after imports (and, in streaming mode, "
            "ONNX Runtime's and ONNX's one-time initialization), before the capsule is loaded.", ""]
    body = []
    for r in rows:
        pl = sorted(r["cold_plain"], key=lambda v: v["seconds"])[len(r["cold_plain"]) // 2]
        m = r["resident_memory"]
        body.append([r["network"], _f(r["weights_mb"], 1), _f(pl["peak_growth_mb"], 0), _f(pl["rss_growth_mb"], 0),
                     _f(m["peak_growth_mb"], 0), _f(m["rss_growth_mb"], 0)])
    out += _table(["network", "weights MB", "plain: peak growth MB", "plain: after", "capsule resident: peak growth MB",
                   "capsule resident: after"], body) + [""]
    out += ["### Streaming mode", "",
            "`open_capsule(..., memory_limit_mb=L)` / `--memory-limit L`. Timed in the same rounds as the resident "
            "capsule. Per query: time spent decrypting, and in the segments' runs (decryption included).", ""]
    body = []
    for r in rows:
        for s in r.get("streaming", []):
            if "error" in s:
                body.append([r["network"], f"{s['limit_mb']:g}", "refused", "", "", "", "", "", s["error"]])
                continue
            m, pq, plan = s["memory"], s["per_query"], s["plan"]
            splits = "; ".join(f"{sp['op']} {sp['weight_bytes'] / 2**20:.0f} MB in {sp['blocks']} blocks ({sp['axis']})"
                               for sp in plan.get("split_nodes") or [])
            body.append([r["network"], f"{s['limit_mb']:g}",
                         f"{_f(m['peak_growth_mb'], 1)} {'✔' if s['within_limit'] else '✘'}",
                         _mmm(s["streaming_ms"], 1), _x(s["ratio_vs_resident"]),
                         _x(s["streaming_ms"]["median"] / r["plain_ms"]["median"]),
                         f"{_f(pq['decrypt_ms'], 1)} of {_f(pq['run_ms'], 1)} ({_f(pq['decrypted_mb'], 0)} MB)",
                         f"{s['max_rel_diff_vs_resident']:.1e}",
                         f"{plan['segments']} segments, scratch {_f(plan['scratch_mb'], 1)} MB, activations ≤ "
                         f"{_f(plan['activation_estimate_mb'], 1)} MB" + (f"; {splits}" if splits else "")])
    out += _table(["network", "limit MB", "peak growth MB", "ms (min / **med** / max)", "× resident", "× plain",
                   "decrypt ms / run ms per query", "max rel. diff vs resident", "plan"], body) + [""]
    for r in rows:
        s = next((s for s in r.get("streaming", [])
                  if s.get("limit_mb") == 128 and s.get("per_query", {}).get("steps")), None)
        if s is None:
            continue
        out += [f"Where a streaming query's time goes, {r['network']} at 128 MB (per query, mean over the timed runs; "
                f"resident: {_f(s['resident_ms']['median'], 1)} ms for the whole model):", ""]
        out += _table(["step", "nodes", "weights MB", "decrypting ms", "in all ms"],
                      [[st["kind"], str(st["nodes"]), _f(st["weights_mb"], 1), _f(st["decrypt_ms"], 1), _f(st["ms"], 1)]
                       for st in s["per_query"]["steps"]]) + [""]
    return out


def _fixed(res: dict[str, Any]) -> list[str]:
    us, fc = res["us"], res["fixed_cost"]
    labels = {"plain": "plain ORT `session.run`", "capsule": "capsule, dev key (`Capsule.predict`)",
              "capsule_licensed": f"capsule, licensed (budget charged; lease {res['lease_size']})",
              "bare_round_trip": "bare round trip: the same bytes there and back between two Python processes"}
    out = [f"## {res['title']}", "",
           "Interleaved rounds of calls to each variant; the fixed cost is the capsule's median (p99) minus plain "
           "ORT's median (p99). The capsule here is packed without defenses; what a defense policy adds per query is "
           "measured by the `defenses` suite (its section below).", ""]
    body = []
    for k, label in labels.items():
        if k not in us:
            continue
        s = us[k]
        extra = ([f"{fc[k]['median_us']:.0f}", f"{fc[k].get('mean_us', float('nan')):.0f}", f"{fc[k]['p99_us']:.0f}"]
                 if k in fc else ["", "", ""])
        body.append([label, f"{s['min']:.0f}", f"**{s['median']:.0f}**", f"{s['mean']:.0f}", f"{s['p99']:.0f}",
                     f"{s['max']:.0f}", *extra])
    out += _table(["variant", "min µs", "median µs", "mean µs", "p99 µs", "max µs", "fixed cost, median µs",
                   "fixed cost, mean µs", "fixed cost, p99 µs"], body)
    vs = res.get("vs_bare_round_trip")
    if vs and "bare_round_trip" in us:
        b = us["bare_round_trip"]
        out += ["", f"Goal: fixed cost ≤ 2× the bare round trip measured in the same run (median {b['median']:.0f} µs, "
                    f"mean {b['mean']:.0f} µs). Measured: "
                + "; ".join(f"{labels[k].split(' (')[0]} {v['ratio_median']:.2f}× (median), "
                            f"{v['ratio_mean']:.2f}× (mean)"
                            f" — {'met' if v['ratio_median'] <= 2 and v['ratio_mean'] <= 2 else 'not met'}"
                            for k, v in vs.items()) + ".",
                "", f"The bare round trip is bimodal on this VM: {b['min']:.0f} µs at best (both processes stay "
                    f"on a CPU) and about 80–100 µs when the reader has to be woken, so the ratio of medians swings "
                    f"between runs; the minima compare the two paths without wake-ups: capsule "
                    f"{us['capsule']['min']:.0f} µs against plain ORT {us['plain']['min']:.0f} µs, i.e. a fixed cost "
                    f"of {us['capsule']['min'] - us['plain']['min']:.0f} µs, "
                    f"{(us['capsule']['min'] - us['plain']['min']) / max(b['min'], 1e-9):.1f}× the bare minimum."]
    b = res.get("breakdown_us", {})
    if b:
        out += ["", "Where the time goes (each step timed alone in one process, medians in µs; the enclave worker "
                "is non-dumpable, so no profiler can attach to it, and its steps are reproduced here):", ""]
        names = {"host_encode_request": "host: prepare input, encode request frame",
                 "enclave_decode_request": "enclave: decode request frame",
                 "enclave_check_inputs": "enclave: check inputs against the manifest",
                 "enclave_encode_reply": "enclave: encode reply frame",
                 "host_decode_reply": "host: decode reply (copy out)",
                 "pipe_round_trip": "pipe round trip of both frames between two Python processes (wake-ups, "
                                    "syscalls, framing)"}
        out += _table(["step", "µs"], [[names.get(k, k), f"{v:.1f}"] for k, v in b.items()])
        total = sum(b.values())
        out += ["", f"Sum of the steps: {total:.0f} µs; the budget lease adds "
                f"{us['capsule_licensed']['median'] - us['capsule']['median']:.0f} µs at the median (a clock read and "
                "two comparisons per query; one sealed write, with fsync, per lease — that is the max)."]
    wk = res.get("wakeups_us")
    if wk:
        base = wk["pipe"]["median_us"]
        out += ["", "Cheaper wake-ups? One-byte round trips between two Python processes, each mechanism in the same "
                "interleaved rounds (`python -m mlcapsule.bench.wakeups` runs it alone):", ""]
        out += _table(["mechanism", "median µs", "mean µs", "p99 µs", "min µs", "median ÷ pipe"],
                      [[k, f"{v['median_us']:.1f}", f"{v['mean_us']:.1f}", f"{v['p99_us']:.1f}", f"{v['min_us']:.1f}",
                        f"{v['median_us'] / base:.2f}×"] for k, v in wk.items()])
        best = min(wk, key=lambda k: wk[k]["median_us"])
        out += ["", f"Kept: pipes. The fastest here is `{best}`, "
                f"{base - wk[best]['median_us']:.1f} µs a round trip below the pipe at the median"
                if best != "pipe" else "Kept: pipes, the fastest here"]
        out[-1] += ("; an eventfd carries no bytes, so using it would move every frame into shared memory for "
                    "that gain. Spinning on shared memory before sleeping (the futex-with-spin pattern) loses on "
                    "2 CPUs: the spinner takes the CPU the other process needs to answer.")
    return out + [""]


def _tpm(res: dict[str, Any]) -> list[str]:
    out = [f"## {res['title']}", ""]
    if res.get("skipped"):
        return out + [f"Not run: {res['skipped']}.", ""]
    out += ["The budget's rollback protection advances a TPM NV counter once per lease of N queries charged (and "
            "once when a restarted enclave charges its first lease); NV memory wears out, so that must stay at "
            "most 1/N per query plus the restarts. " + res.get("notes", ""), ""]
    body = [[str(r["lease"]), str(r["queries"]), str(r["restarts"]), str(r["increments"]), f"{r['per_query']:.3f}",
             f"{r['bound']:.3f}", "yes" if r["within_bound"] else "**no**",
             f"{r['query_us']['median'] / 1e3:.2f}", f"{r['query_us']['max'] / 1e3:.1f}"] for r in res["rows"]]
    out += _table(["lease N", "queries", "restarts", "NV increments", "increments per query",
                   "bound 1/N + restarts/queries", "within", "query ms (median)",
                   "query ms (max: a lease charged)"], body)
    return out + [""]


def _defenses(res: dict[str, Any]) -> list[str]:
    base = res["baseline_us"]
    env = ", ".join(f"`{k}={v}`" for k, v in res.get("thread_env", {}).items())
    out = [f"## {res['title']}", "",
           "Each defense module alone, in a child process with the enclave worker's thread settings "
           f"({env}, from `host.worker_env`; ONNX Runtime on 1 thread, as the worker opens the detector), then the "
           "whole pipeline end to end. **The baseline, measured in the same run:** the digits demo capsule packed "
           f"without defenses (dev key, 1 thread), one query per `predict`: median {_us(base['median'])}, mean "
           f"{_us(base['mean'])}, p99 {_us(base['p99'])}. The last column divides each median by it. Uniform "
           "random inputs stand in for MNIST and CIFAR images: PRADA's cost depends on the sizes (values per "
           "query, stored queries, distances in its window), not on the pixels. Goals are checked on the medians; "
           "the paper's figures (an i7-6700 inside SGX) stand beside ours.", ""]
    g, pp = res["goals_us"], res["paper"]
    rows: list[list[str]] = []

    def row(what: str, s: dict[str, float], goal: float | None, paper_txt: str, *, per_query: bool = True) -> None:
        met = "–" if goal is None else ("yes" if s["median"] <= goal else "**no**")
        rows.append([what, _us(s["min"]), f"**{_us(s['median'])}**", _us(s["mean"]), _us(s["p99"]),
                     "–" if goal is None else f"≤ {_us(goal)}", paper_txt, met,
                     f"{s['median'] / base['median']:.2f}×" if per_query else "–"])

    for r in res.get("prada", []):
        key = "prada_mnist" if r["dim"] == 784 else "prada_cifar"
        where = "over 10 classes" if r["classes"] > 1 else "all in one class"
        row(f"PRADA step, {r['dim']:,} values, {r['stored']:,} stored queries {where} (the test alone: "
            f"{_us(r['test_us']['median'])})", r["us"], g[key],
            f"~{pp['prada_mnist_3000_ms']:g} ms" if r["dim"] == 784 else "–")
    k = res.get("kennen", {})
    if k.get("batch1_us"):
        row("kennen-io detector, one 1×28×28 query", k["batch1_us"], g["kennen"], f"{pp['kennen_ms']} ms")
        row("kennen-io detector, per query in batches of 32", k["batch32_us"], None, "–")
    for m in res.get("mi_noise", []):
        b = m["batch"]
        what = "one posterior" if b == 1 else f"per posterior in batches of {b:,}"
        row(f"Algorithm 1 (`outputs.mi_noise`), 10 classes, {what}", m["algorithm_us"], g["mi_noise"],
            f"{pp['mi_noise_ms']} ms")
        row(f"the enclave's output transform with mi-noise (checks the row is a distribution, float32 in and "
            f"out), {what}", m["transform_us"], None, "–")
    st = res.get("state")
    if st:
        scale = {k: v * 1e3 for k, v in st["load_ms"].items() if k != "n"}
        row(f"`DefenseState.from_bytes`, {st['mb']:.1f} MB ({st['stored']:,} stored {st['dim']}-value queries)",
            scale, g["state_load"], f"< {pp['state_load_below_45mb_s']:g} s below 45 MB", per_query=False)
        row("`DefenseState.to_bytes`, the same state", {k: v * 1e3 for k, v in st["save_ms"].items() if k != "n"},
            None, "–", per_query=False)
    ap = res.get("apply")
    if ap:
        row(f"`pipeline.apply`, one query, {', '.join(ap['policy'])} on the digits model ({ap['values']} values, "
            f"{ap['stored_before']}–{ap['stored_after']} stored)", ap["us"], None, "–")
    out += _table(["what", "min", "median", "mean", "p99", "goal", "paper", "met", "median ÷ undefended query"], rows)
    k_how = k.get("detector")
    if k_how:
        out += ["", f"The kennen-io detector: {k_how}."]
    if "other_modules_loaded" in res:
        other = res["other_modules_loaded"]
        out += ["", "Numpy only in the hot path: after running every module above, the child process had loaded "
                + (f"**{', '.join(other)}**" if other else "none of scipy, torch, scikit-learn, numba") + "."]
    out += ["", "Memory PRADA holds per stored query, measured from the state after the pre-fill "
            "(`PradaState.memory_bytes()` ÷ stored; a class's matrix grows by doubling, so up to half of it is "
            "spare capacity) and from its arrays:", ""]
    body = []
    for r in res.get("prada", []):
        m = r["memory"]
        body.append([f"{r['dim']:,}", "10" if r["classes"] > 1 else "1", f"{r['stored']:,}",
                     f"{m['held_bytes'] / 2**20:.1f} MiB", f"{m['held_per_stored']:,.0f}", f"{m['row_bytes']:,}",
                     f"{m['window_bytes'] / 1e3:.0f} kB", f"{m['serialised_per_stored']:,.0f}"])
    out += _table(["values per query", "classes", "stored", "held in all", "held ÷ stored (bytes)",
                   "bytes per stored row (row, squared norm, distance, age)", "distance window",
                   "serialised ÷ stored (bytes)"], body)
    e = res["end_to_end"]
    us, add = e["us"], e["added_us"]
    out += ["", f"The whole pipeline end to end: the digits capsule packed with `{', '.join(e['policy'])}` against "
            f"the same model packed without defenses, dev-key capsules on 1 thread, one query per `predict`, "
            f"{e['rounds']} interleaved rounds of {e['per_round']} calls each (noisy digits inputs, no query "
            f"repeated exactly; {e['prada_stored_at_end']} queries stored by PRADA at the end):", ""]
    out += _table(["capsule", "min", "median", "mean", "p99"],
                  [[k, _us(v["min"]), f"**{_us(v['median'])}**", _us(v["mean"]), _us(v["p99"])] for k, v in us.items()]
                  + [["added by the defenses", _us(add["min"]), f"**{_us(add['median'])}**", _us(add["mean"]),
                      _us(add["p99"])]])
    lic = res.get("licensed")
    if lic and "error" not in lic:
        out += ["", f"Licensed mode (lease {lic['lease']}, {lic['leases']} leases each, interleaved by lease): the "
                "query that charges a lease writes the sealed state, which carries the defense state with the "
                "license state. Per query:", ""]
        out += _table(["capsule", "query charging a lease: median (p99)", "other queries: median (p99)",
                       "extra of the lease query, median"],
                      [[k, f"{_us(lic[k]['charging_us']['median'])} ({_us(lic[k]['charging_us']['p99'])})",
                        f"{_us(lic[k]['other_us']['median'])} ({_us(lic[k]['other_us']['p99'])})",
                        _us(lic[k]["extra_median_us"])] for k in ("undefended", "defended")])
        per = lic["persist_extra_us"] / lic["lease"]
        out += ["", f"With the defense state in it (about {lic['state_bytes_at_end_approx'] / 1e3:.0f} kB at the end, "
                f"{lic['prada_stored_at_end']} stored 64-value queries), the lease query's extra differs by "
                f"{_us(lic['persist_extra_us'])} at the median from the undefended capsule's, {_us(per)} per query "
                f"amortised over a lease of {lic['lease']}. The sealed write is dominated by its fsync, and a "
                "difference this small is within this machine's noise; a larger state adds its `to_bytes` "
                "(above) and its encryption, once per lease."]
    elif lic:
        out += ["", f"Licensed mode: not measured ({lic['error']})."]
    return out + [""]


DIFFERENCES = """## What differs from the paper

* **Hardware and isolation.** The paper ran on an Intel i7-6700 inside SGX: enclave memory is encrypted
  and the EPC (about 90 MB) pages out beyond that. Here the enclave is the `software` backend, a separate
  hardened process on a shared 2-CPU virtual machine (other jobs were running: see the load averages), with
  no memory encryption. Our enclave's costs are process isolation and IPC, not EPC paging.
* **Engine.** The paper's MLCapsule layers are hand-written C++/Eigen, and its "Standard" baseline is
  the same code outside the enclave. Here both sides run ONNX Runtime 1.32 with the same options, so a
  resident capsule runs exactly the graph plain ORT runs.
* **What a query pays for.** The paper's MLCapsule layer decrypts its weights for every query; that is
  our *streaming* mode. Our default, *resident* mode decrypts once at load, so its steady state has no
  decryption in it at all. The paper's figures compare best with our streaming columns.
* **Decryption speed.** AES-256-GCM here runs at several GB/s per core (VAES/AVX-512, through
  `cryptography`), far faster than SGX-era AES-NI and than the 2.3 GB/s DESIGN.md measured; page faults on
  fresh memory cost more than decryption on this VM.
* **Per-call overhead.** Each capsule call is an ECALL: a round trip between two processes through pipes
  (and shared memory for large tensors). For layers that take microseconds, this fixed cost dominates the
  ratio, as ECALL transitions do in SGX.
* **Defenses.** The paper timed its defenses inside SGX; ours are numpy inside the Python worker, timed
  with the worker's thread settings (BLAS on one thread). PRADA computes a query's distances to its class's
  stored queries as one float32 matrix–vector product (squared norms kept), then the Shapiro–Wilk test on
  the window of distances in numpy; there is no Python loop over the stored queries.
* **Averages vs medians.** The paper reports means of 100 runs; we report min / median / max, with the
  ratios taken between medians measured in interleaved rounds in the same process.
"""


def render(results: dict[str, dict[str, Any]], *, command: str = "mlcapsule bench") -> str:
    out = ["# Benchmarks", "",
           f"Generated by `{command}`; reproduce from the repository root with `mlcapsule bench` (the whole run takes "
           "about 6 minutes on 2 cores; `mlcapsule bench --quick` is a smoke run on small models, "
           "`--suite NAME` runs one of `dense`, `conv`, `networks`, `fixed`, `tpm`, `defenses`, `server`, `kws`). "
           "Raw results: `benchmarks/results/*.json`.", "",
           "Timings are min / **median** / max over the runs; every ratio divides medians measured in the same run "
           "on the same model, threads and batch, with the variants interleaved round by round so that background "
           "load falls on all of them alike. The paper's figures (" + paper.SETUP + ") stand beside ours.", ""]
    if not results:
        return "\n".join(out + ["No results yet."]) + "\n"
    out += ["## Setup", ""] + _env(results) + [""]
    gs = goals(results)
    if gs:
        out += ["## Goals", ""]
        out += _table(["goal", "target", "measured", "met"],
                      [[g["goal"], g["target"], g["measured"], "yes" if g["met"] else "**no**"] for g in gs])
        out += [""]
    if "dense" in results:
        out += _dense(results["dense"])
    if "conv" in results:
        out += _conv(results["conv"])
    if "networks" in results:
        out += _networks(results["networks"])
    if "fixed" in results:
        out += _fixed(results["fixed"])
    if "tpm" in results:
        out += _tpm(results["tpm"])
    if "defenses" in results:
        out += _defenses(results["defenses"])
    if "server" in results:
        from .server import render_section

        out += render_section(results["server"])
    if "kws" in results:
        from ..kws.bench import render_section as kws_section

        out += kws_section(results["kws"])
    out += [DIFFERENCES]
    notes = results.get("networks", {}).get("analysis") or []
    unmet = [g for g in gs if not g["met"]]
    if unmet or notes:
        out += ["## Where a goal is not met", ""]
        out += [f"* **{g['goal']}: {g['measured']}** (target {g['target']}). {explain(g, results)}" for g in unmet]
        out += [""]
    nets = {r["network"]: r for r in results.get("networks", {}).get("rows", [])}
    close = [g for g in gs if g["met"] and g["id"].startswith("steady-")
             and nets[g["id"].split("-", 1)[1]]["resident_ms"]["min"]
             > 1.05 * nets[g["id"].split("-", 1)[1]]["plain_ms"]["min"]]
    if close:
        out += ["## Where a goal is met only at the medians", "",
                "Medians are what the goal asks for, but on this shared machine they scatter from run to run; where "
                "the minima tell another story, here is where the time goes.", ""]
        out += [f"* **{g['goal']}: {g['measured']}** (target {g['target']}). {explain(g, results)}" for g in close]
        out += [""]
    return "\n".join(out) + "\n"


def explain(goal: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    """A measurement-based explanation of an unmet goal (the figures come from the results)."""
    nets = {r["network"]: r for r in results.get("networks", {}).get("rows", [])}
    gid = goal["id"]
    fx = results.get("fixed")
    if gid.startswith("steady-"):
        r = nets[gid.split("-", 1)[1]]
        rt = r["runtime"]
        same = rt["initializers"] == "copy" and rt["optimization"] == "all"
        lo = r["resident_ms"]["min"] / r["plain_ms"]["min"]
        txt = (f"Medians {r['resident_ms']['median']:.1f} vs {r['plain_ms']['median']:.1f} ms; minima "
               f"{r['resident_ms']['min']:.1f} vs {r['plain_ms']['min']:.1f} ms ({lo:.2f}×). ")
        p = r.get("resident_profile_ms")
        if p:
            io = p["host_encode"] + p["enclave_decode"] + p["enclave_encode"] + p["enclave_write"] + p["host_decode"]
            txt += (f"Profile (means per call): the model run inside the enclave took {p['enclave_infer']:.2f} ms "
                    f"against plain ORT's {r['plain_ms']['mean']:.2f} ms, and the ECALL steps around it {io:.2f} ms, "
                    "most of it "
                    f"in the two sends ({p['host_encode']:.2f} + {p['enclave_write']:.2f} ms), each of which wakes a "
                    "blocked process: on this VM, waking a process whose CPU has gone idle costs 0.1–0.5 ms, while "
                    "the copies themselves (0.6 MB in, 4 KB out) take tens of µs. Inside the enclave, ORT's pool "
                    "thread has also gone to sleep between calls (a call's round trip outlasts its spinning), while "
                    "plain ORT's back-to-back runs find it still spinning. ")
        if same:
            txt += ("The capsule runs the very graph plain ORT runs (the packer chose `copy` at level `all`, the "
                    "configuration of a plain `InferenceSession`), so the gap is the two wake-ups per call, plus "
                    "the scatter of a shared 2-CPU machine (compare the minima). What would close it: keep both "
                    "processes awake across a call (polling instead of blocking), which needs a spare core. Tried "
                    "here, each made calls slower on 2 CPUs: the host sleeping until shortly before the expected "
                    "answer and then polling (the poller takes CPU time from the enclave's two ORT threads), the "
                    "enclave polling for the next request after long calls, and stopping ORT's pool threads from "
                    "spinning after each run (`session.force_spinning_stop`: +1–2 ms per call, now off). On a "
                    "machine with a core to spare for the host, or with the enclave's threads pinned, the wake-ups "
                    "leave the critical path; an in-process enclave (SGX's ECALL is a function call into the same "
                    "process) would not have them at all.")
        else:
            txt += (f"The packer chose `{rt['initializers']}` at `{rt['optimization']}`: timing noise on the packing "
                    "machine made it beat the `copy`/`all` configuration plain ORT uses; re-packing on a quiet machine "
                    "picks the faster one.")
        return txt
    if gid.startswith("cold-"):
        r = nets["VGG-16"]
        c = sorted(r["cold_capsule"], key=lambda v: v["seconds"])[len(r["cold_capsule"]) // 2]
        return (f"Capsule: worker start {c['open_seconds'] - (c['load_seconds'] or 0):.2f} s, decryption "
                f"{c['decrypt_seconds']:.2f} s, session {c['session_seconds']:.2f} s, "
                f"first run {c['first_run_seconds']:.2f} s. "
                "Decryption here is dominated by first-touch page faults of fresh memory on this VM, and the session "
                "copies the weights once more (ORT's `copy` mode, needed for the `all` optimizations); a zero-copy "
                "session (`shared`) would remove that copy at some cost in steady state.")
    if gid.startswith("fixed-"):
        b = fx.get("breakdown_us", {}) if fx else {}
        return (f"The steps of the ECALL path add up to {sum(b.values()):.0f} µs when timed alone (pipe round trip "
                f"{b.get('pipe_round_trip', 0):.0f} µs); the rest is the wake-up of two processes on a shared, loaded "
                "2-CPU machine (load average in the setup table): the p99 shows it. Closing the gap needs fewer "
                "context switches (e.g. polling shared memory instead of blocking on a pipe) or a quieter machine.")
    if gid.startswith("stream-mem-"):
        r = nets[gid.split("-", 2)[2]]
        bad = [s for s in r.get("streaming", []) if not s.get("within_limit")]
        parts = []
        for s in bad:
            if "error" in s:
                parts.append(f"at {s['limit_mb']:g} MB the enclave refused: {s['error']}")
            else:
                p = s["plan"]
                parts.append(f"at {s['limit_mb']:g} MB it peaked at {s['memory']['peak_growth_mb']:.1f} MB "
                             "against a plan of "
                             f"{p['scratch_mb']:.1f} MB scratch + {p['activation_estimate_mb']:.1f} MB activations + "
                             f"{p['reserve_mb']:.1f} MB reserve: the activation estimate (ONNX shape inference) or the "
                             "reserve was too low for this model")
        return "; ".join(parts) + "."
    if gid.startswith("stream-speed-"):
        r = nets["VGG-16"]
        s = next(s for s in r["streaming"] if s["limit_mb"] == 128)
        pq = s["per_query"]
        steps = pq.get("steps") or []
        conv = next((st for st in steps if st["kind"] == "segment" and st["nodes"] > 10), None)
        split = [st for st in steps if st["kind"].startswith("split")]
        txt = (f"Per query the enclave decrypts {pq['decrypted_mb']:.0f} MB in {pq['decrypt_ms']:.0f} ms and spends "
               f"{pq['run_ms'] - pq['decrypt_ms']:.0f} ms in ONNX Runtime, against {s['resident_ms']['median']:.0f} ms "
               "for the whole model resident (profile in the table above). ")
        if conv:
            txt += (f"The convolutions take {conv['ms'] - conv['decrypt_ms']:.0f} ms: a segment takes its weights as "
                    "inputs, so ORT can neither pre-pack them nor convert the convolutions to its NCHWc layout (both "
                    "need constant weights), as it does resident. ")
        if split:
            txt += (f"The split classifier takes {sum(st['ms'] for st in split):.0f} ms, "
                    f"{sum(st['decrypt_ms'] for st in split):.0f} of them decrypting, which needs memory bandwidth the "
                    "other jobs on this 2-CPU machine share (the load average is in the setup table; on a quiet run "
                    "decryption ran at twice this speed). ")
        txt += ("What would close the gap: keep the convolution weights decrypted (as constants) when the limit "
                "leaves room for them, and decrypt the next classifier block while ORT runs the current one.")
        return txt
    if gid.startswith("def-"):
        return _explain_defense(gid, results.get("defenses") or {})
    return ""


def _explain_defense(gid: str, res: dict[str, Any]) -> str:
    if gid.startswith("def-prada"):
        dim = 784 if gid == "def-prada_mnist" else 3072
        parts = []
        for r in _prada_rows(res, dim):
            mb = r["stored"] * r["dim"] * 4 / 2**20 / (10 if r["classes"] > 1 else 1)
            parts.append(f"{'10 classes' if r['classes'] > 1 else 'one class'}: median {_us(r['us']['median'])} "
                         f"(min {_us(r['us']['min'])}), of "
                         f"which the Shapiro–Wilk test on {r['distances_in_window']:,} distances "
                         f"{_us(r['test_us']['median'])}; the rest is the product with the class's stored queries "
                         f"({mb:.1f} MB of float32 read per query) and numpy's call overhead")
        return ("; ".join(parts) + ". Timed with BLAS on one thread, as in the worker, on a shared 2-CPU machine "
                "(load average in the setup table): with all stored queries in one class, each step reads the whole "
                "matrix from memory, so the step is bound by memory bandwidth, which the other jobs share; the "
                "minimum is the step undisturbed.")
    if gid == "def-kennen":
        k = res.get("kennen", {})
        return (f"One ONNX Runtime call on 1 thread; in batches of 32 the detector costs "
                f"{_us(k.get('batch32_us', {}).get('median'))} per query, so most of a single call is ORT's fixed "
                "cost per run.")
    if gid == "def-mi-noise":
        mi = {r["batch"]: r["algorithm_us"] for r in res.get("mi_noise", [])}
        return ("Algorithm 1 on one 10-class posterior is a handful of numpy calls, whose fixed cost dominates "
                f"(per posterior in batches of 32: {_us(mi[32]['median'] if 32 in mi else None)}). "
                "The machine is shared: compare the minimum "
                f"({_us(mi[1]['min'] if 1 in mi else None)}).")
    if gid == "def-state-load":
        st = res.get("state", {})
        return (f"Load median {_f(st['load_ms']['median'])} ms, min {_f(st['load_ms']['min'])} ms: every stored row "
                "is checked (finite values) and its squared norm recomputed, into freshly allocated (page-faulted) "
                "memory.")
    return ""
