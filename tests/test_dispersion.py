"""Dispersion losses against loopy float64 references, their invariants, and layer selection."""

from __future__ import annotations

import math

import pytest
import torch

from scaling.dispersion import (
    BATCH_VARIANTS,
    TOKEN_VARIANTS,
    VARIANTS,
    dispersion_loss,
    dispersion_over_layers,
    draw_token_subset,
)
from scaling.dispersion_spec import resolve_layers, validate_layer_spec
from scaling.errors import ConfigError

# --------------------------------------------------------------------------------------
# Independent references: one pair at a time, float64, no batched tricks.
# --------------------------------------------------------------------------------------


def _st_angle(zi, zj, t, eps):
    """Clamped (straight-through) angular distance of two token vectors, in [0, 1]."""
    ui = zi / (torch.sqrt((zi * zi).sum()) + eps)
    uj = zj / (torch.sqrt((zj * zj).sum()) + eps)
    c = (ui * uj).sum()
    c = c + (torch.clamp(c, -1 + t, 1 - t) - c).detach()
    return torch.acos(c) / math.pi


def _sqdist(a, b):
    return ((a - b) ** 2).sum()


def _log_mean_exp(terms):
    return torch.log(sum(torch.exp(x) for x in terms) / len(terms))


def ref_angular_spread(seq, tau, t, eps, **_):
    n = seq.shape[0]
    terms = [-_st_angle(seq[i], seq[j], t, eps) / tau + eps for i in range(n) for j in range(n) if i != j]
    return _log_mean_exp(terms)


def ref_orthogonalization(seq, t, eps, margin, **_):
    n = seq.shape[0]
    terms = [
        torch.clamp(margin - _st_angle(seq[i], seq[j], t, eps), min=0) ** 2
        for i in range(n)
        for j in range(n)
        if i != j
    ]
    return sum(terms) / len(terms)


def _standardise_rows(rows):
    return [(r - r.mean()) / r.std(unbiased=True) for r in rows]


def ref_decorrelation(seq, **_):
    n, f = seq.shape
    rows = _standardise_rows(list(seq))
    terms = [((rows[i] * rows[j]).sum() / (f - 1)) ** 2 for i in range(n) for j in range(n) if i != j]
    return sum(terms) / len(terms)


def ref_decorrelation_features(seq, **_):
    n, f = seq.shape
    cols = _standardise_rows(list(seq.T))
    terms = [((cols[a] * cols[b]).sum() / (n - 1)) ** 2 for a in range(f) for b in range(f) if a != b]
    return sum(terms) / len(terms)


def ref_l2_repel(seq, tau, eps, **_):
    n = seq.shape[0]
    terms = [-_sqdist(seq[i], seq[j]) / tau + eps for i in range(n) for j in range(n)]
    return _log_mean_exp(terms) + 0.1 * (seq**2).mean()


def ref_perplexity_entropy(seq, tau, eps, **_):
    n = seq.shape[0]
    total = 0
    for i in range(n):
        weights = [torch.exp(-_sqdist(seq[i], seq[j]) / tau) for j in range(n) if j != i]
        norm = sum(weights)
        total = total + sum((w / norm) * torch.log2(w / norm + eps) for w in weights)
    return total / n


def _samples(z, pooling):
    return [s.reshape(-1) if pooling == "flatten" else s.mean(dim=0) for s in z]


def ref_infonce_l2(z, tau, pooling, **_):
    v = _samples(z, pooling)
    d = v[0].numel()
    return _log_mean_exp([-_sqdist(a, b) / (d * tau) for a in v for b in v])


def ref_infonce_cosine(z, tau, eps, pooling, **_):
    v = _samples(z, pooling)
    unit = [x / (torch.sqrt((x * x).sum()) + eps) for x in v]
    return _log_mean_exp([(a * b).sum() / tau for a in unit for b in unit])


def ref_hinge(z, margin, pooling, **_):
    v = _samples(z, pooling)
    d = v[0].numel()
    terms = [
        torch.clamp(margin - _sqdist(v[i], v[j]) / d, min=0) ** 2
        for i in range(len(v))
        for j in range(len(v))
        if i != j
    ]
    return sum(terms) / len(terms)


def ref_covariance(z, eps, pooling, **_):
    v = _samples(z, pooling)
    b, d = len(v), v[0].numel()
    unit = [x / (torch.sqrt((x * x).sum()) + eps) for x in v]
    mu = sum(unit) / b
    total = 0
    for p in range(d):
        for q in range(d):
            if p != q:
                cov = sum((u[p] - mu[p]) * (u[q] - mu[q]) for u in unit) / (b - 1)
                total = total + cov**2
    return total


