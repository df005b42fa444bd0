"""Device check helper: where the time of one warm answer goes, per strategy, under torch.profiler.

For each strategy: one prompt of ``--tokens`` tokens in ``--chunks`` bundled passages, caches
precomputed and every strategy warmed up, then one profiled ``answer`` (first token only). Prints
the operators that take the most device and host time, and how often the host waited for the
device (synchronisations, copies between host and device) - what a per-layer Python loop pays on a
GPU and what kernel counts alone do not show.

  python3 bench/gpu/profile_fusion.py --model /dev/shm/llama8b-random --tokens 8192 --chunks 16 \\
      --strategies reuse,cacheblend:0.15,cacheblend:0.15:spread_k=0:spread_v=0 > $OUT/profile.txt
"""

from __future__ import annotations

import tempfile
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from chunkcache.blend import parse_strategy_spec
from sized_prompt import engine_with_prompt, prompt_arguments  # bench/gpu, the script's own folder

# host-side calls that wait for the device or move data between host and device
WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync", "cudaMemcpy", "cudaEventSynchronize",
         "aten::item", "aten::_local_scalar_dense", "aten::nonzero")


def main() -> None:
    parser = prompt_arguments(__doc__, "full,reuse,cacheblend:0.15,cacheblend:0.15:spread_k=0:spread_v=0")
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    with tempfile.TemporaryDirectory() as store:
        engine, example = engine_with_prompt(args.model, args.dtype, store, args.tokens, args.chunks)
        chunks = list(example.chunks)
        specs = [(label, *parse_strategy_spec(label)) for label in args.strategies.split(",")]
        for _ in range(2):
            for _, name, params in specs:
                engine.answer(example.question, chunks, strategy=name, max_new_tokens=1, **params)
        for label, name, params in specs:
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=activities) as prof:
                answer = engine.answer(example.question, chunks, strategy=name, max_new_tokens=1, **params)
                if cuda:
                    torch.cuda.synchronize()
            events = prof.key_averages()
            waits = Counter({e.key: e.count for e in events if e.key in WAITS})
            stages = ", ".join(f"{k} {v * 1e3:.0f}" for k, v in answer.timings.items() if k.endswith("_s") and v > 5e-4)
            print(f"\n===== {label}: TTFT {answer.ttft_s * 1e3:.0f} ms, {answer.prompt_tokens} tokens; stages (ms): {stages}")
            print("host waits and copies: " + ", ".join(f"{k} x{v}" for k, v in sorted(waits.items())))
            print(events.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))
            if cuda:
                print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows // 2, max_name_column_width=60))
        engine.close()


if __name__ == "__main__":
    main()
