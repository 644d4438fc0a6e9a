"""Evaluation for notebook 02 (g-SAE vs TopK): every metric in both inference modes, how hard the
gradient term pushes the selection, whether its first-order premise holds, and the claims table.

A g-SAE can select latents with the eval tokens' gradients (its ``"gradient"`` mode, which needs
labels and a backward pass) or without (``"topk"``, what a user has at inference). Results are one
row per (SAE, mode); a TopK SAE has the one mode ``"topk"``. Claims are judged in the ``"topk"``
mode first (what a user of the saved SAE gets), then in the ``"gradient"`` mode.

- `evaluate_modes`: FVU, L0, dead %, ΔCE, KL per inference mode.
- `selection_change`: the share of the k kept latents that the gradient term swaps out, against
  plain top-k on the same weights, per normalisation and β (how big a push β is).
- `first_order_check`: does the first-order estimate g·(x̂ − x) = −g·e (e = x − x̂, the SAE's error
  at the hooked site, g = ∂CE/∂x) predict the loss change measured by splicing x̂ into the model?
- `claims`: the notebook's claims table from the sweep tables (rules in the docstring).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .claims import Claims, Verdict, beats_noise, interval, noise_text, share_noise, with_second
from .config import Scale, bars_off, scale_name
from .metrics import reconstruction_metrics
from .saes.base import row_topk
from .saes.gradient import NORMALISATIONS, gradient_factor
from .splice import Splicer
from .sweeps import decided_gap, each_mode, matched_l0_gap, pick, second_opinion, seed_noise
from .train import check_fits

BETAS = (0.1, 0.2, 0.3, 1.0)  # the β sweep at one k (β = 0 is the TopK SAE itself)
PAPER = "Olmo et al. 2024 (arXiv 2411.10397)"


@dataclass(frozen=True)
class Sizes:
    """Notebook 02's store and training sizes at one scale (`sizes`)."""

    grad_tokens: int  # training tokens harvested with ∂CE/∂x (~140 tok/s on 2 cores)
    grad_eval_tokens: int  # held-out tokens of that store
    grad_epochs: int  # passes over the (smaller) gradient store
    first_order_windows: int  # eval windows of the first-order check
    first_order_positions: int  # positions measured per window (one forward pass each; 62 = all)


_SIZES = {"ci": Sizes(8_192, 2_048, 4, 2, 16), "lab": Sizes(49_152, 10_240, 4, 8, 24),
          "paper": Sizes(360_000, 40_960, 8, 32, 62)}


def sizes(scale: Scale | str | None = None) -> Sizes:
    """Notebook 02's sizes at `scale` (a `Scale`, its name, or None for ``SAE_KIT_SCALE``)."""
    return _SIZES[scale_name(scale)]


def evaluate_modes(sae, x: torch.Tensor, g: torch.Tensor, splicer: Splicer | None = None) -> list[dict]:
    """FVU, nMSE, L0, dead share (on the eval tokens and, ``dead_train``, on the training clock), ΔCE
    and KL, one row per inference mode of `sae` (a g-SAE: ``topk`` and
    ``gradient``, which gets the eval tokens' gradients; TopK: ``topk``)."""

    def metrics(mode: str) -> dict:
        gm = g if mode in sae.grad_modes else None
        m = reconstruction_metrics(sae, x, gm)
        m.pop("density")
        # dead on the training clock (silent for dead_tokens training tokens), beside "never active on
        # the eval tokens": a rare latent can miss a small eval split without being dead
        m["dead_train"] = float(sae.dead_mask().float().mean())
        if splicer is not None:
            s = splicer(sae, g=gm)
            m.update(delta_ce=s["delta_ce"], kl=s["kl"], ce_recovered=s["ce_recovered"])
        return m

    return each_mode(sae, metrics)


