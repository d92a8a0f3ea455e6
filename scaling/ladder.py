"""Model ladders: named model sizes, their parameter counts, and per-size run settings.

Two configurators kept apart (as in OLMo-core's model ladder):

- the *model* configurator: a `Rung` is one model shape (GPT-2 or Qwen3 layout); its
  parameter count is computed analytically by `count_params` and must land within
  `NOMINAL_TOLERANCE` of the size its name promises; `build_model_config` /
  `build_model` turn it into a transformers config / a seeded, randomly initialised model;
- the *run* configurator: `RunConfigurator.plan(rung)` turns a parameter count into a
  token budget, batch size, learning rate, warmup and a compute estimate (`RunPlan`). A study's
  `training` section is one (`scaling.config.TrainingConfig` extends it), so every planning key is
  declared and validated here once and can be set from a study file.

Parameter conventions (used everywhere in the project):
- *embedding* parameters are the vocabulary- and position-sized tables: token embedding,
  learned position embedding (GPT-2) and an untied output head. Tied heads are counted once,
  in the token embedding.
- *non-embedding* parameters are everything else (attention, MLP, norms): Kaplan et al.
  2020's N. The token budget (`tokens_per_param`) multiplies the non-embedding count by
  default: our small rungs carry 39M-156M-parameter vocabulary tables that cost almost no
  compute, and counting them would hand the smallest models the largest budgets relative to
  their compute (Pearce & Song 2024 trace the Kaplan/Chinchilla disagreement to exactly this
  choice at small scale). `param_basis="total"` gives Chinchilla's convention instead.

Importing this module is cheap: torch and transformers are imported inside the builders.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from scaling.console import format_count
from scaling.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover - for annotations only
    import torch
    from transformers import PretrainedConfig

FAMILIES = ("gpt2", "qwen3")
NOMINAL_TOLERANCE = 0.10
"""A rung's analytic total may differ from its nominal size by at most this fraction."""

# Parameter groups. `embedding` + `non_embedding` = total; the groups partition the model.
EMBEDDING_GROUPS = ("token_embedding", "position_embedding", "lm_head")
NON_EMBEDDING_GROUPS = ("attention", "mlp", "norm")
PARAM_GROUPS = EMBEDDING_GROUPS + NON_EMBEDDING_GROUPS


