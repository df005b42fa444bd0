"""CacheBlend: recompute the tokens whose reused KV deviates most from a fresh computation.

A probe runs the first ``check_layer`` layers on every token and computes fresh K and V at the
check layer; the ``recompute_ratio`` share of context tokens that deviate most, plus the question,
are then computed at every layer, their K/V replacing the reused ones. Options:

- ``selection``: rank by K deviation (``k``, the paper), V (``v``), both normalised and summed
  (``kv``), or spend the same budget on random tokens (``random``, a control).
- ``sinks``: the first ``sinks`` tokens of every chunk are always in the budget (each chunk was
  computed without the other chunks before it, so its first tokens tend to deviate most: EPIC's
  attention-sink observation).
- ``per_chunk``: split the budget over chunks by length instead of one global ranking.
- ``gradual``: choose twice the budget at the check layer and cut it down to the budget over the
  following layers by the deviation seen at each layer (the paper's gradual filtering).
- ``weight``: ``attn`` multiplies each token's deviation by the attention the question's tokens
  pay to it at the check layer, so the budget goes where a deviation reaches the answer;
  ``qattn`` multiplies it (``qattn_add`` adds it, both normalised) by the attention the question
  pays to each token in a question-only pass over the reused cache (the cost of ``reuse``), here
  and in the gradual filtering.
- ``qattn_from``: that attention is averaged over the layers from this fraction of the model's
  depth on (0: every layer). The deep layers' attention says which tokens the answer reads; the
  early layers' is spread over local and sink tokens and dilutes it.
- ``spread_k`` / ``spread_v``: at every layer, each chunk's reused tokens take this share of the
  mean K / V correction its recomputed tokens receive (``blend/spread.py``): a chunk's tokens
  share part of what the passages before it change, and the recomputed tokens measure it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chunkcache.blend.base import FusionInput, FusionResult, finish
from chunkcache.blend.layout import Layout, sequential_layout, wait_layer
from chunkcache.blend.spread import check_shares, spread_hook
from chunkcache.blend.strategies import question_index, reused_buffer
from chunkcache.errors import InvalidInputError
from chunkcache.model.executor import LayerExecutor
from chunkcache.timing import stage

GRADUAL_FACTOR = 2
GRADUAL_LAYERS = 4
SELECTIONS = ("k", "v", "kv", "random")
WEIGHTS = ("none", "attn", "qattn", "qattn_add")


def token_deviation(
    fresh_k: torch.Tensor, fresh_v: torch.Tensor, old_k: torch.Tensor, old_v: torch.Tensor, selection: str
) -> torch.Tensor:
    """Per-token squared distance of fresh vs reused K and/or V ([kv_heads, n, d] each)."""
    dk = (fresh_k.float() - old_k.float()).pow(2).sum(dim=(0, 2)) if selection != "v" else None
    dv = (fresh_v.float() - old_v.float()).pow(2).sum(dim=(0, 2)) if selection != "k" else None
    if dk is None:
        return dv  # type: ignore[return-value]
    if dv is None:
        return dk
    return dk / dk.mean().clamp_min(1e-12) + dv / dv.mean().clamp_min(1e-12)


@dataclass(frozen=True)
class CacheBlend:
    recompute_ratio: float = 0.15
    check_layer: int = 1
    # K and V deviation with gradual filtering, weighted by the question's attention from a
    # question-only pass, beat the paper's K-only, single-layer choice on Qwen2.5-0.5B
    # (docs/quality.md); selection=k, gradual=0, weight=none is the plain algorithm.
    selection: str = "kv"
    sinks: int = 0
    per_chunk: bool = False
    gradual: bool = True
    weight: str = "qattn"
    # averaging the question's attention over the layers past a quarter of the depth cut the KL
    # by 13-16 % on both 40-example sets and kept every target; from half the depth cut it by
    # 19-22 % but lost one near-tie first token (docs/quality.md)
    qattn_from: float = 0.25
    seed: int = 0
    # each chunk's reused tokens take this share of the mean K / V correction its recomputed
    # tokens receive at each layer (blend/spread.py): at no extra token work it lowered the KL on
    # 30 of 40 HotpotQA and 31 of 40 MuSiQue examples (median -30 %, -27 %); 0 turns it off
    spread_k: float = 0.25
    spread_v: float = 0.25
    name = "cacheblend"
    uses_cache = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise InvalidInputError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        if self.selection not in SELECTIONS:
            raise InvalidInputError(f"selection must be one of {', '.join(SELECTIONS)}, got {self.selection!r}")
        if self.weight not in WEIGHTS:
            raise InvalidInputError(f"weight must be one of {', '.join(WEIGHTS)}, got {self.weight!r}")
        check_qattn_from(self.qattn_from)
        check_shares(self.spread_k, self.spread_v)
        if self.check_layer < 0 or self.sinks < 0:
            raise InvalidInputError("check_layer and sinks must be >= 0")

    def fuse(self, executor: LayerExecutor, inp: FusionInput) -> FusionResult:
        if self.check_layer >= executor.num_layers:
            raise InvalidInputError(
                f"check_layer {self.check_layer} is past the model's last layer ({executor.num_layers - 1})"
            )
        layout = sequential_layout(inp.pieces)
        buf = reused_buffer(executor, layout, inp)
        context = layout.question.start
        budget = min(context, round(self.recompute_ratio * context))
        question = question_index(layout)
        if budget >= context:
            return finish(executor, layout, buf, torch.arange(layout.length))
        if budget == 0:
            return finish(executor, layout, buf, question)
        gradual = self.gradual and self.selection != "random"  # random has no deviation to filter by
        first = min(context, budget * GRADUAL_FACTOR) if gradual else budget
        probe_work = 0
        importance = None
        if self.selection == "random":
            generator = torch.Generator().manual_seed(self.seed)
            score = torch.rand(context, generator=generator)
        else:
            score, importance, probe_work = self.scores(executor, layout, buf)
        chosen = self._choose(score, layout, first)
        selected = torch.sort(torch.cat([chosen, question])).values
        shrink = None
        if gradual:
            shrink = _GradualShrink(
                executor, self, budget, len(question), self._sink_mask(layout),
                None if self.selection == "random" else importance,
            )
        spread = spread_hook(executor, layout, self.spread_k, self.spread_v)
        return finish(executor, layout, buf, selected, shrink=shrink, extra_work=probe_work, before_write=spread)

    def scores(self, executor: LayerExecutor, layout: Layout, buf: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Per context token, how much recomputing it is worth (deviation, weighted as set); the
        question's attention per sequence index when ``weight`` is qattn*; the probe's work."""
        context = layout.question.start
        with stage("select_s"):
            importance = (reuse_attention(executor, layout, buf, self.qattn_from)
                          if self.weight.startswith("qattn") else None)
            # ranking happens on the CPU, where the question's attention and the indices live
            score = self._deviation(executor, layout, buf)[:context].cpu()
            if importance is not None:
                score = _weighted(score, importance[:context], self.weight)
        work = self.check_layer * layout.length
        if importance is not None:
            work += executor.num_layers * len(layout.question)
        return score, importance, work

    def _sink_mask(self, layout: Layout) -> torch.Tensor:
        mask = torch.zeros(layout.length, dtype=torch.bool)
        for span in layout.chunks:
            mask[span.start : min(span.stop, span.start + self.sinks)] = True
        return mask

    def _choose(self, score: torch.Tensor, layout: Layout, count: int) -> torch.Tensor:
        """``count`` context indices: forced sinks first, then the highest scores."""
        score = score.clone()
        score[self._sink_mask(layout)[: score.shape[0]]] = float("inf")
        if not self.per_chunk:
            return torch.topk(score, count).indices
        picks = [torch.empty(0, dtype=torch.long)]  # the head's cache is exact: never chosen
        total = sum(len(s) for s in layout.chunks)
        for span in layout.chunks:
            share = min(len(span), round(count * len(span) / max(total, 1)))
            picks.append(span.start + torch.topk(score[span.start : span.stop], share).indices)
        return torch.cat(picks)

    def _deviation(self, executor: LayerExecutor, layout: Layout, buf: torch.Tensor) -> torch.Tensor:
        """Deviation of fresh vs reused K/V at the check layer, per token."""
        n = layout.length
        index = torch.arange(n)
        hidden = executor.embed(layout.token_ids)
        keys = torch.empty_like(buf[0, 0, :, :n])
        values = torch.empty_like(keys)
        for layer in range(self.check_layer):
            hidden = executor.run_layer(layer, hidden, layout.positions, index, keys, values)
        q, k, v = executor.qkv(self.check_layer, hidden, layout.positions)
        wait_layer(buf, self.check_layer)
        old = buf[self.check_layer, :, :, :n]
        deviation = token_deviation(k, v, old[0], old[1], self.selection)
        if self.weight == "attn":
            deviation = deviation * question_attention(executor, q[:, layout.question.start :], k)
        return deviation


