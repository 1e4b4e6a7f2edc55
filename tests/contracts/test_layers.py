"""The layer table holds: import-linter contracts (pyproject.toml) and no private cross-module imports.

``[tool.importlinter]`` in pyproject.toml is the layer table of docs/architecture.md; a module that
imports from a higher layer (or a sibling it must not know) fails the first test. The second
fails when a module imports another module's private (underscore) name, or reaches into an
imported project module's private attribute (``module._name``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fedsim", "strategies", "clients", "fedsim_bench")
PROJECT = (*PACKAGES, "scripts")


def test_import_layers_hold() -> None:
    # import-linter is a dev dependency (`make install`); it runs in its own process because it
    # configures logging with dictConfig, which disables every logger already created here.
    lint = Path(sys.executable).parent / "lint-imports"
    assert lint.is_file(), f"{lint} missing: import-linter is a dev dependency (make install)"
    res = subprocess.run([str(lint), "--no-cache", "pyproject.toml"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, f"import-linter contracts broken:\n{res.stdout}{res.stderr}"


def test_privacy_has_no_import_cycle_and_its_own_layers() -> None:
    # the contracts the first test runs: no cycle at any depth under fedsim.privacy (the old
    # mechanisms <-> mf_mechanisms import broke it), and the mechanisms above the accountant
    # above the events, so planning and a run account with the same code
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    contracts = {c["id"]: c for c in config["tool"]["importlinter"]["contracts"]}
    acyclic = contracts["privacy-acyclic"]
    assert acyclic["type"] == "acyclic_siblings" and acyclic["ancestors"] == ["fedsim.privacy"]
    layers = contracts["privacy-layers"]
    assert layers["type"] == "layers" and layers["containers"] == ["fedsim.privacy"]
    order = [layer.split(" | ") for layer in layers["layers"]]
    position = {name: i for i, names in enumerate(order) for name in names}
    assert position["calibration"] < position["mechanisms"] < position["accountant"] < position["events"]
    assert position["events"] < position["matrix_factorization"] == position["sensitivity"]


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _project_module(name: str | None) -> bool:
    return name is not None and name.split(".")[0] in PACKAGES


def private_imports(path: Path) -> list[str]:
    """``from project.module import _name`` and ``project_module._name`` uses in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[str] = []
    module_aliases: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _project_module(alias.name):
                    module_aliases.add(alias.asname or alias.name.split(".")[0])
                if any(_is_private(part) for part in alias.name.split(".")):
                    found.append(f"{path}:{node.lineno}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.level > 0 or _project_module(node.module)):
            for alias in node.names:
                if _is_private(alias.name):
                    found.append(f"{path}:{node.lineno}: from {node.module} import {alias.name}")
                elif alias.name[:1].islower():  # a submodule imported by name: `from fedsim import seeds`
                    module_aliases.add(alias.asname or alias.name)
            if node.module and any(_is_private(part) for part in node.module.split(".")):
                found.append(f"{path}:{node.lineno}: from {node.module} import ...")
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and _is_private(node.attr)
            and isinstance(node.value, ast.Name)
            and node.value.id in module_aliases
        ):
            found.append(f"{path}:{node.lineno}: {node.value.id}.{node.attr}")
    return found


def project_files() -> list[Path]:
    return sorted(p for top in PROJECT for p in (ROOT / top).rglob("*.py"))


def test_no_module_imports_another_modules_private_names() -> None:
    found = [hit for path in project_files() for hit in private_imports(path)]
    assert not found, "private names used across modules:\n" + "\n".join(found)


def test_the_private_name_check_catches_both_forms(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from fedsim.privacy.sensitivity import _builder\n"
        "from fedsim import seeds\n"
        "x = seeds._hidden\n"
        "from fedsim.strategy import Strategy\n"
        "y = Strategy.__name__\n",
        encoding="utf-8",
    )
    hits = private_imports(bad)
    assert len(hits) == 2 and "_builder" in hits[0] and "seeds._hidden" in hits[1]
