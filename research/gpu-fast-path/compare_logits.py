"""First-token logits of every fusion strategy (and the options that change CacheBlend's code
path) on real models, saved so a later commit can be compared bit for bit on the CPU.

  .venv/bin/python research/gpu-fast-path/compare_logits.py save OUT.safetensors [--model M]
  .venv/bin/python research/gpu-fast-path/compare_logits.py compare OUT.safetensors [--model M]

Prompts: the bundled demo's three questions over all six of their passages (so CacheBlend's
selection spans several attention blocks), chunk caches computed behind head + builtin primer,
given both as whole caches and as layer streams."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from chunkcache.blend import FusionInput, make_strategy
from chunkcache.blend.cachecraft import ChunkPlan
from chunkcache.blend.prefill import prefill_chunks, prefill_head, primer_ids
from chunkcache.config import Settings
from chunkcache.model import load_model
from chunkcache.store.stream import LayerStream

SPECS: dict[str, tuple[str, dict]] = {
    "full": ("full", {}),
    "reuse": ("reuse", {}),
    "epic": ("epic", {}),
    "ape": ("ape", {}),
    "cacheblend": ("cacheblend", {}),
    "cacheblend-nospread": ("cacheblend", {"spread_k": 0.0, "spread_v": 0.0}),
    "cacheblend-plain": ("cacheblend", {"selection": "k", "gradual": False, "weight": "none", "spread_k": 0.0,
                                        "spread_v": 0.0}),
    "cacheblend-v-attn": ("cacheblend", {"selection": "v", "weight": "attn", "gradual": False}),
    "cacheblend-qattn_add-sinks": ("cacheblend", {"weight": "qattn_add", "sinks": 4}),
    "cacheblend-perchunk": ("cacheblend", {"per_chunk": True, "gradual": False}),
    "cacheblend-random": ("cacheblend", {"selection": "random"}),
    "cacheblend-0.3": ("cacheblend", {"recompute_ratio": 0.3}),
    "cacheblend-1.0": ("cacheblend", {"recompute_ratio": 1.0}),
    "cachecraft": ("cachecraft", {}),
    "cachecraft-plans": ("cachecraft", {}),
    "cachecraft-plans-inter": ("cachecraft", {"select": "inter"}),
}


def streams(kvs):
    out = []
    for kv in kvs:
        s = LayerStream("k")
        s.start_from(kv)
        out.append(s)
    return out


def plans_for(pieces) -> tuple[ChunkPlan, ...]:
    plans = []
    for i, ids in enumerate(pieces.chunks):
        n = len(ids)
        inter = tuple(float((7 * t + i) % 13) / 13 for t in range(n))
        if i % 2:
            plans.append(ChunkPlan("independent", None))
        else:
            plans.append(ChunkPlan("independent", tuple(range(0, n, 5)), 0.6, 0.0, 0.2, inter))
    return tuple(plans)


def run(model_name: str, examples: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    settings = Settings.load(env={})
    model = load_model(model_name, settings.models_dir, "float32", "cpu", settings.system_prompt,
                       settings.question_template)
    ex = model.executor
    data = json.loads((Path(__file__).resolve().parents[2] / "chunkcache/data/demo.json").read_text())
    out = {}
    for e, example in enumerate(data["examples"][:examples]):
        pieces = model.template.pieces(example["question"], list(example["chunks"]))
        head = prefill_head(ex, pieces.head, "fp")
        prefix = prefill_head(ex, pieces.head + primer_ids(model.template, "builtin"), "fp")
        kvs = prefill_chunks(ex, prefix, list(pieces.chunks), "p")
        for label, (name, params) in SPECS.items():
            fusion = make_strategy(name, **params)
            plans = plans_for(pieces) if label.startswith("cachecraft-plans") else ()
            for mode in ("kv", "stream"):
                chunk_kvs = tuple(kvs) if mode == "kv" else tuple(streams(kvs))
                res = fusion.fuse(ex, FusionInput(pieces, head, chunk_kvs, 4, plans))
                out[f"{e}/{label}/{mode}"] = res.logits.float().cpu().contiguous()
                print(f"{e} {label:28} {mode:6} argmax {int(res.logits.argmax())} recomputed {res.recomputed_tokens}",
                      flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("action", choices=("save", "compare"))
    ap.add_argument("path")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--examples", type=int, default=3)
    args = ap.parse_args()
    got = run(args.model, args.examples)
    if args.action == "save":
        save_file(got, args.path)
        return
    ref = load_file(args.path)
    worst = 0.0
    for key, value in got.items():
        diff = float((value - ref[key]).abs().max())
        same = torch.equal(value, ref[key])
        worst = max(worst, diff)
        print(f"{key:44} {'bit-identical' if same else f'max |diff| {diff:.3e}'}"
              f"{'' if int(value.argmax()) == int(ref[key].argmax()) else '  ARGMAX CHANGED'}")
    print(f"worst {worst:.3e}")
    sys.exit(0)


if __name__ == "__main__":
    main()
