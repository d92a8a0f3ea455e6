"""Loading a Hugging Face causal LM for measurement (and, later, training).

One job: turn a name or local path plus `--device`/`--dtype` strings into a live model in
eval mode, with the facts a caller checks against (parameter count, context length).
Measurement runs the *base* model (`model.base_model`: no LM head, so no T x vocab logits
are computed); its hidden states are the same tensors the full causal LM returns.

"The reference" here means the authors' code: the LM-Dispersion repository and the PyPI package
`embedding-condensation` 2.0 (docs/README.md#the-reference).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from scaling.errors import ConfigError, ModelError

if TYPE_CHECKING:  # torch is imported where it is used: the CLIs' checks and errors come first
    import torch

DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_CHOICES = ("auto", *DTYPE_NAMES)


def check_device_name(device: str) -> str:
    """The normalised name (`auto`, `cpu`, `cuda`, `cuda:N`); ConfigError for anything else.
    Pure: says nothing about whether this machine has that device (`resolve_device` does)."""
    name = device.strip().lower()
    if name in ("auto", "cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit()):
        return name
    raise ConfigError(f"device={device!r} is unknown: use one of auto, cpu, cuda, cuda:N")


def check_dtype_name(dtype: str, device: str = "auto") -> str:
    """The normalised name (`auto` or one of DTYPE_NAMES); ConfigError for an unknown one, and
    for float16 on a device named cpu. Pure (`resolve_dtype` also refuses float16 when `auto`
    turns out to be the CPU)."""
    name = dtype.strip().lower()
    if name != "auto" and name not in DTYPE_NAMES:
        raise ConfigError(f"dtype={dtype!r} is unknown: use one of {', '.join(DTYPE_CHOICES)}")
    if name == "float16" and device.strip().lower() == "cpu":
        raise ConfigError("dtype='float16' on CPU is not supported; use --dtype float32 or bfloat16 on CPU")
    return name


def resolve_device(device: str) -> torch.device:
    """`auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""
    import torch

    name = check_device_name(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device={device!r}: CUDA is not available on this machine; use --device cpu or auto")
    index = int(name[5:]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"device={device!r}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0 .. "
            f"cuda:{torch.cuda.device_count() - 1}"
        )
    return torch.device(name)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` means float32 on every device: the reference measured models as transformers 4.x
    loads them by default (float32), and its numbers are what ours are checked against. Pass
    bfloat16 explicitly for models too large for float32.

    float16 on CPU is refused rather than silently upcast: CPU half kernels are slow or
    missing, and a silent change would make the recorded dtype lie.
    """
    import torch

    name = check_dtype_name(dtype, device.type)
    return torch.float32 if name == "auto" else getattr(torch, name)


def context_length(config) -> int | None:
    """The longest sequence a model accepts (absolute positions or a trained rotary range), from
    a config object or a config.json dict; None when it does not say."""
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length"):
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


MAX_BATCH = {"cpu": 8, "cuda": 64}
"""Most texts per measurement forward pass: on CPU larger batches stop paying (the matrix
products are already large enough for the cores: bench/bench_condense.py); on a GPU 64
sequences of 512 tokens keep it busy."""
MEMORY_SHARE = {"cpu": 0.25, "cuda": 0.5}
"""Share of the free memory one measurement batch may take."""


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device, or the RAM the kernel reports available (MemAvailable)."""
    if device.type == "cuda":
        import torch

        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def sequence_bytes(config, tokens: int, dtype_bytes: int = 4) -> int:
    """Rough peak bytes one sequence of `tokens` adds to a measurement forward pass: every hidden
    state kept (output_hidden_states), one block's activations (MLP, attention scores if the
    attention is not fused), and the metric's float64 copy of one layer plus its Gram matrix."""
    width = int(getattr(config, "hidden_size", None) or 768)
    layers = int(getattr(config, "num_hidden_layers", None) or 12)
    heads = int(getattr(config, "num_attention_heads", None) or 12)
    mlp = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * width)
    hidden = (layers + 1) * tokens * width * dtype_bytes
    block = tokens * (4 * width + 2 * mlp) * dtype_bytes + heads * tokens * tokens * 4
    metric = tokens * width * (4 + 8 * 2) + 2 * min(tokens, width) ** 2 * 8
    return int(1.5 * (hidden + block + metric))


