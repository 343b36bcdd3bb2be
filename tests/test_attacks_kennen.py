"""kennen (Oh et al., ICLR 2018) on a tiny MNIST zoo: kennen-io beats chance, the attack runs
against an ONNX oracle within its budget, the zoo is cached and deterministic, and the crafted
inputs of the kennen-io detector come in disjoint sessions.

The zoo is small so that the file runs in well under a minute on 2 slow cores: 72 nets (48 to
train the metamodel, 24 held out) that vary the activation (relu or tanh), dropout and the
optimiser, all pooled 2-conv nets with 5x5 kernels, each trained for one epoch on 500 MNIST
images. Seeds are fixed; torch runs on one thread.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from mlcapsule.attacks import OnnxOracle  # noqa: E402
from mlcapsule.attacks.kennen import (  # noqa: E402
    KENNEN_ATTRIBUTES,
    KennenResult,
    KennenSettings,
    ZooSettings,
    build_zoo,
    craft_kennen_inputs,
    infer_attributes,
    sample_zoo_configs,
    split_zoo,
    train_kennen,
)
from mlcapsule.attacks.kennen_zoo import ModelZoo  # noqa: E402
from mlcapsule.errors import UsageError  # noqa: E402

SPACE = {"act": ["relu", "tanh"], "pool": ["max_2"], "n_conv": [2], "n_fc": [2], "ks": [5]}
SETTINGS = ZooSettings(train_images=500, epochs=1, eval_images=100)
IO = KennenSettings(method="io", n_queries=10, rounds=3, meta_epochs=40, query_steps=10, batch_models=8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    os.environ["MLCAPSULE_TORCH_THREADS"] = "1"
    return tmp_path_factory.mktemp("kennen-cache")


@pytest.fixture(scope="module")
def zoo(cache: Path) -> ModelZoo:
    return build_zoo(sample_zoo_configs(72, space=SPACE, seed=0), settings=SETTINGS, cache_dir=cache)


@pytest.fixture(scope="module")
def io_result(zoo: ModelZoo) -> KennenResult:
    train, test = split_zoo(zoo, 24)
    return train_kennen(train, test, settings=IO, seed=0)


def test_sample_zoo_configs_is_balanced_and_deterministic() -> None:
    a = sample_zoo_configs(12, seed=5)
    assert a == sample_zoo_configs(12, seed=5) and a != sample_zoo_configs(12, seed=6)
    for name, values in KENNEN_ATTRIBUTES.items():
        counts = [sum(c.attribute(name) == v for c in a) for v in values]
        assert max(counts) - min(counts) <= 1, (name, counts)
    assert len({c.seed for c in a}) == 12
    assert {c.pool for c in sample_zoo_configs(6, space={"pool": ["none"]})} == {"none"}
    with pytest.raises(UsageError):
        sample_zoo_configs(4, space={"width": [1]})
    with pytest.raises(UsageError):
        sample_zoo_configs(4, space={"act": ["swish"]})


def test_zoo_nets_learn_and_are_cached(zoo: ModelZoo, cache: Path) -> None:
    assert len(zoo) == 72 and len(list(cache.glob("net-*.pt"))) == 72
    assert np.mean(zoo.accuracies) > 0.2  # brief training, well above the 0.1 of an untrained net
    again = build_zoo(zoo.configs[:3], settings=SETTINGS, cache_dir=cache)
    assert again.cached == 3 and again.seconds_trained == 0.0
    fresh = build_zoo(zoo.configs[:1], settings=SETTINGS, cache=False)  # retrained: the same net
    import torch

    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(fresh.nets[0](x), zoo.nets[0](x), atol=1e-5)


def test_kennen_io_beats_chance(io_result: KennenResult) -> None:
    r = io_result
    assert set(r.accuracy) == {"act", "drop", "opt"}  # the attributes this zoo varies
    assert r.chance == {"act": 0.5, "drop": 0.5, "opt": 0.5}
    # act: relu or tanh is told apart on held-out nets well above chance and the majority class
    assert "act" in r.beats_chance(margin=0.1), r.to_dict()
    assert r.accuracy["act"] >= 0.75
    assert r.n_train == 48 and r.n_test == 24
    # the queries were optimised: they left the MNIST images they started from
    assert r.model.queries.shape == (10, 1, 28, 28)
    assert len(r.history) == IO.rounds


def test_kennen_o_uses_fixed_natural_queries(zoo: ModelZoo) -> None:
    train, test = split_zoo(zoo, 24)
    r = train_kennen(train, test, settings=KennenSettings(method="o", n_queries=10, meta_epochs=40), seed=0)
    assert r.model.queries.min() >= 0.0 and r.model.queries.max() <= 1.0
    assert r.accuracy["act"] > r.chance["act"]


def test_infer_attributes_against_an_onnx_oracle(zoo: ModelZoo, io_result: KennenResult) -> None:
    import torch

    from mlcapsule.attacks.kennen import zoo_answers
    from mlcapsule.export import torch_to_onnx

    model = io_result.model
    victim = zoo.subset([len(zoo) - 1])  # a held-out net
    proto = torch_to_onnx(torch.nn.Sequential(victim.nets[0], torch.nn.Softmax(dim=1)),
                          torch.zeros(1, 1, 28, 28))
    oracle = OnnxOracle(proto, budget=100)
    res = infer_attributes(oracle, model, truth=victim.configs[0])
    assert res.queries_spent == IO.n_queries and res.stopped == "done"
    expected = model.predict(zoo_answers(model, victim))[0]
    assert res.extra["attributes"] == expected
    assert set(res.metrics) == {"act.correct", "drop.correct", "opt.correct", "correct"}
    # a budget below the n queries stops the attack cleanly, with no prediction
    short = infer_attributes(OnnxOracle(proto, budget=4), model)
    assert short.stopped == "attack budget" and short.queries_spent == 4 and "attributes" not in short.extra


def test_crafted_inputs_come_in_disjoint_cached_sessions(zoo: ModelZoo, cache: Path) -> None:
    small = zoo.subset(range(8))
    settings = KennenSettings(method="io", n_queries=5, rounds=1, meta_epochs=5, query_steps=3, batch_models=8)
    a = craft_kennen_inputs(small, 3, settings=settings, cache_dir=cache)
    assert a.x.shape == (15, 1, 28, 28) and a.session.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert len(set(a.init.tolist())) == 15  # no two queries started from the same image
    b = craft_kennen_inputs(small, 2, settings=settings, first_session=3, cache_dir=cache)
    assert not set(a.init.tolist()) & set(b.init.tolist())
    again = craft_kennen_inputs(small, 3, settings=settings, cache_dir=cache)
    assert again.seconds == 0.0 and np.array_equal(again.x, a.x)
    from mlcapsule.attacks.kennen_zoo import mnist_pools, to_pixels

    start = to_pixels(mnist_pools().val_x[a.init])
    assert np.abs(a.x - start).mean() > 0.01  # optimised away from the natural images
    with pytest.raises(UsageError):
        craft_kennen_inputs(small, 1, settings=KennenSettings(method="o"), cache_dir=cache)
