"""Offline check of a data-dependent budget: from the first-token logits that
first_token_screen.py keeps (tag hp: full, reuse, cacheblend:0.15, cacheblend:0.3), escalate the
examples with the largest KL(blend || reuse) to a fresh cacheblend:0.3 and report the mean KL.

  python escalation_offline.py /tmp/screen
"""
import sys
from pathlib import Path

import numpy as np
import torch

folder = Path(sys.argv[1] if len(sys.argv) > 1 else ".")


def load(name: str) -> dict[str, np.ndarray]:
    return dict(np.load(folder / name))


def kl(p: np.ndarray, q: np.ndarray) -> float:
    lp = torch.log_softmax(torch.from_numpy(p).double(), -1)
    lq = torch.log_softmax(torch.from_numpy(q).double(), -1)
    return float((lp.exp() * (lp - lq)).sum())


def ranks(x: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(x))


full, reuse = load("full-hp.npz"), load("logits-hp-reuse.npz")
b15, b30 = load("logits-hp-cacheblend_0.15.npz"), load("logits-hp-cacheblend_0.3.npz")
ids = list(b15)
signal = np.array([kl(b15[i], reuse[i]) for i in ids])
at15 = np.array([kl(full[i], b15[i]) for i in ids])
at30 = np.array([kl(full[i], b30[i]) for i in ids])
print("Spearman(KL(blend||reuse), KL(full||blend)):", round(float(np.corrcoef(ranks(signal), ranks(at15))[0, 1]), 3))
for share in (0.1, 0.2, 0.3):
    top = np.argsort(-signal)[: round(share * len(ids))]
    mixed = at15.copy()
    mixed[top] = at30[top]
    print(f"escalate top {share:.0%}: mean KL {mixed.mean():.3f} (all at 15 %: {at15.mean():.3f}, all at 30 %: {at30.mean():.3f})")
