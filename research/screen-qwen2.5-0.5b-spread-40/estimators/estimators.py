"""Offline screen of spread estimators (issue 3 push), int8 caches, built-in primer.

Records the real default blend (its spread negligible) at every layer: which tokens it computes,
their fresh K/V and the cache before the write. Then scores estimates of each reused chunk token's
correction against its true deviation (full prefill minus reused; K with its rotation undone):
per layer, the share of that deviation energy an estimate removes at share 0.25, and its best
share with what it removes there. Families (the first argument):

- base: the recomputed tokens' per-chunk mean (the shipped spread); pooled over chunks; shrunk by
  count n / (n + 5); scaled per token by its layer-1 deviation (magL1: least squares, magL1mean:
  ratio to the mean) or by a position-in-chunk profile 1 / sqrt(1 + p / 8) (posprof)
- regression: ridge regression of the correction on the token's cached K and V per layer and KV
  head, centred per chunk (rc) or with one intercept (rg), ridge 1 or 10 x the mean eigenvalue
- random_sample: each chunk's mean over a uniform random sample of 4 / 8 / 16 of its reused tokens
  (their true deviation: what recomputing such a sample would measure), alone or averaged with the
  recomputed tokens' mean (mix)
- layer1_calibration: the mean scaled per chunk (cal1), per prompt (cal1g) or by the ratio of norms
  (norm1) to fit the reused tokens' exact mean at layer 1, where the probe knows every deviation
- layer1_features: weights on the recomputed tokens fitted so their layer-1 deviation matches the
  reused tokens' mean there (calw, ridge towards uniform), or a ridge regression of the correction
  on every token's exact layer-1 K and V deviation, centred per chunk (rd)

The oracle is each chunk's exact mean over its own reused tokens.

  .venv/bin/python estimators.py FAMILY DATA.jsonl STORE N [PASSAGES] > FAMILY.txt
"""
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from chunkcache.blend import spread as sp
from chunkcache.config import Settings
from chunkcache.engine import ChunkCacheEngine
from chunkcache.eval.datasets import load_examples

REC = {}


class Recorder:
    def __init__(self, executor, layout, k_share, v_share):
        REC["layout"], REC["layers"] = layout, []

    def __call__(self, index, k, v, keys, values):
        REC["layers"].append((index.clone(), k.clone(), v.clone(), keys.clone(), values.clone()))


def per_chunk(x, chunk_of, chunks, counts):  # mean of x [H, n, d] per chunk -> [H, chunks, d]
    return x.new_zeros(x.shape[0], chunks, x.shape[2]).index_add_(1, chunk_of, x) / counts.clamp_min(1)[None, :, None]


def base(c):
    out = {"pool": (c.sums.sum(1, keepdim=True) / c.cnt.sum()).expand(c.H, len(c.tgt), c.d),
           "shrink5": (c.means * (c.cnt / (c.cnt + 5))[None, :, None])[:, c.tof]}
    for name, mag in (("magL1", c.m1), ("posprof", 1.0 / torch.sqrt(1.0 + c.pic / 8.0))):
        mw, mt = mag[c.where], mag[c.tgt]
        num = c.delta.new_zeros(c.H, c.nch, c.d).index_add_(1, c.cof, c.delta * mw[None, :, None])
        den = torch.zeros(c.nch).index_add_(0, c.cof, mw * mw)
        out[name] = (num / den.clamp_min(1e-12)[None, :, None])[:, c.tof] * mt[None, :, None]
    mw, mt = c.m1[c.where], c.m1[c.tgt]
    mm = torch.zeros(c.nch).index_add_(0, c.cof, mw) / c.cnt.clamp_min(1)
    out["magL1mean"] = c.means[:, c.tof] * (mt / mm[c.tof].clamp_min(1e-12))[None, :, None]
    return out


def ridge(x, y, lam):  # batched: x [..., n, f], y [..., n, o]
    g = x.transpose(-1, -2) @ x
    reg = lam * g.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None] * torch.eye(g.shape[-1])
    return torch.linalg.solve(g + reg, x.transpose(-1, -2) @ y)


def regression(c):
    x = torch.cat([c.unrot(c.keys[:, :c.n].float(), c.pos[:c.n]), c.values[:, :c.n].float()], -1)
    xs, xt = x[:, c.where], x[:, c.tgt]
    xm = per_chunk(xs, c.cof, c.nch, c.cnt)
    out = {}
    for lam in (1.0, 10.0):
        w = ridge(xs - xm[:, c.cof], c.delta - c.means[:, c.cof], lam)
        out[f"rc{lam:g}"] = c.means[:, c.tof] + (xt - xm[:, c.tof]) @ w
        ones = lambda z: torch.cat([z, torch.ones(c.H, z.shape[1], 1)], -1)  # noqa: E731
        out[f"rg{lam:g}"] = ones(xt) @ ridge(ones(xs), c.delta, lam)
    return out


