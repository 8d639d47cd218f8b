"""The package reads like the data flows: each block imports only the blocks below it, no module
imports itself back through others (imports for type checking alone aside), and no module is past 400 lines."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
# bottom to top: a block may import itself and any block before it
ORDER = ["errors", "graph", "runtime", "io", "prepare", "find", "derivatives", "score", "select", "edit", "repair",
         "check", "modes", "pipeline", "sweep", "api", "cli"]
PACKAGES = ("onnxprune", "onnxprune_gibbs")


def modules():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


def imports(path: Path) -> set[str]:
    """Every module of ours that ``path`` imports, at the top or inside a function."""
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                   for n in ast.walk(node)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
            known = {name for name, _ in modules()}
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
    return found


def block(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "onnxprune" and len(parts) > 1 else None


def test_every_block_imports_only_the_blocks_below_it():
    wrong = []
    for name, path in modules():
        own = block(name)
        if own is None:
            continue
        for target in imports(path):
            other = block(target)
            if other in ORDER and own in ORDER and ORDER.index(other) > ORDER.index(own):
                wrong.append(f"{name} -> {target}")
    assert not wrong, wrong


def test_no_import_cycle():
    graph = {name: {t for t in imports(path) if t != name} for name, path in modules()}
    state: dict[str, int] = {}

    def visit(node, trail):
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join(trail[trail.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("name,path", list(modules()), ids=[name for name, _ in modules()])
def test_no_module_past_400_lines(name, path):
    assert len(path.read_text().splitlines()) <= 400


def test_the_architecture_page_shows_the_code_as_it_is():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "layout.py"), "--check"])
    assert done.returncode == 0, "docs/architecture.md is stale: run python scripts/layout.py"
