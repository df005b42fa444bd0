"""Oracle check (run from the repo root, 8 HotpotQA examples, Qwen2.5-0.5B, no primer): how low
can the first-token KL go at a 15 % budget if the tokens are chosen with full prefill's true
K/V (which a real system does not have)? Prints per-example KLs and their means."""
import sys, torch, json
from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.eval.datasets import load_examples
from chunkcache.blend.layout import sequential_layout
from chunkcache.blend.strategies import reused_buffer, question_index
from chunkcache.blend.base import FusionInput, finish
from chunkcache.blend.cacheblend import CacheBlend, question_attention
from chunkcache.eval.metrics import first_token_kl
torch.set_num_threads(2)
N = int(sys.argv[1]) if len(sys.argv) > 1 else 5
eng = ChunkCacheEngine(Settings.load(model="qwen2.5-0.5b", dtype="float32", chunk_primer="none"))
ex = eng.model.executor
exs = load_examples("../shared/data/hotpotqa_distractor_train100.jsonl", limit=N)
res = {}
for e in exs:
    chunks = list(e.chunks)
    eng.precompute(chunks)
    head = eng.store.get(eng.head_key())
    pieces = eng.model.template.pieces(e.question, chunks)
    kvs = tuple(eng.store.get(eng.chunk_key(c)) for c in chunks)
    inp = FusionInput(pieces, head, kvs, 1)
    layout = sequential_layout(pieces)
    n = layout.length; ctx = layout.question.start
    fullbuf = ex.empty_kv(n + 1)
    full = finish(ex, layout, fullbuf, torch.arange(n))
    reused = reused_buffer(ex, layout, inp)
    q = question_index(layout)
    budget = round(0.15 * ctx)
    # oracle deviation per layer
    dk = (fullbuf[:, 0, :, :n] - reused[:, 0, :, :n]).pow(2).sum(dim=(1, 3))  # [L, n]
    dv = (fullbuf[:, 1, :, :n] - reused[:, 1, :, :n]).pow(2).sum(dim=(1, 3))
    def run(sel):
        sel = torch.sort(torch.cat([sel, q])).values
        r = finish(ex, layout, reused.clone(), sel)
        return float(first_token_kl(full.logits, r.logits))
    scores = {}
    scores["oracle_k_all"] = (dk / dk.mean(1, keepdim=True)).sum(0)
    scores["oracle_kv_all"] = (dk / dk.mean(1, keepdim=True) + dv / dv.mean(1, keepdim=True)).sum(0)
    scores["oracle_k_l1"] = dk[1]
    # attention of the question in full prefill at each layer, times deviation
    hid = ex.embed(layout.token_ids)
    att = torch.zeros(n)
    cb = CacheBlend(0.15)
    # recompute hidden states layer by layer in full to get question attention
    keys = ex.empty_kv(n)
    h = hid
    for L in range(ex.num_layers):
        qq, kk, vv = ex.qkv(L, h, layout.positions)
        att += question_attention(ex, qq[:, ctx:], kk)
        h = ex.run_layer(L, h, layout.positions, torch.arange(n), keys[L, 0], keys[L, 1])
    scores["oracle_attn_x_kv"] = att * scores["oracle_kv_all"]
    scores["attn_only"] = att
    out = {"reuse": run(torch.empty(0, dtype=torch.long))}
    for name, s in scores.items():
        s = s[:ctx].clone(); s[: layout.head.stop] = -1
        out[name] = run(torch.topk(s, budget).indices)
    dev = cb._deviation(ex, layout, reused)[:ctx]
    out["cb_k"] = run(torch.topk(dev, budget).indices)
    # fraction overlap ours vs oracle
    o = set(torch.topk(scores["oracle_k_all"][:ctx], budget).indices.tolist())
    out["overlap_cb_oracle"] = len(o & set(torch.topk(dev, budget).indices.tolist())) / budget
    print(json.dumps({k: round(v, 3) for k, v in out.items()}), flush=True)
    for k, v in out.items():
        res.setdefault(k, []).append(v)
print("MEAN", json.dumps({k: round(sum(v) / len(v), 3) for k, v in res.items()}))
