"""Layout: no import cycle among mlcapsule's modules, computed from each module's AST.

Only module-level imports count (those inside ``if``/``try`` at the top level included, those
under ``if TYPE_CHECKING:`` not): they are what runs when a module is imported. Imports inside
functions are deferred on purpose and may point anywhere.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import mlcapsule

ROOT = Path(mlcapsule.__file__).resolve().parent


def _modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package)."""
    out = {}
    for f in sorted(ROOT.rglob("*.py")):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (f, is_pkg)
    return out


def _top_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            test = node.test
            if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                    isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
                yield from _top_level(node.orelse)
                continue
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_level(node.body)
            for handler in node.handlers:
                yield from _top_level(handler.body)
            yield from _top_level(node.orelse)
            yield from _top_level(node.finalbody)


def import_graph() -> dict[str, set[str]]:
    """Module -> the mlcapsule modules it imports at module level (``from pkg import sub`` counts
    as an import of ``pkg.sub`` when that is a module, else of ``pkg``)."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for name, (path, is_pkg) in mods.items():
        package = name.split(".") if is_pkg else name.split(".")[:-1]
        for node in _top_level(ast.parse(path.read_text(), str(path)).body):
            if isinstance(node, ast.Import):
                graph[name] |= {a.name for a in node.names if a.name in mods}
                continue
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                if sub in mods:
                    graph[name].add(sub)
                elif target in mods:
                    graph[name].add(target)
    return graph


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module, or a module importing itself
    (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, edges = work[-1]
            for w in edges:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1 or v in graph[v]:
                        found.append(sorted(comp))
    return found


def test_the_cycle_finder_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_import_graph_sees_relative_and_absolute_imports() -> None:
    graph = import_graph()
    assert "mlcapsule.enclave.runtime.planner" in graph["mlcapsule.enclave.runtime.streaming"]  # from . import planner
    assert "mlcapsule.enclave.errors" in graph["mlcapsule.enclave.runtime.planner"]  # from ..errors import ...
    assert "mlcapsule.attestation.tpm.marshal" in graph["mlcapsule.attestation.tpm.verify"]
    assert "mlcapsule.client" not in graph["mlcapsule"]  # imported lazily, in __getattr__


def test_mlcapsule_has_no_import_cycle() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_client_http_transport_is_outside_the_server_package() -> None:
    from mlcapsule.provider_client import ProviderClient
    from mlcapsule.server.client import ProviderClient as Compat

    assert Compat is ProviderClient
    code = ("import sys, mlcapsule.provider_client; print(sorted(m for m in sys.modules "
            "if m.startswith('mlcapsule.server') or m in ('fastapi', 'sqlalchemy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# -- the trust boundary ---------------------------------------------------------------------------
def _all_imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports too), as absolute names."""
    tree = ast.parse(path.read_text())
    rel = path.relative_to(ROOT.parent).with_suffix("")
    package = ".".join(rel.parts[:-1])
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
    return out


def test_the_measurement_covers_exactly_the_trusted_package_and_it_imports_nothing_untrusted() -> None:
    """The measurement hashes exactly one package directory, ``mlcapsule/enclave/``, every file in
    it and nothing else; none of it imports a module of ours outside that directory, nor a
    third-party package that is not pinned into the measurement (or the tpm backend's library)."""
    import sys

    from mlcapsule.enclave.measurement import PACKAGE_ROOT, PINNED, TRUSTED_ROOT, tcb_files

    assert TRUSTED_ROOT == PACKAGE_ROOT / "enclave"
    files = tcb_files()
    measured = {f.relative_to(PACKAGE_ROOT).as_posix() for f in files}
    on_disk = {f.relative_to(PACKAGE_ROOT).as_posix() for f in PACKAGE_ROOT.rglob("*.py")}
    assert measured == {m for m in on_disk if m.startswith("enclave/")}  # the whole directory, no exclusions
    assert "host.py" not in measured and "__init__.py" not in measured
    allowed_third_party = {d.replace("-", "_") for d in PINNED} | {"tpm2_pytss"}
    stdlib = set(sys.stdlib_module_names)
    bad = []
    for f in files:
        for mod in _all_imports(f):
            top = mod.split(".")[0]
            if top == "mlcapsule":
                if not (mod == "mlcapsule.enclave" or mod.startswith("mlcapsule.enclave.")):
                    bad.append(f"{f.relative_to(PACKAGE_ROOT)} imports {mod}")
            elif top not in stdlib and top not in allowed_third_party and top != "__future__":
                bad.append(f"{f.relative_to(PACKAGE_ROOT)} imports third-party {top}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_the_worker_runs_no_mlcapsule_code_outside_the_trusted_package() -> None:
    """Booted as the host boots it, the worker (with both backends) imports only modules of the
    trusted package: not even ``mlcapsule/__init__.py`` runs in the enclave."""
    from mlcapsule.enclave.measurement import TRUSTED_ROOT
    from mlcapsule.host import BOOT_PRELUDE

    code = (BOOT_PRELUDE + "; import mlcapsule.enclave.worker, mlcapsule.enclave.backends.software, "
            "mlcapsule.enclave.backends.tpm; "
            "print('\\n'.join(f'{n} {getattr(m, \"__file__\", None)}' for n, m in sorted(sys.modules.items()) "
            "if n.split('.')[0] == 'mlcapsule'))")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(TRUSTED_ROOT.parents[1])],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split(" ", 1) for line in out.stdout.split("\n") if line]
    assert ["mlcapsule", "None"] in rows  # the bare namespace: __init__.py did not run
    outside = [r for r in rows if r[0] != "mlcapsule" and not Path(r[1]).resolve().is_relative_to(TRUSTED_ROOT)]
    assert len(rows) > 20 and not outside, outside


def test_every_cli_import_is_covered_by_the_start_up_ctrl_c_handler() -> None:
    """cli/main.py puts Python's Ctrl-C handler back with ``_restore_sigint()``: a module-level
    import after that call (a command registered at the end of the file) would show a
    KeyboardInterrupt traceback to a user who presses Ctrl-C during start-up."""
    tree = ast.parse((ROOT / "cli" / "main.py").read_text())
    restore = [n.lineno for n in tree.body if isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
               and getattr(n.value.func, "id", None) == "_restore_sigint"]
    imports = [n.lineno for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert len(restore) == 1 and max(imports) < restore[0], (restore, max(imports))
