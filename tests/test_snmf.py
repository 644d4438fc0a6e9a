"""Semi-NMF: recovery of a planted factorisation, its constraints and errors; the concept data; label
purity; difference-in-means; matched-KL steering on the real model."""

import math

import pytest
import torch

from sae_kit import concepts, snmf, steering
from sae_kit.claims import bootstrap_ci
from sae_kit.synthetic import match


def planted(d=60, n=800, K=4, keep=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    F = torch.zeros(d, K)
    for j in range(K):
        rows = torch.randperm(d, generator=gen)[:keep]
        F[rows, j] = torch.randn(keep, generator=gen) * 2
    G = torch.rand(n, K, generator=gen) * (torch.rand(n, K, generator=gen) < 0.4)
    return F, G, F @ G.t()


def test_recovers_a_planted_sparse_factorisation():
    F, G, A = planted()
    # hard-thresholding F has local minima (seed 0 stops at 8% error here): keep the best of 3 starts
    fits = [snmf.fit_snmf(A, 4, sparsity=6 / 60, max_iter=3000, patience=300, progress=False, seed=s) for s in range(3)]
    res = min(fits, key=lambda r: r.rel_error)
    assert res.rel_error < 1e-3
    m = match(res.F.t(), F.t())
    assert m["mean"] > 0.99


def test_constraints_and_determinism():
    _, _, A = planted(seed=1)
    A = A + 0.05 * torch.randn(A.shape, generator=torch.Generator().manual_seed(9))
    a = snmf.fit_snmf(A, 5, sparsity=0.1, max_iter=200, progress=False, seed=3)
    b = snmf.fit_snmf(A, 5, sparsity=0.1, max_iter=200, progress=False, seed=3)
    assert (a.G >= 0).all()
    assert ((a.F != 0).sum(0) <= math.ceil(0.1 * 60)).all()
    assert torch.equal(a.F, b.F) and torch.equal(a.G, b.G)
    assert a.rel_error == min(a.losses)
    err = (A - a.F @ a.G.t()).pow(2).sum() / A.pow(2).sum()
    assert float(err) == pytest.approx(a.rel_error, rel=1e-3, abs=1e-5)


@pytest.mark.parametrize("kw, msg", [({"rank": 0}, "rank"), ({"rank": 3, "sparsity": 0.0}, "sparsity"),
                                     ({"rank": 3, "sparsity": 1.5}, "sparsity")])
def test_bad_arguments_are_clear_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        snmf.fit_snmf(torch.rand(10, 20), progress=False, **kw)


def test_nan_and_wrong_shape_are_clear_errors():
    A = torch.rand(10, 20)
    A[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        snmf.fit_snmf(A, 2, progress=False)
    with pytest.raises(ValueError, match="matrix"):
        snmf.fit_snmf(torch.rand(3, 4, 5), 2, progress=False)


def test_purity_and_concept_shares_by_hand():
    labels = torch.tensor([0, 0, 1, 1, -1, 2])
    codes = torch.tensor([[5., 0, 0], [4, 0, 0], [0, 3, 0], [0, 2, 0], [1, 2.5, 0], [0, 0, 0]])
    p = concepts.purity(codes, labels, n=2)
    assert p["label"].tolist() == [0, 1, -1]
    assert p["purity"].tolist() == [1.0, 0.5, 0.0]  # feature 1: tokens 2 (label 1) and 4 (neutral)
    j, share = concepts.best_for_concept(codes, labels, 1, n=2)
    assert (j, share) == (1, 0.5)


def test_diff_means_by_hand():
    acts = torch.tensor([[1., 0], [3, 0], [0, 2], [0, 4]])
    v = concepts.diff_means(acts, torch.tensor([0, 0, 1, -1]), 2)
    assert torch.allclose(v[0], torch.tensor([2., -3]) / 13 ** 0.5)  # (2, 0) − (0, 3)
    with pytest.raises(ValueError, match="no tokens"):
        concepts.diff_means(acts, torch.tensor([0, 0, 0, -1]), 2)


def test_concept_set_is_complete(tmp_path):
    cs = concepts.ConceptSet.load()
    assert len(cs.names) == 20
    for i, name in enumerate(cs.names):
        assert sum(1 for lab in cs.labels if lab == i) == 10
        assert len(cs.words[name]) >= 5
    assert cs.labels.count(-1) >= 20
    assert len(set(cs.sentences)) == len(cs.sentences)
    with pytest.raises(FileNotFoundError, match="concept file"):
        concepts.ConceptSet.load(tmp_path / "missing.json")


def test_concept_activations_on_the_real_model(model):
    cs = concepts.ConceptSet(["a", "b"], {"a": [], "b": []}, ["The cat sat on the mat.", "Rain fell all day."], [0, 1])
    acts = concepts.concept_activations(model, cs, 6)
    n = sum(model.to_tokens(s, prepend_bos=False).shape[1] - 1 for s in cs.sentences)
    assert acts.acts.shape == (n, model.cfg.d_mlp)
    assert acts.labels.tolist().count(0) == model.to_tokens(cs.sentences[0], prepend_bos=False).shape[1] - 1
    both = concepts.concept_activations(model, cs, [2, 6])
    assert torch.allclose(both[6].acts, acts.acts, atol=1e-5)
    with pytest.raises(ValueError, match="layer"):
        concepts.concept_activations(model, cs, 99)


def test_steering_hits_the_kl_target_and_scores_are_bounded(model):
    st = steering.Steerer(model, "blocks.6.mlp.hook_post", n_samples=2, new_tokens=6)
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(model.cfg.d_mlp, generator=gen)
    v = v / v.norm()
    assert st.kl(v, 0.0) == pytest.approx(0.0, abs=1e-6)
    alpha, kl = st.alpha_for_kl(v, 0.1)
    assert kl == pytest.approx(0.1, rel=0.011)
    ids = steering.concept_token_ids(model.tokenizer, ["rain", "storm"])
    assert len(ids) >= 2
    s = st.score(v, alpha, ids)
    assert 0 <= s["concept_score"] < 1 and 0 < s["fluency"] <= 1
    assert 0 <= s["harmonic"] <= min(1.0, 2 * min(s["concept_score"], s["fluency"]) + 1e-9)


def test_batched_steering_equals_one_row_at_a_time(model):
    """kl_rows / alpha_for_kl_rows run the same bisection as the one-direction calls, in batched forwards."""
    st = steering.Steerer(model, "blocks.6.mlp.hook_post", n_samples=2, new_tokens=4)
    gen = torch.Generator().manual_seed(1)
    V = torch.randn(3, model.cfg.d_mlp, generator=gen)
    V = V / V.norm(dim=1, keepdim=True)
    alphas = torch.tensor([0.5, 3.0, 10.0])
    assert torch.allclose(st.kl_rows(V, alphas), torch.tensor([st.kl(v, float(a)) for v, a in zip(V, alphas)]),
                          rtol=1e-3, atol=1e-6)
    targets = torch.tensor([0.05, 0.1, 0.2])
    a_rows, k_rows = st.alpha_for_kl_rows(V, targets)
    for v, t, a, k in zip(V, targets, a_rows, k_rows):
        a1, k1 = st.alpha_for_kl(v, float(t))
        assert float(a) == pytest.approx(a1, rel=1e-3) and float(k) == pytest.approx(k1, rel=1e-2)
        assert float(k) == pytest.approx(float(t), rel=0.011)
    rows = st.score_rows(V[:2], a_rows[:2].float(), [[5, 6], [7]])
    assert len(rows) == 2 and all(0 < r["fluency"] <= 1 for r in rows)


def test_bootstrap_ci():
    m, lo, hi = bootstrap_ci([1.0, 1.0, 1.0])
    assert (m, lo, hi) == (1.0, 1.0, 1.0)
    m, lo, hi = bootstrap_ci([-1.0, 0.0, 1.0, 2.0])
    assert lo < m < hi and m == pytest.approx(0.5)
    assert bootstrap_ci([0.3])[1] == float("-inf")


def test_two_level_snmf_and_sibling_overlap():
    _, _, A = planted(d=60, n=600, K=6, keep=6, seed=2)
    l1, l2 = snmf.fit_hierarchical(A, (6, 2), sparsity=0.1, parent_sparsity=0.5, max_iter=300, progress=False)
    assert l1.F.shape == (60, 6) and l2.F.shape == (6, 2) and (l2.G >= 0).all()
    rows = snmf.sibling_overlap(l1, l2, sparsity=0.1)
    for r in rows:
        assert len(r["children"]) >= 2
        assert all(l2.F[i, r["parent"]] > 0 for i in r["children"])
        assert 0 <= r["jaccard_others"] <= 1 and 0 <= r["jaccard_siblings"] <= 1
    with pytest.raises(ValueError, match="fewer parents"):
        snmf.fit_hierarchical(A, (4, 4), progress=False)


def test_sibling_overlap_by_hand():
    F1 = torch.zeros(10, 4)
    F1[[0, 1], 0] = 1  # features 0 and 1 share neuron 0
    F1[[0, 2], 1] = 1
    F1[[5, 6], 2] = 1
    F1[[7, 8], 3] = 1
    l1 = snmf.SNMFResult(F1, torch.rand(5, 4), [0.0])
    F2 = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 0]])  # parent 0: {0, 1}; parent 1: {2} (skipped)
    rows = snmf.sibling_overlap(l1, snmf.SNMFResult(F2, torch.rand(5, 2), [0.0]), sparsity=0.2)
    assert [r["parent"] for r in rows] == [0]
    assert rows[0]["jaccard_siblings"] == pytest.approx(1 / 3)  # {0,1} vs {0,2}
    assert rows[0]["jaccard_others"] == pytest.approx(0.0)


