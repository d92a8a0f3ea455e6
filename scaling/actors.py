"""Condensation on sharded hidden states, reduced by a pool of Ray actors.

A producer (the `condense` CLI's driver, or rank 0 of a training run) runs the model on a
batch of texts and cuts each text's hidden states [L+1, n, d] (its padding dropped) into layer
groups. Each shard (one text x one layer group, with the text's weight: identical texts run
once) goes through the Ray object store as a plain numpy array to the actor that owns it,
which folds it into the foundation's mergeable statistics (`CondensationAccumulator`). At the
end the partial states come back as numpy arrays, the same layer group is merged across actors
and the groups are stacked along the layer axis. The producer holds one batch's hidden states
at a time, and at most `max_inflight` shards wait in the object store (back-pressure), so
memory does not grow with the repetitions.

Sums are float64 in every actor: the result equals the single-process one up to the
round-off of adding the same terms in another order.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from scaling.condensation import (CondensationAccumulator, as_layers, lengths_from_mask, measure_condensation,
                                  measure_sequences, text_weights)
from scaling.errors import ConfigError, DataError


class _Reducer:
    """One actor: a partial accumulator per layer group it has been sent."""

    def __init__(self, effective_rank: bool):
        self.effective_rank = effective_rank
        self.parts: dict[int, CondensationAccumulator] = {}

    def add(self, group: int, hidden: np.ndarray, weight: int = 1) -> int:
        import torch

        part = self.parts.setdefault(group, CondensationAccumulator(effective_rank=self.effective_rank))
        part.update(torch.from_numpy(hidden), weights=[weight])
        return hidden.nbytes

    def states(self) -> dict[int, dict[str, np.ndarray]]:
        return {group: part.to_arrays() for group, part in self.parts.items()}


def split_texts(hidden_states, attention_mask=None, weights=None) -> list[tuple[np.ndarray, int]]:
    """A batch as `CondensationAccumulator.update` takes it -> (one text's [L+1, n, d] float32
    array without its padding, its weight) per text."""
    import torch

    if isinstance(hidden_states, np.ndarray):
        hidden_states = torch.from_numpy(hidden_states)
    layers = as_layers(hidden_states)
    batch, tokens, _ = layers[0].shape
    lengths = lengths_from_mask(attention_mask, batch, tokens)
    counts = text_weights(weights, batch)
    stacked = torch.stack([layer.detach().to("cpu", torch.float32) for layer in layers]).numpy()
    return [(np.ascontiguousarray(stacked[:, b, :int(lengths[b])]), int(counts[b])) for b in range(batch)]


def split_layers(num_layers: int, num_groups: int) -> list[tuple[int, int]]:
    """Contiguous [start, stop) layer ranges, as even as possible."""
    bounds = np.linspace(0, num_layers, min(num_groups, num_layers) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def stack_layer_groups(groups: Sequence[CondensationAccumulator]) -> CondensationAccumulator:
    """Join accumulators of consecutive layer groups (same texts) into one over all layers."""
    states = [g.to_arrays() for g in groups]
    coverage = states[0]["coverage"]
    for state in states[1:]:
        if state["coverage"].shape != coverage.shape or not np.array_equal(state["coverage"], coverage):
            raise DataError("layer groups saw different texts; every text must reach every layer group")
    return CondensationAccumulator.from_arrays({
        "format": states[0]["format"],
        "cos_sum": np.concatenate([s["cos_sum"] for s in states]),
        "coverage": coverage,
        "rank_sum": np.concatenate([s["rank_sum"] for s in states]),
        "num_sequences": states[0]["num_sequences"],
    })


class CondensationPool:
    """A pool of reducer actors fed with per-text hidden states; `result()` gives the merged state.

    Shard s of text i (layer group g) goes to actor (i * n_groups + g) % num_actors, so both the
    texts and the layer groups spread over the actors.
    """

    def __init__(self, num_actors: int, *, layer_groups: int | None = None, effective_rank: bool = True,
                 num_cpus: float = 1.0, max_inflight: int | None = None):
        import ray

        if num_actors < 1:
            raise ConfigError(f"num_actors={num_actors}: must be >= 1")
        self.num_actors = num_actors
        self.layer_groups = layer_groups or num_actors
        self.max_inflight = max_inflight or 2 * num_actors
        actor = ray.remote(num_cpus=num_cpus)(_Reducer)
        self.actors = [actor.remote(effective_rank) for _ in range(num_actors)]
        self._inflight: list = []
        self._texts = 0
        self._groups: list[tuple[int, int]] | None = None
        self.bytes_sent = 0

    def update(self, hidden_states, attention_mask=None, weights=None) -> None:
        """Send texts' hidden states to the actors: the same call as `CondensationAccumulator.update`
        (one text [L+1, T, d], or a right-padded batch with its mask and weights), so a pool can
        stand in for an accumulator. Each text travels without its padding."""
        import ray

        for array, weight in split_texts(hidden_states, attention_mask, weights):
            if self._groups is None:
                self._groups = split_layers(array.shape[0], self.layer_groups)
            elif self._groups[-1][1] != array.shape[0]:
                raise DataError(f"text {self._texts} has {array.shape[0]} layers, earlier texts "
                                f"{self._groups[-1][1]}; use one model per pool")
            for g, (start, stop) in enumerate(self._groups):
                shard = np.ascontiguousarray(array[start:stop])
                target = self.actors[(self._texts * len(self._groups) + g) % self.num_actors]
                self._inflight.append(target.add.remote(g, shard, weight))
                self.bytes_sent += shard.nbytes
            self._texts += 1
            if len(self._inflight) > self.max_inflight:  # back-pressure: keep the object store small
                done, self._inflight = ray.wait(self._inflight, num_returns=len(self._inflight) - self.max_inflight)
                ray.get(done)  # surface actor errors early

    def result(self) -> CondensationAccumulator:
        """Wait for every shard, merge each layer group across actors, stack the groups."""
        import ray

        if self._texts == 0:
            raise DataError("no texts were measured; submit at least one text's hidden states")
        ray.get(self._inflight)
        self._inflight = []
        merged: dict[int, CondensationAccumulator] = {}
        for states in ray.get([a.states.remote() for a in self.actors]):
            for group, arrays in states.items():
                part = CondensationAccumulator.from_arrays(arrays)
                merged[group] = merged[group].merge(part) if group in merged else part
        return stack_layer_groups([merged[g] for g in range(len(self._groups))])

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def measure_condensation_sharded(model, tokenizer, texts: Sequence[str] | None, max_length: int, *, num_actors: int,
                                 device=None, progress: bool = True, effective_rank: bool = True,
                                 num_cpus: float = 1.0, batch_size: int | None = None,
                                 sequences=None) -> CondensationAccumulator:
    """`measure_condensation` with the reduction spread over `num_actors` Ray actors: the model
    runs here (batched), and the pool stands in for the accumulator. Pass `sequences` (token ids
    from `tokenize_texts`) instead of texts when they are tokenized already."""
    pool = CondensationPool(num_actors, effective_rank=effective_rank, num_cpus=num_cpus)
    try:
        if sequences is not None:
            measure_sequences(model, sequences, device, progress, accumulator=pool, batch_size=batch_size)
        else:
            measure_condensation(model, tokenizer, texts, max_length, device, progress, accumulator=pool,
                                 batch_size=batch_size)
        return pool.result()
    finally:
        pool.close()