def random_sample(c):
    g = torch.Generator().manual_seed(c.layer)
    out = {}
    for size in (4, 8, 16):
        pick = torch.zeros(len(c.tgt), dtype=torch.bool)
        for chunk in range(c.nch):
            idx = torch.nonzero(c.tof == chunk).flatten()
            pick[idx[torch.randperm(len(idx), generator=g)[:size]]] = True
        sampled = per_chunk(c.D[:, pick], c.tof[pick], c.nch, torch.bincount(c.tof[pick], minlength=c.nch).float())
        out[f"rand{size}"] = sampled[:, c.tof]
        out[f"mix{size}"] = 0.5 * sampled[:, c.tof] + 0.5 * c.means[:, c.tof]
    return out


def layer1_calibration(c):
    d1 = c.D1[c.which]
    ms1 = per_chunk(d1[:, c.where], c.cof, c.nch, c.cnt)
    mt1 = per_chunk(d1[:, c.tgt], c.tof, c.nch, torch.bincount(c.tof, minlength=c.nch).float())
    scale = ((ms1 * mt1).sum((0, 2)) / (ms1 * ms1).sum((0, 2)).clamp_min(1e-12)).clamp(0, 1)
    whole = ((ms1 * mt1).sum() / (ms1 * ms1).sum().clamp_min(1e-12)).clamp(0, 1)
    norms = (mt1.pow(2).sum((0, 2)).sqrt() / ms1.pow(2).sum((0, 2)).sqrt().clamp_min(1e-12)).clamp(0, 1)
    return {"cal1": (c.means * scale[None, :, None])[:, c.tof], "cal1g": c.means[:, c.tof] * whole,
            "norm1": (c.means * norms[None, :, None])[:, c.tof]}


def layer1_features(c):
    f1 = torch.cat([c.D1[0].permute(1, 0, 2).reshape(c.n, -1), c.D1[1].permute(1, 0, 2).reshape(c.n, -1)], -1)
    fs, ft = f1[c.where], f1[c.tgt]
    out = {}
    for lam in (0.1, 1.0):
        cal = c.delta.new_zeros(c.H, c.nch, c.d)
        for chunk in range(c.nch):
            si, ti = torch.nonzero(c.cof == chunk).flatten(), torch.nonzero(c.tof == chunk).flatten()
            if len(si) and len(ti):
                a, uniform = fs[si].T, torch.full((len(si),), 1.0 / len(si))
                scale = lam * (a * a).sum() / len(si)  # min |a w - target|^2 + scale |w - uniform|^2
                w = torch.linalg.solve(a.T @ a + scale * torch.eye(len(si)), a.T @ ft[ti].mean(0) + scale * uniform)
                cal[:, chunk] = (c.delta[:, si] * w[None, :, None]).sum(1)
        out[f"calw{lam:g}"] = cal[:, c.tof]
    fm = fs.new_zeros(c.nch, fs.shape[1]).index_add_(0, c.cof, fs) / c.cnt.clamp_min(1)[:, None]
    target = (c.delta - c.means[:, c.cof]).permute(1, 0, 2).reshape(len(c.where), -1)
    for lam in (1.0, 10.0):
        w = ridge(fs - fm[c.cof], target, lam)
        out[f"rd{lam:g}"] = c.means[:, c.tof] + ((ft - fm[c.tof]) @ w).reshape(len(c.tgt), c.H, c.d).permute(1, 0, 2)
    return out


FAMILIES = {f.__name__: f for f in (base, regression, random_sample, layer1_calibration, layer1_features)}


