"""The README's MLflow walk-through, in a real browser (slow): `mlflow ui` on a study recorded by the project's own
tracking code; the link the driver prints opens the study's saved view in the model-training view, grouped by
rung and arm with the study's metrics as columns for every run; its chart view draws validation loss against
log10 N in one colour per arm; the compare page opens in the model-training view. Screenshots are kept in the
test's temp folder (`ui-store*/`).

    apt-get install -y chromium && python -m pytest -m slow tests/test_mlflow_ui.py
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from cdp import CHROMIUM, POINTER_CLICK, Browser, free_port
from scaling import names

pytestmark = pytest.mark.slow
RUNGS = {"tiny-165K": 25_536, "tiny-429K": 149_888}
COLUMNS = ("arm", "N", "final/val_loss", "final/late_half_mean_cos", "final/last_layer_mean_cos", "final/spearman",
           "time/run_s")


def val_loss(n: int, arm: str, seed: int) -> float:
    return 9.0 - 0.4 * math.log10(n) - (0.013 if arm == names.ARM_DISPERSION else 0.0) - 0.0071 * seed


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A study recorded through `scaling.tracking` as the trainer and driver record one (2 rungs x 2 arms x 2
    seeds: size numbers, arm colour, final values), with the study's saved view."""
    from scaling.runs import final_values, run_name
    from scaling.tracking import RunLogger, Tracker, study_view_state

    folder = tmp_path_factory.mktemp("ui-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    tracker = Tracker(uri, "ui-demo")
    parent = tracker.study_run_id({"ladder": "tiny"})
    expected = {}
    for rung, n in RUNGS.items():
        for arm in (names.ARM_BASELINE, names.ARM_DISPERSION):
            for seed in (0, 1):
                lam = 0.1 if arm == names.ARM_DISPERSION else 0.0
                run_id, _ = tracker.child_run(
                    parent, run_name(arm, rung, seed), f"{rung}{arm}{seed}",
                    {names.TAG_RUNG: rung, names.TAG_ARM: arm, names.TAG_SEED: seed,
                     names.TAG_N_PARAMS_NON_EMBEDDING: n, names.TAG_STEPS: 10,
                     names.TAG_RUN_COLOR: names.ARM_COLORS[arm]},
                    {names.PARAM_ARM: arm, names.PARAM_LAMBDA: lam,
                     names.PARAM_LAYERS: "all" if lam else names.PARAM_NONE},
                    metrics={names.RUN_N: n, names.RUN_LOG10_N: math.log10(n), names.RUN_LAMBDA: lam})
                metrics = {names.VAL_LOSS: val_loss(n, arm, seed),
                           names.COND_LATE_HALF_MEAN_COS: 0.31234567 + (0.1 if arm == names.ARM_BASELINE else 0),
                           names.COND_LAST_LAYER_MEAN_COS: 0.51234567, names.COND_SPEARMAN: 0.81234567,
                           names.TIME_RUN_S: 12.34 + seed}
                logger = RunLogger(uri, run_id)
                logger.log_metrics(metrics, 10)
                assert logger.close() is None
                finals = final_values(metrics)
                tracker.log_metrics(run_id, finals, step=10)
                tracker.finish(run_id, names.STATUS_FINISHED)
                expected[run_name(arm, rung, seed)] = (run_id, finals)
    tracker.end_study(parent, failed=False)
    tracker.save_view("ui-demo: runs by rung", study_view_state(evaluates=False))
    return uri, tracker.experiment_id, folder, expected


def row_texts_js() -> str:
    """Each runs-table row's text across the grid's column containers (pinned run name, metrics), by row index."""
    return ("(() => { const rows = {}; for (const row of document.querySelectorAll('.ag-row[row-index]')) { "
            "const i = row.getAttribute('row-index'); rows[i] = (rows[i] || '') + ' | ' + "
            "[...row.querySelectorAll('.ag-cell')].map(c => c.innerText.trim()).join(' | '); } "
            "return Object.values(rows); })()")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install -y chromium)")
