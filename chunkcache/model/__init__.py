"""Loading causal LMs and running them layer by layer for chunk fusion."""

from chunkcache.model.executor import ApeAttention, LayerExecutor
from chunkcache.model.loader import LoadedModel, load_model
from chunkcache.model.prompt import PromptPieces, PromptTemplate
from chunkcache.model.registry import PACKAGED_MODELS

__all__ = [
    "ApeAttention", "LayerExecutor", "LoadedModel", "PACKAGED_MODELS", "PromptPieces",
    "PromptTemplate", "load_model",
]