def test_the_authors_rule_stops_exactly_patience_iterations_after_the_best():
    _, _, A = planted(seed=4)
    A = A + 0.3 * torch.randn(A.shape, generator=torch.Generator().manual_seed(4))  # noise: a plateau to stop on
    r = snmf.fit_snmf(A, 3, sparsity=0.1, max_iter=5000, patience=40, progress=False)
    assert r.stop == "patience" and r.converged
    assert r.n_iter == r.best_iter + 1 + 40  # the best, then 40 iterations without a new one
    assert r.final_rel_change == 0.0  # nothing improved in the last `patience` iterations


def test_the_cap_is_reported_as_not_converged():
    _, _, A = planted(seed=5)
    r = snmf.fit_snmf(A, 4, sparsity=0.1, max_iter=30, progress=False)
    assert (r.stop, r.n_iter, r.converged) == ("max_iter", 30, False)
    assert r.final_rel_change > 0  # a planted fit is still falling after 30 iterations
    assert "cap 30" in r.rule


def test_absolute_tolerance_is_in_units_of_the_squared_error_relative_is_not():
    """The authors' tol is absolute: scaling A by 1,000 makes the same fit count far more iterations as
    improvements (so it stops later, or not at all); a relative tol is blind to the scale."""
    _, _, A = planted(seed=6)
    A = A + 0.3 * torch.randn(A.shape, generator=torch.Generator().manual_seed(6))
    kw = dict(rank=3, sparsity=0.1, max_iter=3000, patience=20, tol=1e-2, progress=False)
    small, big = snmf.fit_snmf(A, **kw), snmf.fit_snmf(1000 * A, **kw)
    assert small.n_iter < big.n_iter
    rel = [snmf.fit_snmf(s * A, tol_kind="relative", **{**kw, "tol": 1e-4}) for s in (1, 1000)]
    assert rel[0].n_iter == rel[1].n_iter and rel[0].best_iter == rel[1].best_iter
    with pytest.raises(ValueError, match="tol_kind"):
        snmf.fit_snmf(A, 3, tol_kind="percent", progress=False)


