"""The layers import only downward: cli (flows/cli) -> flows -> tasks -> pipeline_lib.

Checked on the sources, so an import hidden in a function or done through ``importlib`` counts:
every ``import``/``from`` statement and every ``importlib.import_module(...)`` / ``__import__(...)``
call with a literal name (an f-string's literal start counts too).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# layer -> top-level modules it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "pipeline_lib": ("prefect", "prefect_dask", "prefect_redis", "flows", "tasks", "deployments"),
    "tasks": ("flows", "deployments"),
    "flows": ("flows.cli",),
}


def _literal_prefix(node: ast.expr) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
        return str(node.values[0].value)
    return None


def imported_names(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, module) for every import in a source file, dynamic imports with a literal name included."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
                out += [(node.lineno, base)] + [(node.lineno, f"{base}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module or ""))
        elif isinstance(node, ast.Call) and node.args:
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
            if name in ("import_module", "__import__"):
                target = _literal_prefix(node.args[0])
                if target is not None:
                    out.append((node.lineno, target))
    return out


def _violations(layer: str, root: Path = ROOT) -> list[str]:
    bad = []
    for path in sorted((root / layer).rglob("*.py")):
        if layer == "flows" and "cli" in path.relative_to(root / "flows").parts:
            continue  # the CLI is the composition root: it may import every layer
        for line, module in imported_names(path, root):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(root)}:{line} imports {module}")
    return bad


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layer_imports_only_downward(layer):
    assert _violations(layer) == []


def test_the_scan_sees_dynamic_and_relative_imports(tmp_path):
    """The checker itself: it must catch what a plain `import` grep would miss."""
    (tmp_path / "pipeline_lib" / "commands").mkdir(parents=True)
    probe = tmp_path / "pipeline_lib" / "commands" / "flow.py"
    probe.write_text("import importlib\n"
                     "from .. import store\n"
                     "def f():\n"
                     "    importlib.import_module('flows.build')\n"
                     "    __import__(f'prefect.{1}')\n"
                     "    from prefect import flow\n")
    found = {m for _, m in imported_names(probe, tmp_path)}
    assert {"flows.build", "prefect.", "prefect", "pipeline_lib.store"} <= found
    assert len(_violations("pipeline_lib", tmp_path)) == 3
