"""The pieces of the report: sections, tables, figures, the machine, and the Markdown file."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Section", "Figures", "table", "fmt", "machine", "write_report"]


def fmt(v: Any, digits: int = 3) -> str:
    """A number for a table: ints with thousands separators, floats with ``digits`` decimals."""
    if v is None:
        return "–"
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (int, np.integer)):
        return f"{int(v):,}"
    if isinstance(v, (float, np.floating)):
        if not np.isfinite(v):
            return "–"
        return f"{float(v):.{digits}f}"
    return str(v)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(v, digits) for v in row) + " |")
    return "\n".join(lines)


@dataclass
class Section:
    """One part of the evaluation: its Markdown, its numbers (for the JSON), its time."""

    key: str
    title: str
    text: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # what was cut or is weaker than asked

    def add(self, *paragraphs: str) -> None:
        self.text.extend(paragraphs)

    def markdown(self) -> str:
        return f"## {self.title}\n\n" + "\n\n".join(self.text) + "\n"


class Figures:
    """PNG figures in ``folder`` with matplotlib's Agg backend, if matplotlib is installed."""

    def __init__(self, folder: Path, link_prefix: str) -> None:
        self.folder = folder
        self.link_prefix = link_prefix
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            self._plt: Any = plt
        except ImportError:
            self._plt = None

    @property
    def available(self) -> bool:
        return self._plt is not None

    @contextmanager
    def figure(self, name: str, ncols: int = 1, width: float = 5.0, height: float = 3.6) -> Iterator[Any]:
        """Yields the axes (a list when ``ncols`` > 1), or None without matplotlib; saves ``name``.png."""
        if self._plt is None:
            yield None
            return
        fig, axes = self._plt.subplots(1, ncols, figsize=(width * ncols, height), squeeze=False)
        try:
            yield list(axes[0]) if ncols > 1 else axes[0][0]
            fig.tight_layout()
            self.folder.mkdir(parents=True, exist_ok=True)
            fig.savefig(self.folder / f"{name}.png", dpi=110)
        finally:
            self._plt.close(fig)

    def link(self, name: str, alt: str) -> str:
        if self._plt is None or not (self.folder / f"{name}.png").exists():
            return ""
        return f"![{alt}]({self.link_prefix}/{name}.png)"


def _version(module: str) -> str:
    try:
        mod = __import__(module)
        return str(getattr(mod, "__version__", "?"))
    except ImportError:
        return "not installed"


def machine() -> dict[str, Any]:
    """The machine the evaluation ran on."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    from .. import __version__

    return {"cpu": cpu, "cpus": os.cpu_count(), "usable_cpus": usable, "os": platform.platform(),
            "python": sys.version.split()[0], "mlcapsule": __version__,
            "numpy": _version("numpy"), "torch": _version("torch"), "onnxruntime": _version("onnxruntime"),
            "scikit-learn": _version("sklearn"), "matplotlib": _version("matplotlib"),
            "torch_threads": os.environ.get("MLCAPSULE_TORCH_THREADS", "1")}


def write_report(out: Path, head: str, sections: Sequence[Section], tail: str, figures_folder: Path,
                 results: dict[str, Any]) -> None:
    """EVALUATION.md (atomically) and ``results.json`` beside the figures."""
    body = head + "\n" + "\n".join(s.markdown() for s in sections) + "\n" + tail
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(body)
    os.replace(tmp, out)
    figures_folder.mkdir(parents=True, exist_ok=True)
    (figures_folder / "results.json").write_text(json.dumps(_jsonable(results), indent=1, sort_keys=True) + "\n")


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, (str, int)) or obj is None:
        return obj
    return repr(obj)


class Clock:
    """Times named steps; ``log`` gets a line when each ends."""

    def __init__(self, log: Callable[[str], None]) -> None:
        self.log = log
        self.steps: dict[str, float] = {}

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.steps[name] = self.steps.get(name, 0.0) + time.perf_counter() - t0
            self.log(f"  {name}: {self.steps[name]:.1f} s")
