"""`ChunkCacheEngine`: wires model, store, codec and blend for one request and for precompute."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from chunkcache.blend import FusionInput, Sampling, describe_strategies, make_strategy, parse_strategy_spec, names_taking, spec_forms, spec_pattern
from chunkcache.craft_variants import CraftVariants
from chunkcache.blend.decode import StopText
from chunkcache.blend.buckets import fixed_shapes, use_fusion_mode, warm_shapes
from chunkcache.blend.decode_graphs import table_decoder, use_decode_mode
from chunkcache.blend.fixed_fusion import run_fusion
from chunkcache.blend.pool import KVPool
from chunkcache.blend.prefill import NEIGHBOURS, ChunkNeighbours, context_ids, prefill_chunks, prefill_head, primer_ids
from chunkcache.codec import RawCodec, get_codec
from chunkcache.config import Settings
from chunkcache.errors import ContextTooLongError, CorruptCacheError, InvalidInputError
from chunkcache.generation import Answer, Fused, Generation, OnText, Plan, decode_step
from chunkcache.kv import ChunkKV
from chunkcache.model import LoadedModel, load_model
from chunkcache.model.prompt import TEXT_CHAR, has_text, last_question, question_from_chat
from chunkcache.model.registry import PACKAGED_MODELS
from chunkcache.store import KVStore, build_store, chunk_key, prefix_fingerprint
from chunkcache.store.stream import LayerStream
from chunkcache.store.variants import VariantIndex
from chunkcache.timing import collect, stage

# Settings fields that are defaults of strategy parameters (a spec or a request overrides them)
# what the faces (CLI, service, adapters) use of a request, all from here: they import the engine,
# not blend or model internals (tests/test_layers.py holds that)
__all__ = ["PACKAGED_MODELS", "Answer", "ChunkCacheEngine", "ChunkNeighbours", "KVPool", "Sampling", "StopText", "describe_strategies",
           "make_strategy", "parse_strategy_spec", "question_from_chat", "last_question", "TEXT_CHAR", "spec_pattern", "spec_forms", "names_taking"]

STRATEGY_SETTINGS = ("recompute_ratio", "check_layer", "epic_k", "ape_temperature", "ape_scale")


class ChunkCacheEngine:
    """Answers questions over chunks, reusing each chunk's KV cache computed once."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        model: LoadedModel | None = None,
        store: KVStore | None = None,
    ) -> None:
        self.settings = settings or Settings.load()
        name, params = parse_strategy_spec(self.settings.strategy)  # a bad spec fails before the model loads
        make_strategy(name, **params)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are local; never reach for a hub
        if self.settings.threads > 0:
            import torch

            torch.set_num_threads(self.settings.threads)
        self.model = model or load_model(
            self.settings.model, self.settings.models_dir, self.settings.dtype,
            self.settings.device, self.settings.system_prompt, self.settings.question_template,
        )
        self.model.executor.use_attention_backend(self.settings.attention_backend)
        use_decode_mode(self.model.executor, self.settings.decode_mode)
        use_fusion_mode(self.model.executor, self.settings.fusion_mode)
        limit = self.model.max_positions
        for context, question in warm_shapes(self.settings.fusion_warm):  # a bad setting fails here, not at warm-up
            if limit and context + question >= limit:
                raise InvalidInputError(f"fusion_warm {context}:{question} is past the model's context of {limit} "
                                        "tokens; warm smaller buckets")
        self.codec = get_codec(self.settings.codec, self.settings.zstd_level)
        self._lossless = RawCodec(self.settings.zstd_level)
        self.store: KVStore = store or build_store(self.settings, self.codec)
        self._head_ids = self.model.template.head_ids()
        # Chunks are computed behind the head and then the primer; the primer's KV is dropped.
        self._primer_ids = primer_ids(self.model.template, self.settings.chunk_primer)
        self._prefix_ids = self._head_ids + self._primer_ids
        self._prefix = prefix_fingerprint(self.model.fingerprint, self._prefix_ids)
        self._craft_variants: CraftVariants | None = None
        self._craft_lock = threading.Lock()
        self._neighbours: ChunkNeighbours | None = None

    def close(self) -> None:
        """Flush and close the store (write-back entries reach the lower tiers)."""
        self.store.close()
        if self._craft_variants is not None:
            self._craft_variants.index.close()

    def __enter__(self) -> "ChunkCacheEngine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def use_codec(self, spec: str) -> None:
        """Store and read chunk caches with another codec from now on (fixed prefixes stay raw)."""
        self.codec = get_codec(spec, self.settings.zstd_level)

    def use_index(self, index: ChunkNeighbours | None) -> None:
        """The index the chunks come from: with ``chunk_primer: neighbours`` each of its chunks is
        computed behind its nearest chunks (others, and every chunk otherwise, behind the primer)."""
        self.use_neighbours(index if self.primes_with_neighbours else None)

    @property
    def primes_with_neighbours(self) -> bool:
        """Whether the settings ask for chunks of an index behind their neighbours."""
        return self.settings.chunk_primer.strip().lower() == NEIGHBOURS

    def use_neighbours(self, source: ChunkNeighbours | None) -> None:
        """Compute chunks of ``source`` behind their neighbours from now on (None: the primer only)."""
        self._neighbours = source

    def _contexts(self, chunks: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        """What each chunk is computed behind after the head and primer: its neighbours' tokens
        when it is a chunk of the neighbour source, else nothing."""
        if self._neighbours is None or self.settings.neighbours < 1:
            return ((),) * len(chunks)
        found = self._neighbours.neighbours(list(chunks), self.settings.neighbours)
        return tuple(context_ids(self.model.template, texts, self.settings.neighbour_tokens) if texts else ()
                     for texts in found)

    def context_lengths(self, chunks: Sequence[str]) -> list[int]:
        """How many neighbour tokens each chunk is computed behind (0: the primer only)."""
        return [len(c) for c in self._contexts(chunks)]

    # --- keys and precompute -------------------------------------------------------------
    def head_key(self) -> str:
        return self._fixed_key(self._head_ids)

    def _fixed_key(self, ids: tuple[int, ...]) -> str:
        """Key of a fixed prefix (the head, or head + primer): it has nothing before it."""
        return chunk_key(self.model.fingerprint, "", self._lossless.spec, ids)

    def chunk_key(self, chunk: str) -> str:
        ids = self.model.template.chunk_ids(chunk)
        return self._chunk_key(ids, context=self._contexts([chunk])[0])

    def _chunk_key(self, ids: tuple[int, ...], codec: str | None = None, context: tuple[int, ...] = ()) -> str:
        return chunk_key(self.model.fingerprint, self._prefix_print(context), codec or self.codec.spec, ids)

    def _prefix_print(self, context: tuple[int, ...]) -> str:
        """Fingerprint of what a chunk is computed behind: head + primer (+ its context)."""
        return prefix_fingerprint(self.model.fingerprint, self._prefix_ids + context) if context else self._prefix

    def kv_pool(self, budget_bytes: int) -> KVPool:
        """A pool for the fused caches of generations running together, within ``budget_bytes``."""
        return KVPool(self.model.executor, budget_bytes)

    def stored(self, chunk: str) -> bool:
        """Whether the chunk's cache (in the current codec) is in the store (no decoding)."""
        return self.store.contains(self.chunk_key(chunk))

    def prefill_only(self, chunks: Sequence[str]) -> list[ChunkKV]:
        """The chunks' KV as precompute computes them (one batch), without touching the store:
        the bare loop that precompute's throughput is compared with."""
        ids = [self.model.template.chunk_ids(c) for c in chunks]
        contexts = self._contexts(chunks)
        return prefill_chunks(self.model.executor, self._chunk_prefix(), ids,
                              [self._prefix_print(c) for c in contexts], contexts)

    def precompute(self, chunks: Sequence[str], batch_size: int | None = None) -> list[str]:
        """Compute and store the KV of every chunk not yet stored (``batch_size`` chunks per
        batched prefill, default ``Settings.precompute_batch``); return the keys of all of them."""
        _check_chunks(chunks)
        batch_size = self.settings.precompute_batch if batch_size is None else batch_size
        if batch_size < 1:
            raise InvalidInputError(f"batch_size must be at least 1, got {batch_size}")
        self._head()  # answering needs the head's KV too
        ids = [self.model.template.chunk_ids(c) for c in chunks]
        contexts = self._contexts(chunks)
        keys = [self._chunk_key(i, context=c) for i, c in zip(ids, contexts)]
        todo = list({k: (i, c) for k, i, c in zip(keys, ids, contexts) if not self.store.contains(k)}.values())
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            self._compute([i for i, _ in batch], [c for _, c in batch])
        return keys

    def _compute(self, chunks: Sequence[tuple[int, ...]], contexts: Sequence[tuple[int, ...]]) -> list[ChunkKV]:
        """Store the caches of ``chunks`` (distinct, not stored in the current codec) and return
        them as the store will serve them. With a lossy codec, a chunk already stored losslessly
        is re-encoded, not recomputed; the rest are prefilled ``precompute_batch`` at a time,
        similar lengths together (padding grows with the longest chunk of a batch). ``contexts``:
        what each chunk is computed behind after the primer (`_contexts`)."""
        found: dict[int, ChunkKV] = {}
        if self.codec.spec != self._lossless.spec:
            for i, (ids, ctx) in enumerate(zip(chunks, contexts)):
                key = self._chunk_key(ids, self._lossless.spec, ctx)
                kv = self._checked(self.store.get(key, self.model.fingerprint, self.model.executor.device), key, ids, ctx)
                if kv is not None:
                    found[i] = kv
        todo = sorted((i for i in range(len(chunks)) if i not in found),
                      key=lambda i: len(contexts[i]) + len(chunks[i]))
        size = max(1, self.settings.precompute_batch)
        for start in range(0, len(todo), size):
            batch = todo[start : start + size]
            with stage("miss_prefill_s"):
                computed = prefill_chunks(self.model.executor, self._chunk_prefix(), [chunks[i] for i in batch],
                                          [self._prefix_print(contexts[i]) for i in batch],
                                          [contexts[i] for i in batch])
            found.update(zip(batch, computed))
        served = []
        for i, (ids, ctx) in enumerate(zip(chunks, contexts)):
            kv = self.store.put(self._chunk_key(ids, context=ctx), found[i], self.codec)  # lossy: what later hits get
            served.append(kv if kv is not None else found[i])
        return served

    def _craft(self) -> CraftVariants:
        """Cache-Craft's variants of chunk caches (their index sits next to the store)."""
        with self._craft_lock:  # fusions run on several threads at once: one variant index (lmdb) only
            if self._craft_variants is None:
                index = VariantIndex(Path(self.settings.store_path) / "variants", self.settings.craft_max_variants)
                self._craft_variants = CraftVariants(self.store, index, self.codec, self.model.fingerprint,
                                                     self.model.executor.device)
            return self._craft_variants

    def _head(self) -> tuple[ChunkKV, bool]:
        return self._fixed(self._head_ids)

    def _chunk_prefix(self) -> ChunkKV:
        """What chunks are computed behind: the head, then the primer (if any)."""
        return self._fixed(self._prefix_ids)[0]

    def _fixed(self, ids: tuple[int, ...]) -> tuple[ChunkKV, bool]:
        key = self._fixed_key(ids)
        kv = self.store.get(key, self.model.fingerprint, self.model.executor.device)
        if kv is not None:
            return kv, True
        with stage("miss_prefill_s"):
            kv = prefill_head(self.model.executor, ids, self.model.fingerprint)
            self.store.put(key, kv, self._lossless)
        return kv, False

    def _load(self, chunks: Sequence[tuple[int, ...]], contexts: Sequence[tuple[int, ...]],
              given: Sequence[Any] | None = None) -> tuple[ChunkKV, tuple[Any, ...], int]:
        """The head's KV and each chunk's (a `LayerStream` when the store streams layers, so
        fusion starts before the last layer is decoded), and how many chunks were stored.
        Chunks whose cache is ``given`` (cachecraft's variants) are neither loaded nor computed."""
        stream = self.store.stream if self.settings.stream_layers else None
        keys = [self._chunk_key(ids, context=ctx) for ids, ctx in zip(chunks, contexts)]
        got: list[Any] = list(given) if given is not None else [None] * len(chunks)
        wanted = [i for i, kv in enumerate(got) if kv is None]
        sources: dict[int, Any] = {}
        if stream is not None:  # a layer-wise prefetch: loading starts before the head is read
            found = stream([keys[i] for i in wanted], self.model.fingerprint, self.model.executor.device)
            sources = dict(zip(wanted, found))
        head_kv, _ = self._head()
        for i, source in sources.items():
            got[i] = source if source.found() else None
        out, hits = self._complete(keys, chunks, contexts, got, lookup=stream is None)
        return head_kv, out, hits

    def _complete(self, keys: Sequence[str], chunks: Sequence[tuple[int, ...]], contexts: Sequence[tuple[int, ...]],
                  got: Sequence[Any], lookup: bool = True) -> tuple[tuple[Any, ...], int]:
        """Fill the gaps (None) of ``got``: from the store when ``lookup``, the rest prefilled
        together in one batch. Returns the caches and how many came from the store."""
        dev = self.model.executor.device
        filled = [kv if kv is not None or not lookup else self.store.get(key, self.model.fingerprint, dev)
                  for kv, key in zip(got, keys)]
        filled = [self._checked(kv, key, ids, ctx) for kv, key, ids, ctx in zip(filled, keys, chunks, contexts)]
        missing = {key: (ids, ctx) for kv, key, ids, ctx in zip(filled, keys, chunks, contexts) if kv is None}
        computed = (dict(zip(missing, self._compute([i for i, _ in missing.values()], [c for _, c in missing.values()])))
                    if missing else {})
        hits = len(keys) - sum(kv is None for kv in filled)
        return tuple(kv if kv is not None else computed[key] for kv, key in zip(filled, keys)), hits

    def _checked(self, kv: Any, key: str, ids: Sequence[int], context: Sequence[int]) -> Any:
        """``kv`` (a `ChunkKV` or `LayerStream`) when it holds the chunk its key names; else the
        entry is dropped from the store and None returned (a miss: recomputed). A foreign entry
        under a key (a bad copy between stores, a key collision) is never fused."""
        if kv is None:
            return None
        if tuple(kv.token_ids) != tuple(ids):
            reason = (f"its token ids are not those of the chunk its key names ({len(kv.token_ids)} stored, "
                      f"{len(ids)} expected)")
        elif kv.prefix_fingerprint != self._prefix_print(tuple(context)):
            reason = "it was computed behind another context than its key names"
        else:
            return kv
        self.store.discard(key, reason)
        return None

    def warm_up(self, strategies: Sequence[str] | None = None) -> float:
        """Answer one short made-up question with each strategy (default: the configured one and
        ``full``) and forget its chunks' caches; returns the seconds it took. The first request
        of a process pays for compiling kernels (the Triton attention kernel), the device's
        libraries and allocators starting, and on a GPU each batch size's decode step is
        captured as a CUDA graph (up to ``max_batch``): a server pays it here, before anyone waits."""
        start = time.perf_counter()
        chunks = ["Warm-up passage one: the river runs past the old mill to the sea.",
                  "Warm-up passage two: the mill was rebuilt in stone after the flood."]
        for name in dict.fromkeys(strategies or (self.settings.strategy, "full")):
            self.answer("Where does the river run?", chunks, strategy=name, max_new_tokens=2)
        self._forget(chunks)
        decoder = table_decoder(self.model.executor)
        if decoder is not None:  # a GPU: every batch bucket's decode step compiled and captured
            decoder.warm(self.settings.max_batch)
        if fixed_shapes(self.model.executor) is not None:  # fixed-shape fusions: their buckets captured
            # the largest first: the workspace is sized once, and no capture is dropped by its growing
            for context, question in sorted(warm_shapes(self.settings.fusion_warm), key=sum, reverse=True):
                self._warm_fusion(context, question)
        return time.perf_counter() - start

    def _warm_fusion(self, context: int, question: int) -> None:
        """Answer a made-up prompt of about ``context`` tokens before the question and ``question``
        question tokens with the configured strategy (so its bucket is captured), then forget its
        chunks' caches."""
        template, tokenizer = self.model.template, self.model.tokenizer
        sentence = " the mill stood by the river and the road ran past it to the sea"
        filler = tokenizer.encode(sentence * (context // 8 + 8), add_special_tokens=False)
        per_chunk = max(1, (context - len(template.pieces("", ["x"]).head)) // 8)
        size = max(1, per_chunk - len(template.chunk_ids("x")) + 1)  # the chunk's formatting takes the rest
        chunks = [tokenizer.decode(filler[i * size : (i + 1) * size]) for i in range(8)]
        words = max(1, question - len(template.pieces("", chunks).question))
        self.answer(" ".join(["where"] * words) + "?", chunks, max_new_tokens=1)
        self._forget(chunks)

    def _forget(self, chunks: list[str]) -> None:
        """Drop the stored caches of made-up chunks (warm-up's)."""
        for ids in self.model.template.pieces("", chunks).chunks:
            self.store.delete(self._chunk_key(ids))

    def fusion_graph_stats(self) -> dict[str, Any] | None:
        """Fixed-shape fusions so far (``fusion_mode``): run eagerly, captured as CUDA graphs (and
        the seconds captures took), replayed; None when fusions run in each request's own shapes."""
        runner = fixed_shapes(self.model.executor)
        if runner is None:
            return None
        stats = runner.stats
        return {"eager": stats.eager, "captures": stats.captures, "capture_s": stats.capture_s,
                "replays": stats.replays, "failures": list(stats.failures), "graphs": runner.graphs}

    # --- answering ----------------------------------------------------------------------
    def answer(
        self,
        question: str,
        chunks: Sequence[str],
        strategy: str | None = None,
        max_new_tokens: int | None = None,
        sampling: Sampling | None = None,
        keep_logits: bool = False,
        on_text: OnText | None = None,
        record_variants: bool | None = None,
        **params: Any,
    ) -> Answer:
        """Answer ``question`` from ``chunks`` with a fusion strategy (default from Settings): a
        batch of one (`plan`, `begin`, then `decode_step` until done).

        ``on_text`` is called with each new piece of text as it is generated (whole characters);
        when it returns True generation stops there (a stop sequence, a client gone) and the
        answer's ``finish_reason`` is ``stop``. ``record_variants`` overrides the
        ``craft_variants`` setting for this call (a full prefill then keeps cachecraft variants)."""
        generation = self.begin(self.plan(question, chunks, strategy, max_new_tokens, sampling, on_text,
                                          keep_logits=keep_logits, record_variants=record_variants, **params))
        while not generation.done:
            self.decode_step([generation])
        if generation.error is not None:
            raise generation.error
        return generation.answer()

    def stream(
        self,
        question: str,
        chunks: Sequence[str],
        strategy: str | None = None,
        max_new_tokens: int | None = None,
        sampling: Sampling | None = None,
        **params: Any,
    ) -> Iterator[str]:
        """Yield the answer's text as it is generated."""
        pieces: list[str] = []
        generation = self.begin(self.plan(question, chunks, strategy, max_new_tokens, sampling, pieces.append,
                                          **params))
        while not generation.done:
            self.decode_step([generation])
            yield from pieces
            pieces.clear()
        yield from pieces
        if generation.error is not None:
            raise generation.error

    def plan(
        self,
        question: str,
        chunks: Sequence[str],
        strategy: str | None = None,
        max_new_tokens: int | None = None,
        sampling: Sampling | None = None,
        on_text: OnText | None = None,
        keep_logits: bool = False,
        record_variants: bool | None = None,
        **params: Any,
    ) -> Plan:
        """Check and tokenize a request without fusing it: what `begin` needs, and how many bytes
        its fused cache will hold (a scheduler admits it when they fit)."""
        check_request(question, chunks)
        # a spec (``cacheblend:0.15:spread_v=0.5``) wherever a strategy is named: request, CLI,
        # YAML; parameters given apart (``recompute_ratio=...``) override the spec's
        name, spec_params = parse_strategy_spec(strategy or self.settings.strategy)
        defaults = {k: getattr(self.settings, k) for k in STRATEGY_SETTINGS}
        fusion = make_strategy(name, defaults, **{**spec_params, **params})
        limit = self._max_new(max_new_tokens)
        pieces = self.model.template.pieces(question, list(chunks))
        if pieces.total + limit > self.model.max_positions > 0:
            raise ContextTooLongError(
                f"the prompt has {pieces.total} tokens and up to {limit} more are generated, past "
                f"the model's context of {self.model.max_positions}; pass fewer or shorter chunks "
                "or lower max_new_tokens"
            )
        record = fusion.records_profiles and (self.settings.craft_variants if record_variants is None else record_variants)
        return Plan(question, pieces, fusion, name, limit, sampling or Sampling(), on_text, record, keep_logits,
                    pieces.total + limit, self._contexts(chunks) if fusion.uses_cache else ())

    def begin(self, plan: Plan, buffer: torch.Tensor | None = None) -> Generation:
        """Load the plan's chunk caches and fuse them (into ``buffer``, a zeroed fused-cache buffer
        of at least ``plan.kv_tokens`` tokens, when given): the first token is ready to pick."""
        return Generation(plan, self._fuse(plan, buffer), self.model.eos_token_ids, self._detokenize)

    def decode_step(self, generations: Sequence[Generation]) -> None:
        """One token for each unfinished generation, in one batched forward."""
        decode_step(self.model.executor, generations)

    def _detokenize(self, tokens: list[int]) -> str:
        return self.model.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def _max_new(self, max_new_tokens: int | None) -> int:
        limit = self.settings.max_new_tokens if max_new_tokens is None else max_new_tokens
        if limit < 1:
            raise InvalidInputError(f"max_new_tokens must be >= 1, got {limit}")
        return limit

    def _fuse(self, plan: Plan, buffer: torch.Tensor | None) -> Fused:
        fusion, pieces, limit = plan.fusion, plan.pieces, plan.max_new_tokens
        contexts = plan.contexts or ((),) * len(pieces.chunks)
        keys = [self._chunk_key(ids, context=ctx) for ids, ctx in zip(pieces.chunks, contexts)]
        started = time.perf_counter()
        hits = 0
        head_kv, chunk_kvs = None, ()
        with collect() as stages, self.store.request_hits() as found:
            # a strategy may plan each chunk first (cachecraft: chunks a variant serves need no
            # independent cache)
            variants, plans = fusion.before_load(keys, pieces.chunks, self._craft)
            if fusion.uses_cache:
                head_kv, chunk_kvs, hits = self._load(pieces.chunks, contexts, variants)
            loaded_at = time.perf_counter()
            inp = FusionInput(pieces, head_kv, chunk_kvs, limit, plans, plan.record_variants, buffer)
            try:
                result = run_fusion(fusion, self.model.executor, inp)
            except CorruptCacheError:  # a streamed layer failed to decode: its entry was dropped
                chunk_kvs, _ = self._complete(keys, pieces.chunks, contexts, [None] * len(keys))
                if buffer is not None:
                    buffer.zero_()
                result = run_fusion(fusion, self.model.executor, FusionInput(pieces, head_kv, chunk_kvs, limit, (),
                                                                      plan.record_variants, buffer))
            streams = [kv for kv in chunk_kvs if isinstance(kv, LayerStream)]
            if streams:  # background load time vs what fusion still waited for: the overlap
                stages["stream_load_s"] = sum(s.load_s for s in streams)
                stages["stream_wait_s"] = sum(s.wait_s for s in streams)
                # read and decode ran in the loader threads: report them under the same stage names
                stages["store_read_s"] = stages.get("store_read_s", 0.0) + sum(s.read_s for s in streams)
                stages["codec_decode_s"] = stages.get("codec_decode_s", 0.0) + sum(s.decode_s for s in streams)
        fused_at = time.perf_counter()
        if result.profiles is not None:
            starts = [len(pieces.head) + sum(len(c) for c in pieces.chunks[:i]) for i in range(len(pieces.chunks))]
            self._craft().record(keys, pieces.chunks, starts, result.cache.kv,
                                 result.profiles, self._prefix)
        timings = {"load_s": loaded_at - started, "blend_s": fused_at - loaded_at, **stages}
        used = {k: getattr(fusion, k) for k in fusion.__dataclass_fields__}  # type: ignore[attr-defined]
        tier_hits = found.counts()
        misses = len(chunk_kvs) - hits if fusion.uses_cache else 0
        return Fused(result, started, fused_at, timings, hits, misses, used, tuple(p.to_dict() for p in plans),
                     tier_hits)


def check_request(question: str, chunks: Sequence[str]) -> None:
    """Raise `InvalidInputError` for an empty question, no chunks or an empty chunk."""
    if not isinstance(question, str) or not has_text(question):
        raise InvalidInputError("the question is empty; pass the text to answer")
    _check_chunks(chunks)


def _check_chunks(chunks: Sequence[str]) -> None:
    if isinstance(chunks, str) or not isinstance(chunks, Sequence) or len(chunks) == 0:
        raise InvalidInputError("no chunks given; pass a non-empty list of passage texts")
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, str) or not has_text(chunk):
            raise InvalidInputError(f"chunk {i} is empty; every chunk must hold text")