def _weighted(deviation: torch.Tensor, importance: torch.Tensor, weight: str) -> torch.Tensor:
    if weight == "qattn_add":
        return deviation / deviation.mean().clamp_min(1e-12) + importance / importance.mean().clamp_min(1e-12)
    return deviation * importance


def check_qattn_from(value: float) -> None:
    """``qattn_from`` (the depth the question's attention is averaged from) must name a layer."""
    if not 0.0 <= value < 1.0:
        raise InvalidInputError(f"qattn_from is a fraction of the model's depth in [0, 1), got {value}")


def reuse_attention(executor: LayerExecutor, layout: Layout, buf: torch.Tensor, start: float = 0.0) -> torch.Tensor:
    """Attention [N] the question pays to each token in a question-only pass over the reused
    cache, averaged over the layers from ``start`` (a fraction of the depth) on. The pass's K/V
    land at the question's indices, which are recomputed later anyway and which no context
    token attends to."""
    n = layout.length
    index = question_index(layout)
    positions = layout.positions[index]
    hidden = executor.embed(layout.token_ids[index])
    total = torch.zeros(n)
    first = min(executor.num_layers - 1, int(start * executor.num_layers))
    for layer in range(executor.num_layers):
        wait_layer(buf, layer)
        # the layers before ``first`` only carry the hidden state on: no query needed
        q = executor.qkv(layer, hidden, positions)[0] if layer >= first else None
        # run_layer writes the question's own K/V, which its attention row includes
        hidden = executor.run_layer(layer, hidden, positions, index, buf[layer, 0, :, :n], buf[layer, 1, :, :n])
        if q is not None:
            total += question_attention(executor, q, buf[layer, 0, :, :n]).cpu()
    return total / (executor.num_layers - first)


