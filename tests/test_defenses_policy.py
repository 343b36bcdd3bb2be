"""The defense policy (issue 12 item 1): specs, the signed canonical form, words, license grants."""

from __future__ import annotations

import json

import pytest

from mlcapsule.enclave.defenses import DefenseGrantError, DefensePolicy, DefenseSpecError, parse_spec, tighten
from mlcapsule.enclave.defenses.policy import Kennen, LabelOnly, MiNoise, Ood, Prada, Round, TopK
from mlcapsule.enclave.errors import PolicyError, UsageError

FULL = ["prada:delta=0.9,action=lock", "ood:window=200,level=1e-5,action=degrade", "kennen:threshold=0.7",
        "mi-noise:c=0.5", "top-k:3", "round:2", "label-only"]


def test_specs_parse_with_defaults_and_bare_main_parameters() -> None:
    assert parse_spec("prada:delta=0.9") == Prada(delta=0.9)
    assert parse_spec("prada:delta=0.95,action=lock") == Prada(delta=0.95, action="lock")
    assert parse_spec("prada:0.93,max_queries=500") == Prada(delta=0.93, max_queries=500)
    assert parse_spec("prada") == Prada()
    assert parse_spec("ood:window=50,level=1e-4") == Ood(window=50, level=1e-4)
    assert parse_spec("kennen:threshold=0.5") == Kennen(threshold=0.5, action="refuse")
    assert parse_spec("mi-noise:c=0.5") == MiNoise(c=0.5)
    assert parse_spec("mi-noise:0.25,prior=0.2/0.8") == MiNoise(c=0.25, prior=(0.2, 0.8))
    assert parse_spec("top-k:3") == TopK(k=3)
    assert parse_spec("round:2") == Round(decimals=2)
    assert parse_spec(" Label-Only ") == LabelOnly()


@pytest.mark.parametrize("spec,words", [
    ("nope:1", "unknown defense 'nope'"),
    ("prada:gamma=1", "unknown parameter 'gamma'"),
    ("prada:delta=abc", "delta must be a number"),
    ("prada:delta=1.5", "delta must be between 0 and 1"),
    ("prada:delta=0", "strictly between 0 and 1"),
    ("prada:action=explode", "record, degrade, refuse, lock"),
    ("prada:min_dists=200,window=150", "min_dists (200) must be below window (150)"),
    ("prada:max_queries=10", "max_queries must be between 100"),
    ("prada:delta=0.9,delta=0.8", "given twice"),
    ("mi-noise", "c is required"),
    ("mi-noise:c=1.5", "c must be between 0 and 1"),
    ("mi-noise:c=0.5,prior=0.5/0.6", "must sum to 1"),
    ("mi-noise:c=0.5,prior=a/b", "prior must be 'uniform'"),
    ("top-k", "k is required"),
    ("top-k:0", "k must be between 1"),
    ("top-k:2.5", "k must be an integer"),
    ("round:-1", "decimals must be between 0"),
    ("label-only:3", "takes no parameters"),
    ("ood:level=0", "level must be above 0"),
    ("", "empty defense spec"),
])
def test_bad_specs_are_refused_with_a_clear_error(spec: str, words: str) -> None:
    with pytest.raises(DefenseSpecError) as err:
        parse_spec(spec)
    assert words in str(err.value)
    assert isinstance(err.value, UsageError) and err.value.exit_code == 2 and "docs/defenses.md" in err.value.hint


def test_a_defense_given_twice_is_refused() -> None:
    with pytest.raises(DefenseSpecError, match="given twice"):
        DefensePolicy.from_specs(["top-k:3", "top-k:2"])


def test_the_canonical_dict_round_trips_through_json() -> None:
    policy = DefensePolicy.from_specs(FULL[:-1])
    data = json.loads(json.dumps(policy.to_dict(), sort_keys=True))
    assert DefensePolicy.from_dict(data) == policy
    assert data["version"] == 1
    assert data["defenses"]["prada"] == {"delta": 0.9, "action": "lock", "min_dists": 100, "max_queries": 10000,
                                         "window": 5000}
    assert list(policy.to_dict()["defenses"]) == ["kennen", "prada", "ood", "mi-noise", "top-k", "round"]
    with_prior = DefensePolicy.from_specs(["mi-noise:c=0.5,prior=0.1/0.9", "label-only"])
    assert DefensePolicy.from_dict(json.loads(json.dumps(with_prior.to_dict()))) == with_prior
    assert DefensePolicy.from_dict(DefensePolicy().to_dict()) == DefensePolicy()


@pytest.mark.parametrize("data,words", [
    ({"version": 1, "defenses": {"teleport": {}}}, "unknown defense 'teleport'"),
    ({"version": 1, "defenses": {"prada": {"delta": 0.9, "colour": "red"}}}, "unknown parameter 'colour'"),
    ({"version": 1, "defenses": {"prada": {"delta": "0.9"}}}, "delta must be a finite number"),
    ({"version": 1, "defenses": {"top-k": {"k": True}}}, "k must be an integer"),
    ({"version": 1, "defenses": {"top-k": {"k": 2.0}}}, "k must be an integer"),
    ({"version": 1, "defenses": {"prada": {"delta": float("nan")}}}, "finite number"),
    ({"version": 2, "defenses": {}}, "version 2 is not supported"),
    ({"version": 1}, "exactly 'version' and 'defenses'"),
    ({"version": 1, "defenses": [], "extra": 1}, "exactly 'version' and 'defenses'"),
    ({"version": 1, "defenses": {"prada": [0.9]}}, "parameters must be an object"),
    ([], "exactly 'version' and 'defenses'"),
])
def test_from_dict_refuses_unknown_or_bad_policies(data: object, words: str) -> None:
    with pytest.raises(DefenseSpecError) as err:
        DefensePolicy.from_dict(data)
    assert words in str(err.value) and err.value.hint


