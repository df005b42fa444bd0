"""Ingesting documents into an index, for `chunkcache ingest` (files and folders) and the service
(documents posted to it): chunk them with the serving model's tokenizer, embed and index them
(incremental: unchanged documents are skipped, changed ones replaced, deleted ones removed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chunkcache.config import Settings
from chunkcache.retriever import (
    Chunker, ChunkIndex, Document, IndexChangedError, IngestReport, UnknownDocumentError, read_documents,
)
from chunkcache.retriever.readers import document_id


CHUNK_TOKENS, OVERLAP_TOKENS = 256, 32  # chunk size and overlap, in the serving model's tokens


def model_tokenizer(settings: Settings) -> Any:
    """The serving model's tokenizer (chunks are counted in the tokens the model will see)."""
    from transformers import AutoTokenizer

    from chunkcache.model.registry import resolve_model_dir

    return AutoTokenizer.from_pretrained(str(resolve_model_dir(settings.model, settings.models_dir)))


def add_documents(index: ChunkIndex, documents: Sequence[Document], tokenizer: Any, model_name: str,
                  chunk_tokens: int = CHUNK_TOKENS, overlap_tokens: int = OVERLAP_TOKENS) -> IngestReport:
    """Chunk ``documents`` in ``tokenizer``'s tokens (the serving model's, named ``model_name``)
    and index them; once more if another process committed to the same index meanwhile."""
    chunker = Chunker(tokenizer, chunk_tokens, overlap_tokens, name=model_name)
    try:
        return index.ingest_documents(documents, chunker)
    except IndexChangedError:
        return index.ingest_documents(documents, chunker)


def open_or_build(index_dir: Path, factory: str) -> ChunkIndex:
    if (index_dir / "manifest.json").exists():
        return ChunkIndex.load(index_dir)
    return ChunkIndex.build(index_dir, factory=factory)


def ingest(
    paths: Sequence[str | Path], index_dir: Path, settings: Settings, text_field: str = "text",
    chunk_tokens: int = CHUNK_TOKENS, overlap_tokens: int = OVERLAP_TOKENS, factory: str = "Flat", delete: Sequence[str] = (),
) -> tuple[IngestReport, int, int]:
    """Ingest ``paths`` (files or folders) and remove ``delete`` documents; returns the report,
    the number of documents deleted and the number of chunks in the index."""
    index = open_or_build(Path(index_dir), factory)
    try:
        removed = 0
        for name in delete:  # a document id, or the path of an ingested file (its id derived)
            try:
                index.delete(name)
            except UnknownDocumentError:
                if name == document_id(name):
                    raise
                try:
                    index.delete(document_id(name))
                except UnknownDocumentError:
                    raise UnknownDocumentError(f"no document {name!r} (nor one ingested from that path) in "
                                               f"{index_dir}; `chunkcache query` or .documents() show the ids") from None
            removed += 1
        report = IngestReport()
        if paths:
            documents = list(read_documents(list(paths), text_field=text_field))
            report = add_documents(index, documents, model_tokenizer(settings), settings.model, chunk_tokens,
                                   overlap_tokens)
        return report, removed, len(index)
    finally:
        index.close()
