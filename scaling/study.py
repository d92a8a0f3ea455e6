"""The training-study driver: plan -> data -> fixed arms -> per-rung sweeps -> summary.

Every (rung, arm, seed) is one Ray Train + DeepSpeed run (`scaling.runs`; runs that would queue for
the cluster are chained in one worker group each); with a `search`
section the dispersion arm is searched per rung instead (`scaling.sweep`), against baselines
trained first. The data is tokenized once per study and handed to the workers through the Ray
object store. Runs go side by side as far as the cluster fits their worker groups, and a
progress line per running run is printed from their MLflow records.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from scaling import names, timing
from scaling.cluster import check_study_against_cluster, check_study_memory_on_cluster, concurrent_runs
from scaling.config import StudyConfig, plan_runs, redact_credentials
from scaling.console import StudyProgress, format_progress, format_table, say, significant
from scaling.errors import ConfigError
from scaling.provenance import resolve_tracking_uri
from scaling.runs import STOPPING, DataRefs, RunOutcome, train_chain
from scaling.sweep import best_arm, run_sweep
from scaling.tracking import StudyLock, Tracker, study_view_state


BPE_TRAINING_ROWS = 200_000
"""A tokenizer trained for the study (data.tokenizer: null) learns from at most this many rows, read on the
driver: enough for a 4096-token BPE, and the driver's memory stays flat whatever the corpus's size."""


def prepare_data(study: StudyConfig, vocab_size: int, progress: Callable[[str], None] = say):
    """The study's token shards (tokenized once with Ray Data, on the cluster's CPUs, then reused by every run
    and every later study with the same data: `scaling.shards`), as train/validation views and probe ids."""
    from scaling.shards import build_study_blocks

    data = study.data
    blocks = build_study_blocks(shard_spec(study), shards_root(study),
                                seq_len=study.training.seq_len, val_fraction=data.val_fraction,
                                probe_texts=study.probes.texts, probe_max_length=study.probes.max_length,
                                progress=progress)
    if study.probes.source is not None:
        blocks = with_probe_source(blocks, study.probes, progress)
    if blocks.vocab_size > vocab_size:
        raise ConfigError(
            f"data.tokenizer has {blocks.vocab_size} tokens but the smallest rung's vocab_size is {vocab_size}; "
            "use a ladder whose vocab fits the tokenizer, or train a local tokenizer (data.tokenizer: null)"
        )
    return blocks


def with_probe_source(blocks, probes, progress: Callable[[str], None] = say):
    """The study's blocks with probe texts from `probes.source` (the authors' sampler, the study's tokenizer,
    the first `probes.max_length` tokens of each) instead of the training data's."""
    import dataclasses
    import hashlib

    import numpy as np

    from scaling.data import parse_text_source, read_rows, sample_reference_texts

    rows = read_rows(parse_text_source(probes.source), raw=True)
    texts = sample_reference_texts(rows, probes.texts)
    tokenizer = blocks.shards._tokenizer()
    probe_ids = [np.asarray(tokenizer.encode(text, add_special_tokens=False).ids[:probes.max_length], dtype=np.int64)
                 for text in texts]
    short = sum(len(ids) < probes.max_length for ids in probe_ids)
    progress(f"probes: {len(texts)} texts from {probes.source} ({len(rows):,} rows, the authors' sampler), "
             f"{probes.max_length} tokens each" + (f"; {short} of them shorter" if short else ""))
    digest = hashlib.sha256(f"{blocks.fingerprint}|{probes.source}".encode())
    for ids in probe_ids:
        digest.update(ids.tobytes())
    return dataclasses.replace(blocks, probe_ids=probe_ids, fingerprint=digest.hexdigest()[:16])


def data_refs(study: StudyConfig, blocks) -> DataRefs:
    """What every run's workers get of the data: views of the shards, probe ids, and (when the study
    evaluates) its tokenizer on shared storage for the exported models."""
    tokenizer_uri = None
    if study.eval is not None:
        from scaling.evaluations import publish_tokenizer

        tokenizer_uri = publish_tokenizer(shard_spec(study).tokenizer, shards_root(study))
    return DataRefs(blocks.train, blocks.val, blocks.probe_ids, blocks.fingerprint, tokenizer_uri,
                    pad_token_id=blocks.pad_id)


