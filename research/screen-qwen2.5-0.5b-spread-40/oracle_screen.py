"""Oracle bound of the spread (screen only; needs screen-propagate.patch applied to 301e5d7): each
chunk's reused tokens take the exact mean of their own deviation from full prefill (per layer,
K with its rotation undone) instead of an estimate from the recomputed tokens.

  .venv/bin/python oracle_screen.py cacheblend:0.15:propagate=1:prop_kv=kv
"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
from chunkcache.blend import parse_strategy_spec
from chunkcache.blend import cacheblend as cb
from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.eval.datasets import load_examples
from chunkcache.eval.metrics import first_token_kl
engine = ChunkCacheEngine(Settings.load(None, model="qwen2.5-0.5b", dtype="float32", store_path="/tmp/scr/ev/hp-store"))
examples = load_examples(Path("../shared/data/hotpotqa_distractor_train100.jsonl"), 40, None)
full = dict(np.load("/tmp/scr/push/full-hp.npz"))
specs = sys.argv[1:]
res = {s: [] for s in specs}
for e in examples:
    chunks = list(e.chunks)
    pf = engine._prepare(e.question, chunks, "full", 1, {})
    cb._ORACLE["kv"] = pf.result.cache.kv
    ref = torch.from_numpy(full[e.id])
    for s in specs:
        name, params = parse_strategy_spec(s)
        a = engine.answer(e.question, chunks, strategy=name, max_new_tokens=1, keep_logits=True, **params)
        res[s].append(first_token_kl(ref, a.first_token_logits))
    cb._ORACLE.clear()
for s in specs:
    rec = {"spec": "ORACLE " + s, "n": 40, "kl": float(np.mean(res[s])), "agree": 0, "frac": 0, "kls": [round(k, 4) for k in res[s]]}
    open("/tmp/scr/push/res-hp.jsonl", "a").write(json.dumps(rec) + "\n")
    print(s, rec["kl"])
