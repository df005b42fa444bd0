"""`chunkcache eval --corpus-index`: every passage of a dataset file pooled into one chunk index,
as a corpus a deployment would hold, so a passage's neighbours come from the whole corpus and not
only from its own example's passages."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from chunkcache.eval.datasets import load_examples
from chunkcache.retriever import ChunkIndex, Embedder
from chunkcache.retriever.chunking import Chunk, content_hash


def corpus_index(dataset: Path, folder: Path, truncate: Callable[[str], str] | None = None,
                 embedder: Embedder | None = None) -> ChunkIndex:
    """An index in ``folder`` (replaced) of every distinct passage of ``dataset``, each passage one
    chunk of its own document, as the evaluation passes it to the engine (``truncate`` applied)."""
    chunks: dict[str, Chunk] = {}
    for example in load_examples(dataset, truncate=truncate):
        for text in example.chunks:
            chunk_id = content_hash(text)  # its own document: no other passage sits beside it
            chunks.setdefault(chunk_id, Chunk(chunk_id, chunk_id, text, {}))
    return ChunkIndex.build(folder, embedder, "Flat", chunks.values(), overwrite=True)
