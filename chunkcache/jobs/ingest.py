"""`chunkcache ingest`: read files, chunk them with the serving model's tokenizer, embed and index
them (incremental: unchanged documents are skipped, changed ones replaced, deleted ones removed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chunkcache.config import Settings
from chunkcache.retriever import Chunker, ChunkIndex, IngestReport, UnknownDocumentError, read_documents
from chunkcache.retriever.readers import document_id


CHUNK_TOKENS, OVERLAP_TOKENS = 256, 32  # chunk size and overlap, in the serving model's tokens


def model_tokenizer(settings: Settings) -> Any:
    """The serving model's tokenizer (chunks are counted in the tokens the model will see)."""
    from transformers import AutoTokenizer

    from chunkcache.model.registry import resolve_model_dir

    return AutoTokenizer.from_pretrained(str(resolve_model_dir(settings.model, settings.models_dir)))


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
            chunker = Chunker(model_tokenizer(settings), chunk_tokens, overlap_tokens, name=settings.model)
            report = index.ingest_documents(read_documents(list(paths), text_field=text_field), chunker)
        return report, removed, len(index)
    finally:
        index.close()