TOKEN_REFERENCES = {
    "angular_spread": ref_angular_spread,
    "decorrelation": ref_decorrelation,
    "decorrelation_features": ref_decorrelation_features,
    "l2_repel": ref_l2_repel,
    "orthogonalization": ref_orthogonalization,
    "perplexity_entropy": ref_perplexity_entropy,
}
BATCH_REFERENCES = {
    "infonce_l2": ref_infonce_l2,
    "infonce_cosine": ref_infonce_cosine,
    "hinge": ref_hinge,
    "covariance": ref_covariance,
}


def reference_loss(z, variant, *, tau=1.0, clamp_threshold=0.1, eps=0.01, margin=0.5, pooling="flatten"):
    kw = dict(tau=tau, t=clamp_threshold, eps=eps, margin=margin, pooling=pooling)
    if variant in TOKEN_REFERENCES:
        return sum(TOKEN_REFERENCES[variant](seq, **kw) for seq in z) / z.shape[0]
    return BATCH_REFERENCES[variant](z, **kw)


def test_every_variant_has_a_reference():
    assert set(TOKEN_REFERENCES) | set(BATCH_REFERENCES) == set(VARIANTS)
    assert set(TOKEN_VARIANTS) == set(TOKEN_REFERENCES)
    assert set(BATCH_VARIANTS) == set(BATCH_REFERENCES)


# Options that make every branch do something (the hinge margin is above the typical
# scaled distance of ~2; tokens are close enough that the clamp bites for some pairs).
CASES = [
    dict(tau=1.0, clamp_threshold=0.1, eps=0.01, margin=0.5),
    dict(tau=0.3, clamp_threshold=0.25, eps=0.05, margin=3.0),
]


def _hidden(b=3, t=6, f=5, seed=0, scale=0.5):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(b, 1, f, generator=g, dtype=torch.float64)
    # A shared direction per sequence plus noise: cosines from ~0 to ~0.99, so some are clamped.
    noise = torch.randn(b, t, f, generator=g, dtype=torch.float64) * torch.linspace(0.05, 1.5, t, dtype=torch.float64)[:, None]
    return (scale * (base + noise)).requires_grad_(True)