def test_project_equals_the_dense_product():
    gen = torch.Generator().manual_seed(7)
    A = torch.randn(50, 30, generator=gen)
    F = torch.zeros(50, 4)
    F[[1, 7, 9], 0], F[[7, 40], 2] = 1.0, -2.0  # column 1 and 3 empty, rows shared
    assert torch.allclose(snmf.project(A, F), A.t() @ F, atol=1e-6)


def test_cached_fit_is_reused_and_keyed_on_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_KIT_CACHE", str(tmp_path))
    _, _, A = planted(seed=8)
    a = snmf.fit_snmf_cached(A, 3, sparsity=0.1, max_iter=50, progress=False)
    assert len(list((tmp_path / "snmf").glob("*.pt"))) == 1
    monkeypatch.setattr(snmf, "fit_snmf", lambda *a, **k: pytest.fail("an identical fit was recomputed"))
    b = snmf.fit_snmf_cached(A, 3, sparsity=0.1, max_iter=50, progress=False)
    assert torch.equal(a.F, b.F) and a.losses == b.losses and (a.stop, a.best_iter) == (b.stop, b.best_iter)
    with pytest.raises(pytest.fail.Exception):  # other data, or another argument: a new key
        snmf.fit_snmf_cached(A + 1, 3, sparsity=0.1, max_iter=50, progress=False)
    with pytest.raises(pytest.fail.Exception):
        snmf.fit_snmf_cached(A, 3, sparsity=0.1, max_iter=51, progress=False)


