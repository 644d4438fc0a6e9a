import math

import numpy as np
import pytest
import torch

from sae_kit import dark_matter as dm


# ------------------------------------------------------------------------------------ linear error
def test_lstsq_recovers_a_planted_linear_map_with_intercept(rng):
    X = torch.randn(500, 6, generator=rng)
    A = torch.randn(6, 3, generator=rng)
    Y = X @ A + torch.tensor([1.0, -2.0, 0.5])
    W = dm.lstsq(X, Y)
    assert torch.allclose(W[:6].float(), A, atol=1e-4) and torch.allclose(W[6].float(), torch.tensor([1.0, -2.0, 0.5]), atol=1e-4)
    assert dm.r2_scores(Y, dm.predict(X, W))["r2_global"] == pytest.approx(1.0, abs=1e-6)


def test_r2_per_dimension_mean_differs_from_global_as_defined():
    y = torch.tensor([[0.0, 0.0], [2.0, 20.0]])  # dim variances 2 and 200
    y_hat = torch.tensor([[1.0, 0.0], [1.0, 20.0]])  # dim 0 predicted by its mean, dim 1 perfectly
    r = dm.r2_scores(y, y_hat)
    assert r["r2_mean_dim"] == pytest.approx(0.5)  # (0 + 1) / 2
    assert r["r2_global"] == pytest.approx(1 - 2 / 202)


def test_nonlinear_fvu_of_a_purely_linear_error_is_zero(rng):
    x_fit, x_test = torch.randn(2000, 8, generator=rng) * 2 + 1, torch.randn(500, 8, generator=rng) * 2 + 1
    recon = lambda x: 0.7 * x + 0.3  # error = 0.3·x − 0.3: exactly linear in x
    out = dm.nonlinear_fvu(x_fit, recon(x_fit), x_test, recon(x_test))
    assert out["fvu"] == pytest.approx(0.3 ** 2, rel=0.02) and out["fvu_nonlinear"] == pytest.approx(0.0, abs=1e-6)


def test_linear_error_fit_reports_the_mean_error_and_the_shrink_along_x(rng):
    import sae_kit

    sae = sae_kit.topk_sae(8, 16, 2, seed=0)
    x = torch.randn(400, 8, generator=rng)
    fit = dm.linear_error_fit(sae, x, x[:100])
    x_hat, _ = sae_kit.metrics.forward_batched(sae, x)
    assert torch.allclose(fit["e_mean"], (x - x_hat).mean(0), atol=1e-5)
    e_hat = dm.predict(x, fit["W"]).double()
    assert fit["eps"] == pytest.approx(float((e_hat * x).sum() / x.double().pow(2).sum()), rel=1e-6)


def test_train_tail_is_the_end_of_the_training_split(small_store):
    r = small_store.token_range("train")
    tail = dm.train_tail(small_store, 100)
    assert torch.equal(tail, small_store.get("train")[-100:])
    assert len(dm.train_tail(small_store, 10 ** 9)) == len(r)  # never reaches into the eval split


def test_power_law_fit_recovers_planted_parameters():
    w = np.array([512, 1024, 2048, 4096, 8192, 16384])
    fvu = 0.05 + 3.0 * w ** -0.4
    fit = dm.fit_power_law(w, fvu)
    assert fit["c"] == pytest.approx(0.05, rel=0.05) and fit["m"] == pytest.approx(-0.4, rel=0.05)
    assert np.allclose(dm.power_law(fit, w), fvu, rtol=1e-3)
    with pytest.raises(ValueError, match="at least 3"):
        dm.fit_power_law([1, 2], [0.5, 0.4])


def test_error_norm_r2_matrix(rng):
    a = torch.rand(1000, generator=rng)
    b = 3 * a + 1  # perfectly predictable from a
    c = torch.rand(1000, generator=rng)  # unrelated
    M = dm.error_norm_r2_matrix([a, b, c])
    assert M[0, 1] == pytest.approx(1.0, abs=1e-6) and M[1, 0] == pytest.approx(1.0, abs=1e-6)
    assert abs(M[0, 2]) < 0.02 and np.allclose(np.diag(M), 1)