# ---- how big a push is β ----------------------------------------------------------------------
def beta_sweep(table: pd.DataFrame, store, x: torch.Tensor, g: torch.Tensor, splicer: Splicer | None, d_sae: int,
               k: int, batch_size: int, epochs: int, betas=BETAS, normalisations=("token", "batch"),
               reuse: str = "g-SAE β=1", **sae_kw) -> pd.DataFrame:
    """Train (or reload: `train_cached`) a g-SAE for every (normalisation, β) at one k and evaluate it
    in both modes (`evaluate_modes`). The token-normalised β = 1 SAE is the k sweep's `reuse` label in
    `table` (seed 0), not retrained.

    Returns:
        One row per (normalise, beta, mode) with the metrics.
    """
    from .saes import gradient_sae
    from .sweeps import pick
    from .train import train_cached

    rows = []
    for norm in normalisations:
        for beta in betas:
            if norm == "token" and beta == 1.0 and reuse in set(table["label"]):
                got = [{c: v for c, v in r.items() if c not in ("label", "seed")}
                       for mode in ("topk", "gradient") for r in pick(table, reuse, mode, k=k, seed=0).to_dict("records")]
            else:
                sae = gradient_sae(store.d_in, d_sae, k, beta=beta, normalise=norm, **sae_kw)
                sae, _ = train_cached(sae, store, batch_size=batch_size, epochs=epochs, grads=True,
                                      desc=f"g-SAE {norm} β={beta}")
                got = [{"k": k, **row} for row in evaluate_modes(sae, x, g, splicer)]
            rows += [{"normalise": norm, "beta": beta, **row} for row in got]
    return pd.DataFrame(rows)


def selection_change(sae, x: torch.Tensor, g: torch.Tensor, betas=BETAS, normalisations=NORMALISATIONS,
                     batch_size: int = 1024) -> pd.DataFrame:
    """How many of its k latents a token swaps when the gradient term is added to plain top-k.

    On `sae`'s own weights (any TopK-family dictionary with a budget ``cfg.k``), per normalisation
    and β: the score z·(1 + β·a) with a = |d_i · g| scaled as in `saes.gradient.gradient_factor`,
    against the plain top-k of z. This is the push before training adapts the encoder to it.
    `batch_size` sets the batches of the ``"batch"`` normalisation (use the training batch).

    Returns:
        A table with ``normalise``, ``beta``, ``changed`` (mean share of the k kept latents that
        differ from plain top-k) and ``changed_any`` (share of tokens with at least one change).
    """
    k = sae.cfg.k
    betas, normalisations = list(betas), list(normalisations)
    changed = np.zeros((len(normalisations), len(betas)))
    changed_any = np.zeros_like(changed)
    for i in range(0, len(x), batch_size):
        xb, gb = x[i:i + batch_size].to(sae.device), g[i:i + batch_size].to(sae.device)
        z = sae.pre_acts(xb).clamp_min(0)
        alive = z > 0  # ties among zeros are not a change
        plain = torch.zeros_like(alive).scatter_(1, row_topk(z, k)[1], True) & alive
        for n, norm in enumerate(normalisations):
            a = gradient_factor(gb, sae.W_dec, norm)
            for b, beta in enumerate(betas):
                kept = torch.zeros_like(plain).scatter_(1, row_topk(z * (1 + beta * a), k)[1], True) & alive
                diff = (kept & ~plain).sum(1).float()
                changed[n, b] += float(diff.sum()) / k
                changed_any[n, b] += float((diff > 0).sum())
    rows = [{"normalise": norm, "beta": beta, "changed": changed[n, b] / len(x),
             "changed_any": changed_any[n, b] / len(x)}
            for n, norm in enumerate(normalisations) for b, beta in enumerate(betas)]
    return pd.DataFrame(rows)