def question_attention(executor: LayerExecutor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Mean attention weight [N] that the question's queries (q [heads, nq, d], the last nq of
    the N positions, so every key before them is visible) give each key (k [kv_heads, N, d])."""
    kv_heads, total, dim = k.shape
    nq = q.shape[1]
    # the query heads sharing a key head attend to it together: no copy of the keys per head
    grouped = q.float().reshape(kv_heads, -1, dim)  # [kv_heads, group * nq, d]
    scores = (grouped @ k.float().transpose(-1, -2)) * executor.scale  # [kv_heads, group * nq, N]
    causal = torch.arange(total)[None, :] > torch.arange(total - nq, total)[:, None]
    scores = scores.view(kv_heads, -1, nq, total).masked_fill(causal.to(scores.device), float("-inf"))
    return torch.softmax(scores, dim=-1).mean(dim=(0, 1, 2))


class _GradualShrink:
    """Cuts the selection from its first size to ``budget`` over GRADUAL_LAYERS layers after the
    check layer, keeping the tokens that deviate most at each layer (sinks always kept)."""

    def __init__(
        self, executor: LayerExecutor, blend: CacheBlend, budget: int, n_question: int, protected: torch.Tensor,
        importance: torch.Tensor | None = None,
    ) -> None:
        self.protected = protected  # bool per sequence index: never dropped (sinks)
        self.importance = importance  # per sequence index, from the question-only pass (weight=qattn)
        self.executor = executor
        self.blend = blend
        self.budget = budget
        self.n_question = n_question

    def __call__(
        self, layer: int, hidden: torch.Tensor, positions: torch.Tensor, index: torch.Tensor, buf: torch.Tensor
    ) -> torch.Tensor | None:
        step = layer - self.blend.check_layer
        if not 1 <= step <= GRADUAL_LAYERS:
            return None
        n_context = index.shape[0] - self.n_question
        first = self.budget * GRADUAL_FACTOR
        target = max(self.budget, round(first - (first - self.budget) * step / GRADUAL_LAYERS))
        if n_context <= target:
            return None
        where = index[:n_context]
        _, k, v = self.executor.qkv(layer, hidden[:n_context], positions[:n_context])
        deviation = token_deviation(k, v, buf[layer, 0][:, where], buf[layer, 1][:, where], self.blend.selection).cpu()
        if self.importance is not None:
            deviation = _weighted(deviation, self.importance[where], self.blend.weight)
        deviation[self.protected[where]] = float("inf")
        keep = torch.zeros(index.shape[0], dtype=torch.bool)
        keep[torch.topk(deviation, target).indices] = True
        keep[n_context:] = True  # question tokens sit last in the sorted index
        return keep
