"""How `ChunkIndex.search` ranks: the retrieval modes (dense = faiss, lexical = BM25, hybrid =
both, fused), the fusion of the two ranked lists (reciprocal rank fusion or a weighted sum of
min-max normalised scores), the link step of hybrid search, and the text a chunk is indexed under
(its document's title, then its text: the title goes into both indexes, never into the text that
is fused).

The link step is for multi-hop questions ("what did the woman who played X later become?"): the
passage that answers is about an entity that the first passage names but the question does not.
So after fusing, a candidate chunk whose document title is named (`LexicalIndex.named_in`) by
one of the best ``link_hops`` hits gains ``link_weight`` times its own fused score, once per hit
naming it. Only candidates gain (chunks one retriever found for the question): a link amplifies
relevance and cannot bring in a chunk unrelated to the question, so texts naming many titles do
not flood the top (measured against a flat bonus: docs/results.md)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chunkcache.config import Settings
from chunkcache.errors import InvalidInputError
from chunkcache.retriever.lexical import BM25Params

MODES = ("dense", "lexical", "hybrid")
FUSIONS = ("rrf", "weighted")
_HEADING = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+(.+?)[ \t#]*$", re.M)
_FILE_FORMATS = ("text", "markdown", "html")
_DEFAULTS = Settings()  # documents that are whole files: their name says what they are


@dataclass(frozen=True)
class SearchOptions:
    """How a `ChunkIndex` searches when a call names no mode (Settings: retrieval, fusion, ...)."""

    # defaults are Settings' (config.py says what each is and why): one place for them
    retrieval: str = Settings.retrieval
    fusion: str = Settings.fusion
    rrf_k: int = Settings.rrf_k  # RRF's damping constant
    candidates: int = Settings.fusion_candidates  # per retriever, before fusion (at least k)
    dense_weight: float = Settings.dense_weight  # the dense list's share in either fusion; lexical gets the rest
    link_hops: int = Settings.link_hops  # hybrid: the best hits whose named titles are followed (0: no link step)
    link_weight: float = Settings.link_weight  # a named candidate's score grows by this times itself, per naming hit
    bm25: BM25Params = field(default_factory=BM25Params)

    def __post_init__(self) -> None:
        check_mode(self.retrieval)
        if self.fusion not in FUSIONS:
            raise InvalidInputError(f"fusion must be one of {', '.join(FUSIONS)}, got {self.fusion!r}")
        if (self.rrf_k < 0 or self.candidates < 1 or not 0.0 <= self.dense_weight <= 1.0
                or self.link_hops < 0 or self.link_weight < 0):
            raise InvalidInputError(
                f"need rrf_k >= 0, candidates >= 1, 0 <= dense_weight <= 1, link_hops >= 0 and "
                f"link_weight >= 0; got rrf_k={self.rrf_k}, candidates={self.candidates}, "
                f"dense_weight={self.dense_weight}, link_hops={self.link_hops}, link_weight={self.link_weight}"
            )
        if self.bm25.k1 < 0 or not 0.0 <= self.bm25.b <= 1.0:
            raise InvalidInputError(f"need bm25 k1 >= 0 and 0 <= b <= 1, got {self.bm25}")

    @classmethod
    def from_settings(cls, settings: Settings, retrieval: str | None = None) -> SearchOptions:
        """The options `Settings` names (retrieval, fusion, rrf_k, ...); ``retrieval`` overrides its mode."""
        return cls(retrieval=retrieval or settings.retrieval, fusion=settings.fusion, rrf_k=settings.rrf_k,
                   candidates=settings.fusion_candidates, dense_weight=settings.dense_weight,
                   link_hops=settings.link_hops, link_weight=settings.link_weight,
                   bm25=BM25Params(settings.bm25_k1, settings.bm25_b))


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidInputError(f"retrieval must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class Fused:
    """One fused result: the chunk's int id, its fused score, and its 1-based rank in each
    retriever's list that found it."""

    id: int
    score: float
    ranks: dict[str, int]


def fuse(lists: Mapping[str, Sequence[tuple[int, float]]], k: int, options: SearchOptions,
         named: Callable[[int], Iterable[int]] | None = None) -> list[Fused]:
    """The ``k`` best of the retrievers' ranked (id, score) lists, best first, after the link step
    when ``named`` (chunk id -> ids of the chunks whose title it names) is given; a chunk lifted
    by a link has rank "link": the rank of the first hit naming it. Equal fused scores
    (common in RRF: two chunks each first in one list and second in the other) go to the dense
    list's order, then to the smaller id, so the ranking is the same on every run and machine."""
    weights = {"dense": options.dense_weight, "lexical": 1.0 - options.dense_weight}
    scores: dict[int, float] = {}
    ranks: dict[int, dict[str, int]] = {}
    for name, ranked in lists.items():
        norm = _normalised([s for _, s in ranked]) if options.fusion == "weighted" else []
        for rank, (cid, _) in enumerate(ranked, 1):
            part = norm[rank - 1] if options.fusion == "weighted" else 1.0 / (options.rrf_k + rank)
            scores[cid] = scores.get(cid, 0.0) + weights[name] * part
            ranks.setdefault(cid, {})[name] = rank
    if named is not None and options.link_hops:
        boosts: dict[int, float] = {}
        for hop, cid in enumerate(_ordered(scores, ranks)[:options.link_hops], 1):
            for other in named(cid):
                if other != cid and other in scores:
                    boosts[other] = boosts.get(other, 0.0) + options.link_weight * scores[other]
                    ranks[other].setdefault("link", hop)
        for cid, boost in boosts.items():  # added after the walk: a link does not lead on to another
            scores[cid] = scores.get(cid, 0.0) + boost
    return [Fused(cid, scores[cid], ranks[cid]) for cid in _ordered(scores, ranks)[:k]]


def _ordered(scores: dict[int, float], ranks: dict[int, dict[str, int]]) -> list[int]:
    unranked = len(scores) + 1
    return sorted(scores, key=lambda cid: (-scores[cid], ranks[cid].get("dense", unranked), cid))


def _normalised(values: list[float]) -> list[float]:
    """Min-max to [0, 1] (all 1 when they are equal), so cosine and BM25 scores can be added."""
    if not values:
        return []
    low, high = min(values), max(values)
    return [1.0 if high == low else (v - low) / (high - low) for v in values]


def title_of(text: str, metadata: Mapping[str, Any], doc_id: str) -> str | None:
    """A document's title: its ``title`` metadata (HTML <title>, a jsonl field), else its first
    Markdown heading, else, for a file, its name without the extension; None for other records."""
    title = metadata.get("title")
    if isinstance(title, str) and title.strip():
        return " ".join(title.split())
    heading = _HEADING.search(text)
    if heading:
        return heading.group(1).strip()
    if metadata.get("format") in _FILE_FORMATS:
        return Path(str(metadata.get("source") or doc_id)).stem.replace("_", " ").replace("-", " ")
    return None


def indexed_text(text: str, title: str | None) -> str:
    """What both indexes see of a chunk: its title on a line before it (unless the chunk already
    starts with it), so a chunk cut from the middle of a page still matches its subject."""
    if not title or text.lstrip().startswith(title):
        return text
    return f"{title}\n{text}"
