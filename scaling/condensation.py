"""Embedding condensation as mergeable running statistics (docs/condensation.md).

For every layer l (index 0 = embedding output, L = after the final norm) and every text r,
rows of the hidden states are normalised, x / max(||x||, 1e-3), and the token-token cosine
matrix C = X^ X^T is clipped to [-1, 1]. The reference averages C element-wise over the R
texts; here the average is kept as a running float64 *sum* per layer, so memory is
(L+1) x T x T whatever R is, two partial states merge by addition, and the state travels as
plain numpy arrays (`to_arrays` / `from_arrays`). A batch of texts adds to the sum with one
float64 matrix product per layer, and the clip is applied to the average (only round-off is
ever outside [-1, 1], so clipping each text's matrix or the average is the same).

Texts of different token lengths (the reference crashes on them): the matrices live on a
grid as long as the longest text seen. Entry (i, j) of the averaged matrix is the mean over
the texts long enough to contain both tokens, i.e. with more than max(i, j) tokens; every
grid entry has at least one such text. Per-layer means and histograms weight every grid entry
equally. With equal lengths this is exactly the reference's average.

Pure torch/numpy: no Ray, no MLflow.

"The reference" here means the authors' code: the LM-Dispersion repository and the PyPI package
`embedding-condensation` 2.0 (docs/README.md#the-reference).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from scaling import names
from scaling.errors import ConfigError, DataError, ModelError

NORM_EPS = 1e-3  # rows are divided by max(||x||, NORM_EPS), as the reference does
HISTOGRAM_BINS = 128
HISTOGRAM_RANGE = (-1.0, 1.0)
RANKME_EPS = 1e-7  # Garrido et al. 2023: p_k = s_k / sum(s) + eps
ARRAYS_FORMAT = 1  # bump when the layout of `to_arrays` changes

HiddenStates = torch.Tensor | Sequence[torch.Tensor]


# --- pure math --------------------------------------------------------------------------------


def compute_normalized_rows(hidden: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-3) along the last axis, in float32 (the reference upcasts first)."""
    hidden = hidden.float()
    return hidden / hidden.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS)


def compute_rankme(gram_eigenvalues: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """RankMe (Garrido et al. 2023) from the eigenvalues of X X^T or X^T X (= squared singular
    values of X), over the last axis: exp(entropy of s / sum(s)). `keep` (bool, same shape)
    limits it to some eigenvalues, e.g. a padded text's top min(length, d)."""
    singular = gram_eigenvalues.double().clamp_min(0.0).sqrt()
    if keep is not None:
        singular = singular * keep
    p = singular / singular.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny) + RANKME_EPS
    terms = p * p.log()
    if keep is not None:
        terms = terms * keep
    return torch.exp(-terms.sum(dim=-1))


def compute_rank_correlations(values: np.ndarray) -> tuple[float, float]:
    """Spearman and Kendall (tau-b) correlation of layer index 0..L with `values` (NaN when
    constant). Written out in numpy (scipy.stats' values, without its ~1 s import): Spearman
    is the Pearson correlation of the ranks (ties get their average rank); Kendall's tau-b
    with no ties in the index is (concordant - discordant) / sqrt(n0 (n0 - ties in values))."""
    values = np.asarray(values, dtype=np.float64)
    if values.size < 2 or not np.all(np.isfinite(values)) or np.ptp(values) == 0.0:
        return math.nan, math.nan
    n = values.size
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], n]
    ranks = np.empty(n)
    for start, end in zip(starts, ends):
        ranks[order[start:end]] = (start + end + 1) / 2.0  # 1-based average rank of the tie group
    spearman = float(np.corrcoef(np.arange(n), ranks)[0, 1])
    signs = np.sign(values[None, :] - values[:, None])
    score = float(np.triu(signs, k=1).sum())  # the index always increases: the sign of the value step
    pairs = n * (n - 1) / 2.0
    tied = float(((ends - starts) * (ends - starts - 1) / 2.0).sum())
    kendall = score / math.sqrt(pairs * (pairs - tied))
    return spearman, kendall


