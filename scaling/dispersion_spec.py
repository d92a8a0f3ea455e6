"""What a dispersion arm may ask for: loss variant names and layer selections.

Pure Python (no torch), so study files validate, and dry runs plan, without importing the
training stack. `scaling.dispersion` computes the losses these names select.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence, Union

from scaling.errors import ConfigError
from scaling.names import PARAM_LAYERS

TOKEN_VARIANTS = (
    "angular_spread",
    "decorrelation",
    "decorrelation_features",
    "l2_repel",
    "orthogonalization",
    "perplexity_entropy",
)
"""Variants computed per sequence over its tokens, then averaged over the batch."""

BATCH_VARIANTS = ("infonce_l2", "infonce_cosine", "hinge", "covariance")
"""Wang & He 2025 variants computed over the samples (sequences) of a batch."""

VARIANTS = TOKEN_VARIANTS + BATCH_VARIANTS
"""Every valid `variant` name."""

POOLINGS = ("flatten", "mean")
"""How an across-batch variant reduces a [T, F] sequence to one sample vector."""

LAYER_PRESETS = ("all", "last", "early_half", "late_half")
"""Named layer selections accepted by `resolve_layers`."""

LayerSpec = Union[str, int, Sequence[int]]


@dataclass(frozen=True)
class _ParsedLayerSpec:
    preset: str | None = None
    blocks: tuple[int, ...] | None = None
    fraction: tuple[Fraction, Fraction] | None = None


def validate_layer_spec(spec: LayerSpec) -> None:
    """Check the syntax of a layer selection without knowing the model's depth.

    Valid specs:

    * "all", "last", "early_half", "late_half" (see `resolve_layers`);
    * block indices, 0-based over the model's n blocks: an int, a list/tuple of
      ints, or a string "0,1,5" (what Optuna categoricals need); non-negative,
      no duplicates;
    * a depth-fraction range "start:end" with 0 <= start < end <= 1 (decimals or
      ratios like "1/3:2/3").

    Raises `ConfigError` naming the spec and the fix.
    """
    _parse_layer_spec(spec)


def resolve_layers(spec: LayerSpec, n_blocks: int) -> tuple[int, ...]:
    """Indices into `hidden_states` (length n_blocks + 1, index 0 = embedding output).

    * "all": every block output, 1..n (the last is the final-norm output, which is
      what Hugging Face returns last); the embedding output is never selected.
    * "last": (n,).
    * "early_half": blocks 1..floor(n/2); "late_half": floor(n/2)+1..n.
    * Block indices b in 0..n-1 map to hidden_states[b + 1] (block b's output).
    * "start:end": every block b whose depth fraction (b + 1) / n lies in the
      half-open range (start, end], compared exactly as fractions. So "0:0.5"
      equals "early_half", "0.5:1" equals "late_half", "0:1" equals "all".

    Returns a sorted, non-empty tuple; raises `ConfigError` for a malformed spec, an
    index beyond the depth or an empty selection.
    """
    if isinstance(n_blocks, bool) or not isinstance(n_blocks, numbers.Integral) or n_blocks < 1:
        raise ConfigError(f"n_blocks={n_blocks!r} must be an integer >= 1 (the model's block count)")
    parsed = _parse_layer_spec(spec)
    half = n_blocks // 2
    if parsed.preset == "all":
        chosen = range(1, n_blocks + 1)
    elif parsed.preset == "last":
        chosen = range(n_blocks, n_blocks + 1)
    elif parsed.preset == "early_half":
        chosen = range(1, half + 1)
    elif parsed.preset == "late_half":
        chosen = range(half + 1, n_blocks + 1)
    elif parsed.blocks is not None:
        too_deep = [b for b in parsed.blocks if b >= n_blocks]
        if too_deep:
            raise ConfigError(
                f"{PARAM_LAYERS}={spec!r}: block index {too_deep[0]} is beyond the model's "
                f"{n_blocks} blocks; block indices run 0..{n_blocks - 1}"
            )
        chosen = [b + 1 for b in parsed.blocks]
    else:
        assert parsed.fraction is not None
        start, end = parsed.fraction
        chosen = [b + 1 for b in range(n_blocks) if start < Fraction(b + 1, n_blocks) <= end]
    layers = tuple(sorted(chosen))
    if not layers:
        raise ConfigError(
            f"{PARAM_LAYERS}={spec!r} selects no block of a {n_blocks}-block model; "
            f"widen it (depth fractions are (b + 1) / {n_blocks}) or use e.g. 'last'"
        )
    return layers


def _parse_layer_spec(spec: LayerSpec) -> _ParsedLayerSpec:
    fix = (
        f"use one of {', '.join(LAYER_PRESETS)}, block indices like '0,1,5' or [0, 1, 5], "
        "or a depth-fraction range like '0.5:1.0'"
    )
    if isinstance(spec, str):
        text = spec.strip()
        if text in LAYER_PRESETS:
            return _ParsedLayerSpec(preset=text)
        if ":" in text:
            return _ParsedLayerSpec(fraction=_parse_fraction_range(spec, text))
        parts = [p.strip() for p in text.split(",")]
        if not all(p.isdigit() for p in parts):
            raise ConfigError(f"{PARAM_LAYERS}={spec!r} is not a layer selection; {fix}")
        return _ParsedLayerSpec(blocks=_check_blocks(spec, [int(p) for p in parts]))
    if isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
        return _ParsedLayerSpec(blocks=_check_blocks(spec, [int(spec)]))
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(f"{PARAM_LAYERS}={spec!r} selects no layer; {fix}")
        if not all(isinstance(b, numbers.Integral) and not isinstance(b, bool) for b in spec):
            raise ConfigError(f"{PARAM_LAYERS}={spec!r}: block indices must be integers; {fix}")
        return _ParsedLayerSpec(blocks=_check_blocks(spec, [int(b) for b in spec]))
    raise ConfigError(f"{PARAM_LAYERS}={spec!r} is not a layer selection; {fix}")


def _check_blocks(spec: object, blocks: list[int]) -> tuple[int, ...]:
    if any(b < 0 for b in blocks):
        raise ConfigError(
            f"{PARAM_LAYERS}={spec!r}: block indices are 0-based and non-negative; "
            "use 'last' for the final block"
        )
    if len(set(blocks)) != len(blocks):
        raise ConfigError(f"{PARAM_LAYERS}={spec!r} repeats a block index; list each block once")
    return tuple(sorted(blocks))


def _parse_fraction_range(spec: object, text: str) -> tuple[Fraction, Fraction]:
    pieces = text.split(":")
    fix = "write 'start:end' with 0 <= start < end <= 1, e.g. '0.5:1.0'"
    if len(pieces) != 2:
        raise ConfigError(f"{PARAM_LAYERS}={spec!r} is not a depth-fraction range; {fix}")
    try:
        start, end = (Fraction(p.strip()) for p in pieces)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(f"{PARAM_LAYERS}={spec!r} is not a depth-fraction range; {fix}") from None
    if not 0 <= start < end <= 1:
        raise ConfigError(f"{PARAM_LAYERS}={spec!r} is out of range; {fix}")
    return start, end