# ---- the first-order premise ------------------------------------------------------------------
@dataclass
class FirstOrder:
    """What `first_order_check` measured.

    ``tokens``: one row per (window, stored position): ``estimate`` = g·(x̂ − x) (nats), ``measured``
    = the change of the window's summed next-token CE when x̂ replaces x at that one position (all
    other positions clean), ``own`` = the change of that position's own next-token CE when x̂
    replaces x at *every* position (what the usual splice measures, per token), ``err_norm`` =
    ‖x − x̂‖, ``grad_norm`` = ‖g‖.
    ``windows``: per window, the sum of the estimates and the measured change of the window's summed
    CE with every position spliced (the usual ΔCE, times the number of scored predictions)."""

    tokens: pd.DataFrame
    windows: pd.DataFrame

    def summary(self, n_boot: int = 1000, seed: int = 0) -> dict:
        """Spearman ρ of the estimate against the measured change, per token (with a bootstrap 95%
        interval over windows: tokens of one window are not independent) and per window; ρ against
        the per-token ΔCE of the full splice (``rho_own``); the mean of the per-token ρ computed inside each
        window (``rho_within``: what is left once differences between windows are taken out); ρ of |estimate| and of the norm-only
        proxy ‖g‖·‖x − x̂‖ against |measured| (does g's *direction* add anything?); the share of
        tokens where the estimate has the measured sign; mean estimate, mean |estimate| (what the
        g-SAE's selection tries to shrink) and mean measured change."""
        t = self.tokens
        rho = _spearman(t["estimate"], t["measured"])
        lo, hi = _window_bootstrap(t, n_boot, seed)
        return {"rho": rho, "rho_lo": lo, "rho_hi": hi, "n_tokens": len(t), "n_windows": int(t["window"].nunique()),
                "rho_windows": _spearman(self.windows["estimate"], self.windows["measured"]),
                "rho_own": _spearman(t["estimate"], t["own"]),
                "rho_within": _within_windows(t),
                "rho_abs": _spearman(t["estimate"].abs(), t["measured"].abs()),
                "rho_norms": _spearman(t["grad_norm"] * t["err_norm"], t["measured"].abs()),
                "sign_agree": float((np.sign(t["estimate"]) == np.sign(t["measured"])).mean()),
                "mean_estimate": float(t["estimate"].mean()), "mean_abs_estimate": float(t["estimate"].abs().mean()),
                "mean_measured": float(t["measured"].mean())}


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def _within_windows(t: pd.DataFrame) -> float:
    """Mean over windows of the Spearman ρ of estimate against measured among that window's tokens
    (nan when no window has three tokens with varying values)."""
    rhos = [_spearman(g["estimate"], g["measured"]) for _, g in t.groupby("window")]
    rhos = [r for r in rhos if np.isfinite(r)]
    return float(np.mean(rhos)) if rhos else float("nan")


