"""The layers contract: every package of ringreduce imports only the layers below it, no cycles.

import-linter checks the layers in pyproject.toml (indirect imports included);
the cycle check below also counts imports made inside functions.
"""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "ringreduce"


def test_layers_contract_is_kept():
    exe = shutil.which("lint-imports", path=os.path.dirname(sys.executable)) or shutil.which("lint-imports")
    assert exe, "import-linter is not installed (pip install -e '.[test]')"
    out = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-5000:] + out.stderr[-2000:]
    assert "1 kept, 0 broken" in out.stdout, out.stdout[-3000:]


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _edges() -> dict:
    mods = {_module(p): p for p in PKG.rglob("*.py")}

    def target(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for mod, path in mods.items():
        base = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):      # function-level imports too
            if isinstance(node, ast.Import):
                out |= {t for a in node.names if (t := target(a.name))}
            elif isinstance(node, ast.ImportFrom):
                parts = base.split(".")
                if node.level > 1:
                    parts = parts[:len(parts) - (node.level - 1)]
                src = ".".join(parts + [node.module]) if node.level and node.module else \
                    ".".join(parts) if node.level else node.module
                for a in node.names:
                    t = target(f"{src}.{a.name}") or target(src)
                    if t:
                        out.add(t)
        graph[mod] = {t for t in out if t != mod and t.startswith("ringreduce")}
    return graph


def test_no_import_cycle_even_inside_functions():
    graph = _edges()
    index, low, stack, on, cycles = {}, {}, [], set(), []
    counter = [0]
    sys.setrecursionlimit(10000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_engine_messages_use_no_pickle():
    """Exit notices, stall and deadlock queries, the plan and mismatch reports are fixed-layout
    bytes; only the user's object collectives pickle (their objects, not ours)."""
    engine_modules = [*(PKG / "liveness").glob("*.py"), *(PKG / "transport").glob("*.py"),
                      *(PKG / "policy").glob("*.py"), PKG / "runtime" / "agree.py",
                      PKG / "runtime" / "tiny.py", PKG / "runtime" / "context.py"]
    for path in engine_modules:
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                 for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert "pickle" not in names, f"{path.relative_to(ROOT)} imports pickle"
        lowercase = [n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call)
                     and isinstance(n.func, ast.Attribute)
                     and n.func.attr in ("allgather", "bcast", "gather", "isend", "recv", "sendrecv")
                     and not (isinstance(n.func.value, ast.Name) and n.func.value.id in ("p2p",))]
        assert not lowercase, f"{path.relative_to(ROOT)} uses mpi4py's pickling calls {lowercase}"
