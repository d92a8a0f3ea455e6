"""End to end: a real MLflow SQLite store filled through MLflow's client, then the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pytest
from analysis_store import SyntheticStudy, fill_observation_study, fill_sweep_trials, fill_synthetic_study
from mlflow.tracking import MlflowClient

from analysis import load
from analysis.scaling_curves import main
from scaling import names

REPO = Path(__file__).resolve().parents[1]
FAST = ["--bootstrap", "40"]


@dataclass(frozen=True)
class Store:
    uri: str
    root: Path
    ladder: SyntheticStudy
    trial_ids: list[str]
    one_rung: SyntheticStudy


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """Four studies, oldest first; the newest ("one-rung") is what a bare command picks."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    ladder = fill_synthetic_study(uri, "ladder", seeds=(0, 1), failed=1)
    trial_ids = fill_sweep_trials(uri, ladder, lambdas=(0.05, 0.5))
    fill_observation_study(uri, "observe")
    fill_synthetic_study(uri, "only-failed", seeds=(), failed=2)
    one_rung = fill_synthetic_study(
        uri, "one-rung", rungs={"tiny-1M": 1e6}, seeds=(0, 1), failed=0, with_artifacts=False, metric_overrides={names.COND_KENDALL: math.nan}
    )
    return Store(uri, root, ladder, trial_ids, one_rung)


def test_analysis_imports_neither_torch_nor_ray():
    code = "import sys, analysis.scaling_curves, analysis.plots; bad = [m for m in ('torch', 'ray') if m in sys.modules]; assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for option in ("--tracking-uri", "--study", "--out", "--no-log", "--bootstrap", "--metrics", "--size", "MLFLOW_TRACKING_URI"):
        assert option in text


