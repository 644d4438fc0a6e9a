"""SAE "dark matter" (Engels, Riggs, Tegmark 2024, "Decomposing The Dark Matter of Sparse
Autoencoders", arXiv 2410.14670; reference code JoshEngels/SAE-Dark-Matter).

The SAE error e = x − x̂ is split by a least-squares map from the input: ê = [x, 1]·W is the
*linearly predictable* error, e − ê the *nonlinear* error. Implemented here:
- `linear_error_fit`: vector R² (regress e on [x, 1]) and norm R² (regress ‖e‖² on [x, 1]), fitted
  on one set of tokens and scored on held-out ones; R² per output dimension then averaged (the
  paper's code) and global 1 − SSE/SST; FVU of x̂ and of x̂ + ê (the "nonlinear error").
- `fit_power_law`: FVU(width) = c + a·width^m (a, c ≥ 0, m < 0), as the paper's Figure 1.
- `error_norm_r2_matrix`: R² of regressing ‖e_j‖ (width j) on [‖e_i‖, 1] (width i), all pairs.
- Encoder error: `gradient_pursuit` (the paper's `encoder_pursuit.py`, with its realised L0 and a
  run continued until the L0 matches the SAE's) and `refit_on_support` (NNLS values on the SAE's
  own support: the best any encoder can do with the latents the SAE chose), compared in
  `encoder_comparison`.
- Downstream: `splice_parts` splices x̂, x̂ + ê, x − ê and two controls (x − ē, (1 − ε)x) and
  reports per-window ΔCE and KL with bootstrap intervals over windows; `first_order` predicts
  the ΔCE of each from stored gradients, −E[g·δ].
- `claims`: the notebook's claims table from these results.

Differences from the paper's code, all deliberate: an intercept column everywhere (the paper's
vector/norm regressions have none); the maps are fitted on training-split tokens and scored on the
store's eval split (the paper permutes 300k tokens and splits them in half); shares of the
downstream damage are KL shares (KL ≥ 0), where the paper uses CE "percent recovered".
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .claims import Claims, Verdict, bootstrap_ci
from .config import Scale, bars_off, scale_name
from .metrics import forward_batched, fvu
from .splice import Splicer


@dataclass(frozen=True)
class Sizes:
    """Notebook 05's own sizes at one scale (`sizes`)."""

    enc_fit_tokens: int  # encoder comparison: tokens each encoder's ê is fitted on (577 regressors: ≥ 14× that
    #                      at lab, so the fit's own noise stays near 7% of the nonlinear error; ci is a smoke run)
    enc_test_tokens: int  # encoder comparison: held-out tokens it is scored on (pursuit is the cost)
    grad_tokens: int  # tokens harvested with ∂CE/∂x for the first-order check (~140 tok/s on 2 cores)
    splice_seqs: int  # eval windows spliced: 5 splices per width plus the clean run, so fewer than `ce_seqs`
    n_boot: int  # bootstrap resamples over windows


_SIZES = {"ci": Sizes(4_096, 2_048, 1_984, 16, 2_000), "lab": Sizes(8_192, 4_096, 7_936, 32, 5_000),
          "paper": Sizes(40_960, 16_384, 40_920, 256, 5_000)}


def sizes(scale: Scale | str | None = None) -> Sizes:
    """Notebook 05's sizes at `scale` (a `Scale`, its name, or None for ``SAE_KIT_SCALE``)."""
    return _SIZES[scale_name(scale)]


# ----------------------------------------------------------------------------------- linear error
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


def train_tail(store, n: int) -> torch.Tensor:
    """The last `n` tokens of the store's training split, fp32. The first training windows are the
    ones a smaller store with gradients (`sizes().grad_tokens`) holds, so a map fitted here is scored
    on those out of sample."""
    r = store.token_range("train")
    return torch.from_numpy(np.asarray(store.acts[max(r.start, r.stop - n):r.stop], dtype=np.float32))


