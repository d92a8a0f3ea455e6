"""Names shared by the trainer, the MLflow records and `analysis/`.

Pure Python on purpose: `analysis` imports this module on a laptop without torch or Ray.
Metric keys are slash-namespaced; the step of every metric is the optimizer step.
"""

import re

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"  # the trainer's store and the analysis' default

# --- run tags -----------------------------------------------------------------------
TAG_KIND = "kind"  # one of the KIND_* values below
TAG_STUDY = "study"
TAG_RUNG = "rung"
TAG_ARM = "arm"
TAG_SEED = "seed"
TAG_N_PARAMS = "n_params"  # total parameters (embeddings included)
TAG_N_PARAMS_NON_EMBEDDING = "n_params_non_embedding"
TAG_TOKENS = "tokens"  # training token budget of the run
TAG_CONFIG_HASH = "config_hash"  # identifies a run: re-running the same config is a no-op
TAG_GIT_COMMIT = "git_commit"
TAG_STATUS = "status"  # one of the STATUS_* values below
TAG_FAILURE = "failure"  # one line: why a run failed
TAG_FAMILY = "family"  # observation studies
TAG_MODEL = "model"
TAG_SOURCE = "source"
TAG_TRIAL_STATE = "trial_state"  # sweeps: finished / early_stopped / failed
TAG_BEST_TRIAL = "best_trial"  # "true" on the best trial of a rung's sweep
TAG_BEST_RUN_ID = "best_run_id"  # on a sweep run: its best trial's run id
TAG_TUNE_TRIAL_ID = "tune_trial_id"  # on a trial run: finds it again when a sweep resumes
TAG_PREEMPTIONS = "preemptions"  # on a trial run: retries after a lost node/actor
TAG_LADDER = "ladder"
TAG_PARENT_RUN_ID = "mlflow.parentRunId"  # MLflow's own nesting tag: trials under their rung's sweep
TAG_STUDY_RUN_ID = "study_run_id"  # on training, sweep and observation runs: their study's run
# Written by rank 0 of a training run. `data_order_hash` is written only once every step has
# run: its presence is what says a run (or a sweep trial Tune stopped) trained to the end.
TAG_INIT_HASH = "init_hash"  # hash of the initial weights: equal across paired arms
TAG_DATA_ORDER_HASH = "data_order_hash"  # chained hash of every batch's block indices
TAG_RESUMED_FROM_STEP = "resumed_from_step"
TAG_CHECKPOINT_FALLBACK = "checkpoint_fallback"  # newer checkpoints that could not be read on a resume, and why
TAG_WORLD_SIZE = "world_size"
TAG_WORKER_GROUP = "worker_group"  # the Ray Train run that trained it (last life): runs chained in turn share one
TAG_DEVICE = "device"
TAG_STEPS = "steps"
TAG_PRECISION = "precision"  # training runs: bf16 (mixed, float32 master weights) or fp32
TAG_DTYPE = "dtype"  # observation runs: the dtype the model was measured in
TAG_FAMILY_DTYPES = "family_dtypes"  # observation runs: every dtype its family is measured in ("float32,bfloat16")
TAG_HIDDEN_STATES_END = "hidden_states_end"  # observation runs: what the last hidden state is
TAG_INPUT_RUNS = "input_runs"  # analysis runs: how many runs the analysis read
TAG_MODEL_DIR = "model_dir"  # training runs that evaluate: the final model's Hugging Face folder (loadable by lm-eval)
TAG_EVAL_FAILED_PREFIX = "eval_failed/step_"  # + step: what could not be evaluated at that step, and why
TAG_DRIVER_LEASE = "driver_lease"  # on a study run: which driver runs the study now (see tracking.StudyLock)

KIND_STUDY = "study"  # the study's parent run
KIND_TRAIN = "train"  # one (rung, arm, seed) training run
KIND_SWEEP = "sweep"  # one rung's sweep (parent of its trials)
KIND_TRIAL = "trial"  # one sweep trial
KIND_OBSERVE = "observe"  # one (model, source) measurement of a pretrained model
KIND_ANALYSIS = "analysis"  # an analysis run written by analysis.scaling_curves

STATUS_RUNNING = "running"
STATUS_QUEUED = "queued"  # waits for its turn in a chain of runs (one worker group trains them in turn)
STATUS_FINISHED = "finished"
STATUS_FAILED = "failed"
STATUS_STOPPED = "stopped"  # a sweep trial stopped early by the scheduler (ASHA)
STATUS_KILLED = "killed"  # the driver was interrupted (Ctrl-C, SIGTERM) while the run trained: --resume continues it
STATUS_SKIPPED = "skipped"  # not a record: what the driver reports for a run finished earlier