def as_layers(hidden_states: HiddenStates) -> tuple[torch.Tensor, ...]:
    """Any of: HF's tuple of L+1 tensors [B, T, d] or [T, d]; a tensor [L+1, T, d] or
    [L+1, B, T, d]  ->  L+1 tensors [B, T, d] (not stacked: a model spread over several devices
    returns its layers on different devices)."""
    if isinstance(hidden_states, torch.Tensor):
        layers = tuple(hidden_states.unbind(0)) if hidden_states.dim() in (3, 4) else None
    else:
        layers = tuple(hidden_states)
        if len(layers) == 0:
            raise DataError("hidden_states is empty; pass the tuple the model returns with output_hidden_states=True")
    if layers is None or any(layer.dim() not in (2, 3) or layer.shape != layers[0].shape for layer in layers):
        shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) \
            else [tuple(layer.shape) for layer in layers]
        raise DataError(
            f"hidden_states has shape {shape}; expected [L+1, T, d], [L+1, B, T, d] "
            "or a tuple of [B, T, d] tensors"
        )
    return tuple(layer.unsqueeze(0) if layer.dim() == 2 else layer for layer in layers)


def text_weights(weights, batch: int) -> torch.Tensor:
    """[B] int64 counts of each text (None: once each); DataError unless positive integers."""
    if weights is None:
        return torch.ones(batch, dtype=torch.int64)
    weights = torch.as_tensor(weights).reshape(-1)
    if weights.shape[0] != batch or weights.is_floating_point() or bool((weights < 1).any()):
        raise DataError(f"weights must be {batch} positive integers (how often each text occurs), "
                        f"got {weights.tolist()}")
    return weights.to("cpu", torch.int64)


def lengths_from_mask(attention_mask: torch.Tensor | None, batch: int, tokens: int) -> torch.Tensor:
    """[B] int64 token counts (on the CPU) from a right-padded mask (None: all `tokens`)."""
    if attention_mask is None:
        return torch.full((batch,), tokens, dtype=torch.long)
    mask = attention_mask.detach().to("cpu").long().reshape(batch, -1)
    if mask.shape[1] != tokens:
        raise DataError(f"attention_mask has {mask.shape[1]} positions but hidden states have {tokens}")
    lengths = mask.sum(dim=1)
    if not torch.equal(mask, (torch.arange(tokens) < lengths[:, None]).long()):
        raise DataError("attention_mask is not right-padded; tokenize with padding_side='right'")
    if (lengths == 0).any():
        raise DataError("a sequence in the batch has no tokens; drop empty texts before measuring")
    return lengths


# --- the running statistics ----------------------------------------------------------------------


