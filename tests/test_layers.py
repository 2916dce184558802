"""The package is folders by layer, and every import (module level or inside a function) runs downward."""

import ast
from pathlib import Path

import hf_blockcbo


PACKAGE = Path(hf_blockcbo.__file__).parent

# lowest first; a module may import from its own layer or any lower one
LAYERS = [
    {"_version", "errors", "io_utils", "data", "models", "provenance", "resources", "templates"},  # foundation, data
    {"surgery"},  # gates, removal, architecture registry
    {"hessian"},  # gate gradients, curvature estimators, artifact, resume, distributed
    {"config"},  # BlockRemovalConfig validates against the curvature registry
    {"solvers"},
    {"evaluation"},  # perplexity / multiple choice, lm-eval harness, speed
    {"repair"},  # below selection: repair-aware selection scores candidates after repair
    {"selection"},  # scorers, validation, compare, diagnose
    {"healing"},
    {"hub"},
    {"pipeline", "api", "callback", "commands", "cli", "__init__"},  # the faces
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _top(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def _imports(path: Path) -> list[tuple[str, int]]:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]  # a module's package; for __init__.py the package itself
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - (node.level - 1)]
            found.append((".".join(base + ([node.module] if node.module else [])), node.lineno))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_blockcbo."):
            found.append((node.module, node.lineno))
    return found


def test_every_module_belongs_to_a_layer():
    tops = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert tops <= set(RANK), f"unplaced: {sorted(tops - set(RANK))}"


def test_imports_run_downward_only():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        here = _top(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for target, line in _imports(path):
            there = _top(target)
            if there != here and RANK[there] > RANK[here]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not upward, "imports must run downward:\n" + "\n".join(upward)


def test_no_test_hook_ships_in_the_package():
    text = "\n".join(p.read_text(encoding="utf-8") for p in PACKAGE.rglob("*.py"))
    assert "os._exit" not in text and "ABORT_AFTER" not in text
