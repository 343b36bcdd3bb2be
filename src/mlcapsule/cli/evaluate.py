"""``mlcapsule evaluate``: write EVALUATION.md, the reproduction of the papers' results (issue 13)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("evaluate")
@click.option("--quick", is_flag=True, help="A small run for CI (a few minutes); its numbers only check the pipeline.")
@click.option("--out", "out", default="EVALUATION.md", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path),
              help="The Markdown report; figures and results.json go to evaluation/ beside it.")
@click.option("--cache", "cache", type=click.Path(file_okay=False, path_type=Path),
              help="Where trained victims, the kennen zoo and crafted queries are kept "
                   "(default: $MLCAPSULE_CACHE/evaluation or ~/.cache/mlcapsule/evaluation).")
@click.option("--figures", "figures", type=click.Path(file_okay=False, path_type=Path),
              help="The folder of the figures and results.json (default: evaluation/ beside --out).")
@click.option("--part", "parts", multiple=True,
              type=click.Choice(["kennen", "prada", "membership", "tramer", "stronger"]),
              help="Run only these parts (repeatable; default: all).")
def evaluate(quick: bool, out: Path, cache: Path | None, figures: Path | None, parts: tuple[str, ...]) -> None:
    """Reproduce MLCapsule's Section 7 and Tramèr et al.'s query counts beside the papers' numbers,
    with adaptive attackers and what the budget alone buys; write EVALUATION.md (the full run takes
    up to an hour on 2 cores; needs torch, scikit-learn and the shared datasets)."""
    import sys

    from ..evaluation import PARTS, run

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    run(out, quick=quick, cache=cache, figures=figures, parts=tuple(parts) or PARTS, log=log)
