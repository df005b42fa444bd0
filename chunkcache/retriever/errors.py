"""The retriever's exceptions: user errors subclass `InvalidInputError` (a `ValueError`) and say
what to do; a damaged index on disk raises `IndexCorruptError`."""

from __future__ import annotations

from chunkcache.errors import ChunkCacheError, InvalidInputError


class EmbedderNotFoundError(InvalidInputError):
    """The embedding model folder (or the package carrying the default one) is missing."""


class EmbedderMismatchError(InvalidInputError):
    """An index was opened with another embedder than the one it was built with."""


class IndexNotFoundError(InvalidInputError):
    """The folder holds no chunk index (no manifest.json)."""


class IndexExistsError(InvalidInputError):
    """`ChunkIndex.build` was pointed at a folder that already holds an index."""


class IndexChangedError(InvalidInputError):
    """Another process wrote to the index after this one opened it."""


class UnknownDocumentError(InvalidInputError, KeyError):
    """A document id that the index does not hold."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DocumentReadError(InvalidInputError):
    """A document file that cannot be read or parsed (encoding, malformed JSON line, missing field)."""


class IndexCorruptError(ChunkCacheError, ValueError):
    """Index files on disk that cannot be read (damaged manifest, unreadable faiss file)."""
