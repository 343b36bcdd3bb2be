"""Run the audit: each chosen attack against the plain model (no defenses), the dev-key capsule
(its defenses, fresh state per attack), and optionally the licensed capsule; then membership
inference, the accuracy each defense costs, and the report.

Settings, as the report names them:

* ``plain``: the capsule's model decrypted in memory with the content key, run by ONNX Runtime
  (or ``--model``): what an attacker would get from an undefended API;
* ``defended``: the capsule opened with the dev key in an enclave worker: its signed defenses
  run, with fresh state for every attack (one attacker per session);
* ``licensed``: the capsule as the client set up in ``state_dir`` sees it: the license's policy
  (a grant may have tightened it), its defense state as it is, and its budget, which the audit
  spends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DefenseError, UsageError
from .data import AuditData
from .victim import CapsuleFacts, WatchedCapsuleOracle, defense_parts, kennen_scores, plain_model, read_capsule

__all__ = ["ATTACKS", "DEFAULT_ATTACKS", "AuditOptions", "run_audit", "Progress"]

#: Every attack the audit knows, in the order it runs them.
ATTACKS = ("equation-solving", "uniform", "knockoff", "jbda", "membership", "kennen")
#: The default set (``knockoff`` runs when there is a transfer set).
DEFAULT_ATTACKS = ("uniform", "knockoff", "jbda", "membership")
EXTRACTION = ("equation-solving", "uniform", "knockoff", "jbda")
MEMBERSHIP_KINDS = ("entropy", "max_posterior", "modified_entropy", "loss", "gap")
DEFAULT_C = (0.0, 0.25, 0.5, 0.75, 1.0)

#: ``progress(description, done, total)``: one step is one attack run (or one measurement).
Progress = Callable[[str, int, int], None]


@dataclass
class AuditOptions:
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    quick: bool = False
    seed: int = 0
    target: float = 0.9  # the fidelity the report asks "how many queries to ..." for
    check_every: int = 10  # rows between two reads of the capsule's defense state
    queries: int | None = None  # per extraction attack (default: 480 quick, 4000 full)
    c_values: tuple[float, ...] = DEFAULT_C
    epochs: int | None = None  # substitute training epochs (default: 30 quick, 50 full)
    settings: tuple[str, ...] = ("plain", "defended")

    def __post_init__(self) -> None:
        unknown = [a for a in self.attacks if a not in ATTACKS]
        if unknown:
            raise UsageError(f"unknown attack {unknown[0]!r}; choose from {', '.join(ATTACKS)}")
        if not 0.0 < self.target <= 1.0:
            raise UsageError(f"the fidelity target must be in (0, 1], got {self.target}")

    @property
    def budget(self) -> int:
        return self.queries if self.queries is not None else (960 if self.quick else 4000)

    @property
    def n_epochs(self) -> int:
        return self.epochs if self.epochs is not None else (30 if self.quick else 50)


@dataclass
class _Context:
    facts: CapsuleFacts
    dev_key: Path
    plain: bytes
    data: AuditData
    options: AuditOptions
    state_dir: Path | None
    threads: int
    evaluator: Any = None
    licensed_capsule: Any = None
    log: list[str] = field(default_factory=list)


def run_audit(capsule: str | Path, *, dev_key: str | Path, data: AuditData, options: AuditOptions | None = None,
              model: str | Path | None = None, state_dir: str | Path | None = None, progress: Progress | None = None,
              threads: int = 1) -> dict[str, Any]:
    """Audit ``capsule`` and return the report as a JSON-ready dict (see :func:`write_report`)."""
    from ..attacks import FidelityEvaluator, OnnxOracle

    options = options or AuditOptions()
    if state_dir is not None and "licensed" not in options.settings:
        options = replace(options, settings=(*options.settings, "licensed"))
    t0 = time.perf_counter()
    facts = read_capsule(capsule)
    plain = Path(model).read_bytes() if model is not None else plain_model(capsule, dev_key)
    ctx = _Context(facts, Path(dev_key), plain, data, options, Path(state_dir) if state_dir else None, threads)
    shape = facts.input_shape
    x_uniform = FidelityEvaluator.uniform_inputs(500, shape, data.low, data.high, seed=options.seed + 1)
    ctx.evaluator = FidelityEvaluator(OnnxOracle(plain), data.x_eval.reshape(len(data.x_eval), *shape), x_uniform,
                                      data.y_eval)
    plan = _plan(ctx)
    total = len(plan)
    report: dict[str, Any] = {
        "capsule": {"path": str(facts.path), "name": facts.name, "capsule_id": facts.capsule_id,
                    "version": facts.version, "input_shape": list(shape), "classes": facts.n_classes,
                    "defenses": facts.described, "policy": facts.defenses, "budget": facts.budget},
        "baseline": "the capsule's model decrypted in memory with the content key" if model is None
                    else f"--model {model}",
        "data": data.describe(),
        "options": {"attacks": list(options.attacks), "quick": options.quick, "seed": options.seed,
                    "target": options.target, "check_every": options.check_every, "queries": options.budget,
                    "epochs": options.n_epochs, "settings": list(options.settings),
                    "c_values": list(options.c_values)},
        "extraction": {}, "skipped": {}, "summary": {},
    }
    try:
        for i, (what, setting, fn) in enumerate(plan):
            if progress is not None:
                progress(f"{what} ({setting})", i, total)
            fn(ctx, report)
        if progress is not None:
            progress("done", total, total)
    finally:
        if ctx.licensed_capsule is not None:
            ctx.licensed_capsule.close()
    report["summary"] = _summary(report, options)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


# -- the plan ---------------------------------------------------------------------------------
Step = tuple[str, str, Callable[[_Context, dict[str, Any]], None]]


def _plan(ctx: _Context) -> list[Step]:
    opts = ctx.options
    steps: list[Step] = []
    for attack in EXTRACTION:
        if attack not in opts.attacks:
            continue
        reason = _not_applicable(ctx, attack)
        if reason is not None:
            steps.append((attack, "-", _skip(attack, reason)))
            continue
        for setting in opts.settings:
            steps.append((attack, setting, _extraction_step(attack, setting)))
    if "membership" in opts.attacks:
        if ctx.data.members is None:
            steps.append(("membership", "-", _skip("membership", "no training members (--members, --member-labels)")))
        else:
            steps.append(("membership", "all", _membership_step))
    if "kennen" in opts.attacks:
        reason = _not_applicable(ctx, "kennen")
        steps.append(("kennen", "-", _skip("kennen", reason)) if reason else ("kennen", "all", _kennen_step))
    steps.append(("accuracy cost", "all", _accuracy_step))
    return steps


def _not_applicable(ctx: _Context, attack: str) -> str | None:
    if attack == "knockoff" and ctx.data.transfer is None:
        return "no transfer set (--transfer x.npy: natural inputs of another distribution)"
    if attack == "knockoff" and ctx.data.transfer is not None and len(ctx.data.transfer) < ctx.options.budget:
        return f"the transfer set has {len(ctx.data.transfer)} inputs, fewer than the {ctx.options.budget} queries"
    if attack == "equation-solving" and len(ctx.facts.input_shape) != 1:
        return "equation solving needs a flat input vector"
    if attack == "kennen" and int(np.prod(ctx.facts.input_shape)) != 784:
        return "kennen's zoo is of MNIST models (input 1x28x28 or 784); this capsule's input differs"
    return None


def _skip(attack: str, reason: str) -> Callable[[_Context, dict[str, Any]], None]:
    def run(ctx: _Context, report: dict[str, Any]) -> None:
        report["skipped"][attack] = reason

    return run


# -- oracles per setting ----------------------------------------------------------------------
@contextmanager
def _oracle(ctx: _Context, setting: str) -> Iterator[Any]:
    import mlcapsule

    from ..attacks import OnnxOracle

    if setting == "plain":
        yield OnnxOracle(ctx.plain)
        return
    if setting == "defended":
        with mlcapsule.open_capsule(ctx.facts.path, trust=mlcapsule.UnsafeTrustManifestKey(),
                                    unsafe_dev_key=ctx.dev_key, threads=ctx.threads) as cap:
            yield WatchedCapsuleOracle(cap, check_every=ctx.options.check_every)
        return
    if ctx.licensed_capsule is None:
        ctx.licensed_capsule = mlcapsule.open_capsule(ctx.facts.path, trust=mlcapsule.UnsafeTrustManifestKey(),
                                                      state_dir=ctx.state_dir, threads=ctx.threads)
    yield WatchedCapsuleOracle(ctx.licensed_capsule, check_every=ctx.options.check_every)


def _checkpoints(total: int) -> list[int]:
    points = {total}
    q = total
    while q > 60:
        q //= 2
        points.add(q)
    return sorted(points)


def _extraction_step(attack: str, setting: str) -> Callable[[_Context, dict[str, Any]], None]:
    def run(ctx: _Context, report: dict[str, Any]) -> None:
        t0 = time.perf_counter()
        with _oracle(ctx, setting) as oracle:
            try:
                res = _run_extraction(ctx, attack, oracle)
            except UsageError as e:  # e.g. equation solving against label-only answers
                report["extraction"].setdefault(attack, {})[setting] = {"error": e.message}
                return
            entry: dict[str, Any] = {
                "queries_spent": res.queries_spent, "stopped": res.stopped, "params": res.to_dict()["params"],
                "metrics": dict(res.metrics), "trace": res.trace.to_list(),
                "queries_to_target": res.trace.first_reaching("fidelity", ctx.options.target),
                "seconds": round(time.perf_counter() - t0, 2),
            }
            flags = getattr(oracle, "flags", None)
            if flags is not None:
                entry["flags"] = flags.to_dict()
                if flags.first_refused is not None:
                    entry["stopped"] = f"refused by the defenses ({flags.refused_by})"
        report["extraction"].setdefault(attack, {})[setting] = entry

    return run


def _run_extraction(ctx: _Context, attack: str, oracle: Any) -> Any:
    from ..attacks import extract_softmax, jbda, knockoff, uniform_retraining

    opts, data, shape = ctx.options, ctx.data, ctx.facts.input_shape
    q = opts.budget
    common = {"n_classes": ctx.facts.n_classes, "epochs": opts.n_epochs, "seed": opts.seed,
              "evaluator": ctx.evaluator}
    if attack == "uniform":
        return uniform_retraining(oracle, shape, low=data.low, high=data.high, queries=q,
                                  checkpoints=_checkpoints(q), **common)
    if attack == "knockoff":
        assert data.transfer is not None
        transfer = data.transfer.reshape(len(data.transfer), *shape)
        return knockoff(oracle, transfer, queries=q, checkpoints=_checkpoints(q), **common)
    if attack == "jbda":
        seeds = _seed_set(data.x_pool, data.y_pool, per_class=3, seed=opts.seed)
        rounds = max(0, int(np.floor(np.log2(max(1, q // max(1, len(seeds)))))))
        lam = 0.25 * (data.high - data.low)
        return jbda(oracle, seeds.reshape(len(seeds), *shape), rounds=rounds, lam=lam, low=data.low,
                    high=data.high, **common)
    if attack == "equation-solving":
        d = int(np.prod(shape))
        n = min(q, 4 * (d + 1))
        return extract_softmax(oracle, d, queries=n, method="log-ratio", low=data.low, high=data.high,
                               seed=opts.seed, evaluator=ctx.evaluator,
                               checkpoints=sorted({max(1, (d + 1) // 2), d + 1, 2 * (d + 1)} - {n}))
    raise UsageError(f"unknown extraction attack {attack!r}")  # pragma: no cover


def _seed_set(x: np.ndarray, y: np.ndarray, *, per_class: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    picks = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        picks.extend(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist())
    return np.asarray(x[np.sort(np.asarray(picks, dtype=np.int64))], dtype=np.float32)


# -- membership inference -----------------------------------------------------------------------
def _membership_candidates(ctx: _Context) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    data = ctx.data
    assert data.members is not None
    n = min(len(data.members), len(data.x_pool), 150 if ctx.options.quick else 500)
    rng = np.random.default_rng(ctx.options.seed)
    mi = rng.choice(len(data.members), size=n, replace=False)
    ni = rng.choice(len(data.x_pool), size=n, replace=False)
    ml = data.member_labels[mi] if data.member_labels is not None else None
    if ml is None:
        raise UsageError("membership inference needs the members' labels (--member-labels)")
    return data.members[mi], ml, data.x_pool[ni], data.y_pool[ni]


def _membership_step(ctx: _Context, report: dict[str, Any]) -> None:
    from ..attacks import membership_inference, membership_report, membership_scores, roc_curve
    from ..enclave.defenses.outputs import transform
    from ..enclave.defenses.policy import DefensePolicy, MiNoise

    members, ml, non, nl = _membership_candidates(ctx)
    shape = ctx.facts.input_shape
    members, non = members.reshape(len(members), *shape), non.reshape(len(non), *shape)
    out: dict[str, Any] = {"candidates": {"members": len(members), "non_members": len(non)}, "settings": {},
                           "roc": {}}
    for setting in ctx.options.settings:
        with _oracle(ctx, setting) as oracle:
            res = membership_inference(oracle, members, non, kinds=MEMBERSHIP_KINDS, member_labels=ml,
                                       non_member_labels=nl, batch_size=ctx.options.check_every * 5)
            entry: dict[str, Any] = {"queries_spent": res.queries_spent, "stopped": res.stopped,
                                     "scores": _by_kind(res.metrics)}
            flags = getattr(oracle, "flags", None)
            if flags is not None:
                entry["flags"] = flags.to_dict()
                if flags.first_refused is not None:
                    entry["stopped"] = f"refused by the defenses ({flags.refused_by})"
            scores = res.extra.get("scores", {})
            truth = res.extra.get("is_member")
            if "entropy" in scores and truth is not None and truth.any() and not truth.all():
                fpr, tpr, _ = roc_curve(scores["entropy"], truth)
                out["roc"][setting] = {"fpr": _thin(fpr), "tpr": _thin(tpr)}
        out["settings"][setting] = entry
    # Algorithm 1 at each c, simulated on the plain model's answers with the enclave's own code.
    from ..attacks import OnnxOracle

    plain = OnnxOracle(ctx.plain)
    pm, pn = np.asarray(plain.query(members)), np.asarray(plain.query(non))
    base = DefensePolicy.from_dict(ctx.facts.defenses) if ctx.facts.defenses else None
    prior = base.mi_noise.prior if base is not None and base.mi_noise is not None else None
    per_c = []
    for c in ctx.options.c_values:
        policy = DefensePolicy.from_defenses([MiNoise(c=float(c), prior=prior)])
        am, an = transform(policy, pm), transform(policy, pn)
        row: dict[str, Any] = {"c": float(c)}
        for kind in ("entropy", "modified_entropy"):
            rep = membership_report(membership_scores(am, kind, ml), membership_scores(an, kind, nl))
            row[kind] = {"auc": rep.auc, "best_auc": rep.best_auc, "tpr_at_1pct_fpr": rep.tpr_at_1pct_fpr}
        fpr, tpr, _ = roc_curve(np.concatenate([membership_scores(am, "entropy"), membership_scores(an, "entropy")]),
                                np.concatenate([np.ones(len(am), bool), np.zeros(len(an), bool)]))
        row["roc"] = {"fpr": _thin(fpr), "tpr": _thin(tpr)}
        row["accuracy_members"] = float(np.mean(np.argmax(am, 1) == ml))
        per_c.append(row)
    out["per_c"] = per_c
    out["per_c_note"] = ("Algorithm 1 applied to the plain model's answers with the enclave's own code "
                         "(mlcapsule.enclave.defenses.outputs), prior " + ("T of the policy" if prior else "uniform"))
    report["membership"] = out


def _by_kind(metrics: dict[str, float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        kind, _, metric = name.partition(".")
        out.setdefault(kind, {})[metric] = float(value)
    return out


def _thin(a: np.ndarray, n: int = 200) -> list[float]:
    a = np.asarray(a, dtype=np.float64)
    if len(a) > n:
        a = a[np.unique(np.linspace(0, len(a) - 1, n).round().astype(int))]
    return [round(float(v), 5) for v in a]


# -- kennen -----------------------------------------------------------------------------------
def _kennen_step(ctx: _Context, report: dict[str, Any]) -> None:
    from ..attacks.kennen import (
        KennenSettings,
        ZooSettings,
        build_zoo,
        infer_attributes,
        sample_zoo_configs,
        split_zoo,
        train_kennen,
    )

    quick = ctx.options.quick
    n_nets = 48 if quick else 160
    zoo = build_zoo(sample_zoo_configs(n_nets, seed=ctx.options.seed),
                    settings=ZooSettings(train_images=500, epochs=1, eval_images=100) if quick else None)
    train, test = split_zoo(zoo, n_nets // 4)
    kres = train_kennen(train, test, settings=KennenSettings(method="io", n_queries=10, rounds=3 if quick else 8))
    out: dict[str, Any] = {"zoo": n_nets, "held_out_accuracy": kres.to_dict() if hasattr(kres, "to_dict") else {},
                           "settings": {}}
    for setting in ctx.options.settings:
        with _oracle(ctx, setting) as oracle:
            try:
                res = infer_attributes(oracle, kres.model, input_shape=ctx.facts.input_shape)
                entry: dict[str, Any] = {"queries_spent": res.queries_spent, "stopped": res.stopped,
                                         "attributes": res.extra.get("attributes")}
            except UsageError as e:
                entry = {"error": e.message}
            flags = getattr(oracle, "flags", None)
            if flags is not None:
                entry["flags"] = flags.to_dict()
        out["settings"][setting] = entry
    report["kennen"] = out


# -- what the defenses cost in accuracy ---------------------------------------------------------
def _accuracy_step(ctx: _Context, report: dict[str, Any]) -> None:
    from ..attacks import OnnxOracle
    from ..enclave.defenses.pipeline import DefenseState, apply
    from ..enclave.defenses.policy import DefensePolicy

    data, shape, step = ctx.data, ctx.facts.input_shape, ctx.options.check_every
    x = data.x_eval.reshape(len(data.x_eval), *shape).astype(np.float32)
    y = data.y_eval
    plain_post = np.asarray(OnnxOracle(ctx.plain).query(x))
    plain_acc = float(np.mean(np.argmax(plain_post, 1) == y))
    out: dict[str, Any] = {"rows": len(x), "plain": plain_acc, "per_defense": []}
    # The whole policy, in the enclave: a benign client sending the held-out data.
    if "defended" in ctx.options.settings:
        import mlcapsule

        correct = refused = 0
        with mlcapsule.open_capsule(ctx.facts.path, trust=mlcapsule.UnsafeTrustManifestKey(),
                                    unsafe_dev_key=ctx.dev_key, threads=ctx.threads) as cap:
            for i in range(0, len(x), step):
                try:
                    ans = np.asarray(cap.predict(x[i:i + step]))
                    correct += int(np.sum(np.argmax(ans.reshape(len(ans), -1), 1) == y[i:i + step]))
                except DefenseError:
                    refused += len(x[i:i + step])
            state = (cap.status().get("defenses") or {}).get("state") or {}
        out["defended"] = {"accuracy": correct / len(x), "cost": plain_acc - correct / len(x), "refused": refused,
                           "alarms": state.get("alarms"), "flagged_queries": state.get("flagged_queries"),
                           "degraded": state.get("degraded"), "locked": state.get("locked")}
    # Each defense alone, simulated with the enclave's pipeline on the plain model's answers.
    if ctx.facts.defenses:
        policy = DefensePolicy.from_dict(ctx.facts.defenses)
        ood, kennen = defense_parts(ctx.facts.path, ctx.dev_key)
        for d in policy.defenses():
            alone = DefensePolicy.from_defenses([d])
            st = DefenseState.new(alone)
            correct = refused = 0
            for i in range(0, len(x), step):
                xb, pb = x[i:i + step], plain_post[i:i + step]
                scores = kennen_scores(kennen, xb) if alone.kennen is not None and kennen is not None else None
                if alone.kennen is not None and scores is None:
                    break
                res = apply(alone, st, xb, pb, kennen_scores=scores, ood_stats=ood)
                st = res.state
                if res.refusal is not None or res.answer is None:
                    refused += len(xb)
                else:
                    correct += int(np.sum(np.argmax(np.asarray(res.answer), 1) == y[i:i + step]))
            acc = correct / len(x)
            out["per_defense"].append({"defense": _spec(d), "accuracy": acc, "cost": plain_acc - acc,
                                       "refused": refused, "alarms": dict(st.alarms),
                                       "flagged_queries": dict(st.flagged_queries)})
    report["accuracy"] = out


def _spec(d: Any) -> str:
    params = ",".join(f"{k}={v}" for k, v in d.params().items() if v is not None)
    return d.NAME + (f":{params}" if params else "")


# -- the summary: the provider's questions --------------------------------------------------------
def _summary(report: dict[str, Any], options: AuditOptions) -> dict[str, Any]:
    to_target: dict[str, dict[str, int | None]] = {}
    best: dict[str, dict[str, float | None]] = {}
    flagged: dict[str, dict[str, Any]] = {}
    for attack, runs in report["extraction"].items():
        for setting, entry in runs.items():
            if "error" in entry:
                continue
            to_target.setdefault(attack, {})[setting] = entry.get("queries_to_target")
            fids = [p["fidelity"] for p in entry.get("trace", []) if "fidelity" in p]
            best.setdefault(attack, {})[setting] = max(fids) if fids else None
            if "flags" in entry:
                flagged.setdefault(attack, {})[setting] = {
                    "first_flagged": entry["flags"]["first_flagged"], "first_alarm": entry["flags"]["first_alarm"],
                    "first_refused": entry["flags"]["first_refused"], "queries_spent": entry["queries_spent"]}
    mem: dict[str, Any] = {}
    if "membership" in report:
        for setting, entry in report["membership"]["settings"].items():
            mem[setting] = {kind: {k: v for k, v in m.items() if k in ("auc", "best_auc", "tpr_at_1pct_fpr")}
                            for kind, m in entry["scores"].items()}
            if "flags" in entry:
                flagged.setdefault("membership", {})[setting] = {
                    "first_flagged": entry["flags"]["first_flagged"], "first_alarm": entry["flags"]["first_alarm"],
                    "first_refused": entry["flags"]["first_refused"], "queries_spent": entry["queries_spent"]}
    acc = report.get("accuracy", {})
    return {"target": options.target, "queries_to_target_fidelity": to_target, "best_fidelity": best,
            "first_flagged": flagged, "membership": mem,
            "membership_per_c": [{"c": r["c"], **r["entropy"]} for r in report.get("membership", {}).get("per_c", [])],
            "accuracy": {"plain": acc.get("plain"),
                         "defended": (acc.get("defended") or {}).get("accuracy"),
                         "per_defense": {r["defense"]: r["cost"] for r in acc.get("per_defense", [])}}}


def default_attacks(selected: Sequence[str] | None) -> tuple[str, ...]:
    return tuple(selected) if selected else DEFAULT_ATTACKS
