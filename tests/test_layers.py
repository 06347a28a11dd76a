"""The package's arrows point one way: core <- io <- nets <- stages <- blend <- submit <- explain <- dev, no circle,
no module much over 400 lines, and nothing the Kaggle bundle ships imports dev/."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kernel_utils"
LAYERS = {"core": 0, "io": 1, "nets": 2, "stages": 3, "blend": 4, "submit": 5, "explain": 6, "dev": 7}
MAX_LINES = 420


def layer_of(module: str) -> str:
    """'kernel_utils.io.cache' -> 'io'; the top-level modules (config, metric, training, folds) are 'core'."""
    parts = module.split(".")
    return parts[1] if len(parts) >= 2 and parts[1] in LAYERS else "core"


def imports_of(path: Path) -> set[str]:
    """Every kernel_utils module a file imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kernel_utils"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kernel_utils")}
    return found


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = path
    return out


def test_every_import_points_down_or_sideways():
    wrong = []
    for name, path in modules().items():
        if name == "kernel_utils":  # the root names the public verbs of every layer
            continue
        for target in imports_of(path):
            if target != "kernel_utils" and LAYERS[layer_of(target)] > LAYERS[layer_of(name)]:
                wrong.append(f"{name} ({layer_of(name)}) imports {target} ({layer_of(target)})")
    assert not wrong, wrong


def test_no_import_circle():
    graph = {name: {t for t in imports_of(path) if t in modules() and t != name}
             for name, path in modules().items()}
    for package in [n for n in graph if modules()[n].name == "__init__.py"]:
        graph[package] -= {t for t in graph[package] if t.startswith(package + ".")}  # a package names its parts
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, " -> ".join([*trail, node, nxt])
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for node in graph:
        if node not in state:
            visit(node, [])


def test_the_layers_are_what_the_layout_says():
    assert layer_of("kernel_utils.io.cache") == "io" and layer_of("kernel_utils.training") == "core"
    names = set(modules())
    assert {"kernel_utils.nets.registry", "kernel_utils.io.cache", "kernel_utils.dev.synthetic"} <= names
    registry = imports_of(PACKAGE / "nets" / "registry.py")
    assert not {m for m in registry if m.startswith("kernel_utils.nets.") and m != "kernel_utils.nets.backbones"}


def test_modules_stay_small():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_no_code_branches_on_a_forms_name():
    """What differs between the fracture forms is asked of their settings (the stage contract), never their names."""
    import re

    found = [f"{name}: {line.strip()}" for name, path in modules().items()
             for line in path.read_text().splitlines() if re.search(r"\bform\s*(==|!=|in\s*\()", line)]
    assert not found, found


def test_no_positional_settings_tuples():
    """Settings are typed fields: no `table = {profile: (..., ...)}` of positional values left in the stages."""
    import re

    found = [f"{name}: {line.strip()}" for name, path in modules().items() if ".stages." in name
             for line in path.read_text().splitlines() if re.search(r'"(smoke|demo|bench|full)":\s*\(', line)]
    assert not found, found
