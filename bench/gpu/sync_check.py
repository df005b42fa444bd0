"""Device check helper: does any strategy make the GPU wait for the host before the first token?

For each store configuration (the CPU tier's pinned caches; the disk tier's int8 entries) and each
strategy, one prompt of ``--tokens`` tokens in ``--chunks`` bundled passages, caches precomputed
and every strategy warmed up; then the fused prefill of a new question (loading, fusion, the
first token's logits) runs under ``torch.cuda.set_sync_debug_mode("error")``: any call that
synchronises with the device (a blocking copy, ``.item()``, ``nonzero``...) raises. The first
token is read afterwards. Prints one line per strategy, ``SYNC OK`` or ``SYNC FAIL`` with the call.

  python3 bench/gpu/sync_check.py --model /dev/shm/llama8b-random --tokens 8192 --chunks 16
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback

import torch

from chunkcache.blend import parse_strategy_spec
from sized_prompt import engine_with_prompt, prompt_arguments  # bench/gpu, the script's own folder

STORES = {"cpu": {"store_tiers": "cpu"}, "disk": {"store_tiers": "disk", "codec": "int8"},
          "disk-cachegen": {"store_tiers": "disk", "codec": "cachegen-2"}}


def main() -> int:
    parser = prompt_arguments(__doc__, "full,reuse,epic,ape,cacheblend:0.15,cachecraft")
    parser.add_argument("--stores", default="cpu,disk,disk-cachegen")
    args = parser.parse_args()
    failed = 0
    cuda = torch.cuda.is_available()  # without it (a CPU dry run) the path runs, unchecked
    for store in args.stores.split(","):
        for key, value in STORES[store].items():
            os.environ[f"CHUNKCACHE_{key.upper()}"] = value
        os.environ.setdefault("CHUNKCACHE_CPU_BUDGET", "64GiB")
        with tempfile.TemporaryDirectory() as folder:
            engine, example = engine_with_prompt(args.model, args.dtype, folder, args.tokens, args.chunks)
            chunks = list(example.chunks)
            specs = [(label, *parse_strategy_spec(label)) for label in args.strategies.split(",")]
            for _, name, params in specs:
                engine.answer(example.question, chunks, strategy=name, max_new_tokens=1, **params)
            for round_, (label, name, params) in enumerate(specs):
                question = example.question + " Please." * (round_ + 1)  # new shapes
                if engine.fusion_graph_stats() is not None:
                    # fixed-shape fusions: a bucket's first request captures it (a synchronising
                    # step); the checked run is then the replay, the steady state
                    engine._fuse(engine.plan(question, chunks, name, 1, **params), None)
                before = engine.fusion_graph_stats()
                if cuda:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    # the fused prefill alone: plan (host work), then load and fuse up to the first logits
                    prepared = engine._fuse(engine.plan(question, chunks, name, 1, **params), None)
                    verdict = "SYNC OK" if cuda else "SYNC n/a (no CUDA: ran unchecked)"
                except RuntimeError as exc:
                    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "chunkcache" in f.filename]
                    where = f"{frames[-1].filename.split('chunkcache/')[-1]}:{frames[-1].lineno}" if frames else "?"
                    verdict, prepared = f"SYNC FAIL at {where}: {str(exc).splitlines()[0]}", None
                    failed += 1
                finally:
                    if cuda:
                        torch.cuda.set_sync_debug_mode("default")
                token = int(prepared.result.logits.argmax()) if prepared is not None else -1
                after = engine.fusion_graph_stats()
                how = ""
                if before is not None and after is not None:
                    if after["replays"] > before["replays"]:
                        how = ", fixed shapes: graph replay"
                    elif after["eager"] > before["eager"]:
                        how = ", fixed shapes: eager"
                    else:
                        how = ", own shapes"
                    how += f"; capture failures: {after['failures']}" if after["failures"] else ""
                print(f"{store:5} {label:28} {verdict} (first token {token}{how})", flush=True)
            engine.close()
    print("SYNC CHECK " + ("OK" if not failed else f"FAILED: {failed}"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
