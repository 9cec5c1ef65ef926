"""The test suite's own layout: no file under tests/ imports from a test module (tests/test_*.py).

Shared helpers live in non-test modules (tests/training_helpers.py, tests/preflight_helpers.py,
tests/browser_helpers.py, tests/report_fixtures.py) or are fixtures in tests/conftest.py. Importing a test
module from another one runs its module-level code twice under two names, drags its fixtures along and
ties the test files' order together.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_test_module(dotted: str) -> bool:
    """``test_x``, ``tests.test_x`` or ``tests.test_x.y``: a name whose module part is a test file."""
    parts = dotted.split(".")
    if parts[0] == "tests":
        parts = parts[1:]
    return bool(parts) and parts[0].startswith("test_")


def imports_of_test_modules(source: str) -> list[str]:
    """Every import in ``source`` (at any depth, also inside functions) that names a test module."""
    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            hits += [f"line {node.lineno}: import {a.name}" for a in node.names if _is_test_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            where = f"line {node.lineno}: from {'.' * node.level}{base} import"
            if base and _is_test_module(base):  # from tests.test_x / test_x / .test_x import y
                hits.append(f"{where} {', '.join(a.name for a in node.names)}")
            elif node.level > 0 or base == "tests":  # from . / from tests import test_x
                hits += [f"{where} {a.name}" for a in node.names if a.name.startswith("test_")]
    return hits


def test_detector_finds_every_form_of_test_module_import():
    bad = """
import tests.test_training
import test_training as tt
from tests.test_preflight import check
from test_preflight import check
from tests import test_browser
from . import test_browser
from .test_browser import render


def f():
    from tests.test_browser import chromium
"""
    assert len(imports_of_test_modules(bad)) == 8
    fine = """
import tests.report_fixtures
from tests import report_fixtures as rf
from tests.training_helpers import make_cohort
from .browser_helpers import render
from modaltune.testing import test_x
import pytest
"""
    assert imports_of_test_modules(fine) == []


def test_no_test_file_imports_another_test_file():
    offenders = {}
    for path in sorted(TESTS.glob("*.py")):
        hits = imports_of_test_modules(path.read_text())
        if hits:
            offenders[path.name] = hits
    assert offenders == {}, (
        f"test modules imported from other files: {offenders}; move the shared helpers into a non-test "
        "module (tests/*_helpers.py) or a fixture in tests/conftest.py and import them from there")
