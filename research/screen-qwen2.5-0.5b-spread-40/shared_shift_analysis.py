"""How much of the K/V deviation (full prefill vs reused chunk caches) do a chunk's tokens share?

Per layer, over the first N HotpotQA examples of the push screen (int8 caches, built-in primer):
the share of the deviation energy that each chunk's mean deviation explains (oracle, every
token), and what is left on the other tokens when the mean is taken over the 15 % of tokens that
deviate most only and added at alpha 0.25 / 0.5 / 1 ("sel-mean", what a blend can know), or
spread by key similarity (kernel, temperature T). K deviations are compared with their rotary
rotation undone. Positive: the estimate explains that share; negative: it adds error.

  .venv/bin/python shared_shift_analysis.py 6 > shared_shift_analysis.txt
"""
import sys
from pathlib import Path
import torch
from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.eval.datasets import load_examples
from chunkcache.model.executor import rotate_half

N = int(sys.argv[1]) if len(sys.argv) > 1 else 6
engine = ChunkCacheEngine(Settings.load(None, model="qwen2.5-0.5b", dtype="float32", store_path="/tmp/scr/ev/hp-store"))
ex = engine.model.executor
examples = load_examples(Path("../shared/data/hotpotqa_distractor_train100.jsonl"), N, None)

def unrot(k, pos):
    cos, sin = ex._cos_sin(pos, k.dtype)
    return k * cos - rotate_half(k) * sin

rows = {}
for e in examples:
    chunks = list(e.chunks)
    engine.precompute(chunks)
    pf = engine._prepare(e.question, chunks, "full", 1, {})
    pr = engine._prepare(e.question, chunks, "reuse", 1, {})
    pieces = pf.pieces
    h = len(pieces.head)
    spans, s = [], h
    for c in pieces.chunks:
        spans.append((s, s + len(c))); s += len(c)
    ctx = torch.arange(h, s)
    pos = ctx
    L = ex.num_layers
    kf, kr = pf.result.cache.kv, pr.result.cache.kv
    for l in range(1, L):
        res = {}
        for which in (0, 1):
            a, b = kf[l, which][:, ctx].float(), kr[l, which][:, ctx].float()
            if which == 0:
                a, b = unrot(a, pos), unrot(b, pos)
            D = a - b  # [H, n, d]
            res[which] = (D, b)
        # selection by true deviation (K and V normalised), top 15 %
        dk = res[0][0].pow(2).sum((0, 2)); dv = res[1][0].pow(2).sum((0, 2))
        dev = dk / dk.mean() + dv / dv.mean()
        n = len(ctx); m = max(1, round(0.15 * n))
        sel = torch.zeros(n, dtype=torch.bool); sel[torch.topk(dev, m).indices] = True
        cid = torch.zeros(n, dtype=torch.long)
        for i, (a0, b0) in enumerate(spans):
            cid[a0 - h:b0 - h] = i
        out = []
        for which in (0, 1):
            D, old = res[which]
            E_all = D.pow(2).sum().item()
            # oracle per-chunk mean (all tokens)
            R = 0.0
            for i in range(len(spans)):
                mk = cid == i
                R += (D[:, mk] - D[:, mk].mean(1, keepdim=True)).pow(2).sum().item()
            oracle = 1 - R / E_all
            # from the selected tokens, applied to the others, alpha in (0.5, 1), per-chunk
            rest = ~sel
            E_rest = D[:, rest].pow(2).sum().item()
            ex_a = {}
            for alpha in (0.25, 0.5, 1.0):
                R = 0.0
                for i in range(len(spans)):
                    mk = cid == i
                    ms = mk & sel
                    mean = D[:, ms].mean(1, keepdim=True) if ms.any() else torch.zeros_like(D[:, :1])
                    R += (D[:, mk & rest] - alpha * mean).pow(2).sum().item()
                ex_a[alpha] = 1 - R / E_rest
            # kernel regression on old keys (pre-rope K of this layer), per head
            oldk = res[0][1]
            f = torch.nn.functional.normalize(oldk, dim=-1)
            sims = f[:, rest] @ f[:, sel].transpose(1, 2)  # [H, r, s]
            kern = {}
            for T in (0.05, 0.1):
                w = torch.softmax(sims / T, dim=-1)
                est = w @ D[:, sel]
                for alpha in (0.5, 1.0):
                    kern[(T, alpha)] = 1 - (D[:, rest] - alpha * est).pow(2).sum().item() / E_rest
            out.append((oracle, ex_a, kern))
        rows.setdefault(l, []).append(out)
    print("example", e.id, flush=True)

for l in sorted(rows):
    for which, nm in ((0, "K"), (1, "V")):
        vals = [r[which] for r in rows[l]]
        o = sum(v[0] for v in vals) / len(vals)
        a = {al: sum(v[1][al] for v in vals) / len(vals) for al in (0.25, 0.5, 1.0)}
        k = {key: sum(v[2][key] for v in vals) / len(vals) for key in vals[0][2]}
        print(f"L{l:2d} {nm} oracle-mean {o:+.3f} | sel-mean a.25 {a[0.25]:+.3f} a.5 {a[0.5]:+.3f} a1 {a[1.0]:+.3f} | kern "
              + " ".join(f"T{T} a{al} {v:+.3f}" for (T, al), v in k.items()))
