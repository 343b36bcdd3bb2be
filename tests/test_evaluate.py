"""`mlcapsule evaluate --quick` writes EVALUATION.md with every section and its numbers (issue 13,
item 4): the kennen-io detector, PRADA, Figure 4 with Shokri's shadow models beside the entropy
attack, Tramèr et al.'s counts with the three label-only retraining strategies at equal budgets,
and the stronger evaluations. (The Algorithm-1 inverter's own tests are in
tests/test_attacks_adaptive.py.)

The quick run trains its victims from scratch into a temporary cache (about 2 min on 2 cores)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict]:  # type: ignore[type-arg]
    from mlcapsule.cli.main import main

    root = tmp_path_factory.mktemp("evaluate")
    out = root / "EVALUATION.md"
    assert main(["evaluate", "--quick", "--out", str(out), "--cache", str(root / "cache")]) == 0
    results = json.loads((root / "evaluation" / "results.json").read_text())
    return root, out.read_text(), results


def _number(text: str, pattern: str) -> float:
    m = re.search(pattern, text)
    assert m, pattern
    return float(m.group(1).replace(",", ""))


def test_quick_evaluation_has_every_section_with_numbers(quick_report) -> None:  # type: ignore[no-untyped-def]
    root, text, results = quick_report
    for title in ("## Headline results", "## Machine", "## Time per part", "## The kennen-io detector",
                  "## PRADA against JbDA", "## Figure 4: membership inference", "## Tramèr et al.",
                  "## Stronger evaluations", "## What is cut or weaker than asked"):
        assert title in text, title
    assert "mlcapsule evaluate --quick" in text
    # kennen-io: an accuracy and the false denials, beside the paper's 100 %
    assert 0.0 <= _number(text, r"accuracy on [\d,]+ \+ [\d,]+ disjoint test inputs \| ([\d.]+)") <= 1.0
    assert "false denials on 2,000 MNIST test images" in text
    # PRADA: JbDA is caught, benign streams raise no alarm
    caught = results["sections"]["prada"]["data"]["jbda"]["caught_at"]
    assert caught is not None and 100 < caught <= 400
    assert results["sections"]["prada"]["data"]["benign"]["prada_alarms"] == 0
    # Figure 4: a row per c with AUC, max(AUC, 1 - AUC), TPR at 1 % FPR, JSD and |P_delta - P'_delta|
    curve = results["sections"]["membership"]["data"]["datasets"]["CIFAR-10"]["curve"]
    assert [row["c"] for row in curve][0] == 0.0 and len(curve) == 11
    assert curve[0]["jsd"] == 0.0 and curve[-1]["jsd"] > 0.0
    assert all(row["entropy"]["best_auc"] >= 0.5 for row in curve)
    assert results["sections"]["membership"]["data"]["capsule_c05"]["max_abs_diff"] < 1e-5
    # Shokri's shadow models beside the entropy attack, with and without Algorithm 1
    for name in ("CIFAR-10", "MNIST"):
        sh = results["sections"]["membership"]["data"]["datasets"][name]["shadow"]
        assert [row["c"] for row in sh["rows"]] == [0.0, 1.0]
        for row in sh["rows"]:
            for key in ("entropy", "shadow", "shadow_aware", "shadow_inverted"):
                assert row[key]["best_auc"] == max(row[key]["auc"], 1 - row[key]["auc"])
                assert 0.0 <= row[key]["tpr1"] <= 1.0
    cif = results["sections"]["membership"]["data"]["datasets"]["CIFAR-10"]["shadow"]["rows"]
    assert cif[0]["shadow"]["auc"] > 0.6  # the overfit victim leaks to the learned attack
    assert "Shokri et al.'s shadow models beside the entropy attack" in text
    assert "| c | entropy threshold | shadow, naive | shadow, defense-aware |" in text
    # Tramèr et al.: binary LR stolen with d + 1 queries
    tr = results["sections"]["tramer"]["data"]
    assert tr["binary_lr"]["queries"] == 65 and tr["binary_lr"]["fidelity"] == 1.0
    # ... and the three label-only strategies at equal budgets, with the queries each needs
    curves = tr["label_only"]["settings"]["default"]["curves"]
    for strategy in ("uniform", "line-search", "adaptive"):
        assert [int(curves[strategy][b]["queries_spent"]) for b in ("130", "650")] == [130, 650]
    assert "Uniform, line-search and adaptive retraining at equal budgets" in text
    assert "**Beside the paper.** Tramèr et al. report" in text
    assert "shadow models are not built" not in text and "retraining variants are not built" not in text
    # stronger: the budget table and the blind spots
    assert "| Knockoff (Fashion-MNIST, posteriors) | 100 |" in text
    assert "uniform random pixels" in text and "PRADA evasion" in text


def test_quick_evaluation_writes_its_figures(quick_report) -> None:  # type: ignore[no-untyped-def]
    root, text, _ = quick_report
    pytest.importorskip("matplotlib")
    for name in ("fig4_membership", "shadow_membership", "label_only_retraining", "budget_fidelity"):
        png = root / "evaluation" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](evaluation/{name}.png)" in text