def test_end_to_end_writes_every_output_and_logs_the_analysis_run(store, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--tracking-uri", store.uri, "--study", "ladder", "--out", str(out), *FAST]) == 0
    for name in ("report.md", "provenance.json", "tables/tidy_metrics.parquet", "tables/tidy_metrics.csv", "tables/fits.csv", "tables/fits.parquet",
                 "tables/paired_differences.csv", "tables/multipliers.csv", "tables/best_lambda.csv", "tables/layer_profiles.parquet",
                 "plots/curve_val_loss.png", "plots/curve_condensation_spearman.png", "plots/difference_dispersion.png",
                 "plots/condensation_heatmaps.png", "plots/layer_profiles.png", "plots/profile_over_training.png",
                 "tables/claims.csv", "tables/claims.parquet", "report.html"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name

    fits = pl.read_parquet(out / "tables/fits.parquet")
    loss = fits.filter((pl.col("metric") == names.VAL_LOSS) & (pl.col("arm") == names.ARM_BASELINE)).row(0, named=True)
    assert loss["power_law"] and loss["alpha_low"] <= 0.35 <= loss["alpha_high"]
    # Four rungs support the law; the leave-largest-out check needs a fifth and says so.
    assert loss["holdout_inside"] is None and "needs >= 5 rungs" in loss["reason"]
    spearman = fits.filter(pl.col("metric") == names.COND_SPEARMAN).row(0, named=True)
    assert not spearman["power_law"] and spearman["trend_spearman"] < 0
    multipliers = pl.read_csv(out / "tables/multipliers.csv")
    assert multipliers.height == 4 and (multipliers["multiplier"] > 1).all()
    best = pl.read_csv(out / "tables/best_lambda.csv")
    assert best.height == 4

    tidy = pl.read_parquet(out / "tables/tidy_metrics.parquet")
    for column in ("run_id", "rung", "n_params", "n_params_non_embedding", "tokens", "arm", "lambda", "layers", "variant", "seed", "step", "metric", "value", "kind"):
        assert column in tidy.columns
    assert set(tidy["kind"].unique()) == {names.KIND_TRAIN, names.KIND_TRIAL}
    lazy = load.scan_tidy(out / "tables/tidy_metrics.parquet").filter(pl.col("metric") == names.VAL_LOSS).select("run_id").unique().collect()
    assert lazy.height == len(store.ladder.finished_run_ids) + len(store.ladder.failed_run_ids) + len(store.trial_ids)

    provenance = json.loads((out / "provenance.json").read_text())
    assert set(provenance["input_run_ids"]) == set(store.ladder.finished_run_ids) | set(store.trial_ids)
    assert provenance["failed_run_ids"] == list(store.ladder.failed_run_ids)
    assert provenance["fit_options"]["bootstrap"] == 40 and provenance["git_commit"]
    report = (out / "report.md").read_text()
    assert "Failed runs" in report and store.ladder.failed_run_ids[0] in report
    assert "Effective-parameter multiplier" in report and "Best dispersion λ per rung" in report and "λ*(N) =" not in report
    # The budget comes first, then the claims, then the figures a researcher reads first.
    assert report.index("## What this rests on") < report.index("## Paper claims") < report.index("## Figures behind the claims") < report.index("## Scaling curves")
    assert "4 — tiny-1M (N=600K)" in report and "3 steps" in report and "seeds** per (rung, arm): 2" in report
    assert "(no CI)" not in report  # an estimate without an interval always says why
    claims = pl.read_csv(out / "tables/claims.csv")
    assert claims.columns[:7] == ["key", "claim", "metric", "estimate", "ci_low", "ci_high", "verdict"] and "n" in claims.columns
    assert claims.height == 9 and set(claims["verdict"]) <= {"supported", "contradicted", "no effect", "inconclusive", "not tested", "not testable"}
    tested = claims.filter(pl.col("p_holm").is_not_null() & pl.col("p_holm").is_finite() & (pl.col("key") != "a"))
    assert tested.height >= 4 and tested["ci_low"].is_finite().all() and tested["ci_high"].is_finite().all()
    assert (tested["ci_high"] > tested["ci_low"]).all()  # no zero-width interval
    for key in claims.filter(pl.col("verdict") != "not tested")["key"]:
        assert f"[figure](plots/claim_{key.replace('-', '_')}.png)" in report, key
    b = claims.filter(pl.col("key") == "b").row(0, named=True)
    assert b["ci_high"] < 0 and b["verdict"] in ("supported", "inconclusive")  # dispersion's 0.8x cosine, of sizes varying 3.5x
    page = (out / "report.html").read_text()
    assert page.count('src="data:image/png;base64,') == len(list((out / "plots").glob("*.png")))
    assert "plots/" not in page and "<table>" in page and "Paper claims</h2>" in page  # no external image link
    assert '<a href="#fig-claim_b">figure</a>' in page and 'id="fig-claim_b"' in page  # a claim's row links to its embedded figure

    client = MlflowClient(store.uri)
    logged = client.search_runs([store.ladder.experiment_id], filter_string=f"tags.{names.TAG_KIND} = '{names.KIND_ANALYSIS}'")
    assert len(logged) == 1
    run = logged[0]
    assert run.data.tags["mlflow.parentRunId"] == store.ladder.parent_run_id
    assert run.data.params["analysis.bootstrap"] == "40"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.md", "report.html", "provenance.json", "plots", "tables"} <= artifacts
    assert "cache" not in artifacts
    printed = capsys.readouterr().out
    assert "logged analysis run" in printed and "#/experiments/" in printed and "report.html" in printed
    assert sum(line.startswith("claim (") for line in printed.splitlines()) == 9  # one line per claim

    # The analysis run is not data: a second analysis sees the same inputs, from the cache.
    records = load.read_study(store.uri, "ladder", cache_dir=out / "cache")
    assert records.from_cache and set(records.runs["run_id"]) == set(provenance["input_run_ids"]) | set(provenance["failed_run_ids"])


def test_defaults_pick_the_newest_study_and_report_one_rung(store, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.uri)
    assert main([*FAST, "--no-log"]) == 0
    out = tmp_path / "outputs" / "analysis" / "one-rung"
    report = (out / "report.md").read_text()
    assert "only one rung (tiny-1M" in report
    assert "final values are NaN or infinite" in report  # named, not silently dropped
    err = capsys.readouterr().err
    assert "only one rung" in err
    # No condensation.json artifacts: profiles come from the per-layer metrics, no histograms.
    profiles = pl.read_parquet(out / "tables/layer_profiles.parquet")
    assert profiles.height > 0 and profiles["histogram"].null_count() == profiles.height
    assert profiles["mean_cosine"].null_count() == 0
    assert (out / "plots/layer_profiles.png").is_file()
    fits = pl.read_csv(out / "tables/fits.csv")
    assert not fits["power_law"].any()


def test_observation_study_gets_per_family_trends(store, tmp_path):
    out = tmp_path / "obs"
    assert main(["--tracking-uri", store.uri, "--study", "observe", "--out", str(out), "--no-log", *FAST]) == 0
    trends = pl.read_csv(out / "tables/observation_trends.csv")
    assert set(trends["family"]) == {"gpt2", "qwen3"}
    assert (trends["spearman_vs_log_n"] == -1.0).all()
    gpt2 = trends.filter(pl.col("family") == "gpt2").row(0, named=True)
    # Four models exactly on a line: every case resample gives -1, so no (zero-width) interval.
    assert "resampled" in gpt2["note"] and (gpt2["low"] is None or math.isnan(gpt2["low"]))
    assert (out / "plots/observation_spearman.png").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--study", "only-failed"], "has no finished runs (2 failed)"),
        (["--study", "no-such-study"], "--study 'no-such-study': no such study"),
        (["--bootstrap", "-1"], "--bootstrap -1"),
    ],
)
def test_bad_input_exits_2_with_one_line(store, tmp_path, capsys, argv, message):
    assert main(["--tracking-uri", store.uri, "--out", str(tmp_path / "x"), "--no-log", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("analysis.scaling_curves: error: ") and message in err and "\n" not in err and "Traceback" not in err


def test_missing_store_is_a_clear_error(tmp_path, capsys):
    assert main(["--tracking-uri", f"sqlite:///{tmp_path / 'absent.db'}", "--no-log"]) == 2
    err = capsys.readouterr().err
    assert "no MLflow database" in err and not (tmp_path / "absent.db").exists()