# MLflow's own run status (its UI's status column), kept in step with the status tag by `mlflow_status`.
MLFLOW_RUNNING = "RUNNING"
MLFLOW_SCHEDULED = "SCHEDULED"
MLFLOW_FINISHED = "FINISHED"
MLFLOW_FAILED = "FAILED"
MLFLOW_KILLED = "KILLED"
_MLFLOW_STATUS = {STATUS_RUNNING: MLFLOW_RUNNING, STATUS_QUEUED: MLFLOW_SCHEDULED, STATUS_FINISHED: MLFLOW_FINISHED,
                  STATUS_FAILED: MLFLOW_FAILED, STATUS_STOPPED: MLFLOW_FAILED, STATUS_KILLED: MLFLOW_KILLED}
STATUS_OF_MLFLOW = {MLFLOW_FINISHED: STATUS_FINISHED, MLFLOW_FAILED: STATUS_FAILED, MLFLOW_KILLED: STATUS_FAILED}
"""A run without a status tag (another tool's): what its MLflow status means here (anything else: running)."""


def mlflow_status(status: str) -> str:
    """MLflow's run status for one of the STATUS_* values (a stopped trial ends FAILED: it did not finish)."""
    return _MLFLOW_STATUS[status]


# A sweep trial's `trial_state` tag: its end status, spelled as recorded since the first sweeps.
TRIAL_FINISHED = STATUS_FINISHED
TRIAL_EARLY_STOPPED = "early_stopped"
TRIAL_FAILED = STATUS_FAILED
TRIAL_STATES = {STATUS_FINISHED: TRIAL_FINISHED, STATUS_STOPPED: TRIAL_EARLY_STOPPED, STATUS_FAILED: TRIAL_FAILED}
"""A trial's end status -> its `trial_state` tag."""

ARM_BASELINE = "baseline"
ARM_DISPERSION = "dispersion"
ARM_NEFTUNE = "neftune"
ARM_ACTIVE_FORGETTING = "active_forgetting"
ARMS = (ARM_BASELINE, ARM_DISPERSION, ARM_NEFTUNE, ARM_ACTIVE_FORGETTING)
LAMBDA = "lambda"
"""The dispersion loss weight's one key: an arm's YAML key, the sweep's search-space key, the plotted metric
(`RUN_LAMBDA`) and, after its arm, the run param (`PARAM_LAMBDA`). Only Python spells it `lam` (a keyword):
`scaling.schema.YAML_RENAMES` maps the one to the other."""


def arm_param(arm: str, key: str) -> str:
    """A run param of an arm's setting: `<arm>.<YAML key>` (`dispersion.lambda`)."""
    return f"{arm}.{key}"


ARM_LABELS = {ARM_BASELINE: "base", ARM_DISPERSION: "disp", ARM_NEFTUNE: "neft", ARM_ACTIVE_FORGETTING: "forget"}
"""Short arm names for run names: the MLflow runs table cuts names at ~16 characters."""
ARM_COLORS = {ARM_BASELINE: "#1f77b4", ARM_DISPERSION: "#d62728", ARM_NEFTUNE: "#2ca02c",
              ARM_ACTIVE_FORGETTING: "#9467bd"}
"""A colour per arm for MLflow's charts (tag `mlflow.runColor`), so a chart's colours are arms, not runs."""
TAG_WAVE_PREFIX = "decide/wave_"  # + 2-digit wave: on a deciding study's run, that look's decisions (JSON, analysis.waves)
METRIC_WAVE_RUNS = "decide/runs"  # on a deciding study's run, at step = wave: finished runs the look used
METRIC_WAVE_ALPHA = "decide/alpha_spent"  # ... and the alpha spent up to that look
TAG_RUN_COLOR = "mlflow.runColor"  # MLflow's own tag: the colour its UI draws a run in

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3's UI opens an experiment in the view this names
EXPERIMENT_KIND = "custom_model_development"  # model training, not the GenAI (traces) view

# --- what a training run is, as numbers MLflow can plot (metrics at step 0, logged when the run is recorded;
# tags cannot be plotted): the compare page draws a metric against N by arm from these --------------------
RUN_N = "N"  # non-embedding parameters (the scaling curves' N)
RUN_LOG10_N = "log10_N"
RUN_LAMBDA = LAMBDA  # the arm's dispersion lambda; 0 for every arm without dispersion loss
PARAM_ARM = "arm"  # the arm as a param too: the compare page's box plot and parallel coordinates take params
PARAM_NONE = "none"  # the value of another arm's setting on a run whose arm has no such setting

