"""``mlcapsule audit``: the provider's report on what a capsule's answers give away.

:func:`audit` runs a chosen set of attacks from :mod:`mlcapsule.attacks` against a capsule: on
the plain model (decrypted in memory with the provider's content key: no defenses), on the
capsule opened with that key (its signed defenses, fresh state per attack), and optionally as a
licensed client sees it (a set-up ``state_dir``; this spends budget). It writes ``report.md``,
``report.json`` and PNG plots (matplotlib, imported only when the report is written).

It answers the provider's questions: how many queries copy the model to 90 % fidelity, at which
query each attack is flagged, the membership AUC (and max(AUC, 1 - AUC), TPR at 1 % FPR) with
and without the defenses and at each c of Algorithm 1, and what each defense costs in accuracy.
See ``docs/attacks.md`` ("Auditing a capsule").
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import AuditData, builtin_digits, load_array, looks_like_digits, split_heldout
from .run import ATTACKS, DEFAULT_ATTACKS, AuditOptions, Progress, run_audit
from .victim import CapsuleFacts, FlagLog, WatchedCapsuleOracle, plain_model, read_capsule

__all__ = ["ATTACKS", "DEFAULT_ATTACKS", "AuditData", "AuditOptions", "CapsuleFacts", "FlagLog", "Progress",
           "WatchedCapsuleOracle", "audit", "builtin_digits", "load_array", "looks_like_digits", "plain_model",
           "read_capsule", "run_audit", "split_heldout", "write_report"]


def write_report(report: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``report.json``, ``report.md`` and the plots into ``out_dir``; returns the files."""
    from .report import write_report as _write

    return _write(report, Path(out_dir))


def audit(capsule: str | Path, out_dir: str | Path, *, dev_key: str | Path | None = None,
          data: AuditData | None = None, options: AuditOptions | None = None, model: str | Path | None = None,
          state_dir: str | Path | None = None, progress: Progress | None = None,
          threads: int = 1) -> dict[str, Any]:
    """Audit ``capsule`` and write the report into ``out_dir``; returns the report dict.

    ``dev_key`` defaults to ``CAPSULE.key``. Without ``data``, a capsule with the demo's shapes
    (64 features, 10 classes) is audited on the built-in digits data."""
    from ..errors import UsageError

    capsule = Path(capsule)
    key = Path(dev_key) if dev_key is not None else capsule.with_name(capsule.name + ".key")
    if not key.is_file():
        raise UsageError(f"no content key file at {key}", hint="pass --unsafe-dev-key CAPSULE.key")
    if data is None:
        facts = read_capsule(capsule)
        if not looks_like_digits(facts.input_shape, facts.n_classes):
            raise UsageError("the audit needs held-out data for this capsule",
                             hint="pass --data x.npy --labels y.npy (and --members/--member-labels for "
                                  "membership inference)")
        data = builtin_digits(seed=(options or AuditOptions()).seed)
    report = run_audit(capsule, dev_key=key, data=data, options=options, model=model, state_dir=state_dir,
                       progress=progress, threads=threads)
    write_report(report, out_dir)
    return report
