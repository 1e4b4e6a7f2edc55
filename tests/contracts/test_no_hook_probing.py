"""The engine calls declared hooks only: no ``getattr`` / ``hasattr`` probing of plug-ins.

Every hook the engine calls is declared on :class:`~fedsim.client.ClientTrainer`,
:class:`~fedsim.strategy.Strategy` or :class:`~fedsim.engine.callbacks.RoundCallback` with a
no-op default, so a plug-in that leaves one out still fits, and a misspelt override is not
silently skipped. Allowed: the lazy module ``__getattr__`` of ``fedsim.engine``, reading a
dataclass's own fields by name, and asking :mod:`os` what the platform offers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import fedsim

ROOT = Path(fedsim.__file__).parent
CHECKED = [*sorted((ROOT / "engine").glob("*.py")), ROOT / "scenario.py", ROOT / "sweep.py", ROOT / "builders.py"]


def _probes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for func in ast.walk(tree):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef) or func.name == "__getattr__":
            continue
        for node in ast.walk(func):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr")):
                continue
            name = node.args[1] if len(node.args) > 1 else None
            if isinstance(name, ast.Attribute) and name.attr == "name":  # dataclasses.fields(): f.name
                continue
            if isinstance(node.args[0], ast.Name) and node.args[0].id == "os":  # the platform, not a plug-in
                continue
            found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_engine_probes_no_hooks() -> None:
    probes = [line for path in CHECKED for line in _probes(path)]
    assert probes == []