@torch.no_grad()
def linear_error_fit(sae, x_fit: torch.Tensor, x_test: torch.Tensor) -> dict:
    """Decompose one SAE's error into a linearly predictable part and the rest.

    Args:
        sae: a trained dictionary.
        x_fit: activations used to fit the linear maps (e.g. training-split tokens).
        x_test: held-out activations on which everything is scored.

    Returns:
        dict with fvu, fvu_nonlinear (FVU of x̂ + ê), vector R² (both ways), norm R², norm_baseline
        R² (‖x‖² from x), the test error norms and per-token L0, the vector map W, the mean fit
        error e_mean (ē) and eps = Σ⟨ê, x⟩ / Σ‖x‖² on the fit tokens (how much of ê is a rescaling of x).
    """
    xh_fit, _ = forward_batched(sae, x_fit)
    xh_test, z = forward_batched(sae, x_test)
    e_fit, e_test = x_fit - xh_fit, x_test - xh_test
    W = lstsq(x_fit, e_fit)
    e_lin = predict(x_test, W)
    vec = r2_scores(e_test, e_lin)
    norm = r2_scores(e_test.pow(2).sum(1), predict(x_test, lstsq(x_fit, e_fit.pow(2).sum(1))))
    base = r2_scores(x_test.pow(2).sum(1), predict(x_test, lstsq(x_fit, x_fit.pow(2).sum(1))))
    eps = float((predict(x_fit, W).double() * x_fit.double()).sum() / x_fit.double().pow(2).sum())
    return {"fvu": fvu(x_test, xh_test), "fvu_nonlinear": fvu(x_test, xh_test + e_lin),
            "vector_r2": vec["r2_mean_dim"], "vector_r2_global": vec["r2_global"],
            "norm_r2": norm["r2_global"], "norm_baseline_r2": base["r2_global"],
            "err_norm": e_test.norm(dim=1), "l0_per_token": (z > 0).sum(1), "W": W,
            "e_mean": e_fit.mean(0), "eps": eps}


@torch.no_grad()
def nonlinear_fvu(x_fit: torch.Tensor, xh_fit: torch.Tensor, x_test: torch.Tensor, xh_test: torch.Tensor) -> dict:
    """FVU and nonlinear FVU of any reconstruction on test tokens, its error map ê fitted on other
    tokens (so encoders sharing a decoder are compared on identical tokens, each with its own ê)."""
    W = lstsq(x_fit, x_fit - xh_fit)
    return {"fvu": fvu(x_test, xh_test), "fvu_nonlinear": fvu(x_test, xh_test + predict(x_test, W))}


def fit_power_law(widths, fvus, steps: int = 4000) -> dict:
    """Fit FVU(width) = c + a·width^m with a, c ≥ 0 and m < 0 (least squares in log FVU).

    Returns:
        dict with a, m, c and the rms error in log FVU; evaluate the curve with `power_law`.
    """
    from scipy.optimize import least_squares

    w, y = np.asarray(widths, dtype=float), np.asarray(fvus, dtype=float)
    if len(w) < 3:
        raise ValueError(f"a power law plus offset needs at least 3 widths, got {len(w)}")

    def resid(p):
        return np.log(np.exp(p[2]) + np.exp(p[0]) * w ** -np.exp(p[1])) - np.log(y)

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
    return fit["c"] + fit["a"] * np.asarray(widths, dtype=float) ** fit["m"]


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


