"""Notebook 01's claims, decided from small hand-built sweep tables, and the decision helpers."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from sae_kit import allocation, claims as C
from sae_kit.allocation import FC_REFERENCE


def rows(label, fvu_by_k, seeds=(0, 1, 2), jitter=0.01, under=0.05, dead=0.0, modes=("topk",)):
    """Rows of a sweep table: FVU ∝ given per k, L0 = k, seeds jittered by ±jitter (relative)."""
    out = []
    for k, f in fvu_by_k.items():
        for s in seeds:
            j = 1 + jitter * (s - 1)
            for m in modes:
                out.append({"label": label, "k": k, "seed": s, "mode": m, "default": m == modes[0],
                            "l0": float(k), "fvu": f * j, "nmse": 2 * f * j, "under_used": under * j,
                            "dead": dead, "dead_train": dead, "dead_wide": dead, "zero_hit_expected": dead})
    return out


KS = (8, 16, 32)
BASE = {8: 0.4, 16: 0.3, 32: 0.2}


def table(mc=0.8, fc=0.8, mc_aux=0.8, zipf_under=0.01, fc_dead=0.0):
    scaled = lambda r: {k: r * v for k, v in BASE.items()}
    t = (rows("TopK", BASE) + rows("TopK+AuxK", BASE) + rows(FC_REFERENCE, BASE)
         + rows("MC", scaled(mc), modes=("threshold", "batch")) + rows("MC+AuxK", scaled(mc_aux), modes=("threshold", "batch"))
         + rows("MC+aux_zipf", BASE, under=zipf_under, modes=("threshold", "batch"))
         + rows("FC-Zipf", scaled(fc), dead=fc_dead, modes=("threshold", "batch")))
    return pd.DataFrame(t)


ZIPF = {"alpha": 1.0, "b": 3.0, "r2": 0.95}
DIFF = {"MC": {"rho": 0.3, "p": 1e-9}, "FC-Zipf": {"rho": 0.2, "p": 1e-6}}


def verdicts(cl):
    return {c.claim: c.held for c in cl.items}


def test_choice_rules_that_beat_topk_beyond_noise_hold():
    v = verdicts(allocation.claims(table(), ZIPF, DIFF, 16, KS, 2560))
    assert v["MC ≤ TopK FVU at equal L0"] is True
    assert v["MC+AuxK ≤ TopK+AuxK FVU at equal L0"] is True
    assert v[f"FC-Zipf ≤ {FC_REFERENCE} FVU at equal L0"] is True
    assert v["aux_zipf_loss reduces under-used features"] is True
    assert v["Feature Choice has (near) zero dead features"] is True
    assert v["… and they fire at inference (threshold mode)"] is True
    assert v["feature densities are roughly Zipf"] is True
    assert v["per-token L0 rises with token difficulty"] is True


def test_worse_beyond_noise_does_not_hold_and_a_gap_inside_the_noise_is_not_decided():
    v = verdicts(allocation.claims(table(mc=1.3, fc=1.005, fc_dead=0.2), ZIPF, DIFF, 16, KS, 2560))
    assert v["MC ≤ TopK FVU at equal L0"] is False
    assert v[f"FC-Zipf ≤ {FC_REFERENCE} FVU at equal L0"] is None  # 0.5% apart, seed noise ±2%
    assert v["Feature Choice has (near) zero dead features"] is False


def test_rare_at_inference_is_not_dead_in_training():
    t = table()
    thr = (t.label == "FC-Zipf") & (t["mode"] == "threshold")
    t.loc[thr, ["dead", "dead_wide", "zero_hit_expected"]] = 0.3  # silent at inference, alive in training
    v = verdicts(allocation.claims(t, ZIPF, DIFF, 16, KS, 2560))
    assert v["Feature Choice has (near) zero dead features"] is True
    assert v["… and they fire at inference (threshold mode)"] is False


def test_one_seed_decides_no_gap_and_says_so():
    t = table()
    cl = allocation.claims(t[t.seed == 0], ZIPF, DIFF, 16, KS, 2560)
    row = next(c for c in cl.items if c.claim == "MC ≤ TopK FVU at equal L0")
    assert row.held is None and "one seed" in row.note and "nan" not in row.measured + row.note
    assert row.rule and row.source and row.figure == "01_frontiers"


def test_fvu_and_nmse_pointing_opposite_ways_is_said():
    t = table(fc=0.8)
    fc = t.label == "FC-Zipf"
    t.loc[fc, "nmse"] = t.loc[fc, "nmse"] * 1.5  # FC better on FVU, worse per token
    row = next(c for c in allocation.claims(t, ZIPF, DIFF, 16, KS, 2560).items if c.claim.startswith("FC-Zipf"))
    assert row.held is True and "opposite ways" in row.note and "worse on nMSE" in row.note


def test_a_row_keeps_its_rule_apart_from_its_reason():
    cl = allocation.claims(table(), {"alpha": 1.0, "b": 3.0, "r2": 0.85}, DIFF, 16, KS, 2560)
    row = next(c for c in cl.items if c.claim == "feature densities are roughly Zipf")
    assert row.held is None and row.rule.startswith("held: R² > 0.9") and "between" in row.note
    md = cl.to_markdown()
    assert "why this verdict" in md and "| **not decided** |" in md


def test_expected_zero_hit_by_hand():
    # densities 0, 1e-4 and 0.5 over 10,000 tokens: 1, (1 - 1e-4)^1e4 ≈ e^-1, ≈ 0
    d = torch.tensor([0.0, 1e-4, 0.5])
    assert allocation.expected_zero_hit(d, 10_000) == pytest.approx((1 + math.exp(-1)) / 3, rel=1e-3)


def test_choice_batch_holds_at_least_d_sae_tokens():
    assert allocation.choice_batch(1024, 4608) == 5120 and allocation.choice_batch(512, 512) == 512


def test_decision_helpers():
    assert C.interval(0.1, 0.3).held is True and C.interval(-0.3, -0.1).held is False
    assert C.interval(-0.1, 0.3).held is None and C.interval(float("-inf"), float("inf")).held is None
    assert C.interval(-0.03, 0.2, above=-0.05, below=0.0).held is True  # "at least as well" margin
    assert C.beats_noise([-0.2, -0.3], 0.05).held is True
    assert C.beats_noise([0.2, 0.3], 0.05).held is False
    assert C.beats_noise([0.2, 0.3], 0.05, better="higher").held is True
    assert C.beats_noise([-0.2, 0.01], 0.05).held is None
    assert C.beats_noise([-0.2], float("nan")).reason.startswith("one seed")
    assert C.threshold(0.95, 0.9, 0.8).held is True and C.threshold(0.7, 0.9, 0.8).held is False
    assert C.threshold(float("nan"), 0.9, 0.8).held is None
    assert C.monotone([1, 2, 3]).held is True and C.monotone([1, 3, 2], noise=0.5).held is False
    assert C.monotone([1, 1.05, 1.1], noise=0.2).held is None
    assert C.noise_text(float("nan")) == "one seed (no noise estimate)" and "nan" not in C.noise_text(np.nan)
    assert C.beats_noise([-0.2, float("nan")], 0.05).held is None  # a metric at or below zero decides nothing
    assert C.share_noise([0.0, 0.0]) == C.SHARE_NOISE_FLOOR and C.share_noise([0.01]) == 0.02
    assert math.isnan(C.share_noise([]))
    assert C.share_below(0.0, 0.01, 0.05).held is True and C.share_below(0.06, 0.01, 0.05).held is False
    assert C.share_below(0.03, 0.01, 0.05).held is None and C.share_below(float("nan"), 0.01, 0.05).held is None
    assert C.share_below(0.0, 0.01, 0.05, what="dead").reason == "dead 0.00% is under 1.00%"  # no "-0 > -0.01"
    assert C.beats_noise([-0.2], 0.05).reason.endswith("at its one point")


def test_equal_seeds_do_not_let_one_latent_decide():
    """Every seed with the same under-used share: sd 0, so a one-latent difference must not decide."""
    t = table(zipf_under=0.05 - 1 / 4608)
    t.loc[t.label.isin(["MC", "MC+aux_zipf"]), "under_used"] = t.loc[t.label.isin(["MC", "MC+aux_zipf"]), "label"].map(
        {"MC": 0.05, "MC+aux_zipf": 0.05 - 1 / 4608})
    v = verdicts(allocation.claims(t, ZIPF, DIFF, 16, KS, 2560))
    assert v["aux_zipf_loss reduces under-used features"] is None


def test_claims_round_trip_keeps_rule_source_and_figure(tmp_path):
    cl = C.Claims("t", "ci")
    cl.add("a", "b", "c", C.Verdict(True, "because"), rule="r", source="§1", figure="f")
    back = C.Claims.load(cl.save(tmp_path))
    assert back.items[0].note == "because" and back.items[0].rule == "r" and back.items[0].figure == "f"


def test_quickstart_claims_by_hand():
    from sae_kit import quickstart

    args = dict(metrics={"l0": 32.0, "dead": 0.01}, splice={"delta_ce": 0.08, "ce_recovered": 0.99, "kl": 0.27},
                fvus=[0.14, 0.12, 0.10], k=32, ks=(8, 16, 32), dead_train=0.02, n_eval=20_000, dead_tokens=50_000)
    v = verdicts(quickstart.claims(**args, scale="lab"))
    assert list(v.values()) == [True, True, True, None]
    v = verdicts(quickstart.claims(**{**args, "fvus": [0.14, 0.15, 0.10], "dead_train": 0.2}, scale="lab"))
    assert list(v.values()) == [True, False, False, None]
    assert verdicts(quickstart.claims(**args, scale="ci"))["few dead latents with tied init + AuxK"] is None
    spliced = quickstart.claims(**{**args, "splice": {**args["splice"], "ce_recovered_mean": 0.75}}, scale="lab").items[3]
    assert "99.0% against zero-ablation and 75.0% against mean-ablation" in spliced.measured
    assert "mean-ablation" not in quickstart.claims(**args, scale="lab").items[3].measured


def test_adaptive_computation_row_shows_the_norm_and_the_partial_rho():
    diff = {"MC": {"rho": 0.6, "p": 1e-9, "rho_norm": 0.75, "rho_partial": 0.65},
            "FC-Zipf": {"rho": 0.5, "p": 1e-9, "rho_norm": 0.8, "rho_partial": 0.53}}
    r = next(c for c in allocation.claims(table(), ZIPF, diff, 16, KS, 2560).items if c.claim.startswith("per-token L0"))
    assert "ρ against ‖x‖ alone: MC: 0.75, FC-Zipf: 0.80" in r.measured
    assert "with ‖x‖ held fixed (partial ρ): MC: 0.65, FC-Zipf: 0.53" in r.measured
