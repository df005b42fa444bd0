"""Prometheus metrics of the service (prefix ``chunkcache_``, base units): request counts and
latencies, TTFT, per-stage seconds, reused/recomputed tokens, store lookups and bytes per tier,
precompute counters, queue depth. Each service has its own registry."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from chunkcache.api.service import AnswerResult, RagService

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0)
_STAGES = ("retrieve_s", "load_s", "blend_s", "store_read_s", "codec_decode_s", "miss_prefill_s",
           "rerotate_s", "select_s", "recompute_s", "first_token_s", "decode_s")


class ServiceMetrics:
    def __init__(self, service: RagService) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("chunkcache_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.rejected = Counter("chunkcache_rejected_requests", "requests refused because the queue was full",
                                registry=r)
        self.request_seconds = Histogram("chunkcache_request_duration_seconds", "end-to-end request time",
                                         ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("chunkcache_time_to_first_token_seconds", "retrieval to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("chunkcache_stage_duration_seconds", "time per pipeline stage of an answer",
                               ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.reused = Counter("chunkcache_reused_tokens", "prompt tokens served from chunk caches", registry=r)
        self.recomputed = Counter("chunkcache_recomputed_tokens", "prompt tokens computed", registry=r)
        self.generated = Counter("chunkcache_generated_tokens", "tokens generated", registry=r)
        self.chunks = Counter("chunkcache_answer_chunks", "chunks of answers by cache result", ["result"],
                              registry=r)
        self.precompute_chunks = Counter("chunkcache_precompute_chunks", "chunk caches precomputed", registry=r)
        self.precompute_tokens = Counter("chunkcache_precompute_tokens", "tokens of precomputed chunks", registry=r)
        r.register(_LiveCollector(service))

    def observe(self, result: AnswerResult) -> None:
        a = result.answer
        self.ttft.observe(result.retrieve_s + a.ttft_s)
        self.stage.labels("retrieve_s").observe(result.retrieve_s)
        for name in _STAGES[1:]:
            if name in a.timings:
                self.stage.labels(name).observe(a.timings[name])
        self.reused.inc(a.reused_tokens)
        self.recomputed.inc(a.recomputed_tokens)
        self.generated.inc(len(a.token_ids))
        self.chunks.labels("hit").inc(a.cache_hits)
        self.chunks.labels("miss").inc(a.cache_misses)

    def precomputed(self, chunks: int, tokens: int) -> None:
        self.precompute_chunks.inc(chunks)
        self.precompute_tokens.inc(tokens)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _LiveCollector(Collector):
    """Values read at scrape time: the store's per-tier counters and the queue."""

    def __init__(self, service: RagService) -> None:
        self.service = service

    def collect(self) -> Iterator[Any]:
        lookups = CounterMetricFamily("chunkcache_store_lookups", "store lookups by tier and result",
                                      labels=["tier", "result"])
        evictions = CounterMetricFamily("chunkcache_store_evictions", "entries evicted per tier", labels=["tier"])
        corrupt = CounterMetricFamily("chunkcache_store_corrupt_entries", "corrupt entries dropped per tier",
                                      labels=["tier"])
        moved = {d: CounterMetricFamily(f"chunkcache_store_{d}_bytes", f"entry bytes {d} per byte tier (disk, remote)",
                                        labels=["tier"]) for d in ("read", "written")}
        size = GaugeMetricFamily("chunkcache_store_bytes", "bytes held per tier", labels=["tier"])
        entries = GaugeMetricFamily("chunkcache_store_entries", "entries held per tier", labels=["tier"])
        stats = getattr(self.service.engine.store, "stats", None)  # sizes: one pass over each tier
        for tier, v in (stats() if stats else {}).items():
            lookups.add_metric([tier, "hit"], v.get("hits", 0))
            lookups.add_metric([tier, "miss"], v.get("misses", 0))
            evictions.add_metric([tier], v.get("evictions", 0))
            corrupt.add_metric([tier], v.get("corrupt", 0))
            for direction, family in moved.items():
                family.add_metric([tier], v.get(f"{direction}_bytes", 0))
            size.add_metric([tier], v.get("bytes", 0))
            entries.add_metric([tier], v.get("entries", 0))
        queued = GaugeMetricFamily("chunkcache_queue_requests", "requests waiting for or running on the engine")
        scheduler = self.service.scheduler
        queued.add_metric([], scheduler.waiting + max(scheduler.running, int(scheduler.busy)))
        running = GaugeMetricFamily("chunkcache_running_requests", "requests being decoded together (the batch)")
        running.add_metric([], scheduler.running)
        kv = GaugeMetricFamily("chunkcache_kv_budget_used_bytes", "bytes of fused caches held by running requests")
        kv.add_metric([], scheduler.pool.used if scheduler.pool is not None else 0)
        yield from (lookups, evictions, corrupt, *moved.values(), size, entries, queued, running, kv)
