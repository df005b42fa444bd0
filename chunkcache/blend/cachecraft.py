"""Cache-Craft as a fusion strategy: for each chunk, the stored variant whose preceding chunks best
match the current ones (or the independent cache), and only ``ceil(CFO x tokens)`` of its tokens
recomputed. Which tokens (``select``): ``qattn`` (default) ranks them by the inter-chunk attention
recorded with the variant times the attention the question pays each token in a question-only
pass over the reused cache (CacheBlend's weighting without its deviation probe); ``inter`` by the
recorded inter-chunk attention alone (the paper); ``blend`` by CacheBlend's run-time score (K+V
deviation x question attention). Chunks with no metadata yet fall back to CacheBlend's selection
at ``recompute_ratio`` of their tokens. The tokens not recomputed take a share of their chunk's
mean K/V correction (``spread_k`` / ``spread_v``, as in CacheBlend: `blend/spread.py`). See
`craft_math` for CCI, beta', CFO, `craft_profile` for where the metadata comes from and
`store.variants` for the variants."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from chunkcache.blend.base import FusionInput, FusionResult, StrategyHooks, VariantStore, finish
from chunkcache.blend.cacheblend import CacheBlend, check_qattn_from, reuse_attention
from chunkcache.blend.craft_math import ChunkPlan, cfo, effective_overlap, tokens_to_recompute
from chunkcache.blend.strategies import question_rows, reused_buffer
from chunkcache.blend.layout import sequential_layout
from chunkcache.blend.spread import check_shares, spread_hook
from chunkcache.errors import InvalidInputError
from chunkcache.device import upload
from chunkcache.model.executor import LayerExecutor
from chunkcache.kv import ChunkKV, VariantMeta
from chunkcache.timing import stage

INDEPENDENT = "independent"
SELECTS = ("inter", "blend", "qattn")


def plan_chunk(preceding: Sequence[str], tokens: int, variants: Sequence[VariantMeta], alpha: float = 1.0,
               available: Sequence[str] | None = None) -> ChunkPlan:
    """The variant to use for a chunk now preceded by ``preceding`` (chunk keys), and which of its
    ``tokens`` to recompute. ``available``: variant keys whose KV is in the store (default all).
    The independent cache counts as a variant seen behind no chunk."""
    usable = [v for v in variants if available is None or v.key in available]
    if not variants:
        return ChunkPlan(INDEPENDENT, None)
    scored = [(effective_overlap(preceding, v.preceding, dict(zip(v.preceding, v.weights))), v) for v in usable]
    best_beta, best = max(scored, key=lambda x: x[0], default=(-1.0, None))
    alone = effective_overlap(preceding, ())
    if best is None or alone > best_beta:
        meta = max(variants, key=lambda v: v.hits)  # the chunk's sensitivity is known from any variant
        beta, name = alone, INDEPENDENT
    else:
        meta, beta, name = best, best_beta, best.key
    share = cfo(meta.cci, beta, alpha)
    count = tokens_to_recompute(share, tokens)
    inter = tuple(meta.token_inter[:tokens]) if len(meta.token_inter) >= tokens else (0.0,) * tokens
    chosen = tuple(sorted(int(i) for i in torch.topk(torch.tensor(inter), count).indices)) if count else ()
    return ChunkPlan(name, chosen, meta.cci, beta, share, inter)


@dataclass(frozen=True)
class CacheCraft(StrategyHooks):
    alpha: float = 1.0
    recompute_ratio: float = 0.15  # chunks without metadata: CacheBlend's budget for them
    check_layer: int = 1
    # which of a chunk's tokens to recompute (module docstring): qattn beat the paper's inter on
    # both 40-example recurring evals (docs/quality.md)
    select: str = "qattn"
    # fraction of the depth the question's attention is averaged from (CacheBlend's qattn_from);
    # cachecraft's evals were made with every layer, so it keeps 0 until it is measured
    qattn_from: float = 0.0
    # CacheBlend's spread of each chunk's mean correction over its reused tokens (blend/spread.py):
    # on the recurring workload at alpha 0.3 it lowered the KL on 32 of 40 HotpotQA and 26 of 40
    # MuSiQue examples (means -18 %, -11 %) at the same work (docs/quality.md); 0 turns it off
    spread_k: float = 0.25
    spread_v: float = 0.25
    name = "cachecraft"
    uses_cache = True

    def before_load(self, keys: Sequence[str], chunks: Sequence[tuple[int, ...]],
                    variants: Callable[[], VariantStore]) -> tuple[list[ChunkKV | None] | None, tuple[ChunkPlan, ...]]:
        """Each chunk's plan, and the variant that serves it (those need no independent cache)."""
        kvs, plans = variants().plans(keys, chunks, self.alpha)
        return kvs, tuple(plans)

    def __post_init__(self) -> None:
        if self.alpha < 0 or not 0.0 <= self.recompute_ratio <= 1.0:
            raise InvalidInputError("cachecraft needs alpha >= 0 and recompute_ratio in [0, 1]")
        check_qattn_from(self.qattn_from)
        check_shares(self.spread_k, self.spread_v)
        if self.select not in SELECTS:
            raise InvalidInputError(f"cachecraft select must be one of {', '.join(SELECTS)}, got {self.select!r}")

    def fuse(self, executor: LayerExecutor, inp: FusionInput) -> FusionResult:
        layout = sequential_layout(inp.pieces, executor.device)
        buf = reused_buffer(executor, layout, inp)
        plans: Sequence[ChunkPlan | None] = inp.plans or (None,) * len(layout.chunks)
        question = question_rows(executor, layout)
        picked = [question.index]
        by_blend = [i for i, p in enumerate(plans)
                    if p is None or p.tokens is None or (self.select == "blend" and p.tokens)]
        work = 0
        importance = None  # the question's attention per token, from a question-only pass
        if by_blend:
            blend = CacheBlend(self.recompute_ratio, self.check_layer, gradual=False, qattn_from=self.qattn_from)
            score, importance, work = blend.scores(executor, layout, buf)
            for i in by_blend:
                span, plan = layout.chunks[i], plans[i]
                if plan is None or plan.tokens is None:
                    count = min(len(span), round(self.recompute_ratio * len(span)))
                else:
                    count = len(plan.tokens)
                if count:
                    picked.append(span.start + torch.topk(score[span.start : span.stop], count).indices)
        rest = [i for i, p in enumerate(plans) if p is not None and p.tokens and i not in by_blend]
        if self.select == "qattn" and rest and importance is None:
            with stage("select_s"):
                importance = reuse_attention(executor, layout, buf, self.qattn_from)
            work += executor.num_layers * len(layout.question)
        if self.select != "qattn":  # the recorded choice: known on the host
            chosen = [layout.chunks[i].start + torch.tensor(plans[i].tokens, dtype=torch.long) for i in rest]
            if chosen:
                picked.append(upload(torch.cat(chosen), executor.device))
        elif rest:
            # the tiny floor lets question attention rank tokens with no recorded inter score
            inter = upload(torch.cat([torch.tensor(plans[i].inter) + 1e-6 for i in rest]), executor.device)
            start = 0
            for i in rest:
                span, count = layout.chunks[i], len(plans[i].tokens)
                score = inter[start : start + len(span)] * importance[span.start : span.stop]
                picked.append(span.start + torch.topk(score, count).indices)
                start += len(span)
        # the picks are disjoint (one set per chunk, the question apart): sorting them is enough
        rows = layout.rows(executor, torch.sort(torch.cat(picked)).values)
        spread = spread_hook(executor, layout, self.spread_k, self.spread_v)
        return finish(executor, layout, buf, rows, extra_work=work, before_write=spread)