# ---------------------------------------------------------------------------------- encoder error
def _reference_pursuit(s, D, T):
    """The authors' encoder_pursuit.py, transcribed densely: support = non-zero weights + argmax."""
    w = torch.zeros(len(s), len(D))
    final = torch.zeros_like(w)
    for step in range(int(T.max())):
        r = s - w @ D
        c = r @ D.t()
        support = w != 0
        support[torch.arange(len(s)), c.argmax(-1)] = True
        grad = c * support
        u = grad @ D
        w = (w + ((u * r).sum(1) / (u * u).sum(1))[:, None] * grad).clamp(min=0)
        final = torch.where((T > step)[:, None], w, final)
    return final


def test_gradient_pursuit_matches_the_reference_code(rng):
    D = torch.randn(300, 40, generator=rng)
    D = D / D.norm(dim=1, keepdim=True)
    x, b = torch.randn(200, 40, generator=rng) * 2, torch.randn(40, generator=rng) * 0.1
    T = torch.randint(0, 12, (200,), generator=rng)
    w = _reference_pursuit(x - b, D, T)
    out = dm.gradient_pursuit(x, D, b, T, progress=False)
    assert torch.allclose(out["x_hat"], w @ D + b, atol=1e-4)
    assert torch.equal(out["l0"], (w > 0).sum(1))


def test_gradient_pursuit_recovers_a_sparse_code_over_an_orthonormal_dictionary(rng):
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=rng))
    D = Q[:10]  # 10 orthonormal atoms in 16 dims (rows)
    w = torch.zeros(50, 10)
    for t in range(50):
        w[t, torch.randperm(10, generator=rng)[:3]] = torch.rand(3, generator=rng) + 0.5
    b = torch.randn(16, generator=rng)
    x = w @ D + b
    out = dm.gradient_pursuit(x, D, b, torch.full((50,), 3), progress=False)
    assert torch.allclose(out["x_hat"], x, atol=1e-4) and (out["l0"] == 3).all()
    fewer = dm.gradient_pursuit(x, D, b, torch.full((50,), 1), progress=False)
    assert (x - fewer["x_hat"]).norm() > (x - out["x_hat"]).norm()  # fewer steps: more error, never less


def test_gradient_pursuit_stops_short_when_the_next_atom_would_need_a_negative_weight():
    # atoms a = e1, b at 60° from a in the xy-plane, c = e3; s = (1, 2, 0.2).
    # step 1 picks b (⟨s, b⟩ = 2.23), step 2 picks c (0.2); then ⟨r, a⟩ = −0.116 < 0 and nothing else
    # correlates: the non-negative code holds 2 atoms however long it runs
    th = math.radians(60)
    D = torch.tensor([[1.0, 0, 0], [math.cos(th), math.sin(th), 0], [0, 0, 1.0]])
    x = torch.tensor([[1.0, 2.0, 0.2]])
    out = dm.gradient_pursuit(x, D, torch.zeros(3), torch.tensor([3]), progress=False)
    w_b = float(x[0] @ D[1])
    assert torch.allclose(out["x_hat"], w_b * D[1] + 0.2 * D[2], atol=1e-5)
    assert out["l0"].item() == 2 and out["l0_matched"].item() == 2 and out["steps_matched"].item() == 9  # 3 × 3


def test_gradient_pursuit_matched_run_reaches_the_target_where_the_papers_falls_short():
    g = torch.Generator().manual_seed(1)
    D = torch.randn(6, 4, generator=g)
    D = D / D.norm(dim=1, keepdim=True)  # 6 correlated atoms in 4 dims: steps re-pick atoms
    x = torch.rand(2000, 6, generator=g) @ D
    out = dm.gradient_pursuit(x, D, torch.zeros(4), torch.full((2000,), 3), progress=False)
    short = out["l0"] < 3
    assert short.float().mean() > 0.1  # the paper's step count leaves many tokens below 3 atoms
    assert (out["l0_matched"] == 3).all() and (out["l0_matched"] >= out["l0"]).all()
    assert ((x - out["x_hat_matched"]).norm(dim=1) <= (x - out["x_hat"]).norm(dim=1) + 1e-5).all()