# --------------------------------------------------------------------------------------
# Model configurator
# --------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Rung:
    """One model size of a ladder: a shape in the GPT-2 or the Qwen3 layout."""

    name: str
    """Unique within its ladder; sizes by approximate total parameter count ("tiny-165K")."""
    family: str
    """`gpt2` (GPT2LMHeadModel) or `qwen3` (Qwen3ForCausalLM)."""
    n_layers: int
    """Transformer blocks."""
    n_heads: int
    """Attention (query) heads."""
    d_model: int
    """Residual stream width (hidden size)."""
    d_ff: int
    """MLP inner width (GPT-2 `n_inner`, Qwen3 `intermediate_size`)."""
    vocab_size: int
    """Token vocabulary: 50257 (GPT-2), 151936 (Qwen3), 4096 (a locally trained BPE)."""
    max_seq_len: int
    """Context length: GPT-2 `n_positions` (sizes the position table), Qwen3 `max_position_embeddings`."""
    nominal_params: float
    """The total parameter count the name promises; checked against `count_params`."""
    n_kv_heads: int | None = None
    """Qwen3 only: key/value heads (grouped-query attention); None = `n_heads`."""
    head_dim: int | None = None
    """Qwen3 only: width per head (Qwen3 keeps 128 at every size); None = d_model // n_heads."""
    tie_embeddings: bool = True
    """Output head shares the token embedding (GPT-2 always; Qwen3 up to 4B)."""

    def __post_init__(self):
        where = f"rung {self.name!r}"
        if not self.name or not isinstance(self.name, str):
            raise ConfigError(f"rung name={self.name!r}: give a non-empty string such as 'tiny-165K'")
        if self.family not in FAMILIES:
            raise ConfigError(f"{where}: family={self.family!r} is not supported; use one of {list(FAMILIES)}")
        for key in ("n_layers", "n_heads", "d_model", "d_ff", "vocab_size", "max_seq_len"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{where}: {key}={value!r} must be a positive integer")
        if self.family == "gpt2":
            if self.n_kv_heads is not None or self.head_dim is not None:
                raise ConfigError(
                    f"{where}: n_kv_heads={self.n_kv_heads!r}, head_dim={self.head_dim!r} are Qwen3 fields; "
                    "leave them unset (None) for family 'gpt2'")
            if self.d_model % self.n_heads:
                raise ConfigError(
                    f"{where}: n_heads={self.n_heads} does not divide d_model={self.d_model}; "
                    f"pick n_heads among {_divisors(self.d_model)}")
        else:
            if self.head_dim is None and self.d_model % self.n_heads:
                raise ConfigError(
                    f"{where}: n_heads={self.n_heads} does not divide d_model={self.d_model} and head_dim is unset; "
                    f"pick n_heads among {_divisors(self.d_model)} or set head_dim")
            if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim < 1):
                raise ConfigError(f"{where}: head_dim={self.head_dim!r} must be a positive integer or None")
            if self.n_kv_heads is not None and (
                    not isinstance(self.n_kv_heads, int) or self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
                raise ConfigError(
                    f"{where}: n_kv_heads={self.n_kv_heads!r} must divide n_heads={self.n_heads}; "
                    f"pick one of {_divisors(self.n_heads)}")
        if not (isinstance(self.nominal_params, (int, float)) and self.nominal_params > 0):
            raise ConfigError(f"{where}: nominal_params={self.nominal_params!r} must be a positive number")
        total = count_params(self).total
        if abs(total / self.nominal_params - 1) > NOMINAL_TOLERANCE:
            raise ConfigError(
                f"{where}: nominal_params={self.nominal_params:,.0f} but the shape has {total:,} parameters "
                f"({total / self.nominal_params - 1:+.1%}, tolerance {NOMINAL_TOLERANCE:.0%}); "
                f"set nominal_params={total:,} (and rename the rung to match) or change the shape")

    @property
    def kv_heads(self) -> int:
        """Key/value heads actually used (GPT-2: all heads)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def attention_head_dim(self) -> int:
        """Width per attention head actually used."""
        return self.head_dim if self.head_dim is not None else self.d_model // self.n_heads

    @property
    def d_attn(self) -> int:
        """Width of the concatenated query heads (n_heads * head_dim)."""
        return self.n_heads * self.attention_head_dim

    def describe_shape(self) -> str:
        """Compact shape, e.g. `L12 H12 d768 ff3072` (plus `kv8 hd128` for Qwen3)."""
        text = f"L{self.n_layers} H{self.n_heads} d{self.d_model} ff{self.d_ff}"
        if self.family == "qwen3":
            text += f" kv{self.kv_heads} hd{self.attention_head_dim}"
        return text


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def with_vocab_size(rung: Rung, vocab_size: int) -> Rung:
    """The same shape with another vocabulary (e.g. the size a trained tokenizer ended up with).

    The nominal size moves by exactly the change in vocabulary-sized tables, so a rung that
    matched its name still carries an honest nominal count.
    """
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ConfigError(f"vocab_size={vocab_size!r}: must be a positive integer")
    tables = 1 if rung.tie_embeddings else 2
    nominal = rung.nominal_params + (vocab_size - rung.vocab_size) * rung.d_model * tables
    return replace(rung, vocab_size=vocab_size, nominal_params=nominal)


def with_tied_embeddings(rung: Rung, tie: bool) -> Rung:
    """The same shape with its output head tied to (True) or separate from (False) the token embedding; the
    nominal size moves by the head's vocab x d_model, so the rung's size check still holds."""
    if tie == rung.tie_embeddings:
        return rung
    head = rung.vocab_size * rung.d_model
    return replace(rung, tie_embeddings=tie, nominal_params=rung.nominal_params + (-head if tie else head))


@dataclass(frozen=True)
class ParamCount:
    """Analytic parameter counts of a rung; equal to the built model's `sum(p.numel())`."""

    total: int
    """Every parameter, a tied output head counted once."""
    embedding: int
    """Token embedding + position embedding + untied output head."""
    non_embedding: int
    """Attention + MLP + norms (Kaplan et al. 2020's N)."""
    groups: tuple[tuple[str, int], ...] = field(default=())
    """(group, count) for every name in PARAM_GROUPS; the counts sum to `total`."""

    def __post_init__(self):
        if self.embedding + self.non_embedding != self.total:
            raise ValueError(f"ParamCount: embedding {self.embedding} + non_embedding {self.non_embedding} "
                             f"!= total {self.total}")
        if self.groups and sum(n for _, n in self.groups) != self.total:
            raise ValueError(f"ParamCount: groups {self.groups} do not sum to total {self.total}")

    def group(self, name: str) -> int:
        """Parameters in one group of PARAM_GROUPS."""
        for group_name, count in self.groups:
            if group_name == name:
                return count
        raise KeyError(f"unknown parameter group {name!r}; groups are {list(PARAM_GROUPS)}")


def compute_param_groups(rung: Rung) -> dict[str, int]:
    """Parameters per group, from the shape alone (the transformers layouts of GPT-2 / Qwen3).

    GPT-2 block: ln_1, fused qkv (c_attn) + c_proj with biases, ln_2, c_fc + c_proj with
    biases; final ln_f. Qwen3 block: RMSNorm weights only, bias-free q/k/v/o projections
    with grouped k/v heads, per-head q_norm/k_norm, SwiGLU MLP (gate, up, down); final norm.
    """
    d, ff, layers, vocab = rung.d_model, rung.d_ff, rung.n_layers, rung.vocab_size
    head = 0 if rung.tie_embeddings else vocab * d
    if rung.family == "gpt2":
        attention = (d * 3 * d + 3 * d) + (d * d + d)
        mlp = (d * ff + ff) + (ff * d + d)
        norms = 2 * (2 * d)  # ln_1, ln_2: weight and bias
        return {
            "token_embedding": vocab * d,
            "position_embedding": rung.max_seq_len * d,
            "lm_head": head,
            "attention": layers * attention,
            "mlp": layers * mlp,
            "norm": layers * norms + 2 * d,  # + ln_f
        }
    q_width = rung.n_heads * rung.attention_head_dim
    kv_width = rung.kv_heads * rung.attention_head_dim
    attention = d * q_width + 2 * d * kv_width + q_width * d
    mlp = 3 * d * ff
    norms = 2 * d + 2 * rung.attention_head_dim  # input/post-attention norms, q_norm, k_norm
    return {
        "token_embedding": vocab * d,
        "position_embedding": 0,  # rotary: no parameters
        "lm_head": head,
        "attention": layers * attention,
        "mlp": layers * mlp,
        "norm": layers * norms + d,  # + final norm
    }


def count_params(rung: Rung) -> ParamCount:
    """Total, embedding and non-embedding parameters of a rung, with the per-group split."""
    groups = compute_param_groups(rung)
    embedding = sum(groups[g] for g in EMBEDDING_GROUPS)
    non_embedding = sum(groups[g] for g in NON_EMBEDDING_GROUPS)
    return ParamCount(total=embedding + non_embedding, embedding=embedding, non_embedding=non_embedding,
                      groups=tuple((g, groups[g]) for g in PARAM_GROUPS))


def classify_parameter(name: str) -> str:
    """The PARAM_GROUPS entry of a transformers parameter name (GPT-2 or Qwen3 layout).

    Lets a caller (and the tests) sum a live model's parameters per group, e.g. to exempt
    norms and embeddings from weight decay.
    """
    leaf = name.split(".")
    if "wte" in leaf or "embed_tokens" in leaf:
        return "token_embedding"
    if "wpe" in leaf:
        return "position_embedding"
    if leaf[0] == "lm_head":
        return "lm_head"
    if any(part.startswith("ln_") or part.endswith("norm") for part in leaf):
        return "norm"
    if "attn" in leaf or "self_attn" in leaf:
        return "attention"
    if "mlp" in leaf:
        return "mlp"
    raise ValueError(f"parameter {name!r} belongs to no known group; extend classify_parameter")


def split_weight_decay(named_parameters) -> tuple[list, list]:
    """(decayed, not decayed) parameters for AdamW, as Hugging Face's Trainer forms them for the GPT-2 and
    Qwen3 layouts (the authors' scripts): weight decay on every matrix (attention, MLP, token embedding,
    GPT-2's position table wpe), none on biases and norms (the 1-D parameters: the Trainer exempts names
    with `bias`/`norm` and LayerNorm modules, which are exactly these here)."""
    decay, no_decay = [], []
    for _, parameter in named_parameters:
        (decay if parameter.ndim >= 2 else no_decay).append(parameter)
    return decay, no_decay


def build_model_config(rung: Rung, *, bos_token_id: int | None = None, eos_token_id: int | None = None,
                       pad_token_id: int | None = None, dropout: float = 0.0) -> "PretrainedConfig":
    """The transformers config of a rung (GPT2Config / Qwen3Config); `dropout` on the residual,
    embedding and attention paths (GPT-2's own template uses 0.1; off by default).

    Token ids default to the config class's defaults (GPT-2: 50256) when not given; pass the
    tokenizer's ids when the vocabulary is a locally trained one.
    """
    token_ids = {k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id),
                                   ("pad_token_id", pad_token_id)) if v is not None}
    for key, value in token_ids.items():
        if not 0 <= value < rung.vocab_size:
            raise ConfigError(f"{key}={value} is outside rung {rung.name!r}'s vocabulary "
                              f"(vocab_size={rung.vocab_size}); pass the tokenizer's id")
    if rung.family == "gpt2":
        from transformers import GPT2Config

        if "bos_token_id" in token_ids and "eos_token_id" not in token_ids:
            token_ids["eos_token_id"] = token_ids["bos_token_id"]
        if rung.vocab_size <= 50256:  # GPT2Config's default 50256 would point past a small vocabulary
            # A locally trained BPE (scaling.data) puts <|endoftext|> at id 0.
            token_ids.setdefault("bos_token_id", token_ids.get("eos_token_id", 0))
            token_ids.setdefault("eos_token_id", token_ids["bos_token_id"])
        return GPT2Config(
            vocab_size=rung.vocab_size, n_positions=rung.max_seq_len, n_embd=rung.d_model,
            n_layer=rung.n_layers, n_head=rung.n_heads, n_inner=rung.d_ff,
            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, summary_first_dropout=0.0,
            tie_word_embeddings=rung.tie_embeddings, **token_ids)
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=rung.vocab_size, hidden_size=rung.d_model, intermediate_size=rung.d_ff,
        num_hidden_layers=rung.n_layers, num_attention_heads=rung.n_heads,
        num_key_value_heads=rung.kv_heads, head_dim=rung.attention_head_dim,
        max_position_embeddings=rung.max_seq_len, tie_word_embeddings=rung.tie_embeddings,
        # Qwen3's released checkpoints use rope_theta 1e6 and full attention in every layer.
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        use_sliding_window=False, attention_dropout=dropout, **token_ids)


