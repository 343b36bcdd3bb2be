"""`mlcapsule evaluate --quick` writes EVALUATION.md with every section and its numbers (issue 13,
item 4), and the Algorithm-1 inverter of the adaptive attacker recovers the undefended posterior.

The quick run trains its victims from scratch into a temporary cache (about 1.5 min on 2 cores)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mlcapsule.attacks.adaptive import invert_mi_noise
from mlcapsule.enclave.defenses.outputs import mi_noise


def test_the_inverter_undoes_algorithm_1_for_most_answers() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(10), 500)
    for c in (0.3, 0.8):
        inv = invert_mi_noise(mi_noise(p, c), c)
        assert inv.recovered(p).mean() > 0.9
    assert np.allclose(invert_mi_noise(p, 0.0).posteriors, p)


def test_the_inverter_takes_a_non_uniform_prior() -> None:
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(4), 200)
    t = np.array([0.1, 0.2, 0.3, 0.4])
    inv = invert_mi_noise(mi_noise(p, 0.5, t), 0.5, t)
    assert inv.recovered(p).mean() > 0.8


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
    # Tramèr et al.: binary LR stolen with d + 1 queries
    tr = results["sections"]["tramer"]["data"]
    assert tr["binary_lr"]["queries"] == 65 and tr["binary_lr"]["fidelity"] == 1.0
    # stronger: the budget table and the blind spots
    assert "| Knockoff (Fashion-MNIST, posteriors) | 100 |" in text
    assert "uniform random pixels" in text and "PRADA evasion" in text


def test_quick_evaluation_writes_its_figures(quick_report) -> None:  # type: ignore[no-untyped-def]
    root, text, _ = quick_report
    pytest.importorskip("matplotlib")
    for name in ("fig4_membership", "budget_fidelity"):
        png = root / "evaluation" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"](evaluation/{name}.png)" in text
