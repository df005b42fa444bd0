"""Device check helper: what masked attention costs on a GPU when every request brings new shapes.

The first profile (bench/results/gpu-h200-llama8b-random) showed cuDNN's attention taking 1.4 ms of
host time per call with CacheBlend's spread on and 0.06 ms without, for the same calls. cuDNN
builds an execution plan for each new shape; the spread's ``index_add_`` (atomic on CUDA) made the
token choice, and so the shapes, differ between runs of the same request. Real traffic brings new
shapes with every request anyway, which a benchmark repeating one prompt hides.

For each strategy and attention setting: two warm-up answers, then ``--fresh`` answers to
questions of new lengths (every shape new), then ``--repeats`` answers to the first question
again (every shape seen). Every ``scaled_dot_product_attention`` call is timed on the host. Settings:

- current: chunkcache's masked attention (grouped heads folded, cuDNN left out: MASKED_BACKENDS);
- cudnn-gqa: the previous call (grouped-query attention, PyTorch's choice of backend: cuDNN);
- deterministic: current, under ``torch.use_deterministic_algorithms``.

  python3 bench/gpu/attention_probe.py --model /dev/shm/llama8b-random --tokens 8192 --chunks 16
"""

from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from chunkcache.blend import parse_strategy_spec
from chunkcache.model.executor import LayerExecutor
from sized_prompt import engine_with_prompt, prompt_arguments  # bench/gpu, the script's own folder

_SDPA = F.scaled_dot_product_attention
CALLS: list[tuple[tuple[Any, ...], float]] = []


def signature(t: torch.Tensor | None) -> tuple[Any, ...]:
    if t is None:
        return ()
    return (tuple(t.shape), t.stride(), t.storage_offset(), str(t.dtype), t.data_ptr() % 256, t.is_contiguous())


def timed_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
               **kwargs: Any) -> torch.Tensor:
    start = time.perf_counter()
    out = _SDPA(q, k, v, attn_mask=attn_mask, **kwargs)
    key = (signature(q), signature(k), signature(v), signature(attn_mask), kwargs.get("is_causal", False))
    CALLS.append((key, time.perf_counter() - start))
    return out


def cudnn_gqa(self: LayerExecutor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
              mask: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q[None], keys[None], values[None], attn_mask=mask, scale=self.scale,
                                          enable_gqa=self.num_heads != self.num_kv_heads)[0]


@contextlib.contextmanager
def mode(name: str) -> Iterator[None]:
    current = LayerExecutor.masked_attention
    if name == "cudnn-gqa":
        LayerExecutor.masked_attention = cudnn_gqa  # type: ignore[method-assign]
    elif name == "deterministic":
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        LayerExecutor.masked_attention = current  # type: ignore[method-assign]
        torch.use_deterministic_algorithms(False)


def main() -> None:
    parser = prompt_arguments(__doc__, "full,reuse,cacheblend:0.15:spread_k=0:spread_v=0,cacheblend:0.15")
    parser.add_argument("--modes", default="current,cudnn-gqa")
    parser.add_argument("--fresh", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    F.scaled_dot_product_attention = timed_sdpa
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    with tempfile.TemporaryDirectory() as store:
        engine, example = engine_with_prompt(args.model, args.dtype, store, args.tokens, args.chunks)
        chunks = list(example.chunks)
        seen: set[tuple[Any, ...]] = set()

        def run(question: str, name: str, params: dict[str, Any]) -> tuple[float, int, float]:
            CALLS.clear()
            sync()
            answer = engine.answer(question, chunks, strategy=name, max_new_tokens=1, **params)
            sync()
            unseen = sum(1 for key, _ in CALLS if key not in seen)
            seen.update(key for key, _ in CALLS)
            return answer.ttft_s * 1e3, unseen, sum(t for _, t in CALLS) * 1e3

        fresh_id = 0
        for label in args.strategies.split(","):
            name, params = parse_strategy_spec(label)
            for how in args.modes.split(","):
                with mode(how):
                    for _ in range(2):
                        run(example.question, name, params)
                    fresh = []
                    for _ in range(args.fresh):
                        fresh_id += 1  # a new question length: new shapes for every strategy and setting
                        fresh.append(run(example.question + " Please answer" + " now" * fresh_id, name, params))
                    warm = [run(example.question, name, params) for _ in range(args.repeats)]
                def show(runs: list[tuple[float, int, float]]) -> str:
                    return (f"TTFT median {statistics.median(r[0] for r in runs):.0f} ms "
                            f"({', '.join(f'{r[0]:.0f}' for r in runs)}), attention host "
                            f"{statistics.median(r[2] for r in runs):.0f} ms, unseen shapes {[r[1] for r in runs]}")
                print(f"===== {label} [{how}]\n  new questions: {show(fresh)}\n  repeated:      {show(warm)}", flush=True)
        engine.close()


if __name__ == "__main__":
    main()
