"""Decoding from a fused cache: greedy or sampled, EOS and max-token stops, one token at a time;
and `StopText`, which cuts the generated text at stop sequences."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
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
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise InvalidInputError(f"seed must fit in 64 bits (signed), got {self.seed}")


GREEDY_BELOW = 1e-5  # smaller temperatures overflow the scaled logits: treated as greedy (as vLLM does)


def pick_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.temperature < GREEDY_BELOW:
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
    if sampling.temperature >= GREEDY_BELOW:
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
        position = torch.arange(cache.next_position, cache.next_position + 1, device=executor.device)
        cache.next_position += 1
        rows = executor.span_rows(range(index, index + 1), position)
        for layer in range(executor.num_layers):
            keys, values = cache.layer(layer)
            hidden = executor.run_layer(layer, hidden, rows, keys, values, cache.ape)
        logits = executor.logits(hidden)[0]


class StopText:
    """Passes text pieces on, stops generation at a stop sequence or when the request is
    cancelled, and keeps the text up to the stop sequence."""

    def __init__(self, stop: tuple[str, ...], on_text: Callable[[str], bool | None] | None,
                 cancelled: threading.Event | None) -> None:
        self.stop, self.on_text, self.cancelled = stop, on_text, cancelled
        self.text = ""
        self.stopped = False
        self._sent = 0
        self._longest = max((len(x) for x in stop), default=0)

    def __call__(self, piece: str) -> bool:
        if self.cancelled is not None and self.cancelled.is_set():
            self.stopped = True
            return True
        since = max(0, len(self.text) - self._longest + 1)  # a new match must end in the new piece
        self.text += piece
        end = min((i for i in (self.text.find(x, since) for x in self.stop if x) if i >= 0), default=-1)
        if end >= 0:
            self.text, self.stopped = self.text[:end], True
        # hold back what could still become a stop sequence
        hold = 0 if self.stopped else max(self._longest - 1, 0)
        ready = len(self.text) - hold
        if self.on_text is not None and ready > self._sent:
            if self.on_text(self.text[self._sent : ready]):
                self.stopped = True
            self._sent = ready
        return self.stopped

    def flush(self) -> str:
        """Text held back at the end (the answer ended without reaching a stop sequence)."""
        rest, self._sent = self.text[self._sent :], len(self.text)
        return rest