def build_model(rung: Rung, seed: int, *, dropout: float = 0.0, **token_ids: int | None) -> "torch.nn.Module":
    """A randomly initialised causal LM for a rung (fp32, CPU, train mode).

    The same (rung, seed) gives bitwise identical weights; the caller's global torch RNG
    state is left untouched (initialisation runs in a forked RNG). `token_ids` go to
    `build_model_config` (bos_token_id, eos_token_id, pad_token_id).
    """
    import torch

    config = build_model_config(rung, dropout=dropout, **token_ids)
    if rung.family == "gpt2":
        from transformers import GPT2LMHeadModel as model_class
    else:
        from transformers import Qwen3ForCausalLM as model_class
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    return model


# --------------------------------------------------------------------------------------
# Ladders
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Ladder:
    """Named rungs of one model family, smallest first."""

    name: str
    rungs: tuple[Rung, ...]
    description: str

    def __post_init__(self):
        if not self.rungs:
            raise ConfigError(f"ladder {self.name!r}: rungs=() is empty; give at least one Rung")
        names = [rung.name for rung in self.rungs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"ladder {self.name!r}: rung names {duplicates} appear more than once; rename them")
        totals = [count_params(rung).total for rung in self.rungs]
        for (a, na), (b, nb) in zip(zip(names, totals), zip(names[1:], totals[1:])):
            if nb <= na:
                raise ConfigError(f"ladder {self.name!r}: rung {b!r} ({nb:,} params) follows {a!r} ({na:,}); "
                                  "order rungs from smallest to largest")

    @property
    def rung_names(self) -> tuple[str, ...]:
        return tuple(rung.name for rung in self.rungs)

    def rung(self, name: str) -> Rung:
        """The rung called `name`; ConfigError listing the valid names otherwise."""
        for rung in self.rungs:
            if rung.name == name:
                return rung
        raise ConfigError(f"rung={name!r} is not in ladder {self.name!r}; use one of {list(self.rung_names)}")


