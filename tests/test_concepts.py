"""Notebook 04's claims as code: `concepts.claims` on small hand-built results whose verdicts are
obvious (held, did not hold, not decided), and the sentence-level chance level of purity."""

import pandas as pd
import pytest
import torch

from sae_kit import concepts, snmf


def shares(snmf_share, sae_share):
    return pd.DataFrame({"concept": [f"c{i}" for i in range(len(snmf_share))], "SNMF share": snmf_share,
                         "SAE share": sae_share})


def steer(scores: dict, kl=(0.1, 0.5)):
    """scores: {method: [harmonic per concept]}, the same at every KL target."""
    return pd.DataFrame([{"method": m, "concept": f"c{i}", "target_kl": t, "harmonic": h}
                         for m, hs in scores.items() for i, h in enumerate(hs) for t in kl])


def tree(sib, oth):
    return pd.DataFrame({"Jaccard siblings": sib, "Jaccard child–outsider": oth})


def fit(stop="patience", losses=(0.9, 0.8, 0.8, 0.8)):
    return snmf.SNMFResult(torch.zeros(3, 2), torch.zeros(4, 2), list(losses), 1, stop, 2)


CHANCE = [0.10 + 0.001 * i for i in range(100)]  # 0.100 … 0.199; 95th percentile ≈ 0.194


def table(**kw):
    args = dict(purity_mean=0.6, chance=CHANCE, shares=shares([0.9] * 6, [0.2] * 6),
                steer=steer({"SNMF": [0.8, 0.7, 0.9, 0.8, 0.75, 0.85], "DiffMean": [0.1, 0.2, 0.1, 0.15, 0.2, 0.1],
                             "SAE": [0.2, 0.1, 0.2, 0.1, 0.15, 0.2]}),
                tree=tree([0.5] * 6, [0.1] * 6), fit=fit(), layer=6, scale="ci")
    args.update(kw)
    return {c.claim: c for c in concepts.claims(**args).items}


def test_every_row_has_rule_reason_source_and_figure():
    rows = table()
    assert len(rows) == 5
    for c in rows.values():
        assert c.rule and c.note and c.source and c.figure


def test_clear_results_hold():
    rows = table()
    assert [c.held for c in rows.values()] == [True] * 5
    assert "stopped by the authors' rule" in rows["SNMF features align with the concepts"].note


def test_clear_results_against_the_paper_do_not_hold():
    rows = table(purity_mean=0.12, shares=shares([0.2] * 6, [0.9] * 6),
                 steer=steer({"SNMF": [0.1] * 6, "DiffMean": [0.8, 0.7, 0.9, 0.8, 0.75, 0.85],
                              "SAE": [0.8, 0.7, 0.9, 0.8, 0.75, 0.85]}),
                 tree=tree([0.1] * 6, [0.5] * 6))
    assert [c.held for c in rows.values()] == [False] * 5


def test_mixed_or_thin_evidence_is_not_decided():
    mixed = [0.5, -0.5, 0.4, -0.4, 0.3, -0.3]
    rows = table(purity_mean=0.197,  # between the shuffles' 95th percentile and their maximum
                 shares=shares([0.5 + d for d in mixed], [0.5] * 6),
                 steer=steer({"SNMF": [0.9, 0.9], "DiffMean": [0.1, 0.1], "SAE": [0.1, 0.1]}),  # 2 concepts only
                 tree=tree([0.5, 0.5, 0.5, 0.5], [0.1, 0.1, 0.1, 0.1]))  # 4 parents only
    assert [c.held for c in rows.values()] == [None] * 5
    assert "only 2 concepts" in rows["SNMF steers better than difference-in-means at matched KL"].note
    assert "only 4 parents" in rows["features grouped under one parent share neurons"].note


def test_a_capped_fit_is_flagged_as_not_converged():
    capped = fit(stop="max_iter", losses=(1.0, 0.9, 0.8, 0.7))
    note = table(fit=capped)["SNMF features align with the concepts"].note
    assert "NOT converged" in note
    assert capped.final_rel_change == pytest.approx((0.9 - 0.7) / 0.7)  # window 2: best before it 0.9, at the end 0.7


def test_sentence_shuffle_keeps_sentences_together():
    # feature 0 fires on the tokens of sentence 0 only: pure under any labelling that keeps sentences whole
    sentence = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 0, 0, 0, 1, 1, 1])
    codes = torch.zeros(12, 1)
    codes[:3, 0] = torch.tensor([3.0, 2.0, 1.0])
    by_sentence = concepts.shuffled_purity(codes, labels, n=3, repeats=20, sentence=sentence)
    by_token = concepts.shuffled_purity(codes, labels, n=3, repeats=20)
    assert torch.all(by_sentence == 1.0)  # 3 tokens of one sentence: always one label
    assert by_token.mean() < 1.0  # token shuffling breaks the sentence apart: chance looks lower