@pytest.mark.parametrize("options", CASES, ids=["defaults", "other"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_value_and_gradient_match_reference(variant, options):
    z = _hidden()
    got = dispersion_loss(z, variant, max_tokens=None, **options)
    want = reference_loss(z, variant, **options)
    (got_grad,) = torch.autograd.grad(got, z)
    (want_grad,) = torch.autograd.grad(want, z)
    assert got.dim() == 0 and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-7, atol=1e-10)
    assert got_grad.abs().sum() > 0  # the reference check is not vacuous


@pytest.mark.parametrize("variant", BATCH_VARIANTS)
def test_mean_pooling_matches_reference(variant):
    z = _hidden(b=4)
    got = dispersion_loss(z, variant, pooling="mean", margin=3.0, max_tokens=None)
    want = reference_loss(z, variant, pooling="mean", margin=3.0)
    (got_grad,) = torch.autograd.grad(got, z)
    (want_grad,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-7, atol=1e-10)


def test_decorrelation_features_gram_branch_matches_reference():
    # F > T takes the T x T Gram route; F <= T the direct F x F one. Both against the loops.
    for t, f in ((4, 9), (9, 4)):
        z = _hidden(b=2, t=t, f=f, seed=3)
        got = dispersion_loss(z, "decorrelation_features", max_tokens=None)
        want = reference_loss(z, "decorrelation_features")
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------
# Invariants
# --------------------------------------------------------------------------------------


def test_equal_distances_give_minus_d_over_tau_plus_eps():
    # Regular simplex: every pair at cos = -1/(T-1); eps=0 keeps the cosine exact.
    t = 5
    simplex = torch.eye(t, dtype=torch.float64) - 1.0 / t
    d = math.acos(-1 / (t - 1)) / math.pi
    for tau in (1.0, 0.4):
        loss = dispersion_loss(simplex.unsqueeze(0), tau=tau, eps=0.0)
        assert loss.item() == pytest.approx(-d / tau, abs=1e-12)
    # With eps > 0 the constant shift is +eps (identical tokens: every cosine clamped to 1 - t).
    same = torch.ones(2, 7, 4, dtype=torch.float64) * 3.0
    d_clamped = math.acos(0.9) / math.pi
    loss = dispersion_loss(same, tau=0.5, eps=0.01)
    assert loss.item() == pytest.approx(-d_clamped / 0.5 + 0.01, abs=1e-12)


def test_orthogonal_tokens_give_minus_half_plus_eps():
    # cos = 0 exactly whatever eps is, so D = 1/2 and L = -0.5 / tau + eps (-0.49 at the defaults).
    z = torch.eye(8, 16, dtype=torch.float64).unsqueeze(0) * 2.5
    assert dispersion_loss(z).item() == pytest.approx(-0.49, abs=1e-12)
    assert dispersion_loss(z, eps=0.0).item() == pytest.approx(-0.5, abs=1e-12)
    assert dispersion_loss(z, tau=2.0, eps=0.0).item() == pytest.approx(-0.25, abs=1e-12)


def test_more_spread_tokens_have_lower_angular_loss():
    g = torch.Generator().manual_seed(1)
    spread = torch.randn(1, 32, 64, generator=g)
    condensed = spread * 0.2 + torch.randn(1, 1, 64, generator=g)
    assert dispersion_loss(spread) < dispersion_loss(condensed)


@pytest.mark.parametrize("variant", ["angular_spread", "orthogonalization"])
def test_gradient_is_finite_exactly_at_the_clamp_boundaries(variant):
    for cos in (0.9, -0.9):
        z = torch.tensor([[[1.0, 0.0], [cos, math.sqrt(1 - cos * cos)]]], dtype=torch.float64)
        z.requires_grad_(True)
        (grad,) = torch.autograd.grad(dispersion_loss(z, variant, eps=0.0, margin=0.9), z)
        assert torch.isfinite(grad).all()


def test_straight_through_clamp_still_pushes_clamped_pairs_apart():
    # cos = 0.99 is clamped to 0.9 in the forward pass; the gradient must still act.
    theta = math.acos(0.99)
    z = torch.tensor([[[1.0, 0.0], [math.cos(theta), math.sin(theta)]]], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(dispersion_loss(z, eps=0.0), z)
    tangent = torch.tensor([-math.sin(theta), math.cos(theta)], dtype=torch.float64)
    assert (grad[0, 1] @ tangent).item() < 0  # moving token 1 away from token 0 lowers the loss


@pytest.mark.parametrize("variant", VARIANTS)
def test_gradient_is_finite_for_identical_and_constant_tokens(variant):
    for value in (torch.randn(1, 1, 6).expand(3, 5, 6), torch.full((3, 5, 6), 0.7)):
        z = value.clone().requires_grad_(True)
        loss = dispersion_loss(z, variant)
        (grad,) = torch.autograd.grad(loss, z)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_low_precision_input_is_computed_in_float32():
    z = _hidden(b=2, t=6, f=8).detach()
    want = dispersion_loss(z)
    got = dispersion_loss(z.to(torch.bfloat16))
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(want.item(), abs=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = dispersion_loss(z.float())
    assert inside.dtype == torch.float32
    assert inside.item() == pytest.approx(want.item(), abs=1e-5)


# --------------------------------------------------------------------------------------
# Token subsets and layers
# --------------------------------------------------------------------------------------


def test_token_subset_is_deterministic_sorted_and_sized():
    a = draw_token_subset(100, 16, torch.Generator().manual_seed(7))
    b = draw_token_subset(100, 16, torch.Generator().manual_seed(7))
    c = draw_token_subset(100, 16, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.numel() == 16 and a.unique().numel() == 16 and torch.equal(a, a.sort().values)
    assert draw_token_subset(16, 16) is None and draw_token_subset(16, None) is None


@pytest.mark.parametrize("variant", ["angular_spread", "infonce_l2"])
def test_max_tokens_uses_one_subset_for_the_whole_batch(variant):
    z = torch.randn(4, 40, 8, dtype=torch.float64)
    got = dispersion_loss(z, variant, max_tokens=10, generator=torch.Generator().manual_seed(3))
    positions = draw_token_subset(40, 10, torch.Generator().manual_seed(3))
    want = dispersion_loss(z[:, positions], variant, max_tokens=None)
    assert got.item() == pytest.approx(want.item(), abs=1e-12)
    # Two copies of one sequence see the same positions: same loss as that sequence alone.
    pair = torch.cat([z[:1], z[:1]])
    one = dispersion_loss(z[:1], max_tokens=10, generator=torch.Generator().manual_seed(5))
    two = dispersion_loss(pair, max_tokens=10, generator=torch.Generator().manual_seed(5))
    assert one.item() == pytest.approx(two.item(), abs=1e-12)


@pytest.mark.parametrize("variant", VARIANTS)
def test_over_layers_is_the_mean_of_per_layer_losses(variant):
    states = [torch.randn(3, 30, 8, dtype=torch.float64) for _ in range(5)]
    layers = (1, 3, 4)
    got = dispersion_over_layers(states, layers, variant, max_tokens=12, margin=3.0, generator=torch.Generator().manual_seed(2))
    per_layer = [
        dispersion_loss(states[i], variant, max_tokens=12, margin=3.0, generator=torch.Generator().manual_seed(2))
        for i in layers
    ]
    assert got.item() == pytest.approx(sum(per_layer).item() / len(layers), abs=1e-12)


def test_over_layers_rejects_bad_indices_and_shapes():
    states = [torch.randn(2, 6, 4) for _ in range(3)]
    with pytest.raises(ConfigError, match="not in 0..2"):
        dispersion_over_layers(states, (3,))
    with pytest.raises(ConfigError, match="no layer"):
        dispersion_over_layers(states, ())
    states[2] = torch.randn(2, 5, 4)
    with pytest.raises(ConfigError, match="share"):
        dispersion_over_layers(states, (1, 2))


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ConfigError) as info:
        dispersion_loss(torch.randn(1, 4, 3), "angular")
    for name in VARIANTS:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(tau=0.0), "tau"),
        (dict(tau=-1.0), "tau"),
        (dict(tau=float("nan")), "tau"),
        (dict(tau=float("inf")), "tau"),
        (dict(clamp_threshold=0.0), "clamp_threshold"),
        (dict(clamp_threshold=1.0), "clamp_threshold"),
        (dict(eps=-0.1), "eps"),
        (dict(max_tokens=1), "max_tokens"),
        (dict(max_tokens=2.5), "max_tokens"),
        (dict(margin=float("nan")), "margin"),
        (dict(variant="infonce_l2", pooling="max"), "pooling"),
        (dict(variant="perplexity_entropy", eps=0.0), "eps"),
    ],
)
def test_bad_options_raise_config_error(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        dispersion_loss(torch.randn(2, 4, 3), **kwargs)


@pytest.mark.parametrize(
    "z, variant, fragment",
    [
        (torch.randn(4, 3), "angular_spread", r"\[B, T, F\]"),
        (torch.randn(1, 2, 4, 3), "angular_spread", r"\[B, T, F\]"),
        (torch.randn(2, 1, 3), "angular_spread", "T >= 2"),
        (torch.ones(2, 4, 3, dtype=torch.long), "angular_spread", "floating"),
        (torch.randn(2, 4, 1), "decorrelation", "F >= 2"),
        (torch.randn(1, 4, 3), "covariance", "B >= 2"),
    ],
)
def test_bad_shapes_raise_config_error(z, variant, fragment):
    with pytest.raises(ConfigError, match=fragment):
        dispersion_loss(z, variant)


# --------------------------------------------------------------------------------------
# Layer selection
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("all", tuple(range(1, 13))),
        ("last", (12,)),
        ("early_half", tuple(range(1, 7))),
        ("late_half", tuple(range(7, 13))),
        ("0,1,5", (1, 2, 6)),
        (" 11 , 0 ", (1, 12)),
        ([0, 1, 5], (1, 2, 6)),
        ((11,), (12,)),
        (3, (4,)),
        ("0:1", tuple(range(1, 13))),
        ("0.5:1.0", tuple(range(7, 13))),
        ("0:0.5", tuple(range(1, 7))),
        ("0.25:0.5", (4, 5, 6)),  # (b+1)/12 in (1/4, 1/2]: 4/12, 5/12, 6/12
        ("1/3:2/3", (5, 6, 7, 8)),
        ("0.9:1", (11, 12)),  # 11/12 > 0.9
        ("0.95:1", (12,)),
    ],
)
def test_resolve_layers_for_twelve_blocks(spec, expected):
    validate_layer_spec(spec)
    assert resolve_layers(spec, 12) == expected


