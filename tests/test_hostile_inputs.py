"""Hostile values for every key of every study dataclass: each is refused with one short line that names the key
(never a traceback, never another exception), or accepted only where it can work (then the study plans). The
keys come from the dataclasses themselves (`scaling.schema.study_keys`), so a new key is covered the day it is
added. Most cases load in-process (a millisecond each); a few run the real command line."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import time
import types
import typing
from pathlib import Path

import pytest
import yaml

from scaling.config import StudyConfig, describe_study_plan, load_study_file, plan_runs
from scaling.errors import MESSAGE_LIMIT, DispersionScalingError
from scaling.observe_config import ObserveConfig
from scaling.schema import read_study_mapping, study_keys

REPO = Path(__file__).resolve().parent.parent
TRAIN_BASE = read_study_mapping(REPO / "search_spaces" / "smoke.yaml")
TRAIN_BASE["eval"] = {"tasks": ["bundled_cloze"], "limit": 4}
OBSERVE_BASE = read_study_mapping(REPO / "search_spaces" / "observe_paper_families.yaml")
NAME_KEYS = {"study", "families[].name"}
"""Keys that become folder or file names: a path or non-ASCII text is refused there."""

NUMBER_HOSTILE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "negative": -1, "huge float": 1e300,
                  "huge int": 10**30}
TEXT_HOSTILE = {"control character": "a\nb", "NUL": "a\x00b", "very long": "x" * 5000}
MAYBE = {"zero": 0, "path-like": "../../etc/passwd", "non-ASCII": "r\u00e9sum\u00e9-\u540d\u524d", "empty": ""}
"""Values a key may legitimately hold (a count of 0, a relative path): accepted only if the study then plans."""


def _options(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return tuple(a for a in typing.get_args(hint) if a is not type(None))
    return (hint,)


def hostile_values(hint, valid_item) -> dict[str, tuple[object, bool]]:
    """label -> (value, must be refused) for a key of type `hint`; `valid_item` is a good entry of a list key."""
    options = _options(hint)
    cases: dict[str, tuple[object, bool]] = {label: (value, False) for label, value in MAYBE.items()}
    scalar = options[0]
    if typing.get_origin(scalar) is tuple:
        item, variable = typing.get_args(scalar)[0], typing.get_args(scalar)[-1] is Ellipsis
        if variable:
            cases["duplicate"] = ([valid_item, valid_item], True)
        for label, value in ({**NUMBER_HOSTILE} if item in (int, float) else dict(TEXT_HOSTILE)).items():
            cases[label] = ([value] if variable else [value] * len(typing.get_args(scalar)), True)
        cases["wrong type"] = ({"a": 1}, True)
        return cases
    if int in options or float in options:
        cases.update({label: (value, True) for label, value in NUMBER_HOSTILE.items()})
    if str in options:
        cases.update({label: (value, True) for label, value in TEXT_HOSTILE.items()})
    if bool in options:
        cases["wrong type"] = ("maybe", True)
    elif str not in options:
        cases["wrong type"] = ("abc", True)
    else:
        cases["wrong type"] = ([[1, 2]], True)
    return cases


def mapping_with(key: str, value) -> dict:
    """The base study of the key's kind with `key` (dotted, `[]` for a list entry) set to `value`."""
    observe = key in {k for k, _ in study_keys(ObserveConfig)} and key not in {k for k, _ in study_keys(StudyConfig)}
    raw = copy.deepcopy(OBSERVE_BASE if observe else TRAIN_BASE)
    if key.startswith("decide."):  # a decide section needs its claims and a budget: the key's value goes into a valid one
        raw["decide"] = {"claims": ["b", "c"], "smallest_effects": {"b": 0.02}, "max_seeds": 3}
    if key.startswith("arms[]."):
        field = key.split(".", 1)[1]
        raw["arms"] = [{"name": value} if field == "name" else {"name": "dispersion", field: value}]
    elif key.startswith("families[]."):
        field = key.split(".", 1)[1]
        if field == "name":
            raw["families"] = [{"name": value, "models": ["gpt2"]}]
        else:
            model_field = field.split(".", 1)[1]
            raw["families"] = [{"name": "f", "models": [{"name": "gpt2"} | {model_field: value}]}]
    elif key.startswith("sizing[]."):
        raw["sizing"] = [{key.split(".", 1)[1]: value}]
    else:
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def valid_item(key: str, hint):
    """A good entry for a list key (to list it twice): the base study's first, else a known good choice."""
    node = OBSERVE_BASE if key == "sources" else TRAIN_BASE
    for part in key.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    if isinstance(node, list) and node:
        return node[0]
    defaults = {"search.layers": "all", "search.variants": "angular_spread", "search.tau": 1.0,
                "search.clamp_threshold": 0.1, "search.extra_seeds": 7, "eval.selection_tasks": "bundled_cloze"}
    return defaults.get(key, "x")


