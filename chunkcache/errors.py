"""Exceptions shared by every part. User-facing ones subclass `ValueError` with an actionable message."""

from __future__ import annotations


class ChunkCacheError(Exception):
    """Base of every chunkcache error."""


class CliError(ChunkCacheError):
    """A problem with the command line or its input files."""


class InvalidInputError(ChunkCacheError, ValueError):
    """The caller's question, chunks or parameters cannot be served as given."""


class UnknownStrategyError(InvalidInputError):
    """A fusion strategy name that is not registered."""


class UnknownModelError(InvalidInputError):
    """A model name that is neither a packaged model nor a local Hugging Face folder."""


class UnsupportedModelError(InvalidInputError):
    """A model whose architecture or RoPE mode chunkcache cannot fuse correctly."""


class ContextTooLongError(InvalidInputError):
    """The fused prompt (plus the tokens to generate) exceeds the model's context."""


class ModelIntegrityError(ChunkCacheError):
    """Model files on disk do not match their expected checksum."""


class CorruptCacheError(ChunkCacheError, ValueError):
    """Stored cache bytes failed validation (truncated, bad checksum, wrong format)."""
