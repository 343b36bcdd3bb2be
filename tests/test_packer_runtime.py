"""The packer's choice of ONNX Runtime configuration: every candidate is checked against plain
ORT, only correct ones are timed, and the rule that picks among them (ties, prepacking margin)."""

from __future__ import annotations

from typing import Any

import pytest

from mlcapsule import packer
from mlcapsule.demo import models
from mlcapsule.enclave.runtime.split import split_model


def _choose(monkeypatch: pytest.MonkeyPatch, seconds: dict[tuple[str, str, bool], float] | None = None
            ) -> tuple[Any, list[dict[str, Any]]]:
    model = models.dense_layer(64)
    if seconds is not None:
        # Deterministic timings per configuration: the rule is under test here, not the machine.
        def fake_best(runs: dict[Any, Any], **_: Any) -> dict[Any, float]:
            for run in runs.values():
                run()
            return {c: seconds[(c.initializers, c.optimization, c.prepacking)] for c in runs}

        monkeypatch.setattr(packer, "_best_seconds", fake_best)
    trials: list[dict[str, Any]] = []
    inputs = packer._specs(model.graph.input, {t.name for t in model.graph.initializer})
    cfg = packer.choose_runtime(model, split_model(model), inputs, trials=trials)
    return cfg, trials


def test_every_candidate_is_checked_and_the_chosen_one_is_correct(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, trials = _choose(monkeypatch)
    assert len(trials) == len(packer.RUNTIME_CANDIDATES)
    chosen = [t for t in trials if t.get("chosen")]
    assert len(chosen) == 1 and chosen[0]["status"] == "correct"
    assert chosen[0]["config"] == cfg.to_dict() | {"initializers": cfg.initializers}
    correct = [t for t in trials if t["status"] == "correct"]
    assert len(correct) >= 2 and all("seconds" in t for t in correct)


def _times(**over: float) -> dict[tuple[str, str, bool], float]:
    base = {(c.initializers, c.optimization, c.prepacking): 1.0 for c in packer.RUNTIME_CANDIDATES}
    for k, v in over.items():
        init, level, *pp = k.split("_")
        base[(init, level, bool(pp))] = v
    return base


def test_prepacking_is_not_chosen_for_a_gain_within_the_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, _ = _choose(monkeypatch, _times(shared_extended=2.0, shared_basic=2.0, shared_disable=2.0,
                                         copy_all=1.0, copy_all_prepack=0.95))
    assert (cfg.initializers, cfg.optimization, cfg.prepacking) == ("copy", "all", False)


def test_prepacking_is_chosen_when_clearly_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, _ = _choose(monkeypatch, _times(shared_extended=2.0, shared_basic=2.0, shared_disable=2.0,
                                         copy_all=1.0, copy_all_prepack=0.7))
    assert (cfg.initializers, cfg.optimization, cfg.prepacking) == ("copy", "all", True)


def test_an_earlier_leaner_candidate_wins_a_tie(monkeypatch: pytest.MonkeyPatch) -> None:
    # zero-copy `shared` at `extended` within RUNTIME_TIE of the fastest: it is chosen.
    cfg, _ = _choose(monkeypatch, _times(shared_extended=1.02, copy_all=1.0))
    assert (cfg.initializers, cfg.optimization) == ("shared", "extended")
