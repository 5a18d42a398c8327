"""The package's layering, read from one table (:data:`TIERS`) and checked on the source.

From the bottom: the shipped model (``hf_model/``, copied into every converted folder, so it imports nothing of
the package but its own files), the shared layers (shape, config, key maps, artifact layout, HF I/O, checkpoint
rules, outputs, ...), the stages (convert, train, export, eval, bench-speed, plan, verify), each a room of one or
more modules that imports no other stage's, and above them the demo and the CLI, which call the stages' public
functions. A module imports only its own tier (its own stage, for a stage) and those below.

Every import counts: module level or inside a function, absolute or relative, and a string that names a module
(``importlib.import_module("factorllm_ds.train")``, the CLI's ``"factorllm_ds.train:TrainConfig"``). Each kind of
violation is planted in a throw-away package to prove the checker sees it.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import pytest

import factorllm_ds

PACKAGE = Path(factorllm_ds.__file__).parent

# Every module of the package (dotted below it; "__init__" is the package itself), by tier. A new module must be
# placed here: test_every_module_has_one_tier fails until it is.
TIERS: dict[str, set[str]] = {
    "shipped model": {"hf_model", "hf_model.configuration_factorllm", "hf_model.modeling_factorllm"},
    "shared": {"__init__", "assets", "checkpoints", "config", "convert_cost", "data", "distributed", "errors", "finite",
               "hf_io", "keys", "launcher", "layout", "locks", "modeling", "outputs", "preemption", "safe_load",
               "shape", "split", "structure"},
    "stage convert": {"convert", "calibration", "prune"},  # prune: convert's equal-compute baseline, same streaming
    "stage train": {"train", "ds_moe", "routing"},
    "stage export": {"export", "export_formats", "gguf_convert", "sources"},
    "stage eval": {"evaluate"},
    "stage bench-speed": {"speed"},
    "stage plan": {"plan"},
    "stage verify": {"verify"},
    "above": {"__main__", "cli", "pipeline"},
}
LEVEL = {"shipped model": 0, "shared": 1, "stage": 2, "above": 3}  # a module may import its level and below


def level(tier: str) -> int:
    return LEVEL["stage" if tier.startswith("stage ") else tier]


# ----------------------------------------------------------------------------- the checker


def modules_of(package: Path) -> dict[str, Path]:
    """Dotted module name (below the package) -> file, for every .py of ``package``."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package).with_suffix("").parts
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]  # a subpackage is named by its folder
        found[".".join(parts)] = path
    return found


def _resolve(dotted: str, modules: set[str]) -> str | None:
    """The longest known module ``dotted`` (below the package) names; None when it names none."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        if ".".join(parts[:n]) in modules:
            return ".".join(parts[:n])
    return None


def imports_of(path: Path, name: str, modules: set[str], package: str) -> set[str]:
    """The package's modules that module ``name`` (its file ``path``) imports, anywhere in the file."""
    here = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        here = []
    siblings = {m.split(".")[-1]: m for m in modules if m.split(".")[:-1] == here}
    found = set()

    def add(dotted: str | None) -> None:
        target = _resolve(dotted, modules) if dotted else "__init__"
        found.add(target or "__init__")

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:  # relative: from .x import y, from .. import z
            base = here[: len(here) - (node.level - 1)] if node.level - 1 <= len(here) else []
            stem = ".".join(base + (node.module.split(".") if node.module else []))
            for alias in node.names:
                full = f"{stem}.{alias.name}" if stem else alias.name
                add(full if full in modules else stem)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == package or node.module.startswith(package + "."):
                stem = node.module[len(package) + 1:]
                for alias in node.names:
                    full = f"{stem}.{alias.name}" if stem else alias.name
                    add(full if full in modules else stem)
            elif node.module.split(".")[0] in siblings:  # a shipped file's plain fallback: from sibling import x
                found.add(siblings[node.module.split(".")[0]])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == package or alias.name.startswith(package + "."):
                    add(alias.name[len(package) + 1:])
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            named = re.fullmatch(rf"{package}((?:\.\w+)+)(?::\w+)?", node.value)
            if named and _resolve(named[1][1:], modules):  # importlib.import_module(...), "pkg.mod:attr"
                found.add(_resolve(named[1][1:], modules))
    return found - {name}