def _gpt2(name: str, n_layers: int, n_heads: int, d_model: int, nominal: float, *, d_ff: int | None = None,
          vocab_size: int = 50257, max_seq_len: int = 1024) -> Rung:
    return Rung(name=name, family="gpt2", n_layers=n_layers, n_heads=n_heads, d_model=d_model,
                d_ff=4 * d_model if d_ff is None else d_ff, vocab_size=vocab_size, max_seq_len=max_seq_len,
                nominal_params=nominal)


def _qwen3(name: str, n_layers: int, n_heads: int, n_kv_heads: int, head_dim: int, d_model: int, d_ff: int,
           nominal: float, *, vocab_size: int = 151936, max_seq_len: int = 4096, tie_embeddings: bool = True) -> Rung:
    return Rung(name=name, family="qwen3", n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv_heads,
                head_dim=head_dim, d_model=d_model, d_ff=d_ff, vocab_size=vocab_size, max_seq_len=max_seq_len,
                nominal_params=nominal, tie_embeddings=tie_embeddings)


TINY_VOCAB = 4096
TINY_SEQ_LEN = 256
# (n_layers, n_heads, d_model): the CPU-sized shapes shared by `tiny` and the bottom of `gpt2`.
_TINY_SHAPES = ((2, 2, 32), (3, 4, 64), (3, 4, 96))

TINY = Ladder("tiny", (
    _gpt2("tiny-165K", *_TINY_SHAPES[0], 165e3, vocab_size=TINY_VOCAB, max_seq_len=TINY_SEQ_LEN),
    _gpt2("tiny-429K", *_TINY_SHAPES[1], 429e3, vocab_size=TINY_VOCAB, max_seq_len=TINY_SEQ_LEN),
    _gpt2("tiny-754K", *_TINY_SHAPES[2], 754e3, vocab_size=TINY_VOCAB, max_seq_len=TINY_SEQ_LEN),
    _gpt2("tiny-1.1M", 4, 4, 112, 1.1e6, vocab_size=TINY_VOCAB, max_seq_len=TINY_SEQ_LEN),
), "GPT-2 layout, 4096-token local BPE, context 256: trains in seconds on a CPU (tests, demo).")

