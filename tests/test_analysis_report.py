"""The report's pieces without MLflow: budget and caveats, the self-contained HTML, figure axes."""

from __future__ import annotations

import base64

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from analysis import plots
from analysis.effects import DifferenceTrend, RungDifference
from analysis.fit import Interval
from analysis.report import compute_budget, render_html
from scaling import names
from scaling.console import format_count

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def test_html_report_embeds_every_image_and_renders_tables(tmp_path):
    (tmp_path / "plots").mkdir()
    (tmp_path / "plots" / "a.png").write_bytes(PNG)
    markdown = "\n".join([
        "# Title with `code`", "", "Some **bold** and *inconclusive* text,", "on two lines <script>.", "",
        "- item one", "- item `two`", "", "| claim | verdict |", "|---|---|", "| (b) lowers a\\|b | **supported** |", "",
        "![a](plots/a.png)", "", "![gone](plots/missing.png)", "",
    ])
    page = render_html(markdown, tmp_path, title="t")
    assert page.count('src="data:image/png;base64,') == 1 and base64.b64encode(PNG).decode() in page
    assert "plots/" not in page and "figure gone missing" in page  # no external link, even for a missing file
    assert "<h1>Title with <code>code</code></h1>" in page
    assert "<strong>bold</strong>" in page and "<em>inconclusive</em>" in page and "&lt;script&gt;" in page
    assert "<ul><li>item one</li><li>item <code>two</code></li></ul>" in page
    assert "<th>claim</th>" in page and "<td>(b) lowers a|b</td>" in page and "<td><strong>supported</strong></td>" in page


def _runs(rungs: dict[str, float], seeds: tuple[int, ...], tokens: int, steps: int) -> pl.DataFrame:
    rows = [{"run_id": f"{r}-{a}-{s}", "rung": r, "n_params": int(n), "arm": a, "seed": s, "tokens": tokens, "steps": steps}
            for r, n in rungs.items() for a in (names.ARM_BASELINE, names.ARM_DISPERSION) for s in seeds]
    return pl.DataFrame(rows)


def test_budget_states_what_the_study_rests_on_and_its_caveats():
    runs = _runs({"tiny-165K": 1.65e5, "tiny-429K": 4.29e5, "tiny-754K": 7.54e5}, (0,), tokens=15360, steps=30)
    metrics = pl.DataFrame({"run_id": runs["run_id"].to_list() * 2, "metric": [names.COND_SPEARMAN] * (2 * runs.height),
                            "step": [10] * runs.height + [30] * runs.height, "value": [1.0] * (2 * runs.height)})
    # val/loss_se at two probe steps of two runs: the budget quotes each run's last one.
    ids = runs["run_id"].to_list()
    metrics = pl.concat([metrics, pl.DataFrame({"run_id": [ids[0], ids[0], ids[1]], "metric": [names.VAL_LOSS_SE] * 3,
                                                "step": [10, 30, 30], "value": [0.5, 0.01, 0.03]})])
    profiles = pl.DataFrame({"run_id": [i for i in runs["run_id"] for _ in range(4)]})
    budget = compute_budget(runs, metrics, profiles, saturated=(names.COND_SPEARMAN,))
    assert [r for r, _ in budget.rungs] == ["tiny-165K", "tiny-429K", "tiny-754K"]
    assert budget.seeds == (1, 1) and budget.steps == (30, 30) and budget.tokens == (15360, 15360) and budget.probe_steps == (10, 30)
    assert budget.val_loss_se == (0.01, 0.03)
    text = " | ".join(budget.caveats)
    for expected in ("3 rungs: no power law", "1 seed for some (rung, arm)", "spearman saturated at ±1 over 4 hidden states",
                     "tokens per parameter", "no step-0 probe recorded (first probe at step 10)"):
        assert expected in text, expected
    roomy = compute_budget(_runs({"a": 1e6, "b": 4e6, "c": 1.6e7, "d": 6.4e7}, (0, 1, 2), tokens=10**9, steps=100),
                           metrics.with_columns(step=pl.lit(0)), profiles.head(0))
    assert roomy.caveats == ()


def test_log_n_axis_labels_each_rung_once_and_bounded_metrics_stay_linear():
    fig = Figure()
    ax = fig.add_subplot()
    sizes = [1.65e5, 4.29e5, 7.54e5]
    ax.plot(sizes, [1.0, 0.9, 1.0])
    plots._log_n_axis(ax, sizes, "parameters")
    plots._y_for(ax, names.COND_SPEARMAN)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["165K", "429K", "754K"]
    assert ax.get_xticklabels(minor=True) == [] or all(t.get_text() == "" for t in ax.get_xticklabels(minor=True))
    assert ax.get_yscale() == "linear" and ax.get_ylim() == (-1.05, 1.05)
    assert format_count(2.5e9) == "2.5B" and format_count(float("nan")) == "–"


def test_profile_over_training_and_difference_plots_are_written(tmp_path):
    layers = pl.DataFrame([{"rung": r, "n": n, "arm": a, "seed": 0, "step": step, "layer": layer, "value": 0.1 + 0.2 * layer * (1 + step / 10)}
                           for r, n in (("a", 1e6), ("b", 4e6)) for a in (names.ARM_BASELINE, names.ARM_DISPERSION)
                           for step in (0, 5, 10) for layer in range(4)])
    path = plots.plot_profile_over_training(tmp_path / "p.png", layers)
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"
    one_seed = [RungDifference("a", 1e6, 1, Interval(-0.1, np.nan, np.nan, "1 seed")), RungDifference("b", 4e6, 2, Interval(-0.05, -0.09, -0.01))]
    pairs = pl.DataFrame({"n": [1e6, 4e6, 4e6], "diff": [-0.1, -0.07, -0.03]})
    trend = DifferenceTrend(Interval(0.08, -0.2, 0.3))
    path = plots.plot_paired_differences(tmp_path / "d.png", {names.COND_LATE_HALF_MEAN_COS: one_seed}, treatment=names.ARM_DISPERSION,
                                         control=names.ARM_BASELINE, size_label="parameters", pairs={names.COND_LATE_HALF_MEAN_COS: pairs},
                                         trends={names.COND_LATE_HALF_MEAN_COS: trend})
    assert path.stat().st_size > 10_000
