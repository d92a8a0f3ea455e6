"""Downstream evaluation: EvalConfig, the bundled cloze task, real lm-eval on a tiny GPT-2,
the same numbers as lm-eval's own CLI, failures kept per task, and the CLI's user errors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from scaling import names as eval_names
from scaling.errors import ConfigError
from scaling.eval_tasks import BUNDLED_CLOZE, BUNDLED_CLOZE_VAL, TASKS_DIR
from scaling.evaluate import EvalConfig, main, paper_num_fewshot

# --- config (pure, fast) -------------------------------------------------------------------


def test_config_defaults_presets_and_paper_rules():
    config = EvalConfig(tasks=("paper10",))
    assert config.task_names() == eval_names.PAPER10_TASKS + ("paloma_wikitext_103",)
    assert len(eval_names.PAPER10_TASKS) == 10
    assert (config.num_fewshot, config.limit, config.every_steps, config.at_start) == (0, None, None, False)
    assert config.device() == "cpu" and config.ray_options() == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert EvalConfig(tasks=("x",), num_gpus=1).device() == "cuda"
    # The paper: arc_easy, arc_challenge, mmlu, medmcqa few-shot (1 for GPT-2, 5 for Qwen3), the rest zero-shot.
    gpt2 = EvalConfig(tasks=("paper10",), num_fewshot="paper_gpt2")
    shots = [gpt2.fewshot_for(t) for t in ("arc_easy", "mmlu", "medmcqa", "piqa", "paloma_wikitext_103")]
    assert shots == [1, 1, 1, 0, 0]
    assert EvalConfig(tasks=("paper10",), num_fewshot="paper_qwen3").fewshot_for("arc_challenge") == 5
    assert paper_num_fewshot("gpt2") == {"arc_easy": 1, "arc_challenge": 1, "mmlu": 1, "medmcqa": 1}
    mapping = EvalConfig(tasks=("arc_easy", "piqa"), num_fewshot={"arc_easy": 3})
    assert (mapping.fewshot_for("arc_easy"), mapping.fewshot_for("piqa")) == (3, 0)
    assert EvalConfig(tasks=("arc_easy",), num_fewshot=2).fewshot_for("arc_easy") == 2
    # every_steps default: the paper's floor(steps / 5) + 1; the final step is always evaluated.
    assert config.resolve_every_steps(1526) == 306
    assert config.eval_steps(1526) == (306, 612, 918, 1224, 1526)
    assert EvalConfig(tasks=("x",), every_steps=10, at_start=False).eval_steps(25) == (10, 20, 25)
    assert EvalConfig(tasks=("x",), every_steps=10, at_start=True).eval_steps(20) == (0, 10, 20)
    assert EvalConfig(tasks=("x",), every_steps=0).eval_steps(20) == (20,)  # 0: only the last step
    hash(mapping)  # usable as a dict key / in sets despite the mapping field


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"tasks": ()}, "eval.tasks"),
        ({"tasks": ("arc_easy", "paper10")}, "eval.tasks"),  # arc_easy twice
        ({"selection_tasks": ("bundled_cloze_val",)}, "eval.selection_tasks"),  # not among tasks
        ({"num_fewshot": -1}, "eval.num_fewshot"),
        ({"num_fewshot": "paper_llama"}, "eval.num_fewshot"),
        ({"num_fewshot": {"piqa": 1}}, "eval.num_fewshot.piqa"),  # not a configured task
        ({"num_fewshot": {"bundled_cloze": -2}}, "eval.num_fewshot.bundled_cloze"),
        ({"limit": 0}, "eval.limit"),
        ({"batch_size": 0}, "eval.batch_size"),
        ({"every_steps": -1}, "eval.every_steps"),
        ({"include_path": ""}, "eval.include_path"),
        ({"dtype": "float8"}, "eval.dtype"),
        ({"dtype": "float16"}, "eval.dtype"),  # CPU
        ({"num_cpus": 0}, "eval.num_cpus"),
        ({"num_gpus": -1}, "eval.num_gpus"),
        ({"fewshot_seed": "random"}, "eval.fewshot_seed"),
        ({"fewshot_seed": -1}, "eval.fewshot_seed"),
        ({"log_samples": "yes"}, "eval.log_samples"),
    ],
)
def test_config_errors_name_the_key(kwargs, key):
    with pytest.raises(ConfigError, match=rf"^{key.replace('.', '[.]')}\b"):
        EvalConfig(**{"tasks": (BUNDLED_CLOZE,), **kwargs})


def test_config_loads_through_the_study_loader():
    """The study loader's generic _build/_coerce handles the section as it is today: lists become
    tuples, the few-shot mapping passes through to validation, errors keep the dotted key."""
    from scaling.schema import build_config as _build

    config = _build(EvalConfig, {"tasks": ["paper10"], "num_fewshot": {"mmlu": 1}, "limit": 500,
                                 "num_gpus": 1}, "eval")
    assert config.tasks == ("paper10",) and config.num_fewshot == {"mmlu": 1} and config.num_gpus == 1.0
    assert _build(EvalConfig, {"tasks": ["x"], "num_fewshot": "paper_gpt2"}, "eval").fewshot_for("x") == 0
    selecting = _build(EvalConfig, {"tasks": ["paper10", "bundled_cloze_val"],
                                    "selection_tasks": ["bundled_cloze_val"]}, "eval")
    assert selecting.selection_tasks == ("bundled_cloze_val",)
    with pytest.raises(ConfigError, match="unknown key 'eval.shots'"):
        _build(EvalConfig, {"tasks": ["x"], "shots": 1}, "eval")
    with pytest.raises(ConfigError, match="eval.limit"):
        _build(EvalConfig, {"tasks": ["x"], "limit": "all"}, "eval")


def test_metric_key_helpers():
    assert eval_names.metric_name("acc,none") == "acc"
    assert eval_names.metric_name("acc_stderr,none") == "acc_stderr"
    assert eval_names.metric_name("word_perplexity,none") == "word_perplexity"
    assert eval_names.metric_name("exact_match,strict-match") == "exact_match_strict-match"
    key = eval_names.eval_metric_key("arc_easy", "acc")
    assert key == "eval/arc_easy/acc" and eval_names.parse_eval_metric_key(key) == ("arc_easy", "acc")
    assert eval_names.parse_eval_metric_key(eval_names.EVAL_MEAN_ACC) is None
    assert eval_names.eval_artifact_path(120) == "eval/step_000120/eval_results.json"


def test_imports_stay_light():
    """--help and config loading must not pay for lm-eval, torch or transformers."""
    code = ("import sys, scaling.evaluate, scaling.eval_tasks; "
            "print(sorted(m for m in ('lm_eval', 'torch', 'transformers', 'datasets') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- the bundled task's data ---------------------------------------------------------------


def test_bundled_cloze_data_is_small_valid_and_reproducible():
    from scaling.data import bundled_heldout
    from scaling.eval_tasks import build

    data_path = TASKS_DIR / build.DATA_FILE
    assert data_path.stat().st_size < 200_000
    manifest = json.loads((TASKS_DIR / build.MANIFEST_FILE).read_text())
    docs = [json.loads(line) for line in data_path.read_text(encoding="utf-8").splitlines()]
    counts = {split: sum(d["split"] == split for d in docs) for split in build.SPLITS}
    assert counts == manifest["docs"] and counts["train"] == build.TRAIN_DOCS
    assert all(counts[split] >= needed for split, needed in build.MIN_EVAL_DOCS.items())
    for doc in docs:
        assert len(doc["choices"]) == 4 == len(set(doc["choices"])) and 0 <= doc["gold"] < 4
        assert len(doc["context"].split()) >= build.MIN_CONTEXT_WORDS
    assert manifest["chance_acc"] == 1 / 4
    contexts = {split: {d["context"] for d in docs if d["split"] == split} for split in build.SPLITS}
    assert not contexts["test"] & contexts["validation"] and not contexts["test"] & contexts["train"]
    golds = [d["gold"] for d in docs]
    assert max(golds.count(g) for g in range(4)) < 0.35 * len(golds)  # the answer's position tells nothing

    rows = build.corpus_rows()
    # Every validation/test passage is cut from a held-out paragraph; every few-shot one from a training paragraph.
    held = [" ".join(row.split()) for row in rows if bundled_heldout(row)]
    kept = [" ".join(row.split()) for row in rows if not bundled_heldout(row)]
    for split in ("validation", "test"):
        assert all(any(c in p for p in held) for c in contexts[split]), split
    assert all(any(c in p for p in kept) for c in contexts["train"])
    if build.corpus_fingerprint(rows) != manifest["corpus_sha256"]:
        pytest.skip(f"the bundled corpus differs from the one the data was built from (Python "
                    f"{manifest['python']}); regenerate with python -m scaling.eval_tasks.build")
    data, new_manifest = build.regenerate(rows)
    assert data == data_path.read_text(encoding="utf-8")
    assert json.loads(new_manifest)["data_sha256"] == manifest["data_sha256"]


# --- real lm-eval on a tiny GPT-2 ----------------------------------------------------------

LIMIT = 24


@pytest.fixture(scope="module")
def bundled_result(tiny_gpt2_dir):
    from scaling.evaluate import evaluate_model

    config = EvalConfig(tasks=(BUNDLED_CLOZE, BUNDLED_CLOZE_VAL), selection_tasks=(BUNDLED_CLOZE_VAL,),
                        limit=LIMIT, batch_size=8, include_path=str(TASKS_DIR))
    return evaluate_model(tiny_gpt2_dir, config, device="cpu")


def test_evaluate_model_on_the_bundled_tasks(bundled_result):
    result = bundled_result
    assert result.ok and result.failures == {}
    for task in (BUNDLED_CLOZE, BUNDLED_CLOZE_VAL):
        for metric in ("acc", "acc_norm"):
            assert 0.0 <= result.metrics[f"eval/{task}/{metric}"] <= 1.0
        assert result.metrics[f"eval/{task}/acc_stderr"] > 0
        assert result.lm_eval["n-samples"][task]["effective"] == LIMIT
    # The test task makes the reported mean; the validation task alone the selection mean.
    assert result.metrics[eval_names.EVAL_MEAN_ACC] == result.metrics[f"eval/{BUNDLED_CLOZE}/acc"]
    assert result.metrics[eval_names.EVAL_SELECTION_MEAN_ACC] == result.metrics[f"eval/{BUNDLED_CLOZE_VAL}/acc"]
    assert result.metrics[eval_names.EVAL_NUM_FAILED] == 0 and result.metrics[eval_names.EVAL_SECONDS] > 0
    assert all(",none" not in key for key in result.metrics)
    record = json.loads(result.to_json())  # the artifact: plain JSON
    assert record["lm_eval"]["results"][BUNDLED_CLOZE]["acc,none"] == result.metrics["eval/bundled_cloze/acc"]
    assert record["settings"]["limit"] == LIMIT and record["settings"]["device"] == "cpu"
    import pickle

    assert pickle.loads(pickle.dumps(result)).metrics == result.metrics  # travels back from a Ray task


def test_chance_level_and_per_item_results(bundled_result):
    """Every bundled document has 4 choices: chance is 1/4 per task and for both means; each logged item's
    correctness is its gold choice having the highest log-likelihood, and the items average to the accuracy."""
    metrics = bundled_result.metrics
    for key in (f"eval/{BUNDLED_CLOZE}/chance_acc", f"eval/{BUNDLED_CLOZE_VAL}/chance_acc",
                eval_names.EVAL_CHANCE_MEAN_ACC, eval_names.EVAL_CHANCE_SELECTION_MEAN_ACC):
        assert metrics[key] == pytest.approx(0.25), key
    texts = bundled_result.samples_jsonl()
    assert set(texts) == {BUNDLED_CLOZE, BUNDLED_CLOZE_VAL}
    for task, text in texts.items():
        records = [json.loads(line) for line in text.splitlines()]
        assert [r["doc_id"] for r in records] == list(range(LIMIT)) and all(r["task"] == task for r in records)
        for r in records:
            assert len(r["loglik"]) == 4 and r["acc"] in (0.0, 1.0) and len(r["doc_hash"]) == 16
            assert r["acc"] == float(max(range(4), key=lambda i: r["loglik"][i]) == r["target"])
        assert sum(r["acc"] for r in records) / LIMIT == pytest.approx(metrics[f"eval/{task}/acc"])
    assert eval_names.eval_samples_path(120, BUNDLED_CLOZE) == "eval/samples/step_000120/bundled_cloze.jsonl"


def test_fewshot_examples_follow_the_runs_seed(tiny_gpt2_dir):
    """With eval.fewshot_seed `run`, the run's seed draws the few-shot examples: the same seed gives the same
    scores, another seed other prompts (other log-likelihoods); a fixed seed ignores the run's."""
    from scaling.evaluate import LM_EVAL_FEWSHOT_SEED, evaluate_model

    config = EvalConfig(tasks=(BUNDLED_CLOZE,), num_fewshot=1, limit=6, batch_size=1, dtype="float32")

    def logliks(config, seed):
        result = evaluate_model(tiny_gpt2_dir, config, device="cpu", seed=seed)
        return result.lm_eval["config"]["fewshot_seed"], [r["loglik"] for r in result.samples[BUNDLED_CLOZE]]

    seed0, first = logliks(config, 0)
    assert seed0 == 0 and logliks(config, 0)[1] == first
    assert logliks(config, 1)[1] != first
    assert logliks(config, None)[0] == LM_EVAL_FEWSHOT_SEED
    pinned = EvalConfig(tasks=(BUNDLED_CLOZE,), num_fewshot=1, limit=6, fewshot_seed=0, log_samples=False)
    seed, _ = logliks(dataclasses.replace(pinned, log_samples=True), 7)
    assert seed == 0
    assert evaluate_model(tiny_gpt2_dir, pinned, device="cpu", seed=7).samples == {}  # log_samples off: none kept


