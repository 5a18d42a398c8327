"""The package's layering: stages never import each other, and nothing imports in a circle.

Stages (convert, train, export, eval, bench-speed, plan, verify) sit on shared layers: the artifact layout,
key maps, HF I/O, config, errors and the model code. Only the demo (the pipeline) and the CLI sit above them and
call the stages' public functions. Imports are read from the source (module level and inside functions), so a
lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import factorllm_ds

PACKAGE = Path(factorllm_ds.__file__).parent
STAGES = {"convert", "train", "export", "evaluate", "speed", "plan", "verify"}
ABOVE_STAGES = {"pipeline", "cli", "__main__"}


def imports_of(path: Path) -> set[str]:
    """factorllm_ds modules (first component below the package) that ``path`` imports anywhere."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("factorllm_ds"):
            parts = node.module.split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from factorllm_ds import x, y
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("factorllm_ds."))
    return found


def graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    return {name: imports_of(path) & set(modules) - {name} for name, path in modules.items()}


def test_no_stage_imports_another_stage():
    bad = sorted(f"{mod} imports {dep}" for mod, deps in graph().items() if mod in STAGES
                 for dep in deps if dep in STAGES)
    assert not bad, bad


def test_shared_layers_import_no_stage_and_nothing_imports_the_demo_or_cli():
    g = graph()
    shared = set(g) - STAGES - ABOVE_STAGES
    bad = sorted(f"{mod} imports {dep}" for mod in shared for dep in g[mod] if dep in STAGES | ABOVE_STAGES)
    bad += sorted(f"{mod} imports {dep}" for mod in STAGES for dep in g[mod] if dep in ABOVE_STAGES)
    assert not bad, bad


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycle.extend(stack[stack.index(dep):] + [node, dep] if dep in stack else [node, dep])
                return True
            if state.get(dep) is None and visit(dep, stack + [node]):
                return True
        state[node] = 2
        return False

    assert not any(visit(n, []) for n in sorted(g) if n not in state), " -> ".join(cycle)


def test_the_checker_sees_a_stage_import(tmp_path):
    """The checks above are only as good as the parser: a planted stage-to-stage import must show up."""
    planted = tmp_path / "mod.py"
    planted.write_text("def f():\n    from factorllm_ds.train import TrainConfig\n    from factorllm_ds import convert\n")
    assert imports_of(planted) == {"train", "convert"}



def literal_defaults(path: Path) -> list[tuple[str, str, str]]:
    """(class, field, literal) for each dataclass field whose ``arg(..., default=...)`` is written as a literal."""
    found = []
    for cls in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)):
        for stmt in cls.body:
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(stmt.value, ast.Call)):
                continue
            for kw in stmt.value.keywords:
                if kw.arg == "default" and isinstance(kw.value, ast.Constant) and kw.value.value not in (None, False):
                    found.append((cls.name, stmt.target.id, repr(kw.value.value)))
    return found


def test_no_default_is_written_twice():
    """The same flag with the same literal default in two configs is one default written twice: it belongs in a
    shared base class or constant that both derive from (a different value, e.g. the demo's lr, is a choice)."""
    seen: dict[tuple[str, str], list[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        for cls, name, value in literal_defaults(path):
            seen.setdefault((name, value), []).append(f"{path.stem}.{cls}")
    # The same number for different things: the demo's training sequence length vs bench-speed's prompt length.
    unrelated = {("seq_len", "256")}
    twice = {key: owners for key, owners in seen.items() if len(owners) > 1 and key not in unrelated}
    assert not twice, twice


def test_the_default_checker_sees_a_literal(tmp_path):
    planted = tmp_path / "mod.py"
    planted.write_text("class A:\n    x: int = arg('h', default=3)\n    y: str = arg('h', default=NAME)\n")
    assert literal_defaults(planted) == [("A", "x", "3")]