class CondensationAccumulator:
    """Running per-layer sums of token-token cosine matrices; `update`, `merge`, `finalize`.

    State (all float64 / int64, independent of the number of texts):
    - `cos_sum` [L+1, N, N]: sum over texts of the cosine matrices, top-left aligned (the
      average is clipped to [-1, 1], which only round-off ever leaves);
    - `coverage` [N]: coverage[k] = number of texts with more than k tokens, so entry (i, j)
      has coverage[max(i, j)] contributions;
    - `rank_sum` [L+1]: sum over texts of the per-layer RankMe (NaN when not computed).
    N is the longest text seen so far; it grows when a longer one arrives.
    """

    def __init__(self, *, effective_rank: bool = True):
        self.effective_rank = effective_rank
        """Also compute RankMe per layer and text (an eigen-decomposition per layer: the
        costliest part on CPU; switch off for speed)."""
        self.cos_sum: torch.Tensor | None = None
        self.coverage: torch.Tensor | None = None
        self.rank_sum: torch.Tensor | None = None
        self.num_sequences = 0

    # state ------------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        """L+1 hidden states per text (0 before the first update)."""
        return 0 if self.cos_sum is None else int(self.cos_sum.shape[0])

    @property
    def grid_length(self) -> int:
        """N: tokens of the longest text seen."""
        return 0 if self.cos_sum is None else int(self.cos_sum.shape[1])

    @property
    def state_nbytes(self) -> int:
        """Bytes held by the state (independent of how many texts were added)."""
        return sum(t.numel() * t.element_size() for t in (self.cos_sum, self.coverage, self.rank_sum) if t is not None)

    def _ensure_state(self, num_layers: int, length: int, device: torch.device) -> None:
        if self.cos_sum is None:
            self.cos_sum = torch.zeros(num_layers, length, length, dtype=torch.float64, device=device)
            self.coverage = torch.zeros(length, dtype=torch.int64, device=device)
            fill = 0.0 if self.effective_rank else math.nan
            self.rank_sum = torch.full((num_layers,), fill, dtype=torch.float64, device=device)
            return
        if num_layers != self.num_layers:
            raise ModelError(
                f"hidden states have {num_layers} layers but this accumulator holds {self.num_layers}; "
                "use one accumulator per model"
            )
        if length > self.grid_length:
            self._grow(length)

    def _grow(self, length: int) -> None:
        old = self.grid_length
        cos_sum = self.cos_sum.new_zeros(self.num_layers, length, length)
        cos_sum[:, :old, :old] = self.cos_sum
        coverage = self.coverage.new_zeros(length)
        coverage[:old] = self.coverage
        self.cos_sum, self.coverage = cos_sum, coverage

    # update / merge ---------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, hidden_states: HiddenStates, attention_mask: torch.Tensor | None = None,
               weights: Sequence[int] | torch.Tensor | None = None) -> None:
        """Add one text ([L+1, T, d] or HF's tuple of [1, T, d]) or a batch ([L+1, B, T, d] or a
        tuple of [B, T, d]; right-padded, with `attention_mask` [B, T] when lengths differ).
        `weights` [B]: how many times each text counts (identical texts measured once).

        The work stays on the hidden states' device (the first update's; later ones are moved
        there) and goes layer by layer, so temporaries are one layer's, not all L+1."""
        layers = as_layers(hidden_states)
        batch, tokens, _ = layers[0].shape
        if tokens == 0:
            raise DataError("a text has no tokens; drop empty texts before measuring")
        lengths = lengths_from_mask(attention_mask, batch, tokens)
        counts = text_weights(weights, batch)
        self._ensure_state(len(layers), tokens, layers[0].device)
        device = self.cos_sum.device

        padded = bool((lengths < tokens).any())
        # Zero rows of padding: their cosines are 0 and add nothing to the sums.
        keep = (torch.arange(tokens) < lengths[:, None]).to(device=device, dtype=torch.float32)[:, :, None] \
            if padded else None
        # Weighted sum of the texts' cosine matrices as one product: scaling text b's rows by
        # sqrt(w_b) makes [T, B*d] @ [B*d, T] = sum_b w_b X_b X_b^T.
        root = counts.double().sqrt().to(device)[:, None, None] if bool((counts != 1).any()) else None
        ranks = []
        for layer, hidden in enumerate(layers):
            unit = compute_normalized_rows(hidden.to(device))  # [B, T, d] float32
            if keep is not None:
                unit = unit * keep
            rows = unit.double()  # float64 products: the sum over B * d terms stays exact to ~1e-16
            if root is not None:
                rows = rows * root
            side_by_side = rows.transpose(0, 1).reshape(tokens, -1)  # [T, B*d]
            self.cos_sum[layer, :tokens, :tokens].addmm_(side_by_side, side_by_side.T)
            if self.effective_rank:
                ranks.append(self._rankme(unit, lengths))
        if ranks:
            self.rank_sum += (torch.stack(ranks) * counts.to(device=device, dtype=torch.float64)).sum(dim=1)
        present = (torch.arange(tokens)[None, :] < lengths[:, None]).long()
        self.coverage[:tokens] += (present * counts[:, None]).sum(dim=0).to(device)
        self.num_sequences += int(counts.sum())

    @staticmethod
    def _rankme(unit: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """RankMe of each text's rows [B, T, d] (padding rows zero) -> [B] float64."""
        # Eigenvalues of the smaller Gram matrix (T x T or d x d) are the squared singular
        # values: far cheaper than svdvals of a wide T x d matrix on CPU (measured 9 s vs 0.4 s
        # for 13 x 512 x 768). The Gram is formed in float64 because a float32 one leaves
        # ~1e-7 eigenvalue noise whose square roots would inflate RankMe. A text of n tokens
        # has min(n, d) singular values: padding adds only zero eigenvalues, which are left out
        # (the smallest ones: eigvalsh sorts ascending), so padding changes nothing.
        rows = unit.double()
        batch, tokens, width = rows.shape
        if tokens <= width:
            small = torch.bmm(rows, rows.transpose(1, 2))
        else:
            small = torch.bmm(rows.transpose(1, 2), rows)
        eigenvalues = _eigvalsh(small)
        size = eigenvalues.shape[-1]
        real = lengths.clamp(max=width)  # on the CPU: deciding needs no device sync
        if bool((real >= size).all()):
            return compute_rankme(eigenvalues)
        keep = torch.arange(size)[None, :] >= (size - real)[:, None]
        return compute_rankme(eigenvalues, keep.to(eigenvalues.device))

    def merge(self, other: CondensationAccumulator) -> CondensationAccumulator:
        """Add another partial state into this one (in place; returns self)."""
        if other.cos_sum is None:
            return self
        if self.cos_sum is None:
            self.effective_rank = self.effective_rank and other.effective_rank
            self.cos_sum = other.cos_sum.clone()
            self.coverage = other.coverage.clone()
            self.rank_sum = other.rank_sum.clone()
            if not self.effective_rank:
                self.rank_sum.fill_(math.nan)
            self.num_sequences = other.num_sequences
            return self
        self._ensure_state(other.num_layers, other.grid_length, self.cos_sum.device)
        length = other.grid_length
        self.cos_sum[:, :length, :length] += other.cos_sum.to(self.cos_sum.device)
        self.coverage[:length] += other.coverage.to(self.coverage.device)
        self.rank_sum += other.rank_sum.to(self.rank_sum.device)  # NaN if either skipped RankMe
        self.effective_rank = self.effective_rank and other.effective_rank
        self.num_sequences += other.num_sequences
        return self

    # serialisation ----------------------------------------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        """The state as plain numpy arrays (for safetensors/npz; never pickle)."""
        if self.cos_sum is None:
            raise DataError("the accumulator is empty; update it with at least one text first")
        return {
            "format": np.array(ARRAYS_FORMAT, dtype=np.int64),
            "cos_sum": self.cos_sum.cpu().numpy(),
            "coverage": self.coverage.cpu().numpy(),
            "rank_sum": self.rank_sum.cpu().numpy(),
            "num_sequences": np.array(self.num_sequences, dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], device: str | torch.device = "cpu") -> CondensationAccumulator:
        """Rebuild a state written by `to_arrays`."""
        missing = {"format", "cos_sum", "coverage", "rank_sum", "num_sequences"} - set(arrays)
        if missing:
            raise DataError(f"condensation state lacks arrays {sorted(missing)}; write it with to_arrays()")
        if int(arrays["format"]) != ARRAYS_FORMAT:
            raise DataError(f"condensation state format {int(arrays['format'])} is not {ARRAYS_FORMAT}; "
                            "re-measure with this version")
        cos_sum = np.asarray(arrays["cos_sum"], dtype=np.float64)
        coverage = np.asarray(arrays["coverage"], dtype=np.int64)
        rank_sum = np.asarray(arrays["rank_sum"], dtype=np.float64)
        if cos_sum.ndim != 3 or cos_sum.shape[1] != cos_sum.shape[2] or coverage.shape != (cos_sum.shape[1],) \
                or rank_sum.shape != (cos_sum.shape[0],):
            raise DataError(f"condensation state shapes do not fit: cos_sum {cos_sum.shape}, "
                            f"coverage {coverage.shape}, rank_sum {rank_sum.shape}")
        accumulator = cls(effective_rank=bool(np.all(np.isfinite(rank_sum))))
        accumulator.cos_sum = torch.from_numpy(cos_sum.copy()).to(device)
        accumulator.coverage = torch.from_numpy(coverage.copy()).to(device)
        accumulator.rank_sum = torch.from_numpy(rank_sum.copy()).to(device)
        accumulator.num_sequences = int(arrays["num_sequences"])
        return accumulator

    # results ----------------------------------------------------------------------------------
    def averaged_matrices(self) -> np.ndarray:
        """The element-wise average [L+1, N, N] (float64), entry (i, j) over the texts that
        contain both tokens."""
        if self.cos_sum is None:
            raise DataError("the accumulator is empty; update it with at least one text first")
        index = torch.arange(self.grid_length, device=self.coverage.device)
        counts = self.coverage[torch.maximum(index[:, None], index[None, :])]
        # Clipped as the reference clips each text's matrix: only round-off (a unit row's
        # self-similarity of 1 + 1e-7) is ever outside [-1, 1].
        return (self.cos_sum / counts.to(torch.float64)).clamp_(-1.0, 1.0).cpu().numpy()

    def finalize(self) -> CondensationResult:
        """Per-layer means, histograms, effective rank and the depth trend."""
        averaged = self.averaged_matrices()
        num_layers, length, _ = averaged.shape
        flat = averaged.reshape(num_layers, -1)
        mean_cosine = flat.mean(axis=1)
        trace = np.trace(averaged, axis1=1, axis2=2)
        offdiag = (flat.sum(axis=1) - trace) / (length * length - length) if length > 1 \
            else np.full(num_layers, math.nan)
        # Binned in float32, as the reference's float32 average is: float64 values a hair from
        # a bin edge would otherwise land in the neighbouring bin.
        histograms = np.stack([
            np.histogram(row.astype(np.float32), bins=HISTOGRAM_BINS, range=HISTOGRAM_RANGE, density=True)[0]
            for row in flat
        ])
        coverage = self.coverage.cpu().numpy()
        spearman, kendall = compute_rank_correlations(mean_cosine)
        return CondensationResult(
            mean_cosine=mean_cosine,
            mean_cosine_offdiag=offdiag,
            histograms=histograms,
            effective_rank=self.rank_sum.cpu().numpy() / self.num_sequences,
            spearman=spearman,
            kendall=kendall,
            num_sequences=self.num_sequences,
            min_length=int((coverage == self.num_sequences).sum()),
            max_length=length,
            mean_length=float(coverage.sum() / self.num_sequences),
        )


def _eigvalsh(matrices: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of symmetric matrices; on the CPU with one thread: MKL's threaded solver was
    40-100x slower on these sizes (8 x 128 x 128: 1.3 s vs 0.03 s; 8 x 512 x 512: 46 s vs 0.5 s,
    2 cores, busy machine), as its threads wait on each other."""
    if matrices.device.type != "cpu" or torch.get_num_threads() == 1:
        return torch.linalg.eigvalsh(matrices)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvalsh(matrices)
    finally:
        torch.set_num_threads(threads)


def merge_accumulators(accumulators: Iterable[CondensationAccumulator]) -> CondensationAccumulator:
    """One state from many partial ones (e.g. one per Ray actor)."""
    total = CondensationAccumulator()
    for accumulator in accumulators:
        total.merge(accumulator)
    return total


# --- the result ---------------------------------------------------------------------------------


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.array(array, dtype=np.float64)
    array.setflags(write=False)
    return array


def _json_float(value: float) -> float | None:
    return None if not math.isfinite(value) else float(value)


@dataclass(frozen=True)
class CondensationResult:
    """Per-layer condensation of one model on one set of texts (index 0 = embedding output)."""

    mean_cosine: np.ndarray
    """[L+1] mean of the averaged cosine matrix over all entries, diagonal included (reference)."""
    mean_cosine_offdiag: np.ndarray
    """[L+1] the same over off-diagonal entries only (what a reader usually means)."""
    histograms: np.ndarray
    """[L+1, 128] density histogram of the averaged matrix's entries over [-1, 1] (integrates to 1)."""
    effective_rank: np.ndarray
    """[L+1] RankMe of the normalised hidden states, averaged over texts (NaN if not computed)."""
    spearman: float
    """Spearman correlation of layer index vs mean_cosine (+1 = condensing with depth)."""
    kendall: float
    """Kendall tau of layer index vs mean_cosine."""
    num_sequences: int
    """Texts measured."""
    min_length: int
    """Tokens of the shortest text."""
    max_length: int
    """Tokens of the longest text (the side of the averaged matrices)."""
    mean_length: float
    """Mean tokens per text."""
    histogram_edges: np.ndarray = field(
        default_factory=lambda: _frozen(np.linspace(*HISTOGRAM_RANGE, HISTOGRAM_BINS + 1)))
    """[129] bin edges of `histograms`."""

    def __post_init__(self):
        for name in ("mean_cosine", "mean_cosine_offdiag", "histograms", "effective_rank", "histogram_edges"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))
        layers = self.mean_cosine.shape
        if self.mean_cosine_offdiag.shape != layers or self.effective_rank.shape != layers \
                or self.histograms.shape != (*layers, HISTOGRAM_BINS):
            raise DataError("CondensationResult arrays disagree on the number of layers")
        if self.num_sequences < 1 or not 1 <= self.min_length <= self.max_length:
            raise DataError(f"CondensationResult counts are inconsistent: {self.num_sequences} texts, "
                            f"lengths {self.min_length}..{self.max_length}")

    @property
    def num_layers(self) -> int:
        """L+1 (embedding output plus one per block; the last is after the final norm)."""
        return int(self.mean_cosine.shape[0])

    @property
    def layer_fractions(self) -> np.ndarray:
        """l / L for l = 0..L (the heatmap's x axis)."""
        return np.arange(self.num_layers) / max(self.num_layers - 1, 1)

    def mean_last(self, n: int) -> float:
        """Mean of mean_cosine over the last n hidden states (the final-norm output included)."""
        if not 1 <= n <= self.num_layers:
            raise ConfigError(f"last_n={n}: must be between 1 and {self.num_layers} (the number of hidden states)")
        return float(self.mean_cosine[-n:].mean())

    @property
    def late_half_mean(self) -> float:
        """Mean of mean_cosine over the late half of the blocks, as the dispersion loss's
        `late_half` selects them: of the L block outputs hidden_states[1:], all but the first
        floor(L/2)."""
        blocks = self.num_layers - 1
        if blocks < 1:
            return float(self.mean_cosine[-1])
        return float(self.mean_cosine[1 + blocks // 2:].mean())

    def to_dict(self, last_n: int | None = None) -> dict:
        """The JSON-ready record (issue 2 schema plus summaries); NaN becomes null."""
        record = {
            "layers": [
                {
                    "layer": layer,
                    "layer_fraction": float(self.layer_fractions[layer]),
                    "mean_cosine": float(self.mean_cosine[layer]),
                    "mean_cosine_offdiag": _json_float(self.mean_cosine_offdiag[layer]),
                    "histogram": [float(v) for v in self.histograms[layer]],
                    "effective_rank": _json_float(self.effective_rank[layer]),
                }
                for layer in range(self.num_layers)
            ],
            "spearman": _json_float(self.spearman),
            "kendall": _json_float(self.kendall),
            "late_half_mean_cosine": self.late_half_mean,
            "histogram_range": list(HISTOGRAM_RANGE),
            "histogram_bins": HISTOGRAM_BINS,
            "num_sequences": self.num_sequences,
            "tokens": {"min": self.min_length, "max": self.max_length, "mean": self.mean_length},
        }
        if last_n is not None:
            record["last_n"] = last_n
            record["last_n_mean_cosine"] = self.mean_last(last_n)
        return record

    def to_json(self, last_n: int | None = None, extra: dict | None = None, indent: int | None = 2) -> str:
        """`to_dict` (plus `extra` top-level keys) as a JSON string."""
        return json.dumps({**(extra or {}), **self.to_dict(last_n)}, indent=indent, allow_nan=False)

    def to_metrics(self) -> dict[str, float]:
        """Flat metric dict under the shared names of `scaling.names` (for MLflow)."""
        metrics = {
            names.COND_SPEARMAN: self.spearman,
            names.COND_KENDALL: self.kendall,
            names.COND_LAST_LAYER_MEAN_COS: float(self.mean_cosine[-1]),
            names.COND_LATE_HALF_MEAN_COS: self.late_half_mean,
        }
        for layer in range(self.num_layers):
            metrics[names.layer_metric(layer, "mean_cos")] = float(self.mean_cosine[layer])
            metrics[names.layer_metric(layer, "mean_cos_offdiag")] = float(self.mean_cosine_offdiag[layer])
            metrics[names.layer_metric(layer, "effective_rank")] = float(self.effective_rank[layer])
        return metrics


# --- measuring a model ------------------------------------------------------------------------------


def tokenize_for_measurement(tokenizer, text: str, max_length: int) -> dict[str, torch.Tensor]:
    """As the reference: the tokenizer's own special tokens, truncated to max_length."""
    return tokenizer(text, return_tensors="pt", truncation=True, max_length=max_length)


CHARS_PER_TOKEN = 16
"""First guess of the characters `max_length` tokens take (English BPE: ~4); grown 4x until it holds them."""
CUT_MARGIN = 8
"""Tokens a cut text must have past the kept ones, so the cut word never changes what is kept."""


def bounded_text(tokenizer, text: str, max_length: int) -> str:
    """The shortest prefix of `text` (growing 4x) whose tokens extend `CUT_MARGIN` past `max_length`: a tokenizer
    truncates only after tokenizing everything (a 10 MB line: seconds and gigabytes to keep 64 tokens). The
    kept tokens are the full text's, since a cut changes at most the word it falls in."""
    window = max_length * CHARS_PER_TOKEN
    while len(text) > window:
        prefix = text[:window]
        if len(tokenizer(prefix, add_special_tokens=False)["input_ids"]) > max_length + CUT_MARGIN:
            return prefix
        window *= 4
    return text


def tokenize_texts(tokenizer, texts: Sequence[str], max_length: int) -> list[torch.Tensor]:
    """Each text's token ids ([n] int64) as `tokenize_for_measurement` gives them, in one call;
    DataError naming the first text that tokenizes to nothing."""
    if not texts:
        raise DataError("no texts to measure; give a non-empty text source")
    texts = [bounded_text(tokenizer, text, max_length) for text in texts]
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    sequences = [torch.tensor(ids, dtype=torch.long) for ids in encoded]
    for index, ids in enumerate(sequences):
        if ids.numel() == 0:
            raise DataError(f"text {index} tokenizes to no tokens; remove empty texts from the source")
    return sequences


@dataclass(frozen=True)
class TokenBatch:
    """Texts run through the model in one forward pass."""

    input_ids: torch.Tensor
    """[B, T] int64, right-padded."""
    attention_mask: torch.Tensor | None
    """[B, T] 1 = token, 0 = padding; None when every text has T tokens."""
    weights: torch.Tensor
    """[B] int64: how many of the measured texts are this one."""


def plan_batches(sequences: Sequence[torch.Tensor], batch_size: int, pad_id: int = 0) -> list[TokenBatch]:
    """Identical texts once (weighted by how often they occur), longest first, `batch_size` per
    batch, right-padded with `pad_id` (any id the model embeds: padding is masked out)."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size}: must be at least 1")
    distinct: dict[bytes, list] = {}
    for ids in sequences:
        key = ids.numpy().tobytes()
        if key in distinct:
            distinct[key][1] += 1
        else:
            distinct[key] = [ids, 1]
    ordered = sorted(distinct.values(), key=lambda item: -item[0].numel())  # stable: ties keep text order
    batches = []
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start:start + batch_size]
        lengths = [ids.numel() for ids, _ in chunk]
        longest = max(lengths)
        input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)
        for row, (ids, _) in enumerate(chunk):
            input_ids[row, :ids.numel()] = ids
        mask = None
        if min(lengths) < longest:
            mask = (torch.arange(longest)[None, :] < torch.tensor(lengths)[:, None]).long()
        batches.append(TokenBatch(input_ids, mask, torch.tensor([count for _, count in chunk], dtype=torch.long)))
    return batches


@torch.inference_mode()
def measure_condensation(
    model: torch.nn.Module,
    tokenizer,
    texts: Sequence[str],
    max_length: int,
    device: str | torch.device | None = None,
    progress: bool = True,
    *,
    accumulator: CondensationAccumulator | None = None,
    effective_rank: bool = True,
    batch_size: int | None = None,
) -> CondensationAccumulator:
    """Run the base model (no LM head) on the texts and feed the hidden states to an accumulator
    (a new one unless given). Returns the accumulator, so a caller can merge partial states
    before `finalize()`.

    Texts shorter than max_length are measured at their own length (see the module doc).
    Batched: see `measure_sequences`.
    """
    from scaling.model import check_max_length, context_length

    if not texts:
        raise DataError("no texts to measure; give a non-empty text source")
    config = getattr(model, "config", None)
    check_max_length(max_length, context_length(config) if config is not None else None,
                     getattr(config, "name_or_path", None) or "the model")
    return measure_sequences(model, tokenize_texts(tokenizer, texts, max_length), device, progress,
                             accumulator=accumulator, effective_rank=effective_rank, batch_size=batch_size)


@torch.inference_mode()
def measure_sequences(
    model: torch.nn.Module,
    sequences: Sequence[torch.Tensor],
    device: str | torch.device | None = None,
    progress: bool = True,
    *,
    accumulator: CondensationAccumulator | None = None,
    effective_rank: bool = True,
    batch_size: int | None = None,
) -> CondensationAccumulator:
    """`measure_condensation` on token ids ([n] int64 each, from `tokenize_texts`).

    Identical sequences run once and count as many times as they occur; the distinct ones run
    `batch_size` at a time (None: as many as fit a share of the free memory of `device`,
    `scaling.model.auto_batch_size`), right-padded with an attention mask. In a causal model a
    token attends only to the tokens before it, so padding after a text changes none of its
    hidden states, and the accumulator leaves the padding rows out: the result equals one text
    per forward pass up to float round-off.
    """
    from tqdm.auto import tqdm

    from scaling.model import auto_batch_size

    if not sequences:
        raise DataError("no texts to measure; give a non-empty text source")
    base = getattr(model, "base_model", model)
    weight = next(base.parameters())
    device = torch.device(device) if device is not None else weight.device
    if batch_size is None:
        batch_size = auto_batch_size(getattr(model, "config", None), max(s.numel() for s in sequences), device,
                                     weight.element_size())
    accumulator = accumulator if accumulator is not None else CondensationAccumulator(effective_rank=effective_rank)
    was_training = base.training
    base.eval()
    try:
        with tqdm(total=len(sequences), desc="condensation", unit="text", disable=not progress) as bar:
            for batch in plan_batches(sequences, batch_size):
                mask = batch.attention_mask
                output = base(input_ids=batch.input_ids.to(device),
                              attention_mask=None if mask is None else mask.to(device),
                              output_hidden_states=True, use_cache=False)
                accumulator.update(output.hidden_states, attention_mask=mask, weights=batch.weights)
                bar.update(int(batch.weights.sum()))
    finally:
        base.train(was_training)
    return accumulator
