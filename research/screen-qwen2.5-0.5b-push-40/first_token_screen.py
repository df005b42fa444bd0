"""First-token screen over many strategy specs (issue 3's push): full prefill's first-token logits
are computed once per example and kept in DIR/full-TAG.npz, so each further spec costs only its own
fused prefill. Appends one JSON line per spec (mean KL vs full, first-token agreement, recomputed
fraction, per-example KLs) to DIR/res-TAG.jsonl and keeps each spec's logits in
DIR/logits-TAG-SPEC.npz (numpy arrays, no pickle).

  .venv/bin/python first_token_screen.py --data ../shared/data/hotpotqa_distractor_train100.jsonl \
      --store /tmp/hp-store --tag hp --dir /tmp/screen cacheblend:0.15 cacheblend:0.2
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from chunkcache.blend import parse_strategy_spec
from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.eval.datasets import load_examples
from chunkcache.eval.metrics import first_token_kl

parser = argparse.ArgumentParser()
parser.add_argument("--data", required=True)
parser.add_argument("--store", required=True)
parser.add_argument("--tag", required=True)
parser.add_argument("--dir", default=".")
parser.add_argument("--model", default="qwen2.5-0.5b")
parser.add_argument("--passages", type=int, default=None)
parser.add_argument("--limit", type=int, default=40)
parser.add_argument("specs", nargs="+")
args = parser.parse_args()
out_dir = Path(args.dir)
out_dir.mkdir(parents=True, exist_ok=True)
engine = ChunkCacheEngine(Settings.load(None, model=args.model, dtype="float32", store_path=args.store))
examples = load_examples(Path(args.data), args.limit, args.passages)
full_path = out_dir / f"full-{args.tag}.npz"
full = dict(np.load(full_path)) if full_path.exists() else {}
for spec in args.specs:
    name, params = parse_strategy_spec(spec)
    kls, agree, frac, logits = [], [], [], {}
    started = time.time()
    for example in examples:
        chunks = list(example.chunks)
        engine.precompute(chunks)
        if example.id not in full:
            answer = engine.answer(example.question, chunks, strategy="full", max_new_tokens=1, keep_logits=True)
            full[example.id] = answer.first_token_logits.float().numpy()
            np.savez(full_path, **full)
        answer = engine.answer(example.question, chunks, strategy=name, max_new_tokens=1, keep_logits=True, **params)
        reference = torch.from_numpy(full[example.id])
        logits[example.id] = answer.first_token_logits.float().numpy()
        kls.append(first_token_kl(reference, answer.first_token_logits))
        agree.append(int(reference.argmax()) == int(answer.first_token_logits.argmax()))
        frac.append(answer.recomputed_tokens / answer.prompt_tokens)
    np.savez(out_dir / f"logits-{args.tag}-{spec.replace(':', '_')}.npz", **logits)
    record = {"spec": spec, "n": len(kls), "kl": float(np.mean(kls)), "agree": float(np.mean(agree)),
              "frac": float(np.mean(frac)), "s": round(time.time() - started), "kls": [round(k, 4) for k in kls]}
    with (out_dir / f"res-{args.tag}.jsonl").open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(f"{spec:60s} kl {record['kl']:.4f} agree {record['agree']:.3f} frac {record['frac']:.3f} {record['s']}s",
          flush=True)