def _window_bootstrap(t: pd.DataFrame, n_boot: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the per-token Spearman ρ, resampling whole windows."""
    groups = [g for _, g in t.groupby("window")]
    if len(groups) < 2:
        return float("-inf"), float("inf")
    rng = np.random.default_rng(seed)
    est = [g["estimate"].to_numpy() for g in groups]
    mea = [g["measured"].to_numpy() for g in groups]
    rhos = []
    for _ in range(n_boot):
        pick_ = rng.integers(0, len(groups), len(groups))
        r = _spearman(np.concatenate([est[i] for i in pick_]), np.concatenate([mea[i] for i in pick_]))
        if np.isfinite(r):
            rhos.append(r)
    if len(rhos) < 2:
        return float("-inf"), float("inf")
    lo, hi = np.quantile(rhos, [0.025, 0.975])
    return float(lo), float(hi)


def _ce(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Next-token CE per position [B, P] from log-probs [B, P, vocab] and targets [P]."""
    t = targets.to(logp.device).long().expand(logp.shape[0], -1)
    return -logp.gather(-1, t[..., None])[..., 0].double()


@torch.no_grad()
def first_order_check(splicer: Splicer, sae, g: torch.Tensor, n_windows: int | None = None,
                      positions: int | None = None, chunk: int = 16, progress: bool = True,
                      force: bool = False) -> FirstOrder:
    """Measure, token by token, the loss change that splicing `sae`'s reconstruction causes, next to
    its first-order estimate g·(x̂ − x).

    g (from the store) is ∂/∂x_t of the window's *summed* next-token CE, so g_t·(x̂_t − x_t)
    estimates how much the whole window's loss changes when x̂_t replaces x_t at position t alone.
    That is what is measured: for `positions` evenly spaced stored positions of each of the first
    `n_windows` eval windows of `splicer`, one forward pass from the SAE's layer with only that
    position replaced (`chunk` positions per pass, each in its own copy of the window), scored on
    the Splicer's predictions (a position changes only the predictions made from it on). The usual
    all-positions splice is run too, for its per-token and per-window ΔCE. The SAE runs in its
    current mode; a mode that needs gradients gets the eval tokens' `g` (one window at a time, so a
    ``"batch"`` normalisation sees that window's tokens as its batch).

    Args:
        splicer: a `Splicer` on the store the SAE was trained on (its eval windows, its hooks).
        sae: the dictionary.
        g: the eval split's gradients, ``store.get("eval", grads=True)[1]`` (fp32 store).
        n_windows: windows to use (None: all of the Splicer's).
        positions: positions measured per window, evenly spaced (None: all); the cost is one
            window's forward pass per measured position.
        chunk: single-position copies per forward pass.

    Returns:
        A `FirstOrder`.
    """
    check_fits(sae, splicer, force, action="splice")
    sl = splicer.sl
    P = sl.stop - sl.start
    n = len(splicer.windows) if n_windows is None else min(int(n_windows), len(splicer.windows))
    if len(g) < n * P:
        raise ValueError(f"g has {len(g)} rows; {n} windows need {n * P} (eval split order)")
    where = torch.arange(P) if positions is None or positions >= P else \
        torch.linspace(0, P - 1, max(int(positions), 1)).round().long().unique()
    need_g = sae.mode in sae.grad_modes
    token_rows, window_rows = [], []
    for w in tqdm(range(n), desc="first-order check", disable=bars_off(progress), leave=False):
        b, i = divmod(w, splicer.batch_seqs)
        resid = splicer.resid[b][i:i + 1]
        tgt = splicer.targets[w]
        g_w = g[w * P:(w + 1) * P].to(sae.device, torch.float32)
        seen = {}

        def grab(a):
            seen["x"] = a[0].clone()
            return a

        ce_clean = _ce(splicer._run(resid, grab), tgt)[0]  # [P]
        x = seen["x"].to(sae.device, torch.float32)
        x_hat = sae.reconstruct(x, g_w if need_g else None)
        est = (g_w.double() * (x_hat - x).double()).sum(1)  # [P]
        x_hat_m = x_hat.to(resid.device)

        ce_all = _ce(splicer._run(resid, lambda a: x_hat_m[None].expand_as(a).to(a.dtype)), tgt)[0]
        measured = torch.full((P,), float("nan"), dtype=torch.float64)
        for s in range(0, len(where), chunk):
            js = where[s:s + chunk]

            def one(a, js=js):
                a[torch.arange(len(js)), js.to(a.device)] = x_hat_m[js.to(x_hat_m.device)].to(a.dtype)
                return a

            ce = _ce(splicer._run(resid.expand(len(js), -1, -1).contiguous(), one), tgt)  # [len(js), P]
            # a position changes only the predictions made from it on (causal): sum those
            later = torch.arange(P)[None, :] >= js[:, None]
            measured[js] = ((ce.cpu() - ce_clean.cpu()[None]) * later).sum(1)
        for p in where.tolist():
            token_rows.append({"window": w, "position": p, "estimate": float(est[p]), "measured": float(measured[p]),
                               "own": float(ce_all[p] - ce_clean[p]), "err_norm": float((x_hat[p] - x[p]).norm()),
                               "grad_norm": float(g_w[p].norm())})
        window_rows.append({"window": w, "estimate": float(est.sum()), "measured": float((ce_all - ce_clean).sum())})
    return FirstOrder(pd.DataFrame(token_rows), pd.DataFrame(window_rows))


# ---- claims -------------------------------------------------------------------------------------
MODE_NAMES = {"topk": "TopK mode: what a user has", "gradient": "gradient mode: needs each token's gradient"}


def _ratios(gaps) -> str:
    return ", ".join(f"{np.exp(g):.3f}" for g in gaps)


def _ks(table: pd.DataFrame, label: str, mode: str | None) -> list:
    return sorted(pick(table, label, mode)["k"].unique().tolist())


def _has(table: pd.DataFrame, key: str, label: str, mode: str | None, reference: str) -> bool:
    """Whether both dictionaries' rows carry a finite `key` (KL: a splicer ran on them; nMSE and the
    training clock: tables from before those columns lack them)."""
    if key not in table:
        return False
    rows = pd.concat([pick(table, label, mode), pick(table, reference)])
    return bool(np.isfinite(rows[key].to_numpy(dtype=float)).all())


def _faithful(c: Claims, table, label, reference, mode, figure):
    gaps, verdict, noise = decided_gap(table, label, reference, key="delta_ce", mode=mode)
    ks = ", ".join(map(str, _ks(table, label, mode)))
    measured = f"ΔCE ratio g-SAE / TopK at matched L0: {_ratios(gaps)} (k = {ks}); {noise_text(noise)}"
    if _has(table, "kl", label, mode, reference):
        # KL(clean ‖ spliced) is never negative token by token, so its mean is far less noisy than ΔCE's
        # (a difference of two CEs): the same comparison on it says whether ΔCE's noise hides a gap
        k_gaps, k_noise, k_verdict, _ = second_opinion(table, label, reference, "kl", verdict, mode=mode)
        measured += f"; KL ratio: {_ratios(k_gaps)} (KL {noise_text(k_noise)})"
        verdict = with_second(verdict, k_verdict, "KL(clean ‖ spliced)")
    c.add(f"g-SAE is more faithful downstream at equal L0 ({MODE_NAMES[mode]})", "lower ΔCE than TopK at equal L0",
          measured, verdict,
          rule="held: the g-SAE's ΔCE is below TopK's frontier (interpolated at the g-SAE's L0) at every k by more "
               "than twice the largest seed sd; did not hold: above it at every k by as much; else not decided",
          source=f"{PAPER}, abstract", figure=figure)


def _dead_gap(table, label, reference, mode, key: str = "dead"):
    """(ks, g-SAE shares, TopK shares, share noise, Verdict) for the dead share in column `key`."""
    g_rows, t_rows = pick(table, label, mode), pick(table, reference)
    g_dead, t_dead = g_rows.groupby("k")[key].mean(), t_rows.groupby("k")[key].mean()
    ks = sorted(set(g_dead.index) & set(t_dead.index))
    diffs = [float(g_dead[k] - t_dead[k]) for k in ks]
    sds = []
    for rows in (g_rows, t_rows):
        for _, v in rows.groupby("k")[key]:
            if len(v) > 1:
                sds.append(float(v.std(ddof=1)))
    noise = share_noise(sds)
    verdict = beats_noise(diffs, noise, "lower", what="dead share g-SAE − TopK")
    verdict = Verdict(verdict.held, verdict.reason.replace("%)", " points)"))  # shares differ in points, not %
    moot = [k for k in ks if np.isfinite(noise) and np.isfinite([g_dead[k], t_dead[k]]).all()
            and max(g_dead[k], t_dead[k]) <= noise]
    if moot and verdict.held is None:  # say why the points within noise cannot count either way
        verdict = Verdict(None, verdict.reason + f"; at k = {', '.join(map(str, moot))} neither has dead latents "
                                                 f"beyond the noise, so those points cannot decide the claim")
    return ks, g_dead, t_dead, noise, verdict


def _shares(ks, g_dead, t_dead) -> str:
    return ", ".join(f"k={k}: {100 * g_dead[k]:.2f}% vs {100 * t_dead[k]:.2f}%" for k in ks)


def _dead(c: Claims, table, label, reference, mode, figure):
    ks, g_dead, t_dead, noise, verdict = _dead_gap(table, label, reference, mode)
    measured = ("dead share (never active on the eval tokens) g-SAE vs TopK: " + _shares(ks, g_dead, t_dead)
                + (f"; seed noise ±{100 * noise:.2f} points" if np.isfinite(noise) else "; one seed (no noise estimate)"))
    if _has(table, "dead_train", label, mode, reference):
        _, g_clk, t_clk, _, clk = _dead_gap(table, label, reference, mode, key="dead_train")
        measured += "; on the training clock: " + _shares(ks, g_clk, t_clk)
        verdict = with_second(verdict, clk, "the training clock")
    c.add(f"g-SAE has fewer dead latents ({MODE_NAMES[mode]})", "fewer dead latents than TopK", measured,
          verdict, rule="held: lower than TopK at every k by more than twice the largest seed sd (percentage "
                        "points, at least 0.2); did not hold: higher at every k by as much; else not decided",
          source=f"{PAPER}, summary of the results (not in the abstract)", figure=figure)


def steering_verdict(effects_g, effects_ref, p_max: float = 0.01) -> tuple[Verdict, float, float]:
    """(Verdict, p, p_reverse): one-sided Mann–Whitney tests that the g-SAE's effects are larger
    (held at p < `p_max`) or smaller (did not hold) than the reference's."""
    from scipy.stats import mannwhitneyu

    a, b = np.asarray(effects_g, dtype=float), np.asarray(effects_ref, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return Verdict(None, "fewer than two latents per SAE"), float("nan"), float("nan")
    p = float(mannwhitneyu(a, b, alternative="greater").pvalue)
    p_rev = float(mannwhitneyu(b, a, alternative="greater").pvalue)
    if p < p_max:
        return Verdict(True, f"g-SAE effects larger: one-sided Mann–Whitney p = {p:.3g} < {p_max}"), p, p_rev
    if p_rev < p_max:
        return Verdict(False, f"TopK effects larger: one-sided Mann–Whitney p = {p_rev:.3g} < {p_max}"), p, p_rev
    return Verdict(None, f"no difference at p < {p_max} (one-sided Mann–Whitney p = {p:.3g} one way, "
                         f"{p_rev:.3g} the other)"), p, p_rev


def _steering(c: Claims, effects, label, reference, alpha, figure):
    eg, er = (np.asarray(effects[name], dtype=float) for name in (label, reference))  # tensors or arrays
    verdict, p, _ = steering_verdict(eg, er)
    n = len(eg)
    at = f" at α = {alpha:.1f}" if alpha is not None else ""
    c.add("g-SAE latents steer more effectively on average", "larger steering effect in arbitrary contexts",
          f"mean KL(clean ‖ steered){at}: g-SAE {eg.mean():.4f} vs TopK {er.mean():.4f} over {n} random alive "
          f"latents each", verdict,
          rule="held: one-sided Mann–Whitney p < 0.01 that g-SAE latents move the output more per unit norm; "
               "did not hold: the reverse test gives p < 0.01; else not decided (the measure is the kit's proxy)",
          source=f"{PAPER}, abstract", figure=figure)


def cost_verdict(gaps, ks, noise: float, limit: float = 1.1, metric: str = "FVU") -> Verdict:
    """Is the g-SAE's reconstruction at most `limit` × TopK's frontier at every k, beyond seed noise?

    `gaps` are log(g-SAE / TopK at matched L0) per k in `ks`; `noise` the relative seed noise (nan:
    one seed). Held when the worst gap is below log(limit) − noise, did not hold when it is above
    log(limit) + noise, else not decided. The reason names the worst k and reads in percent."""
    gaps = np.asarray(gaps, dtype=float)
    if not np.isfinite(gaps).any():
        return Verdict(None, f"no finite {metric} ratio")
    worst = int(np.nanargmax(gaps))
    above = f"{metric} up to {100 * (np.exp(gaps[worst]) - 1):.1f}% above TopK's frontier (at k = {ks[worst]})"
    allowance = f"the {100 * (limit - 1):.0f}% allowance"
    if not np.isfinite(noise):
        return Verdict(None, f"{above}; one seed only: no estimate of seed noise")
    lim, bar = float(np.log(limit)), f"seed noise ±{100 * noise:.1f}%"
    if gaps[worst] > lim + noise:
        return Verdict(False, f"{above}: over {allowance} by more than the {bar}")
    if gaps[worst] < lim - noise:
        return Verdict(True, f"{above}: under {allowance} by more than the {bar}")
    return Verdict(None, f"{above}: within the {bar} of {allowance}")


def _mse_cost(c: Claims, table, label, reference, mode, figure, limit: float = 1.1):
    ks = _ks(table, label, mode)
    gaps = matched_l0_gap(table, label, reference, key="fvu", mode=mode)
    noise = seed_noise(table, [label, reference], "fvu", [mode, None])
    verdict = cost_verdict(gaps, ks, noise, limit)
    measured = f"FVU ratio g-SAE / TopK at matched L0: {_ratios(gaps)} (k = {', '.join(map(str, ks))}); {noise_text(noise)}"
    if _has(table, "nmse", label, mode, reference):
        # the per-token nMSE weighs every token alike, so a few high-norm tokens cannot carry the verdict
        n_gaps = matched_l0_gap(table, label, reference, key="nmse", mode=mode)
        n_noise = seed_noise(table, [label, reference], "nmse", [mode, None])
        measured += f"; per-token nMSE ratio: {_ratios(n_gaps)} (nMSE {noise_text(n_noise)})"
        verdict = with_second(verdict, cost_verdict(n_gaps, ks, n_noise, limit, metric="per-token nMSE"),
                              "the per-token nMSE")
    c.add(f"the reconstruction cost of the g-SAE is small ({MODE_NAMES[mode]})", "slightly worse reconstruction (MSE)",
          measured, verdict,
          rule=f"held: FVU at most {100 * (limit - 1):.0f}% above TopK's frontier (interpolated at the g-SAE's L0) at "
               f"every k, by more than the seed noise; did not hold: more than that at some k, by more than the "
               f"noise; else not decided",
          source=f"{PAPER}, abstract (\"small\" is the kit's reading: ≤ {100 * (limit - 1):.0f}%)", figure=figure)


def _beta_sweep(c: Claims, beta_table, table, label, reference, mode, figure):
    t = beta_table[beta_table["mode"] == mode]
    k = int(t["k"].iloc[0])
    ref = float(pick(table, reference, k=k)["delta_ce"].mean())
    gaps = np.log(t["delta_ce"].to_numpy() / ref)
    noise = seed_noise(table, [label, reference], "delta_ce", [mode, None])
    best = int(np.nanargmin(gaps)) if np.isfinite(gaps).any() else 0
    name = lambda r: f"{r['normalise']} β={r['beta']:g}"
    settings = ", ".join(f"{name(r)}: {np.exp(gap):.3f}" for gap, (_, r) in zip(gaps, t.iterrows()))
    if not np.isfinite(noise):
        verdict = Verdict(None, "one seed only: no estimate of seed noise to beat")
    elif gaps[best] < -noise:  # best of N at one seed each: noise alone gives this often, so no "held"
        verdict = Verdict(None, f"{name(t.iloc[best])} beats TopK by more than seed noise (±{100 * noise:.1f}%), but it "
                                f"is the best of {len(gaps)} settings at one seed each: exploratory until it is "
                                f"retrained on other seeds")
    elif (gaps > noise).all():
        verdict = Verdict(False, f"every setting is worse than TopK by more than seed noise (±{100 * noise:.1f}%)")
    else:
        within = int((np.abs(gaps) <= noise).sum())
        verdict = Verdict(None, f"the best setting ({name(t.iloc[best])}) is within seed noise (±{100 * noise:.1f}%) "
                                f"of TopK, and {within} of {len(gaps)} settings lie within the noise, so not every "
                                f"setting is worse")
    measured = f"ΔCE ratio g-SAE / TopK at k = {k}: {settings}; {noise_text(noise)}"
    if "kl" in t and np.isfinite(t["kl"].to_numpy(dtype=float)).all() and _has(table, "kl", label, mode, reference):
        # the lower-noise KL beside ΔCE, as in the k sweep's row
        k_ref = float(pick(table, reference, k=k)["kl"].mean())
        k_gaps = np.log(t["kl"].to_numpy(dtype=float) / k_ref)
        k_noise = seed_noise(table, [label, reference], "kl", [mode, None])
        kb = int(np.argmin(k_gaps))
        measured += ("; KL ratio: " + ", ".join(f"{name(r)}: {np.exp(gap):.3f}" for gap, (_, r) in zip(k_gaps, t.iterrows()))
                     + f" (KL {noise_text(k_noise)}; best {name(t.iloc[kb])})")
    c.add(f"some β / normalisation makes the g-SAE beat TopK downstream at k = {k} ({MODE_NAMES[mode]})",
          "g-SAE improves downstream CE (for a suitable β: the paper's β and scaling are not public)",
          measured, verdict,
          rule="exploratory, never 'held' from the sweep alone (the best of several settings at one seed each beats "
               "one noise bar by chance too often); did not hold: every setting is above TopK's ΔCE at the same k by "
               "more than the seed noise; else not decided",
          source=f"{PAPER}, abstract; β and the gradient's scaling are the kit's sweep", figure=figure)


def _premise(c: Claims, first_order: dict, primary: str, figure, above: float = 0.5, below: float = 0.2):
    s = first_order[primary]
    verdict = interval(s["rho_lo"], s["rho_hi"], above=above, below=below,
                       what="per-token Spearman ρ, 95% window bootstrap")
    others = "; ".join(f"{name}: ρ = {o['rho']:.2f}" for name, o in first_order.items() if name != primary)
    c.add("premise: the first-order estimate g·(x̂ − x) predicts the loss change of splicing x̂ in, token by token",
          "z_i (d_i·g) estimates latent i's effect on the loss (attribution patching), so |d_i·g| marks "
          "latents that matter",
          f"{primary}: Spearman ρ = {s['rho']:.2f} [{s['rho_lo']:.2f}, {s['rho_hi']:.2f}] over {s['n_tokens']} tokens "
          f"({s['n_windows']} windows); within a window, mean ρ = {s.get('rho_within', float('nan')):.2f}; "
          f"per window (window sums) ρ = {s['rho_windows']:.2f}; "
          f"sign right on {100 * s['sign_agree']:.0f}% "
          f"of tokens; ρ of |estimate| vs |measured| {s['rho_abs']:.2f}, of the direction-free ‖g‖·‖e‖ "
          f"{s['rho_norms']:.2f}; mean estimate {s['mean_estimate']:+.4f} vs measured {s['mean_measured']:+.4f} nats"
          + (f"; {others}" if others else ""), verdict,
          rule=f"held: the 95% interval of ρ (estimate vs the window's CE change when x̂ replaces x at that one "
               f"position) lies above {above}; did not hold: below {below}; else not decided",
          source=f"{PAPER}, the selection's motivation (attribution patching); a check of the kit's, not a claim",
          figure=figure)


def claims(table: pd.DataFrame, beta_table: pd.DataFrame | None = None, effects: dict | None = None,
           first_order: dict | None = None, label: str = "g-SAE β=1", reference: str = "TopK",
           alpha: float | None = None, first_order_primary: str | None = None, notebook: str = "02_gradient_sae",
           scale: str | None = None) -> Claims:
    """Notebook 02's claims table, each row judged in the ``"topk"`` mode (what a user has) before
    the ``"gradient"`` mode.

    Args:
        table: the k sweep (`sweeps.Sweep.table`): rows with label, k, seed, mode, default, l0, fvu,
            delta_ce, dead; `label` (a g-SAE, modes topk and gradient) and `reference` (TopK).
        beta_table: the β sweep at one k, rows with normalise, beta, k, mode, delta_ce (None: skipped).
        effects: {label: steering KL per latent, reference: ...} (None: skipped).
        first_order: {name: `FirstOrder.summary()`}; `first_order_primary` names the row judged
            (default: the first) (None: skipped).
        alpha: the steering push, for the text.

    Rows (figure names are the notebook's):
        faithful downstream, TopK then gradient mode (`sweeps.decided_gap` on ΔCE);
        fewer dead latents (TopK mode; `beats_noise` on the differences, noise in points);
        reconstruction cost small (FVU ratio ≤ 1.1 at every k, beyond noise; `cost_verdict`);
        steering (one-sided Mann–Whitney both ways, p < 0.01);
        the β / normalisation sweep, TopK then gradient mode (best setting against TopK at that k);
        the first-order premise (`interval` on a window-bootstrap interval of Spearman ρ).
    """
    c = Claims(notebook, scale)
    for mode in ("topk", "gradient"):
        _faithful(c, table, label, reference, mode, "02_frontiers (ΔCE panel)")
    _dead(c, table, label, reference, "topk", "02_frontiers (dead panel)")
    _mse_cost(c, table, label, reference, "topk", "02_frontiers (FVU panel)")
    if effects is not None:
        _steering(c, effects, label, reference, alpha, "02_steering")
    if beta_table is not None:
        for mode in ("topk", "gradient"):
            _beta_sweep(c, beta_table, table, label, reference, mode, "02_beta")
    if first_order:
        _premise(c, first_order, first_order_primary or next(iter(first_order)), "02_first_order")
    return c