def test_describe_says_in_words_what_happens_to_answers() -> None:
    lines = DefensePolicy.from_specs(FULL).describe()
    text = "\n".join(lines)
    assert len(lines) == 7
    assert "answers are noised" in text and "c=0.5" in text
    assert "top 3 class" in text and "rounded to 2 decimal" in text and "labels only" in text
    assert "PRADA, delta=0.9" in text and "the license locks" in text
    assert "kennen-io" in text and "refused" in text and "out-of-distribution" in text
    assert DefensePolicy().describe() == ["no defenses: answers are the model's outputs as computed"]
    assert "can change the top class" in DefensePolicy.from_specs(["mi-noise:c=0.1,prior=0.3/0.7"]).describe()[0]


def test_a_policy_tightened_by_the_license_is_applied() -> None:
    base = DefensePolicy.from_specs(["prada:delta=0.9", "mi-noise:c=0.5,prior=0.25/0.75", "top-k:3", "round:3",
                                     "kennen:threshold=0.5,action=refuse"])
    out = tighten(base, ["prada:delta=0.95,action=lock", "mi-noise:c=0.8", "top-k:1", "round:1", "label-only",
                         "ood:window=100", "kennen:threshold=0.3,action=lock"])
    assert out.prada == Prada(delta=0.95, action="lock")
    assert out.mi_noise == MiNoise(c=0.8, prior=(0.25, 0.75))  # a grant that names no prior keeps the base's
    assert out.top_k == TopK(1) and out.round == Round(1) and out.label_only
    assert out.ood == Ood(window=100) and out.kennen == Kennen(0.3, "lock")
    # a spec grant changes only what it names
    assert tighten(base, ["prada:action=degrade"]).prada == Prada(delta=0.9, action="degrade")
    # an empty grant, or one equal to the base, changes nothing
    assert tighten(base, []) == base and tighten(base, base) == base
    # a full policy as the grant
    assert tighten(base, DefensePolicy.from_specs(["top-k:2"])) == tighten(base, ["top-k:2"])


@pytest.mark.parametrize("grant,words", [
    (["prada:delta=0.8"], "delta 0.9 -> 0.8"),
    (["prada:action=record"], "action 'refuse' -> 'record'"),
    (["prada:min_dists=200"], "min_dists"),
    (["prada:max_queries=5000"], "max_queries"),
    (["prada:window=1000"], "window cannot change"),
    (["mi-noise:c=0.4"], "c 0.5 -> 0.4"),
    (["mi-noise:c=0.9,prior=0.5/0.5"], "prior cannot change"),
    (["top-k:4"], "k 3 -> 4"),
    (["round:4"], "decimals 2 -> 4"),
    (["kennen:threshold=0.9"], "threshold"),
    (["ood:level=1e-9"], "level"),
])
def test_a_policy_loosened_by_the_license_is_refused(grant: list[str], words: str) -> None:
    base = DefensePolicy.from_specs(["prada:delta=0.9,action=refuse", "mi-noise:c=0.5,prior=0.2/0.8", "top-k:3",
                                     "round:2", "kennen:threshold=0.5", "ood:level=1e-6"])
    with pytest.raises(DefenseGrantError) as err:
        tighten(base, grant)
    assert words in str(err.value) and "loosen" in str(err.value)
    assert isinstance(err.value, PolicyError) and err.value.exit_code == 6


def test_check_model_refuses_a_policy_the_model_cannot_run() -> None:
    DefensePolicy.from_specs(FULL).check_model(n_classes=10, input_size=784)
    with pytest.raises(DefenseSpecError, match="prior has 2 classes"):
        DefensePolicy.from_specs(["mi-noise:c=0.5,prior=0.5/0.5"]).check_model(n_classes=10, input_size=4)
    with pytest.raises(DefenseSpecError, match="more than the model's 2 classes"):
        DefensePolicy.from_specs(["top-k:3"]).check_model(n_classes=2, input_size=4)
    with pytest.raises(DefenseSpecError, match="lower max_queries"):
        DefensePolicy.from_specs(["prada:max_queries=1000000"]).check_model(n_classes=10, input_size=3 * 224 * 224)


def test_the_canonical_form_is_unique() -> None:
    one = DefensePolicy.from_dict({"version": 1, "defenses": {"mi-noise": {"c": 1}}})
    assert one.to_dict() == DefensePolicy.from_specs(["mi-noise:c=1"]).to_dict()
    assert json.dumps(one.to_dict()) == '{"version": 1, "defenses": {"mi-noise": {"c": 1.0, "prior": null}}}'
