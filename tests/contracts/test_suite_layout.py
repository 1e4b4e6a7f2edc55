"""The suite's own layout: every test file in a layer package, and the modules that borrow the
session's Flower cluster named where ``make test``'s two workers (pytest-xdist) group them."""

from __future__ import annotations

import ast
from pathlib import Path

from ..conftest import ROOT, SHARED_CLUSTER_MODULES

TESTS = ROOT / "tests"
LAYERS = ("privacy", "engine", "flower", "contracts", "data", "cli")
SHARED_FIXTURES = {"shared_cluster", "flower_clusters"}


def test_every_test_file_sits_in_a_layer_package() -> None:
    misplaced = [
        str(path.relative_to(TESTS)) for path in sorted(TESTS.rglob("test_*.py"))
        if len(path.relative_to(TESTS).parts) != 2 or path.relative_to(TESTS).parts[0] not in LAYERS
    ]
    assert not misplaced, f"test files outside tests/<layer>/ (layers: {', '.join(LAYERS)}): {misplaced}"
    assert all((TESTS / layer / "__init__.py").is_file() for layer in LAYERS)


def borrows_the_shared_cluster(path: Path) -> bool:
    """Whether a function of ``path`` (a test or a fixture) takes the shared cluster's fixture."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return any(
        arg.arg in SHARED_FIXTURES
        for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for arg in node.args.args + node.args.kwonlyargs
    )


def test_the_shared_flower_cluster_modules_are_all_named_for_the_workers() -> None:
    users = sorted(str(p.relative_to(ROOT)) for p in TESTS.rglob("test_*.py") if borrows_the_shared_cluster(p))
    assert users == sorted(SHARED_CLUSTER_MODULES), (
        "tests/conftest.py SHARED_CLUSTER_MODULES must name every module that borrows the shared "
        f"Flower cluster (one xdist worker runs them all): {users}"
    )


def test_the_check_finds_a_fixture_that_borrows_the_cluster(tmp_path: Path) -> None:
    module = tmp_path / "test_x.py"
    module.write_text("import pytest\n@pytest.fixture\ndef cluster(shared_cluster):\n    return shared_cluster\n")
    assert borrows_the_shared_cluster(module)
    module.write_text("def test_y(tmp_path):\n    pass\n")
    assert not borrows_the_shared_cluster(module)
