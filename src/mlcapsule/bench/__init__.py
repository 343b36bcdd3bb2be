"""Benchmarks of mlcapsule against plain ONNX Runtime and against the MLCapsule paper.

``mlcapsule bench`` (or ``python benchmarks/run.py``) runs the suites, writes one JSON file per
suite to ``benchmarks/results/`` and renders all results found there as ``BENCHMARKS.md``:

* ``dense``: the paper's Table 1, dense layers 256² … 4096², batch 1;
* ``conv``: Table 2, 3×3 and depthwise-separable convolutions;
* ``networks``: VGG-16 and MobileNetV2 at 224×224: cold start, steady state, memory, streaming;
* ``fixed``: the fixed cost per query on the digits MLP (IPC, budget).
* ``defenses``: what the enclave's defenses (issue 12) cost per query, beside the undefended capsule.

Every suite measures plain ONNX Runtime in the same run, with the same model, threads and batch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ._common import Workspace, environment, load_average
from .report import load_results, render
from .suites import SUITES

__all__ = ["SUITES", "run"]


def run(suites: Sequence[str] | None = None, *, quick: bool = False, results_dir: str | os.PathLike[str] | None = None,
        markdown: str | os.PathLike[str] | None = None, threads: int | None = None,
        workdir: str | os.PathLike[str] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``suites`` (default: all), write their JSON results and re-render the markdown.

    Quick mode uses small models and few repetitions and writes to ``benchmarks/results/quick``
    (and its own ``BENCHMARKS.md`` there), so it never overwrites a full run's results.
    """
    names = list(suites or SUITES)
    for n in names:
        if n not in SUITES:
            raise ValueError(f"unknown suite {n!r}: choose from {', '.join(SUITES)}")
    results = Path(results_dir) if results_dir else Path("benchmarks/results") / ("quick" if quick else "")
    md = Path(markdown) if markdown else (results / "BENCHMARKS.md" if quick else Path("BENCHMARKS.md"))
    results.mkdir(parents=True, exist_ok=True)
    threads = threads or os.cpu_count() or 1
    tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="mlcapsule-bench-"))
    ws = Workspace(tmp, threads=threads, quick=quick, log=log)
    done: dict[str, Any] = {}
    try:
        for n in names:
            log(f"suite {n}{' (quick)' if quick else ''}")
            t0 = time.perf_counter()
            env = environment(threads)
            res = SUITES[n](ws)
            res.setdefault("load_average_after", load_average())
            res["environment"] = env
            res["quick"] = quick
            res["seconds"] = time.perf_counter() - t0
            (results / f"{n}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
            done[n] = res
            log(f"suite {n}: {res['seconds']:.0f} s")
    finally:
        if not workdir:
            shutil.rmtree(tmp, ignore_errors=True)
    cmd = "mlcapsule bench" + (" --quick" if quick else "")
    md.write_text(render(load_results(results), command=cmd))
    log(f"wrote {md} and {results}/*.json")
    return done
