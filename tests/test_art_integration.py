"""ART (adversarial-robustness-toolbox) against a capsule, through mlcapsule.integrations.art.

The victim is the demo's digits classifier packed with defenses (PRADA and the OOD monitor
recording, Algorithm 1 with c = 0.5) and opened with the dev key in an enclave worker:

* ART's KnockoffNets (random policy) steals it from the 225 natural digits of the attacker's pool;
  every query is charged and logged by the wrapper, and the thief agrees with the plain model
  well above a label-only uniform baseline;
* ART's MembershipInferenceBlackBox (random forest) trains on 80 + 80 candidates and infers 80 +
  80 more through the capsule;
* the wrapper's budget and a defense that refuses (ood, action=refuse, against uniform queries)
  stop ART with mlcapsule's own errors, saying why and after how many queries.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("art")
torch = pytest.importorskip("torch")

import mlcapsule  # noqa: E402
from conftest import ProviderKey  # noqa: E402
from mlcapsule.attacks import OnnxOracle, QueryBudgetExhausted, as_labels, roc_auc  # noqa: E402
from mlcapsule.audit import builtin_digits  # noqa: E402
from mlcapsule.errors import DefenseError  # noqa: E402
from mlcapsule.integrations.art import STOP_REFUSED, art_classifier  # noqa: E402


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory, provider_key: ProviderKey):  # type: ignore[no-untyped-def]
    from mlcapsule.demo.models import digits_classifier

    model, info = digits_classifier(seed=0)
    out = tmp_path_factory.mktemp("art")
    res = mlcapsule.pack(model, out / "digits.capsule", provider_key=provider_key.path, name="digits",
                         defenses=["prada:delta=0.9", "ood", "mi-noise:c=0.5"], defense_data=info["x_train"],
                         tune_runtime=False)
    strict = mlcapsule.pack(model, out / "strict.capsule", provider_key=provider_key.path, name="strict",
                            defenses=["ood:window=10,action=refuse"], defense_data=info["x_train"], tune_runtime=False)
    return model, res, strict, builtin_digits(transfer=False)


def _open(path: Path, key: Path):  # type: ignore[no-untyped-def]
    return mlcapsule.open_capsule(path, trust=mlcapsule.UnsafeTrustManifestKey(), unsafe_dev_key=key)


def _thief():  # type: ignore[no-untyped-def]
    from art.estimators.classification import PyTorchClassifier

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    return PyTorchClassifier(net, loss=torch.nn.CrossEntropyLoss(), optimizer=torch.optim.Adam(net.parameters(), 1e-2),
                             input_shape=(64,), nb_classes=10, clip_values=(0.0, 16.0), preprocessing=(0.0, 16.0))


def test_art_knockoff_nets_and_membership_inference_run_against_a_capsule(digits) -> None:  # type: ignore[no-untyped-def]
    from art.attacks.extraction import KnockoffNets
    from art.attacks.inference.membership_inference import MembershipInferenceBlackBox

    model, res, _, data = digits
    plain_labels = as_labels(OnnxOracle(model).query(data.x_eval))
    np.random.seed(0)  # KnockoffNets and the random forest draw from numpy's global generator
    with _open(res.capsule_path, res.key_path) as cap:
        victim = art_classifier(cap, clip_values=(0.0, 16.0))
        assert victim.input_shape == (64,) and victim.nb_classes == 10  # read from the manifest
        knockoff = KnockoffNets(victim, batch_size_fit=64, batch_size_query=50, nb_epochs=30, nb_stolen=225,
                                use_probability=True, verbose=False)
        stolen = knockoff.extract(data.x_pool, thieved_classifier=_thief())
        assert victim.queries_spent == 225 == len(victim.oracle.log.inputs()) and victim.stopped is None
        fidelity = float(np.mean(np.argmax(stolen.predict(data.x_eval), axis=1) == plain_labels))

        mia = MembershipInferenceBlackBox(victim, attack_model_type="rf")
        n = 80
        mia.fit(data.members[:n], data.member_labels[:n], data.x_pool[:n], data.y_pool[:n])
        members = mia.infer(data.members[n:2 * n], data.member_labels[n:2 * n], probabilities=True)
        non_members = mia.infer(data.x_pool[n:2 * n], data.y_pool[n:2 * n], probabilities=True)
        state = cap.status()["defenses"]["state"]
    assert victim.queries_spent == 225 + 4 * n  # fit and infer each query their candidates once
    assert state["queries"] == victim.queries_spent  # the enclave's count agrees with the wrapper's
    assert fidelity > 0.8, fidelity  # a label-only uniform baseline gets about 0.3 (docs/attacks.md)
    scores = np.concatenate([np.asarray(members).reshape(len(members), -1)[:, -1],
                             np.asarray(non_members).reshape(len(non_members), -1)[:, -1]])
    truth = np.concatenate([np.ones(n, bool), np.zeros(n, bool)])
    auc = roc_auc(scores, truth)
    print(f"ART knockoff fidelity {fidelity:.3f}, ART membership AUC {auc:.3f}")
    assert 0.0 <= auc <= 1.0  # the demo model generalises well: close to 0.5 is the honest result


def test_budget_and_defense_refusals_stop_art_clearly(digits) -> None:  # type: ignore[no-untyped-def]
    _, res, strict, data = digits
    with _open(res.capsule_path, res.key_path) as cap:
        victim = art_classifier(cap, budget=30)
        victim.predict(data.x_eval[:20])
        with pytest.raises(QueryBudgetExhausted, match="the ART attack stopped") as e:
            victim.predict(data.x_eval[20:60], batch_size=20)
    assert victim.stopped == "attack budget" and victim.queries_spent == 30 and e.value.spent == 30

    uniform = np.random.default_rng(0).uniform(0, 16, size=(180, 64)).astype(np.float32)
    stream = np.concatenate([data.x_eval[:20], uniform])  # two benign batches, then uniform queries
    with _open(strict.capsule_path, strict.key_path) as cap:
        victim = art_classifier(cap)
        with pytest.raises(DefenseError, match="defenses refused") as d:
            victim.predict(stream, batch_size=10)
        state = cap.status()["defenses"]["state"]
    assert victim.stopped == STOP_REFUSED and d.value.exit_code == 12
    assert 20 <= victim.queries_spent < 200 and state["alarms"]["ood"] == 1 and state["refused"] >= 10
