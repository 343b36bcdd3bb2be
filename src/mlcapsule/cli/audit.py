"""``mlcapsule audit CAPSULE``: the provider's report on what the capsule's answers give away."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

ATTACK_NAMES = ("equation-solving", "uniform", "knockoff", "jbda", "membership", "kennen")


@click.command("audit")
@click.argument("capsule", type=click.Path(exists=True, dir_okay=False))
@click.option("--unsafe-dev-key", type=click.Path(exists=True, dir_okay=False),
              help="The capsule's content key file [default: CAPSULE.key]: the audit decrypts the plain model in "
                   "memory (the undefended baseline) and opens the capsule with it (the defended runs).")
@click.option("--attack", "attacks", multiple=True, type=click.Choice(ATTACK_NAMES),
              help="An attack to run (repeatable) [default: uniform, knockoff, jbda, membership].")
@click.option("--out", "out_dir", default="audit-report", show_default=True, type=click.Path(file_okay=False),
              help="Where report.md, report.json and the PNG plots go.")
@click.option("--quick", is_flag=True, help="Small budgets (960 queries per extraction attack): about a minute.")
@click.option("--queries", type=click.IntRange(1), help="Queries per extraction attack [default: 960 quick, 4000].")
@click.option("--model", type=click.Path(exists=True, dir_okay=False),
              help="The plain model.onnx as the undefended baseline, instead of decrypting the capsule's.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              help="Held-out inputs (.npy): fidelity, accuracy cost, the attacker's natural data and non-members "
                   "[default for the demo's shapes: the built-in digits].")
@click.option("--labels", type=click.Path(exists=True, dir_okay=False), help="Their labels (.npy).")
@click.option("--members", type=click.Path(exists=True, dir_okay=False),
              help="Training inputs (.npy), the members for membership inference.")
@click.option("--member-labels", type=click.Path(exists=True, dir_okay=False), help="Their labels (.npy).")
@click.option("--transfer", type=click.Path(exists=True, dir_okay=False),
              help="Natural inputs of another distribution (.npy) for Knockoff Nets.")
@click.option("--low", type=float, help="The input domain's lower bound [default: the data's minimum].")
@click.option("--high", type=float, help="The input domain's upper bound [default: the data's maximum].")
@click.option("--target", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.9, show_default=True,
              help="The fidelity the report counts queries to.")
@click.option("--check-every", type=click.IntRange(1), default=10, show_default=True,
              help="Queries between two reads of the capsule's defense state (the first-flagged resolution).")
@click.option("--state-dir", type=click.Path(file_okay=False),
              help="Also attack the capsule as the client set up in this state folder sees it (spends its budget).")
@click.option("--yes", is_flag=True, help="Confirm spending the license's budget with --state-dir.")
@click.option("--seed", type=int, default=0, show_default=True)
def audit(capsule: str, unsafe_dev_key: str | None, attacks: tuple[str, ...], out_dir: str, quick: bool,
          queries: int | None, model: str | None, data: str | None, labels: str | None, members: str | None,
          member_labels: str | None, transfer: str | None, low: float | None, high: float | None, target: float,
          check_every: int, state_dir: str | None, yes: bool, seed: int) -> None:
    """Attack CAPSULE with and without its defenses and write the provider's report.

    How many queries copy the model to 90 % fidelity, at which query each attack is flagged, the
    membership AUC with and without the defenses (and at each c of Algorithm 1), and what each
    defense costs in accuracy: report.md, report.json and PNG plots in --out."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..audit import AuditOptions, audit as run
    from ..enclave.errors import UsageError
    from .main import console, err_console

    if state_dir and not yes:
        raise UsageError("--state-dir attacks the licensed capsule and spends its budget",
                         hint="add --yes to confirm")
    if state_dir and not Path(state_dir).is_dir():
        raise UsageError(f"no state folder at {state_dir}", hint="pass the --state-dir the client was set up with")
    key = Path(unsafe_dev_key) if unsafe_dev_key else Path(capsule + ".key")
    if not key.is_file():
        raise UsageError(f"no content key file at {key}", hint="pass --unsafe-dev-key CAPSULE.key")
    audit_data = _data(data, labels, members, member_labels, transfer, low, high, seed)
    options = AuditOptions(attacks=tuple(attacks) or AuditOptions().attacks, quick=quick, seed=seed, target=target,
                           check_every=check_every, queries=queries)
    err_console.print("[yellow]note:[/] the audit decrypts the model in this process with the content key "
                      "(--unsafe-dev-key): run it at the provider, never on a client", soft_wrap=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=err_console, transient=False) as bar:
        task = bar.add_task("audit", total=None)

        def progress(what: str, done: int, total: int) -> None:
            bar.update(task, description=what, completed=done, total=total)

        report = run(capsule, out_dir, dev_key=key, data=audit_data, options=options, model=model,
                     state_dir=state_dir, progress=progress)
    _print_summary(console, report, Path(out_dir))


