"""Dispersion losses (docs/dispersion.md).

Pure torch: no Ray, no MLflow, no transformers. Every loss maps hidden states
z of shape [B, T, F] (batch, tokens, features) to one scalar that training adds
to the cross-entropy as `CE + lambda * loss`.

Two families:

* Token variants (the paper's): a loss per sequence over pairs of its tokens,
  then the mean over the batch. `angular_spread` is the paper's main loss.
* Across-batch variants (Wang & He 2025, "Diffuse and Disperse: Image
  Generation with Representation Regularization", arXiv 2506.09027): each
  sequence is one sample and the loss is over pairs of samples of the batch.
  A sequence becomes one vector by `pooling`: "flatten" (default; the
  [T, F] block flattened to T*F numbers, as their Algorithm 1 flattens a whole
  feature map) or "mean" (mean over tokens, F numbers).

Sequences longer than `max_tokens` are reduced to a random subset of
`max_tokens` token positions, one subset for the whole batch (and, in
`dispersion_over_layers`, for every layer), drawn from `generator` when given.

Computation runs in float32 (float64 for float64 input) with autocast off:
arccos and logsumexp in bf16 are too coarse for a loss whose range is ~0.1.
The loss does not check z for NaN/Inf (that would force a device sync every
step); a non-finite z gives a non-finite loss, which the trainer reports.

"The reference" here means the authors' code: the LM-Dispersion repository and the PyPI package
`embedding-condensation` 2.0 (docs/README.md#the-reference).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from scaling.errors import ConfigError
from scaling.dispersion_spec import BATCH_VARIANTS, POOLINGS, TOKEN_VARIANTS, VARIANTS
from scaling.names import PARAM_LAYERS, PARAM_VARIANT

L2_REPEL_SQUARE_WEIGHT = 0.1
"""Weight of mean(z^2) in `l2_repel` (reference value): stops it winning by blowing up norms."""

STD_FLOOR = 1e-5
"""Floor on the standard deviation in the decorrelation variants: a constant token
(or feature) would otherwise divide by zero. Equal to the reference wherever std > 1e-5."""


# --------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DispersionOptions:
    """The knobs of every variant, validated once."""

    variant: str = "angular_spread"
    """One of `VARIANTS`."""
    tau: float = 1.0
    """Temperature: finite, > 0."""
    clamp_threshold: float = 0.1
    """t: cosines are clamped to [-1 + t, 1 - t] (straight-through) before arccos; 0 < t < 1."""
    eps: float = 0.01
    """Added to norms before dividing, inside the logsumexp of the log-mean-exp variants
    (a constant shift, as in the reference), and inside log2 in `perplexity_entropy`; >= 0."""
    max_tokens: int | None = 256
    """Longer sequences use a random subset of this many token positions; None = all."""
    margin: float = 0.5
    """Margin of `orthogonalization` (on D in [0, 1]) and `hinge` (on the scaled squared distance)."""
    pooling: str = "flatten"
    """Across-batch variants only: one of `POOLINGS`."""

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ConfigError(
                f"{PARAM_VARIANT}={self.variant!r} is not a dispersion variant; "
                f"use one of {', '.join(VARIANTS)}"
            )
        _require_real("tau", self.tau, "a finite number > 0, e.g. 1.0")
        if not self.tau > 0:
            raise ConfigError(f"dispersion.tau={self.tau!r} must be > 0, e.g. 1.0")
        _require_real("clamp_threshold", self.clamp_threshold, "a number in (0, 1), e.g. 0.1")
        if not 0 < self.clamp_threshold < 1:
            raise ConfigError(
                f"dispersion.clamp_threshold={self.clamp_threshold!r} must lie in (0, 1) "
                "(arccos has an infinite slope at +-1); use e.g. 0.1 (GPT-2) or 0.25 (Qwen3)"
            )
        _require_real("eps", self.eps, "a finite number >= 0, e.g. 0.01")
        if self.eps < 0:
            raise ConfigError(f"dispersion.eps={self.eps!r} must be >= 0, e.g. 0.01")
        if self.variant == "perplexity_entropy" and self.eps == 0:
            raise ConfigError(
                "dispersion.eps=0 makes perplexity_entropy take log2(0) on the excluded "
                "diagonal; use eps > 0, e.g. 0.01"
            )
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool)
            or not isinstance(self.max_tokens, numbers.Integral)
            or self.max_tokens < 2
        ):
            raise ConfigError(
                f"dispersion.max_tokens={self.max_tokens!r} must be an integer >= 2 "
                "or None (use every token); the reference uses 256"
            )
        _require_real("margin", self.margin, "a finite number, e.g. 0.5")
        if self.pooling not in POOLINGS:
            raise ConfigError(
                f"dispersion.pooling={self.pooling!r} is not valid; use one of {', '.join(POOLINGS)}"
            )


def _require_real(field: str, value: object, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"dispersion.{field}={value!r} is not valid; use {fix}")


# --------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------


def dispersion_loss(
    z: torch.Tensor,
    variant: str = "angular_spread",
    *,
    tau: float = 1.0,
    clamp_threshold: float = 0.1,
    eps: float = 0.01,
    max_tokens: int | None = 256,
    margin: float = 0.5,
    pooling: str = "flatten",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The dispersion loss of one layer's hidden states `z` [B, T, F], a scalar.

    See the module docstring and the per-variant `compute_*` functions for the
    formulas. Raises `ConfigError` for an unknown variant, a bad option or a bad shape.
    """
    options = DispersionOptions(variant, tau, clamp_threshold, eps, max_tokens, margin, pooling)
    _check_hidden_state(z, "z", options)
    positions = draw_token_subset(z.shape[1], options.max_tokens, generator, device=z.device)
    if positions is not None:
        z = z.index_select(1, positions)
    return compute_group_losses(z.unsqueeze(0), options).squeeze(0)