def test_hierarchy_reuses_a_given_level_one():
    _, _, A = planted(d=60, n=300, K=6, keep=6, seed=9)
    l1 = snmf.fit_snmf(A, 6, sparsity=0.1, max_iter=100, progress=False)
    got1, l2 = snmf.fit_hierarchical(A, (6, 2), sparsity=0.1, level1=l1, max_iter=100, progress=False)
    assert got1 is l1 and l2.F.shape == (6, 2)
    with pytest.raises(ValueError, match="level1 has rank"):
        snmf.fit_hierarchical(A, (5, 2), level1=l1, progress=False)


def test_flush_subnormal_zeroes_only_subnormal_entries():
    tiny = torch.finfo(torch.float32).tiny
    G = torch.tensor([[0.0, tiny / 4, tiny, 1e-30], [tiny * 0.999, 3.0, 1e-45, 2 * tiny]])
    out = snmf.flush_subnormal(G.clone())
    assert torch.equal(out, torch.tensor([[0.0, 0.0, tiny, 1e-30], [0.0, 3.0, 0.0, 2 * tiny]]))


def test_fit_keeps_no_subnormal_loadings(monkeypatch):
    """Every G the fit moves on from is flushed: no update sees a subnormal entry (an Intel core
    would take ~100× longer on it), checked on a G seeded with subnormals."""
    torch.manual_seed(0)
    A = torch.randn(40, 300)
    seen, real, tiny = [], snmf.update_G, torch.finfo(torch.float32).tiny

    def seeding_update(A_, F_, G_, P_=None):
        """Count the subnormal entries this update is handed, then seed ~20% of its output with them."""
        seen.append(int(((G_ > 0) & (G_ < tiny)).sum()))
        return real(A_, F_, G_, P_) * torch.where(torch.rand_like(G_) < 0.2, torch.tensor(1e-39), torch.tensor(1.0))

    monkeypatch.setattr(snmf, "update_G", seeding_update)
    snmf.fit_snmf(A, rank=4, sparsity=0.5, max_iter=6, patience=6, progress=False)
    assert len(seen) == 6 and max(seen) == 0
