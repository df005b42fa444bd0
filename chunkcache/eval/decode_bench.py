"""`chunkcache bench decode`: the batched decode step alone (`chunkcache.blend.decode.step`: pick
every sequence's token on the device, one read back, one batched forward), timed at several
batch sizes and context lengths, per decode mode (`Settings.decode_mode`: the per-sequence
loop, the batched kernel, the batched kernel captured as CUDA graphs). Each sequence has its own cache, filled with random values of
the model's dtype (decode time does not depend on the values, only on the lengths), so an 8K-token
context costs no 8K-token prefill. Reports ms per step (what each sequence waits per token) and
tokens/s over the batch; a row's first step (kernels compiled, a graph captured) apart."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch

from chunkcache.blend.decode import DecodeSequence, step
from chunkcache.blend.decode_graphs import use_decode_mode
from chunkcache.blend.layout import FusedCache
from chunkcache.errors import InvalidInputError
from chunkcache.eval.machine import describe
from chunkcache.model.executor import LayerExecutor


@dataclass(frozen=True)
class DecodeRow:
    mode: str
    context: int
    batch: int
    steps: int
    ms_per_step: float | None  # None: skipped (the caches would not fit in max_kv_bytes)
    tokens_per_s: float | None
    kv_bytes: int
    first_step_ms: float | None = None  # the row's first step: compiling, capturing

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _sequences(executor: LayerExecutor, batch: int, context: int, room: int, seed: int) -> list[DecodeSequence]:
    gen = torch.Generator(executor.device).manual_seed(seed)
    vocab = int(executor.lm_head.weight.shape[0])
    seqs = []
    for _ in range(batch):
        kv = torch.empty(executor.num_layers, 2, executor.num_kv_heads, context + room, executor.head_dim,
                         dtype=executor.dtype, device=executor.device)
        kv.normal_(0, 1, generator=gen)
        logits = torch.randn(vocab, generator=gen, device=executor.device)
        seqs.append(DecodeSequence(FusedCache(kv, context, context), logits, max_new_tokens=room + 1,
                                   eos_token_ids=()))
    return seqs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_decode_bench(executor: LayerExecutor, batches: list[int], contexts: list[int], steps: int = 16,
                     warmup: int = 3, max_kv_bytes: int | None = None, seed: int = 0,
                     modes: list[str] | None = None) -> dict[str, Any]:
    """Time ``steps`` decode steps (after ``warmup``) for every (mode, context, batch); ``modes``
    are decode modes (default: ``auto``). The executor is left in the last mode."""
    if steps < 1 or warmup < 1:
        raise InvalidInputError(f"steps and warmup must be >= 1, got {steps} and {warmup}")
    limit = executor.max_positions
    for context in contexts:
        if context < 1 or (limit and context + warmup + steps > limit):
            raise InvalidInputError(f"context {context} (+{warmup + steps} decoded) does not fit the model's "
                                    f"{limit} positions")
    modes = modes or ["auto"]
    for mode in modes:  # every mode refused or accepted before the first row runs
        use_decode_mode(executor, mode)
    rows, decoders = [], {}
    for mode in modes:
        decoder = use_decode_mode(executor, mode)
        rows += _rows(executor, mode, batches, contexts, steps, warmup, max_kv_bytes, seed)
        # what ran: a batched decoder that fell back to the loop, or captured nothing, shows here
        decoders[mode] = None if decoder is None else dataclasses.asdict(decoder.stats)
    return {"machine": describe(executor.device), "dtype": str(executor.dtype).replace("torch.", ""),
            "layers": executor.num_layers, "rows": [r.to_dict() for r in rows], "decoders": decoders}


def _rows(executor: LayerExecutor, mode: str, batches: list[int], contexts: list[int], steps: int, warmup: int,
          max_kv_bytes: int | None, seed: int) -> list[DecodeRow]:
    rows = []
    for context in contexts:
        for batch in batches:
            need = batch * executor.kv_bytes(context + warmup + steps)
            if max_kv_bytes is not None and need > max_kv_bytes:
                rows.append(DecodeRow(mode, context, batch, steps, None, None, need))
                continue
            seqs = _sequences(executor, batch, context, warmup + steps, seed)
            _sync(executor.device)
            start = time.perf_counter()
            step(executor, seqs)
            _sync(executor.device)
            first_ms = (time.perf_counter() - start) * 1e3
            for _ in range(warmup - 1):
                step(executor, seqs)
            _sync(executor.device)
            start = time.perf_counter()
            for _ in range(steps):
                step(executor, seqs)
            _sync(executor.device)
            seconds = time.perf_counter() - start
            rows.append(DecodeRow(mode, context, batch, steps, seconds / steps * 1e3, batch * steps / seconds, need,
                                  first_ms))
            del seqs
    return rows


def format_table(report: dict[str, Any]) -> str:
    lines = [f"decode: {report['machine']}, {report['dtype']}, {report['layers']} layers",
             "| mode | context | batch | ms / step | tokens/s | vs batch 1 | first step ms | KV GiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    single = {(r["mode"], r["context"]): r["tokens_per_s"] for r in report["rows"] if r["batch"] == 1}
    for r in report["rows"]:
        gib = r["kv_bytes"] / 2**30
        head = f"| {r['mode']} | {r['context']} | {r['batch']} |"
        if r["ms_per_step"] is None:
            lines.append(f"{head} skipped: caches over max_kv_bytes | | | | {gib:.2f} |")
            continue
        base = single.get((r["mode"], r["context"]))
        ratio = f"{r['tokens_per_s'] / base:.1f}x" if base else "-"
        lines.append(f"{head} {r['ms_per_step']:.2f} | {r['tokens_per_s']:.1f} | {ratio} | {r['first_step_ms']:.1f} | "
                     f"{gib:.2f} |")
    for mode, stats in report.get("decoders", {}).items():
        if stats is not None:
            lines.append(f"{mode}: {stats['steps']} batched steps, {stats['captures']} graphs captured "
                         f"({stats['capture_s']:.2f} s), {stats['replays']} replays")
            lines += [f"{mode}: {failure}" for failure in stats["failures"]]
    return "\n".join(lines)
