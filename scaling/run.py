"""Run a scaling study: `python scaling/run.py STUDY.yaml [--set key=value ...] [--dry-run] [--resume]`.

A file with top-level `kind: observe` is an observation study (`scaling.observe`: condensation
of pretrained model families); anything else is a training study.

Also `python -m scaling.run`. Connects to a running Ray cluster when there is one (so
`ray submit` works), otherwise starts a local Ray; records everything in MLflow.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a bare script (`python scaling/run.py`, or `ray submit` uploading only this file):
    # prefer the installed package, else the checkout this file sits in.
    try:
        import scaling  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scaling.run", description=__doc__.splitlines()[0])
    parser.add_argument("study", help="study YAML file, e.g. search_spaces/smoke.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a study key by its dotted path, e.g. --set training.max_steps=20")
    parser.add_argument("--dry-run", action="store_true",
                        help="validate the study and print the rung table (params, tokens, steps, FLOPs, GPU-hours)")
    parser.add_argument("--resume", action="store_true",
                        help="continue a stopped study (finished runs are skipped and unfinished ones resume "
                             "from their latest checkpoint either way; this flag just says so explicitly)")
    parser.add_argument("--gpu", default="H100", help="GPU type for the dry run's GPU-hour estimate")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from scaling.errors import DispersionScalingError

    args = parse_args(argv)
    try:
        return _main(args)
    except DispersionScalingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _main(args) -> int:
    from scaling import names
    from scaling.observe import read_study_kind

    if read_study_kind(args.study) == names.KIND_OBSERVE:  # observation study; training is the default
        from scaling.observe import main_observe

        return main_observe(args.study, args.overrides, dry_run=args.dry_run)
    from scaling.config import load_study
    from scaling.ladder import format_ladder_table
    from scaling.study import connect_ray, format_summary, plan_runs, run_study

    study = load_study(args.study, args.overrides)
    plans = plan_runs(study)
    print(format_ladder_table(plans, gpu=args.gpu))
    if args.dry_run:
        return 0
    connect_ray()
    outcomes = run_study(study, Path(args.study).read_text(encoding="utf-8"))
    print()
    print(format_summary(outcomes))
    return 1 if any(o.status == "failed" for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
