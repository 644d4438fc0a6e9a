"""Standard SAE metrics, exactly as METHODS.md §7 defines them.

Pure functions on tensors (FVU, per-token nMSE, L0, density, dead / dense fractions) plus
`splice_metrics`, which replaces the hooked activation with the reconstruction inside the real
model and measures ΔCE, CE-loss-recovered (against zero-ablation) and KL(clean ‖ spliced).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: Σ_t‖x_t − x̂_t‖² / Σ_t‖x_t − x̄‖² (Gao's normalised MSE)."""
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def nmse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Per-token normalised MSE, uncentred: mean_t ‖x_t − x̂_t‖² / ‖x_t‖² (OpenAI loss.py)."""
    return float(((x - x_hat).pow(2).sum(1) / x.pow(2).sum(1).clamp_min(1e-12)).mean())


def l0(z: torch.Tensor) -> float:
    """Mean number of non-zero latents per token."""
    return float((z != 0).float().sum(1).mean())


def feature_density(z: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens on which each latent is active (z > 0), [d_sae]."""
    return (z > 0).float().mean(0)


def dead_fraction(density: torch.Tensor) -> float:
    """Latents never active on the eval set (SAEBench's 1 − frac_alive)."""
    return float((density == 0).float().mean())


def dense_fraction(density: torch.Tensor, threshold: float = 0.1) -> float:
    """Latents active on more than `threshold` of tokens (SAEBench freq_over_10_percent)."""
    return float((density > threshold).float().mean())


@torch.no_grad()
def encode_batched(sae, x: torch.Tensor, batch_size: int = 4096, g: torch.Tensor | None = None):
    """(x_hat, z) for many tokens, in batches (inference mode)."""
    xs, zs = [], []
    for i in range(0, len(x), batch_size):
        gi = g[i:i + batch_size].to(sae.device) if g is not None else None
        x_hat, z = sae(x[i:i + batch_size].to(sae.device), gi)
        xs.append(x_hat.cpu())
        zs.append(z.to_sparse() if z.shape[1] > 8192 else z.cpu())
    z = torch.cat([t.to_dense() if t.is_sparse else t for t in zs])
    return torch.cat(xs), z


def reconstruction_metrics(sae, x: torch.Tensor, g: torch.Tensor | None = None) -> dict:
    """FVU, nMSE, L0, dead % and dense % of `sae` on activations `x` (eval split)."""
    x_hat, z = encode_batched(sae, x, g=g)
    dens = feature_density(z)
    return {"fvu": fvu(x, x_hat), "nmse": nmse(x, x_hat), "l0": l0(z),
            "dead": dead_fraction(dens), "dense": dense_fraction(dens), "density": dens}


@torch.no_grad()
def splice_metrics(model, store, sae=None, n_seqs: int = 64, batch_seqs: int = 16,
                   replace=None, progress: bool = True) -> dict:
    """Cross-entropy with the SAE's reconstruction spliced in at the store's hook.

    The eval split's windows are run through the model three ways: clean, with the activation at
    the stored positions (all but the first and last, see `activations`) replaced by the SAE's
    reconstruction, and with it zero-ablated. CE is averaged over the next-token predictions made
    from those positions.

    Args:
        model: the HookedTransformer the store was harvested from.
        store: an `ActivationStore` (its hook and eval windows are used).
        sae: the dictionary; or pass `replace`.
        n_seqs: eval windows to use.
        batch_seqs: windows per forward pass.
        replace: optional function act [B, P, d_in] -> replacement (for other splices, e.g. dark matter).

    Returns:
        dict with ce_clean, ce_spliced, ce_zero, delta_ce, ce_recovered, kl (nats/token).
    """
    spec = store.spec
    if str(getattr(model.cfg, "model_name", "")) != spec.model:
        raise ValueError(f"store was harvested from {spec.model!r}, not {model.cfg.model_name!r}")
    if replace is None and sae is None:
        raise ValueError("pass an sae or a replace function")
    if replace is None:
        def replace(a):
            flat = a.reshape(-1, spec.d_in).to(sae.device, torch.float32)
            return sae.reconstruct(flat).to(a.dtype).reshape(a.shape)
    windows = store.tokens[list(store.window_range("eval"))][:n_seqs].long()
    if len(windows) == 0:
        raise ValueError("the store has no eval windows; harvest with eval_tokens > 0")
    sl = slice(spec.skip_first, spec.ctx_len - spec.skip_last)
    tot = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "kl": 0.0}
    n = 0
    for i in tqdm(range(0, len(windows), batch_seqs), desc="splice CE", disable=not progress, leave=False):
        toks = windows[i:i + batch_seqs].to(model.cfg.device)
        targets = toks[:, sl.start + 1: sl.stop + 1]

        def run(fn=None):
            hooks = [] if fn is None else [(spec.hook, _splice_hook(fn, sl))]
            logits = model.run_with_hooks(toks, fwd_hooks=hooks)[:, sl].float()
            return torch.log_softmax(logits, -1)

        lp_clean = run()
        lp_sae = run(replace)
        lp_zero = run(torch.zeros_like)
        ce = lambda lp: float(-lp.gather(-1, targets[..., None]).sum())
        tot["clean"] += ce(lp_clean)
        tot["spliced"] += ce(lp_sae)
        tot["zero"] += ce(lp_zero)
        tot["kl"] += float((lp_clean.exp() * (lp_clean - lp_sae)).sum())
        n += targets.numel()
    c, s, z = tot["clean"] / n, tot["spliced"] / n, tot["zero"] / n
    return {"ce_clean": c, "ce_spliced": s, "ce_zero": z, "delta_ce": s - c,
            "ce_recovered": (z - s) / (z - c) if z != c else float("nan"), "kl": tot["kl"] / n}


def _splice_hook(fn, sl: slice):
    def hook(act, hook):
        shape = act.shape
        a = act.reshape(*shape[:2], -1)
        a = a.clone()
        a[:, sl] = fn(a[:, sl])
        return a.reshape(shape)
    return hook


def evaluate(sae, store, model=None, n_seqs: int = 64, progress: bool = True, grads: bool = False) -> dict:
    """Reconstruction metrics on the eval split, plus splice metrics when `model` is given."""
    if grads:
        x, g = store.get("eval", grads=True)
    else:
        x, g = store.get("eval"), None
    out = reconstruction_metrics(sae, x, g)
    if model is not None:
        out.update(splice_metrics(model, store, sae, n_seqs=n_seqs, progress=progress))
    return out
