"""Attacks against capsules, through the enclave worker.

* With the dev key: Tramèr's log-ratio equation solving copies a softmax regression on digits
  (64 features, 10 classes) from d + 1 = 65 answers of the capsule, with fidelity 1.0 against
  the plain model.
* With a license from the real provider server on loopback (budget 40, below the 65 queries
  the attack needs): the capsule refuses the batch that does not fit, the oracle spends the
  40 queries left, and the attack stops cleanly, reporting 40 queries spent, a capsule budget
  as the reason, and the (underdetermined) model it could build.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression

from _server_support import ProviderFiles, harness, platform, serve_in_thread  # noqa: F401  (fixtures)
from conftest import ProviderKey, make_provider_key, pack_model
from mlcapsule.attacks import CapsuleOracle, FidelityEvaluator, OnnxOracle, extract_softmax, membership_inference
from test_attacks_oracle import softmax_lr_onnx


@pytest.fixture(scope="module")
def digits_lr():  # type: ignore[no-untyped-def]
    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    clf = LogisticRegression(max_iter=3000).fit(x[:1200], y[:1200])
    model = softmax_lr_onnx(clf.coef_, clf.intercept_)
    ev = FidelityEvaluator(OnnxOracle(model), x[1200:], FidelityEvaluator.uniform_inputs(500, (64,), 0, 16))
    return model, ev, x[1200:]


def test_equation_solving_copies_a_dev_key_capsule_with_d_plus_1_queries(tmp_path: Path, provider_key: ProviderKey,
                                                                          digits_lr) -> None:  # type: ignore[no-untyped-def]
    model, ev, _ = digits_lr
    packed = pack_model(model, tmp_path / "lr.capsule", provider_key, name="lr")
    with packed.open(tmp_path) as cap:
        oracle = CapsuleOracle(cap)
        res = extract_softmax(oracle, 64, low=0.0, high=16.0, evaluator=ev)
    assert res.queries_spent == oracle.queries_spent == 65 and res.stopped == "done"
    assert res.metrics["fidelity"] == 1.0 and res.metrics["fidelity_uniform"] == 1.0


def test_attack_on_a_licensed_capsule_stops_when_the_budget_is_exhausted(tmp_path: Path, platform,  # noqa: F811
                                                                         digits_lr) -> None:  # type: ignore[no-untyped-def]
    import mlcapsule

    model, ev, x_rest = digits_lr
    key = make_provider_key(tmp_path / "provider-key.pem").path
    res = mlcapsule.pack(model, tmp_path / "lr.capsule", provider_key=key, name="lr")
    m = res.manifest
    files = ProviderFiles(key, res.capsule_path, res.key_path, str(m.capsule_id), m.version, m.policy.lease_size)
    (tmp_path / "server").mkdir()
    with harness(f"sqlite:///{tmp_path / 'server' / 'server.db'}", files, platform, budget=40) as h, \
            serve_in_thread(h.app) as url:
        with mlcapsule.open_capsule(files.capsule_path, trust=mlcapsule.UnsafeTrustManifestKey(),
                                    state_dir=tmp_path / "state", platform_dir=platform.dir) as cap:
            cap.setup(token=h.token, server=url)
            oracle = CapsuleOracle(cap)
            attack = extract_softmax(oracle, 64, low=0.0, high=16.0, evaluator=ev)
            status = cap.status()["license_status"]
            # Nothing more to be had: a further attack stops at once, having spent nothing.
            more = membership_inference(CapsuleOracle(cap), x_rest[:5], x_rest[5:10])
    assert attack.stopped == "capsule budget" and attack.exhausted
    assert attack.queries_spent == oracle.queries_spent == 40 == len(oracle.log.inputs())
    assert status["answered"] == 40 and status["remaining"] == 0
    assert attack.model is not None and attack.metrics["fidelity"] < 1.0  # 40 < d + 1 equations
    assert more.stopped == "capsule budget" and more.queries_spent == 0
