"""`mlcapsule bench`: the suites write JSON with the figures the issue asks for, and the report
renders them. Quick mode only (small models, few runs); timing thresholds stay out of tests."""

from __future__ import annotations

import json
from pathlib import Path

from swtpm import require_swtpm

from mlcapsule.bench import run


def test_bench_fixed_and_tpm_write_json_and_markdown(tmp_path: Path) -> None:
    require_swtpm()
    md = tmp_path / "BENCHMARKS.md"
    run(["fixed", "tpm"], quick=True, results_dir=tmp_path / "results", markdown=md, workdir=tmp_path / "work",
        log=lambda _: None)
    fixed = json.loads((tmp_path / "results" / "fixed.json").read_text())
    env = fixed["environment"]
    assert env["threads"] >= 1 and env["onnxruntime"] and env["python"]
    for variant in ("plain", "capsule", "capsule_licensed"):
        s = fixed["us"][variant]
        assert s["n"] > 0 and s["min"] <= s["median"] <= s["max"]
    # The capsule answers what plain ORT answers.
    assert fixed["max_rel_diff"]["dev"] < 1e-5 and fixed["max_rel_diff"]["licensed"] < 1e-5
    tpm = json.loads((tmp_path / "results" / "tpm.json").read_text())
    assert not tpm.get("skipped"), tpm.get("skipped")
    for r in tpm["rows"]:
        # At most one NV increment per lease charged, plus one per restart (NV wear).
        assert r["increments"] <= -(-r["queries"] // r["lease"]) + r["restarts"], r
        assert r["increments"] >= 1
    text = md.read_text()
    assert "## Goals" in text and "Fixed cost per query" in text and "NV counter increments" in text


def test_bench_defenses_quick_writes_json_and_markdown(tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    run(["defenses"], quick=True, results_dir=tmp_path / "results", markdown=md, workdir=tmp_path / "work",
        log=lambda _: None)
    res = json.loads((tmp_path / "results" / "defenses.json").read_text())
    # The enclave's thread settings, and numpy only in the defenses' hot path.
    assert res["thread_env"]["OPENBLAS_NUM_THREADS"] == "1"
    assert res["other_modules_loaded"] == []
    base = res["baseline_us"]
    assert base["n"] > 0 and base["min"] <= base["median"] <= base["max"]
    # PRADA: MNIST and CIFAR sizes, 10 classes and one class, each on a pre-filled state.
    assert {(r["dim"], r["classes"]) for r in res["prada"]} == {(784, 10), (784, 1), (3072, 10), (3072, 1)}
    for r in res["prada"]:
        assert r["stored"] == res["config"]["prada_stored"] and r["stored_after"] >= r["stored"]
        assert r["us"]["n"] == res["config"]["prada_rounds"] * res["config"]["prada_per_round"]
        assert r["memory"]["row_bytes"] == 4 * r["dim"] + 16
        assert r["memory"]["held_per_stored"] >= r["memory"]["row_bytes"]
    assert [m["batch"] for m in res["mi_noise"]] == [1, 32, 1000]
    assert res["kennen"]["input_shape"][1:] == [1, 28, 28] and res["kennen"]["batch1_us"]["n"] > 0
    assert res["state"]["bytes"] > res["state"]["stored"] * 784 * 4 and res["state"]["load_ms"]["n"] > 0
    e2e = res["end_to_end"]
    assert set(e2e["us"]) == {"undefended", "defended"} and set(e2e["added_us"]) >= {"median", "mean", "p99"}
    # The defended answer went through top-k:3 and stays a distribution.
    assert e2e["answer_top_k_nonzero"] <= 3 and abs(e2e["answer_sum"] - 1) < 1e-4
    text = md.read_text()
    assert "## Defenses" in text and "PRADA per query" in text and "kennen-io detector" in text
