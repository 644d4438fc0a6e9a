"""The package's layers import one way only (docs/architecture.md), without cycles, and nothing
outside ``saes/`` asks a dictionary what it is (``isinstance`` / ``hasattr``): dictionaries declare it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "sae_kit"
# lower number = lower layer; a module may import its own layer or lower ones
LAYERS = {
    "validate": 0, "fsutil": 0, "config": 0, "claims": 0,
    "models": 1, "corpus": 1, "synthetic": 1,
    "activations": 2,
    "saes": 3, "snmf": 3,
    "train": 4,
    "metrics": 5,
    "splice": 6, "steering": 6, "sweeps": 6,
    "quickstart": 7, "allocation": 7, "gradient_eval": 7, "pursuit": 7, "concepts": 7, "dark_matter": 7,
    "plots": 8, "explorer": 8, "report": 8, "checks": 8,
    "lab": 9,
}


def modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.name == "__init__.py" and rel.parent == Path("."):
            continue  # the package's front door re-exports everything
        yield rel, ast.parse(path.read_text())


def top(rel: Path) -> str:
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def kit_imports(rel: Path, tree):
    """The kit modules `rel` imports (anywhere in the file, function-level imports included)."""
    pkg = list(rel.parent.parts)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = pkg[: len(pkg) - (node.level - 1)]
            parts = base + (node.module.split(".") if node.module else [])
            yield parts[0] if parts else (node.names[0].name if node.names else "")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sae_kit."):
            yield node.module.split(".")[1]


def test_every_module_has_a_layer():
    assert {top(rel) for rel, _ in modules()} <= set(LAYERS)


@pytest.mark.parametrize("rel,tree", list(modules()), ids=lambda v: str(v) if isinstance(v, Path) else "")
def test_imports_go_down_only(rel, tree):
    me = top(rel)
    for other in kit_imports(rel, tree):
        assert other in LAYERS, f"{rel} imports unknown module {other}"
        assert LAYERS[other] <= LAYERS[me], f"{rel} (layer {LAYERS[me]}) imports {other} (layer {LAYERS[other]})"


def test_no_import_cycle_between_modules():
    graph = {}
    for rel, tree in modules():
        name = ".".join(rel.with_suffix("").parts)
        deps = set()
        pkg = list(rel.parent.parts)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level and node.module:
                base = pkg[: len(pkg) - (node.level - 1)]
                deps.add(".".join(base + node.module.split(".")))
        graph[name] = deps
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
        if n in seen or n not in graph:
            return
        stack.append(n)
        for d in graph[n]:
            visit(d)
        stack.pop()
        seen.add(n)

    for n in graph:
        visit(n)


def test_no_type_tests_on_dictionaries_outside_saes():
    pattern = re.compile(r"(isinstance|hasattr)\(\s*(sae|dictionary|sae_\w+|\w+_sae)\b|isinstance\([^)]*SAE\b")
    for path in ROOT.glob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            assert not pattern.search(line), f"{path.name}:{n}: {line.strip()}"