def test_nnls_with_an_orthonormal_dictionary_clips_the_projections():
    G = torch.eye(4).expand(3, 4, 4)
    b = torch.tensor([[1.0, -2.0, 0.5, 0.0], [-1.0, -1.0, -1.0, -1.0], [3.0, 2.0, 1.0, 0.1]])
    assert torch.allclose(dm.nnls(G, b), b.clamp_min(0))


def test_nnls_matches_scipy_on_correlated_atoms(rng):
    from scipy.optimize import nnls as scipy_nnls

    A = torch.randn(32, 10, 20, generator=rng, dtype=torch.float64) + 1.0  # strongly correlated atoms
    A = A / A.norm(dim=-1, keepdim=True)
    s = torch.randn(32, 20, generator=rng, dtype=torch.float64) + 0.5
    w = dm.nnls(A @ A.transpose(1, 2), (A @ s[..., None])[..., 0], max_sweeps=5000, tol=1e-12)
    objective = lambda i, v: float((s[i] - torch.as_tensor(v) @ A[i]).pow(2).sum())
    for i in range(32):
        ref, _ = scipy_nnls(A[i].T.numpy(), s[i].numpy())
        assert objective(i, w[i]) <= objective(i, ref) + 1e-9
    assert (w >= 0).all()


def _orthonormal_topk(d_in=8, d_sae=6, k=3, seed=0):
    import sae_kit

    sae = sae_kit.topk_sae(d_in, d_sae, k, seed=seed)
    Q, _ = torch.linalg.qr(torch.randn(d_in, d_in, generator=torch.Generator().manual_seed(seed)))
    with torch.no_grad():
        sae.W_dec.copy_(Q[:d_sae])
        sae.W_enc.copy_(0.5 * Q[:d_sae].t() + 0.1 * torch.randn(d_in, d_sae, generator=torch.Generator().manual_seed(1)))
        sae.b_dec.copy_(torch.linspace(-1, 1, d_in))
    return sae


def test_refit_on_an_orthonormal_decoder_is_the_clipped_projection_on_the_sae_support(rng):
    sae = _orthonormal_topk()
    x = torch.randn(64, 8, generator=rng) * 2
    code = sae.encode_sparse(x)
    keep = code.vals > 0
    s = x - sae.b_dec.detach()
    want = sae.b_dec.detach().repeat(64, 1)
    for r, c in zip(code.rows[keep].tolist(), code.cols[keep].tolist()):  # orthonormal: each value is ⟨s, d_j⟩⁺
        want[r] += (s[r] @ sae.W_dec[c]).clamp_min(0) * sae.W_dec[c].detach()
    out = dm.refit_on_support(sae, x)
    assert torch.allclose(out["x_hat"], want, atol=1e-5)
    assert (out["l0"] <= torch.bincount(code.rows[keep], minlength=64)).all()


def test_refit_on_support_never_fits_worse_nor_uses_more_latents(rng):
    import sae_kit

    sae = sae_kit.topk_sae(16, 64, 6, seed=0)
    x = torch.randn(300, 16, generator=rng)
    x_hat, z = sae_kit.metrics.forward_batched(sae, x)
    out = dm.refit_on_support(sae, x)
    assert ((x - out["x_hat"]).pow(2).sum(1) <= (x - x_hat).pow(2).sum(1) + 1e-5).all()
    assert (out["l0"] <= (z > 0).sum(1)).all()


def test_encoder_comparison_reports_every_encoder_on_the_same_tokens(rng):
    import sae_kit

    sae = sae_kit.topk_sae(16, 64, 4, seed=0)
    x_fit, x_test = torch.randn(400, 16, generator=rng), torch.randn(100, 16, generator=rng)
    out = dm.encoder_comparison(sae, x_fit, x_test, progress=False)
    assert set(out) == {"sae", "nnls", "pursuit", "pursuit_matched"}
    assert out["nnls"]["fvu"] <= out["sae"]["fvu"] + 1e-6
    assert out["pursuit_matched"]["l0"] >= out["pursuit"]["l0"] and out["pursuit_matched"]["l0"] <= out["sae"]["l0"]
    assert 0 <= out["pursuit"]["short"] <= 1


