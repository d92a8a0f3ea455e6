"""What the terminal shows: one-line errors, progress lines at each quarter of a run, durations, and
output-folder checks that leave nothing behind."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from scaling import names
from scaling.console import check_writable_dir, format_duration, format_progress, run_cli
from scaling.errors import ConfigError


def fake_run(step: int, steps: int = 100, tokens_per_step: int = 10):
    return SimpleNamespace(info=SimpleNamespace(run_id="r1", run_name="disp tiny-165K s0"),
                           data=SimpleNamespace(metrics={names.TRAIN_TOKENS_SEEN: step * tokens_per_step,
                                                         names.TRAIN_CE_LOSS: 5.0, names.TRAIN_TOKENS_PER_S: 100.0},
                                                tags={names.TAG_STEPS: str(steps), names.TAG_TOKENS: str(steps * tokens_per_step)}))


def test_progress_board_prints_a_line_per_quarter_of_a_long_run_and_none_for_a_short_one():
    from scaling.study import ProgressBoard

    board = ProgressBoard(tracker=None, say_line=print, every_s=600, long_s=5)  # this run takes ~10 s
    printed = [step for step in (1, 10, 24, 25, 30, 49, 50, 76, 99, 100) if board._line(fake_run(step), float(step))]
    assert printed == [25, 50, 76, 100]
    line = ProgressBoard(tracker=None, say_line=print, long_s=0)._line(fake_run(30), 0.0)
    assert "disp tiny-165K s0" in line and "step 30/100" in line and "loss 5.0000" in line and "ETA" in line
    short = ProgressBoard(tracker=None, say_line=print, every_s=600)  # a 10-s run: only its "finished" line
    assert not [step for step in (1, 25, 50, 76, 100) if short._line(fake_run(step), float(step))]


def test_study_progress_counts_runs_per_chain_and_estimates_what_is_left_at_the_slowest_chains_pace():
    from scaling.console import StudyProgress

    now = [0.0]
    study = StudyProgress(clock=lambda: now[0])
    first, second = study.chain(4), study.chain(2)
    now[0] = 30.0  # chain 1's first run trained 10 s (after 20 s of start-up): 3 left at 10 s -> 30 s
    assert first.ended(seconds=10.0) == "[1/6 runs; chain 1: 1/4; 30s elapsed, about 30s left]"
    now[0] = 31.0  # chain 2 skipped a finished run: its last run is estimated at chain 1's pace
    assert second.ended(trained=False) == "[2/6 runs; chain 2: 1/2; 31s elapsed, about 30s left]"
    now[0] = 50.0  # chain 1 now paces at 20 s a run (since its first run ended): 2 left -> 40 s
    assert first.ended(seconds=18.0) == "[3/6 runs; chain 1: 2/4; 50s elapsed, about 40s left]"
    assert StudyProgress(clock=lambda: now[0]).chain(2).ended() == "[1/2 runs; 0s elapsed, time left not known yet]"
    alone = StudyProgress(clock=lambda: now[0]).chain(2)
    assert alone.ended(seconds=5.0) == "[1/2 runs; 0s elapsed, about 5s left]"  # one chain: no per-chain count
    assert alone.ended(seconds=5.0) == "[2/2 runs; 0s elapsed, done]"
    sweeping = StudyProgress(planned=2, clock=lambda: now[0])  # a sweep study: a rung's chain at a time
    assert sweeping.chain(1).ended(seconds=3.0) == "[1/2 runs; 0s elapsed, time left not known yet]"


def test_tables_show_four_significant_digits_and_full_headers():
    from scaling.console import format_table

    table = format_table([{"rung": "tiny-165K", "n": 25472, "loss": 8.093086242675781, "cos": None},
                          {"rung": "tiny-429K", "n": 150016, "loss": 6.649, "cos": 0.81234567}],
                         [("rung", "rung"), ("n", "params"), ("loss", "best val/loss"), ("cos", "last-layer cos")])
    lines = table.splitlines()
    assert lines[0].split("  ")[0] == "rung" and "best val/loss" in lines[0] and "last-layer cos" in lines[0]
    assert "8.093" in lines[2] and "8.0930" not in lines[2] and "25,472" in lines[2] and lines[2].endswith("-")
    assert "0.8123" in lines[3] and "150,016" in lines[3]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up


def test_rays_worker_pool_warning_becomes_one_explained_line(capsys):
    import ray._private.worker as ray_worker

    from scaling.console import WORKER_POOL_EXPLAINED, explain_ray_worker_warning

    original = ray_worker.print_to_stdstream
    try:
        explain_ray_worker_warning()
        explain_ray_worker_warning()  # idempotent: one wrapper
        warning = ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 192.0.2.2, "
                   "which is 4x the maximum expected startup concurrency (2). This could be ...")
        for _ in range(2):
            ray_worker.print_to_stdstream({"lines": [warning], "pid": "raylet", "is_err": False}, ignore_prefix=False)
        out = capsys.readouterr().out
        assert out.count(WORKER_POOL_EXPLAINED) == 1 and "4x the maximum" not in out
        ray_worker.print_to_stdstream({"lines": ["another raylet line"], "pid": "raylet", "is_err": False},
                                      ignore_prefix=False)
        assert "another raylet line" in capsys.readouterr().out  # anything else Ray prints as before
    finally:
        ray_worker.print_to_stdstream = original


def test_long_runs_get_a_line_every_few_minutes_between_quarters():
    from scaling.study import ProgressBoard

    board = ProgressBoard(tracker=None, say_line=print, every_s=600)
    assert board._line(fake_run(1, steps=10_000), 0.0) is None
    assert board._line(fake_run(2, steps=10_000), 601.0) is not None


def test_durations_and_progress_lines_read_well():
    assert [format_duration(s) for s in (None, 42, 185, 3720)] == ["?", "42s", "3m05s", "1h02m"]
    assert format_progress("base x s1", 3, 9, None, None, None).endswith("step 3/9  ETA ?")


def test_run_cli_prints_user_errors_on_one_line(capsys):
    def bad():
        raise ConfigError("training.lr=-1: must be > 0")

    assert run_cli(bad, "prog") == 2
    assert capsys.readouterr().err == "prog: error: training.lr=-1: must be > 0\n"

    def interrupted():
        raise KeyboardInterrupt

    assert run_cli(interrupted, "prog") == 130
    assert capsys.readouterr().err == "prog: interrupted\n"

    def missing_dependency():
        import lm_eval_not_installed_here  # noqa: F401

    assert run_cli(missing_dependency, "prog") == 2
    err = capsys.readouterr().err
    assert "'lm_eval_not_installed_here' is not installed" in err and "pip install -e ." in err
    assert err.count("\n") == 1

    def our_own_bug():
        import scaling.no_such_module  # noqa: F401

    with pytest.raises(ModuleNotFoundError):  # a broken project import is a bug: its traceback shows
        run_cli(our_own_bug, "prog")


def test_writable_check_leaves_nothing_behind(tmp_path):
    check_writable_dir(tmp_path / "a" / "b" / "c")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="is not a writable folder"):
        check_writable_dir("/proc/not-here/out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not a writable folder"):
        check_writable_dir(tmp_path / "file" / "sub")


def test_a_cpu_study_shows_no_gpu_hours_unless_asked(tmp_path):
    from conftest import tiny_train_study

    from scaling.config import describe_study_plan, plan_runs

    study = tiny_train_study(tmp_path, "cpu")
    plans = plan_runs(study)
    assert "GPU-hours" not in describe_study_plan(study, plans, gpu=None)
    assert "-h@" not in describe_study_plan(study, plans, gpu=None)  # no GPU-hours column either
    assert "GPU-hours in all" in describe_study_plan(study, plans, gpu="H100")
