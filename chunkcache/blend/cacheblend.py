"""CacheBlend: recompute the tokens whose reused KV deviates most from a fresh computation.

A probe runs the first ``check_layer`` layers on every token and computes fresh K (or V) at the
check layer; the ``recompute_ratio`` share of context tokens that deviate most, plus the question,
are then computed at every layer, their K/V replacing the reused ones. With ``gradual``, twice
the budget is chosen at first and cut down to it over the following layers by the deviation seen
at each layer, as in the paper. ``selection="random"`` spends the same budget on random tokens
(a control that shows the choice matters)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chunkcache.blend.base import FusionInput, FusionResult, finish
from chunkcache.blend.layout import Layout, sequential_layout
from chunkcache.blend.strategies import question_index, reused_buffer
from chunkcache.errors import InvalidInputError
from chunkcache.model.executor import LayerExecutor
from chunkcache.timing import stage

GRADUAL_FACTOR = 2
GRADUAL_LAYERS = 4


@dataclass(frozen=True)
class CacheBlend:
    recompute_ratio: float = 0.15
    check_layer: int = 1
    selection: str = "k"  # "k", "v" or "random"
    gradual: bool = False
    seed: int = 0
    name = "cacheblend"
    uses_cache = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.recompute_ratio <= 1.0:
            raise InvalidInputError(f"recompute_ratio must be in [0, 1], got {self.recompute_ratio}")
        if self.selection not in ("k", "v", "random"):
            raise InvalidInputError(f"selection must be 'k', 'v' or 'random', got {self.selection!r}")
        if self.check_layer < 0:
            raise InvalidInputError(f"check_layer must be >= 0, got {self.check_layer}")

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
        first = min(context, budget * GRADUAL_FACTOR) if self.gradual else budget
        probe_work = 0
        if self.selection == "random":
            generator = torch.Generator().manual_seed(self.seed)
            chosen = torch.randperm(context, generator=generator)[:first]
        else:
            with stage("select_s"):
                deviation = self._deviation(executor, layout, buf)
            probe_work = self.check_layer * layout.length
            chosen = torch.topk(deviation[:context], first).indices
        selected = torch.sort(torch.cat([chosen, question])).values
        shrink = _GradualShrink(executor, self, budget, len(question)) if self.gradual and self.selection != "random" else None
        return finish(executor, layout, buf, selected, shrink=shrink, extra_work=probe_work)

    def _deviation(self, executor: LayerExecutor, layout: Layout, buf: torch.Tensor) -> torch.Tensor:
        """Squared distance between fresh and reused K (or V) at the check layer, per token."""
        n = layout.length
        index = torch.arange(n)
        hidden = executor.embed(layout.token_ids)
        keys = torch.empty_like(buf[0, 0, :, :n])
        values = torch.empty_like(keys)
        for layer in range(self.check_layer):
            hidden = executor.run_layer(layer, hidden, layout.positions, index, keys, values)
        _, k, v = executor.qkv(self.check_layer, hidden, layout.positions)
        which = 1 if self.selection == "v" else 0
        fresh = v if which else k
        return (fresh.float() - buf[self.check_layer, which, :, :n].float()).pow(2).sum(dim=(0, 2))


class _GradualShrink:
    """Cuts the selection from its first size to ``budget`` over GRADUAL_LAYERS layers after the
    check layer, keeping the tokens whose fresh K deviates most at each layer."""

    def __init__(self, executor: LayerExecutor, blend: CacheBlend, budget: int, n_question: int) -> None:
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
        which = 1 if self.blend.selection == "v" else 0
        _, k, v = self.executor.qkv(layer, hidden[:n_context], positions[:n_context])
        fresh = v if which else k
        old = buf[layer, which][:, index[:n_context]]
        deviation = (fresh.float() - old.float()).pow(2).sum(dim=(0, 2))
        keep = torch.zeros(index.shape[0], dtype=torch.bool)
        keep[torch.topk(deviation, target).indices] = True
        keep[n_context:] = True  # question tokens sit last in the sorted index
        return keep
