"""Run a scaling study: `python scaling/run.py STUDY.yaml [--set key=value ...] [--dry-run] [--resume]`.

The study file is read once: `kind: observe` makes it an observation study (condensation of
pretrained model families, `scaling.observe`); anything else is a training study
(`scaling.study`). Also `python -m scaling.run`. Connects to a running Ray cluster when there
is one (so `ray submit` works), otherwise starts a local Ray; records everything in MLflow.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

STARTED_AT = time.time()  # the study's wall clock: Ray's start and the imports count as time outside its runs

if __package__ in (None, ""):
    # Run as a bare script (`python scaling/run.py`, or `ray submit` uploading only this file):
    # prefer the installed package, else the checkout this file sits in.
    try:
        import scaling  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KNOWN_GPUS = "A100, H100, H200, L4, A10G"  # scaling.ladder.PEAK_BF16_FLOPS, without importing it for --help


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scaling.run", description=__doc__.splitlines()[0])
    parser.add_argument("study", help="study YAML file, e.g. search_spaces/smoke.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a study key by its dotted path, e.g. --set training.max_steps=20")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the study and print the rung table (params, tokens, steps, FLOPs, GPU-hours)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a study that was started before, and refuse to start a new one (a typo in "
                             "the study name would otherwise start over). Without it, re-running a study also "
                             "skips finished runs and resumes unfinished ones from their latest checkpoint")
    parser.add_argument("--gpu", default=None, metavar="NAME_OR_FLOPS",
                        help=f"GPU for the GPU-hour estimate and the memory plan: one of {KNOWN_GPUS}, or its dense bf16 "
                             "peak in FLOP/s, e.g. 312e12 (default H100 for a dry run or a GPU study; a CPU study shows "
                             "no GPU-hours unless asked)")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GIB",
                        help="memory per GPU in GiB for the memory plan, when --gpu does not name it (default: the "
                             "named GPU's: H100/H100-80GB 79.6, A100-40GB 40, A100-80GB 80, H200 140.4)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from scaling.console import run_cli, stop_on_sigterm

    args = parse_args(argv)
    stop_on_sigterm()
    return run_cli(lambda: _main(args), "scaling.run")


def _main(args) -> int:
    from scaling.config import StudyConfig, load_study_file
    from scaling.console import quiet_libraries

    quiet_libraries()
    study = load_study_file(args.study, args.overrides)
    source = Path(args.study).read_text(encoding="utf-8")
    if isinstance(study, StudyConfig):
        return _train(study, source, args)
    return _observe(study, source, args)


def _train(study, source: str, args) -> int:
    from scaling.cluster import connect_ray
    from scaling.config import describe_study_plan, plan_runs

    from scaling.memory import check_study_memory, gpu_capacity

    plans = plan_runs(study)
    # GPU-hours are a planning figure: a CPU study that is running shows them only when asked (--gpu).
    gpu = args.gpu or ("H100" if args.dry_run or study.resources.use_gpu else None)
    print(describe_study_plan(study, plans, gpu=gpu, gpu_memory=args.gpu_memory))
    capacity, label = gpu_capacity(gpu or "H100", args.gpu_memory)
    if args.dry_run:
        from scaling.study import describe_data

        if capacity is not None:  # on a cluster the preflight checks the GPUs the nodes have
            check_study_memory(study, plans, capacity, label)

        print("\n".join(describe_data(study, plans)))
        if study.eval is not None:  # task names are checked offline, from lm-eval's task index
            from scaling.evaluate import check_tasks

            check_tasks(study.eval)
        return 0
    _check_before_ray(study.storage_path, study.tracking_uri)  # reachable first: --resume's query would hang
    _check_resume(args.resume, study.study, study.tracking_uri)
    from scaling.study import format_summary, run_study

    connect_ray()
    outcomes = run_study(study, source, plans=plans, gpu_memory=(capacity, label), started_at=STARTED_AT)
    print()
    print(format_summary(outcomes))
    _print_next_steps(study.study, study.tracking_uri, view=True)
    return _exit_code(outcomes)


def _observe(study, source: str, args) -> int:
    from scaling.observe import dry_run_observe, format_outcomes, run_observation_study

    if args.dry_run:
        dry_run_observe(study)
        return 0
    _check_before_ray(None, study.tracking_uri)
    _check_resume(args.resume, study.study, study.tracking_uri)
    from scaling.cluster import connect_ray

    connect_ray()
    outcomes = run_observation_study(study, source)
    print()
    print(format_outcomes(outcomes))
    _print_next_steps(study.study, study.tracking_uri)
    return _exit_code(outcomes)


def _exit_code(outcomes) -> int:
    """1 when any run of the study failed."""
    from scaling.names import STATUS_FAILED

    return 1 if any(o.status == STATUS_FAILED for o in outcomes) else 0


def _check_before_ray(storage_path: str | None, configured_uri: str | None) -> None:
    """What the driver can check in a second, before it starts (or joins) Ray: a local storage folder it
    can write, an MLflow store it can reach. The preflight then checks both from every node."""
    from scaling.console import check_writable_dir
    from scaling.errors import ConfigError
    from scaling.provenance import resolve_tracking_uri, tracking_uri_problem
    from scaling.tracking import check_reachable

    if storage_path is not None and "://" not in storage_path:
        check_writable_dir(storage_path, flag="storage_path")
    uri = resolve_tracking_uri(configured_uri)
    problem = tracking_uri_problem(uri) or check_reachable(uri)  # seconds, not MLflow's minutes of retries
    if problem:
        remedy = "" if problem.startswith("scheme") else "start the server or "
        raise ConfigError(f"MLflow at {uri!r} is unreachable ({problem}); {remedy}fix tracking_uri / MLFLOW_TRACKING_URI")


def _check_resume(resume: bool, study: str, configured_uri: str | None) -> None:
    """--resume continues a study the store has a record of; anything else is refused before any work."""
    if not resume:
        return
    from scaling.errors import ConfigError
    from scaling.provenance import resolve_tracking_uri, sqlite_path
    from scaling.tracking import find_study_run

    uri = resolve_tracking_uri(configured_uri)
    database = sqlite_path(uri)
    if (database is not None and not database.exists()) or find_study_run(uri, study) is None:
        raise ConfigError(f"--resume: the MLflow store {uri} has no earlier record of study {study!r}; "
                          "check the study name and MLFLOW_TRACKING_URI, or drop --resume to start it")


def _print_next_steps(study: str, configured_uri: str | None, view: bool = False) -> None:
    """The analysis command and the MLflow link: a training study's saved view (its runs grouped by rung with
    the study's metrics as columns, `Tracker.save_view`), else its runs page; both in the model-training view."""
    from scaling.provenance import LOCAL_UI, resolve_tracking_uri, ui_command, ui_link
    from scaling.tracking import find_study_run, runs_page, view_page

    uri = resolve_tracking_uri(configured_uri)
    print(f"\nnext: python -m analysis.scaling_curves --study {study}   (report in outputs/analysis/{study}/)")
    record = find_study_run(uri, study)
    page = "" if record is None else view_page(record.info.experiment_id) if view else runs_page(
        record.info.experiment_id)
    if uri.startswith("sqlite:"):
        print(f"      {ui_command(uri)}")
        print(f"      then open {LOCAL_UI}/{page}")
    elif uri.startswith("http"):
        print(f"      open {ui_link(uri, page)}")


if __name__ == "__main__":
    sys.exit(main())
