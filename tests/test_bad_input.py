"""Bad input, everywhere: every malformed input to the command-line entry points is refused with exit
code 2 and one line that names the problem and the fix, before any work and before anything is written
(no MLflow store, no output folder, no run folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SMOKE = (REPO / "search_spaces" / "smoke.yaml").read_text()
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x10"


def write(path: Path, content: bytes | str) -> str:
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


def study_with(tmp: Path, **replace: str) -> str:
    text = SMOKE
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    return write(tmp / "study.yaml", text)


def run_cli(main, argv, capsys, tmp: Path):
    """Run an entry point in `tmp`; returns (exit code, stderr) and checks nothing was written there."""
    before = set(tmp.iterdir())
    code = main(argv)
    err = capsys.readouterr().err.strip()
    written = set(tmp.iterdir()) - before
    assert not written, f"refused input wrote {sorted(p.name for p in written)}"
    return code, err


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


# --- scaling/run.py ------------------------------------------------------------------------------------------


RUN_CASES = {
    "missing study file": (lambda t: [str(t / "nope.yaml")], "not found"),
    "binary study file": (lambda t: [write(t / "s.yaml", PNG)], "is not UTF-8 text"),
    "latin-1 study file": (lambda t: [write(t / "s.yaml", "study: caf\xe9\n".encode("latin-1"))], "is not UTF-8 text"),
    "empty study file": (lambda t: [write(t / "s.yaml", b"")], "is empty"),
    "truncated yaml": (lambda t: [write(t / "s.yaml", "study: smoke\ntraining: {seq_len: 64, batch")], "not valid YAML"),
    "a list, not a mapping": (lambda t: [write(t / "s.yaml", "- a\n- b\n")], "expected a mapping"),
    "unknown key": (lambda t: [study_with(t, **{"seeds: [0]": "seeds: [0]\nepochs: 3"})], "unknown key 'epochs'"),
    "wrong type": (lambda t: [study_with(t, **{"max_steps: 30": "max_steps: thirty"})], "expected an integer"),
    "out of range": (lambda t: [study_with(t, **{"lr: 0.003": "lr: -0.003"})], "training.lr=-0.003"),
    "unknown rung": (lambda t: [study_with(t, **{"tiny-754K]": "tiny-9G]"})], "rung='tiny-9G' is not in ladder"),
    "unknown ladder": (lambda t: [study_with(t, **{"ladder: tiny": "ladder: huge"})], "ladder='huge' is unknown"),
    "--set unknown key": (lambda t: [study_with(t), "--set", "training.epochs=3"], "unknown key 'training.epochs'"),
    "--set wrong type": (lambda t: [study_with(t), "--set", "seeds=zero"], "seeds='zero': expected a list"),
    "--set without =": (lambda t: [study_with(t), "--set", "training.max_steps"], "expected KEY=VALUE"),
    "--set bad yaml": (lambda t: [study_with(t), "--set", "rungs=[a, b"], "not valid YAML"),
    "missing data file": (lambda t: [study_with(t, **{"source: bundled": "source: corpus.txt"})],
                          "data.source: text source 'corpus.txt': no such file"),
    "kind unknown": (lambda t: [write(t / "s.yaml", "kind: sweep\nstudy: x\n")], "kind='sweep'"),
    "--resume of a study never run": (lambda t: [study_with(t), "--resume"], "no earlier record of study 'smoke'"),
    "--gpu unknown": (lambda t: [study_with(t), "--dry-run", "--gpu", "V100"], "--gpu 'V100': use one of"),
    "unwritable storage": (lambda t: [study_with(t, **{"storage_path: runs": "storage_path: /proc/runs"})],
                           "storage_path '/proc/runs' is not a writable folder"),
    "unreachable tracking server": (lambda t: [study_with(t), "--set", "tracking_uri=http://127.0.0.1:9"],
                                    "MLflow at 'http://127.0.0.1:9' is unreachable"),
    "sqlite store in a missing folder": (lambda t: [study_with(t), "--set", f"tracking_uri=sqlite:///{t}/no/m.db"],
                                         "of the SQLite store does not exist"),
    "active forgetting with ZeRO-3": (lambda t: [study_with(t, **{"  - baseline\n": "  - active_forgetting\n",
                                                                   "zero_stage: 2": "zero_stage: 3"})],
                                      "zero_stage 0, 1 or 2"),
    "observe study without families": (lambda t: [write(t / "s.yaml", "kind: observe\nstudy: o\nfamilies: []\n"
                                                                    "sources: [bundled]\n")], "families is empty"),
}


@pytest.mark.parametrize("case", sorted(RUN_CASES))
def test_run_refuses_bad_input_on_one_line(case, in_tmp, capsys):
    from scaling.run import main

    argv, message = RUN_CASES[case]
    code, err = run_cli(main, argv(in_tmp), capsys, in_tmp)
    assert code == 2, err
    assert err.startswith("scaling.run: error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err


# --- python -m scaling.condense -------------------------------------------------------------------------------


CONDENSE_CASES = {
    "model folder missing": (["--model", "./no-such-model"], "does not exist"),
    "not a model folder": (["--model", "{tmp}"], "is not a model folder"),
    "binary texts": (["--texts", "{png}"], "is not UTF-8 text"),
    "empty texts": (["--texts", "{empty}"], "no non-empty"),
    "texts with a wrong suffix": (["--texts", "{csv}"], "expected a .txt, .jsonl or .parquet file"),
    "repetitions 0": (["--repetitions", "0"], "--repetitions 0"),
    "negative max length": (["--max-length", "-5"], "--max-length -5"),
    "float16 on CPU": (["--dtype", "float16", "--device", "cpu"], "float16"),
    "CUDA without a GPU": (["--device", "cuda"], "CUDA is not available"),
    "unknown dtype": (["--dtype", "float8"], "dtype='float8' is unknown"),
    "unknown dataset": (["--dataset", "no-such-source"], "is not understood"),
    "bad hf spec": (["--dataset", "hf:only-a-name"], "expected hf:NAME[/CONFIG]:SPLIT:FIELD"),
    "last-n 0": (["--last-n", "0"], "--last-n 0"),
    "unwritable output": (["--out", "/proc/condensation-out"], "is not a writable folder"),
    "negative actors": (["--num-actors", "-1"], "--num-actors -1"),
}


@pytest.mark.parametrize("case", sorted(CONDENSE_CASES))
def test_condense_refuses_bad_input_on_one_line(case, in_tmp, capsys, tiny_gpt2_dir):
    from scaling.condense import main

    args, message = CONDENSE_CASES[case]
    files = {"tmp": str(in_tmp / "folder"), "png": write(in_tmp / "t.txt", PNG),
             "empty": write(in_tmp / "e.txt", "\n \n"), "csv": write(in_tmp / "t.csv", "a,b\n")}
    (in_tmp / "folder").mkdir()
    argv = [a.format(**files) for a in args]
    if "--model" not in argv:
        argv = ["--model", str(tiny_gpt2_dir), *argv]
    if "--max-length" not in argv:  # within the tiny model's context, so only the case's own problem is found
        argv += ["--max-length", "64"]
    code, err = run_cli(main, argv + ["--no-progress", "--repetitions", argv[argv.index("--repetitions") + 1]]
                        if "--repetitions" in argv else argv + ["--no-progress", "--repetitions", "2"],
                        capsys, in_tmp)
    assert code == 2, err
    assert err.startswith("condense: error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err


# --- python -m analysis.scaling_curves -------------------------------------------------------------------------


ANALYSIS_CASES = {
    "no store": (["--tracking-uri", "sqlite:///{tmp}/none.db"], "no MLflow database"),
    "store file is not a database": (["--tracking-uri", "sqlite:///{png}"], "is not an MLflow (SQLite) store"),
    "unknown study": (["--tracking-uri", "{store}", "--study", "nope"], "--study 'nope': no such study"),
    "unwritable output": (["--tracking-uri", "{store}", "--out", "/proc/analysis-out"], "is not a writable folder"),
    "negative bootstrap": (["--tracking-uri", "{store}", "--bootstrap", "-1"], "--bootstrap -1"),
}


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    from analysis_store import fill_synthetic_study

    folder = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    fill_synthetic_study(uri, "ladder", rungs={"a-1M": 1e6, "b-4M": 4e6}, seeds=(0,), failed=0, with_artifacts=False,
                         artifact_root=str(folder / "artifacts"))
    return uri


@pytest.mark.parametrize("case", sorted(ANALYSIS_CASES))
def test_analysis_refuses_bad_input_on_one_line(case, in_tmp, capsys, synthetic_store):
    from analysis.scaling_curves import main

    args, message = ANALYSIS_CASES[case]
    files = {"tmp": str(in_tmp), "png": write(in_tmp / "fake.db", PNG), "store": synthetic_store}
    code, err = run_cli(main, [a.format(**files) for a in args], capsys, in_tmp)
    assert code == 2, err
    assert err.startswith("analysis.scaling_curves: error: ") and "\n" not in err and "Traceback" not in err, err
    assert message in err, err


def test_there_are_at_least_thirty_cases():
    assert len(RUN_CASES) + len(CONDENSE_CASES) + len(ANALYSIS_CASES) >= 30