def main() -> None:
    family, data, store, n_examples = FAMILIES[sys.argv[1]], sys.argv[2], sys.argv[3], int(sys.argv[4])
    passages = int(sys.argv[5]) if len(sys.argv) > 5 else None
    engine = ChunkCacheEngine(Settings.load(None, model="qwen2.5-0.5b", dtype="float32", store_path=store))
    ex = engine.model.executor
    sp.ChunkShift = Recorder  # spread_hook builds the spread (blend/spread.py since 00dbb1f)
    acc = {}  # (layer, K/V, estimator) -> [<e, D>, <e, e>, <D, D>]
    names = None
    for e in load_examples(Path(data), n_examples, passages):
        chunks = list(e.chunks)
        engine.precompute(chunks)
        full = engine._prepare(e.question, chunks, "full", 1, {}).result.cache.kv
        engine._prepare(e.question, chunks, "cacheblend", 1, {"spread_k": 1e-9, "spread_v": 0.0})
        layout = REC["layout"]
        owner, pic = torch.full((layout.length,), -1, dtype=torch.long), torch.zeros(layout.length)
        for i, span in enumerate(layout.chunks):
            owner[span.start:span.stop] = i
            pic[span.start:span.stop] = torch.arange(len(span)).float()
        pos, n, nch = layout.positions, layout.length, len(layout.chunks)
        unrot = lambda x, p: ex.turn(x, p, inverse=True)  # noqa: E731
        _, _, _, keys1, values1 = REC["layers"][1]  # the cache before layer 1's writes: every token's deviation
        D1 = [full[1, w][:, :n].float() - cache[:, :n].float() for w, cache in ((0, keys1), (1, values1))]
        D1[0] = unrot(D1[0], pos)
        m1s = [d.pow(2).sum((0, 2)).sqrt() for d in D1]
        for c in layer_sides(full, layout, unrot, owner):
            which, D, tof = c.which, c.D, c.tof
            c.cnt = torch.bincount(c.cof, minlength=nch).float()
            c.sums = c.delta.new_zeros(c.delta.shape[0], nch, c.delta.shape[2]).index_add_(1, c.cof, c.delta)
            c.means = c.sums / c.cnt.clamp_min(1)[None, :, None]
            c.H, c.d, c.pos, c.pic, c.m1, c.D1 = c.delta.shape[0], c.delta.shape[2], pos, pic, m1s[which], D1
            ests = {"mean": c.means[:, tof], **family(c)}
            oracle = per_chunk(D, tof, nch, torch.bincount(tof, minlength=nch).float())
            ests["oracle"] = oracle[:, tof]
            names = list(ests)
            for name, est in ests.items():
                a = acc.setdefault((c.layer, which, name), [0.0, 0.0, 0.0])
                a[0] += (est * D).sum().item(); a[1] += (est * est).sum().item(); a[2] += (D * D).sum().item()
        print("example", e.id, "layers", len(REC["layers"]), flush=True)
    report(acc, names, len(REC["layers"]))


def layer_sides(full, layout, unrot, owner):
    """Per layer recorded from 1, and per K (which 0) and V (1): the tokens the blend computed
    (``where``, their chunks ``cof``, their fresh-minus-cached ``delta``) and the reused chunk tokens
    (``tgt``, ``tof``, their true deviation from full prefill ``D``), K with its rotation undone."""
    pos, n, nch = layout.positions, layout.length, len(layout.chunks)
    for layer in range(1, len(REC["layers"])):
        index, k, v, keys, values = REC["layers"][layer]
        src = owner[index] >= 0
        where = index[src]
        reused = owner >= 0
        reused[where] = False
        tgt = torch.nonzero(reused).flatten()
        for which, fresh, cache in ((0, k, keys), (1, v, values)):
            delta = fresh[:, src].float() - cache[:, where].float()
            D = full[layer, which][:, tgt].float() - cache[:, tgt].float()
            if which == 0:
                delta, D = unrot(delta, pos[where]), unrot(D, pos[tgt])
            yield SimpleNamespace(layer=layer, which=which, cache=cache, delta=delta, D=D, where=where, tgt=tgt,
                                  cof=owner[where], tof=owner[tgt], nch=nch, n=n, keys=keys, values=values, unrot=unrot)


def report(acc, names, layers) -> None:
    def gain(a, s):  # share of |D|^2 removed at share s
        return (2 * s * a[0] - s * s * a[1]) / a[2]

    for which, label in ((0, "K"), (1, "V")):
        print(f"== {label}: per layer, removed at share 0.25 (oracle: at 1) | best share (removed there) ==")
        print("L  " + " ".join(f"{name:>22s}" for name in names))
        total = {name: [0.0, 0.0, 0.0] for name in names}
        for layer in range(1, layers):
            row = []
            for name in names:
                a = acc[(layer, which, name)]
                total[name] = [t + x for t, x in zip(total[name], a)]
                best = a[0] / max(a[1], 1e-12)
                row.append(f"{gain(a, 1.0 if name == 'oracle' else 0.25):+.3f} {best:5.2f}({gain(a, best):+.3f})")
            print(f"{layer:2d} " + " ".join(f"{r:>22s}" for r in row))
        print("all " + " ".join(f"{name}: {gain(t, 0.25):+.3f} best {t[0] / t[1]:.2f} ({gain(t, t[0] / t[1]):+.3f})"
                                for name, t in total.items()))


if __name__ == "__main__":
    main()
