"""The package's shape: imports flow one way (no cycle, function-local imports included), only
entry points import the study driver, nothing points outside the repository, the config
layer imports no heavy framework, and no function re-imports what its file imports at the top."""

from __future__ import annotations

import ast
import re
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


# Left for the changes that own these files (issue 28); remove an entry once its import is gone.
REPEATED_IMPORTS_IN_FLIGHT = {("config", "scaling.errors"), ("config", "scaling.ladder"), ("runs", "scaling.train"),
                              ("study", "pathlib"), ("study", "scaling.errors"), ("sweep", "scaling.runs"),
                              ("train", "scaling.ladder")}


def test_no_function_imports_a_module_its_file_imports_at_the_top():
    """A function-local import keeps a heavy or cyclic module out of a light one; repeating a module the file
    imports at the top anyway only hides what the module depends on."""

    def modules(node) -> set[str]:
        if isinstance(node, ast.Import):
            return {a.name for a in node.names}
        return {node.module} if isinstance(node, ast.ImportFrom) and node.level == 0 else set()

    repeated = set()
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = set().union(*(modules(node) for node in tree.body))
        for function in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            repeated |= {(path.stem, module) for node in ast.walk(function) for module in modules(node) & top}
    assert repeated <= REPEATED_IMPORTS_IN_FLIGHT, sorted(repeated - REPEATED_IMPORTS_IN_FLIGHT)


def test_only_the_study_driver_imports_analysis():
    """The driver decides a study's claims between waves with `analysis.waves`; nothing else in `scaling` reaches up
    into `analysis` (which imports only scaling's pure modules), so the layers stay one way round."""
    importers = set()
    for path in PACKAGE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names_ = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if any(n == "analysis" or n.startswith("analysis.") for n in names_):
                importers.add(path.stem)
    assert importers <= {"study"}, sorted(importers)


# --- a run's folder has one owner ----------------------------------------------------------------------

RUN_FOLDER_PARTS = {"checkpoints", "outcome.json", "mlflow-spill", "hf", "COMPLETE"}
"""What `scaling.run_folder.RunFolder` keeps in a run's folder."""
RUN_FOLDER_NAME = re.compile(r"-trial-|/(checkpoints|mlflow-spill|hf)(/|$)|/outcome\.json")
"""In an f-string: a sweep trial's folder name, or a path into a run's folder."""
LAYOUT_CONSTANTS = {"CHECKPOINTS", "COMPLETE", "OUTCOME", "SPILL", "EXPORTS"}
ALLOWED_RUN_FOLDER_PATHS = {
    "scaling/tracking.py: / 'mlflow-spill'",  # a logger without a run folder spills to a temp folder of that name
}


def _constants(node) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _step_folder(node: ast.JoinedStr) -> bool:
    """`f"step_{step:07d}"`: a checkpoint's or an export's folder name (`run_folder.step_tag`)."""
    return "step_" in "".join(_constants(node)) and any(
        isinstance(v, ast.FormattedValue) and v.format_spec is not None and "07d" in _constants(v.format_spec)
        for v in node.values)


def run_folder_paths(root: Path) -> list[str]:
    """Places in `scaling/` and `analysis/`, outside run_folder.py, that build or take apart a path in a run's
    folder: a join (or `/`) with a part of its layout, an f-string naming one (or a trial folder), a
    `step_{:07d}` folder, run_folder's layout constants, or a `.folder` string split back into its name."""
    found = []
    for path in sorted([*(root / "scaling").glob("*.py"), *(root / "analysis").glob("*.py")]):
        if path.name == "run_folder.py":
            continue
        where = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in ("join", "joinpath"):
                    found += [f"{where}: join(..., {part!r})" for arg in node.args for part in _constants(arg)
                              if part in RUN_FOLDER_PARTS]
                    found += [f"{where}:{node.lineno}: a step_{{:07d}} folder" for arg in node.args
                              if isinstance(arg, ast.JoinedStr) and _step_folder(arg)]
                if name in ("rsplit", "split", "rstrip", "rpartition") and any(
                        isinstance(n, ast.Attribute) and n.attr == "folder" or isinstance(n, ast.Name) and n.id == "folder"
                        for n in ast.walk(node.func)):
                    found.append(f"{where}:{node.lineno}: a run folder split back into its name")
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
                found += [f"{where}: / {part!r}" for part in _constants(node.right) if part in RUN_FOLDER_PARTS]
            elif isinstance(node, ast.JoinedStr):
                match = RUN_FOLDER_NAME.search("{}".join(_constants(node)))
                found += [f"{where}:{node.lineno}: f-string with {match.group(0)!r}"] if match else []
            elif isinstance(node, ast.ImportFrom) and node.module == "scaling.run_folder":
                found += [f"{where}: imports run_folder.{a.name}" for a in node.names if a.name in LAYOUT_CONSTANTS]
            elif isinstance(node, ast.Attribute) and node.attr in LAYOUT_CONSTANTS and getattr(node.value, "id", "") == "run_folder":
                found.append(f"{where}:{node.lineno}: run_folder.{node.attr}")
    return sorted(set(found))


def test_no_run_folder_path_is_built_outside_its_owner():
    offenders = [f for f in run_folder_paths(REPO) if f not in ALLOWED_RUN_FOLDER_PATHS]
    assert not offenders, f"build run-folder paths with scaling.run_folder.RunFolder: {offenders}"


def test_the_run_folder_check_finds_what_it_looks_for(tmp_path):
    (tmp_path / "scaling").mkdir()
    (tmp_path / "scaling" / "bad.py").write_text(
        'import os\nfrom scaling.run_folder import OUTCOME\n'
        'a = os.path.join(folder, "checkpoints")\nb = f"{study}-{rung}-trial-{trial_id}"\n'
        'c = storage.join(root, f"step_{step:07d}")\nd = task.folder.rstrip("/").rsplit("/", 1)[-1]\n')
    assert len(run_folder_paths(tmp_path)) == 5, run_folder_paths(tmp_path)


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
