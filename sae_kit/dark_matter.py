"""SAE "dark matter" (Engels, Riggs, Tegmark 2024, "Decomposing The Dark Matter of Sparse
Autoencoders", arXiv 2410.14670; reference code JoshEngels/SAE-Dark-Matter).

The SAE error e = x − x̂ is split by a least-squares map from the input: ê = [x, 1]·W is the
*linearly predictable* error, e − ê the *nonlinear* error. Implemented here:
- `linear_error_fit`: vector R² (regress e on [x, 1]) and norm R² (regress ‖e‖² on [x, 1]), both
  fitted on one set of tokens and scored on held-out ones; R² reported as the paper's code does
  (per output dimension, then averaged) and as the global 1 − SSE/SST; FVU of x̂ and of x̂ + ê
  (the "nonlinear error").
- `fit_power_law`: FVU(width) = c + a·width^m (a, c ≥ 0, m < 0), as the paper's Figure 1.
- `error_norm_r2_matrix`: R² of regressing ‖e_j‖ (width j) on [‖e_i‖, 1] (width i), all pairs.
- `gradient_pursuit`: inference-time sparse coding with the SAE's own decoder, as many steps as
  each token's SAE L0 (the paper's `encoder_pursuit.py`), to see how much is *encoder* error.
The notebook splices x̂ + ê and x̂ + (e − ê) into the model with `splice.Splicer`.

Differences from the paper's code, all deliberate: an intercept column everywhere (the paper's
vector/norm regressions have none), and the fit uses training-split tokens while the score uses
the store's eval split (the paper permutes 300k tokens and splits them in half).
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import bars_off

from .metrics import forward_batched, fvu
from .splice import Splicer


def _with_one(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1)


def lstsq(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """Least-squares W for Y ≈ [X, 1]·W, in float64 (577 regressors: well under a second)."""
    A = _with_one(X.double())
    return torch.linalg.lstsq(A, Y.double().reshape(len(Y), -1), driver="gelsd").solution


def predict(X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return (_with_one(X.double()) @ W).float()


def r2_scores(y: torch.Tensor, y_hat: torch.Tensor) -> dict:
    """R² per output dimension then averaged (the paper's code), and global 1 − ΣSSE/ΣSST."""
    y, y_hat = y.double().reshape(len(y), -1), y_hat.double().reshape(len(y), -1)
    sse = (y - y_hat).pow(2).sum(0)
    sst = (y - y.mean(0)).pow(2).sum(0)
    return {"r2_mean_dim": float((1 - sse / sst.clamp_min(1e-12)).mean()),
            "r2_global": float(1 - sse.sum() / sst.sum().clamp_min(1e-12))}


@torch.no_grad()
def linear_error_fit(sae, x_fit: torch.Tensor, x_test: torch.Tensor) -> dict:
    """Decompose one SAE's error into a linearly predictable part and the rest.

    Args:
        sae: a trained dictionary.
        x_fit: activations used to fit the linear maps (e.g. training-split tokens).
        x_test: held-out activations on which everything is scored.

    Returns:
        dict with fvu, fvu_nonlinear (FVU of x̂ + ê), vector R² (both ways), norm R² (both ways),
        norm_baseline R² (predicting ‖x‖² from x), the test error norms, and the vector map W.
    """
    xh_fit, _ = forward_batched(sae, x_fit)
    xh_test, z = forward_batched(sae, x_test)
    e_fit, e_test = x_fit - xh_fit, x_test - xh_test
    W = lstsq(x_fit, e_fit)
    e_lin = predict(x_test, W)
    vec = r2_scores(e_test, e_lin)
    Wn = lstsq(x_fit, e_fit.pow(2).sum(1))
    norm = r2_scores(e_test.pow(2).sum(1), predict(x_test, Wn))
    Wb = lstsq(x_fit, x_fit.pow(2).sum(1))
    base = r2_scores(x_test.pow(2).sum(1), predict(x_test, Wb))
    return {"fvu": fvu(x_test, xh_test), "fvu_nonlinear": fvu(x_test, xh_test + e_lin),
            "vector_r2": vec["r2_mean_dim"], "vector_r2_global": vec["r2_global"],
            "norm_r2": norm["r2_global"], "norm_baseline_r2": base["r2_global"],
            "err_norm": e_test.norm(dim=1), "l0_per_token": (z > 0).sum(1), "W": W}


@torch.no_grad()
def nonlinear_split(x: torch.Tensor, x_hat: torch.Tensor, seed: int = 0) -> dict:
    """FVU and nonlinear FVU of any reconstruction, fitting ê on one random half of the tokens and
    scoring on the other (so an SAE and gradient pursuit are compared on identical tokens)."""
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    a, b = perm[: len(x) // 2], perm[len(x) // 2:]
    e = x - x_hat
    W = lstsq(x[a], e[a])
    return {"fvu": fvu(x[b], x_hat[b]), "fvu_nonlinear": fvu(x[b], x_hat[b] + predict(x[b], W))}


@torch.no_grad()
def splice_error_parts(splicer: Splicer, sae, W: torch.Tensor) -> dict:
    """ΔCE when splicing x̂ (all of the error), x̂ + ê (only the nonlinear error left) and x − ê
    (only the linear error left), with ê = [x, 1]·W from `linear_error_fit`."""
    d_in = sae.cfg.d_in

    def parts(a):
        flat = a.reshape(-1, d_in).float()
        return flat, sae.reconstruct(flat.to(sae.device)).to(flat.device), predict(flat.cpu(), W).to(flat.device)

    def nonlinear_left(a):
        _, x_hat, e_lin = parts(a)
        return (x_hat + e_lin).reshape(a.shape).to(a.dtype)

    def linear_left(a):
        flat, _, e_lin = parts(a)
        return (flat - e_lin).reshape(a.shape).to(a.dtype)

    return {"delta_ce": splicer(sae)["delta_ce"],
            "delta_ce_nonlinear_left": splicer(replace=nonlinear_left)["delta_ce"],
            "delta_ce_linear_left": splicer(replace=linear_left)["delta_ce"]}


def fit_power_law(widths, fvus, steps: int = 4000) -> dict:
    """Fit FVU(width) = c + a·width^m with a, c ≥ 0 and m < 0 (least squares in log FVU).

    Returns:
        dict with a, m, c and a callable-free curve on request via `power_law`.
    """
    from scipy.optimize import least_squares

    w = np.asarray(widths, dtype=float)
    y = np.asarray(fvus, dtype=float)
    if len(w) < 3:
        raise ValueError(f"a power law plus offset needs at least 3 widths, got {len(w)}")

    def resid(p):
        a, m, c = np.exp(p[0]), -np.exp(p[1]), np.exp(p[2])
        return np.log(c + a * w ** m) - np.log(y)

    best = None
    for m0 in (0.1, 0.3, 1.0):
        for frac in (0.1, 0.5, 0.9):
            p0 = [np.log(max(y[0] * (1 - frac), 1e-6) * w[0] ** m0), np.log(m0), np.log(max(y.min() * frac, 1e-6))]
            r = least_squares(resid, p0, max_nfev=steps)
            if best is None or r.cost < best.cost:
                best = r
    a, m, c = np.exp(best.x[0]), -np.exp(best.x[1]), np.exp(best.x[2])
    return {"a": float(a), "m": float(m), "c": float(c), "rms_log_error": float(np.sqrt(2 * best.cost / len(w)))}


def power_law(fit: dict, widths) -> np.ndarray:
    w = np.asarray(widths, dtype=float)
    return fit["c"] + fit["a"] * w ** fit["m"]


def error_norm_r2_matrix(err_norms: list[torch.Tensor]) -> np.ndarray:
    """M[i, j] = R² of regressing ‖e_j‖ on [‖e_i‖, 1] over tokens (diagonal = 1)."""
    n = len(err_norms)
    M = np.eye(n)
    for i in range(n):
        for j in range(n):
            if i != j:
                W = lstsq(err_norms[i][:, None], err_norms[j])
                M[i, j] = r2_scores(err_norms[j], predict(err_norms[i][:, None], W))["r2_global"]
    return M


@torch.no_grad()
def gradient_pursuit(x: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, n_steps: torch.Tensor,
                     batch_size: int = 2048, progress: bool = True) -> torch.Tensor:
    """Non-negative gradient pursuit with the SAE decoder as dictionary (Engels et al.'s encoder_pursuit).

    Each token runs as many steps as its own entry of `n_steps` (its SAE L0): add the atom most
    correlated with the residual to the support, step along the gradient restricted to the
    support with the exact line-search step, clip at zero.

    Returns:
        The reconstruction [N, d_in] (b_dec added back).
    """
    D = W_dec.detach().float().cpu()  # [n, d]
    out = []
    for i in tqdm(range(0, len(x), batch_size), desc="gradient pursuit", disable=bars_off(progress), leave=False):
        s = (x[i:i + batch_size] - b_dec.detach().cpu()).float()
        steps = n_steps[i:i + batch_size]
        w = torch.zeros(len(s), D.shape[0])
        support = torch.zeros_like(w, dtype=torch.bool)
        for t in range(int(steps.max()) if len(steps) else 0):
            active = (steps > t)[:, None]
            r = s - w @ D
            c = r @ D.t()  # [B, n]
            support |= torch.zeros_like(support).scatter_(1, c.argmax(1, keepdim=True), True) & active
            g = c * support * active
            u = g @ D
            eta = (u * r).sum(1, keepdim=True) / (u * u).sum(1, keepdim=True).clamp_min(1e-12)
            w = torch.clamp(w + eta * g, min=0)
        out.append(w @ D + b_dec.detach().cpu())
    return torch.cat(out)
