"""Offline screen (issue 3 push): does a chunk's context sensitivity explain the deviation its
reused tokens have from full prefill?

Each chunk is also computed behind three other primers (B, C, D of
screen-qwen2.5-0.5b-hotpotqa/7-primer-ensemble); S_j = its cache there minus its cache behind the
built-in primer (K with the rotation undone): how each token moves when the context changes. The
blend runs as shipped (raw codec here, spread negligible) and records its recomputed tokens per
layer. Estimates of the reused tokens' true deviation, scored as in estimators.py (share of the
deviation energy removed, at share 0.25, 1 and the best share, over all layers):

- mean: the recomputed tokens' per-chunk mean (the shipped spread);
- avgBCD: the mean of S_B, S_C, S_D (what averaging primers' caches would move);
- sensB / sens3: per chunk and KV head, the mean plus beta . (S_t - mean S), beta fitted by ridge
  (0.1, or 1 for sens3r1) on the recomputed tokens' deltas; sens3nc: beta . S_t, no intercept;
- sensB_or / sens3_or: the same model fitted on the reused tokens' own true deviation (its bound);
- tok3_or: per token and head, the projection of its deviation onto span(S_B, S_C, S_D);
- oracle: each chunk's exact mean.

  .venv/bin/python sensitivity.py ../shared/data/hotpotqa_distractor_train100.jsonl 6 > sensitivity.txt
"""
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from chunkcache.blend import spread as sp
from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.eval.datasets import load_examples
from estimators import REC, Recorder, layer_sides, per_chunk as per_chunk_counted

PRIMERS = str(Path(__file__).resolve().parents[2] / "screen-qwen2.5-0.5b-hotpotqa/7-primer-ensemble/primer{}.txt")


def per_chunk(x, chunk_of, chunks):
    return per_chunk_counted(x, chunk_of, chunks, torch.bincount(chunk_of, minlength=chunks).float())


def fit(y, xs, lam):
    """Per head: y [H, m, d] ~ sum_j beta_j xs[j] [H, m, d]; ridge lam x mean diag. -> beta [H, J]"""
    X = torch.stack([x.reshape(x.shape[0], -1) for x in xs], -1)  # H, m*d, J
    Y = y.reshape(y.shape[0], -1, 1)
    g = X.transpose(1, 2) @ X
    reg = lam * g.diagonal(dim1=1, dim2=2).mean(-1)[:, None, None] * torch.eye(len(xs)) + 1e-9 * torch.eye(len(xs))
    return torch.linalg.solve(g + reg, X.transpose(1, 2) @ Y)[..., 0]


def sens_est(c, S, fit_on_true, centred, lam):
    """Per chunk: mean + beta . (S_t - mean S), beta fitted on recomputed deltas (or reused true D)."""
    est = torch.zeros_like(c.D)
    for ch in range(c.nch):
        si = torch.nonzero(c.cof == ch).flatten()
        ti = torch.nonzero(c.tof == ch).flatten()
        if not len(ti):
            continue
        if fit_on_true:
            src_y, src_x = c.D[:, ti], [s[:, c.tgt[ti]] for s in S]
        else:
            if len(si) < 2:
                if len(si) == 1 and centred:
                    est[:, ti] = c.delta[:, si].mean(1, keepdim=True)
                continue
            src_y, src_x = c.delta[:, si], [s[:, c.where[si]] for s in S]
        if centred:
            my = src_y.mean(1, keepdim=True)
            mx = [x.mean(1, keepdim=True) for x in src_x]
            beta = fit(src_y - my, [x - m for x, m in zip(src_x, mx)], lam)
            tx = [s[:, c.tgt[ti]] - m for s, m in zip(S, mx)]
            est[:, ti] = my + sum(beta[:, j, None, None] * tx[j] for j in range(len(S)))
        else:
            beta = fit(src_y, src_x, lam)
            est[:, ti] = sum(beta[:, j, None, None] * S[j][:, c.tgt[ti]] for j in range(len(S)))
    return est