def test_the_printed_link_opens_the_study_view_and_its_charts_draw_val_loss_against_n_by_arm(store):
    from scaling.tracking import compare_page, view_page

    uri, experiment_id, folder, expected = store
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                           "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    try:
        deadline = time.time() + 600  # ~100 s on 2 idle cores; minutes on a busy machine
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and ui.poll() is None, "mlflow ui did not start"
                time.sleep(1)
        base = f"http://127.0.0.1:{port}/"

        async def walk():
            async with Browser(width=1800, height=1100) as page:
                await page.goto(base + view_page(experiment_id))
                assert await page.wait_for_text("base tiny-165K s0"), await page.text()
                assert await page.wait_for_text("Group: rung: tiny-429K, arm: dispersion", timeout_s=30)
                await asyncio.sleep(2)
                await page.screenshot(folder / "view.png")
                table = {"text": await page.text(), "rows": await page.js(row_texts_js())}
                await page.goto(base + view_page(experiment_id) + "&compareRunsMode=CHART")
                assert await page.wait_for_text("log10_N vs. val/loss", timeout_s=60), await page.text()
                # The first chart's points, by colour: the runs' own (their arm's) colours.
                points = ("(() => { const title = [...document.querySelectorAll('*')].find(e => e.children.length "
                          "=== 0 && e.innerText && e.innerText.trim() === 'log10_N vs. val/loss'); let card = title; "
                          "while (card && !card.querySelector('.scatterlayer')) card = card.parentElement; "
                          "if (!card) return []; return [...card.querySelectorAll('.scatterlayer .point')]"
                          ".map(p => getComputedStyle(p).fill); })()")
                colours, waited = [], time.time() + 90
                while len(colours) < len(expected) and time.time() < waited:  # the charts draw after the page
                    await asyncio.sleep(1)
                    colours = await page.js(points) or []
                await asyncio.sleep(1)
                await page.screenshot(folder / "charts.png")
                await page.goto(base + compare_page(experiment_id, [run_id for run_id, _ in expected.values()]))
                assert await page.wait_for_text(f"Comparing {len(expected)} Runs", timeout_s=60), await page.text()
                await asyncio.sleep(2)
                scatter = await page.js(
                    "(() => { const el = [...document.querySelectorAll('[role=tab]')].find(t => t.innerText.trim() "
                    f"=== 'Scatter Plot'); if (!el) return false; {POINTER_CLICK} return true; }})()")
                await asyncio.sleep(2)
                await page.screenshot(folder / "compare.png")
                compare = {"text": await page.text(), "scatter": scatter,
                           "genai": await page.js("document.querySelector('[aria-label*=Evaluations]') !== null")}
                return table, colours, compare

        table, colours, compare = asyncio.run(walk())
        text = table["text"]
        assert "Model training" in text and "ui-demo: runs by rung" in text  # the saved view is open
        for column in COLUMNS:
            assert column in text, column
        for rung in RUNGS:
            for arm in (names.ARM_BASELINE, names.ARM_DISPERSION):
                assert f"Group: rung: {rung}, arm: {arm}" in text  # a group is one arm, never both averaged
        for name, (_, finals) in expected.items():
            (row,) = [row for row in table["rows"] if f"\n{name} |" in row]  # its colour, then its name
            for value in finals.values():
                assert f"{value:.4g}" in row, (name, value, row)  # every run shows its values, 4 digits
        fills = {fill.replace(" ", "") for fill in colours or ()}
        assert len(colours or ()) == len(expected), colours  # every run is a point of val/loss vs log10 N
        assert fills == {"rgb(31,119,180)", "rgb(214,39,40)"}, fills  # one colour per arm
        assert compare["scatter"] and "X-axis" in compare["text"] and "Model training" in compare["text"]
        assert "Evaluations" not in compare["text"].split("Comparing")[0]  # the GenAI view's breadcrumb
    finally:
        os.killpg(ui.pid, signal.SIGKILL)  # the server and its workers
        ui.wait()
