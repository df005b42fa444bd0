"""CacheBlend: recompute the tokens whose reused KV deviates most from a fresh computation.

A probe runs the first ``check_layer`` layers on every token and computes fresh K and V at the
check layer; the ``recompute_ratio`` share of context tokens that deviate most, plus the question,
are then computed at every layer, their K/V replacing the reused ones. Options:

- ``selection``: rank by K deviation (``k``, the paper), V (``v``), both normalised and summed
  (``kv``), by the question's attention alone (``qattn``: no deviation probe and no gradual
  filtering; the question-only pass is the whole probe, as ProphetKV / QCFuse choose), or spend
  the same budget on random tokens (``random``, a control).
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
- ``qattn_to``: the question-only pass stops at this fraction of the depth (1: it runs every
  layer): a cheaper probe that reads the question's attention earlier (QCFuse / ProphetKV read it
  at a few layers); at 0.5 it read it too early on Qwen2.5-0.5B (MuSiQue KL +59 %, docs/quality.md).
- ``spread_k`` / ``spread_v``: at every layer, each chunk's reused tokens take this share of the
  mean K / V correction its recomputed tokens receive (``blend/spread.py``): a chunk's tokens
  share part of what the passages before it change, and the recomputed tokens measure it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chunkcache.blend.base import FusionInput, FusionResult, StrategyHooks, finish
from chunkcache.blend.layout import FusedBuffer, Layout, sequential_layout
from chunkcache.blend.spread import check_shares, spread_hook
from chunkcache.blend.strategies import question_rows, reused_buffer
from chunkcache.errors import InvalidInputError
from chunkcache.device import upload
from chunkcache.model.executor import LayerExecutor, Rows
from chunkcache.timing import stage

GRADUAL_FACTOR = 2
GRADUAL_LAYERS = 4
SELECTIONS = ("k", "v", "kv", "qattn", "random")
# selections that rank without the deviation probe (so without gradual filtering either)
PROBELESS = ("qattn", "random")
WEIGHTS = ("none", "attn", "qattn", "qattn_add")


def token_deviation(
    fresh_k: torch.Tensor, fresh_v: torch.Tensor, old_k: torch.Tensor, old_v: torch.Tensor, selection: str,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token squared distance of fresh vs reused K and/or V ([kv_heads, n, d] each); ``valid``
    (bool [n]): the tokens whose mean normalises K's and V's parts (default all: padding rows of
    a fixed-shape fusion must not weigh in)."""
    dk = (fresh_k.float() - old_k.float()).pow(2).sum(dim=(0, 2)) if selection != "v" else None
    dv = (fresh_v.float() - old_v.float()).pow(2).sum(dim=(0, 2)) if selection != "k" else None
    if dk is None:
        return dv  # type: ignore[return-value]
    if dv is None:
        return dk
    return dk / masked_mean(dk, valid).clamp_min(1e-12) + dv / masked_mean(dv, valid).clamp_min(1e-12)


