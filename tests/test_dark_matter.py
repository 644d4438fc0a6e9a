import numpy as np
import pytest
import torch

from sae_kit import dark_matter as dm


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


def test_nonlinear_split_of_a_purely_linear_error_is_zero(rng):
    x = torch.randn(2000, 8, generator=rng) * 2 + 1
    x_hat = x @ (0.7 * torch.eye(8)) + 0.3  # error = 0.3·x − 0.3: exactly linear in x
    out = dm.nonlinear_split(x, x_hat)
    assert out["fvu"] > 0.05 and out["fvu_nonlinear"] == pytest.approx(0.0, abs=1e-6)


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


def test_gradient_pursuit_recovers_a_sparse_code_over_an_orthonormal_dictionary(rng):
    Q, _ = torch.linalg.qr(torch.randn(16, 16, generator=rng))
    D = Q[:10]  # 10 orthonormal atoms in 16 dims (rows)
    w = torch.zeros(50, 10)
    for t in range(50):
        idx = torch.randperm(10, generator=rng)[:3]
        w[t, idx] = torch.rand(3, generator=rng) + 0.5
    b = torch.randn(16, generator=rng)
    x = w @ D + b
    x_hat = dm.gradient_pursuit(x, D, b, torch.full((50,), 3), progress=False)
    assert torch.allclose(x_hat, x, atol=1e-4)
    fewer = dm.gradient_pursuit(x, D, b, torch.full((50,), 1), progress=False)
    assert (x - fewer).norm() > (x - x_hat).norm()  # fewer steps: more error, never less


def test_splice_error_parts_with_no_linear_part(model, small_store):
    import sae_kit

    sae = sae_kit.topk_sae(576, 1152, 8, seed=0)
    splicer = sae_kit.Splicer(model, small_store, n_seqs=2, progress=False)
    out = dm.splice_error_parts(splicer, sae, torch.zeros(577, 576, dtype=torch.float64))  # ê = 0
    assert out["delta_ce_nonlinear_left"] == pytest.approx(out["delta_ce"], abs=1e-5)  # x̂ + 0 = x̂
    assert out["delta_ce_linear_left"] == pytest.approx(0.0, abs=1e-4)  # x − 0 = x
