"""What Cache-Craft records about each chunk while a prompt is prefilled in full: per sampled
layer, how much attention the chunk's queries pay to the chunks before it (inter) and to its own
tokens (intra), how that inter attention splits over the preceding chunks, and per token how much
it attends outside its chunk (the tokens to recompute first when the context changes).

Only a few layers are sampled; on those, queries and keys are projected once more and attention
is computed one chunk at a time ([heads, chunk, keys up to the chunk's end]), never as one full
prompt-by-prompt matrix. The head (system prompt) counts as neither inter nor intra: it precedes
every chunk in every request."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chunkcache.blend.craft_math import cci
from chunkcache.blend.layout import Layout
from chunkcache.model.executor import LayerExecutor, Rows


@dataclass
class ChunkProfile:
    inter: list[float] = field(default_factory=list)  # per sampled layer
    intra: list[float] = field(default_factory=list)
    preceding: list[list[float]] = field(default_factory=list)  # per sampled layer, per preceding chunk
    token_inter: torch.Tensor | None = None  # [tokens], summed over sampled layers

    @property
    def cci(self) -> float:
        return cci(self.inter, self.intra)

    def preceding_weights(self) -> list[float]:
        """Mean attention to each preceding chunk over the sampled layers."""
        if not self.preceding or not self.preceding[0]:
            return []
        return [sum(layer[j] for layer in self.preceding) / len(self.preceding) for j in range(len(self.preceding[0]))]


def sampled_layers(num_layers: int, count: int = 4) -> list[int]:
    """``count`` layers spread over the depth (the first is skipped: it attends mostly to itself)."""
    if num_layers <= 1:
        return [0]
    count = max(1, min(count, num_layers - 1))
    return sorted({1 + round(i * (num_layers - 2) / max(count - 1, 1)) for i in range(count)})


class AttentionProfiler:
    """Pass as ``observe`` to `selective_prefill` of a full prefill (every index computed)."""

    def __init__(self, executor: LayerExecutor, layout: Layout, layers: list[int] | None = None) -> None:
        self.executor, self.layout = executor, layout
        self.layers = set(layers if layers is not None else sampled_layers(executor.num_layers))
        self.chunks = [ChunkProfile() for _ in layout.chunks]

    @torch.inference_mode()
    def __call__(self, layer: int, hidden: torch.Tensor, rows: Rows) -> None:
        if layer not in self.layers or not self.layout.chunks:
            return
        if len(rows) != self.layout.length:
            raise ValueError("AttentionProfiler needs a full prefill: every token computed")
        ex = self.executor
        q, k, _ = ex.qkv(layer, hidden, rows)
        group = ex.num_heads // ex.num_kv_heads
        first = self.layout.chunks[0].start
        for n, span in enumerate(self.layout.chunks):
            keys = k[:, : span.stop].repeat_interleave(group, dim=0).float()
            scores = (q[:, span.start : span.stop].float() @ keys.transpose(-1, -2)) * ex.scale
            keys_at = torch.arange(span.stop, device=q.device)
            own = keys_at[None, :] > keys_at[span.start : span.stop, None]
            probs = torch.softmax(scores.masked_fill(own[None], float("-inf")), dim=-1)
            mass = probs.mean(dim=0).cpu()  # [chunk tokens, keys], averaged over heads
            per_token_inter = mass[:, first : span.start].sum(dim=1)
            profile = self.chunks[n]
            profile.inter.append(float(per_token_inter.mean()))
            profile.intra.append(float(mass[:, span.start : span.stop].sum(dim=1).mean()))
            profile.preceding.append([float(mass[:, r.start : r.stop].sum(dim=1).mean())
                                      for r in self.layout.chunks[:n]])
            profile.token_inter = per_token_inter if profile.token_inter is None else profile.token_inter + per_token_inter
