"""Decoding from a fused cache: greedy or sampled, EOS and max-token stops, one token at a time."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from chunkcache.blend.layout import FusedCache
from chunkcache.errors import InvalidInputError
from chunkcache.model.executor import LayerExecutor


@dataclass(frozen=True)
class Sampling:
    """temperature 0 is greedy; otherwise softmax sampling with nucleus ``top_p``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise InvalidInputError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")


def pick_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cut = (torch.cumsum(sorted_probs, 0) - sorted_probs) >= sampling.top_p
        sorted_probs[cut] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs, 1, generator=generator))


def generate(
    executor: LayerExecutor,
    cache: FusedCache,
    logits: torch.Tensor,
    max_new_tokens: int,
    eos_token_ids: tuple[int, ...],
    sampling: Sampling = Sampling(),
) -> Iterator[int]:
    """Yield generated token ids; stops after an EOS token (which is yielded) or max_new_tokens."""
    generator = None
    if sampling.temperature > 0:
        generator = torch.Generator()
        if sampling.seed is not None:
            generator.manual_seed(sampling.seed)
        else:
            generator.seed()
    for step in range(max_new_tokens):
        token = pick_token(logits, sampling, generator)
        yield token
        if token in eos_token_ids or step == max_new_tokens - 1 or cache.length >= cache.capacity:
            return
        index = cache.length
        cache.length += 1
        hidden = executor.embed(torch.tensor([token]))
        position = torch.tensor([cache.next_position])
        cache.next_position += 1
        where = torch.tensor([index])
        for layer in range(executor.num_layers):
            keys, values = cache.layer(layer)
            hidden = executor.run_layer(layer, hidden, position, where, keys, values, cache.ape)
        logits = executor.logits(hidden)[0]