def test_resolve_layers_odd_and_single_depths():
    assert resolve_layers("early_half", 5) == (1, 2)
    assert resolve_layers("late_half", 5) == (3, 4, 5)
    assert resolve_layers("all", 1) == (1,)
    assert resolve_layers("late_half", 1) == (1,)
    with pytest.raises(ConfigError, match="selects no block"):
        resolve_layers("early_half", 1)


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("first", "not a layer selection"),
        ("", "not a layer selection"),
        ("1,,2", "not a layer selection"),
        ("-1", "not a layer selection"),
        ([-1], "non-negative"),
        ([1, 1], "repeats"),
        ([], "selects no layer"),
        ([1.5], "integers"),
        (True, "not a layer selection"),
        (None, "not a layer selection"),
        ("0.5:1.5", "out of range"),
        ("0.5:0.5", "out of range"),
        ("a:b", "depth-fraction"),
        ("0:0.5:1", "depth-fraction"),
    ],
)
def test_malformed_layer_specs_are_rejected_without_depth(spec, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate_layer_spec(spec)
    with pytest.raises(ConfigError, match=fragment):
        resolve_layers(spec, 12)


def test_resolve_layers_errors_that_need_the_depth():
    with pytest.raises(ConfigError, match="beyond the model's 12 blocks"):
        resolve_layers("0,12", 12)
    with pytest.raises(ConfigError, match="selects no block"):
        resolve_layers("0:0.05", 12)
    with pytest.raises(ConfigError, match="n_blocks"):
        resolve_layers("all", 0)