def token_oracle(D, S):
    """Per token and head: the projection of D onto span{S_j} (upper bound of the subspace)."""
    X = torch.stack(S, -1)  # H, n, d, J
    g = X.transpose(-1, -2) @ X + 1e-6 * torch.eye(len(S))
    beta = torch.linalg.solve(g, X.transpose(-1, -2) @ D[..., None])
    return (X @ beta)[..., 0]


def main() -> None:
    data, n_examples = sys.argv[1], int(sys.argv[2])
    passages = int(sys.argv[3]) if len(sys.argv) > 3 else None
    base = dict(model="qwen2.5-0.5b", dtype="float32", codec="raw", store_tiers="cpu", cpu_budget="8GiB")
    eng = ChunkCacheEngine(Settings.load(None, store_path="/tmp/scr/sens/A", **base))
    alts = {x: ChunkCacheEngine(Settings.load(None, store_path=f"/tmp/scr/sens/{x}", chunk_primer=PRIMERS.format(x),
                                              **base), model=eng.model) for x in "BCD"}
    ex = eng.model.executor
    sp.ChunkShift = Recorder
    acc = {}
    names = None
    for e in load_examples(Path(data), n_examples, passages):
        t0 = time.time()
        chunks = list(e.chunks)
        full = eng._prepare(e.question, chunks, "full", 1, {}).result.cache.kv
        alt_kv = {}
        for x, a in alts.items():
            a.precompute(chunks)
            alt_kv[x] = a._prepare(e.question, chunks, "reuse", 1, {}).result.cache.kv
        eng.precompute(chunks)
        eng._prepare(e.question, chunks, "cacheblend", 1, {"spread_k": 1e-9, "spread_v": 0.0})
        layout = REC["layout"]
        owner = torch.full((layout.length,), -1, dtype=torch.long)
        for i, span in enumerate(layout.chunks):
            owner[span.start:span.stop] = i
        pos, n, nch = layout.positions, layout.length, len(layout.chunks)
        unrot = lambda x, p: ex.turn(x, p, inverse=True)  # noqa: E731
        for c in layer_sides(full, layout, unrot, owner):
            layer, which, delta, D, cof, tof, tgt = c.layer, c.which, c.delta, c.D, c.cof, c.tof, c.tgt
            S = [alt_kv[x][layer, which][:, :n].float() - c.cache[:, :n].float() for x in "BCD"]
            if which == 0:
                S = [unrot(s, pos[:n]) for s in S]
            means = per_chunk(delta, cof, nch)
            ests = {"mean": means[:, tof],
                    "avgBCD": sum(s[:, tgt] for s in S) / 3,
                    "sensB": sens_est(c, S[:1], False, True, 0.1),
                    "sens3": sens_est(c, S, False, True, 0.1),
                    "sens3r1": sens_est(c, S, False, True, 1.0),
                    "sens3nc": sens_est(c, S, False, False, 0.1),
                    "sensB_or": sens_est(c, S[:1], True, True, 0.0),
                    "sens3_or": sens_est(c, S, True, True, 0.0),
                    "tok3_or": token_oracle(D, [s[:, tgt] for s in S]),
                    "oracle": per_chunk(D, tof, nch)[:, tof]}
            names = list(ests)
            for name, est in ests.items():
                a_ = acc.setdefault((layer, which, name), [0.0, 0.0, 0.0])
                a_[0] += (est * D).sum().item(); a_[1] += (est * est).sum().item(); a_[2] += (D * D).sum().item()
        print("example", e.id, f"{time.time() - t0:.0f}s", flush=True)
        report(acc, names, len(REC["layers"]))


def report(acc, names, layers) -> None:
    def gain(a, s):
        return (2 * s * a[0] - s * s * a[1]) / a[2]

    for which, label in ((0, "K"), (1, "V")):
        total = {name: [0.0, 0.0, 0.0] for name in names}
        for layer in range(1, layers):
            for name in names:
                total[name] = [t + x for t, x in zip(total[name], acc[(layer, which, name)])]
        print(label, " ".join(f"{name}: @.25 {gain(t, 0.25):+.3f} @1 {gain(t, 1.0):+.3f} best {t[0] / t[1]:.2f} ({gain(t, t[0] / t[1]):+.3f})"
                             for name, t in total.items()), flush=True)


if __name__ == "__main__":
    main()