def shards_root(study: StudyConfig) -> str:
    """Token shards live beside the runs, on the storage every node shares."""
    from scaling.storage import join, resolve_storage_path

    return join(resolve_storage_path(study.storage_path), "token-shards")


def describe_data(study: StudyConfig, plans) -> list[str]:
    """The dry run's data lines: the corpus's tokens (from its shards' manifest, or "not tokenized yet")
    and how many passes each rung's budget makes over it. Offline, a hub source cannot be inspected."""
    from pathlib import Path

    from scaling.data import parse_text_source
    from scaling.errors import DispersionScalingError
    from scaling.shards import budget_warning, corpus_tokens, describe_corpus

    tokenizer = study.data.tokenizer or next((study.training.init_from_for(r.name) for r in study.selected_rungs()),
                                             None)
    source = parse_text_source(study.data.source, training=True)
    hub = [what for what, named in (("dataset", source.kind == "hf" or "://" in (source.path or "")),
                                    ("tokenizer", tokenizer is not None and not Path(tokenizer).exists())) if named]
    if hub:  # a dry run stays offline and fast; the driver inspects them when the study runs
        return [f"data: {study.data.source} not inspected by the dry run (hub or remote {' and '.join(hub)}: the study "
                "tokenizes it into shards when it runs)"]
    try:
        spec = shard_spec(study)
        lines = [f"data: {describe_corpus(spec, shards_root(study))}"]
        tokens = corpus_tokens(spec, shards_root(study))
    except DispersionScalingError as exc:
        return [f"data: {study.data.source} not inspected here ({exc})"]
    for plan in plans if tokens else ():
        note = budget_warning(plan.tokens, tokens, what=f"rung {plan.rung.name}'s budget")
        lines.append(f"data: rung {plan.rung.name} trains {plan.tokens / tokens:.2f} epochs"
                     + (f"; warning: {note}" if note else ""))
    return lines


def shard_spec(study: StudyConfig):
    """What the study's token shards are made of: source, tokenizer (named, the first rung's checkpoint's,
    or trained here on the source), packing, row cap and validation split."""
    from scaling.data import build_tokenizer, parse_text_source, read_rows
    from scaling.shards import ShardSpec

    data = study.data
    tokenizer = data.tokenizer or next((study.training.init_from_for(r.name) for r in study.selected_rungs()), None)
    if tokenizer is None:  # mid-training reads text with the checkpoint's own tokenizer; else train a BPE
        rows = read_rows(parse_text_source(data.source, training=True), limit=BPE_TRAINING_ROWS)
        rows = rows[: data.max_rows] if data.max_rows is not None else rows
        tokenizer = build_tokenizer(None, rows=rows, vocab_size=min(r.vocab_size for r in study.selected_rungs()))
        tokenizer = tokenizer.name_or_path  # the folder the trained BPE is cached in
    validation = "none"
    if data.val_split is not None:
        source = parse_text_source(data.source, training=True)
        if source.kind != "hf":
            raise ConfigError(f"data.val_split={data.val_split!r} needs a Hugging Face source with splits; "
                              f"{data.source!r} is not one: use data.val_fraction to hold out blocks instead")
        validation = f"hf:{source.name}{'/' + source.config if source.config else ''}:{data.val_split}:{source.field}"
    return ShardSpec(source=data.source, tokenizer=str(tokenizer), packing=data.packing, max_rows=data.max_rows,
                     validation=validation)


