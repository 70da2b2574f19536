"""The rooms' import rules (docs/architecture.md, "Rooms import only downwards"), checked on the
source: every import of every file, lazy ones inside functions included, with no circle between
files either. A new import that runs against the layering fails here, naming the file."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE = {"files": set(), "parallel": {"files"}, "data": {"files"}, "models": {"parallel", "files", "data"}}
BASE["config"] = {"models", "data"} | BASE["models"]
BASE["checkpoint"] = {"models"} | BASE["models"]
BASE["planner"] = {"config"} | BASE["config"]
BASE["train"] = {"config", "checkpoint", "planner"} | BASE["config"] | BASE["checkpoint"]  # planner: MFU
BASE["launch"] = {"train"} | BASE["train"]
BASE["cli"] = {"launch", "planner", "benchmarks"} | BASE["launch"] | BASE["planner"]
BASE["benchmarks"] = BASE["cli"] - {"benchmarks"} | {"cli"}  # entry points too: they run the commands
MAY_IMPORT = BASE


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module(p): p for room in MAY_IMPORT for p in (ROOT / room).rglob("*.py")}


def _imports(name: str, path: Path, known: dict) -> set[str]:
    """The longtrain modules `path` imports (a `from pkg import mod` counts as importing mod)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith("longtrain."):
                target = node.module[len("longtrain."):]
            else:
                continue
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name[len("longtrain."):] for a in node.names if a.name.startswith("longtrain.")]
        else:
            continue
        out |= {c for c in candidates if c in known and c != name}
    return out


def _graph() -> dict[str, set[str]]:
    known = _modules()
    return {name: _imports(name, path, known) for name, path in known.items()}


def test_every_import_follows_the_layering():
    wrong = [f"{a} imports {b}: {a.split('.')[0]}/ may import only {sorted(MAY_IMPORT[a.split('.')[0]]) or 'nothing'}"
             for a, targets in sorted(_graph().items()) for b in sorted(targets)
             if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in MAY_IMPORT[a.split(".")[0]]]
    assert wrong == [], "\n".join(wrong)


def test_no_import_circle_between_files():
    graph = _graph()
    circles, index, low, stack, on = [], {}, {}, [], set()

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert circles == [], circles


def test_the_checker_sees_a_violation(monkeypatch):
    """The rule bites: a planner file importing the training loop is reported."""
    graph = {"planner.x": {"train.run"}, "train.run": set()}
    monkeypatch.setattr(sys.modules[__name__], "_graph", lambda: graph)
    try:
        test_every_import_follows_the_layering()
    except AssertionError as e:
        assert "planner.x imports train.run" in str(e)
    else:
        raise AssertionError("a planner -> train import was not reported")