def test_python_path_equals_lm_eval_cli(tiny_gpt2_dir, bundled_result, tmp_path):
    """lm-eval's own CLI on the same model, task and limit gives the same accuracy."""
    out = tmp_path / "cli"
    subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={tiny_gpt2_dir}",
         "--tasks", BUNDLED_CLOZE, "--include_path", str(TASKS_DIR), "--device", "cpu", "--limit", str(LIMIT),
         "--batch_size", "8", "--output_path", str(out)],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    )
    [results_file] = out.rglob("results_*.json")
    cli = json.loads(results_file.read_text())["results"][BUNDLED_CLOZE]
    assert cli["acc,none"] == bundled_result.metrics["eval/bundled_cloze/acc"]
    assert cli["acc_norm,none"] == bundled_result.metrics["eval/bundled_cloze/acc_norm"]


def test_unknown_task_is_refused_with_close_matches():
    from scaling.evaluate import check_tasks

    with pytest.raises(ConfigError, match=r"'bundled_clozee' is not an lm-eval task.*close matches: bundled_cloze"):
        check_tasks(EvalConfig(tasks=("bundled_clozee",)))
    with pytest.raises(ConfigError, match=r"'arc_easyy'.*arc_easy"):
        check_tasks(EvalConfig(tasks=("arc_easyy",)))
    check_tasks(EvalConfig(tasks=("paper10", BUNDLED_CLOZE)))  # all known: no error, no data touched
    with pytest.raises(ConfigError, match="eval.include_path"):
        check_tasks(EvalConfig(tasks=(BUNDLED_CLOZE,), include_path="/no/such/folder"))


