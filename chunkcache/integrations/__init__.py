"""Drop-in adapters for RAG frameworks, each an optional extra imported only when used:

- `chunkcache.integrations.haystack`: `ChunkCacheGenerator`, a Haystack 2.x+ ``@component``
  (``pip install 'chunkcache[haystack]'``);
- `chunkcache.integrations.llama_index`: `ChunkCacheQueryEngine` (a ``CustomQueryEngine``) and
  `ChunkCacheRetriever` (``chunkcache[llama-index]``);
- `chunkcache.integrations.langchain`: `ChunkCacheChatModel` and `ChunkCacheRetriever`
  (``chunkcache[langchain]``).

Every adapter passes the framework's documents to the engine as separate chunks, in order, so
each one's KV cache is reused; none flattens them into one prompt string."""

from __future__ import annotations

from typing import Any

from chunkcache.engine import Answer


def answer_meta(answer: Answer) -> dict[str, Any]:
    """The stats an adapter attaches to its reply."""
    return {
        "strategy": answer.strategy, "ttft_s": answer.ttft_s, "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": len(answer.token_ids), "reused_tokens": answer.reused_tokens,
        "recomputed_tokens": answer.recomputed_tokens, "cache_hits": answer.cache_hits,
        "cache_misses": answer.cache_misses, "finish_reason": answer.finish_reason,
    }


def require(module: str, extra: str) -> None:
    """Raise an ImportError that names the extra to install when ``module`` is missing."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a dotted name whose parent package is missing
        found = False
    if not found:
        raise ImportError(f"this adapter needs {module}: pip install 'chunkcache[{extra}]'")
