"""The package's layering, read from its imports (every import statement, also those inside
functions): no part imports a part above it, blend never reaches into the store, the faces (CLI,
service, adapters, pipeline) use the engine and not blend or model internals, and module-level
imports form no cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import chunkcache

ROOT = Path(chunkcache.__file__).parent
LOWER = {"kv", "errors", "timing", "triton_jit", "device", "codec", "store", "model", "blend", "retriever"}
UPPER = {"engine", "scheduler", "generation", "craft_variants", "pipeline", "cli", "demo", "api", "integrations",
         "jobs", "eval"}
FACES = {"cli", "demo", "pipeline", "api", "integrations"}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(top_level_only: bool) -> dict[str, set[str]]:
    """Per module, the chunkcache modules it imports (``from pkg import sub`` counts as ``pkg.sub``)."""
    paths = list(ROOT.rglob("*.py"))
    modules = {_module(p) for p in paths}
    out: dict[str, set[str]] = {}
    for path in paths:
        tree = ast.parse(path.read_text(), str(path))
        nodes = tree.body if top_level_only else list(ast.walk(tree))
        found: set[str] = set()
        for node in nodes:
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = {f"{node.module}.{a.name}" for a in node.names} & modules
                found.update(subs or {node.module})
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        out[_module(path)] = {m for m in found if m == "chunkcache" or m.startswith("chunkcache.")}
    return out


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_part_imports_a_part_above_it_and_blend_never_reaches_the_store() -> None:
    wrong = [(m, t) for m, targets in _imports(False).items() for t in targets
             if (_part(m) in LOWER and _part(t) in UPPER) or (_part(m) == "blend" and _part(t) == "store")]
    assert not wrong, wrong


def test_faces_use_the_engine_not_blend_or_model_internals() -> None:
    wrong = [(m, t) for m, targets in _imports(False).items() for t in targets
             if _part(m) in FACES and _part(t) in {"blend", "model"}]
    assert not wrong, wrong


def test_module_level_imports_form_no_cycle() -> None:
    graph = _imports(True)
    modules = set(graph)

    def resolve(target: str) -> str | None:  # `from chunkcache.x import y` may name a module or a name in x
        return target if target in modules else None

    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(m: str, stack: list[str]) -> bool:
        state[m] = 1
        for t in sorted(filter(None, map(resolve, graph.get(m, ())))):
            if state.get(t) == 1:
                cycle.extend(stack[stack.index(t):] + [m, t] if t in stack else [m, t])
                return True
            if state.get(t) is None and visit(t, stack + [m]):
                return True
        state[m] = 2
        return False

    assert not any(visit(m, []) for m in sorted(modules) if state.get(m) is None), " -> ".join(cycle)


def test_the_checks_see_a_violation() -> None:
    """The rules above are not vacuous: the tree has imports of each kind they read."""
    graph = _imports(False)
    assert "chunkcache.engine" in graph["chunkcache.api.service"]
    assert any(_part(t) == "store" for t in graph["chunkcache.engine"])