# --------------------------------------------------------------------------------- encoder error
@torch.no_grad()
def gradient_pursuit(x: torch.Tensor, W_dec: torch.Tensor, b_dec: torch.Tensor, target_l0: torch.Tensor,
                     max_steps_factor: float = 3.0, batch_size: int = 1024, progress: bool = True) -> dict:
    """Non-negative gradient pursuit with the SAE decoder as dictionary (the paper's encoder_pursuit.py).

    Each step, as the reference code: r = s − wD, c = rDᵀ; the support is the non-zero weights plus
    argmax c; step along c on the support with the exact line search; clip at zero. A clipped
    weight leaves the support, and argmax may pick an atom already in it, so after L steps a token
    can hold fewer than L atoms. The paper runs as many steps as the token's SAE L0 (``x_hat``);
    the matched run continues the same steps until the token's L0 reaches its target, or
    ``max_steps_factor`` × target steps (``x_hat_matched``). The L0 grows by at most one per step,
    so it never passes the target. Weights are kept sparse (atom index and value per slot), so a
    step costs one dense product, the correlations c (decoding is `embedding_bag` over the slots).

    Args:
        x: activations [N, d]; the dictionary codes s = x − b_dec.
        W_dec: [n, d] the SAE's decoder rows; b_dec: [d].
        target_l0: [N] the SAE's L0 on each token.

    Returns:
        dict of x_hat, l0 (realised: non-zero weights), x_hat_matched, l0_matched, steps_matched, each [N].
    """
    D, b = W_dec.detach().float().cpu(), b_dec.detach().float().cpu()
    out = {key: [] for key in ("x_hat", "l0", "x_hat_matched", "l0_matched", "steps_matched")}
    for i in tqdm(range(0, len(x), batch_size), desc="gradient pursuit", disable=bars_off(progress), leave=False):
        s = x[i:i + batch_size].float() - b
        T = target_l0[i:i + batch_size].long()
        cap = torch.ceil(T * max_steps_factor).long()
        S = max(int(T.max()) if len(T) else 0, 1)  # slots: a token never holds more than its target
        idx, val = torch.zeros(len(s), S, dtype=torch.long), torch.zeros(len(s), S)
        idx_paper, val_paper, steps = idx.clone(), val.clone(), torch.zeros_like(T)
        for t in range(int(cap.max()) if len(T) else 0):
            nnz = (val > 0).sum(1)
            rows = ((t < T) | ((nnz < T) & (t < cap))).nonzero()[:, 0]
            if len(rows) == 0:
                break
            ar, ix, v = torch.arange(len(rows)), idx[rows], val[rows]
            r = s[rows] - F.embedding_bag(ix, D, per_sample_weights=v, mode="sum")
            c = r @ D.t()  # [b, n]: the one dense product
            new = c.argmax(1)
            held = ((ix == new[:, None]) & (v > 0)).any(1)
            free = (v <= 0).float().argmax(1)  # an empty slot: fewer than S atoms are non-zero here
            ix[ar, free] = torch.where(held, ix[ar, free], new)
            support = v > 0
            support[ar, free] |= ~held
            grad = c.gather(1, ix) * support  # [b, S]
            u = F.embedding_bag(ix, D, per_sample_weights=grad, mode="sum")
            eta = (u * r).sum(1, keepdim=True) / (u * u).sum(1, keepdim=True).clamp_min(1e-12)
            idx[rows], val[rows] = ix, (v + eta * grad).clamp_min(0)
            steps[rows] += 1
            done = rows[T[rows] == t + 1]  # the paper stops here: as many steps as the SAE's L0
            idx_paper[done], val_paper[done] = idx[done], val[done]
        decode = lambda ix, w: F.embedding_bag(ix, D, per_sample_weights=w, mode="sum") + b
        for key, v in (("x_hat", decode(idx_paper, val_paper)), ("l0", (val_paper > 0).sum(1)),
                       ("x_hat_matched", decode(idx, val)),
                       ("l0_matched", (val > 0).sum(1)), ("steps_matched", steps)):
            out[key].append(v)
    return {key: torch.cat(v) for key, v in out.items()}


@torch.no_grad()
def nnls(G: torch.Tensor, b: torch.Tensor, w0: torch.Tensor | None = None, max_sweeps: int = 300,
         tol: float = 1e-5) -> torch.Tensor:
    """Batched non-negative least squares in Gram form: argmin_{w ≥ 0} ½ wᵀGw − bᵀw for each row.

    Cyclic coordinate descent (each coordinate minimised exactly, then clipped at zero), which
    never raises the objective, so a feasible warm start `w0` is only ever improved.

    Args:
        G: [B, S, S] Gram matrices D_S D_Sᵀ (positive diagonal); b: [B, S] = D_S s.
        w0: [B, S] non-negative start (default zeros).
        max_sweeps, tol: stop after `max_sweeps` or when no weight moves by more than `tol` (relative).
    """
    w = torch.zeros_like(b) if w0 is None else w0.clone().clamp_min(0)
    diag = G.diagonal(dim1=1, dim2=2).clamp_min(1e-12)
    for _ in range(max_sweeps):
        moved = torch.zeros(())
        for j in range(b.shape[1]):
            new = (w[:, j] - ((G[:, j] * w).sum(1) - b[:, j]) / diag[:, j]).clamp_min(0)
            moved = torch.maximum(moved, (new - w[:, j]).abs().max())
            w[:, j] = new
        if moved <= tol * (1 + float(w.abs().max())):
            break
    return w


