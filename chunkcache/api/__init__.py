"""The HTTP service (`chunkcache serve`): OpenAI-compatible and native RAG endpoints over one
engine scheduler, with metrics."""

from chunkcache.api.app import create_app
from chunkcache.api.service import RagService

__all__ = ["RagService", "create_app"]
