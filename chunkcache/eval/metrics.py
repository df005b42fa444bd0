"""Answer-quality metrics exactly as the data README defines them (LongBench), plus the fidelity
measures against full prefill that have less noise than F1."""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

import torch

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation, articles -> space, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(prediction: str, gold: str) -> float:
    pred, ref = normalize_answer(prediction).split(), normalize_answer(gold).split()
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, golds: Sequence[str]) -> float:
    """LongBench qa_f1_score: normalised whitespace-token F1, the maximum over gold answers."""
    return max((_f1(prediction, g) for g in golds), default=0.0)


def rouge_l_score(prediction: str, references: Sequence[str]) -> float:
    """LongBench rouge_score: ROUGE-L F of the ``rouge`` package, max over references; any error
    (an empty prediction, say) scores 0."""
    from chunkcache.eval.extra import require

    Rouge = require("rouge", "ROUGE-L scoring (summary tasks)").Rouge

    best = 0.0
    for reference in references:
        try:
            best = max(best, float(Rouge().get_scores([prediction], [reference], avg=True)["rouge-l"]["f"]))
        except (ValueError, RecursionError, ZeroDivisionError, KeyError):
            continue
    return best


def first_token_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """KL(reference || strategy) of the first-token distributions, in nats."""
    p = torch.log_softmax(reference_logits.double(), dim=-1)
    q = torch.log_softmax(logits.double(), dim=-1)
    return float(torch.sum(p.exp() * (p - q)).clamp_min(0.0))


def answers_agree(a: str, b: str) -> bool:
    return normalize_answer(a) == normalize_answer(b)
