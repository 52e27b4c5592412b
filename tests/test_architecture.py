"""The package's shape: layers that import one way, no import cycle anywhere, no torch on the serving path.

import-linter (contracts in pyproject.toml, `lint-imports` in `make test`) owns the layer and independence
rules; this test runs it too, so a plain `pytest` cannot pass on a broken architecture, and adds a cycle scan
of its own over every import statement in app/ (function-level and TYPE_CHECKING ones included) that names
the cycle it finds.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
APP = ROOT / "app"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(source: str, name: str, is_package: bool, modules: set[str]) -> set[str]:
    """Every app module the source of module `name` imports, wherever the import statement stands."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, name)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            # The deepest app module the statement names (`from app.x import y` names app.x.y when y is a module).
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(APP.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imports_of(f.read_text(), module_name(f), f.name == "__init__.py", modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    colour: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if colour.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = 2
        return None

    for node in sorted(graph):
        if node not in colour and (cycle := visit(node)):
            return cycle
    return None


def test_the_scan_sees_function_level_imports():
    """The cycle scan is only worth something if it reads imports inside functions."""
    source = "def f():\n    from app.engine import batcher\n    import app.core.errors\n    from ..core import config\n"
    modules = {"app.engine", "app.engine.batcher", "app.core", "app.core.errors", "app.core.config"}
    found = imports_of(source, "app.api.probe", False, modules)
    # `from pkg import mod` runs pkg/__init__ too: both are edges.
    assert found == {"app.engine", "app.engine.batcher", "app.core.errors", "app.core", "app.core.config"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_in_app():
    graph = import_graph()
    assert len(graph) > 20
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_the_layer_contracts_hold():
    lint = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert lint, "import-linter is not installed (pip install -e '.[test]')"
    proc = subprocess.run([lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "broken" not in proc.stdout.lower().replace("0 broken", "")


def test_the_serving_path_never_imports_torch():
    """`effnet serve` and everything it loads run without PyTorch (the runtime image has none)."""
    code = (
        "import sys, app.api.server, app.api.app, app.cli;"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnx', 'build'));"
        "print(','.join(bad)); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"imported: {proc.stdout.strip()} {proc.stderr[-2000:]}"
