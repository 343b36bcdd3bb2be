"""Issue 11, item 17: `bench --quick` writes only where git does not track."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)


def test_bench_quick_output_is_not_tracked():
    if _git("rev-parse", "--git-dir").returncode != 0:
        pytest.skip("not a git checkout")
    assert _git("ls-files", "benchmarks/results/quick").stdout.strip() == ""
    for name in ("BENCHMARKS.md", "dense.json", "conv.json"):
        assert _git("check-ignore", "-q", f"benchmarks/results/quick/{name}").returncode == 0
    # The quick run's default folder is that ignored one.
    import inspect

    from mlcapsule import bench

    assert '"quick" if quick' in inspect.getsource(bench.run)