GPT2 = Ladder("gpt2", (
    _gpt2("gpt2-1.7M", *_TINY_SHAPES[0], 1.67e6),
    _gpt2("gpt2-3.4M", *_TINY_SHAPES[1], 3.43e6),
    _gpt2("gpt2-5.3M", *_TINY_SHAPES[2], 5.26e6),
    _gpt2("gpt2-small", 12, 12, 768, 124e6),
    _gpt2("gpt2-medium", 24, 16, 1024, 355e6),
    _gpt2("gpt2-large", 36, 20, 1280, 774e6),
    _gpt2("gpt2-xl", 48, 25, 1600, 1.5e9),
), "GPT-2 vocabulary (50257) and context (1024): the tiny CPU shapes, then GPT-2 small/medium/large/xl.")

GPT2_FFN = Ladder("gpt2-ffn", (
    _gpt2("gpt2-small-ffn64", 12, 12, 768, 68.96e6, d_ff=64),
    _gpt2("gpt2-small-ffn256", 12, 12, 768, 72.50e6, d_ff=256),
    _gpt2("gpt2-small-ffn1024", 12, 12, 768, 86.66e6, d_ff=1024),
    _gpt2("gpt2-small-ffn4096", 12, 12, 768, 143.3e6, d_ff=4096),
), "The paper's controlled ladder: GPT-2 small with only the MLP width varied (64/256/1024/4096).")

QWEN3_PAPER_RUNG = "qwen3-63M"
"""The paper's from-scratch Qwen3-like shape, as the authors' torchtitan config has it: d = 256,
28 layers, FFN 768, 2 query heads and 2 key/value heads of width 128 (d_attn = d_model)."""

QWEN3 = Ladder("qwen3", (
    _qwen3("qwen3-9.8M", 2, 2, 1, 32, 64, 192, 9.8e6),
    _qwen3("qwen3-20M", 4, 2, 1, 64, 128, 384, 20e6),
    _qwen3(QWEN3_PAPER_RUNG, 28, 2, 2, 128, 256, 768, 62.8e6),
    _qwen3("qwen3-166M", 28, 8, 4, 64, 512, 1536, 166e6),
    # The released Qwen3 shapes (their config.json files): the pretrained ladder of mid-training studies.
    _qwen3("qwen3-0.6B", 28, 16, 8, 128, 1024, 3072, 0.6e9, max_seq_len=40960),
    _qwen3("qwen3-1.7B", 28, 16, 8, 128, 2048, 6144, 1.72e9, max_seq_len=40960),
    _qwen3("qwen3-4B", 36, 32, 8, 128, 2560, 9728, 4.02e9, max_seq_len=40960),
    _qwen3("qwen3-8B", 36, 32, 8, 128, 4096, 12288, 8.19e9, max_seq_len=40960, tie_embeddings=False),
), "Qwen3 layout and vocabulary (151936): tiny shapes, the paper's from-scratch shape (d=256, 28 layers, "
   "FFN 768, 2 heads of 128), and the released Qwen3-0.6B/1.7B/4B/8B shapes (tied embeddings up to 4B).")

TINY_QWEN3 = Ladder("tiny-qwen3", (
    _qwen3("tiny-qwen3-156K", 2, 2, 1, 16, 32, 96, 156e3, vocab_size=TINY_VOCAB, max_seq_len=TINY_SEQ_LEN),
    _qwen3("tiny-qwen3-410K", 3, 4, 2, 16, 64, 192, 410e3, vocab_size=TINY_VOCAB, max_seq_len=TINY_SEQ_LEN),
    _qwen3("tiny-qwen3-726K", 3, 4, 2, 24, 96, 288, 726e3, vocab_size=TINY_VOCAB, max_seq_len=TINY_SEQ_LEN),
), "Qwen3 layout at CPU size (4096-token local BPE, context 256): exercises the Qwen3 path in tests.")

LADDERS: dict[str, Ladder] = {ladder.name: ladder for ladder in (TINY, TINY_QWEN3, GPT2, GPT2_FFN, QWEN3)}


def get_ladder(name: str) -> Ladder:
    """The shipped ladder called `name`; ConfigError listing the valid names otherwise."""
    try:
        return LADDERS[name]
    except KeyError:
        raise ConfigError(f"ladder={name!r} is unknown; use one of {sorted(LADDERS)}") from None


# --------------------------------------------------------------------------------------
# Run configurator
# --------------------------------------------------------------------------------------
# Batch size and learning rate as functions of N: the fits of Porian et al. 2024 ("Resolving
# Discrepancies in Compute-Optimal Scaling of Language Models"), as the OLMo ladder uses them:
# batch = 160 sequences of 2048 tokens at N = 108M, scaling as N^(2/3); lr = 4.7e-3 at
# N = 108M, scaling as N^(-1/3). We keep the batch rule's *token* count for other sequence
# lengths (as OLMo does).
REFERENCE_PARAMS = 108e6
REFERENCE_BATCH_TOKENS = 160 * 2048
REFERENCE_LR = 4.7e-3
LR_RULE_MIN_PARAMS = 5e6
"""The lr rule is evaluated at max(N, this): below a few million parameters it is outside the
range it was fitted on and would return ever larger rates (0.08 at N = 25K)."""

