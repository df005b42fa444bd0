"""The lexical index beside faiss: Okapi BM25 over the same chunks, keyed by the same int64 ids
faiss uses, in plain numpy (no scipy, no pickle).

Tokenisation (stated, because BM25 matches only what it splits alike): Unicode NFKD with the
combining marks dropped ("Pokémon" = "Pokemon"), case-folded, then every run of word characters
(``\\w+``: letters, digits, underscore) is a token. No stemming and no stop list: the inverse
document frequency already weighs "the" down, and exact names and numbers are what lexical search
is for.

It also keeps each chunk's document title, to tell which chunks a text names by their title
(`named_in`: the link step of hybrid search, fusion.py).

On disk: ``DIR/lexical.npz`` (numpy arrays only, loaded with ``allow_pickle=False``): the chunk
ids, per-chunk term counts (rows in CSR form), the vocabulary and the titles as "\\n"-joined UTF-8
bytes, the tokeniser's name and the docstore generation the file belongs to. It is written to a
temporary file, fsynced and renamed over the old one, like index.faiss. Raw counts are stored, not
scores, so adding and removing chunks only adds and drops rows; idf and the mean length are worked
out again for each version. Instances never change: `added` and `removed` return new ones, so a
failed commit leaves the searched index as it was."""

from __future__ import annotations

import logging
import os
import re
import unicodedata
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chunkcache.config import Settings
from chunkcache.retriever.errors import IndexCorruptError

log = logging.getLogger(__name__)

LEXICAL_FILE = "lexical.npz"
TOKENIZER = "nfkd-casefold-word-v1"  # bump when `tokenize` changes: older files are rebuilt
_WORD = re.compile(r"\w+")
_MAX_TITLE_TOKENS = 12  # longer titles are not looked for in texts: it bounds the n-gram scan


def tokenize(text: str) -> list[str]:
    """The BM25 tokens of a text (see the module docstring)."""
    folded = unicodedata.normalize("NFKD", text)
    folded = "".join(ch for ch in folded if not unicodedata.combining(ch)).casefold()
    return _WORD.findall(folded)


@dataclass(frozen=True)
class BM25Params:
    """Okapi BM25's term-frequency saturation ``k1`` and length normalisation ``b`` (defaults:
    Settings' bm25_k1, bm25_b)."""

    k1: float = Settings.bm25_k1
    b: float = Settings.bm25_b