# ------------------------------------------------------------------------------------- downstream
def test_ratio_ci_of_a_fixed_ratio_is_that_ratio():
    den = np.array([1.0, 2.0, 3.0, 4.0])
    assert dm.ratio_ci(2 * den, den) == pytest.approx((2.0, 2.0, 2.0))
    r, lo, hi = dm.ratio_ci([1.0], [2.0])
    assert r == 0.5 and lo == -np.inf and hi == np.inf


def test_first_order_is_the_mean_gradient_dot_product():
    x = torch.tensor([[1.0, 0.0], [3.0, 1.0], [2.0, 5.0], [4.0, -1.0]])
    g = torch.tensor([[1.0, 0.0]]).repeat(4, 1)  # ∂CE/∂x = e1 everywhere
    W = torch.zeros(3, 2, dtype=torch.float64)
    W[2] = torch.tensor([0.5, 7.0])  # ê = intercept (0.5, 7) on every token
    fit = {"W": W, "e_mean": torch.tensor([0.25, 1.0]), "eps": 0.1}
    out = dm.first_order(x, g, fit, per_window=2, n_boot=200)
    assert out["ê"][0] == pytest.approx(0.5) and out["ē"][0] == pytest.approx(0.25)
    assert out["εx"][0] == pytest.approx(0.1 * 2.5)  # ε · mean of x's first coordinate


@pytest.fixture(scope="module")
def splicer(model, small_store):
    import sae_kit

    return sae_kit.Splicer(model, small_store, n_seqs=3, batch_seqs=2, progress=False)  # two batches: 2 + 1


def test_per_window_scores_average_to_the_splicers_means(splicer):
    shrink = lambda a: 0.9 * a
    per = splicer.per_window(shrink)
    clean = splicer.per_window(None)
    agg = splicer(replace=shrink)
    assert len(per["ce"]) == 3
    assert (per["ce"] - clean["ce"]).mean() == pytest.approx(agg["delta_ce"], abs=1e-5)
    assert per["kl"].mean() == pytest.approx(agg["kl"], abs=1e-5) and (per["kl"] >= -1e-6).all()


def test_splice_parts_with_no_linear_error_and_no_shift(splicer, small_store):
    import sae_kit

    sae = sae_kit.topk_sae(576, 1152, 8, seed=0, model_name=small_store.spec.model, hook_name=small_store.spec.hook)
    fit = {"W": torch.zeros(577, 576, dtype=torch.float64), "e_mean": torch.zeros(576), "eps": 0.0}  # ê = ē = 0
    out = dm.splice_parts(splicer, sae, fit, n_boot=100)
    assert out["x̂ + ê"]["dce_ci"][0] == pytest.approx(out["x̂"]["dce_ci"][0], abs=1e-5)  # x̂ + 0 = x̂
    for same_as_clean in ("x − ê", "x − ē", "(1 − ε)x"):  # x − 0 = x
        assert out[same_as_clean]["dce_ci"][0] == pytest.approx(0.0, abs=1e-4)
        assert out[same_as_clean]["kl_ci"][0] == pytest.approx(0.0, abs=1e-4)
    assert out["kl_share_nonlinear_left"][0] == pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------------------- claims
