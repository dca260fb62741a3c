"""The package's layering: no import cycles, nothing imports ``cli/``, the CLI parses light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sae_adaptive_plugin"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (lazily too; a package stands for its __init__)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                subs = [f"{node.module}.{alias.name}" for alias in node.names]
                targets = [s for s in subs if s in modules]
                if len(targets) < len(subs):  # names defined in node.module itself
                    targets.append(node.module)
            else:
                continue
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges[module].add(target)
    return edges


def test_no_import_cycles() -> None:
    edges = _imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in edges:
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_nothing_outside_cli_imports_cli() -> None:
    importers = sorted(
        module
        for module, targets in _imports().items()
        if not module.startswith("sae_adaptive_plugin.cli")
        and any(
            t == "sae_adaptive_plugin.cli" or t.startswith("sae_adaptive_plugin.cli.")
            for t in targets
        )
    )
    assert importers == []


def test_every_command_parses_without_importing_torch_or_sae_lens() -> None:
    code = (
        "import contextlib, io, sys\n"
        "from sae_adaptive_plugin.cli.main import COMMANDS, build_parser\n"
        "parser = build_parser()\n"
        "for name, *_ in COMMANDS:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            parser.parse_args([name, '--help'])\n"
        "        except SystemExit as exit:\n"
        "            assert exit.code == 0, name\n"
        "print(sorted(m for m in ('torch', 'sae_lens') if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
