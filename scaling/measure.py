"""The condensation measurement of one model: load, check, run the texts, reduce.

One path for `python -m scaling.condense` and for each task of an observation study: the
model is loaded on its device and dtype (several GPUs with device_map='auto'), the texts are
tokenized once and checked against its embedding table, the distinct ones are run through the
base model in batches, and the hidden states are reduced on the model's device or on a pool of
Ray actors (`scaling.actors`). The metric itself is `scaling.condensation`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from scaling.errors import ModelError


@dataclass(frozen=True)
class MeasureTask:
    """Everything one measurement needs (plain data: it travels to a Ray worker)."""

    model_path: str
    """Hub name or local folder of a causal LM."""
    tokenizer: str | None
    """Tokenizer name/folder; None: the model's own."""
    device: str
    """auto, cpu, cuda or cuda:N."""
    dtype: str
    """auto (= float32), float32, bfloat16 or float16 (GPU only)."""
    max_length: int
    """Tokens per text (T); longer texts are truncated."""
    device_map: str | None = None
    """'auto' spreads a model over several GPUs; None loads it on `device`."""
    num_actors: int = 0
    """Reduce on this many Ray actors (0: in this process)."""
    actor_cpus: float = 1.0
    """CPUs of each reducer actor."""
    effective_rank: bool = True
    """Also compute RankMe per layer."""
    last_n: int | None = None
    """Checked against the model's depth before measuring (the record summarises the last N)."""
    batch_size: int | None = None
    """Texts per forward pass; None: as many as fit a share of the device's free memory."""


@dataclass(frozen=True)
class Measurement:
    """What one measurement produced, and the facts its record states."""

    result: Any
    """The finalized `CondensationResult`."""
    num_params: int
    device: str
    dtype: str
    tokens: tuple[int, int]
    """(shortest, longest) token count of the texts."""
    hidden_states_end: str
    """`last_hidden_state` when the model's last hidden state is its final-norm output, else
    `replaced by last_hidden_state`."""
    seconds: float

    def metadata(self) -> dict[str, Any]:
        return {"num_params": self.num_params, "device": self.device, "dtype": self.dtype,
                "hidden_states_end": self.hidden_states_end, "seconds": self.seconds}


def build_final_norm_base(base):
    """A module that runs `base` and makes its hidden_states end with last_hidden_state, so
    index L is the final-norm output the metric is defined on (the number of hidden states stays
    L+1). Checked on the first forward pass (no extra pass): when they differ, the last hidden
    state is replaced in every pass, and `replaced` is True."""
    import torch

    class _FinalNorm(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = getattr(inner, "config", None)
            self.replaced: bool | None = None
            """None before the first forward pass."""

        def forward(self, **kwargs):
            output = self.inner(**kwargs)
            last = getattr(output, "last_hidden_state", None)
            if last is None or output.hidden_states is None:
                raise ModelError("the model returns no last_hidden_state/hidden_states; measurement needs a "
                                 "Hugging Face base model that supports output_hidden_states=True")
            states = tuple(output.hidden_states)
            if self.replaced is None:
                self.replaced = not torch.equal(states[-1], last)
            if self.replaced:
                output.hidden_states = states[:-1] + (last,)
            return output

    return _FinalNorm(base)


def check_sequences_fit(model, sequences) -> tuple[int, int]:
    """Refuse token ids the model cannot embed (a tokenizer that is not the model's). Returns the
    (shortest, longest) token count."""
    rows = model.get_input_embeddings().weight.shape[0]
    top = max(int(ids.max()) for ids in sequences)
    if top >= rows:
        raise ModelError(f"the tokenizer produces token id {top} but the model embeds only {rows} tokens; "
                         "give the model's own tokenizer")
    lengths = [int(ids.numel()) for ids in sequences]
    return min(lengths), max(lengths)


def check_tokens_fit(model, tokenizer, texts: Sequence[str], max_length: int) -> tuple[int, int]:
    """`check_sequences_fit` on texts (DataError for a text that tokenizes to nothing)."""
    from scaling.condensation import tokenize_texts

    return check_sequences_fit(model, tokenize_texts(tokenizer, texts, max_length))


def load_model(task: MeasureTask):
    """(model in eval mode, its input device, unique parameters); device_map='auto' over several GPUs."""
    from scaling.model import build_causal_lm, check_max_length, resolve_device, resolve_dtype

    if task.device_map is None:
        resolve_dtype(task.dtype, resolve_device(task.device))  # fail fast, before any loading
        loaded = build_causal_lm(task.model_path, device=task.device, dtype=task.dtype)
        check_max_length(task.max_length, loaded.context_length, repr(task.model_path))
        return loaded.model, loaded.device, loaded.num_params
    try:
        import accelerate  # noqa: F401 -- transformers needs it for device_map
    except ImportError:
        raise ModelError(f"{task.model_path!r} needs several GPUs (device_map='auto'), which needs the "
                         "`accelerate` package on the cluster; pip install accelerate") from None
    from transformers import AutoModelForCausalLM

    dtype = resolve_dtype(task.dtype, resolve_device("cuda"))
    try:
        model = AutoModelForCausalLM.from_pretrained(task.model_path, dtype=dtype, device_map="auto")
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"cannot load {task.model_path!r} with device_map='auto': {type(exc).__name__}: "
                         f"{(str(exc).splitlines() or [''])[0][:200]}") from None
    model.eval()
    return model, next(model.parameters()).device, sum(p.numel() for p in model.parameters())


def measure_model(task: MeasureTask, texts: Sequence[str], *, progress: bool = False) -> Measurement:
    """Load, check, measure; the finalized result with what its record needs."""
    import torch

    from scaling.actors import measure_condensation_sharded
    from scaling.condensation import measure_sequences, tokenize_texts
    from scaling.data import build_tokenizer
    from scaling.model import check_last_n, config_depth

    started = time.perf_counter()
    model, device, num_params = load_model(task)
    check_last_n(task.last_n, config_depth(model.config))
    tokenizer = build_tokenizer(task.tokenizer or task.model_path)
    sequences = tokenize_texts(tokenizer, texts, task.max_length)
    shortest, longest = check_sequences_fit(model, sequences)
    measured = build_final_norm_base(model.base_model)
    try:
        if task.num_actors > 0:
            accumulator = measure_condensation_sharded(measured, None, None, task.max_length, sequences=sequences,
                                                       num_actors=task.num_actors, device=device, progress=progress,
                                                       effective_rank=task.effective_rank, num_cpus=task.actor_cpus,
                                                       batch_size=task.batch_size)
        else:
            accumulator = measure_sequences(measured, sequences, device, progress, effective_rank=task.effective_rank,
                                            batch_size=task.batch_size)
    except torch.OutOfMemoryError as exc:
        raise ModelError(f"out of memory measuring {task.model_path!r} on {device} in {task.dtype} "
                         f"({str(exc).splitlines()[0][:120]}); use bfloat16, a smaller --batch-size, more GPUs "
                         "or a smaller max_length") from None
    return Measurement(
        result=accumulator.finalize(), num_params=num_params, device=str(device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."), tokens=(shortest, longest),
        hidden_states_end="replaced by last_hidden_state" if measured.replaced else "last_hidden_state",
        seconds=round(time.perf_counter() - started, 3))
