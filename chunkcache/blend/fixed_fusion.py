"""CacheBlend and reuse in fixed shapes (`chunkcache.blend.buckets`): the same arithmetic as
`CacheBlend.fuse` and `Reuse.fuse` for every real token, with the context, the question, the chunk
count and the selection padded to their bucket.

The fused sequence of a bucket is ``context + question + 1`` indices: head and chunks, the
question, padding, and last the scratch index that padding rows write to. The selection is two
fixed segments: context rows (the chosen tokens, sorted, then padding rows at the scratch index)
and question rows (the question, then padding). Choosing takes the bucket's count of top scores
and turns the ranks past the request's real count into padding; gradual filtering does the same at
each of its layers, so the real rows kept are exactly those the request's own shapes would keep.
Means that normalise deviations and weights run over the real tokens only.

What runs here: CacheBlend with selection ``k``, ``v`` or ``kv``, weight ``none``, ``qattn`` or
``qattn_add`` (sinks, gradual filtering and the spread included: today's defaults), and reuse.
Other options and strategies, budgets of 0 or everything, and prompts whose question pass or
probe would not pay run in the request's own shapes (`run_fusion` falls back)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from chunkcache.blend.base import FusionInput, FusionResult, FusionStrategy
from chunkcache.blend.buckets import BucketInputs, FixedShapes, Segments, bucket_of, fixed_shapes, next_power_of_two
from chunkcache.blend.cacheblend import (GRADUAL_FACTOR, GRADUAL_LAYERS, CacheBlend, _depth, gradual_target,
                                         question_attention, token_deviation, weighted)
from chunkcache.blend.layout import FusedCache, Layout, assemble_cache, sequential_layout
from chunkcache.blend.spread import ChunkShift
from chunkcache.blend.strategies import Reuse
from chunkcache.model.executor import LayerExecutor, Rows
from chunkcache.timing import stage

_MIN_CONTEXT = 64
_QUESTION_STEP = 16  # question rows are few: one bucket per 16 tokens keeps the captures few
_MIN_CHUNKS = 4
# scalars: context tokens, prompt tokens, context rows chosen, row of the last prompt token,
# then the context rows kept after each gradual step
_CONTEXT, _LENGTH, _CHOSEN, _LAST, _KEPT = range(5)


def question_bucket(n: int) -> int:
    return max(_QUESTION_STEP, -(-n // _QUESTION_STEP) * _QUESTION_STEP)


def chunk_bucket(n: int) -> int:
    return max(_MIN_CHUNKS, next_power_of_two(n))


def kept_rows(first: int, budget: int, steps: int) -> tuple[int, ...]:
    """Context rows after each of the gradual filter's first ``steps`` layers, from ``first``
    chosen (`CacheBlend`'s schedule: a step keeps what it has when that is already fewer)."""
    kept, now = [], first
    for step in range(1, steps + 1):
        now = min(now, gradual_target(budget, step))
        kept.append(now)
    return tuple(kept)


@dataclass(frozen=True)
class _Plan:
    """A request's real counts and its bucket's."""

    context: int
    question: int
    budget: int
    first: int
    targets: tuple[int, ...]  # real context rows after each gradual step (empty: no gradual filtering)
    weight: str
    bucket_context: int
    bucket_question: int
    bucket_chunks: int
    bucket_budget: int
    bucket_first: int
    bucket_targets: tuple[int, ...]

    @property
    def total(self) -> int:
        return self.bucket_context + self.bucket_question + 1

    @property
    def kept(self) -> int:
        """Real context rows at the last layer."""
        return self.targets[-1] if self.targets else self.first

    @property
    def bucket_kept(self) -> int:
        return self.bucket_targets[-1] if self.bucket_targets else self.bucket_first

    def key(self, strategy: FusionStrategy) -> tuple[Any, ...]:
        return (strategy, self.bucket_context, self.bucket_question, self.bucket_chunks, self.weight)


def _plan(strategy: FusionStrategy, executor: LayerExecutor, layout: Layout) -> _Plan | None:
    """The request's counts and bucket, or None when it runs in its own shapes."""
    context, question = layout.question.start, len(layout.question)
    if not question:  # nothing to read the first token from in a fixed row: the request's own shapes
        return None
    bucket_context, bucket_question = bucket_of(context, _MIN_CONTEXT), question_bucket(question)
    if isinstance(strategy, Reuse):
        return _Plan(context, question, 0, 0, (), "none", bucket_context, bucket_question, 0, 0, 0, ())
    if not isinstance(strategy, CacheBlend) or strategy.selection not in ("k", "v", "kv") or strategy.per_chunk:
        return None
    if strategy.weight not in ("none", "qattn", "qattn_add") or not layout.chunks:
        return None
    budget = min(context, round(strategy.recompute_ratio * context))
    weight = strategy.affordable_weight(executor, layout, budget) if 0 < budget < context else None
    if weight is None or weight == "attn":  # question only, everything, or a probe that does not pay
        return None
    factor = GRADUAL_FACTOR if strategy.gradual else 1
    first = min(context, budget * factor)
    bucket_budget = round(strategy.recompute_ratio * bucket_context)
    bucket_first = min(bucket_context, bucket_budget * factor)
    # the filter's layers that the model has
    steps = max(0, min(GRADUAL_LAYERS, executor.num_layers - 1 - strategy.check_layer)) if strategy.gradual else 0
    targets, bucket_targets = kept_rows(first, budget, steps), kept_rows(bucket_first, bucket_budget, steps)
    chunks = chunk_bucket(len(layout.chunks)) if strategy.spread_k or strategy.spread_v else 0
    return _Plan(context, question, budget, first, targets, weight, bucket_context, bucket_question, chunks,
                 bucket_budget, bucket_first, bucket_targets)


def _host_inputs(plan: _Plan, layout: Layout, strategy: FusionStrategy) -> torch.Tensor:
    """The request's values in the layout of `BucketInputs` (host memory)."""
    total, length = plan.total, layout.length
    scratch = total - 1
    ids = torch.zeros(total, dtype=torch.long)
    ids[:length] = layout.token_ids
    positions = torch.arange(total, dtype=torch.long)
    positions[:length] = layout.positions
    owner = torch.full((total,), plan.bucket_chunks, dtype=torch.long)
    protected = torch.zeros(total, dtype=torch.long)
    sinks = getattr(strategy, "sinks", 0)
    for i, span in enumerate(layout.chunks):
        owner[span.start : span.stop] = i
        protected[span.start : min(span.stop, span.start + sinks)] = 1
    question = torch.full((plan.bucket_question,), scratch, dtype=torch.long)
    question[: plan.question] = torch.arange(layout.question.start, layout.question.stop)
    last = plan.bucket_kept + plan.question - 1  # in the last layer's rows: context segment, then the question
    scalars = torch.tensor([plan.context, length, plan.first, last, *plan.targets], dtype=torch.long)
    return torch.cat((ids, positions, owner, protected, question, scalars))


def run_fusion(strategy: FusionStrategy, executor: LayerExecutor, inp: FusionInput) -> FusionResult:
    """``strategy.fuse``, in fixed shapes where this executor's fusion mode and the request allow."""
    runner = fixed_shapes(executor)
    if runner is None or not strategy.uses_cache or inp.profile:
        return strategy.fuse(executor, inp)
    layout = sequential_layout(inp.pieces)  # host only: the fixed path reads sizes and ids, never its device copy
    plan = _plan(strategy, executor, layout)
    if plan is None:
        return strategy.fuse(executor, inp)
    with runner.lock:
        return _Fusion(runner, executor, strategy, plan, layout, inp).run()


class _Fusion:
    """One fixed-shape fusion: fill the bucket's inputs, place the stored caches into the
    workspace, run the segments, copy the fused cache into the request's buffer."""

    def __init__(self, runner: FixedShapes, executor: LayerExecutor, strategy: FusionStrategy, plan: _Plan,
                 layout: Layout, inp: FusionInput) -> None:
        self.runner, self.ex, self.strategy, self.plan, self.layout, self.inp = runner, executor, strategy, plan, layout, inp
        self.buffer = inp.fused_buffer(executor, layout.length)  # checked before any work
        self.kv = runner.workspace(plan.total)
        self.inputs = runner.bucket_inputs(plan.total, plan.bucket_question, _KEPT + len(plan.targets))
        self.kv.zero_()  # what the request's own (zeroed) buffer would hold where nothing is placed
        self.fused = assemble_cache(executor, layout, inp.head_kv, inp.chunk_kvs, self.kv)

    def run(self) -> FusionResult:
        ex, plan, layout = self.ex, self.plan, self.layout
        self.runner.fill(self.inputs, _host_inputs(plan, layout, self.strategy))
        run = Segments(self.runner, plan.key(self.strategy))
        blend = self.strategy if isinstance(self.strategy, CacheBlend) else None
        extra = 0
        if blend is not None:
            with stage("select_s"):
                extra = self._select(run, blend)
        with stage("recompute_s"):
            self._recompute(run, blend)
            state = run.finish()
            logits = state["logits"][0].clone()
        buffer = self.buffer
        buffer[:, :, :, : layout.length].copy_(self.kv[:, :, :, : layout.length])
        work = self._real_work()
        cache = FusedCache(buffer, layout.length, int(layout.positions[-1]) + 1)
        return FusionResult(cache=cache, logits=logits, recomputed_tokens=round((work + extra) / ex.num_layers),
                            reused_tokens=layout.length - plan.kept - plan.question)

    # --- CacheBlend's probe and choice ----------------------------------------------------------
    def _select(self, run: Segments, blend: CacheBlend) -> int:
        """Question-only pass (when weighted by it), deviation probe, choice: the selection rows
        and their hidden states land in the state. Returns the probe's real work."""
        ex, inputs, kv = self.ex, self.inputs, self.kv
        work = blend.check_layer * self.layout.length
        if self.plan.weight.startswith("qattn"):
            end = _depth(ex, blend.qattn_to)
            first = min(end - 1, int(blend.qattn_from * ex.num_layers))
            run.segment(lambda s: s.update(_question_start(ex, inputs)))
            for layer in range(end):
                run.host(lambda layer=layer: self.fused.wait(layer))
                run.segment(lambda s, layer=layer: _question_layer(ex, kv, s, layer, layer >= first))
            run.segment(lambda s: s.update(importance=s.pop("total") / (end - first)))
            work += end * self.plan.question
        run.host(lambda: self.fused.wait(blend.check_layer))
        run.segment(lambda s: s.update(_choose(ex, blend, self.plan, inputs, kv, s.get("importance"))))
        return work

    # --- the selective loop -----------------------------------------------------------------
    def _recompute(self, run: Segments, blend: CacheBlend | None) -> None:
        ex, inputs, kv, plan = self.ex, self.inputs, self.kv, self.plan
        if blend is None:  # reuse: the question rows only
            run.segment(lambda s: s.update(_question_rows(ex, inputs), context_rows=0))
        elif blend.spread_k or blend.spread_v:
            shares = (blend.spread_k, blend.spread_v)
            run.segment(lambda s: s.update(spread=ChunkShift(ex, shares, inputs.owner, plan.bucket_chunks,
                                                             range(0, plan.total), inputs.positions, padded=True)))
        for layer in range(ex.num_layers):
            run.host(lambda layer=layer: self.fused.wait(layer))
            step = layer - blend.check_layer if blend is not None else 0
            shrink = 1 <= step <= len(plan.targets)
            run.segment(lambda s, layer=layer, step=step, shrink=shrink: _selective_layer(
                ex, blend, plan, inputs, kv, s, layer, step if shrink else 0))
        run.segment(lambda s: s.update(logits=ex.logits(s["hidden"].index_select(0, inputs.scalar(_LAST)))))

    def _real_work(self) -> int:
        """Token-layers the request's own shapes would have computed (padding not counted)."""
        plan, layers = self.plan, self.ex.num_layers
        check = getattr(self.strategy, "check_layer", 0)
        rows = [plan.first] * layers
        for step, kept in enumerate(plan.targets, start=1):
            for layer in range(check + step, layers):
                rows[layer] = kept
        return sum(rows) + layers * plan.question


def _question_rows(ex: LayerExecutor, inputs: BucketInputs) -> dict[str, Any]:
    index = inputs.question
    return {"rows": ex.rows(index, inputs.positions[index]), "hidden": ex.embed(inputs.ids[index])}


def _question_start(ex: LayerExecutor, inputs: BucketInputs) -> dict[str, Any]:
    rows = _question_rows(ex, inputs)
    real = (inputs.question != inputs.scratch).float()
    return {"q_rows": rows["rows"], "q_hidden": rows["hidden"], "q_share": real / real.sum(),
            "total": torch.zeros(inputs.total, device=real.device)}


def _question_layer(ex: LayerExecutor, kv: torch.Tensor, s: dict[str, Any], layer: int, counted: bool) -> None:
    """One layer of the question-only pass over the reused cache, accumulating the question's
    attention (its padding rows weigh 0)."""
    rows = s["q_rows"]

    def accumulate(q: torch.Tensor, keys: torch.Tensor) -> None:
        s["total"].add_(question_attention(ex, q, keys, rows.index, s["q_share"]))

    s["q_hidden"] = ex.run_layer(layer, s["q_hidden"], rows, kv[layer, 0], kv[layer, 1],
                                 on_query=accumulate if counted else None)


def _choose(ex: LayerExecutor, blend: CacheBlend, plan: _Plan, inputs: BucketInputs, kv: torch.Tensor,
            importance: torch.Tensor | None) -> dict[str, Any]:
    """The probe (every index through the layers before the check layer), the deviation there,
    the choice of the bucket's count of context rows (ranks past the real count: padding)."""
    total = inputs.total
    index = torch.arange(total, device=inputs.buffer.device)
    rows = ex.span_rows(range(0, total), inputs.positions)
    hidden = ex.embed(inputs.ids)
    keys, values = torch.empty_like(kv[0, 0]), torch.empty_like(kv[0, 1])
    for layer in range(blend.check_layer):
        hidden = ex.run_layer(layer, hidden, rows, keys, values)
    k, v = ex.kv(blend.check_layer, hidden, rows)
    score = token_deviation(k, v, kv[blend.check_layer, 0], kv[blend.check_layer, 1], blend.selection,
                            index < inputs.scalar(_LENGTH))
    context = index < inputs.scalar(_CONTEXT)
    if importance is not None:
        score = weighted(score, importance, plan.weight, context)
    score = score.masked_fill(~context, float("-inf"))
    if blend.sinks:
        score = score.masked_fill(inputs.protected != 0, float("inf"))
    chosen = torch.topk(score, plan.bucket_first).indices
    context_rows = _pad_ranks(chosen, inputs.scalar(_CHOSEN), inputs.scratch)
    selected = torch.cat((context_rows, inputs.question))
    return {"rows": ex.rows(selected, inputs.positions[selected]), "hidden": ex.embed(inputs.ids[selected]),
            "context_rows": plan.bucket_first, "importance": importance}


def _pad_ranks(ranked: torch.Tensor, real: torch.Tensor, scratch: int) -> torch.Tensor:
    """Indices ranked best first, those past the ``real`` best turned into the scratch index,
    sorted (the scratch ones last)."""
    keep = torch.arange(ranked.shape[0], device=ranked.device) < real
    return torch.sort(torch.where(keep, ranked, scratch)).values


def _selective_layer(ex: LayerExecutor, blend: CacheBlend | None, plan: _Plan, inputs: BucketInputs,
                     kv: torch.Tensor, s: dict[str, Any], layer: int, step: int) -> None:
    """One layer of the selective recompute (gradual filtering first at its layers)."""
    if step:
        _shrink(ex, blend, plan, inputs, kv, s, layer, step)  # type: ignore[arg-type]
    s["hidden"] = ex.run_layer(layer, s["hidden"], s["rows"], kv[layer, 0], kv[layer, 1],
                               before_write=s.get("spread"))


def _shrink(ex: LayerExecutor, blend: CacheBlend, plan: _Plan, inputs: BucketInputs, kv: torch.Tensor,
            s: dict[str, Any], layer: int, step: int) -> None:
    """Gradual filtering at one layer: keep the bucket's count of context rows, the request's
    real count of them the most deviating ones (sinks always), the rest padding."""
    rows, hidden, n = s["rows"], s["hidden"], s["context_rows"]
    part = rows.first(n)
    where = part.index
    real = where != inputs.scratch
    k, v = ex.kv(layer, hidden[:n], part)
    deviation = token_deviation(k, v, kv[layer, 0][:, where], kv[layer, 1][:, where], blend.selection, real)
    if s.get("importance") is not None:
        deviation = weighted(deviation, s["importance"][where], plan.weight, real)
    if blend.sinks:
        deviation = deviation.masked_fill(inputs.protected[where] != 0, float("inf"))
    deviation = deviation.masked_fill(~real, float("-inf"))
    target = plan.bucket_targets[step - 1]
    order = torch.topk(deviation, target).indices
    keep = torch.arange(target, device=order.device) < inputs.scalar(_KEPT + step - 1)
    index, at = torch.sort(torch.where(keep, where[order], inputs.scratch))
    taken = order[at]
    questions = torch.arange(n, len(rows), device=order.device)
    picked = torch.cat((taken, questions))
    gathered = rows.take(picked)
    s["rows"] = Rows(torch.cat((index, rows.index[n:])), gathered.positions, gathered.cos, gathered.sin)
    s["hidden"] = hidden[picked]
    s["context_rows"] = target
