"""`mlcapsule audit --quick` on the demo capsule (the digits classifier packed with PRADA and the
OOD monitor recording, and Algorithm 1 with c = 0.5): it writes report.md, report.json and PNG
plots, and the JSON answers the provider's questions (queries to 90 % fidelity, the query at
which each attack is first flagged, the membership AUC with and without the defenses and per c,
the accuracy each defense costs). One audit run, about 30-40 s on 2 slow cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("torch")
pytest.importorskip("sklearn")

import mlcapsule  # noqa: E402
from conftest import ProviderKey  # noqa: E402
from mlcapsule.cli.main import main  # noqa: E402


@pytest.fixture(scope="module")
def demo_capsule(tmp_path_factory: pytest.TempPathFactory, provider_key: ProviderKey) -> Path:
    from mlcapsule.demo.models import digits_classifier

    model, info = digits_classifier(seed=0)
    out = tmp_path_factory.mktemp("audit") / "digits.capsule"
    mlcapsule.pack(model, out, provider_key=provider_key.path, name="digits", tune_runtime=False,
                   defenses=["prada:delta=0.9", "ood", "mi-noise:c=0.5"], defense_data=info["x_train"])
    return out


@pytest.fixture(scope="module")
def report(demo_capsule: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:  # type: ignore[type-arg]
    out = tmp_path_factory.mktemp("report")
    assert main(["audit", str(demo_capsule), "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_audit_quick_writes_the_report_with_plots(report: tuple[Path, dict]) -> None:  # type: ignore[type-arg]
    out, rep = report
    md = (out / "report.md").read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"fidelity_uniform.png", "fidelity_jbda.png", "membership_roc.png", "membership_auc_vs_c.png"} <= set(pngs)
    assert all((out / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    assert rep["plots"] == [p for p in rep["plots"] if p in pngs] and set(rep["files"]) >= {"report.md", "report.json"}
    for heading in ("How many queries copy this model to 90% fidelity?", "At which query is each attack flagged?",
                    "Membership inference", "What each defense costs in accuracy"):
        assert heading in md
    assert rep["options"]["quick"] and rep["seconds"] < 120


def test_audit_answers_the_providers_questions(report: tuple[Path, dict]) -> None:  # type: ignore[type-arg]
    _, rep = report
    s = rep["summary"]
    # Queries to 90 % fidelity, per attack and setting (None: not reached within the budget).
    assert set(s["queries_to_target_fidelity"]) >= {"uniform", "jbda"} and s["target"] == 0.9
    for runs in s["queries_to_target_fidelity"].values():
        assert set(runs) == {"plain", "defended"}
        assert all(q is None or 0 < q <= 960 for q in runs.values())
    assert s["best_fidelity"]["jbda"]["plain"] > s["best_fidelity"]["uniform"]["plain"]
    # Uniform queries are out of distribution: the OOD monitor flags them within its first window.
    flagged = s["first_flagged"]["uniform"]["defended"]
    assert flagged["first_alarm"].get("ood") is not None and 0 < flagged["first_flagged"] <= 100
    # Membership AUCs with and without the defenses, and per c of Algorithm 1.
    for setting in ("plain", "defended"):
        e = s["membership"][setting]["entropy"]
        assert 0 <= e["auc"] <= 1 and e["best_auc"] == max(e["auc"], 1 - e["auc"]) and 0 <= e["tpr_at_1pct_fpr"] <= 1
    assert s["membership"]["plain"]["gap"]["auc"] == s["membership"]["defended"]["gap"]["auc"]  # labels unchanged
    assert [r["c"] for r in s["membership_per_c"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert s["membership_per_c"][0]["auc"] == pytest.approx(s["membership"]["plain"]["entropy"]["auc"])
    # c = 0.5 simulated with the enclave's code on the plain answers = what the capsule answered.
    assert s["membership_per_c"][2]["auc"] == pytest.approx(s["membership"]["defended"]["entropy"]["auc"], abs=1e-6)
    # Accuracy: Algorithm 1 with a uniform prior keeps every argmax; the monitors only record.
    acc = s["accuracy"]
    assert acc["plain"] > 0.95 and acc["defended"] == acc["plain"]
    assert sorted(d.split(":")[0] for d in acc["per_defense"]) == ["mi-noise", "ood", "prada"]
    assert all(cost == 0 for cost in acc["per_defense"].values())


def test_audit_refuses_to_spend_a_license_without_yes(demo_capsule: Path, tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    assert main(["audit", str(demo_capsule), "--state-dir", str(tmp_path / "state"), "--out", str(tmp_path)]) == 2
    assert main(["audit", str(demo_capsule), "--data", str(demo_capsule), "--out", str(tmp_path)]) == 2  # no labels