def _write_broken_tasks(folder: Path) -> None:
    folder.mkdir()
    (folder / "missing.yaml").write_text(
        "task: missing_data_cloze\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'no-such-file.jsonl'}\n"
        "output_type: multiple_choice\ntest_split: test\n"
        "doc_to_text: '{{context}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: gold\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    # Loads fine, fails while scoring: exercises the retry of each task on its own.
    (folder / "scoring.yaml").write_text(f"include: {TASKS_DIR / 'bundled_cloze.yaml'}\ntask: failing_cloze\n"
                                         "process_results: !function scoring.process_results\n")
    (folder / "scoring.py").write_text("def process_results(doc, results):\n"
                                       "    raise RuntimeError('scoring failed on purpose')\n")


def test_failed_tasks_are_recorded_and_the_others_still_run(tiny_gpt2_dir, tmp_path):
    from scaling.evaluate import check_tasks, evaluate_model

    folder = tmp_path / "tasks"
    _write_broken_tasks(folder)
    config = EvalConfig(tasks=("missing_data_cloze", BUNDLED_CLOZE, "failing_cloze"), limit=8,
                        include_path=str(folder))
    check_tasks(config)  # the names are known: only running them can fail
    result = evaluate_model(tiny_gpt2_dir, config, device="cpu")
    assert list(result.failures) == ["missing_data_cloze", "failing_cloze"]
    assert result.failures["missing_data_cloze"].startswith("could not load: FileNotFoundError")
    assert "scoring failed on purpose" in result.failures["failing_cloze"]
    assert 0.0 <= result.metrics["eval/bundled_cloze/acc"] <= 1.0
    assert result.metrics[eval_names.EVAL_NUM_FAILED] == 2
    assert eval_names.EVAL_MEAN_ACC not in result.metrics  # a mean over fewer tasks is another score
    assert eval_names.EVAL_SELECTION_MEAN_ACC not in result.metrics  # no selection tasks configured
    assert not any(key.startswith(("eval/missing_data_cloze", "eval/failing_cloze")) for key in result.metrics)


# --- the command line ----------------------------------------------------------------------


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_on_an_exported_model_writes_results_and_prints_a_table(tiny_gpt2_dir, tokenizer, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from scaling.evaluate import save_model_for_eval

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir)
    exported = save_model_for_eval(model, tmp_path / "hf", tokenizer=tokenizer)
    exported = save_model_for_eval(model, exported, tokenizer=tokenizer)  # replaces the previous export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no half-written folder left behind
    out = tmp_path / "out"
    code, stdout, _ = run_cli(capsys, "--model", exported, "--tasks", BUNDLED_CLOZE_VAL, "--limit", 8,
                              "--device", "cpu", "--out", out)
    assert code == 0
    record = json.loads((out / eval_names.ARTIFACT_EVAL_JSON).read_text())
    assert 0.0 <= record["metrics"]["eval/bundled_cloze_val/acc"] <= 1.0 and record["failures"] == {}
    assert "bundled_cloze_val" in stdout and "mean acc" in stdout and str(out) in stdout


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "/no/such/model-dir"], "does not exist"),
        (["--model", "EMPTY_DIR"], "no config.json"),
        (["--out", "FILE/out"], "is not a writable folder"),
        (["--out", "/proc/no-such-dir/out"], "is not a writable folder"),
        (["--num-fewshot", "two"], "--num-fewshot 'two': expected an integer"),
        (["--num-fewshot", "-1"], "--num-fewshot=-1"),
        (["--num-fewshot", "piqa=1"], "--num-fewshot.piqa"),
        (["--limit", "0"], "--limit=0"),
        (["--tasks", "bundled_clozee"], "close matches: bundled_cloze"),
        (["--device", "tpu"], "device='tpu' is unknown"),
    ],
)
def test_cli_bad_input_fails_in_one_line_before_any_work(argv, message, tiny_gpt2_dir, tmp_path, capsys):
    (tmp_path / "EMPTY_DIR").mkdir()
    (tmp_path / "FILE").write_text("not a folder")
    args = {"--model": str(tiny_gpt2_dir), "--tasks": BUNDLED_CLOZE, "--out": str(tmp_path / "out")}
    for flag, value in zip(argv[::2], argv[1::2]):
        args[flag] = value.replace("EMPTY_DIR", str(tmp_path / "EMPTY_DIR")).replace("FILE", str(tmp_path / "FILE"))
    code, stdout, stderr = run_cli(capsys, *[x for pair in args.items() for x in pair])
    assert code == 2 and stdout == ""
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("evaluate: error: ") and message in stderr
    assert not (tmp_path / "out").exists()  # nothing written