# The key final values of a training run at 4 significant digits (what MLflow's runs table shows in full
# otherwise: 17 digits), logged by the driver when the run finishes; the exact values stay in their own keys.
FINAL_PREFIX = "final/"
FINAL_VALUES = {"val_loss": "val/loss", "late_half_mean_cos": "condensation/late_half_mean_cos",
                "last_layer_mean_cos": "condensation/last_layer_mean_cos", "spearman": "condensation/spearman",
                "mean_acc": "eval/mean_acc"}
"""`final/<name>` -> the metric it rounds."""

# --- where a training run's time went ---------------------------------------------------------
TIME_QUEUED_S = "time/queued_s"  # its chain was submitted -> it started (the first run of a chain: the worker
#                                  group's start-up); MLflow's start time is when it started
TIME_RUN_S = "time/run_s"  # it started -> its outcome (this life): model, DeepSpeed, steps, probes, checkpoints

# --- the study's saved view in MLflow's UI (MLflow >= 3.15 "Views": an experiment tag holding a JSON envelope
# {name, createdAt, state}; the runs page opens it with ?viewStateShareKey=<id>) -----------------------------
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_URL_PARAM = "viewStateShareKey"
STUDY_VIEW_ID = "study"  # the view the driver writes: runs grouped by rung, the study's metrics as columns

# --- run params (flattened study config, dotted) ------------------------------------
# The dispersion arm's settings are `<arm>.<YAML key>` (`arm_param`), so a run's params parse back into its arm
# (`scaling.config.ArmConfig.from_params`); NEFTune's and active forgetting's keep the names already recorded.
PARAM_LAMBDA = arm_param(ARM_DISPERSION, LAMBDA)
PARAM_LAYERS = arm_param(ARM_DISPERSION, "layers")
PARAM_VARIANT = arm_param(ARM_DISPERSION, "variant")
PARAM_TAU = arm_param(ARM_DISPERSION, "tau")
PARAM_CLAMP = arm_param(ARM_DISPERSION, "clamp_threshold")
PARAM_LAST_BLOCK = arm_param(ARM_DISPERSION, "last_block_output")
PARAM_NEFTUNE_ALPHA = "neftune.alpha"
PARAM_EMBEDDING_LR = "active_forgetting.embedding_lr"
PARAM_FORGET_EVERY = "active_forgetting.every"
PARAM_INIT_FROM = "init_from"  # the pretrained checkpoint a run started from (absent: random initialisation)

# --- metrics --------------------------------------------------------------------------
TRAIN_CE_LOSS = "train/ce_loss"
TRAIN_DISPERSION_LOSS = "train/dispersion_loss"  # unscaled
TRAIN_DISPERSION_LOSS_SCALED = "train/dispersion_loss_scaled"  # lambda * unscaled
TRAIN_LOSS = "train/loss"  # what is optimised
TRAIN_LR = "train/lr"
TRAIN_TOKENS_PER_S = "train/tokens_per_s"
TRAIN_TOKENS_SEEN = "train/tokens_seen"
VAL_LOSS = "val/loss"
VAL_LOSS_SE = "val/loss_se"
"""Standard error of `val/loss` over the validation blocks it averages (block to block spread / sqrt(n))."""

COND_SPEARMAN = "condensation/spearman"
COND_KENDALL = "condensation/kendall"
COND_LAST_LAYER_MEAN_COS = "condensation/last_layer_mean_cos"
COND_LATE_HALF_MEAN_COS = "condensation/late_half_mean_cos"


def layer_metric(layer: int, stat: str = "mean_cos") -> str:
    """Per-layer condensation metric key, e.g. `condensation/layer_03/mean_cos`.

    `stat` is one of `mean_cos`, `mean_cos_offdiag`, `effective_rank`.
    """
    return f"condensation/layer_{layer:02d}/{stat}"


# --- artifacts --------------------------------------------------------------------------
ARTIFACT_CONDENSATION_JSON = "condensation.json"
ARTIFACT_HEATMAP_PNG = "heatmap.png"
ARTIFACT_PROBES_DIR = "probes"  # training runs: probes/step_0000100.json, the profile at every probe
ARTIFACT_STUDY_YAML = "study.yaml"  # the study with every default filled in
ARTIFACT_STUDY_SOURCE = "study_source.yaml"  # the study file as the user wrote it

# --- downstream evaluation (lm-eval-harness, scaling.evaluate) ------------------------------
# A metric key is `eval/<task>/<metric>`: `<task>` is the lm-eval task or group name as
# configured (`arc_easy`, `mmlu`, `bundled_cloze_val`), `<metric>` lm-eval's metric name
# without its filter suffix when the filter is `none` (`acc`, `acc_norm`, `acc_stderr`,
# `word_perplexity`); any other filter is kept after an underscore. `eval/mean_acc` is the
# mean of `acc` over the configured tasks that report it (the paper's score for `paper10`),
# leaving out the selection tasks; `eval/selection_mean_acc` the mean over the selection tasks
# (validation data: allowed to choose checkpoints and to drive sweeps).

