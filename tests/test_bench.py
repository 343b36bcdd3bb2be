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