def masked_mean(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``x`` over the entries ``valid`` marks (all when None), computed on the device."""
    if valid is None:
        return x.mean()
    return torch.where(valid, x, 0.0).sum() / valid.sum().clamp_min(1)


@dataclass(frozen=True)
class CacheBlend(StrategyHooks):
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
    qattn_to: float = 1.0
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
        check_qattn_from(self.qattn_from, self.qattn_to)
        check_shares(self.spread_k, self.spread_v)
        if self.check_layer < 0 or self.sinks < 0:
            raise InvalidInputError("check_layer and sinks must be >= 0")

    def fuse(self, executor: LayerExecutor, inp: FusionInput) -> FusionResult:
        if self.check_layer >= executor.num_layers:
            raise InvalidInputError(
                f"check_layer {self.check_layer} is past the model's last layer ({executor.num_layers - 1})"
            )
        layout = sequential_layout(inp.pieces, executor.device)
        buf = reused_buffer(executor, layout, inp)
        context = layout.question.start
        budget = min(context, round(self.recompute_ratio * context))
        question = question_rows(executor, layout)
        if budget >= context:
            return finish(executor, layout, buf, layout.span_rows(executor, range(0, layout.length)))
        if budget == 0:
            return finish(executor, layout, buf, question)
        gradual = self.gradual and self.selection not in PROBELESS  # no deviation to filter by
        first = min(context, budget * GRADUAL_FACTOR) if gradual else budget
        weight = self.affordable_weight(executor, layout, budget)
        if weight is None:  # the probe alone would cost more than computing everything
            return finish(executor, layout, buf, layout.span_rows(executor, range(0, layout.length)))
        probe_work = 0
        importance = None
        if self.selection == "random":
            generator = torch.Generator().manual_seed(self.seed)
            score = upload(torch.rand(context, generator=generator), executor.device)
        else:
            score, importance, probe_work = self.scores(executor, layout, buf, weight)
        sinks = self._sink_mask(layout, executor.device)
        chosen = self._choose(score, layout, first, sinks)
        rows = layout.rows(executor, torch.sort(torch.cat([chosen, question.index])).values)
        shrink = None
        if gradual:
            shrink = _GradualShrink(executor, self, budget, len(question), sinks, importance)
        spread = spread_hook(executor, layout, self.spread_k, self.spread_v)
        return finish(executor, layout, buf, rows, shrink=shrink, extra_work=probe_work, before_write=spread)

    def affordable_weight(self, executor: LayerExecutor, layout: Layout, budget: int) -> str | None:
        """The weighting this request can afford: the configured one while the whole fusion
        (probe, question pass, recompute) costs fewer token-layers than a full prefill; without
        the question pass when only that keeps it under (a long question would be computed twice:
        once alone, once in the recompute); None when even the probe does not fit (tiny context,
        long question): then everything is computed, as full prefill would."""
        if self.selection == "random":
            return self.weight
        layers, question = executor.num_layers, len(layout.question)
        full = layers * layout.length
        probe = 0 if self.selection in PROBELESS else self.check_layer * layout.length
        plain = probe + layers * (question + budget)
        if plain > full:
            return None
        asked = self.weight.startswith("qattn") or self.selection == "qattn"
        if asked and plain + _depth(executor, self.qattn_to) * question > full:
            # selection=qattn has no probe but the question pass: nothing to fall back to
            return None if self.selection == "qattn" else "none"
        return self.weight

    def scores(self, executor: LayerExecutor, layout: Layout, buf: FusedBuffer, weight: str | None = None
               ) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """Per context token, how much recomputing it is worth (deviation, weighted by ``weight``,
        default the configured one); the question's attention per sequence index when it is
        qattn* (or the selection is); the probe's work. Both stay on the model's device, where the
        ranking runs too."""
        weight = self.weight if weight is None else weight
        context = layout.question.start
        alone = self.selection == "qattn"  # the question pass is the whole probe
        with stage("select_s"):
            importance = (reuse_attention(executor, layout, buf, self.qattn_from, self.qattn_to)
                          if alone or weight.startswith("qattn") else None)
            if importance is not None and alone:
                score = importance[:context]
            else:
                score = self._deviation(executor, layout, buf, weight)[:context]
                if importance is not None:
                    score = weighted(score, importance[:context], weight)
        work = 0 if alone else self.check_layer * layout.length
        if importance is not None:
            work += _depth(executor, self.qattn_to) * len(layout.question)
        return score, importance, work

    def _sink_mask(self, layout: Layout, device: torch.device) -> torch.Tensor | None:
        """Per sequence index, True for the first ``sinks`` tokens of every chunk (None: no sinks)."""
        if not self.sinks:
            return None
        mask = torch.zeros(layout.length, dtype=torch.bool)
        for span in layout.chunks:
            mask[span.start : min(span.stop, span.start + self.sinks)] = True
        return upload(mask, device)

    def _choose(self, score: torch.Tensor, layout: Layout, count: int, sinks: torch.Tensor | None) -> torch.Tensor:
        """``count`` context indices: forced sinks first, then the highest scores."""
        if sinks is not None:
            score = score.masked_fill(sinks[: score.shape[0]], float("inf"))
        if not self.per_chunk:
            return torch.topk(score, count).indices
        picks = [torch.empty(0, dtype=torch.long, device=score.device)]  # the head's cache is exact: never chosen
        total = sum(len(s) for s in layout.chunks)
        for span in layout.chunks:
            share = min(len(span), round(count * len(span) / max(total, 1)))
            picks.append(span.start + torch.topk(score[span.start : span.stop], share).indices)
        return torch.cat(picks)

    def _deviation(self, executor: LayerExecutor, layout: Layout, buf: FusedBuffer, weight: str) -> torch.Tensor:
        """Deviation of fresh vs reused K/V at the check layer, per token."""
        n = layout.length
        rows = layout.span_rows(executor, range(0, n))
        hidden = executor.embed(layout.device_ids)
        keys = torch.empty_like(buf.kv[0, 0, :, :n])
        values = torch.empty_like(keys)
        for layer in range(self.check_layer):
            hidden = executor.run_layer(layer, hidden, rows, keys, values)
        old = buf.layer(self.check_layer)[:, :, :n]
        if weight != "attn":
            k, v = executor.kv(self.check_layer, hidden, rows)
            return token_deviation(k, v, old[0], old[1], self.selection)
        q, k, v = executor.qkv(self.check_layer, hidden, rows)
        deviation = token_deviation(k, v, old[0], old[1], self.selection)
        return deviation * question_attention(executor, q[:, layout.question.start :], k)


def weighted(deviation: torch.Tensor, importance: torch.Tensor, weight: str, valid: torch.Tensor | None = None
             ) -> torch.Tensor:
    """Deviation weighted by the question's attention (``qattn``: times; ``qattn_add``: both
    normalised by their mean over ``valid``, added)."""
    if weight == "qattn_add":
        return (deviation / masked_mean(deviation, valid).clamp_min(1e-12)
                + importance / masked_mean(importance, valid).clamp_min(1e-12))
    return deviation * importance


def check_qattn_from(start: float, stop: float = 1.0) -> None:
    """``qattn_from`` .. ``qattn_to`` (the depths the question's attention is averaged over) must
    name at least one layer."""
    if not 0.0 <= start < 1.0:
        raise InvalidInputError(f"qattn_from is a fraction of the model's depth in [0, 1), got {start}")
    if not start < stop <= 1.0:
        raise InvalidInputError(f"qattn_to is a fraction of the model's depth in (qattn_from, 1], got {stop}")


def _depth(executor: LayerExecutor, fraction: float) -> int:
    """The layers before ``fraction`` of the depth (at least one)."""
    return max(1, min(executor.num_layers, round(fraction * executor.num_layers)))


def reuse_attention(executor: LayerExecutor, layout: Layout, buf: FusedBuffer, start: float = 0.0,
                    stop: float = 1.0) -> torch.Tensor:
    """Attention [N] the question pays to each token in a question-only pass over the reused
    cache, averaged over the layers from ``start`` to ``stop`` (fractions of the depth; the pass
    ends there), accumulated on the model's device. The pass's K/V land at the question's
    indices, which are recomputed later anyway and which no context token attends to."""
    n = layout.length
    rows = question_rows(executor, layout)
    hidden = executor.embed(layout.device_ids[layout.question.start : layout.question.stop])
    total = torch.zeros(n, device=executor.device)
    end = _depth(executor, stop)
    first = min(end - 1, int(start * executor.num_layers))

    def accumulate(q: torch.Tensor, keys: torch.Tensor) -> None:
        total.add_(question_attention(executor, q, keys))  # the keys hold the question's own by now

    for layer in range(end):
        kv = buf.layer(layer)
        # the layers before ``first`` only carry the hidden state on
        hidden = executor.run_layer(layer, hidden, rows, kv[0, :, :n], kv[1, :, :n],
                                    on_query=accumulate if layer >= first else None)
    return total / (end - first)


def question_attention(executor: LayerExecutor, q: torch.Tensor, k: torch.Tensor, index: torch.Tensor | None = None,
                       share: torch.Tensor | None = None) -> torch.Tensor:
    """Mean attention weight [N] that the question's queries (q [heads, nq, d]) give each key
    (k [kv_heads, N, d]). The queries sit at the last nq of the N positions, or at sequence
    ``index`` [nq] (each sees the keys up to its own); ``share`` [nq] weighs each query in the
    mean (default equal; a fixed-shape fusion gives its padding rows 0)."""
    kv_heads, total, dim = k.shape
    nq = q.shape[1]
    # the query heads sharing a key head attend to it together: no copy of the keys per head
    grouped = q.float().reshape(kv_heads, -1, dim)  # [kv_heads, group * nq, d]
    scores = (grouped @ k.float().transpose(-1, -2)) * executor.scale  # [kv_heads, group * nq, N]
    keys = torch.arange(total, device=scores.device)
    causal = keys[None, :] > (keys[total - nq :] if index is None else index)[:, None]
    probs = torch.softmax(scores.view(kv_heads, -1, nq, total).masked_fill(causal, float("-inf")), dim=-1)
    if share is None:
        return probs.mean(dim=(0, 1, 2))
    # a padding query's zero share must not meet a non-finite value (0 * NaN is NaN)
    return torch.where(share[:, None] > 0, probs.mean(dim=(0, 1)) * share[:, None], 0.0).sum(dim=0)


def gradual_target(budget: int, step: int) -> int:
    """Context rows the gradual filter keeps at its ``step``-th layer (1 .. GRADUAL_LAYERS), from
    twice the budget down to the budget; a selection already smaller stays as it is."""
    first = budget * GRADUAL_FACTOR
    return max(budget, round(first - (first - budget) * step / GRADUAL_LAYERS))


class _GradualShrink:
    """Cuts the selection from its first size to ``budget`` over GRADUAL_LAYERS layers after the
    check layer, keeping the tokens that deviate most at each layer (sinks always kept). Every
    size is known from the budget, so the host never reads the device to cut."""

    def __init__(
        self, executor: LayerExecutor, blend: CacheBlend, budget: int, n_question: int,
        protected: torch.Tensor | None, importance: torch.Tensor | None = None,
    ) -> None:
        self.protected = protected  # bool per sequence index: never dropped (sinks)
        self.importance = importance  # per sequence index, from the question-only pass (weight=qattn)
        self.executor = executor
        self.blend = blend
        self.budget = budget
        self.n_question = n_question

    def __call__(self, layer: int, hidden: torch.Tensor, rows: Rows, buf: FusedBuffer) -> torch.Tensor | None:
        step = layer - self.blend.check_layer
        if not 1 <= step <= GRADUAL_LAYERS:
            return None
        n_context = len(rows) - self.n_question
        target = gradual_target(self.budget, step)
        if n_context <= target:
            return None
        part = rows.first(n_context)
        k, v = self.executor.kv(layer, hidden[:n_context], part)
        where = part.index
        kv = buf.layer(layer)
        deviation = token_deviation(k, v, kv[0][:, where], kv[1][:, where], self.blend.selection)
        if self.importance is not None:
            deviation = weighted(deviation, self.importance[where], self.blend.weight)
        if self.protected is not None:
            deviation = deviation.masked_fill(self.protected[where], float("inf"))
        kept = torch.sort(torch.topk(deviation, target).indices).values
        # question tokens sit last in the sorted rows and are always kept
        return torch.cat([kept, torch.arange(n_context, len(rows), device=kept.device)])