ALL_KEYS = sorted({*study_keys(StudyConfig), *study_keys(ObserveConfig)}, key=lambda kv: kv[0])


def test_every_key_is_covered():
    keys = [k for k, _ in ALL_KEYS]
    assert len(keys) >= 100 and "training.lr" in keys and "families[].models[].params" in keys, keys


@pytest.mark.parametrize("key,hint", ALL_KEYS, ids=[k for k, _ in ALL_KEYS])
def test_hostile_values_are_refused_on_one_line_naming_the_key(key, hint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    leaf = key.rsplit(".", 1)[-1].replace("[]", "")
    parent = key.split("[]")[0].rsplit(".", 1)[-1]
    for label, (value, must_refuse) in hostile_values(hint, valid_item(key, hint)).items():
        if key in NAME_KEYS and label in ("path-like", "non-ASCII", "empty"):
            must_refuse = True
        path = tmp_path / "study.yaml"
        path.write_text(yaml.safe_dump(mapping_with(key, value), allow_unicode=True))
        started = time.perf_counter()
        try:
            study = load_study_file(path)
            if isinstance(study, StudyConfig):
                describe_study_plan(study, plan_runs(study))
            study.to_dict()
        except DispersionScalingError as exc:
            message = str(exc)
            assert "\n" not in message and len(message) <= MESSAGE_LIMIT, (key, label, message[:300])
            assert leaf.rstrip("s") in message or parent in message, (key, label, message)  # rungs: rung=...
        else:
            assert not must_refuse, f"{key}={value!r:.60} ({label}) was accepted"
        assert time.perf_counter() - started < 5, (key, label)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"], (key, label)


# --- the YAML itself --------------------------------------------------------------------------------------


def refusal(tmp_path, text: str) -> str:
    path = tmp_path / "study.yaml"
    path.write_text(text)
    with pytest.raises(DispersionScalingError) as caught:
        load_study_file(path)
    message = str(caught.value)
    assert "\n" not in message and len(message) <= MESSAGE_LIMIT, message[:300]
    return message


def test_a_section_written_twice_names_both_lines(tmp_path):
    text = (REPO / "search_spaces" / "smoke.yaml").read_text() + "training:\n  max_steps: 5000\n"
    message = refusal(tmp_path, text)
    first = 1 + text.splitlines().index("training:")
    assert f"'training' is written twice (lines {first} and {len(text.splitlines()) - 1})" in message, message
    assert "written twice (lines 2 and 3)" in refusal(tmp_path, "study: a\nseeds: [0]\nseeds: [1]\n")


def test_aliases_are_refused_before_they_expand_past_a_bound(tmp_path):
    levels = ["a: &a [" + ",".join(['"xxxxxxxx"'] * 9) + "]"]
    levels += [f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]
    started = time.perf_counter()
    message = refusal(tmp_path, "\n".join(levels) + "\nstudy: x\n")  # 9**9 values once expanded
    assert "anchors and aliases expand to 4.9e+08 values" in message and time.perf_counter() - started < 1
    assert "refers to the value that contains it" in refusal(tmp_path, "study: s\nrungs: &r [tiny-165K, *r]\n")
    shared = [0.1]  # yaml.safe_dump writes &id001 ... *id001 for an object a script used twice: that loads
    text = yaml.safe_dump({"study": "s", "search": {"tau": shared, "clamp_threshold": shared}})
    assert "&id001" in text and "*id001" in text
    path = tmp_path / "aliased.yaml"
    path.write_text(text)
    assert load_study_file(path).search.clamp_threshold == (0.1,)


def test_no_code_runs_from_the_input(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    message = refusal(tmp_path, f"study: !!python/object/apply:os.system ['touch {marker}']\n")
    assert "not valid YAML" in message and not marker.exists()


def test_long_values_never_make_a_long_line(tmp_path):
    assert len(refusal(tmp_path, "study: " + "x" * 10**6 + "\n")) <= MESSAGE_LIMIT
    assert len(refusal(tmp_path, "study: s\n" + "k" * 10**5 + ": 1\n")) <= MESSAGE_LIMIT
    assert len(refusal(tmp_path, "study: s\nrungs: [" + ", ".join(["tiny-165K"] * 10**4) + "]\n")) <= MESSAGE_LIMIT
    assert "nested more than 32 levels" in refusal(tmp_path, "study: " + "[" * 20000 + "]" * 20000 + "\n")


# --- sources and models that must be there ------------------------------------------------------------------


def test_text_sources_one_parser(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from scaling.data import parse_text_source, read_rows

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("one\ntwo\n")
    (tmp_path / "corpus" / "b.txt").write_text("three\n")
    pq.write_table(pa.table({"text": ["four", "five"]}), tmp_path / "t.parquet")
    assert read_rows(parse_text_source("corpus")) == ["one", "two", "three"]
    assert read_rows(parse_text_source("t.parquet")) == ["four", "five"]
    (tmp_path / "empty").mkdir()
    (tmp_path / "zero.parquet").write_bytes(b"")
    (tmp_path / "fake.parquet").write_bytes(b"not a parquet file")
    for spec, message in (("empty", "a folder without"), ("zero.parquet", "is empty"), ("fake.parquet", "PAR1"),
                          ("nope.txt", "no such file")):
        with pytest.raises(DispersionScalingError, match=message):
            parse_text_source(spec)
        path = tmp_path / "s.yaml"
        path.write_text(f"study: s\ndata: {{source: {spec}}}\n")
        with pytest.raises(DispersionScalingError, match=f"data.source: .*{message}"):
            load_study_file(path)


def test_init_from_must_hold_a_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty-model").mkdir()
    path = tmp_path / "s.yaml"
    for value, message in (("./missing", "no such model folder"), ("empty-model", "no config.json")):
        path.write_text(f"study: s\ntraining: {{init_from: {value}}}\n")
        with pytest.raises(DispersionScalingError, match=message):
            load_study_file(path)


# --- the real command line: exit 2, one line, nothing written, in seconds -----------------------------------


def run_cli(tmp_path, *argv) -> tuple[int, str, float]:
    before = set(tmp_path.iterdir())
    started = time.perf_counter()
    done = subprocess.run([sys.executable, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
                               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"})
    elapsed = time.perf_counter() - started
    assert set(tmp_path.iterdir()) == before, sorted(p.name for p in set(tmp_path.iterdir()) - before)
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr[-2000:]
    return done.returncode, done.stderr.strip(), elapsed


def closed_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_cli_refusals(tmp_path):
    smoke = str(REPO / "search_spaces" / "smoke.yaml")
    run = str(REPO / "scaling" / "run.py")
    dead = f"http://127.0.0.1:{closed_port()}"
    cases = [
        ((run, smoke, "--set", "training.lr=.inf"), "training.lr=inf: must be a finite number"),
        ((run, smoke, "--resume", "--set", f"tracking_uri={dead}"), f"MLflow at '{dead}' is unreachable"),
        ((run, smoke, "--set", "tracking_uri=bogus://x"), "scheme 'bogus' is not an MLflow store"),
        (("-m", "analysis.scaling_curves", "--tracking-uri", dead), "MLflow is unreachable"),
        (("-m", "analysis.scaling_curves", "--seed", "-1"), "--seed -1: must be in 0..4294967295"),
        (("-m", "analysis.scaling_curves", "--huber-delta", "nan"), "--huber-delta nan: must be a finite number"),
    ]
    for argv, message in cases:
        code, err, elapsed = run_cli(tmp_path, *argv)
        assert code == 2 and message in err, (argv, err)
        assert elapsed < 30, (argv, elapsed)  # 1-2 s idle, more on busy cores; never MLflow's minutes of retries


# --- bounded work per input ---------------------------------------------------------------------------------


def test_condense_tokenizes_only_what_it_keeps(tokenizer):
    from scaling.condensation import tokenize_texts

    line = " ".join(f"word{i % 97} and more text" for i in range(400_000))  # one ~10 MB line
    started = time.perf_counter()
    [long] = tokenize_texts(tokenizer, [line], 64)
    elapsed = time.perf_counter() - started
    [short] = tokenize_texts(tokenizer, [line[:5000]], 64)
    assert long.tolist() == short.tolist() and len(long) == 64
    assert elapsed < 2, elapsed  # the whole line: 62 s and 1.7 GB (2 busy cores); the prefix: 0.014 s


def test_storage_uris_keep_their_query_at_the_end():
    from scaling.storage import join

    assert join("s3://b/p?endpoint_override=localhost:9000", "x", "y") == "s3://b/p/x/y?endpoint_override=localhost:9000"
    assert join("s3://b/p/", "x") == "s3://b/p/x" and join("/tmp/a?b", "x") == "/tmp/a?b/x"  # '?' in a local name


def test_a_task_yaml_that_does_not_parse_is_named(tmp_path):
    from scaling.errors import ConfigError
    from scaling.evaluate import EvalConfig, check_tasks

    (tmp_path / "mine.yaml").write_text("task: my_cloze\ndataset_path: [json\n")
    with pytest.raises(ConfigError, match=r"'my_cloze' is not an lm-eval task, and .*mine.yaml does not parse \(line"):
        check_tasks(EvalConfig(tasks=("my_cloze",), include_path=str(tmp_path)))


def test_numbers_as_researchers_write_them(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("study: s\ntraining: {lr: 5e-4, tokens: 2e5, max_steps: null}\n")  # YAML 1.1 made these strings
    study = load_study_file(path)
    assert study.training.lr == 5e-4 and study.training.tokens == 200_000 and isinstance(study.training.tokens, int)