def dispersion_over_layers(
    hidden_states: Sequence[torch.Tensor],
    layers: Sequence[int],
    variant: str = "angular_spread",
    *,
    tau: float = 1.0,
    clamp_threshold: float = 0.1,
    eps: float = 0.01,
    max_tokens: int | None = 256,
    margin: float = 0.5,
    pooling: str = "flatten",
    generator: torch.Generator | None = None,
    subset_per_layer: bool = False,
) -> torch.Tensor:
    """Mean of `dispersion_loss` over `hidden_states[i] for i in layers`, a scalar.

    `layers` are indices into `hidden_states` (as `resolve_layers` returns them). The
    selected layers are stacked and computed in one batched call rather than a Python
    loop. One token subset serves every layer, or with `subset_per_layer` each layer
    draws its own (as the reference does, one draw per layer call). Equal to the mean
    of per-layer `dispersion_loss` calls given the same token subsets.
    """
    opts = DispersionOptions(variant, tau, clamp_threshold, eps, max_tokens, margin, pooling)
    layers = tuple(layers)
    if not layers:
        raise ConfigError(f"{PARAM_LAYERS}: no layer selected; pick at least one, e.g. 'last'")
    n = len(hidden_states)
    for i in layers:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= i < n:
            raise ConfigError(
                f"{PARAM_LAYERS}: index {i!r} is not in 0..{n - 1} (indices into the "
                f"{n} hidden states); resolve the spec with resolve_layers(spec, {n - 1})"
            )
    first = hidden_states[layers[0]]
    for i in layers:
        _check_hidden_state(hidden_states[i], f"hidden_states[{i}]", opts)
        if hidden_states[i].shape != first.shape:
            raise ConfigError(
                f"hidden_states[{i}] has shape {tuple(hidden_states[i].shape)} but "
                f"hidden_states[{layers[0]}] has {tuple(first.shape)}; all selected layers "
                "must share [B, T, F]"
            )
    shared = draw_token_subset(first.shape[1], opts.max_tokens, generator, device=first.device)
    selected = []
    for index, i in enumerate(layers):
        positions = shared
        if subset_per_layer and shared is not None and index > 0:
            positions = draw_token_subset(first.shape[1], opts.max_tokens, generator, device=first.device)
        # Subset before stacking: one copy of max_tokens positions per layer, not two of T.
        selected.append(hidden_states[i] if positions is None else hidden_states[i].index_select(1, positions))
    return compute_group_losses(torch.stack(selected), opts).mean()