def auto_batch_size(config, tokens: int, device: torch.device, dtype_bytes: int = 4) -> int:
    """Texts per measurement forward pass: what fits `MEMORY_SHARE` of the free memory, at most
    `MAX_BATCH` (at least 1)."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    budget = free_memory_bytes(device) * MEMORY_SHARE[kind]
    return int(max(1, min(MAX_BATCH[kind], budget // max(1, sequence_bytes(config, tokens, dtype_bytes)))))


def read_local_config(path: Path | None) -> dict | None:
    """A local model folder's config.json as a dict (None for a hub name or an unreadable file):
    enough for the cheap checks (context, depth) before any framework is imported."""
    if path is None:
        return None
    try:
        return json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def config_depth(config) -> int | None:
    """Transformer blocks of a config object or config.json dict (None when it does not say)."""
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_last_n(last_n: int | None, depth: int | None) -> None:
    """ConfigError when the record is to summarise more hidden states than the model has."""
    if last_n is not None and depth is not None and last_n > depth + 1:
        raise ConfigError(f"--last-n {last_n}: the model has only {depth + 1} hidden states "
                          f"({depth} blocks + embedding output); use --last-n {depth + 1} or less")


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (tied input/output embeddings counted once), as model cards report."""
    return sum(p.numel() for p in model.parameters())


def check_max_length(max_length: int, limit: int | None, model_name: str = "the model") -> None:
    """`ModelError` when `max_length` exceeds the model's context (or is not positive)."""
    if max_length < 1:
        raise ConfigError(f"max_length={max_length}: must be at least 1")
    if limit is not None and max_length > limit:
        raise ModelError(
            f"max_length={max_length} exceeds the context of {model_name} ({limit} tokens); "
            f"use --max-length {limit} or less"
        )


@dataclass(frozen=True)
class LoadedModel:
    """A causal LM ready for measurement."""

    name: str
    """The name or path it was loaded from."""
    model: torch.nn.Module
    """The full causal LM (with its LM head), in eval mode, on `device`."""
    num_params: int
    """Unique parameters of the full causal LM."""
    context_length: int | None
    """Longest accepted sequence, from the config (None when unknown)."""
    device: torch.device
    dtype: torch.dtype

    @property
    def base_model(self) -> torch.nn.Module:
        """The transformer without its LM head (what measurement runs)."""
        return self.model.base_model


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else with a separator, or starting like a
    # path, is meant as a local folder.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_model_reference(name_or_path: str) -> Path | None:
    """The local folder a model name points to (None for a hub name); ModelError when a path is
    missing or is not a folder saved with save_pretrained. Cheap: reads no weights."""
    path = Path(name_or_path).expanduser()
    if _looks_like_path(name_or_path) and not path.exists():
        raise ModelError(f"model path {name_or_path!r} does not exist; give a local model folder or a hub name")
    if path.exists() and not (path.is_dir() and (path / "config.json").is_file()):
        raise ModelError(
            f"model path {name_or_path!r} is not a model folder (no config.json); "
            "give a folder saved with save_pretrained"
        )
    return path if path.exists() else None


def build_causal_lm(name_or_path: str, *, device: str = "auto", dtype: str = "auto") -> LoadedModel:
    """Load a causal LM by hub name or local folder, in eval mode on the resolved device/dtype."""
    from transformers import AutoModelForCausalLM

    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    path = check_model_reference(name_or_path) or Path(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path) if path.exists() else name_or_path, dtype=torch_dtype)
    except Exception as exc:  # noqa: BLE001 -- from_pretrained raises many kinds; all mean "cannot load"
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        raise ModelError(
            f"cannot load model {name_or_path!r}: {type(exc).__name__}: {first_line[:200]}. "
            "Give a local folder saved with save_pretrained, or a hub name on a machine with network"
        ) from None
    model.to(torch_device).eval()
    return LoadedModel(
        name=name_or_path,
        model=model,
        num_params=count_parameters(model),
        context_length=context_length(model.config),
        device=torch_device,
        dtype=torch_dtype,
    )


def save_tiny_gpt2(directory: str | Path, tokenizer, *, n_layer: int = 3, n_embd: int = 32, n_head: int = 2,
                   n_positions: int = 256, seed: int = 0, vocab_size: int | None = None) -> Path:
    """A randomly initialised GPT-2 (weights seeded by `seed`) with `tokenizer`, saved like a hub checkpoint:
    the offline stand-in that the demo, the tests and the benches load by folder. `vocab_size`: the
    embedding rows, when not `len(tokenizer)`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size or len(tokenizer), n_layer=n_layer, n_embd=n_embd, n_head=n_head,
                        n_positions=n_positions, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return Path(directory)