def run_study(study: StudyConfig, study_source: str, *, plans=None, progress: Callable[[str], None] = say,
              gpu_memory: tuple[float | None, str] | None = None, started_at: float | None = None
              ) -> list[RunOutcome]:
    """Train every (rung, seed, arm) of the study that has not finished yet; with a `search`
    section, the dispersion arm is searched per rung instead (see `scaling.sweep`). `gpu_memory`
    (GiB, label): what the memory plan is checked against when the cluster does not name its GPUs.
    `started_at` (epoch s): when the driver started, so the study's time outside its runs includes Ray's
    start (default: now)."""
    started_at = time.time() if started_at is None else started_at
    plans = plan_runs(study) if plans is None else plans
    STOPPING.clear()
    searching = study.search.num_samples > 0
    fixed = [(plan, arm, seed) for plan in plans for seed in study.seeds for arm in study.arms
             if not (searching and arm.name == names.ARM_DISPERSION)]
    if study.eval is not None:  # an unknown task name fails here, before any training
        from scaling.evaluate import check_tasks

        check_tasks(study.eval)
    tracking_uri = resolve_tracking_uri(study.tracking_uri)
    for warning in check_study_against_cluster(study, len(plans) * len(study.seeds) * len(study.arms),
                                               tracking_uri):
        progress(f"warning: {warning}")
    warning = check_study_memory_on_cluster(study, plans, gpu_memory)  # before any worker starts
    if warning:
        progress(f"warning: {warning}")

    # The data first: a source that cannot be read fails here, before anything is recorded in MLflow.
    data = prepare_data(study, vocab_size=min(plan.rung.vocab_size for plan in plans), progress=progress)
    tracker = Tracker(tracking_uri, study.study)
    parent_id = tracker.study_run_id(study.record_params(), redact_credentials(study_source),
                                     redact_credentials(study.to_yaml()))
    # The study's view in MLflow's UI (what the driver's closing link opens), written first so it works while
    # the study trains.
    tracker.save_view(f"{study.study}: runs by rung", study_view_state(evaluates=study.eval is not None))
    with StudyLock(tracker, parent_id):
        try:
            training_started = time.time()
            if study.decide is None:
                outcomes = _train_study(study, plans, searching, fixed, data, tracker, parent_id, progress)
            else:
                outcomes = _train_in_waves(study, plans, data, tracker, parent_id, progress)
            record_study_time(tracker, parent_id, plans, slots=chain_width(study, fixed),
                              training=(training_started, time.time()), started_at=started_at, progress=progress)
        except KeyboardInterrupt:
            stop_study(tracker, parent_id, progress)
            raise
    tracker.end_study(parent_id, failed=any(o.status == names.STATUS_FAILED for o in outcomes))
    return outcomes


def chain_width(study: StudyConfig, fixed: list) -> int:
    """How many chains of runs train side by side (each run's evaluation reserved beside it)."""
    return concurrent_runs(study, len(fixed), extra=study.eval.ray_options() if study.eval else None)


def _train_study(study, plans, searching, fixed, data, tracker, parent_id, progress) -> list[RunOutcome]:
    refs = data_refs(study, data)
    seeds = len({seed for _, _, seed in fixed}) or len(study.seeds)  # a wave trains its own seeds
    progress(f"study {study.study}: {len(plans)} rung(s) x {seeds} seed(s) x {len(study.arms)} arm(s); "
             f"{len(data.train):,} train / {len(data.val):,} val blocks; MLflow {tracker.tracking_uri}")

    width = chain_width(study, fixed)
    board = StudyProgress(planned=len(fixed))

    def run(jobs):
        chains = deal_chains(jobs, width, cost=run_cost if study.resources.chain_order == "longest_first" else None)
        # Chains registered in order (chain 1 first), not in the order their threads happen to start.
        tallies = {id(jobs[chain[0]]): board.chain(len(chain)) for chain in chains}
        return run_in_chains(lambda chain: train_chain(study, chain, refs, tracker, parent_id, progress,
                                                       tally=tallies[id(chain[0])]), jobs, chains)

    with ProgressBoard(tracker, progress):
        if not searching:
            outcomes = run(fixed)
        else:
            outcomes = []
            for plan in plans:  # a rung's sweep needs its baselines first
                outcomes.extend(run([job for job in fixed if job[0] is plan]))
                outcomes.extend(_search_rung(study, plan, refs, tracker, parent_id, run, progress))
            write_sweep_summary(study, tracker, parent_id, plans, progress)
    return outcomes


def record_study_time(tracker, parent_id: str, plans, *, slots: int, training: tuple[float, float],
                      started_at: float, progress: Callable[[str], None] = say) -> dict[str, float]:
    """The study's time accounting (`scaling.timing.study_accounting`) over the runs this invocation
    trained, logged on the study run and printed: goodput, makespan against the ideal schedule, time outside
    the runs. Not efficiency: how fast a run trains alone is not in the study's records (an estimate from
    its fastest logging window was off by a third even for runs that trained alone); `bench/bench_goodput.py`
    measures it."""
    rungs = {plan.rung.name for plan in plans}
    runs = [run.data.metrics for run in tracker.runs_ended_since(training[0])
            if timing.SLOT in run.data.metrics and run.data.tags.get(names.TAG_RUNG) in rungs]
    study_time = timing.study_accounting(runs, slots=slots, makespan_s=training[1] - training[0],
                                         wall_s=time.time() - started_at)
    tracker.log_metrics(parent_id, study_time)
    progress(timing.describe_accounting(study_time))
    return study_time