def draw_token_subset(
    seq_len: int,
    max_tokens: int | None,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Sorted random token positions (max_tokens of seq_len), or None if all are used.

    Drawn with `torch.randperm` on the generator's device (CPU without one), so a
    seeded generator gives the same subset every time.
    """
    if max_tokens is None or seq_len <= max_tokens:
        return None
    draw_device = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(seq_len, generator=generator, device=draw_device)
    return perm[:max_tokens].sort().values.to(device)


def compute_group_losses(z: torch.Tensor, options: DispersionOptions) -> torch.Tensor:
    """Loss per group of z [G, B, T, F] (a group = one layer's batch), shape [G].

    Token variants: mean over the B sequences of the per-sequence loss.
    Across-batch variants: one loss over the B samples of the group.
    No token subsetting here; callers do it.
    """
    dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    with torch.autocast(device_type=z.device.type, enabled=False):
        z = z.to(dtype)
        g, b, t, f = z.shape
        if options.variant in TOKEN_VARIANTS:
            per_sequence = _TOKEN_KERNELS[options.variant](z.reshape(g * b, t, f), options)
            return per_sequence.reshape(g, b).mean(dim=1)
        samples = z.flatten(2) if options.pooling == "flatten" else z.mean(dim=2)
        return _BATCH_KERNELS[options.variant](samples, options)


# --------------------------------------------------------------------------------------
# Token variants: z [N, T, F] -> per-sequence loss [N]
# --------------------------------------------------------------------------------------


def compute_angular_distance(z: torch.Tensor, clamp_threshold: float, eps: float) -> torch.Tensor:
    """D = arccos(clamped cos) / pi in [0, 1], shape [N, T, T].

    z^ = z / (||z|| + eps); cos = z^ z^T. The clamp to [-1 + t, 1 - t] is
    straight-through (`cos + (clamp(cos) - cos).detach()`): the forward value is
    clamped, the gradient is that of arccos at the clamped value, so it stays
    finite even for identical tokens.
    """
    unit = z / (z.norm(dim=-1, keepdim=True) + eps)
    cos = unit @ unit.mT
    bound = 1.0 - clamp_threshold
    cos = cos + (cos.clamp(-bound, bound) - cos).detach()
    return torch.arccos(cos) / math.pi


def compute_angular_spread(z: torch.Tensor, options: DispersionOptions) -> torch.Tensor:
    """The paper's loss: logsumexp_{i != j}(-D_ij / tau + eps) - log(T (T - 1)).

    A log-mean-exp over distinct pairs, shifted by eps (the reference's constant):
    if every D_ij = d then L = -d / tau + eps exactly; orthogonal tokens (cos = 0,
    D = 1/2) give -0.5 / tau + eps = -0.49 at the defaults.
    """
    distance = compute_angular_distance(z, options.clamp_threshold, options.eps)
    return _offdiagonal_log_mean_exp(-distance / options.tau + options.eps)


def compute_orthogonalization(z: torch.Tensor, options: DispersionOptions) -> torch.Tensor:
    """Mean over i != j of max(0, margin - D_ij)^2, D the clamped angular distance."""
    distance = compute_angular_distance(z, options.clamp_threshold, options.eps)
    return _offdiagonal_mean(torch.relu(options.margin - distance).square())


def compute_decorrelation(z: torch.Tensor, options: DispersionOptions) -> torch.Tensor:
    """Reference decorrelation: tokens x tokens.

    Standardise each token over its F features (mean, unbiased std), form the
    T x T matrix M = Z Z^T / (F - 1) (the correlation between tokens), and take
    the mean of M_ij^2 over i != j.
    """
    f = z.shape[-1]
    standard = _standardise(z, dim=-1)
    return _offdiagonal_mean((standard @ standard.mT / (f - 1)).square())


def compute_decorrelation_features(z: torch.Tensor, options: DispersionOptions) -> torch.Tensor:
    """The paper's notation read literally: features x features.

    Standardise each feature over the T tokens (mean, unbiased std), form the
    F x F correlation C = Z^T Z / (T - 1), and take the mean of C_ab^2 over a != b.
    Uses ||Z^T Z||_F = ||Z Z^T||_F to work in the smaller of T x T and F x F.
    """
    t, f = z.shape[-2], z.shape[-1]
    standard = _standardise(z, dim=-2)
    if f <= t:
        return _offdiagonal_mean((standard.mT @ standard / (t - 1)).square())
    total = (standard @ standard.mT).square().sum(dim=(-2, -1))
    diagonal = standard.square().sum(dim=-2).square().sum(dim=-1)
    return (total - diagonal) / ((t - 1) ** 2 * f * (f - 1))


def compute_l2_repel(z: torch.Tensor, options: DispersionOptions) -> torch.Tensor:
    """logsumexp over all T^2 pairs of (-||z_i - z_j||^2 / tau + eps) - log T^2 + 0.1 mean(z^2).

    The diagonal (distance 0) is included, as in the reference; mean(z^2) is over
    the tokens the loss sees (the max_tokens subset) and every feature.
    """
    t = z.shape[-2]
    logits = -_squared_distances(z) / options.tau + options.eps
    spread = torch.logsumexp(logits.flatten(-2), dim=-1) - math.log(t * t)
    return spread + L2_REPEL_SQUARE_WEIGHT * z.square().mean(dim=(-2, -1))


def compute_perplexity_entropy(z: torch.Tensor, options: DispersionOptions) -> torch.Tensor:
    """Negative entropy of neighbour distributions: mean_i sum_j p log2(p + eps).

    p_{j|i} = softmax_j(-||z_i - z_j||^2 / tau) with j = i excluded (p_{i|i} = 0).
    """
    eye = _eye(z.shape[-2], z.device)
    logits = (-_squared_distances(z) / options.tau).masked_fill(eye, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    return (p * torch.log2(p + options.eps)).sum(dim=-1).mean(dim=-1)


# --------------------------------------------------------------------------------------
# Across-batch variants (Wang & He 2025): samples [G, B, D] -> loss per group [G]
# --------------------------------------------------------------------------------------


def compute_infonce_l2(v: torch.Tensor, options: DispersionOptions) -> torch.Tensor:
    """log( 1/B^2 sum_{i,j} exp(-||v_i - v_j||^2 / (D tau)) ), diagonal included.

    Wang & He's Algorithm 1 ("InfoNCE-L2"): squared distance divided by the
    dimension D, full B x B matrix (diagonal distance 0), log of the mean of exp.
    """
    b = v.shape[-2]
    logits = -_squared_distances(v) / (v.shape[-1] * options.tau)
    return torch.logsumexp(logits.flatten(-2), dim=-1) - math.log(b * b)


def compute_infonce_cosine(v: torch.Tensor, options: DispersionOptions) -> torch.Tensor:
    """log( 1/B^2 sum_{i,j} exp(cos(v_i, v_j) / tau) ), diagonal included.

    Wang & He's InfoNCE with dissimilarity D = -cosine; v^ = v / (||v|| + eps).
    """
    b = v.shape[-2]
    unit = v / (v.norm(dim=-1, keepdim=True) + options.eps)
    logits = unit @ unit.mT / options.tau
    return torch.logsumexp(logits.flatten(-2), dim=-1) - math.log(b * b)


def compute_hinge(v: torch.Tensor, options: DispersionOptions) -> torch.Tensor:
    """Mean over i != j of max(0, margin - ||v_i - v_j||^2 / D)^2 (Wang & He's hinge).

    The squared distance is divided by the dimension D as in their InfoNCE-L2,
    so one margin suits both poolings. The diagonal (a constant margin^2) is left out.
    """
    distance = _squared_distances(v) / v.shape[-1]
    return _offdiagonal_mean(torch.relu(options.margin - distance).square())


def compute_covariance(v: torch.Tensor, options: DispersionOptions) -> torch.Tensor:
    """Sum of squared off-diagonal entries of the D x D covariance of the l2-normalised samples.

    Wang & He's covariance variant: v^ = v / (||v|| + eps), C = (v^ - mean)^T (v^ - mean) / (B - 1),
    loss = sum_{a != b} C_ab^2. Computed through the B x B Gram matrix
    (||C||_F = ||V V^T||_F / (B - 1)), so a flattened sample of T*F numbers is cheap.
    """
    b = v.shape[-2]
    unit = v / (v.norm(dim=-1, keepdim=True) + options.eps)
    centred = unit - unit.mean(dim=-2, keepdim=True)
    total = (centred @ centred.mT).square().sum(dim=(-2, -1))
    diagonal = centred.square().sum(dim=-2).square().sum(dim=-1)
    return (total - diagonal) / (b - 1) ** 2


_TOKEN_KERNELS = {
    "angular_spread": compute_angular_spread,
    "decorrelation": compute_decorrelation,
    "decorrelation_features": compute_decorrelation_features,
    "l2_repel": compute_l2_repel,
    "orthogonalization": compute_orthogonalization,
    "perplexity_entropy": compute_perplexity_entropy,
}
_BATCH_KERNELS = {
    "infonce_l2": compute_infonce_l2,
    "infonce_cosine": compute_infonce_cosine,
    "hinge": compute_hinge,
    "covariance": compute_covariance,
}


# --------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------


def _eye(n: int, device: torch.device) -> torch.Tensor:
    return torch.eye(n, dtype=torch.bool, device=device)


def _offdiagonal_log_mean_exp(logits: torch.Tensor) -> torch.Tensor:
    """log of the mean of exp over the off-diagonal entries of [..., n, n]."""
    n = logits.shape[-1]
    masked = logits.masked_fill(_eye(n, logits.device), float("-inf"))
    return torch.logsumexp(masked.flatten(-2), dim=-1) - math.log(n * (n - 1))


def _offdiagonal_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of the off-diagonal entries of [..., n, n]."""
    n = values.shape[-1]
    masked = values.masked_fill(_eye(n, values.device), 0.0)
    return masked.sum(dim=(-2, -1)) / (n * (n - 1))


def _squared_distances(x: torch.Tensor) -> torch.Tensor:
    """||x_i - x_j||^2 over the rows of [..., n, d], exact zeros on the diagonal.

    Rows are centred first: distances do not change, and the expansion
    |a|^2 + |b|^2 - 2ab loses far less to cancellation on hidden states whose
    norms are in the hundreds. No sqrt, so the gradient at distance 0 is finite.
    """
    centred = x - x.mean(dim=-2, keepdim=True)
    sq = centred.square().sum(dim=-1)
    d2 = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2 * (centred @ centred.mT)).clamp_min(0)
    return d2.masked_fill(_eye(x.shape[-2], x.device), 0.0)


def _standardise(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(x - mean) / std along `dim`, unbiased std floored at STD_FLOOR (see there)."""
    centred = x - x.mean(dim=dim, keepdim=True)
    variance = centred.square().sum(dim=dim, keepdim=True) / (x.shape[dim] - 1)
    return centred / variance.clamp_min(STD_FLOOR**2).sqrt()


def _check_hidden_state(z: object, name: str, options: DispersionOptions) -> None:
    if not isinstance(z, torch.Tensor):
        raise ConfigError(f"{name} is a {type(z).__name__}; pass a torch.Tensor of shape [B, T, F]")
    if z.dim() != 3:
        raise ConfigError(
            f"{name} has shape {tuple(z.shape)}; dispersion needs [B, T, F] "
            "(batch, tokens, features): add a batch axis with z.unsqueeze(0)"
        )
    if not z.is_floating_point():
        raise ConfigError(f"{name} has dtype {z.dtype}; pass floating-point hidden states")
    b, t, f = z.shape
    if t < 2:
        raise ConfigError(f"{name} has T={t} tokens; dispersion needs pairs of tokens, T >= 2")
    if f < 2 and options.variant in ("decorrelation", "decorrelation_features"):
        raise ConfigError(f"{name} has F={f} features; {options.variant} needs F >= 2")
    if b < 2 and options.variant in BATCH_VARIANTS:
        raise ConfigError(
            f"{name} has batch size {b}; {options.variant} disperses across the batch and "
            "needs B >= 2 sequences per step (or use a token variant such as angular_spread)"
        )