def _results(fvu=(0.3, 0.2, 0.15), nonlin=(0.05, 0.05, 0.05), vector_r2=0.5, norm_r2=0.95, m_off=0.8,
             nnls_drop=0.02, pursuit_drop=0.01, kl_share=(0.2, 0.18, 0.22), dce_linear=(-0.02, -0.03, -0.01),
             gap=(-0.02, -0.03, -0.01)):
    """Hand-built results for three widths; the defaults satisfy every rule."""
    widths = [64, 128, 256]
    fits = [{"fvu": f, "fvu_nonlinear": n, "vector_r2": vector_r2, "vector_r2_global": vector_r2, "norm_r2": norm_r2}
            for f, n in zip(fvu, nonlin)]
    M = np.full((3, 3), m_off)
    np.fill_diagonal(M, 1.0)
    enc = lambda f, n, drop, short=None: {"fvu": f, "fvu_nonlinear": n * (1 - drop), "l0": 8.0,
                                          **({} if short is None else {"short": short})}
    encoders = [{"sae": enc(f, n, 0), "nnls": enc(0.9 * f, n, nnls_drop), "pursuit": enc(f, n, pursuit_drop, 0.1),
                 "pursuit_matched": enc(f, n, pursuit_drop, 0.0)} for f, n in zip(fvu, nonlin)]
    splices = []
    for f, n, share in zip(fvu, nonlin, kl_share):
        ci = lambda m, h=0.01: (m, m - h, m + h)
        splices.append({"x̂": {"dce_ci": ci(0.1), "kl_ci": ci(0.1)}, "x̂ + ê": {"dce_ci": ci(0.1 * share), "kl_ci": ci(0.1 * share)},
                        "x − ê": {"dce_ci": ci(dce_linear[0], 0.005), "kl_ci": ci(0.05)},
                        "kl_share_nonlinear_left": ci(share, 0.02),
                        "dce x − ê minus x − ē": ci(gap[0], 0.005), "dce x − ê minus (1 − ε)x": ci(gap[0], 0.005)})
        dce_linear, gap = dce_linear[1:] + dce_linear[:1], gap[1:] + gap[:1]
    grads = [{"ê": (0.01, 0.005, 0.015), "ē": (0.0, -0.001, 0.001), "εx": (0.002, 0.001, 0.003)}] * 3
    return widths, fits, M, encoders, splices, grads


def _verdicts(**kw):
    c = dm.claims(*_results(**kw), scale="ci")
    return [row.held for row in c.items], c


def test_claims_all_held_on_results_that_meet_every_rule():
    held, c = _verdicts()
    assert held == [True] * 7
    assert all(row.rule and row.source and row.figure and row.note for row in c.items)


def test_claims_nothing_is_decided_when_fvu_does_not_fall_with_width():
    held, c = _verdicts(fvu=(0.25, 0.27, 0.35))
    assert held == [None] * 7
    assert all("FVU does not fall with width" in row.note for row in c.items)
    assert all("decided only if FVU falls with width" in row.rule for row in c.items)


def test_claims_did_not_hold_rows():
    held, _ = _verdicts(vector_r2=0.8, norm_r2=0.85, nonlin=(0.05, 0.04, 0.02), m_off=0.5)
    assert held[:4] == [False] * 4
    held, c = _verdicts(nnls_drop=0.2)  # refitting the SAE's own latents removes 20% of the nonlinear error
    assert held[4] is False and "20.0%" in c.items[4].note


def test_claims_proportional_share_held_failed_and_undecided():
    fvu_share = [n / f for n, f in zip((0.05, 0.05, 0.05), (0.3, 0.2, 0.15))]  # 0.17, 0.25, 0.33
    held, _ = _verdicts(kl_share=tuple(3 * s for s in fvu_share))  # three times the FVU share
    assert held[5] is False
    held, c = _verdicts(kl_share=(fvu_share[0], fvu_share[1], 2 * fvu_share[2]))  # third interval straddles 2
    assert held[5] is None and "1 of 3" not in c.items[5].note and "2 of 3" in c.items[5].note


def test_claims_lower_ce_than_clean_needs_the_controls():
    held, _ = _verdicts(dce_linear=(0.02, 0.03, 0.01))  # x − ê raises CE
    assert held[6] is False
    held, c = _verdicts(gap=(0.0, -0.03, -0.01))  # one width: x − ê no lower than a control
    assert held[6] is None and "first order" in c.items[6].measured
    held, c = _verdicts(gap=(0.03, -0.03, -0.01))  # one width: a control lowers CE more than x − ê
    assert held[6] is False and "a control lowers CE more" in c.items[6].note


def test_sizes_by_scale():
    assert dm.sizes("ci").enc_fit_tokens < dm.sizes("lab").enc_fit_tokens
    with pytest.raises(ValueError, match="unknown scale"):
        dm.sizes("huge")
