"""One `Settings` object for every tunable: defaults < YAML file < ``CHUNKCACHE_*`` environment."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from chunkcache.errors import InvalidInputError

ENV_PREFIX = "CHUNKCACHE_"


def _cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chunkcache"


@dataclass(frozen=True)
class Settings:
    """Everything a user may tune. Field names map to YAML keys and ``CHUNKCACHE_<NAME>`` env vars."""

    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "auto"
    models_dir: Path = field(default_factory=lambda: _cache_root() / "models")
    store_path: Path = field(default_factory=lambda: _cache_root() / "store")
    # Where the benchmarks look for the shared QA files when given none (relative paths from the
    # working directory): bench precompute's corpus, the retrieval recall and latency runs.
    data_dir: Path = Path("../shared/data")
    zstd_level: int = 3
    # How chunk caches are stored: raw | int8 | kivi2 | cachegen-1..3 (see codec/__init__.py).
    # Fixed prefixes (head, primer) are always stored raw: they are small and shared by all.
    codec: str = "int8"  # no measurable loss vs raw on Qwen2.5-0.5B / MuSiQue: docs/codecs.md
    # Store tiers, fastest first: "auto" = gpu (when CUDA is present), cpu, disk, and remote when
    # remote_url is set; or a list such as "cpu,disk,remote". Budgets take 512MiB, 2GB, ...; an
    # empty budget means unbounded (the remote tier's capacity is the service's own). The disk
    # is bounded by default: caches are about 3,000 bytes per byte of text (bf16, 0.5B model), so
    # an unbounded disk tier fills a volume unnoticed.
    store_tiers: str = "auto"
    gpu_budget: str = "4GiB"
    cpu_budget: str = "2GiB"
    disk_budget: str = "16GiB"
    # redis://HOST:6379/0 (redis or valkey) or mooncake://MASTER:50051?... (Mooncake Store;
    # options in store/mooncake_store.py); shared by every server and precompute worker
    remote_url: str = ""
    remote_timeout_s: float = 2.0
    # The env var holding a secret shared by the servers and workers that may write the remote
    # tier: set, every entry is sealed with an HMAC-SHA256 and one that fails it is a miss.
    remote_key_env: str = "CHUNKCACHE_REMOTE_KEY"
    eviction: str = "lru"  # lru | cost (hits x tokens / bytes)
    write_through: bool = True  # False: writes land in the first tier, reach lower ones on eviction
    stream_layers: bool = True  # fuse layer i while later layers of the chunk caches still decode
    system_prompt: str = (
        "You are a helpful assistant. Answer the question briefly, using only the passages."
    )
    # The question piece (never cached): LongBench-style instruction right before the question,
    # so small models answer in a few words. Must contain {question}.
    question_template: str = (
        "Answer the question based on the passages above. Give only the answer, in a few words.\n\n"
        "Question: {question}"
    )
    # Passages placed between the head and each chunk while its cache is computed, then dropped:
    # "builtin", "none", a text file of blank-line-separated passages, or "neighbours": builtin,
    # then (for chunks of an index) the chunk's `neighbours` nearest chunks of the corpus, at most
    # `neighbour_tokens` tokens of them (see blend/prefill.py).
    chunk_primer: str = "builtin"
    neighbours: int = 2
    neighbour_tokens: int = 512
    strategy: str = "cacheblend"
    recompute_ratio: float = 0.15
    check_layer: int = 1
    ape_temperature: float = 0.9
    ape_scale: float = 0.9
    epic_k: int = 16
    max_new_tokens: int = 64
    # Chunks per batched prefill when precomputing (and the most misses prefilled together while
    # answering): 8 beat 16 and 1 on 2 CPU cores with SmolLM2 (cache reuse); raise it on a GPU.
    precompute_batch: int = 8
    # Cache-Craft: keep each chunk's KV as computed in full prefills (with its attention profile)
    # as a variant for the cachecraft strategy, at most craft_max_variants per chunk.
    craft_variants: bool = False
    craft_max_variants: int = 4
    threads: int = 0  # 0: leave torch's default
    # Attention of a selection of queries (CacheBlend's tokens, the question) on a GPU, one call a
    # layer: "triton" (a kernel that skips fully masked key blocks), "sdpa" (one masked call of
    # PyTorch's memory-efficient kernel), or "auto" (triton when installed). The CPU always runs
    # causal blocks of queries, which read the token index there at no cost.
    attention_backend: str = "auto"
    # How a decode step attends: "auto" (on CUDA with Triton: one batched kernel call a layer and
    # each step captured as a CUDA graph per batch / length bucket, replayed; elsewhere one call a
    # sequence), "graphs", "kernel" (batched, no capture) or "loop" (one call a sequence).
    decode_mode: str = "auto"
    # How a fused prefill runs: "auto" (on CUDA, CacheBlend and reuse in shapes rounded up to a
    # bucket, each bucket captured as CUDA graphs on its first request and replayed; elsewhere the
    # request's own shapes), "graphs", "buckets" (fixed shapes, no capture) or "off".
    fusion_mode: str = "auto"
    # chunkcache serve: where it listens, the index it retrieves from (empty: callers send
    # documents), the env var holding the API key (unset or empty: no key needed), and limits.
    index_path: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key_env: str = "CHUNKCACHE_API_KEY"
    max_queue: int = 32  # requests waiting for the engine; past it: 429
    # Requests decoded together (one batched forward per token); a new one is fused between two
    # steps and joins. 1: one request at a time.
    max_batch: int = 16
    # Threads that fuse new requests while the batch decodes: -1 (auto: 3 on the CPU when
    # max_batch > 1, where a fusion takes as long as several steps; torch's threads are then
    # shared out among them and the decoding thread unless `threads` is set; 0 on a GPU), 0 (a
    # new request is fused between two steps) or a count.
    fusion_workers: int = -1
    # Bytes the fused caches of running requests may hold together (GPU memory on CUDA, host
    # memory on the CPU): a request that does not fit waits, one larger than all of it is refused.
    kv_budget: str = "2GiB"
    warm_up: bool = True  # serve: answer a made-up question per strategy before listening (engine.warm_up)
    # With fusion graphs (a GPU): the fused-prefill buckets warm-up captures as well, as prompt
    # "CONTEXT:QUESTION" token counts, e.g. "4096:32,8192:32,8192:48" (a bucket's first request
    # pays its capture; empty: only the warm-up question's own bucket)
    fusion_warm: str = ""
    # serve: start even when the model fails `chunkcache check-model` (run once per model otherwise)
    allow_unchecked_model: bool = False
    max_documents: int = 64  # per request
    max_document_chars: int = 200_000  # per document
    # The largest request body read at all: refused from its Content-Length (or once a chunked
    # body passes it) before it is held in memory; room for max_documents long documents.
    max_body: str = "32MiB"
    max_tokens_limit: int = 2048  # the most new tokens a request may ask for
    # Tokens of one request's question and chunks (or one documents request's texts) together,
    # past which it is refused (413) rather than holding the engine for minutes; 0: no limit.
    max_request_tokens: int = 16384
    default_top_k: int = 5  # retrieval when a request names no top_k
    # Retrieval from an index (query, serve): "hybrid" fuses the faiss (dense) and BM25 (lexical)
    # rankings, or "dense" / "lexical" alone; fusion "rrf" (reciprocal rank, damped by rrf_k) or
    # "weighted" (min-max normalised scores); each retriever offers fusion_candidates chunks and
    # the dense list weighs dense_weight, the lexical one the rest. Then hybrid's link step: a
    # candidate whose document title one of the best link_hops hits names gains link_weight x its
    # own score, per naming hit (multi-hop questions; 0 hops: off). Measured: docs/results.md.
    retrieval: str = "hybrid"
    fusion: str = "rrf"
    rrf_k: int = 60  # 60 as in Cormack et al. and most search engines
    fusion_candidates: int = 50
    dense_weight: float = 0.5
    link_hops: int = 5
    link_weight: float = 2.0
    bm25_k1: float = 1.2
    bm25_b: float = 0.75

    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> "Settings":
        """Build settings from defaults, then the YAML file (``path`` or ``$CHUNKCACHE_CONFIG``),
        then ``CHUNKCACHE_*`` variables, then explicit ``overrides`` (None values are ignored)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        config_path = path or env.get(ENV_PREFIX + "CONFIG")
        if config_path:
            values.update(_read_yaml(Path(config_path)))
        names = {f.name for f in dataclasses.fields(cls)}
        for name in names:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None:
                values[name] = raw
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = sorted(set(values) - names)
        if unknown:
            raise InvalidInputError(
                f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        return cls(**{k: _coerce(cls, k, v) for k, v in values.items()})

    @classmethod
    def from_args(cls, args: Any, **overrides: Any) -> "Settings":
        """The one way a command line loads settings: `load` with ``--config``, then the shared
        flags the command has (``--model``, ``--dtype``, ``--store``), then ``overrides`` (a
        None there drops a flag, e.g. a command whose ``model`` argument is not the one served)."""
        flags = {"model": getattr(args, "model", None), "dtype": getattr(args, "dtype", None),
                 "store_path": getattr(args, "store", None)}
        return cls.load(getattr(args, "config", None), **{**flags, **overrides})


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise InvalidInputError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise InvalidInputError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInputError(f"config file {path} must hold a mapping of setting: value")
    return data


def _coerce(cls: type[Settings], name: str, value: Any) -> Any:
    default = {f.name: f for f in dataclasses.fields(cls)}[name]
    sample = default.default if default.default is not dataclasses.MISSING else default.default_factory()  # type: ignore[misc]
    try:
        if isinstance(sample, Path):
            return Path(value).expanduser()
        if isinstance(sample, bool):
            return str(value).lower() in {"1", "true", "yes", "on"}
        if isinstance(sample, int):
            return int(value)
        if isinstance(sample, float):
            return float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(
            f"setting {name} must be a {type(sample).__name__}, got {value!r}"
        ) from None
    return str(value)
