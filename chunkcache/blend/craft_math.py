"""Cache-Craft's measures (SIGMOD'25), as chunkcache computes them: how much a chunk's cache depends
on the chunks before it (CCI), how well a stored variant's preceding chunks match the current
ones (beta, with an order penalty gamma), and from these the share of the chunk to recompute (CFO);
and `ChunkPlan`, what they decide for one chunk (here, not in cachecraft.py, so the fusion
interface in base.py can name it).

- ``CCI = mean over layers of sigmoid(mean inter-chunk attention / mean intra-chunk attention)``,
  from the chunk's queries during a prefill in context. Note that it is at least 0.5 whenever the
  ratio is >= 0, so with ``alpha = 1`` a chunk in an entirely new context recomputes at least half
  its tokens; ``alpha`` scales the whole budget.
- ``beta`` = (attention mass the variant's chunk paid to preceding chunks that precede it now too
  / all its inter-chunk attention mass) x (share of the current preceding chunks the variant saw).
  Identical prefixes give 1; no common chunk gives 0.
- ``gamma`` = normalised Kendall-tau distance between the orders of the common preceding chunks
  (0: same order, 1: reversed); ``beta' = beta (1 - gamma)``.
- ``CFO = alpha * CCI * (1 - beta')``, clipped to [0, 1]; ``ceil(CFO * tokens)`` are recomputed."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from chunkcache.errors import InvalidInputError


def cci(inter: Sequence[float], intra: Sequence[float]) -> float:
    """Cache Context Impact from per-layer mean inter- and intra-chunk attention."""
    if len(inter) != len(intra) or not inter:
        raise InvalidInputError("cci needs one inter and one intra attention value per layer (at least one layer)")
    total = 0.0
    for a_inter, a_intra in zip(inter, intra):
        if a_inter < 0 or a_intra < 0:
            raise InvalidInputError("attention means cannot be negative")
        ratio = a_inter / a_intra if a_intra > 0 else (math.inf if a_inter > 0 else 0.0)
        total += 1.0 / (1.0 + math.exp(-ratio)) if ratio != math.inf else 1.0
    return total / len(inter)


def prefix_overlap(current: Sequence[str], stored: Sequence[str], weights: Mapping[str, float] | None = None) -> float:
    """beta: how much of what the stored variant attended to before it is there now, times how
    much of the current prefix the variant saw. ``weights``: the variant's inter-chunk attention
    to each of its preceding chunks (uniform when absent)."""
    if not current and not stored:
        return 1.0  # both at the start: the same (empty) context
    if not current or not stored:
        return 0.0
    now = set(current)
    w = {c: max(0.0, float((weights or {}).get(c, 1.0 if weights is None else 0.0))) for c in stored}
    mass = sum(w.values())
    kept = sum(v for c, v in w.items() if c in now)
    attended = kept / mass if mass > 0 else len(now & set(stored)) / len(set(stored))
    coverage = len(now & set(stored)) / len(now)
    return attended * coverage


def order_penalty(current: Sequence[str], stored: Sequence[str]) -> float:
    """gamma: normalised Kendall-tau distance of the common chunks' order (0 same, 1 reversed)."""
    where = {c: i for i, c in enumerate(stored)}
    common = [c for c in dict.fromkeys(current) if c in where]
    n = len(common)
    if n < 2:
        return 0.0
    ranks = [where[c] for c in common]
    discordant = sum(1 for i in range(n) for j in range(i + 1, n) if ranks[i] > ranks[j])
    return discordant / (n * (n - 1) / 2)


def effective_overlap(current: Sequence[str], stored: Sequence[str], weights: Mapping[str, float] | None = None) -> float:
    """beta' = beta (1 - gamma)."""
    return prefix_overlap(current, stored, weights) * (1.0 - order_penalty(current, stored))


def cfo(cci_value: float, beta_prime: float, alpha: float = 1.0) -> float:
    """Cache Fix Overhead: the share of the chunk's tokens to recompute."""
    if alpha < 0:
        raise InvalidInputError(f"alpha must be >= 0, got {alpha}")
    return min(1.0, max(0.0, alpha * cci_value * (1.0 - beta_prime)))


def tokens_to_recompute(cfo_value: float, tokens: int) -> int:
    return min(tokens, math.ceil(cfo_value * tokens - 1e-9))


@dataclass(frozen=True)
class ChunkPlan:
    variant: str  # cachecraft.INDEPENDENT or the variant's store key
    tokens: tuple[int, ...] | None  # chunk-relative tokens to recompute; None: CacheBlend's choice
    cci: float | None = None
    beta_prime: float | None = None
    cfo: float | None = None
    inter: tuple[float, ...] = ()  # per token, the recorded attention outside the chunk

    def to_dict(self) -> dict[str, object]:
        out = asdict(self)
        out["recomputed"] = None if self.tokens is None else len(self.tokens)
        del out["tokens"], out["inter"]
        return out