@torch.no_grad()
def refit_on_support(sae, x: torch.Tensor, batch_size: int = 1024) -> dict:
    """The SAE's own support with the values refitted by NNLS against x (frozen decoder).

    For each token, keep the latents the SAE's encoder made active and choose their values to
    minimise ‖x − b_dec − w D_S‖² with w ≥ 0. The SAE's values are feasible and the start, so the
    refit's error is never above the SAE's: it bounds what a better encoder with the same choice of
    latents could reach.

    Returns:
        dict of x_hat [N, d] and l0 [N] (the refit may zero some latents; never more than the SAE's).
    """
    D, b_dec = sae.W_dec.detach().float().cpu(), sae.b_dec.detach().float().cpu()
    xs, l0s = [], []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].float()
        code = sae.encode_sparse(xb.to(sae.device))
        keep = code.vals.detach() > 0
        rows, cols, vals = code.rows[keep].cpu(), code.cols[keep].cpu(), code.vals.detach()[keep].float().cpu()
        B, counts = len(xb), torch.bincount(rows, minlength=len(xb))
        S = max(int(counts.max()) if B else 0, 1)
        pos = torch.arange(len(rows)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        idx, w0 = torch.zeros(B, S, dtype=torch.long), torch.zeros(B, S)
        idx[rows, pos], w0[rows, pos] = cols, vals
        used = torch.zeros(B, S, dtype=torch.bool)
        used[rows, pos] = True
        DS = D[idx] * used[..., None]  # [B, S, d]; padding slots are zero atoms
        G = DS @ DS.transpose(1, 2) + torch.diag_embed((~used).float())  # padding: G = 1, b = 0 → w = 0
        w = nnls(G, (DS @ (xb - b_dec)[:, :, None])[..., 0], w0)
        xs.append((w[:, :, None] * DS).sum(1) + b_dec)
        l0s.append((w > 0).sum(1))
    return {"x_hat": torch.cat(xs), "l0": torch.cat(l0s)}


@torch.no_grad()
def encoder_comparison(sae, x_fit: torch.Tensor, x_test: torch.Tensor, max_steps_factor: float = 3.0,
                       progress: bool = True) -> dict:
    """FVU, nonlinear FVU and mean L0 of four encoders with one decoder (the SAE's), on the same tokens.

    ``sae``: its own encoder. ``nnls``: its support, values refitted (`refit_on_support`).
    ``pursuit``: the paper's gradient pursuit, as many steps as the SAE's L0 on each token.
    ``pursuit_matched``: the same pursuit run on until its L0 equals the SAE's (`gradient_pursuit`).
    Each encoder's ê is fitted on its own errors on `x_fit` and scored on `x_test` (`nonlinear_fvu`).
    """
    recons = {}
    for part, x in (("fit", x_fit), ("test", x_test)):
        x_hat, z = forward_batched(sae, x)
        l0 = (z > 0).sum(1)
        gp = gradient_pursuit(x, sae.W_dec, sae.b_dec, l0, max_steps_factor, progress=progress)
        refit = refit_on_support(sae, x)
        recons[part] = {"sae": (x_hat, l0), "nnls": (refit["x_hat"], refit["l0"]), "pursuit": (gp["x_hat"], gp["l0"]),
                        "pursuit_matched": (gp["x_hat_matched"], gp["l0_matched"])}
    out = {}
    for name, (xh_test, l0) in recons["test"].items():
        out[name] = {**nonlinear_fvu(x_fit, recons["fit"][name][0], x_test, xh_test), "l0": float(l0.float().mean())}
    sae_l0 = recons["test"]["sae"][1]
    out["pursuit"]["short"] = float((recons["test"]["pursuit"][1] < sae_l0).float().mean())
    out["pursuit_matched"]["short"] = float((recons["test"]["pursuit_matched"][1] < sae_l0).float().mean())
    return out


# ----------------------------------------------------------------------------------- downstream
def ratio_ci(num, den, n_boot: int = 5000, level: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(ratio, low, high): mean(num) / mean(den) with a percentile bootstrap over paired samples
    (windows), the same resampling as `claims.bootstrap_ci`. Fewer than two samples: (ratio, -inf, inf)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    r = float(num.mean() / den.mean())
    if len(num) < 2:
        return r, float("-inf"), float("inf")
    idx = np.random.default_rng(seed).integers(0, len(num), size=(n_boot, len(num)))
    lo, hi = np.quantile(num[idx].mean(1) / den[idx].mean(1), [(1 - level) / 2, 1 - (1 - level) / 2])
    return r, float(lo), float(hi)


SPLICES = ("x̂", "x̂ + ê", "x − ê", "x − ē", "(1 − ε)x")  # all the error; nonlinear left; linear left; two controls


@torch.no_grad()
def splice_parts(splicer: Splicer, sae, fit: dict, n_boot: int = 5000) -> dict:
    """Splice the reconstruction, its two error parts and two controls; per-window ΔCE and KL.

    x̂ leaves all of the error, x̂ + ê only the nonlinear error, x − ê only the linear error (the
    paper's "reconstruction + nonlinear error"). The controls ask whether x − ê's effect is ê's own:
    x − ē subtracts only the mean error, (1 − ε)x only the part of ê along x (ε from `linear_error_fit`).

    Returns:
        dict: per splice (`SPLICES`) the per-window arrays ``dce`` and ``kl``, their means with 95%
        bootstrap intervals over windows (``dce_ci``, ``kl_ci``: (mean, low, high)); the KL shares
        KL(x̂ + ê)/KL(x̂) and KL(x − ê)/KL(x̂) with ratio intervals; ΔCE(x − ê) minus each control's,
        paired per window.
    """
    d_in, W = sae.cfg.d_in, fit["W"]
    e_mean, eps = fit["e_mean"], fit["eps"]

    def using(f):
        def replace(a):
            flat = a.reshape(-1, d_in).float()
            return f(flat).reshape(a.shape).to(a.dtype)
        return replace

    recon = lambda flat: sae.reconstruct(flat.to(sae.device)).to(flat.device)
    e_hat = lambda flat: predict(flat.cpu(), W).to(flat.device)
    fns = {"x̂": recon, "x̂ + ê": lambda f: recon(f) + e_hat(f), "x − ê": lambda f: f - e_hat(f),
           "x − ē": lambda f: f - e_mean.to(f.device), "(1 − ε)x": lambda f: (1 - eps) * f}
    clean = splicer.per_window(None)["ce"]
    out = {"eps": eps}
    for name, f in fns.items():
        w = splicer.per_window(using(f))
        dce = w["ce"] - clean
        out[name] = {"dce": dce, "kl": w["kl"], "dce_ci": bootstrap_ci(dce, n_boot), "kl_ci": bootstrap_ci(w["kl"], n_boot)}
    out["kl_share_nonlinear_left"] = ratio_ci(out["x̂ + ê"]["kl"], out["x̂"]["kl"], n_boot)
    out["kl_share_linear_left"] = ratio_ci(out["x − ê"]["kl"], out["x̂"]["kl"], n_boot)
    for control in ("x − ē", "(1 − ε)x"):
        out[f"dce x − ê minus {control}"] = bootstrap_ci(out["x − ê"]["dce"] - out[control]["dce"], n_boot)
    return out


def splice_rows(parts: dict) -> list[dict]:
    """`splice_parts` results by width as table rows: one per (width, splice), ΔCE and KL with intervals."""
    return [{"d_sae": w, "splice": name, "ΔCE": p[name]["dce_ci"][0], "ΔCE low": p[name]["dce_ci"][1],
             "ΔCE high": p[name]["dce_ci"][2], "KL": p[name]["kl_ci"][0], "KL low": p[name]["kl_ci"][1],
             "KL high": p[name]["kl_ci"][2]} for w, p in parts.items() for name in SPLICES]


@torch.no_grad()
def first_order(x: torch.Tensor, g: torch.Tensor, fit: dict, per_window: int, n_boot: int = 5000) -> dict:
    """First-order ΔCE of subtracting ê, ē or εx from x at every position: −E[g·δ] per token.

    g = ∂(summed next-token CE)/∂x from a gradient store at the same hook, so splicing x − δ changes
    the mean CE per prediction by about −mean_t g_t·δ_t. Tokens come in windows of `per_window`;
    intervals bootstrap over windows.

    Returns:
        dict per δ name (``ê``, ``ē``, ``εx``) of (mean, low, high) of E[g·δ]; a positive value
        predicts a *lower* CE when δ is subtracted.
    """
    e_hat = predict(x, fit["W"]).double()
    deltas = {"ê": e_hat, "ē": fit["e_mean"].double().expand_as(e_hat), "εx": fit["eps"] * x.double()}
    n = len(x) // per_window * per_window
    out = {}
    for name, d in deltas.items():
        dot = (g.double() * d).sum(1)[:n].reshape(-1, per_window).mean(1)
        out[name] = bootstrap_ci(dot.numpy(), n_boot)
    return out


# --------------------------------------------------------------------------------------- claims
def _join(values, fmt: str = ".2f") -> str:
    return ", ".join(format(v, fmt) for v in values)


def _fmt_ci(ci) -> str:
    return f"{ci[0]:.3g} [{ci[1]:.3g}, {ci[2]:.3g}]"


def claims(widths: list[int], fits: list[dict], M: np.ndarray, encoders: list[dict], splices: list[dict],
           grads: list[dict] | None = None, scale: str | None = None) -> Claims:
    """Notebook 05's claims table, from results by width (narrowest first).

    Every row is decided only if the family behaves like the paper's: the widest SAE's FVU at least
    10% below the narrowest's. Otherwise the SAEs are too undertrained to stand for the paper's
    family, and each row says so instead of a verdict.

    Args:
        widths: the SAE widths.
        fits: per width, `linear_error_fit`'s scalars (fvu, fvu_nonlinear, vector_r2, vector_r2_global, norm_r2).
        M: `error_norm_r2_matrix` over the widths.
        encoders: per width, `encoder_comparison`'s result.
        splices: per width, `splice_parts`'s result (only the intervals and shares are read).
        grads: per width, `first_order`'s result, or None when no gradient store was used.
        scale: the scale name recorded in the table (default: ``SAE_KIT_SCALE``).
    """
    c = Claims("05_dark_matter", scale)
    fvu_, nonlin = [f["fvu"] for f in fits], [f["fvu_nonlinear"] for f in fits]
    family_ok = fvu_[-1] < 0.9 * fvu_[0]
    gate = ("; decided only if FVU falls with width (the widest SAE's FVU at least 10% below the "
            "narrowest's), else not decided")
    no_family = (f"not decided: FVU does not fall with width here ({fvu_[0]:.3f} at {widths[0]} → "
                 f"{fvu_[-1]:.3f} at {widths[-1]}): the SAEs are too undertrained at this scale to stand "
                 f"for the paper's family")

    def add(claim, paper, measured, verdict: Verdict, rule, source, figure):
        c.add(claim, paper, measured, verdict if family_ok else Verdict(None, no_family),
              rule=rule + gate, source=source, figure=figure)

    vr = float(np.mean([f["vector_r2"] for f in fits]))
    ok = 0.35 <= vr <= 0.65
    add("about half of the error vector is linearly predictable from x", "≈ 0.5 of the error vector",
        f"vector R² {_join(f['vector_r2'] for f in fits)} (per-dim mean; mean {vr:.2f}) / "
        f"{_join(f['vector_r2_global'] for f in fits)} (global), widths {widths}",
        Verdict(ok, f"mean per-dimension vector R² {vr:.2f} is {'inside' if ok else 'outside'} [0.35, 0.65]"),
        "held if the per-dimension vector R² (the paper's code), averaged over widths, lies in [0.35, 0.65]; "
        "did not hold otherwise", "abstract; sae_power_laws.py", "05_r2")
    low = min(f["norm_r2"] for f in fits)
    add("over 90% of the error norm is linearly predictable", "> 90% of ‖e‖²",
        f"norm R² {_join(f['norm_r2'] for f in fits)}",
        Verdict(low > 0.9, f"smallest norm R² over widths {low:.2f} is {'above' if low > 0.9 else 'not above'} 0.9"),
        "held if the norm R² is above 0.9 at every width; did not hold otherwise",
        "abstract; Fig. 7 (norm_prediction_violin.py)", "05_r2")
    drop, nl_change = (fvu_[0] - fvu_[-1]) / fvu_[0], abs(nonlin[0] - nonlin[-1]) / nonlin[0]
    ok = nl_change < 0.5 * drop
    add("nonlinear error stays roughly flat as width grows", "flat nonlinear floor under a falling FVU",
        f"FVU {fvu_[0]:.3f} → {fvu_[-1]:.3f} ({-100 * drop:+.0f}%); nonlinear {nonlin[0]:.3f} → "
        f"{nonlin[-1]:.3f} ({100 * (nonlin[-1] / nonlin[0] - 1):+.0f}%)",
        Verdict(ok, f"the nonlinear FVU changes by {100 * nl_change:.0f}%, {'less' if ok else 'not less'} than "
                    f"half the FVU's {100 * drop:.0f}% drop"),
        "held if the nonlinear FVU changes (narrowest → widest, relative) by less than half the FVU's relative "
        "drop; did not hold otherwise", "abstract; Fig. 1 (sae_power_laws.py)", "05_scaling")
    off = M[np.triu_indices(len(widths), 1)]
    ok = off.mean() > 0.7
    add("larger SAEs fail on the same tokens as smaller ones", "high per-token R² across widths",
        f"mean R² of ‖e_j‖ from ‖e_i‖ (i < j): {off.mean():.2f} (min {off.min():.2f})",
        Verdict(ok, f"mean cross-width R² {off.mean():.2f} is {'above' if ok else 'not above'} 0.7"),
        "held if the mean R² over pairs i < j is above 0.7; did not hold otherwise",
        "abstract; sae_power_laws_per_token.py", "05_token_r2")
    add(*_encoder_row(encoders))
    add(*_proportional_row(fits, splices))
    add(*_linear_left_row(splices, grads))
    return c


def _encoder_row(encoders: list[dict]):
    """A better encoder (NNLS on the SAE's support; pursuit at the SAE's L0) lowers the nonlinear error only slightly."""
    labels = {"nnls": "NNLS refit on the SAE's support", "pursuit_matched": "pursuit at matched L0",
              "pursuit": "pursuit, paper's step count"}
    drops = {name: [1 - e[name]["fvu_nonlinear"] / e["sae"]["fvu_nonlinear"] for e in encoders] for name in labels}
    parts = [f"SAE L0 {_join((e['sae']['l0'] for e in encoders), '.1f')}"]
    for name, label in labels.items():
        short = f" (below the SAE's on {_join((100 * e[name]['short'] for e in encoders), '.0f')}% of tokens)" \
            if "short" in encoders[0][name] else ""
        parts.append(f"{label}: L0 {_join((e[name]['l0'] for e in encoders), '.1f')}{short}, nonlinear FVU "
                     f"{_join((-100 * d for d in drops[name]), '+.1f')}%, FVU "
                     f"{_join((100 * (e[name]['fvu'] / e['sae']['fvu'] - 1) for e in encoders), '+.1f')}%")
    worst = max(drops["nnls"] + drops["pursuit_matched"])
    ok = worst < 0.1
    verdict = Verdict(ok, f"the largest decrease of the nonlinear FVU by an encoder at the SAE's L0 is "
                          f"{100 * worst:.1f}%, {'below' if ok else 'not below'} 10%")
    return ("a better encoder lowers the nonlinear error only slightly",
            "gradient pursuit: very slight decrease in nonlinear error", "; ".join(parts), verdict,
            "held if neither the NNLS refit on the SAE's own support (never a worse fit) nor gradient pursuit run "
            "until its L0 equals the SAE's lowers the nonlinear FVU by 10% or more at any width (same tokens, same "
            "decoder); did not hold otherwise. Pursuit with the paper's step count is shown, not judged: its L0 "
            "falls short of the SAE's", "abstract; Fig. 'pursuit' of sae_power_laws.py (encoder_pursuit.py)", "05_encoders")


def _proportional_row(fits: list[dict], splices: list[dict]):
    """KL share of x̂ + ê against the nonlinear share of the FVU, within a factor of 2."""
    fvu_share = [f["fvu_nonlinear"] / f["fvu"] for f in fits]
    ratios = [tuple(v / q for v in s["kl_share_nonlinear_left"]) for s, q in zip(splices, fvu_share)]
    inside = [0.5 < lo and hi < 2 for _, lo, hi in ratios]
    outside = [hi < 0.5 or lo > 2 for _, lo, hi in ratios]
    if all(inside):
        verdict = Verdict(True, "at every width the interval of KL share / FVU share lies inside [0.5, 2]")
    elif any(outside):
        verdict = Verdict(False, f"at {sum(outside)} of {len(ratios)} widths the interval of KL share / FVU share "
                                 f"lies outside [0.5, 2] ({', '.join(_fmt_ci(r) for r in ratios)})")
    else:
        verdict = Verdict(None, f"{sum(inside)} of {len(ratios)} widths inside [0.5, 2], the rest reach across "
                                f"its edge ({', '.join(_fmt_ci(r) for r in ratios)})")
    dce_share = [s["x̂ + ê"]["dce_ci"][0] / s["x̂"]["dce_ci"][0] for s in splices]
    measured = ("KL(x̂+ê)/KL(x̂), only the nonlinear error left: " + ", ".join(_fmt_ci(s["kl_share_nonlinear_left"])
                                                                          for s in splices)
                + f"; nonlinear share of FVU {_join(fvu_share)}; ΔCE share, for reference, {_join(dce_share)}")
    return ("the nonlinear error costs a share of the downstream damage proportional to its share of the error",
            "nonlinear error causes a proportional share of the CE increase", measured, verdict,
            "'proportional' read as within a factor of 2: held if at every width the 95% bootstrap interval (over "
            "windows) of [KL(x̂+ê)/KL(x̂)] / [FVU(x̂+ê)/FVU(x̂)] lies inside [0.5, 2]; did not hold if at some width "
            "it lies outside; else not decided. KL, not ΔCE: KL ≥ 0 for every splice, ΔCE can fall below zero",
            "abstract; Fig. 9 (downstream_ce.py)", "05_downstream")


def _linear_left_row(splices: list[dict], grads: list[dict] | None):
    """Splicing x − ê lowers CE below the clean model, beyond the controls (a kit observation)."""
    rows, below, above, control = [], [], [], []
    for s in splices:
        d = s["x − ê"]["dce_ci"]
        gaps = [s[f"dce x − ê minus {c}"] for c in ("x − ē", "(1 − ε)x")]
        below.append(d[2] < 0 and all(v[2] < 0 for v in gaps))
        above.append(d[1] > 0)
        control += [c for c, v in zip(("x − ē", "(1 − ε)x"), gaps) if v[1] > 0]  # that control lowers CE more
        rows.append(f"ΔCE(x−ê) {_fmt_ci(d)}, minus ΔCE(x−ē) {_fmt_ci(gaps[0])}, minus ΔCE((1−ε)x) "
                    f"{_fmt_ci(gaps[1])}, KL(x−ê) {s['x − ê']['kl_ci'][0]:.3g}")
    measured = " | ".join(rows)
    if grads:
        measured += " | first order −E[g·ê] " + ", ".join(_fmt_ci((-g["ê"][0], -g["ê"][2], -g["ê"][1])) for g in grads)
    if all(below):
        verdict = Verdict(True, "at every width ΔCE(x − ê) and its paired gaps to both controls have intervals below 0")
    elif any(above):
        verdict = Verdict(False, f"at {sum(above)} of {len(splices)} widths the interval of ΔCE(x − ê) lies above 0")
    elif control:
        verdict = Verdict(False, f"a control lowers CE more than x − ê (paired interval above 0): "
                                 f"{', '.join(sorted(set(control)))}")
    else:
        verdict = Verdict(None, f"{sum(below)} of {len(splices)} widths have ΔCE(x − ê) and both control gaps below 0; "
                                f"at the rest an interval reaches 0")
    return ("removing only the linear error (x − ê) lowers CE below the clean model, beyond shift and shrink controls",
            "not a paper claim: a kit observation (the paper's Fig. 9 plots x̂ + (e − ê) as a percent of the CE "
            "recovered, up to 100%)", measured, verdict,
            "held if at every width the 95% bootstrap interval (over windows) of ΔCE(x − ê) lies below 0 and so do "
            "the paired differences ΔCE(x − ê) − ΔCE(x − ē) and ΔCE(x − ê) − ΔCE((1 − ε)x); did not hold if at "
            "some width ΔCE(x − ê)'s interval lies above 0, or a control's paired difference lies above 0 (the "
            "control explains the drop); else not decided. KL(x − ê) is shown: it is ≥ 0 "
            "however CE moves", "kit observation (cf. Fig. 9, downstream_ce.py)", "05_downstream")