def _train_in_waves(study, plans, data, tracker, parent_id, progress) -> list[RunOutcome]:
    """A study with a `decide` section: train a wave, decide the stated claims on what MLflow holds
    (`analysis.waves`), log the decisions on the study run, and add the next wave's seeds while a claim is
    undecided and more seeds can still decide it within the budget. A resumed study replays the logged
    decisions and continues at the wave it was in (finished runs are skipped, none is decided again)."""
    from analysis import load
    from analysis.waves import WaveRecord, decide_wave
    from scaling.sequential import plan_waves

    plan = plan_waves(study.decide, study.seeds, len(plans), len(study.arms))
    earlier = None
    for text in tracker.read_waves(parent_id):
        earlier = WaveRecord.from_json(text)
        progress(f"wave {earlier.wave} was decided before: {format_wave(earlier)}")
    if earlier is not None and not earlier.added:
        progress(f"the study's course is complete ({earlier.stop}); nothing to train")
        return []
    outcomes: list[RunOutcome] = []
    wave = 1 if earlier is None else earlier.wave + 1
    while True:
        before = set(plan.seeds_at(wave - 1)) if wave > 1 else set()
        new = [seed for seed in plan.seeds_at(wave) if seed not in before]
        look = plan.looks[wave - 1]
        progress(f"wave {wave} of at most {len(plan.looks)}: seeds {new} ({len(new) * len(plans) * len(study.arms)} runs; "
                 f"{look.runs} of at most {plan.looks[-1].runs} after it)")
        fixed = [(rung_plan, arm, seed) for rung_plan in plans for seed in new for arm in study.arms]
        outcomes += _train_study(study, plans, False, fixed, data, tracker, parent_id, progress)
        record = decide_wave(load.read_study(tracker.tracking_uri, study.study), plan, study.decide, wave, earlier)
        tracker.log_wave(parent_id, wave, record.to_json(), record.runs, record.spent)
        progress(f"wave {wave}: {format_wave(record)}")
        if not record.added:
            return outcomes
        earlier, wave = record, wave + 1


def format_wave(record) -> str:
    """One line of a look's decisions: each stated claim's state, then what happens next and why."""
    claims = "; ".join(f"({c.key}) {c.state}" + (f" at wave {c.decided_at}" if c.decided_at else "") for c in record.claims)
    then = f"adding seeds {list(record.added)}" if record.added else f"stop: {record.stop}"
    return f"{record.runs} runs, alpha spent {record.spent:.3g}: {claims}; {then}"


def stop_study(tracker, parent_id: str, progress=say) -> None:
    """After Ctrl-C or SIGTERM: no run records an outcome any more, every run still running is marked
    killed in MLflow (never left RUNNING), and Ray goes, taking the workers and placement groups along."""
    import ray

    STOPPING.set()
    killed = tracker.kill_running_runs()
    tracker.end_study(parent_id, failed=False, killed=True)
    progress(f"interrupted: {len(killed)} run(s) marked killed in MLflow; continue with --resume "
             "(finished runs are kept, the rest resume from their latest checkpoint)")
    ray.shutdown()


def deal_chains(jobs: list, width: int, cost: Callable[[tuple], float] | None = None) -> list[list[int]]:
    """The jobs (their indices) of each of `width` chains. Without `cost`, dealt out in turn in plan order.
    With it, longest first and in a snake (chain 1, 2, ..., w, w, ..., 2, 1, 1, ...): the chains end
    together instead of the last one running alone, and a pair of equally long jobs (a run's two arms,
    adjacent in the plan) lands on two chains at the same place, so paired arms still train side by side."""
    width = min(width, len(jobs))
    if width <= 1:
        return [list(range(len(jobs)))] if jobs else []
    if cost is None:
        return [list(range(start, len(jobs), width)) for start in range(width)]
    order = sorted(range(len(jobs)), key=lambda index: -cost(jobs[index]))  # stable: plan order among equals
    chains: list[list[int]] = [[] for _ in range(width)]
    for place, index in enumerate(order):
        turn, lap = place % width, (place // width) % 2
        chains[width - 1 - turn if lap else turn].append(index)
    return chains


def run_cost(job: tuple) -> float:
    """What a (plan, arm, seed) job costs, for ordering only: parameters x tokens (the 6ND of its FLOPs)."""
    plan = job[0]
    return float(plan.params.total) * float(plan.tokens)


def run_in_chains(train, jobs: list[tuple], chains: list[list[int]]) -> list:
    """`train(chain)` for each chain of jobs (`deal_chains`) side by side, each in a thread blocking on its
    own worker group; outcomes in the jobs' order. An interrupt starts no further chain."""
    if len(chains) <= 1:
        return train(jobs) if jobs else []
    pool = ThreadPoolExecutor(max_workers=len(chains), thread_name_prefix="chain")
    try:
        futures = [pool.submit(train, [jobs[index] for index in chain]) for chain in chains]
        results = [future.result() for future in futures]
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)  # the running ones end when Ray goes
        raise
    finally:
        pool.shutdown(wait=False)
    outcomes = [None] * len(jobs)
    for chain, chain_outcomes in zip(chains, results):
        for index, outcome in zip(chain, chain_outcomes):
            outcomes[index] = outcome
    return outcomes


