"""The package's layers only import downward, and its modules form no import cycle.

Layers, bottom to top: shared basics; data, models and the trust maths; the inference core and the torch-free
runtime; training; evaluation and export; explain and serving; the command line. A module may import its own
layer and the ones below, never one above, even lazily inside a function.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "bloodcell"
LAYERS = [
    {"errors", "io", "choices", "paper", "machine", "plotting", "runfolder", "prediction", "__init__", "__version__"},
    {"data", "models", "trust"},  # trust: calibration, TTA, conformal and OOD maths on arrays and tensors
    {"inference", "runtime"},  # runtime: the torch-free bundle runner
    {"training"},
    {"evaluation", "deploy", "tuning"},  # tuning: Optuna sweeps of training runs
    {"explain", "serve"},
    {"commands", "cli", "__main__"},
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any layer; add its package to LAYERS")


def modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1] if len(parts) > 2 else [parts[0], "__init__"]
        out[".".join(parts)] = path
    return out


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("bloodcell")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bloodcell"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_every_module_is_in_a_layer_and_imports_only_downward():
    bad = []
    for name, path in modules().items():
        mine = layer_of(name)
        for imp in imports(path):
            if imp == "bloodcell":
                continue
            if layer_of(imp) > mine:
                bad.append(f"{name} (layer {mine}) imports {imp} (layer {layer_of(imp)})")
    assert not bad, "\n".join(bad)


def test_no_import_cycles_at_module_level():
    mods = modules()
    graph = {name: {i for i in imports(path, top_level_only=True) if i in mods and i != name}
             for name, path in mods.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


def test_the_layer_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from bloodcell.cli import main\n")
    assert layer_of("bloodcell.data.store") < layer_of(next(iter(imports(bad))))
