"""The package's shape: imports flow one way (no cycle, function-local imports included), only
entry points import the study driver, nothing points outside the repository, and the config
layer imports no heavy framework."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "scaling"
ENTRY_POINTS = {"run"}


def scaling_imports() -> dict[str, set[str]]:
    """module -> the scaling modules it imports anywhere in its body."""
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "scaling":
                parts = node.module.split(".")
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.Import):
                found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("scaling.")}
        graph[path.stem] = found - {path.stem}
    return graph


def test_no_import_cycle_even_inside_functions():
    graph = scaling_imports()
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            assert state.get(target) != "open", f"import cycle: {' -> '.join(path + [target])}"
            if target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_only_entry_points_import_the_study_driver():
    importers = {module for module, targets in scaling_imports().items() if "study" in targets}
    assert importers <= ENTRY_POINTS, f"{sorted(importers - ENTRY_POINTS)} import scaling.study"


def test_nothing_points_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    needles = ("../shared", "SPEC.md", "STACK-NOTES")
    offenders = []
    for name in tracked:
        path = REPO / name
        if path.suffix not in (".py", ".md", ".yaml", ".yml", ".toml", ".txt", "") or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="ignore")
        offenders += [f"{name}: {needle}" for needle in needles if needle in text and path.name != Path(__file__).name]
    assert not offenders


def test_loading_and_planning_a_study_imports_no_framework():
    code = ("import sys; from scaling.config import load_study_file, plan_runs; "
            "plan_runs(load_study_file('search_spaces/smoke.yaml')); "
            "print(sorted(m for m in ('torch', 'ray', 'mlflow', 'deepspeed', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


MAX_FUNCTION_LINES = 80
"""A function (its nested closures included) fits on a screen or says why it does not."""
LONG_REASON = "Long because"
"""What a longer function's docstring says, followed by why."""
LONG_FUNCTIONS = {
    "observe.run_observation_study": "its closures `finish` and `drain` share the study's tracker, outcomes and "
                                     "pending measurements; split, they would pass all three around",
    "evaluate.evaluate_model": "its closures `load` and `run` share the failures, leaf tasks and samples one "
                               "lm-eval call collects; split, they would pass all three around",
}
"""Longer functions outside the ones whose docstrings say why, with the reason."""


def test_every_function_fits_on_a_screen_or_says_why():
    long = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            lines = node.end_lineno - node.lineno + 1
            name = f"{path.relative_to(PACKAGE).with_suffix('').as_posix().replace('/', '.')}.{node.name}"
            if lines > MAX_FUNCTION_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
                long[name] = lines
    unexplained = {name: lines for name, lines in long.items() if name not in LONG_FUNCTIONS}
    assert not unexplained, (f"functions over {MAX_FUNCTION_LINES} lines: {unexplained}; split them, or say why "
                             f"in the docstring ('{LONG_REASON} ...')")
    stale = sorted(set(LONG_FUNCTIONS) - set(long))
    assert not stale, f"{stale} fit on a screen now: drop them from LONG_FUNCTIONS"
