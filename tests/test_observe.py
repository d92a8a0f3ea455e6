"""Observation studies end to end: tiny local GPT-2 family, 2 sources, real local Ray and MLflow."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
import torch

from scaling import names
from scaling.errors import ConfigError, ModelError
from scaling.config import load_study_file
from scaling.measure import build_final_norm_base, check_tokens_fit
from scaling.observe import build_tiny_models, run_observation_study
from scaling.observe_config import (
    ClusterShape,
    ObserveConfig,
    ObserveResources,
    compute_placement,
    load_observe_study,
    measurement_hash,
)

TINY_YAML = Path(__file__).resolve().parent.parent / "search_spaces" / "observe_tiny.yaml"
PAPER_YAML = TINY_YAML.with_name("observe_paper_families.yaml")
FAMILIES = "[{name: tiny-gpt2, models: [./tiny-2L, ./tiny-3L, ./tiny-4L]}, {name: broken, models: [./missing-model]}]"


# --- config and sizing (no Ray) -------------------------------------------------------------------


def test_shipped_study_files_load_strictly():
    paper = load_observe_study(PAPER_YAML)
    assert [f.name for f in paper.families] == ["gpt2", "qwen2.5", "qwen3", "bloom"]
    assert paper.sources == ("wikitext", "pubmed_qa", "imdb", "squad")
    assert (paper.repetitions, paper.max_length) == (100, 512)
    assert isinstance(load_study_file(PAPER_YAML), ObserveConfig)
    assert not isinstance(load_study_file(TINY_YAML.with_name("smoke.yaml")), ObserveConfig)
    with pytest.raises(ConfigError, match="unknown key 'resources.gpus'"):
        load_observe_study(TINY_YAML, ["resources.gpus=2"])
    with pytest.raises(ConfigError, match="sizing: max_params must increase"):
        load_observe_study(TINY_YAML, ["sizing=[{max_params: 2.0e+9}, {max_params: 1.0e+9}, {max_params: null}]"])
    with pytest.raises(ConfigError, match="kind='train'"):
        load_observe_study(TINY_YAML, ["kind=train"])


def test_placement_follows_size_and_dtype():
    resources = ObserveResources(gpu_memory_gb=80, memory_overhead=1.2, activation_gb=4, max_gpus_per_model=8)
    node8 = ClusterShape(max_gpus_per_node=8, max_memory_gb_per_node=1000)
    small = compute_placement(124_000_000, "float32", resources, node8)
    assert (small.device, small.num_gpus, small.device_map) == ("cuda", 0.25, None)
    large = compute_placement(72_700_000_000, "bfloat16", resources, node8)
    assert large.num_gpus == 3 and large.device_map == "auto" and large.unsupported is None
    too_big = compute_placement(72_700_000_000, "bfloat16", resources, ClusterShape(max_gpus_per_node=2))
    assert "unsupported on this cluster" in too_big.unsupported and "3 GPUs" in too_big.unsupported
    cpu = compute_placement(10_000, "float16", ObserveResources(device="cpu"), ClusterShape())
    assert "float16 on CPU is refused" in cpu.unsupported
    no_gpu = compute_placement(10_000, "float32", ObserveResources(device="cuda"), ClusterShape())
    assert "no GPU" in no_gpu.unsupported
    assert measurement_hash("m", "s", 3, 32, "float32") != measurement_hash("m", "s", 3, 32, "bfloat16")


def test_final_norm_and_tokenizer_checks(tiny_gpt2_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2_dir).eval()
    tokens = tokenizer("a short text", return_tensors="pt")
    usual = build_final_norm_base(model.base_model)
    usual(**tokens, output_hidden_states=True, use_cache=False)
    assert usual.replaced is False

    class NoFinalNorm(torch.nn.Module):  # a seam: hidden_states that stop before the final norm
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **kwargs):
            output = self.inner(**kwargs)
            output.hidden_states = output.hidden_states[:-1] + (output.hidden_states[-1] * 2.0,)
            return output

    patched = build_final_norm_base(NoFinalNorm(model.base_model))
    output = patched(**tokens, output_hidden_states=True, use_cache=False)
    assert patched.replaced is True
    assert len(output.hidden_states) == model.config.n_layer + 1
    assert torch.equal(output.hidden_states[-1], output.last_hidden_state)

    assert check_tokens_fit(model, tokenizer, ["one two three", "four"], 8)[1] <= 8
    model.resize_token_embeddings(8)  # a tokenizer whose ids the model cannot embed
    with pytest.raises(ModelError, match="embeds only 8 tokens"):
        check_tokens_fit(model, tokenizer, ["the quick brown fox"], 8)


# --- the tiny study end to end --------------------------------------------------------------------


@pytest.fixture(scope="module")
def observed(ray_session, tmp_path_factory, tokenizer):
    base = build_tiny_models(tmp_path_factory.mktemp("observe-models"), tokenizer)
    (base / "missing-model").mkdir()  # there (a missing path is refused before any work) but holds no model
    store = tmp_path_factory.mktemp("observe-store")
    uri = f"sqlite:///{store / 'mlflow.db'}"
    overrides = [f"base_dir={base}", f"tracking_uri={uri}", "repetitions=3", "max_length=32", f"families={FAMILIES}"]
    study = load_observe_study(TINY_YAML, overrides)
    log: list[str] = []
    first = run_observation_study(study, TINY_YAML.read_text(), progress=log.append)
    second = run_observation_study(study, TINY_YAML.read_text(), progress=log.append)
    return study, uri, first, second, log, store


def _observe_runs(uri: str, study: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(study)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.{names.TAG_KIND} = '{names.KIND_OBSERVE}'")
    return client, runs


def test_tiny_study_records_runs_failures_and_skips(observed):
    study, uri, first, second, log, _ = observed
    finished = [o for o in first if o.status == names.STATUS_FINISHED]
    failed = [o for o in first if o.status == names.STATUS_FAILED]
    assert len(finished) == 6 and len(failed) == 2, [(o.model, o.source, o.status, o.detail) for o in first]
    assert all("missing-model" in o.detail and "config.json" in o.detail for o in failed)

    client, runs = _observe_runs(uri, study.study)
    assert len(runs) == 8  # one run per (model, source), failures included
    sizes = {}
    for run in runs:
        tags = run.data.tags
        assert tags[names.TAG_SOURCE] in {"bundled", "short_texts"}
        if tags[names.TAG_FAMILY] == "broken":
            assert tags[names.TAG_STATUS] == names.STATUS_FAILED and "missing-model" in tags[names.TAG_FAILURE]
            continue
        assert tags[names.TAG_STATUS] == names.STATUS_FINISHED and tags["dtype"] == "float32"
        sizes[tags[names.TAG_MODEL]] = int(tags[names.TAG_N_PARAMS])
        metrics = run.data.metrics
        assert {names.COND_SPEARMAN, names.COND_KENDALL, names.COND_LATE_HALF_MEAN_COS, names.layer_metric(0)} <= set(metrics)
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {names.ARTIFACT_CONDENSATION_JSON, names.ARTIFACT_HEATMAP_PNG}
    assert sizes["tiny-2L"] < sizes["tiny-3L"] < sizes["tiny-4L"]

    # Re-run: the six finished measurements are skipped, the two failures retried (and fail again).
    assert sorted(o.status for o in second) == ["failed"] * 2 + ["skipped"] * 6
    assert len(_observe_runs(uri, study.study)[1]) == 8
    assert sum("already measured" in line for line in log) == 6


def test_short_texts_are_measured_at_their_length(observed):
    import json

    study, uri, *_ = observed
    client, runs = _observe_runs(uri, study.study)
    run = next(r for r in runs if r.data.tags[names.TAG_SOURCE] == "short_texts" and r.data.tags[names.TAG_STATUS] == names.STATUS_FINISHED)
    path = client.download_artifacts(run.info.run_id, names.ARTIFACT_CONDENSATION_JSON)
    record = json.loads(Path(path).read_text())
    assert record["tokens"]["min"] < study.max_length and record["num_sequences"] == 3
    assert record["hidden_states_end"] == "last_hidden_state"


def test_analysis_reports_observation_trends(observed, tmp_path):
    from analysis.scaling_curves import main

    study, uri, *_ = observed
    out = tmp_path / "analysis"
    assert main(["--tracking-uri", uri, "--study", study.study, "--out", str(out), "--no-log", "--bootstrap", "20"]) == 0
    trends = pl.read_csv(out / "tables/observation_trends.csv")
    assert set(trends["family"]) == {"tiny-gpt2"} and set(trends["source"]) == {"bundled", "short_texts"}
    assert set(trends["metric"]) >= {names.COND_SPEARMAN, names.COND_KENDALL, names.COND_LATE_HALF_MEAN_COS}
    assert trends["slope_per_decade"].is_finite().all()
    models = pl.read_csv(out / "tables/observation_models.csv")
    assert models.height == 6
    for name in ("plots/observation_tiny-gpt2.png", "plots/observation_heatmaps_tiny-gpt2.png", "report.md"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "Observation study" in report and "missing-model" in report
    assert not (out / "tables/observation_vs_paper.csv").exists()  # not the paper's models
