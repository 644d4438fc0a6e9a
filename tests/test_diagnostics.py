"""Diagnostics of notebook 01 and the AuxK loss, on tiny hand-built inputs.

- `allocation.paper_variants`: every variant pairs like with like (aux loss, capacities, batch).
- `SAE.aux_loss` (AuxK) against a hand computation, in both its dense and its sparse branch.
- `metrics.variance_concentration` on inputs whose variance shares are known by construction.
- `allocation.rank_stability` and `allocation.per_token_difficulty` on inputs with known Spearman ρ.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sae_kit import allocation
from sae_kit.allocation import (FC_REFERENCE, choice_batch, paper_variants, per_token_difficulty,
                                rank_stability)
from sae_kit.metrics import variance_concentration
from sae_kit.saes import FeatureChoiceSAE, MutualChoiceSAE, TopKSAE, choice_sae, sparse_decode, topk_sae
from sae_kit.saes import base as sae_base


# ---------------------------------------------------------------------------------------------
# 1. paper_variants: like with like
# ---------------------------------------------------------------------------------------------

def test_choice_batch_is_the_smallest_multiple_with_at_least_d_sae_tokens():
    assert choice_batch(512, 2048) == 2048  # exact multiple
    assert choice_batch(512, 2049) == 2560  # one feature more: one more batch
    assert choice_batch(512, 100) == 512  # the batch already holds more tokens than features
    assert choice_batch(10, 32) == 40
    assert choice_batch(7, 7) == 7


ZIPF = {"alpha": 1.3, "b": 3.0, "c": -1.0, "r2": 0.95, "n": 30}
D_IN, D_SAE, DEAD, BATCH = 8, 32, 123, 10  # choice_batch(10, 32) = 40


@pytest.fixture(scope="module")
def variants():
    return {v.label: v for v in paper_variants(ZIPF, D_IN, D_SAE, DEAD, BATCH)}


def test_paper_variants_labels_in_order():
    labels = [v.label for v in paper_variants(ZIPF, D_IN, D_SAE, DEAD, BATCH)]
    assert labels == ["TopK", "TopK+AuxK", "MC", "MC+AuxK", "MC+aux_zipf", "FC-Zipf", FC_REFERENCE,
                      "FC-uniform", "FC-Zipf+min_one"]
    assert FC_REFERENCE == "TopK+AuxK, FC batch"


def test_paper_variants_build_with_the_requested_shape_k_seed_and_dead_clock(variants):
    for label, v in variants.items():
        sae = v.build(5, 2)
        assert (sae.cfg.d_in, sae.cfg.d_sae, sae.cfg.k) == (D_IN, D_SAE, 5), label
        assert sae.cfg.dead_tokens == DEAD, label
        assert sae.init_seed == 2, label
        # seeds really reach the init: another seed, other weights
        assert not torch.equal(sae.W_dec, v.build(5, 3).W_dec), label


def test_topk_vs_mc_neither_has_an_aux_loss(variants):
    topk, mc = variants["TopK"].build(4, 0), variants["MC"].build(4, 0)
    assert type(topk) is TopKSAE and type(mc) is MutualChoiceSAE
    assert topk.cfg.aux_coef == 0 and mc.cfg.aux_coef == 0
    assert mc.cfg.aux == "none"
    # with aux_coef 0 the total loss is the FVU alone even when every latent is dead
    x = torch.randn(6, D_IN, generator=torch.Generator().manual_seed(0))
    for sae in (topk, mc):
        sae.train()
        sae.tokens_since_fired.fill_(10 * DEAD)
        out = sae.loss(x)
        assert float(out["aux"]) == 0.0
        assert torch.equal(out["loss"], out["fvu"])


def test_topk_auxk_vs_mc_auxk_both_use_auxk_at_the_same_weight(variants):
    topk, mc = variants["TopK+AuxK"].build(4, 0), variants["MC+AuxK"].build(4, 0)
    assert type(topk) is TopKSAE and type(mc) is MutualChoiceSAE
    assert topk.cfg.aux_coef == pytest.approx(1 / 32) and mc.cfg.aux_coef == pytest.approx(1 / 32)
    assert topk.cfg.k_aux == mc.cfg.k_aux == D_IN // 2
    assert mc.cfg.aux == "auxk"
    # AuxK = dead latents only (not under-used ones)
    mc.tokens_since_fired.zero_()
    mc.density.fill_(0.0)  # every latent far below its Zipf expectation: under-used
    assert not bool(mc.aux_eligible().any())


def test_mc_aux_zipf_uses_the_fitted_zipf_law(variants):
    sae = variants["MC+aux_zipf"].build(4, 0)
    assert type(sae) is MutualChoiceSAE
    assert sae.cfg.aux == "zipf"
    assert sae.cfg.aux_coef == pytest.approx(1 / 32)
    assert (sae.cfg.zipf_alpha, sae.cfg.zipf_b) == (ZIPF["alpha"], ZIPF["b"])
    # aux_zipf widens eligibility to under-used latents
    sae.tokens_since_fired.zero_()
    sae.density.fill_(0.0)
    assert bool(sae.aux_eligible().all())


def test_feature_choice_variants(variants):
    wide = choice_batch(BATCH, D_SAE)
    assert wide >= D_SAE and wide % BATCH == 0 and wide - BATCH < D_SAE

    fc = variants["FC-Zipf"]
    sae = fc.build(4, 0)
    assert type(sae) is FeatureChoiceSAE
    assert sae.cfg.capacity == "zipf" and (sae.cfg.zipf_alpha, sae.cfg.zipf_b) == (ZIPF["alpha"], ZIPF["b"])
    assert sae.cfg.aux == "none" and sae.cfg.aux_coef == 0
    assert sae.cfg.min_one is False
    assert fc.train_kw == {"batch_size": wide}
    assert fc.seeds is None  # the paper's FC runs every seed

    # the FC reference: TopK+AuxK on the same wide batch
    ref = variants[FC_REFERENCE]
    ref_sae = ref.build(4, 0)
    assert type(ref_sae) is TopKSAE and ref_sae.cfg.aux_coef == pytest.approx(1 / 32)
    assert ref.train_kw == {"batch_size": wide} and ref.seeds is None

    uni = variants["FC-uniform"]
    u = uni.build(4, 0)
    assert type(u) is FeatureChoiceSAE and u.cfg.capacity == "uniform"
    assert u.cfg.aux == "none" and u.cfg.min_one is False
    assert uni.train_kw == {"batch_size": wide} and uni.seeds == (0,)
    # uniform capacities: k·B/n each on the wide batch
    assert u.feature_capacities(wide).tolist() == [4 * wide // D_SAE] * D_SAE

    m1 = variants["FC-Zipf+min_one"]
    s1 = m1.build(4, 0)
    assert type(s1) is FeatureChoiceSAE and s1.cfg.capacity == "zipf" and s1.cfg.min_one is True
    assert (s1.cfg.zipf_alpha, s1.cfg.zipf_b) == (ZIPF["alpha"], ZIPF["b"])
    assert m1.train_kw == {"batch_size": wide} and m1.seeds == (0,)
    assert int(s1.feature_capacities(wide).min()) >= 1


def test_non_fc_variants_train_on_the_sweep_batch_with_the_sweep_seeds(variants):
    for label in ("TopK", "TopK+AuxK", "MC", "MC+AuxK", "MC+aux_zipf"):
        assert variants[label].train_kw == {}, label
        assert variants[label].seeds is None, label


def test_fc_zipf_capacities_follow_the_fitted_law(variants):
    """Zipf capacities sum to k·B, and the feature with the highest running density gets the most."""
    wide = choice_batch(BATCH, D_SAE)
    sae = variants["FC-Zipf"].build(4, 0)
    m = sae.feature_capacities(wide)
    assert int(m.sum()) == 4 * wide
    assert int(m[sae.density.argmax()]) == int(m.max())
    assert int(m.max()) > int(m.min())  # not uniform


# ---------------------------------------------------------------------------------------------
# 2. AuxK, end to end, against a hand computation
# ---------------------------------------------------------------------------------------------

W_ENC = torch.tensor([[1.0, 0.0, 0.5, -0.5, 0.2, 0.9],
                      [0.0, 1.0, 0.3, 0.8, -0.4, 0.1],
                      [0.5, -0.2, 1.0, 0.0, 0.6, -0.3],
                      [-0.3, 0.4, 0.0, 1.0, 0.7, 0.2]])
B_ENC = torch.tensor([0.1, -0.1, 0.0, 0.05, -0.2, 0.0])
B_DEC = torch.tensor([0.1, -0.2, 0.0, 0.3])
W_DEC = torch.tensor([[0.6, 0.8, 0.0, 0.0],
                      [0.0, 0.6, 0.8, 0.0],
                      [1.0, 0.0, 0.0, 0.0],
                      [0.0, 0.0, 0.6, -0.8],
                      [0.0, 0.0, 0.0, 1.0],
                      [0.8, 0.0, 0.0, 0.6]])
X = torch.tensor([[2.0, 0.0, 0.5, 0.3],
                  [0.0, 0.2, 2.0, 0.1],
                  [0.1, 1.0, 0.0, 2.0],
                  [1.0, 1.5, 0.3, 0.5],
                  [-1.0, 0.5, 0.3, -0.5]])
DEAD_TOKENS = 10
# latents 2, 3, 4 dead (2 and 4 exactly at the clock's limit); 5 one token short of dead
SINCE_FIRED = torch.tensor([0, 3, 10, 12, 10, 9])
DEAD_SET = [2, 3, 4]


def _hand_sae(k_aux: int, aux_coef: float = 1 / 32):
    sae = topk_sae(4, 6, 1, dead_tokens=DEAD_TOKENS, k_aux=k_aux, aux_coef=aux_coef)
    with torch.no_grad():
        sae.W_enc.copy_(W_ENC)
        sae.b_enc.copy_(B_ENC)
        sae.b_dec.copy_(B_DEC)
        sae.W_dec.copy_(W_DEC)
        sae.tokens_since_fired.copy_(SINCE_FIRED)
    sae.train()
    return sae


def _hand_auxk(sae, x, k, k_aux, dead):
    """AuxK spelled out token by token: pre-activations, the main top-k, the residual e = x − x̂
    (detached), then per token the top k_aux dead latents not kept by the main code, ReLU'd and
    decoded; the loss is Σ‖e − ê‖² / Σ‖e − ē‖² (the FVU of the residual). Returns (loss, chosen)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    es, e_hats, chosen = [], [], []
    for t in range(x.shape[0]):
        order = sorted(range(pre.shape[1]), key=lambda j: -float(pre[t, j].detach()))
        main = order[:k]
        x_hat = sae.b_dec + sum(torch.relu(pre[t, j]) * sae.W_dec[j] for j in main)
        es.append((x[t] - x_hat).detach())
        pick = [j for j in order if j in dead and j not in main][:k_aux]
        chosen.append(pick)
        e_hats.append(sum((torch.relu(pre[t, j]) * sae.W_dec[j] for j in pick), torch.zeros(x.shape[1])))
    e, e_hat = torch.stack(es), torch.stack(e_hats)
    return (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum(), chosen, pre.detach()


def _kit_auxk(sae, x):
    """What `SAE.loss` does: the main code, x̂, then aux_loss with the main code's pairs."""
    code = sae.encode_sparse(x)
    x_hat = sparse_decode(code, sae.W_dec) + sae.b_dec
    return sae.aux_loss(x, x_hat.detach(), code.pre, code)


def _grads(sae, loss):
    sae.zero_grad()
    loss.backward()
    out = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    return out


def test_hand_case_exercises_every_rule():
    """The fixture above is not vacuous: it has a token whose main code keeps a dead latent, a
    token with more dead latents than k_aux, a chosen dead latent with a negative pre-activation,
    and a not-quite-dead latent that would win if it were eligible."""
    sae = _hand_sae(2)
    assert sae.dead_mask().nonzero().flatten().tolist() == DEAD_SET
    _, chosen, pre = _hand_auxk(sae, X, 1, 2, DEAD_SET)
    main = pre.argmax(1).tolist()
    assert main == [0, 2, 3, 1, 3]
    assert any(m in DEAD_SET for m in main)  # tokens 1, 2, 4: main keeps a dead latent
    assert chosen[0] == [2, 4]  # token 0: 3 dead free, the top 2 of them
    assert pre[0, 5] > pre[0, 2]  # ... latent 5 (9 tokens silent) beats both but is alive
    assert chosen[4] == [2, 4] and bool((pre[4, [2, 4]] < 0).all())  # ReLU'd to zero
    assert chosen[1] == [4, 3]  # token 1 kept 2 in the main code: not again


@pytest.mark.parametrize("k_aux", [1, 2, 3])
@pytest.mark.parametrize("branch", ["dense", "sparse"])
def test_aux_loss_matches_hand_computation(monkeypatch, branch, k_aux):
    if branch == "sparse":
        monkeypatch.setattr(sae_base, "DENSE_AUX_WIDTH", 0)
    assert (len(DEAD_SET) <= sae_base.DENSE_AUX_WIDTH * min(k_aux, len(DEAD_SET))) == (branch == "dense")
    # count sparse_decode calls to prove which branch ran: the main code's decode, plus the aux
    # one only in the sparse branch
    calls = []
    real = sae_base.sparse_decode
    monkeypatch.setattr(sae_base, "sparse_decode", lambda *a: calls.append(1) or real(*a))

    sae = _hand_sae(k_aux)
    expected, chosen, _ = _hand_auxk(sae, X, 1, k_aux, DEAD_SET)
    assert len(chosen[0]) == k_aux
    if k_aux == 3:
        assert len(chosen[1]) == 2  # one dead latent kept by the main code: one slot empty
    want = _grads(sae, expected)

    got = _kit_auxk(sae, X)
    # _kit_auxk's own decode goes through this module's import (not counted); aux_loss's through base's
    assert len(calls) == (1 if branch == "sparse" else 0)
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-7)
    grads = _grads(sae, got)
    for name in want:
        torch.testing.assert_close(grads[name], want[name], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")

    # through SAE.loss: the same aux term, weighted aux_coef in the total
    calls.clear()
    out = sae.loss(X)
    assert len(calls) == (2 if branch == "sparse" else 1)
    torch.testing.assert_close(out["aux"], expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["loss"].detach(), out["fvu"] + sae.cfg.aux_coef * out["aux"])


def test_dense_and_sparse_aux_branches_agree(monkeypatch):
    results = {}
    for width in (sae_base.DENSE_AUX_WIDTH, 0):
        monkeypatch.setattr(sae_base, "DENSE_AUX_WIDTH", width)
        sae = _hand_sae(2)
        loss = _kit_auxk(sae, X)
        results[width] = (loss.detach(), _grads(sae, loss))
    (l_dense, g_dense), (l_sparse, g_sparse) = results.values()
    assert float(l_dense) > 0
    torch.testing.assert_close(l_dense, l_sparse)
    for name in g_dense:
        torch.testing.assert_close(g_dense[name], g_sparse[name], msg=lambda m: f"{name}: {m}")
    # the gradient reaches only the dead latents' encoder columns and decoder rows
    for name in ("W_dec", "b_enc"):
        alive = [0, 1, 5]
        assert float(g_dense[name][alive].abs().max()) == 0.0, name
    assert float(g_dense["W_enc"][:, [0, 1, 5]].abs().max()) == 0.0


def test_hand_computation_by_numbers():
    """One value fully by hand: k_aux 1. Residual and aux picks per token (pre-activations from
    `_hand_auxk`, checked here against explicit numbers)."""
    sae = _hand_sae(1)
    _, chosen, pre = _hand_auxk(sae, X, 1, 1, DEAD_SET)
    expected_pre = torch.tensor([[2.25, 0.00, 1.51, -0.74, 0.40, 1.58],
                                 [1.06, -0.18, 2.07, 0.22, 0.68, -0.69],
                                 [-0.41, 1.78, 0.36, 2.71, 0.51, 0.46],
                                 [1.09, 1.62, 1.26, 1.16, -0.38, 0.93],
                                 [-0.61, 0.22, -0.04, 0.36, -1.08, -1.17]])
    torch.testing.assert_close(pre, expected_pre, atol=1e-5, rtol=0)
    assert chosen == [[2], [4], [4], [2], [2]]
    main = [0, 2, 3, 1, 3]
    e = torch.stack([X[t] - B_DEC - expected_pre[t, main[t]].clamp_min(0) * W_DEC[main[t]] for t in range(5)])
    e_hat = torch.stack([expected_pre[t, c[0]].clamp_min(0) * W_DEC[c[0]] for t, c in enumerate(chosen)])
    want = (e - e_hat).pow(2).sum() / (e - e.mean(0)).pow(2).sum()
    torch.testing.assert_close(_kit_auxk(sae, X).detach(), want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("branch", ["dense", "sparse"])
def test_aux_loss_is_exactly_zero_without_dead_latents_or_weight(monkeypatch, branch):
    if branch == "sparse":
        monkeypatch.setattr(sae_base, "DENSE_AUX_WIDTH", 0)
    sae = _hand_sae(2)
    with torch.no_grad():
        sae.tokens_since_fired.copy_(torch.tensor([0, 3, 9, 9, 9, 9]))  # none reaches 10
    assert not bool(sae.dead_mask().any())
    assert float(_kit_auxk(sae, X)) == 0.0
    out = sae.loss(X)
    assert float(out["aux"]) == 0.0 and torch.equal(out["loss"], out["fvu"])

    sae = _hand_sae(2, aux_coef=0.0)
    assert bool(sae.dead_mask().any())
    assert float(_kit_auxk(sae, X)) == 0.0
    out = sae.loss(X)
    assert float(out["aux"]) == 0.0 and torch.equal(out["loss"], out["fvu"])

    # outside training there is no aux loss either
    sae = _hand_sae(2)
    sae.eval()
    assert float(_kit_auxk(sae, X)) == 0.0
    sae.train()
    assert float(_kit_auxk(sae, X).detach()) > 0  # the same SAE in training: dead latents, positive loss


# ---------------------------------------------------------------------------------------------
# 3. variance_concentration
# ---------------------------------------------------------------------------------------------

def test_variance_concentration_one_dominant_token():
    """1000 tokens, all zero but token 7 = 1000·e0. Mean: e0. Centred squared norms: token 7
    999², each other token 1 (its −1 along e0). Total 999² + 999 = 999·1000."""
    n = 1000
    x = torch.zeros(n, 6)
    x[7, 0] = 1000.0
    out = variance_concentration(x)
    total = 999 * 1000
    assert out["tokens"][0.001] == pytest.approx(999 ** 2 / total, rel=1e-12)  # 1 token: 0.999
    assert out["tokens"][0.01] == pytest.approx((999 ** 2 + 9) / total, rel=1e-12)  # 10 tokens
    assert out["tokens"][0.1] == pytest.approx((999 ** 2 + 99) / total, rel=1e-12)  # 100 tokens
    assert out["dims"] == pytest.approx(1.0, rel=1e-12)  # all the variance is in dim 0
    assert int(out["order"][0]) == 7
    assert len(out["curve"]) == n
    assert float(out["curve"][-1]) == pytest.approx(1.0)
    assert float(out["curve"][0]) == pytest.approx(0.999)


def test_variance_concentration_dims_and_fractions():
    """14 tokens in ± pairs (mean 0): tokens 2j, 2j+1 are ±(j+1)·e_j, j = 0..6. Each token's
    share is (j+1)²/280 (Σ 2(j+1)² = 2·140); dimension j holds 2(j+1)²/280."""
    x = torch.zeros(14, 7)
    for j in range(7):
        x[2 * j, j], x[2 * j + 1, j] = j + 1, -(j + 1)
    out = variance_concentration(x, top=(0.001, 0.1, 0.5), dims=5)
    # 0.001·14 rounds to 0: at least one token; 0.1·14 = 1.4 → 1 token; 0.5·14 = 7 tokens
    assert out["tokens"][0.001] == pytest.approx(49 / 280)
    assert out["tokens"][0.1] == pytest.approx(49 / 280)
    assert out["tokens"][0.5] == pytest.approx((49 + 49 + 36 + 36 + 25 + 25 + 16) / 280)
    assert out["dims"] == pytest.approx(2 * (9 + 16 + 25 + 36 + 49) / 280)  # dims 2..6
    assert variance_concentration(x, dims=1)["dims"] == pytest.approx(2 * 49 / 280)
    assert variance_concentration(x, dims=50)["dims"] == pytest.approx(1.0)  # more dims than x has
    assert sorted(out["order"][:2].tolist()) == [12, 13]
    assert bool((out["curve"][1:] >= out["curve"][:-1]).all())


def test_variance_concentration_is_about_centred_variance():
    """A constant offset on every token changes no share (the variance is about the mean)."""
    x = torch.zeros(14, 7)
    for j in range(7):
        x[2 * j, j], x[2 * j + 1, j] = j + 1, -(j + 1)
    a = variance_concentration(x, top=(0.5,))
    b = variance_concentration(x + 100.0, top=(0.5,))
    assert b["tokens"][0.5] == pytest.approx(a["tokens"][0.5], rel=1e-9)
    assert b["dims"] == pytest.approx(a["dims"], rel=1e-9)


# ---------------------------------------------------------------------------------------------
# 4. rank_stability and per_token_difficulty
# ---------------------------------------------------------------------------------------------

def _density_with_ranks(start: torch.Tensor, sigma: list[int]) -> torch.Tensor:
    """Densities whose ranks are sigma(rank of `start`) (ranks 0 = smallest, no ties)."""
    ranks = start.argsort().argsort()
    return torch.tensor([float(sigma[int(r)]) + 0.5 for r in ranks]) / 100


@pytest.mark.parametrize("rule", ["fc", "mc"])
def test_rank_stability_known_spearman(rule):
    n = 10
    sae = choice_sae(rule, 4, n, 2, seed=3)
    start = sae.start_density()
    assert len(torch.unique(start)) == n  # no ties: Spearman's no-tie formula applies
    # untouched: the running densities are the starting ones
    assert rank_stability(sae) == pytest.approx(1.0)
    # two adjacent swaps at the ends: Σd² = 4, ρ = 1 − 6·4 / (n(n² − 1)) = 1 − 24/990
    sigma = [1, 0, 2, 3, 4, 5, 6, 7, 9, 8]
    sae.density.copy_(_density_with_ranks(start, sigma))
    assert rank_stability(sae) == pytest.approx(1 - 24 / 990)
    # reversed ranks: ρ = −1
    sae.density.copy_(_density_with_ranks(start, list(range(n))[::-1]))
    assert rank_stability(sae) == pytest.approx(-1.0)
    # a shifted ranking: rank r → (r + 5) mod 10. Σd² = 5·25 + 5·25 = 250, ρ = 1 − 1500/990
    sae.density.copy_(_density_with_ranks(start, [(r + 5) % n for r in range(n)]))
    assert rank_stability(sae) == pytest.approx(1 - 1500 / 990)


def test_start_density_is_a_function_of_the_seed_not_the_global_rng():
    sae = choice_sae("fc", 4, 10, 2, seed=3)
    first = sae.density.clone()
    torch.manual_seed(12345)
    torch.rand(100)
    assert torch.equal(sae.start_density(), first)
    assert torch.equal(choice_sae("fc", 4, 10, 2, seed=3).density, first)
    assert not torch.equal(choice_sae("fc", 4, 10, 2, seed=4).density, first)
    # the values are the Zipf-expected densities, permuted
    from sae_kit.saes import zipf_probs

    want = (2 * zipf_probs(10, 1.0, 1.0)).sort().values
    torch.testing.assert_close(first.sort().values, want)


def _difficulty_saes():
    """A choice SAE whose threshold mode fires latent i when x_i > 0.5, and a TopK k=1 SAE that
    reconstructs x by its largest coordinate (identity encoder, unit atoms e_i)."""
    eye = torch.cat([torch.eye(4), torch.zeros(4, 1)], 1)  # [4, 5]: latent 4 reads nothing
    ch = choice_sae("mc", 4, 5, 1)
    top = topk_sae(4, 5, 1)
    with torch.no_grad():
        for sae in (ch, top):
            sae.W_enc.copy_(eye)
            sae.b_enc.zero_()
            sae.b_dec.zero_()
            sae.W_dec.copy_(torch.cat([torch.eye(4), torch.eye(4)[:1]], 0))
        ch.threshold.fill_(0.5)
        ch.threshold_ready.fill_(True)
    assert not ch.training and ch.mode == "threshold" and not top.training
    return ch, top


def test_per_token_difficulty_known_values():
    ch, top = _difficulty_saes()
    x = torch.tensor([[8.0, 0.0, 0.0, 0.0],  # L0 1; TopK exact
                      [4.0, 1.0, 0.0, 0.0],  # L0 2; abs err 1, rel 1/√17
                      [2.0, 1.0, 1.0, 0.0],  # L0 3; abs err √2, rel √2/√6
                      [0.9, 0.8, 0.7, 0.6]])  # L0 4; abs err √1.49, rel √1.49/√2.30
    out = per_token_difficulty(ch, top, x)
    assert out["l0"].tolist() == [1.0, 2.0, 3.0, 4.0]
    abs_err = torch.tensor([0.0, 1.0, 2 ** 0.5, 1.49 ** 0.5])
    norms = torch.tensor([8.0, 17 ** 0.5, 6 ** 0.5, 2.30 ** 0.5])
    torch.testing.assert_close(out["err"], abs_err / norms)
    # relative error rises with L0: ρ = 1
    assert out["rho"] == pytest.approx(1.0)
    # absolute error ranks 1, 2, 4, 3 against L0's 1, 2, 3, 4: ρ = 1 − 6·2/(4·15) = 0.8
    assert out["rho_abs"] == pytest.approx(0.8)
    # norms fall as L0 rises: ρ = −1
    assert out["rho_norm"] == pytest.approx(-1.0)
    assert 0.0 <= out["p"] <= 1.0


def test_per_token_difficulty_relative_error_is_scale_free():
    """Scaling a token leaves the TopK relative error unchanged (the absolute error scales with it);
    and the choice SAE's L0 is its own (threshold mode), not the TopK SAE's k = 1."""
    ch, top = _difficulty_saes()
    x = torch.tensor([[4.0, 1.0, 0.0, 0.0], [2.0, 1.0, 1.0, 0.0], [0.9, 0.8, 0.7, 0.6]])
    a = per_token_difficulty(ch, top, x)
    scaled = x * torch.tensor([[1.0], [3.0], [10.0]])
    b = per_token_difficulty(ch, top, scaled)
    torch.testing.assert_close(a["err"], b["err"])
    assert a["l0"].tolist() == [2.0, 3.0, 4.0]
    assert b["l0"].tolist() == [2.0, 3.0, 4.0]  # every coordinate kept its side of 0.5
    # nothing was switched out of inference mode
    assert not ch.training and not top.training and ch.mode == "threshold"


def test_partial_spearman_takes_out_what_the_control_explains():
    """Two quantities that both follow the token norm correlate strongly, and not at all once the
    norm is held fixed; a quantity tied to the other beyond the norm keeps its correlation."""
    from scipy.stats import spearmanr

    gen = np.random.default_rng(0)
    norm = np.arange(400, dtype=float)
    a = norm + 20 * gen.standard_normal(400)
    b = norm + 20 * gen.standard_normal(400)
    assert spearmanr(a, b)[0] > 0.9 and abs(allocation.partial_spearman(a, b, norm)) < 0.15
    assert allocation.partial_spearman(a, a, norm) == pytest.approx(1.0)
    assert allocation.partial_spearman(a, -a, norm) == pytest.approx(-1.0)
    assert np.isnan(allocation.partial_spearman(norm, a, norm))  # nothing left once the control is out