def _search_rung(study, plan, refs, tracker, parent_id, run, progress) -> list[RunOutcome]:
    """One rung's sweep, then its best settings re-run with the extra seeds (paired with baselines)."""
    seed = study.seeds[0]
    sweep = run_sweep(study, plan, seed, refs, tracker, parent_id, progress)
    progress(f"{plan.rung.name}: sweep of {sweep.trials} trial(s): {sweep.finished} finished, "
             f"{sweep.early_stopped} early-stopped, {sweep.failed} failed; best {study.search.metric} = "
             f"{significant(sweep.best_value)} with {_settings(sweep.best_params)}")
    outcomes = [RunOutcome(plan.rung.name, "dispersion-sweep", seed,
                           names.STATUS_FINISHED if sweep.best_run_id else names.STATUS_FAILED,
                           sweep.sweep_run_id, sweep.seconds,
                           val_loss=sweep.best_value if study.search.metric == names.VAL_LOSS else None,
                           detail=f"{sweep.trials} trials, best: {_settings(sweep.best_params)}")]
    arm = best_arm(sweep)
    if arm is not None:
        jobs = []
        for extra in study.search.extra_seeds:
            if extra not in study.seeds:
                jobs.append((plan, study.arm(names.ARM_BASELINE), extra))
            jobs.append((plan, arm, extra))
        outcomes.extend(run(jobs))
    return outcomes


def _settings(params: dict) -> str:
    if not params:
        return "-"
    return (f"lambda={float(params[names.PARAM_LAMBDA]):.3g} layers={params[names.PARAM_LAYERS]} "
            f"variant={params[names.PARAM_VARIANT]}")


def write_sweep_summary(study: StudyConfig, tracker, parent_id: str, plans, progress=say) -> Path:
    """Per rung: baseline vs best dispersion trial (validation loss, condensation), printed and saved
    as CSV + parquet under outputs/<study>/ and as artifacts of the study's parent run."""
    import polars as pl

    def mean(runs, key):
        values = [r.data.metrics[key] for r in runs if key in r.data.metrics]
        return sum(values) / len(values) if values else None

    rows = []
    for plan in plans:
        rung = plan.rung.name
        base = tracker.finished_training_runs(rung, names.ARM_BASELINE)
        best = tracker.best_trials(rung)
        rows.append({"rung": rung, "n_params": plan.params.total, "baseline_runs": len(base),
                     "baseline_val_loss": mean(base, names.VAL_LOSS),
                     "baseline_spearman": mean(base, names.COND_SPEARMAN),
                     "baseline_last_layer_mean_cos": mean(base, names.COND_LAST_LAYER_MEAN_COS),
                     "best_val_loss": mean(best, names.VAL_LOSS), "best_spearman": mean(best, names.COND_SPEARMAN),
                     "best_last_layer_mean_cos": mean(best, names.COND_LAST_LAYER_MEAN_COS),
                     "best_lambda": float(best[0].data.params[names.PARAM_LAMBDA]) if best else None,
                     "best_layers": best[0].data.params.get(names.PARAM_LAYERS) if best else None,
                     "best_variant": best[0].data.params.get(names.PARAM_VARIANT) if best else None,
                     "best_run_id": best[0].info.run_id if best else None})
    frame = pl.DataFrame(rows, infer_schema_length=None)
    out = Path("outputs") / study.study
    out.mkdir(parents=True, exist_ok=True)
    frame.write_csv(out / "sweep_summary.csv")
    frame.write_parquet(out / "sweep_summary.parquet")
    tracker.log_artifact(parent_id, out / "sweep_summary.csv")
    tracker.log_artifact(parent_id, out / "sweep_summary.parquet")
    progress("sweep summary (baseline: mean over its seeds; best: the sweep's best trial)\n" + format_table(rows, [
        ("rung", "rung"), ("n_params", "params"), ("baseline_val_loss", "base val/loss"),
        ("best_val_loss", "best val/loss"), ("baseline_last_layer_mean_cos", "base last-layer cos"),
        ("best_last_layer_mean_cos", "best last-layer cos"), ("baseline_spearman", "base rho"),
        ("best_spearman", "best rho"), ("best_lambda", "lambda"), ("best_layers", "layers"),
        ("best_variant", "variant")]))
    return out


