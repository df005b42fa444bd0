"""Metrics follow the LongBench definitions in the data README."""

from __future__ import annotations

import pytest
import torch

from chunkcache.eval.metrics import answers_agree, first_token_kl, normalize_answer, qa_f1_score, rouge_l_score


def test_normalisation() -> None:
    assert normalize_answer("  The Eiffel-Tower, in PARIS!  ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"


def test_qa_f1_counts_multiset_overlap_and_takes_the_best_gold() -> None:
    assert qa_f1_score("Charles County", ["Charles County"]) == 1.0
    # pred tokens: the(dropped) charles county maryland -> 3 tokens, gold 2 tokens, overlap 2
    assert qa_f1_score("the Charles County, Maryland", ["Charles County"]) == pytest.approx(0.8)
    assert qa_f1_score("no no no", ["no"]) == pytest.approx(0.5)  # repeats count once each side
    assert qa_f1_score("Paris", ["London", "paris"]) == 1.0
    assert qa_f1_score("", ["x"]) == 0.0 and qa_f1_score("x", []) == 0.0


def test_rouge_l_matches_the_rouge_package_and_errors_score_zero() -> None:
    assert rouge_l_score("the cat sat on the mat", ["the cat sat on the mat"]) == pytest.approx(1.0, abs=1e-6)
    partial = rouge_l_score("the cat sat", ["the cat sat on the mat"])
    assert 0.3 < partial < 0.9
    assert rouge_l_score("", ["reference"]) == 0.0
    assert rouge_l_score("a b", ["x y", "a b"]) == pytest.approx(1.0, abs=1e-6)


def test_fidelity_measures() -> None:
    logits = torch.tensor([2.0, 1.0, 0.1])
    assert first_token_kl(logits, logits) == pytest.approx(0.0, abs=1e-12)
    assert first_token_kl(logits, torch.tensor([0.1, 1.0, 2.0])) > 0.5
    assert answers_agree("The Answer.", "answer") and not answers_agree("yes", "no")


def test_a_missing_eval_package_names_the_extra_to_install() -> None:
    from chunkcache.errors import InvalidInputError
    from chunkcache.eval.extra import require

    with pytest.raises(InvalidInputError, match=r"plotting needs the no_such_plotter package: pip install 'chunkcache\[eval\]'"):
        require("no_such_plotter.pyplot", "plotting")
    assert require("json", "x").dumps([]) == "[]"
