"""Black-box attacks against any oracle: a plain ONNX model, a capsule opened with the dev key,
or a licensed capsule that charges its budget (client-side research code, never run in the
enclave).

Importing this package is cheap (numpy only): torch is imported by the attacks that train a
substitute, when they run, and onnxruntime by :class:`OnnxOracle`.

* Oracles (:mod:`.oracle`): :class:`Oracle`, :class:`OnnxOracle`, :class:`CapsuleOracle`,
  :class:`CallableOracle`, :class:`QueryBudgetExhausted`, :func:`rounding`,
  :func:`labels_only`, :func:`top_k`.
* Results (:mod:`.results`): :class:`AttackResult`, :class:`Trace`, :class:`FidelityEvaluator`.
* Metrics (:mod:`.metrics`): :func:`agreement`, :func:`roc_auc`, :func:`best_auc`,
  :func:`tpr_at_fpr`, :func:`jensen_shannon`.
* Tramèr et al. (:mod:`.equation_solving`): :func:`extract_logistic`, :func:`extract_softmax`,
  :func:`extract_mlp`.
* Path finding on decision trees (:mod:`.path_finding`): :func:`extract_tree`.
* Retraining (:mod:`.extraction`): :func:`jbda`, :func:`knockoff`, :func:`uniform_retraining`,
  :func:`retraining`.
* Membership inference (:mod:`.membership`): :func:`membership_scores`,
  :func:`membership_report`, :func:`membership_inference`, :class:`ThresholdAttack`.
* Tramèr et al.'s label-only retraining (:mod:`.retraining_labels`): :func:`line_search_retraining`,
  :func:`adaptive_retraining`, :func:`compare_label_only_retraining`.
* Shokri et al.'s shadow models (:mod:`.shadow`): :func:`train_shadow_models`,
  :func:`fit_shadow_attack`, :func:`shadow_membership`, :func:`shadow_model_attack`.
* The adaptive attacker who inverts the MLCapsule paper's Algorithm 1 (:mod:`.adaptive`):
  :func:`invert_mi_noise`, :class:`InversionResult`.

See ``docs/attacks.md`` for each attack's threat model, parameters and paper.
"""

from __future__ import annotations

# Every module imported here needs numpy only; torch, onnxruntime and scikit-learn are imported
# inside the functions that use them (torch through .substitute).
from .adaptive import InversionResult, invert_mi_noise
from .equation_solving import extract_logistic, extract_mlp, extract_softmax
from .extraction import jbda, knockoff, retraining, uniform_retraining
from .membership import (
    MembershipReport,
    ThresholdAttack,
    membership_inference,
    membership_report,
    membership_scores,
)
from .metrics import agreement, best_auc, entropy, jensen_shannon, roc_auc, roc_curve, tpr_at_fpr
from .models import NumpyMLP, SoftmaxRegression, TorchPredictor
from .oracle import (
    BaseOracle,
    CallableOracle,
    CapsuleOracle,
    OnnxOracle,
    Oracle,
    QueryBudgetExhausted,
    QueryLog,
    as_labels,
    labels_only,
    rounding,
    top_k,
)
from .path_finding import BoxTree, extract_tree
from .results import AttackResult, FidelityEvaluator, Predictor, Trace
from .retraining_labels import adaptive_retraining, compare_label_only_retraining, line_search_retraining
from .shadow import (
    ShadowAttack,
    ShadowModel,
    fit_shadow_attack,
    shadow_membership,
    shadow_model_attack,
    train_shadow_models,
)

__all__ = [
    "AttackResult", "BaseOracle", "BoxTree", "CallableOracle", "CapsuleOracle", "FidelityEvaluator", "MembershipReport",
    "NumpyMLP", "OnnxOracle", "Oracle", "Predictor", "QueryBudgetExhausted", "QueryLog", "SoftmaxRegression",
    "ThresholdAttack", "TorchPredictor", "Trace", "agreement", "as_labels", "best_auc", "entropy",
    "extract_logistic", "extract_mlp", "extract_softmax", "extract_tree", "jbda", "jensen_shannon", "knockoff",
    "labels_only",
    "membership_inference", "membership_report", "membership_scores", "retraining", "roc_auc", "roc_curve",
    "rounding", "top_k", "tpr_at_fpr", "uniform_retraining",
    # issue 13: label-only retraining and shadow models
    "ShadowAttack", "ShadowModel", "adaptive_retraining", "compare_label_only_retraining", "fit_shadow_attack",
    "line_search_retraining", "shadow_membership", "shadow_model_attack", "train_shadow_models",
    # issue 13: the Algorithm-1 inverter
    "InversionResult", "invert_mi_noise",
]