EVAL_PREFIX = "eval"
EVAL_MEAN_ACC = "eval/mean_acc"
"""Mean `acc` over the configured tasks except the selection tasks; logged only when none of them failed."""
EVAL_SELECTION_MEAN_ACC = "eval/selection_mean_acc"
"""Mean `acc` over the selection tasks (validation data); logged only when none of them failed."""
EVAL_NUM_FAILED = "eval/num_failed_tasks"
"""How many configured tasks could not be evaluated (0 when all gave results)."""
EVAL_SECONDS = "eval/seconds"
"""Wall time of one evaluation (loading the model and tasks included)."""
ARTIFACT_EVAL_JSON = "eval_results.json"
"""One evaluation's record: flat metrics, failures, settings and lm-eval's own results."""
EVAL_CHANCE_ACC = "chance_acc"
"""Per task (`eval/<task>/chance_acc`): the accuracy of a uniform guess, mean of 1 / choices over its documents."""
EVAL_CHANCE_MEAN_ACC = "eval/chance_mean_acc"
"""Chance level of eval/mean_acc (the same mean over the same tasks, of chance_acc)."""
EVAL_CHANCE_SELECTION_MEAN_ACC = "eval/chance_selection_mean_acc"
"""Chance level of eval/selection_mean_acc."""
EVAL_SAMPLES_DIR = f"{EVAL_PREFIX}/samples"
"""Per-item results of every evaluation of a run: `eval/samples/step_000120/<task>.jsonl`."""

# --- the paper's evaluation (arXiv 2602.00217) -------------------------------------------
PAPER10_TASKS = ("anli_r2", "lambada_openai", "openbookqa", "piqa", "truthfulqa_mc2", "winogrande",
                 "arc_easy", "arc_challenge", "medmcqa", "mmlu")
"""The paper's ten accuracy tasks (metric `acc`); their mean is the paper's score."""
PAPER_PERPLEXITY_TASK = "paloma_wikitext_103"
"""Reported next to the ten (word perplexity), never averaged with them."""
PRESETS = {"paper10": PAPER10_TASKS + (PAPER_PERPLEXITY_TASK,)}
"""Preset name -> lm-eval task names, usable as an entry of `eval.tasks`."""
PAPER_FEWSHOT_TASKS = ("arc_easy", "arc_challenge", "mmlu", "medmcqa")
"""Evaluated few-shot in the paper (1-shot for GPT-2, 5-shot for Qwen3); the rest zero-shot."""
PAPER_FEWSHOT_SHOTS = {"gpt2": 1, "qwen3": 5}

_KEY = re.compile(r"eval/(?P<task>[^/]+)/(?P<metric>[^/]+)")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\- ]")  # MLflow keys allow these (and "/")


def eval_metric_key(task: str, metric: str) -> str:
    """`eval/<task>/<metric>`, e.g. eval_metric_key("arc_easy", "acc") == "eval/arc_easy/acc"."""
    return f"{EVAL_PREFIX}/{task}/{metric}"


def metric_name(lm_eval_key: str) -> str:
    """lm-eval's `"<metric>,<filter>"` -> our metric name: "acc,none" -> "acc",
    "acc_stderr,none" -> "acc_stderr", "exact_match,strict-match" -> "exact_match_strict-match"."""
    metric, _, filter_name = lm_eval_key.partition(",")
    name = metric if filter_name in ("", "none") else f"{metric}_{filter_name}"
    return _UNSAFE.sub("_", name)


def parse_eval_metric_key(key: str) -> tuple[str, str] | None:
    """(task, metric) of an `eval/<task>/<metric>` key; None for any other key (eval/mean_acc, ...)."""
    match = _KEY.fullmatch(key)
    return (match["task"], match["metric"]) if match else None


def eval_artifact_path(step: int) -> str:
    """Where one evaluation's JSON goes in a run's artifacts: `eval/step_000120/eval_results.json`."""
    return f"{EVAL_PREFIX}/step_{step:06d}/{ARTIFACT_EVAL_JSON}"


def eval_samples_path(step: int, task: str) -> str:
    """Where one task's per-item results at one evaluation go in a run's artifacts:
    `eval/samples/step_000120/<task>.jsonl`, one JSON object per document (`scaling.evaluate.compact_sample`)."""
    return f"{EVAL_SAMPLES_DIR}/step_{step:06d}/{_UNSAFE.sub('_', task)}.jsonl"
