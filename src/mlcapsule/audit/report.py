"""The audit's files: ``report.json`` (everything), ``report.md`` (the provider's answers) and
PNG plots (matplotlib with the Agg backend, imported here only)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_report", "render_markdown"]

_COLORS = {"plain": "tab:red", "defended": "tab:blue", "licensed": "tab:green"}


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(report, out)
    report["plots"] = [p.name for p in plots]
    report["files"] = ["report.md", "report.json", *report["plots"]]
    md = out / "report.md"
    md.write_text(render_markdown(report))
    js = out / "report.json"
    js.write_text(json.dumps(report, indent=2, sort_keys=True, default=_default) + "\n")
    return [md, js, *plots]


def _default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


# -- plots ------------------------------------------------------------------------------------
def _plots(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    files: list[Path] = []
    target = report["options"]["target"]
    for attack, runs in report.get("extraction", {}).items():
        fig, ax = plt.subplots(figsize=(6, 4))
        drew = False
        for setting, entry in runs.items():
            pts = [(p["queries"], p["fidelity"]) for p in entry.get("trace", []) if "fidelity" in p]
            if not pts:
                continue
            drew = True
            q, f = zip(*pts, strict=True)
            color = _COLORS.get(setting)
            ax.plot(q, f, marker="o", label=setting, color=color)
            first = (entry.get("flags") or {}).get("first_flagged")
            if first is not None:
                ax.axvline(first, color=color, linestyle=":", label=f"{setting}: first flagged at {first}")
        if not drew:
            plt.close(fig)
            continue
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"{target:.0%} fidelity")
        ax.set_xlabel("queries")
        ax.set_ylabel("fidelity (held-out agreement)")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{attack}: fidelity against queries")
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out / f"fidelity_{attack}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    mem = report.get("membership")
    if mem:
        fig, ax = plt.subplots(figsize=(5, 5))
        for setting, roc in mem.get("roc", {}).items():
            auc = mem["settings"][setting]["scores"].get("entropy", {}).get("auc")
            ax.plot(roc["fpr"], roc["tpr"], label=f"{setting} (AUC {auc:.3f})" if auc is not None else setting,
                    color=_COLORS.get(setting))
        for row in mem.get("per_c", []):
            ax.plot(row["roc"]["fpr"], row["roc"]["tpr"], linewidth=0.8, alpha=0.6,
                    label=f"simulated c={row['c']:g} (AUC {row['entropy']['auc']:.3f})")
        ax.plot([0, 1], [0, 1], color="gray", linestyle="--", linewidth=1)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.set_title("membership inference (entropy): ROC")
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        path = out / "membership_roc.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
        if mem.get("per_c"):
            fig, ax = plt.subplots(figsize=(6, 4))
            cs = [r["c"] for r in mem["per_c"]]
            for kind, style in (("entropy", "-"), ("modified_entropy", "--")):
                ax.plot(cs, [r[kind]["auc"] for r in mem["per_c"]], marker="o", linestyle=style, label=f"{kind} AUC")
                ax.plot(cs, [r[kind]["best_auc"] for r in mem["per_c"]], marker="s", linestyle=style,
                        label=f"{kind} max(AUC, 1-AUC)")
            ax.axhline(0.5, color="gray", linestyle=":", linewidth=1)
            ax.set_xlabel("c (Algorithm 1)")
            ax.set_ylabel("AUC")
            ax.set_title("membership AUC against c")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = out / "membership_auc_vs_c.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            files.append(path)
    return files


# -- markdown ---------------------------------------------------------------------------------
def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_markdown(report: dict[str, Any]) -> str:
    cap, opts, s = report["capsule"], report["options"], report["summary"]
    target = opts["target"]
    lines = [f"# Audit of capsule `{cap['name']}` (v{cap['version']})", "",
             f"Capsule `{cap['path']}`, id `{cap['capsule_id']}`; input {cap['input_shape']}, "
             f"{cap['classes']} classes.",
             f"Attacks: {', '.join(opts['attacks'])}; {'quick' if opts['quick'] else 'full'} run, seed {opts['seed']}, "
             f"up to {opts['queries']} queries per extraction attack; settings: {', '.join(opts['settings'])}; "
             f"{report.get('seconds', 0):.0f} s.", "",
             f"* **plain**: {report['baseline']} (no defenses).",
             "* **defended**: the capsule opened with the content key in an enclave worker; its signed defenses run, "
             "with fresh state for each attack.",
             *(["* **licensed**: the capsule as the set-up client sees it (its license's policy and budget; the "
                "audit spent that budget)."] if "licensed" in opts["settings"] else []),
             f"* Data: {report['data']['source']} ({report['data']['eval']} held-out rows for fidelity and accuracy, "
             f"{report['data']['pool']} for the attacker, {report['data']['members']} training members"
             + (f"; transfer set: {report['data']['transfer_source']}" if report["data"].get("transfer_source") else "")
             + ").", "",
             "## The capsule's defenses", ""]
    lines += [f"* {d}" for d in cap["defenses"]] or ["* none"]
    lines += ["", f"## How many queries copy this model to {target:.0%} fidelity?", "",
              "Fidelity: agreement with the plain model's labels on held-out inputs, measured at each checkpoint.",
              "", "| attack | setting | queries to target | best fidelity | queries spent | stopped |",
              "|---|---|---|---|---|---|"]
    for attack, runs in report.get("extraction", {}).items():
        for setting, e in runs.items():
            if "error" in e:
                lines.append(f"| {attack} | {setting} | – | – | – | {e['error']} |")
                continue
            qt = e.get("queries_to_target")
            best = s["best_fidelity"].get(attack, {}).get(setting)
            lines.append(f"| {attack} | {setting} | {qt if qt is not None else 'not reached'} | {_fmt(best)} | "
                         f"{e['queries_spent']} | {e['stopped']} |")
    lines += ["", "## At which query is each attack flagged?", "",
              f"The capsule's defense state is read every {opts['check_every']} queries, so a query number is "
              "exact to within that many.", "",
              "| attack | setting | first flagged | first alarm per detector | first refused | queries spent |",
              "|---|---|---|---|---|---|"]
    for attack, runs in s.get("first_flagged", {}).items():
        for setting, f in runs.items():
            alarms = ", ".join(f"{k} at {v}" for k, v in sorted(f["first_alarm"].items())) or "none"
            first = _fmt(f["first_flagged"]) if f["first_flagged"] is not None else "never"
            lines.append(f"| {attack} | {setting} | {first} | {alarms} | {_fmt(f['first_refused'])} | "
                         f"{f['queries_spent']} |")
    mem = report.get("membership")
    if mem:
        lines += ["", "## Membership inference", "",
                  f"{mem['candidates']['members']} training members against {mem['candidates']['non_members']} "
                  "held-out non-members; every score is \"higher means member\".", "",
                  "| setting | score | AUC | max(AUC, 1 − AUC) | TPR at 1 % FPR |", "|---|---|---|---|---|"]
        for setting, entry in mem["settings"].items():
            for kind, m in entry["scores"].items():
                lines.append(f"| {setting} | {kind} | {_fmt(m.get('auc'))} | {_fmt(m.get('best_auc'))} | "
                             f"{_fmt(m.get('tpr_at_1pct_fpr'))} |")
        if mem.get("per_c"):
            lines += ["", f"At each c of Algorithm 1 ({mem['per_c_note']}):", "",
                      "| c | entropy AUC | max(AUC, 1 − AUC) | TPR at 1 % FPR | modified entropy AUC | "
                      "max(AUC, 1 − AUC) |", "|---|---|---|---|---|---|"]
            for r in mem["per_c"]:
                lines.append(f"| {r['c']:g} | {_fmt(r['entropy']['auc'])} | {_fmt(r['entropy']['best_auc'])} | "
                             f"{_fmt(r['entropy']['tpr_at_1pct_fpr'])} | {_fmt(r['modified_entropy']['auc'])} | "
                             f"{_fmt(r['modified_entropy']['best_auc'])} |")
    if report.get("kennen"):
        k = report["kennen"]
        lines += ["", "## Reverse engineering (kennen-io)", ""]
        for setting, e in k["settings"].items():
            lines.append(f"* {setting}: {e.get('attributes') or e.get('error') or e.get('stopped')}")
    acc = report.get("accuracy")
    if acc:
        lines += ["", "## What each defense costs in accuracy", "",
                  f"A benign client sends the {acc['rows']} held-out rows, {opts['check_every']} at a time; a refused "
                  "row counts as wrong.", "", "| answers | accuracy | cost | refused | alarms |",
                  "|---|---|---|---|---|",
                  f"| plain model | {_fmt(acc['plain'])} | – | – | – |"]
        if "defended" in acc:
            d = acc["defended"]
            alarms = ", ".join(f"{k} {v}" for k, v in (d.get("alarms") or {}).items() if v) or "none"
            lines.append(f"| the capsule (every defense, in the enclave) | {_fmt(d['accuracy'])} | {_fmt(d['cost'])} | "
                         f"{d['refused']} | {alarms} |")
        for r in acc.get("per_defense", []):
            alarms = ", ".join(f"{k} {v}" for k, v in r["alarms"].items() if v) or "none"
            lines.append(f"| `{r['defense']}` alone (simulated) | {_fmt(r['accuracy'])} | {_fmt(r['cost'])} | "
                         f"{r['refused']} | {alarms} |")
        lines += ["", "\"Simulated\": the enclave's own pipeline code run on the plain model's answers."]
    if report.get("skipped"):
        lines += ["", "## Not run", ""] + [f"* {a}: {why}" for a, why in report["skipped"].items()]
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"
