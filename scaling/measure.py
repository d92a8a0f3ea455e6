"""The condensation measurement of one model: load, check, run the texts, reduce.

One path for `python -m scaling.condense` and for each task of an observation study: the
model is loaded on its device and dtype (several GPUs with device_map='auto'), the tokenizer
is checked against its embedding table, the texts are run through the base model one per
forward pass, and the hidden states are reduced here or on a pool of Ray actors
(`scaling.actors`). The metric itself is `scaling.condensation`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Sequence

from scaling.errors import ConfigError, DataError, ModelError


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
    """For a base model whose `hidden_states` do not end with the final-norm output: a module
    that runs it and returns hidden_states[-1] = last_hidden_state, so index L is the
    final-norm output the metric is defined on (the number of hidden states stays L+1)."""
    import torch

    class _Patched(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.config = getattr(inner, "config", None)

        def forward(self, **kwargs):
            output = self.inner(**kwargs)
            states = tuple(output.hidden_states)
            output.hidden_states = states[:-1] + (output.last_hidden_state,)
            return output

    return _Patched(base)


def check_final_norm(base, tokens: dict) -> bool:
    """True when the model's hidden_states already end with last_hidden_state (the usual case)."""
    import torch

    with torch.inference_mode():
        output = base(**tokens, output_hidden_states=True, use_cache=False)
    last = getattr(output, "last_hidden_state", None)
    if last is None or output.hidden_states is None:
        raise ModelError("the model returns no last_hidden_state/hidden_states; measurement needs a "
                         "Hugging Face base model that supports output_hidden_states=True")
    return bool(torch.equal(output.hidden_states[-1], last))


def check_tokens_fit(model, tokenizer, texts: Sequence[str], max_length: int) -> tuple[int, int]:
    """Refuse a tokenizer that produces ids the model cannot embed, or empty texts. Returns the
    (shortest, longest) token count of the texts."""
    from scaling.condensation import tokenize_for_measurement

    rows = model.get_input_embeddings().weight.shape[0]
    lengths, top = [], -1
    for index, text in enumerate(texts):
        ids = tokenize_for_measurement(tokenizer, text, max_length)["input_ids"]
        if ids.numel() == 0:
            raise DataError(f"text {index} tokenizes to no tokens; remove empty rows from the source")
        lengths.append(int(ids.shape[-1]))
        top = max(top, int(ids.max()))
    if top >= rows:
        raise ModelError(f"the tokenizer produces token id {top} but the model embeds only {rows} tokens; "
                         "give the model's own tokenizer")
    return min(lengths), max(lengths)


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


def _check_last_n(model, last_n: int | None) -> None:
    blocks = getattr(model.config, "num_hidden_layers", None)
    if last_n is not None and isinstance(blocks, int) and last_n > blocks + 1:
        raise ConfigError(f"--last-n {last_n}: the model has only {blocks + 1} hidden states "
                          f"({blocks} blocks + embedding output); use --last-n {blocks + 1} or less")


def measure_model(task: MeasureTask, texts: Sequence[str], *, progress: bool = False) -> Measurement:
    """Load, check, measure; the finalized result with what its record needs."""
    import torch

    from scaling.actors import measure_condensation_sharded
    from scaling.condensation import measure_condensation, tokenize_for_measurement
    from scaling.data import build_tokenizer

    started = time.perf_counter()
    model, device, num_params = load_model(task)
    _check_last_n(model, task.last_n)
    tokenizer = build_tokenizer(task.tokenizer or task.model_path)
    shortest, longest = check_tokens_fit(model, tokenizer, texts, task.max_length)
    base = model.base_model
    first = {k: v.to(device) for k, v in tokenize_for_measurement(tokenizer, texts[0], task.max_length).items()}
    ends_with_norm = check_final_norm(base, first)
    measured = base if ends_with_norm else build_final_norm_base(base)
    try:
        if task.num_actors > 0:
            accumulator = measure_condensation_sharded(measured, tokenizer, texts, task.max_length,
                                                       num_actors=task.num_actors, device=device, progress=progress,
                                                       effective_rank=task.effective_rank, num_cpus=task.actor_cpus)
        else:
            accumulator = measure_condensation(measured, tokenizer, texts, task.max_length, device, progress=progress,
                                               effective_rank=task.effective_rank)
    except torch.OutOfMemoryError as exc:
        raise ModelError(f"out of memory measuring {task.model_path!r} on {device} in {task.dtype} "
                         f"({str(exc).splitlines()[0][:120]}); use bfloat16, more GPUs or a smaller max_length") from None
    return Measurement(
        result=accumulator.finalize(), num_params=num_params, device=str(device),
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."), tokens=(shortest, longest),
        hidden_states_end="last_hidden_state" if ends_with_norm else "replaced by last_hidden_state",
        seconds=round(time.perf_counter() - started, 3))
