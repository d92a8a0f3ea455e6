"""The README's MLflow walk-through, in a real browser (slow): `mlflow ui` on a study recorded by
the project's own tracking code opens in the model-training view, shows every run by its short
name, and groups them by rung.

    apt-get install -y chromium && python -m pytest -m slow tests/test_mlflow_ui.py
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from cdp import CHROMIUM, Browser, free_port
from scaling import names

pytestmark = pytest.mark.slow
RUNGS = {"tiny-165K": 25_536, "tiny-429K": 149_888}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A study recorded through `scaling.tracking` as the trainer records one: 2 rungs x 2 arms x 2 seeds."""
    from scaling.runs import run_name
    from scaling.tracking import RunLogger, Tracker

    folder = tmp_path_factory.mktemp("ui-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    tracker = Tracker(uri, "ui-demo")
    parent = tracker.study_run_id({"ladder": "tiny"})
    for rung, n in RUNGS.items():
        for arm in (names.ARM_BASELINE, names.ARM_DISPERSION):
            for seed in (0, 1):
                run_id, _ = tracker.child_run(parent, run_name(arm, rung, seed), f"{rung}{arm}{seed}",
                                              {names.TAG_RUNG: rung, names.TAG_ARM: arm, names.TAG_SEED: seed,
                                               names.TAG_N_PARAMS_NON_EMBEDDING: n, names.TAG_STEPS: 10},
                                              {names.PARAM_LAMBDA: 0.1 if arm == names.ARM_DISPERSION else 0.0})
                logger = RunLogger(uri, run_id)
                logger.log_metrics({names.VAL_LOSS: 6.0 - seed * 0.1, names.COND_LATE_HALF_MEAN_COS: 0.3}, 10)
                assert logger.close() is None
                tracker.finish(run_id, names.STATUS_FINISHED)
    tracker.end_study(parent, failed=False)
    return uri, tracker.experiment_id, folder


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package (apt-get install -y chromium)")
def test_runs_open_in_the_training_view_by_name_and_group_by_rung(store):
    from scaling.tracking import runs_page

    uri, experiment_id, folder = store
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", "127.0.0.1",
                           "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
                break
            except OSError:
                assert time.time() < deadline and ui.poll() is None, "mlflow ui did not start"
                time.sleep(1)

        async def walk():
            async with Browser() as page:
                await page.goto(f"http://127.0.0.1:{port}/{runs_page(experiment_id)}")
                assert await page.wait_for_text("base tiny-165K s0"), await page.text()
                text = await page.text()
                assert "Model training" in text and "Traces" in text
                for rung in RUNGS:
                    for label in ("base", "disp"):
                        for seed in (0, 1):
                            assert f"{label} {rung} s{seed}" in text  # every run, its arm visible in its name
                assert await page.click_button("Group by")
                assert await page.wait_for_text("n_params_non_embedding", timeout_s=20)  # the tags to group by
                assert await page.click_menu_item("rung")
                assert await page.wait_for_text(f"Group: {next(iter(RUNGS))}", timeout_s=30)
                grouped = await page.text()
                await page.screenshot(folder / "grouped.png")
                return grouped

        grouped = asyncio.run(walk())
        for rung in RUNGS:
            assert f"Group: {rung}" in grouped
    finally:
        os.killpg(ui.pid, signal.SIGKILL)  # the server and its workers
        ui.wait()
