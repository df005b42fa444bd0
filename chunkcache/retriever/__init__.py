"""Retrieval: reading and chunking documents, embedding chunks, and `ChunkIndex` (faiss vectors,
a BM25 lexical index, lmdb docstore, manifest; dense, lexical or hybrid search). Heavy libraries (torch, transformers) load only when embedding starts."""

from chunkcache.retriever.chunking import Chunk, Chunker, Document, content_hash, token_counter
from chunkcache.retriever.embedder import DEFAULT_EMBEDDER, Embedder, MiniLMEmbedder, default_model_path
from chunkcache.retriever.errors import (
    DocumentReadError,
    EmbedderMismatchError,
    EmbedderNotFoundError,
    IndexChangedError,
    IndexCorruptError,
    IndexExistsError,
    IndexNotFoundError,
    UnknownDocumentError,
)
from chunkcache.retriever.fusion import MODES, SearchOptions
from chunkcache.retriever.index import ChunkIndex
from chunkcache.retriever.lexical import BM25Params, tokenize
from chunkcache.retriever.manifest import Hit, IngestReport
from chunkcache.retriever.readers import FORMATS, html_to_text, read_documents, read_file

__all__ = [
    "BM25Params", "Chunk", "Chunker", "ChunkIndex", "DEFAULT_EMBEDDER", "Document", "DocumentReadError", "Embedder",
    "EmbedderMismatchError", "EmbedderNotFoundError", "FORMATS", "Hit", "IndexChangedError", "IndexCorruptError",
    "IndexExistsError", "IndexNotFoundError", "IngestReport", "MODES", "MiniLMEmbedder", "SearchOptions",
    "UnknownDocumentError", "content_hash", "default_model_path", "html_to_text", "read_documents", "read_file",
    "token_counter", "tokenize",
]