class LexicalIndex:
    """BM25 over chunks: rows of term counts, an inverted view built once per version."""

    def __init__(self, ids: np.ndarray, row_ptr: np.ndarray, terms: np.ndarray, counts: np.ndarray,
                 vocab: Sequence[str], titles: Sequence[str], generation: int = 0) -> None:
        self.ids = np.asarray(ids, dtype=np.int64)
        self.titles = [" ".join(t.split()) for t in titles]  # one line each, as the file stores them
        self.row_ptr = np.asarray(row_ptr, dtype=np.int64)
        self.terms = np.asarray(terms, dtype=np.int32)
        self.counts = np.asarray(counts, dtype=np.float32)
        if len(self.row_ptr) != len(self.ids) + 1 or len(self.titles) != len(self.ids):
            raise IndexCorruptError(f"lexical index rows disagree: {len(self.ids)} ids, {len(self.row_ptr) - 1} "
                                    f"rows, {len(self.titles)} titles; it is rebuilt from the docstore")
        self.vocab = list(vocab)
        self.generation = generation
        self._term_ids = {t: i for i, t in enumerate(self.vocab)}
        lengths = np.zeros(len(self.ids), dtype=np.float32)
        if len(self.ids):
            np.add.at(lengths, self._rows(), self.counts)
        self.lengths = lengths
        # the inverted view: postings of term t are post_rows/post_counts[term_ptr[t]:term_ptr[t+1]]
        order = np.argsort(self.terms, kind="stable")
        self._post_rows = self._rows()[order]
        self._post_counts = self.counts[order]
        self._term_ptr = np.concatenate([[0], np.cumsum(np.bincount(self.terms, minlength=len(self.vocab)))])
        df = np.diff(self._term_ptr).astype(np.float64)
        self._idf = np.log1p((len(self.ids) - df + 0.5) / (df + 0.5))  # Lucene's: never negative
        self._titled: dict[tuple[str, ...], list[int]] = {}  # title tokens -> chunk ids
        for cid, title in zip(self.ids.tolist(), self.titles):
            key = tuple(tokenize(title))
            if 0 < len(key) <= _MAX_TITLE_TOKENS:
                self._titled.setdefault(key, []).append(cid)
        self._longest = max((len(key) for key in self._titled), default=0)
        self._title_starts = {key[0] for key in self._titled}  # most words start no title: skipped at once

    @classmethod
    def empty(cls, generation: int = 0) -> LexicalIndex:
        return cls(np.zeros(0), np.zeros(1), np.zeros(0), np.zeros(0), [], [], generation)

    def _rows(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.ids)), np.diff(self.row_ptr))

    def __len__(self) -> int:
        return len(self.ids)

    # ---- versions --------------------------------------------------------------------------------
    def added(self, ids: Sequence[int], texts: Sequence[str], titles: Sequence[str] | None = None) -> LexicalIndex:
        """A new version with these chunks (id, text to index, document title or "") added as rows."""
        vocab, term_ids = list(self.vocab), dict(self._term_ids)
        row_ptr, terms, counts = [int(self.row_ptr[-1])], [], []
        for text in texts:
            for token, n in sorted(Counter(tokenize(text)).items()):
                if token not in term_ids:
                    term_ids[token] = len(vocab)
                    vocab.append(token)
                terms.append(term_ids[token])
                counts.append(n)
            row_ptr.append(row_ptr[0] + len(terms))
        return LexicalIndex(
            np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)]),
            np.concatenate([self.row_ptr, np.asarray(row_ptr[1:], dtype=np.int64)]),
            np.concatenate([self.terms, np.asarray(terms, dtype=np.int32)]),
            np.concatenate([self.counts, np.asarray(counts, dtype=np.float32)]),
            vocab, [*self.titles, *(titles if titles is not None else [""] * len(texts))], self.generation,
        )

    def removed(self, ids: Sequence[int] | np.ndarray) -> LexicalIndex:
        """A new version without the rows of these ids; terms no row uses any more leave the vocabulary."""
        keep_row = ~np.isin(self.ids, np.asarray(ids, dtype=np.int64))
        if keep_row.all():
            return self
        keep = keep_row[self._rows()]
        terms = self.terms[keep]
        used = np.unique(terms)
        remap = np.full(len(self.vocab), -1, dtype=np.int32)
        remap[used] = np.arange(len(used), dtype=np.int32)
        row_ptr = np.concatenate([[0], np.cumsum(np.diff(self.row_ptr)[keep_row])])
        return LexicalIndex(self.ids[keep_row], row_ptr, remap[terms], self.counts[keep],
                            [self.vocab[i] for i in used], [t for t, k in zip(self.titles, keep_row) if k],
                            self.generation)

    def at_generation(self, generation: int) -> LexicalIndex:
        return LexicalIndex(self.ids, self.row_ptr, self.terms, self.counts, self.vocab, self.titles, generation)

    def named_in(self, text: str) -> set[int]:
        """Ids of the chunks whose document title the text names (whole words, folded as tokens)."""
        tokens = tokenize(text)
        found: set[int] = set()
        for start, token in enumerate(tokens):
            if token in self._title_starts:
                for end in range(start + 1, min(start + self._longest, len(tokens)) + 1):
                    found.update(self._titled.get(tuple(tokens[start:end]), ()))
        return found

    # ---- search --------------------------------------------------------------------------------
    def search(self, query: str, k: int, params: BM25Params) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the ``k`` best chunks with a score above 0, best first; ties go to the
        smaller id so that the ranking never depends on insertion order."""
        found = [self._term_ids[t] for t in tokenize(query) if t in self._term_ids]
        if not found or not len(self.ids):
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.int64)
        scores = np.zeros(len(self.ids), dtype=np.float64)
        norm = params.k1 * (1.0 - params.b + params.b * self.lengths / max(float(self.lengths.mean()), 1e-9))
        for term, times in Counter(found).items():  # a word asked twice counts twice, as in Lucene
            a, b = self._term_ptr[term], self._term_ptr[term + 1]
            rows, tf = self._post_rows[a:b], self._post_counts[a:b]
            scores[rows] += times * self._idf[term] * tf * (params.k1 + 1.0) / (tf + norm[rows])
        hit = np.flatnonzero(scores > 0)
        if len(hit) > k:
            hit = hit[np.argpartition(-scores[hit], k - 1)[:k]]
            # argpartition keeps any k of tied scores at the cut: widen to every tie, then sort
            hit = np.flatnonzero(scores >= scores[hit].min())
        order = np.lexsort((self.ids[hit], -scores[hit]))[:k]
        return scores[hit][order].astype(np.float32), self.ids[hit][order]

    # ---- disk ----------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        """Write atomically: a temporary file beside ``path``, fsync, rename."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, ids=self.ids, row_ptr=self.row_ptr, terms=self.terms, counts=self.counts,
                         vocab=_bytes("\n".join(self.vocab)), titles=_bytes("\n".join(self.titles)),
                         tokenizer=_bytes(TOKENIZER),
                         generation=np.array(self.generation, dtype=np.int64))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> LexicalIndex | None:
        """The saved index, or None where there is none, it is damaged, or another tokeniser
        wrote it: it holds nothing the docstore does not, so the caller rebuilds it."""
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if _text(data["tokenizer"]) != TOKENIZER:
                    log.info("%s was written by tokeniser %r: rebuilding it", path, _text(data["tokenizer"]))
                    return None
                vocab, ids = _text(data["vocab"]), data["ids"]
                titles = _text(data["titles"]).split("\n") if len(ids) else []
                return cls(ids, data["row_ptr"], data["terms"], data["counts"], vocab.split("\n") if vocab else [],
                           titles, int(data["generation"]))
        except (OSError, KeyError, ValueError, IndexError) as exc:
            log.warning("cannot read %s (%s): rebuilding it from the docstore", path, exc)
            return None


def _bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def _text(array: np.ndarray) -> str:
    return array.tobytes().decode("utf-8")