PARAM_BASES = ("non_embedding", "total")
LR_SCALINGS = ("none", "sqrt_world_size")
MAX_LR = 1.0
"""No AdamW peak learning rate above this trains: a larger one is a typo (a missing `e-`)."""
MAX_TOKENS_PER_PARAM = 1e6
"""Chinchilla is 20; even heavily over-trained small models stay below 1e4. A larger multiple is a typo and plans
steps beyond any int64 step counter on large rungs."""

PEAK_BF16_FLOPS: dict[str, float] = {
    # Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets (SXM parts).
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
    "L4": 121e12,
    # AWS's A10G: the commonly quoted dense bf16 figure; NVIDIA's A10 datasheet says 125e12.
    # Give the dry run a number (--gpu 125e12) when you know your part better.
    "A10G": 70e12,
}


def compute_batch_tokens(n_params: float) -> int:
    """Tokens per optimizer step for a model of `n_params` (Porian et al. 2024's fit)."""
    return max(1, round(REFERENCE_BATCH_TOKENS * (n_params / REFERENCE_PARAMS) ** (2 / 3)))


def compute_lr(n_params: float) -> float:
    """Peak AdamW learning rate for a model of `n_params` (Porian et al. 2024's fit, clamped below)."""
    return REFERENCE_LR * (max(n_params, LR_RULE_MIN_PARAMS) / REFERENCE_PARAMS) ** (-1 / 3)


def compute_flops_per_token(rung: Rung, params: ParamCount, seq_len: int) -> float:
    """Training FLOPs per token, the convention MFU is quoted in (Chowdhery et al. 2022, app. B).

    6 x (parameters that take part in a matmul per token: the non-embedding ones plus the
    output projection d_model x vocab, tied or not; embedding *lookups* cost nothing)
    + 12 x n_layers x d_attn x seq_len for the attention scores and the weighted sum.
    """
    matmul_params = params.non_embedding + rung.d_model * rung.vocab_size
    return 6.0 * matmul_params + 12.0 * rung.n_layers * rung.d_attn * seq_len


@dataclass(frozen=True)
class RunPlan:
    """Resolved run settings for one rung. Build one with `RunConfigurator.plan`."""

    rung: Rung
    params: ParamCount
    param_basis: str
    """Which count N is: `non_embedding` or `total`."""
    n_params: int
    """N: the count the token budget, batch and lr rules were applied to."""
    tokens: int
    """Tokens actually trained: steps x batch_size x seq_len."""
    seq_len: int
    batch_size: int
    """Sequences per optimizer step over all workers (a multiple of num_workers)."""
    num_workers: int
    steps: int
    lr: float
    warmup_steps: int
    flops: float
    """Hardware estimate: tokens x compute_flops_per_token (the MFU convention); for GPU-hours."""
    flops_6nd: float
    """6 x N x tokens with N = n_params (Kaplan's C): the compute axis of scaling-law fits."""

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.tokens != self.steps * self.batch_size * self.seq_len:
            raise ValueError(f"RunPlan for {self.rung.name!r} is inconsistent: steps={self.steps}, "
                             f"batch_size={self.batch_size}, seq_len={self.seq_len}, tokens={self.tokens}")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def to_dict(self) -> dict[str, str | int | float]:
        """Flat, JSON- and MLflow-friendly summary: the rung's shape, counts and run settings."""
        rung = self.rung
        return {
            "rung": rung.name, "family": rung.family, "n_layers": rung.n_layers, "n_heads": rung.n_heads,
            "n_kv_heads": rung.kv_heads, "head_dim": rung.attention_head_dim, "d_model": rung.d_model,
            "d_ff": rung.d_ff, "vocab_size": rung.vocab_size, "max_seq_len": rung.max_seq_len,
            "n_params_total": self.params.total, "n_params_embedding": self.params.embedding,
            "n_params_non_embedding": self.params.non_embedding, "param_basis": self.param_basis,
            "n_params": self.n_params, "tokens": self.tokens, "seq_len": self.seq_len,
            "batch_size": self.batch_size, "num_workers": self.num_workers, "steps": self.steps,
            "lr": self.lr, "warmup_steps": self.warmup_steps, "flops": self.flops, "flops_6nd": self.flops_6nd,
        }

    def gpu_hours(self, gpu: str = "H100", mfu: float = 0.4, *, peak_flops: float | None = None) -> float:
        """Estimated GPU-hours: flops / (peak bf16 FLOP/s x mfu) / 3600."""
        if peak_flops is None:
            peak_flops = resolve_peak_flops(gpu)
        if not 0 < mfu <= 1:
            raise ConfigError(f"mfu={mfu}: must be in (0, 1]; 0.3-0.5 is typical for dense training")
        return self.flops / (peak_flops * mfu) / 3600.0


