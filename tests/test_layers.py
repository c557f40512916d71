"""The package's layers (DESIGN.md, "Layers: who may import whom") hold: no import cycles
among megatron_forge's modules, and no layer imports one above it.

The graph is read from the source (every ``import`` statement, including those inside
functions), so a lazy import that would close a cycle at run time counts too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_forge"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(path: Path, name: str, known: set[str]) -> set[str]:
    """The megatron_forge modules that ``path`` (module ``name``) imports."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".")
                anchor = anchor if is_package else anchor[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` where c is an attribute
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(path, name, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles among megatron_forge modules:\n" + "\n".join(
        " <-> ".join(c) for c in found
    )


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


# A module of a layer may import modules of the layers below it, never above.
LAYERS = [
    ["megatron_forge.errors", "megatron_forge.utils", "megatron_forge.config"],
    ["megatron_forge.cpu", "megatron_forge.distributed", "megatron_forge.data"],
    ["megatron_forge.models", "megatron_forge.memory"],
    [
        "megatron_forge.checkpointing",
        "megatron_forge.checkpointing.fork_writer",
        "megatron_forge.monitoring",
    ],
    ["megatron_forge.training", "megatron_forge.convert", "megatron_forge.convert.reference"],
    ["megatron_forge.train", "megatron_forge.convert.cli"],
]


def layer_of(module: str) -> int:
    best, level = "", -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, level = prefix, i
    return level


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in modules() if m != "megatron_forge" and layer_of(m) < 0]
    assert not unplaced, f"modules missing from LAYERS: {unplaced}"


def test_no_module_imports_a_layer_above_it() -> None:
    upward = [
        f"{src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for src, targets in sorted(import_graph().items())
        if src != "megatron_forge"
        for dst in sorted(targets)
        if dst != "megatron_forge" and layer_of(dst) > layer_of(src)
    ]
    assert not upward, "\n".join(upward)


def test_peers_do_not_import_each_other_across_training_and_convert() -> None:
    graph = import_graph()
    crossing = [
        f"{src} imports {dst}"
        for src, targets in graph.items()
        for dst in targets
        if (src.startswith("megatron_forge.convert") and dst.startswith("megatron_forge.training"))
        or (src.startswith("megatron_forge.training") and dst.startswith("megatron_forge.convert"))
        or (
            src.startswith("megatron_forge.checkpointing")
            and dst.startswith("megatron_forge.monitoring")
        )
        or (
            src.startswith("megatron_forge.monitoring")
            and dst.startswith("megatron_forge.checkpointing")
        )
    ]
    assert not crossing, "\n".join(crossing)


@pytest.mark.parametrize("module", ["megatron_forge.checkpointing", "megatron_forge.convert.cli"])
def test_importing_does_not_load_the_training_layer(module: str) -> None:
    code = (
        f"import {module}, sys; "
        "print(sorted(m for m in sys.modules if m.startswith('megatron_forge.training')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