def format_summary(outcomes: list[RunOutcome]) -> str:
    """The driver's closing table: per run, what the study's claims are about (validation loss, late-half and
    last-layer mean cosine), at 4 significant digits."""
    rows = [{"rung": o.rung, "arm": o.arm, "seed": o.seed, "status": o.status, "val_loss": o.val_loss,
             "late_half": o.late_half_cos, "last_layer": o.last_layer_cos,
             "time": f"{o.seconds:.0f} s" if o.seconds else "-", "detail": o.detail} for o in outcomes]
    columns = [("rung", "rung"), ("arm", "arm"), ("seed", "seed"), ("status", "status"), ("val_loss", "val/loss"),
               ("late_half", "late-half mean cos"), ("last_layer", "last-layer mean cos"), ("time", "time")]
    if any(o.detail for o in outcomes):
        columns.append(("detail", "detail"))
    return format_table(rows, columns)


class ProgressBoard:
    """Prints progress lines of the training runs (and trials) while a study trains, read from the
    runs' own MLflow records (what rank 0 logged), so workers' output never floods the console.

    A run that takes `long_s` or more gets a line when it passes a quarter of its steps, and every run one at
    least every `every_s` seconds (long runs on a cluster); a shorter run only has the line that says it ended.
    """

    def __init__(self, tracker, say_line: Callable[[str], None], every_s: float = 600.0, poll_s: float = 5.0,
                 long_s: float = 120.0):
        self.tracker, self.say, self.every_s, self.poll_s, self.long_s = tracker, say_line, every_s, poll_s, long_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
        self._last: dict[str, tuple[int, float]] = {}  # run id -> (step printed, when)
        self._first: dict[str, tuple[int, float]] = {}  # run id -> (first step seen, when): the rate's origin

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=self.poll_s + 5)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                runs = self.tracker.running_runs()
            except Exception:  # noqa: BLE001 -- progress is best effort; the store may be busy or away
                continue
            for run in runs:
                line = self._line(run, time.monotonic())
                if line:
                    self.say(line)

    def _line(self, run, now: float) -> str | None:
        metrics = run.data.metrics
        tags = run.data.tags
        try:
            total = int(tags[names.TAG_STEPS])
            step = round(metrics[names.TRAIN_TOKENS_SEEN] / (int(tags[names.TAG_TOKENS]) / total))
        except (KeyError, ValueError, ZeroDivisionError):
            return None
        run_id = run.info.run_id
        first_step, first_time = self._first.setdefault(run_id, (step, now))
        printed_step, printed_time = self._last.get(run_id, (0, first_time))
        tokens_per_s = metrics.get(names.TRAIN_TOKENS_PER_S)
        rate = (step - first_step) / (now - first_time) if now > first_time and step > first_step else None
        if rate is None and tokens_per_s:  # first sight: the loop's own pace (probes and logging not included)
            rate = tokens_per_s / (int(tags[names.TAG_TOKENS]) / total)
        eta = (total - step) / rate if rate else None
        # Quarter lines only for a run long enough to wait for: a short one has just its line when it ends.
        quarter = 4 * step // total > 4 * printed_step // total and (total / rate if rate else 0) >= self.long_s
        if step <= printed_step or not (quarter or now - printed_time >= self.every_s):
            return None
        self._last[run_id] = (step, now)
        return format_progress(run.info.run_name or run_id[:8], step, total, metrics.get(names.TRAIN_CE_LOSS),
                               tokens_per_s, eta)