def resolve_peak_flops(gpu: str) -> float:
    """Dense bf16 peak FLOP/s of a GPU named in PEAK_BF16_FLOPS, or a number such as `312e12`."""
    if gpu in PEAK_BF16_FLOPS:
        return PEAK_BF16_FLOPS[gpu]
    if gpu.split("-")[0] in PEAK_BF16_FLOPS:  # a memory variant: H100-80GB, A100-40GB
        return PEAK_BF16_FLOPS[gpu.split("-")[0]]
    try:
        value = float(gpu)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 1e9):
        raise ConfigError(f"--gpu {gpu!r}: use one of {sorted(PEAK_BF16_FLOPS)} or your GPU's dense bf16 peak "
                          "in FLOP/s, e.g. --gpu 312e12") from None
    return value


@dataclass(frozen=True)
class RunConfigurator:
    """Per-rung run settings derived from the parameter count; independent of model shapes. Validated here once,
    for the ladder's own callers and for a study's `training` section alike (errors name the key as `KEY_PREFIX` +
    field: `training.batch_tokens=...` in a study)."""

    KEY_PREFIX = ""  # not a field: no annotation

    tokens_per_param: float = 20.0
    """Token budget = tokens_per_param x N (Chinchilla's 20), N per `param_basis`."""
    param_basis: str = "non_embedding"
    """N for every rule here (budget, derived batch and lr): `non_embedding` (default; see the module docstring) or
    `total` (Chinchilla's convention; analyse such a study with `--size total`)."""
    tokens: int | None = None
    """A fixed token budget for every rung (the paper's mid-training: 200M); overrides tokens_per_param. Steps round up."""
    seq_len: int = 1024
    """Tokens per training sequence; must not exceed the rung's max_seq_len."""
    batch_tokens: int | None = None
    """Tokens per optimizer step (a multiple of seq_len), instead of batch_size."""
    batch_size: int | None = None
    """Sequences per optimizer step over all workers; None: batch_tokens / seq_len, else compute_batch_tokens(N)."""
    lr: float | None = None
    """Peak learning rate; None: compute_lr(N) (Porian et al. 2024)."""
    lr_scaling: str = "none"
    """`sqrt_world_size`: the peak is lr x sqrt(num_workers) (the paper's mid-training rule); `none`: lr as given."""
    warmup_fraction: float = 0.2
    """Share of steps in linear warmup (the paper: 20%); rounded up to whole steps."""
    warmup_steps: int | None = None
    """A fixed warmup instead of warmup_fraction (the paper's from-scratch Qwen3: 100); capped at the step count."""
    max_tokens: int | None = None
    """Cap on the tokens trained (smoke runs); the step count is rounded down to fit."""
    max_steps: int | None = None
    """Cap on optimizer steps (smoke runs); applied after the token budget."""

    def __post_init__(self):
        key = self.KEY_PREFIX
        if not 0 < self.tokens_per_param <= MAX_TOKENS_PER_PARAM:
            raise ConfigError(f"{key}tokens_per_param={self.tokens_per_param:g}: must be in (0, "
                              f"{MAX_TOKENS_PER_PARAM:g}] (Chinchilla: 20)")
        if self.param_basis not in PARAM_BASES:
            raise ConfigError(f"{key}param_basis={self.param_basis!r}: use one of {list(PARAM_BASES)}")
        for name in ("tokens", "batch_tokens", "batch_size", "max_tokens", "max_steps", "seq_len"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{key}{name}={value!r}: must be a positive integer" +
                                  ("" if name == "seq_len" else " or null"))
        if self.batch_tokens is not None and self.batch_tokens % self.seq_len:
            raise ConfigError(f"{key}batch_tokens={self.batch_tokens} is not a multiple of {key}seq_len={self.seq_len}; "
                              f"use e.g. {max(1, round(self.batch_tokens / self.seq_len)) * self.seq_len}")
        if (self.batch_tokens is not None and self.batch_size is not None
                and self.batch_size * self.seq_len != self.batch_tokens):
            raise ConfigError(f"{key}batch_tokens={self.batch_tokens} and {key}batch_size={self.batch_size} are both set "
                              f"and disagree ({self.batch_size} x seq_len {self.seq_len} = "
                              f"{self.batch_size * self.seq_len} tokens); set one of them")
        if self.lr is not None and not 0 < self.lr <= MAX_LR:
            raise ConfigError(f"{key}lr={self.lr}: must be in (0, {MAX_LR}] or null (derived from the rung's size)")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"{key}warmup_fraction={self.warmup_fraction}: must be in [0, 1)")
        if self.warmup_steps is not None and (not isinstance(self.warmup_steps, int) or self.warmup_steps < 0):
            raise ConfigError(f"{key}warmup_steps={self.warmup_steps!r}: must be an integer >= 0 or null")
        if self.lr_scaling not in LR_SCALINGS:
            raise ConfigError(f"{key}lr_scaling={self.lr_scaling!r}: use one of {list(LR_SCALINGS)}")

    def plan(self, rung: Rung, *, num_workers: int = 1) -> RunPlan:
        """Token budget, batch, steps, lr, warmup and compute for one rung on `num_workers` workers."""
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ConfigError(f"num_workers={num_workers!r}: must be a positive integer")
        if self.seq_len > rung.max_seq_len:
            raise ConfigError(f"seq_len={self.seq_len} exceeds rung {rung.name!r}'s max_seq_len={rung.max_seq_len}; "
                              f"use seq_len <= {rung.max_seq_len} or a rung with a longer context")
        params = count_params(rung)
        n = params.non_embedding if self.param_basis == "non_embedding" else params.total

        if self.batch_size is not None:
            batch_size = self.batch_size
        elif self.batch_tokens is not None:  # agrees with batch_size when both are set
            batch_size = self.batch_tokens // self.seq_len
        else:  # derived: round to whole sequences per worker, at least one each
            per_worker = compute_batch_tokens(n) / self.seq_len / num_workers
            batch_size = max(1, round(per_worker)) * num_workers
        if batch_size % num_workers:
            raise ConfigError(f"batch of {batch_size} sequences does not split over num_workers={num_workers}; "
                              f"use a multiple of {num_workers} sequences "
                              f"({num_workers * self.seq_len} tokens)")
        tokens_per_step = batch_size * self.seq_len

        target = self.tokens if self.tokens is not None else self.tokens_per_param * n
        steps = max(1, _ceil(target / tokens_per_step))  # a budget is a floor: 200M tokens -> 1526 steps
        if self.max_tokens is not None:
            if self.max_tokens < tokens_per_step:
                raise ConfigError(f"max_tokens={self.max_tokens} is less than one optimizer step "
                                  f"({tokens_per_step} tokens) for rung {rung.name!r}; raise max_tokens or "
                                  "lower batch_tokens/batch_size")
            steps = min(steps, self.max_tokens // tokens_per_step)
        if self.max_steps is not None:
            steps = min(steps, self.max_steps)

        if self.warmup_steps is not None:
            warmup = min(self.warmup_steps, steps)
        else:
            warmup = min(steps, _ceil(self.warmup_fraction * steps))  # 20% of 1526 -> 306
        lr = self.lr if self.lr is not None else compute_lr(n)
        if self.lr_scaling == "sqrt_world_size":
            lr *= math.sqrt(num_workers)
        tokens = steps * tokens_per_step
        return RunPlan(
            rung=rung, params=params, param_basis=self.param_basis, n_params=n, tokens=tokens,
            seq_len=self.seq_len, batch_size=batch_size, num_workers=num_workers, steps=steps,
            lr=lr, warmup_steps=warmup,
            flops=tokens * compute_flops_per_token(rung, params, self.seq_len), flops_6nd=6.0 * n * tokens)


def _ceil(value: float) -> int:
    """Round up, forgiving float noise (0.1 x 30 is 3.0000000000000004, not a reason for a 4th step)."""
    return math.ceil(value - 1e-9)


# --------------------------------------------------------------------------------------
# Dry-run table
# --------------------------------------------------------------------------------------
def format_ladder_table(plans: list[RunPlan] | tuple[RunPlan, ...], gpu: str | None = "H100", mfu: float = 0.4,
                        extra: tuple[str, list[str]] | None = None) -> str:
    """The dry-run table: one row per plan with shape, params, tokens, steps, FLOPs and GPU-hours (none when
    `gpu` is None: a CPU study that asked for no estimate), and an `extra` (header, one cell per plan) column
    last (the study's per-GPU memory)."""
    gpu_label = None if gpu is None else gpu if gpu.split("-")[0] in PEAK_BF16_FLOPS else f"GPU({resolve_peak_flops(gpu):.3g} FLOP/s)"
    headers = ("rung", "family", "shape", "vocab", "params", "non-emb", "tokens", "batch", "steps", "warmup", "lr",
               "FLOPs") + ((f"{gpu_label}-h@{mfu:.0%}",) if gpu is not None else ()) + ((extra[0],) if extra else ())
    rows = []
    for index, plan in enumerate(plans):
        rung = plan.rung
        rows.append((
            rung.name, rung.family, rung.describe_shape(), str(rung.vocab_size),
            format_count(plan.params.total), format_count(plan.params.non_embedding), format_count(plan.tokens),
            f"{plan.batch_size}x{plan.seq_len}", str(plan.steps), str(plan.warmup_steps), f"{plan.lr:.2e}",
            f"{plan.flops:.2e}",
        ) + ((f"{plan.gpu_hours(gpu, mfu):.3g}",) if gpu is not None else ()) + ((extra[1][index],) if extra else ()))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    if plans:
        lines.append(f"N = {plans[0].param_basis} parameters (the size axis of the analysis too); FLOPs = tokens x "
                     "(6 x matmul params + attention)" + (f"; GPU-hours per run at {mfu:.0%} MFU of {gpu_label}'s "
                                                          "dense bf16 peak." if gpu is not None else "."))
    return "\n".join(lines)
