"""Decoding from fused caches, many sequences at once: each step picks every sequence's next
token on the device (greedy or sampled; one read back for all), then runs one forward over all of
them, each attending over its own cache at its own length. `StopText` cuts the generated text
at stop sequences."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from chunkcache.blend.decode_graphs import table_decoder
from chunkcache.blend.layout import FusedCache
from chunkcache.device import upload
from chunkcache.errors import InvalidInputError
from chunkcache.model.executor import DecodeSlot, LayerExecutor


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

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


GREEDY_BELOW = 1e-5  # smaller temperatures overflow the scaled logits: treated as greedy (as vLLM does)


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """One token drawn from ``logits`` [vocab] (temperature, then nucleus ``top_p``), as a 0-d
    tensor on the logits' device: nothing is read back."""
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cut = (torch.cumsum(sorted_probs, 0) - sorted_probs) >= sampling.top_p
        cut[0] = False  # a top_p below float32's range (1e-313) rounds to 0 and would cut them all
        sorted_probs = sorted_probs.masked_fill(cut, 0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)[0]


@dataclass(eq=False)
class DecodeSequence:
    """One sequence being decoded: its fused cache, the logits its next token is chosen from, and
    when it ends (an EOS token, ``max_new_tokens``, a full cache, or `stop`)."""

    cache: FusedCache
    logits: torch.Tensor  # [vocab], on the model's device
    max_new_tokens: int
    eos_token_ids: tuple[int, ...]
    sampling: Sampling = Sampling()
    produced: int = 0
    done: bool = False
    last: int = -1
    generator: torch.Generator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not self.sampling.greedy and self.generator is None:
            # on the logits' device, so sampling reads nothing back; a seed therefore draws other
            # tokens on a GPU than on the CPU (each is reproducible on its own)
            self.generator = torch.Generator(self.logits.device)
            if self.sampling.seed is not None:
                self.generator.manual_seed(self.sampling.seed)
            else:
                self.generator.seed()

    def accept(self, token: int) -> None:
        """Take ``token`` as this sequence's next token."""
        self.last, self.produced = token, self.produced + 1
        if token in self.eos_token_ids or self.produced >= self.max_new_tokens or self.cache.length >= self.cache.capacity:
            self.done = True

    def stop(self) -> None:
        self.done = True


def pick_tokens(seqs: Sequence[DecodeSequence]) -> list[int]:
    """Every sequence's next token, chosen on the device and read back in one copy."""
    if not seqs:
        return []
    if all(s.sampling.greedy for s in seqs):
        return [int(t) for t in torch.stack([s.logits for s in seqs]).argmax(dim=-1).tolist()]
    picked = torch.stack([s.logits.argmax() if s.sampling.greedy else sample(s.logits, s.sampling, s.generator)
                          for s in seqs])  # type: ignore[arg-type]
    return [int(t) for t in picked.tolist()]


def advance(executor: LayerExecutor, seqs: Sequence[DecodeSequence]) -> None:
    """Feed every sequence its last accepted token in one batched forward: projections and MLP
    over all of them together; attention in one call over every sequence's own cache where the
    executor has a batched decoder (`blend.decode_graphs`: CUDA, graphs), else per sequence.
    Sets their logits."""
    if not seqs:
        return
    decoder = table_decoder(executor)
    logits = decoder.step(seqs) if decoder is not None and decoder.takes(seqs) else None
    if logits is not None:
        for i, s in enumerate(seqs):
            s.logits = logits[i]
            s.cache.length += 1
            s.cache.next_position += 1
        return
    host = torch.tensor([[s.last for s in seqs], [s.cache.length for s in seqs],
                         [s.cache.next_position for s in seqs]], dtype=torch.long)
    tokens, index, positions = upload(host, executor.device)
    slots = []
    for s in seqs:
        slots.append(DecodeSlot(s.cache.kv, s.cache.length, s.cache.ape))
        s.cache.length += 1
        s.cache.next_position += 1
    hidden = executor.embed(tokens)
    rows = executor.rows(index, positions)
    for layer in range(executor.num_layers):
        hidden = executor.decode_layer(layer, hidden, rows, slots)
    logits = executor.logits(hidden)
    for i, s in enumerate(seqs):
        s.logits = logits[i]


def step(executor: LayerExecutor, seqs: Sequence[DecodeSequence],
         accept: Callable[[DecodeSequence, int], None] | None = None) -> list[int]:
    """One decoding step of every unfinished sequence: pick their tokens, let ``accept`` see each
    (default: `DecodeSequence.accept`; it may end a sequence), then advance those still going."""
    live = [s for s in seqs if not s.done]
    tokens = pick_tokens(live)
    for s, token in zip(live, tokens):
        (accept or DecodeSequence.accept)(s, token)
    advance(executor, [s for s in live if not s.done])
    return tokens


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