def _data(data: str | None, labels: str | None, members: str | None, member_labels: str | None,
          transfer: str | None, low: float | None, high: float | None, seed: int) -> Any:
    from ..audit import AuditData, load_array, split_heldout
    from ..enclave.errors import UsageError

    if data is None:
        if labels or members or member_labels or transfer or low is not None or high is not None:
            raise UsageError("--labels, --members, --transfer, --low and --high go with --data")
        return None  # the built-in digits, for a capsule with the demo's shapes
    if labels is None:
        raise UsageError("--data needs --labels (the held-out labels)")
    if (members is None) != (member_labels is None):
        raise UsageError("--members and --member-labels go together")
    x = load_array(data, "--data").astype("float32")
    x_eval, y_eval, x_pool, y_pool = split_heldout(x, load_array(labels, "--labels"), seed=seed)
    out = AuditData(x_eval, y_eval, x_pool, y_pool, source=f"--data {data}",
                    low=float(x.min()) if low is None else low, high=float(x.max()) if high is None else high)
    if members is not None and member_labels is not None:
        out.members = load_array(members, "--members").astype("float32")
        out.member_labels = load_array(member_labels, "--member-labels").astype("int64").ravel()
    if transfer is not None:
        out.transfer = load_array(transfer, "--transfer").astype("float32")
        out.transfer_source = f"--transfer {transfer}"
    if not out.high > out.low:
        raise UsageError(f"the input domain needs low < high, got [{out.low}, {out.high}]")
    return out


def _print_summary(console: Any, report: dict[str, Any], out: Path) -> None:
    s = report["summary"]
    target = s["target"]
    console.print(f"[bold]audit of {report['capsule']['name']}[/] in {report['seconds']:.0f} s; report in {out}/")
    for attack, runs in s["queries_to_target_fidelity"].items():
        for setting, q in runs.items():
            best = s["best_fidelity"][attack][setting]
            reached = f"{target:.0%} fidelity at {q} queries" if q is not None else f"{target:.0%} not reached"
            best_s = "–" if best is None else f"{best:.3f}"
            console.print(f"  {attack:<16} {setting:<9} {reached} (best {best_s})")
    for attack, runs in s["first_flagged"].items():
        for setting, f in runs.items():
            when = f"flagged at query {f['first_flagged']}" if f["first_flagged"] is not None else "never flagged"
            console.print(f"  {attack:<16} {setting:<9} {when} ({f['queries_spent']} queries spent)")
    for setting, kinds in s["membership"].items():
        e = kinds.get("entropy", {})
        if e:
            console.print(f"  membership       {setting:<9} entropy AUC {e['auc']:.3f}, max(AUC, 1-AUC) "
                          f"{e['best_auc']:.3f}, TPR@1%FPR {e['tpr_at_1pct_fpr']:.3f}")
    acc = s["accuracy"]
    if acc.get("plain") is not None:
        line = f"  accuracy         plain {acc['plain']:.3f}"
        if acc.get("defended") is not None:
            line += f", defended {acc['defended']:.3f}"
        console.print(line)
