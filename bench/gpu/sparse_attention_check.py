"""Device check helper: the Triton sparse-query attention kernel against the masked SDPA call it
replaces, at an 8B model's attention shape (32 query heads, 8 KV heads, head size 128, bf16).

Per context length: CacheBlend's selection (15 % of the context, sorted, plus a 32-token question
at the end) and the question alone. For each backend: the largest error against an fp32 reference,
the device time per call (CUDA events, median of 20 after a warm-up) and the host time per call.

  python3 bench/gpu/sparse_attention_check.py --lengths 8192,32768
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from chunkcache.model.attention import masked_attention
from chunkcache.model.sparse_attention import reference_sparse_attention, sparse_query_attention


def masked_sdpa(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, scale: float
                ) -> torch.Tensor:
    mask = torch.arange(keys.shape[1], device=q.device)[None, :] <= index[:, None]
    return masked_attention(q, keys, values, mask, scale).transpose(0, 1).reshape(q.shape[1], -1)


def timed(fn: Callable[[], torch.Tensor], rounds: int = 20) -> tuple[float, float]:
    """Median device ms and host ms per call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    device, host = [], []
    for _ in range(rounds):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0 = time.perf_counter()
        start.record()
        fn()
        stop.record()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        device.append(start.elapsed_time(stop))
    return statistics.median(device), statistics.median(host)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="8192,32768")
    args = parser.parse_args()
    gen = torch.Generator(device="cuda").manual_seed(0)
    heads, kv_heads, d, question = 32, 8, 128, 32
    scale = d**-0.5
    print(f"{'S':>6} {'queries':>12} {'backend':>8} {'max err':>9} {'device ms':>10} {'host ms':>8}")
    for length in (int(x) for x in args.lengths.split(",")):
        buf = torch.randn(2, kv_heads, length + 256, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        keys, values = buf[0, :, :length], buf[1, :, :length]
        context = length - question
        chosen = torch.randperm(context, device="cuda", generator=gen)[: int(0.15 * context)]
        tail = torch.arange(context, length, device="cuda")
        for label, index in (("15 %", torch.cat([torch.sort(chosen).values, tail])), ("question", tail)):
            n = index.shape[0]
            q = torch.randn(n, heads, d, device="cuda", dtype=torch.bfloat16, generator=gen).transpose(0, 1)
            exact = reference_sparse_attention(q.float(), keys.float(), values.float(), index, scale)
            for name, fn in (("triton", sparse_query_attention), ("sdpa", masked_sdpa)):
                err = float((fn(q, keys, values, index, scale).float() - exact).abs().max())
                device_ms, host_ms = timed(lambda: fn(q, keys, values, index, scale))
                print(f"{length:>6} {label + f' ({n})':>12} {name:>8} {err:>9.2e} {device_ms:>10.3f} {host_ms:>8.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