def named_imports(path: Path, package: str) -> list[str]:
    """The imports of ``path`` that name the package (absolute): what a shipped file, loaded alone by
    transformers from a converted folder, cannot resolve even for its own siblings."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        found += [n for n in names if n == package or n.startswith(package + ".")]
    return found


def graph(package: Path) -> dict[str, set[str]]:
    modules = modules_of(package)
    return {name: imports_of(path, name, set(modules), package.name) for name, path in modules.items()}


def violations(g: dict[str, set[str]], tiers: dict[str, set[str]] = TIERS) -> list[tuple[str, str, str]]:
    """(rule, module, what it imports) for every import the tiers forbid, and every module without a tier."""
    tier = {m: t for t, ms in tiers.items() for m in ms}
    found = [("no tier", m, "") for m in sorted(g) if m not in tier]
    for m in sorted(g):
        for dep in sorted(g[m]):
            if m not in tier or dep not in tier:
                continue
            mine, theirs = tier[m], tier[dep]
            if mine == "shipped model" and theirs != mine:
                found.append(("the shipped model imports the package", m, dep))
            elif mine.startswith("stage ") and theirs.startswith("stage ") and mine != theirs:
                found.append(("a stage imports another stage", m, dep))
            elif level(theirs) > level(mine):
                found.append((f"{'a stage' if mine.startswith('stage ') else mine} imports {theirs}", m, dep))
    return found


def cycle(g: dict[str, set[str]]) -> list[str]:
    """One import cycle (its modules in order, the first repeated at the end), or []."""
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str]:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [node, dep] if dep in stack else [node, dep]
            if state.get(dep) is None and (found := visit(dep, stack + [node])):
                return found
        state[node] = 2
        return []

    return next((found for n in sorted(g) if n not in state and (found := visit(n, []))), [])


# ----------------------------------------------------------------------------- the package


def test_every_module_has_one_tier():
    listed = [m for ms in TIERS.values() for m in ms]
    assert len(listed) == len(set(listed)), "a module in two tiers"
    assert set(listed) == set(modules_of(PACKAGE)), {"no tier": set(modules_of(PACKAGE)) - set(listed),
                                                     "gone": set(listed) - set(modules_of(PACKAGE))}


def test_the_package_keeps_its_layers():
    bad = [f"{rule}: {m} imports {dep}" for rule, m, dep in violations(graph(PACKAGE))]
    assert not bad, bad


def test_no_import_cycle():
    assert not cycle(graph(PACKAGE)), " -> ".join(cycle(graph(PACKAGE)))


def test_the_shipped_files_name_no_package():
    from factorllm_ds.hf_model import MODEL_CODE_DIR, MODEL_CODE_FILES

    named = {name: named_imports(MODEL_CODE_DIR / name, "factorllm_ds") for name in MODEL_CODE_FILES}
    assert not any(named.values()), named


# ----------------------------------------------------------------------------- the checker sees each violation

PLANTED_TIERS = {"shipped model": {"model", "model.config", "model.modeling"}, "shared": {"__init__", "errors", "util"},
                 "stage a": {"a", "a_help"}, "stage b": {"b"}, "above": {"cli"}}
CLEAN = {  # a package that keeps every rule, in every way of importing
    "__init__.py": "",
    "errors.py": "class E(Exception): ...\n",
    "util.py": "from pkg.errors import E\n",
    "a.py": "from pkg import util\nfrom .a_help import x\n\ndef f():\n    from pkg.errors import E\n",
    "a_help.py": "from . import errors\nx = 1\n",
    "b.py": "import pkg.util\n",
    "cli.py": "import importlib\nfrom pkg import a\nCOMMANDS = {'b': 'pkg.b:run'}\n",
    "model/__init__.py": "def register():\n    from pkg.model.config import C\n",
    "model/config.py": "class C: ...\n",
    "model/modeling.py": "try:\n    from .config import C\nexcept ImportError:\n    from config import C\n",
}
PLANTED = {  # kind -> (file, a line added to it, the violation the checker must report)
    "stage to stage, lazy": ("a.py", "def g():\n    from pkg.b import run\n",
                             ("a stage imports another stage", "a", "b")),
    "stage to stage, relative": ("b.py", "from .a_help import x\n", ("a stage imports another stage", "b", "a_help")),
    "stage to stage, by name": ("a_help.py", "import importlib\nB = importlib.import_module('pkg.b')\n",
                                ("a stage imports another stage", "a_help", "b")),
    "shared to stage": ("util.py", "from pkg import a\n", ("shared imports stage a", "util", "a")),
    "shared to above": ("errors.py", "def f():\n    import pkg.cli\n", ("shared imports above", "errors", "cli")),
    "stage to above": ("b.py", "from .cli import COMMANDS\n", ("a stage imports above", "b", "cli")),
    "shipped model to the package": ("model/modeling.py", "from pkg.errors import E\n",
                                     ("the shipped model imports the package", "model.modeling", "errors")),
    "shipped model to the package, relative": ("model/config.py", "from .. import util\n",
                                               ("the shipped model imports the package", "model.config", "util")),
    "a module without a tier": ("new.py", "", ("no tier", "new", "")),
}


def _package(root: Path, extra: tuple[str, str] | None = None) -> Path:
    files = dict(CLEAN)
    if extra:
        files[extra[0]] = files.get(extra[0], "") + extra[1]
    for name, text in files.items():
        (root / "pkg" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "pkg" / name).write_text(textwrap.dedent(text))
    return root / "pkg"


def test_the_clean_planted_package_passes(tmp_path):
    g = graph(_package(tmp_path))
    assert g["a"] == {"util", "a_help", "errors"} and g["model.modeling"] == {"model.config"}
    assert g["cli"] == {"a", "b"}  # the string "pkg.b:run" counts as an import
    assert violations(g, PLANTED_TIERS) == [] and cycle(g) == []


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_the_checker_sees_a_planted_violation(tmp_path, kind):
    file, line, expected = PLANTED[kind]
    assert violations(graph(_package(tmp_path, (file, line))), PLANTED_TIERS) == [expected]


def test_the_checker_sees_a_shipped_file_that_names_the_package(tmp_path):
    package = _package(tmp_path, ("model/modeling.py", "from pkg.model.config import C\n"))
    assert violations(graph(package), PLANTED_TIERS) == []  # the tiers allow it: the file is the shipped model's
    assert named_imports(package / "model" / "modeling.py", "pkg") == ["pkg.model.config"]
    assert named_imports(_package(tmp_path / "clean") / "model" / "modeling.py", "pkg") == []


def test_the_checker_sees_a_planted_cycle(tmp_path):
    g = graph(_package(tmp_path, ("errors.py", "from pkg.util import x\n")))
    assert cycle(g) in (["errors", "util", "errors"], ["util", "errors", "util"])


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
