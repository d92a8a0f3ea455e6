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


def test_progress_board_prints_a_line_per_quarter_of_a_run():
    from scaling.study import ProgressBoard

    board = ProgressBoard(tracker=None, say_line=print, every_s=600)
    printed = [step for step in (1, 10, 24, 25, 30, 49, 50, 76, 99, 100) if board._line(fake_run(step), float(step))]
    assert printed == [25, 50, 76, 100]
    line = ProgressBoard(tracker=None, say_line=print)._line(fake_run(30), 0.0)
    assert "disp tiny-165K s0" in line and "step 30/100" in line and "loss 5.0000" in line and "ETA" in line


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
