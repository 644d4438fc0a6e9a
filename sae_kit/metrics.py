"""Standard SAE metrics, exactly as docs/methods.md §7 defines them: functions of tensors and of a
dictionary, no model. FVU, per-token nMSE, L0, density, dead / dense fractions; reconstruction at
another budget than the trained one (`fvu_by_budget`); the decoder's geometry (`coherence`).

What needs the language model (ΔCE, CE recovered, KL when the reconstruction is spliced in) is in
`splice`, one layer up.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .saes.base import fvu_loss


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Fraction of variance unexplained: Σ_t‖x_t − x̂_t‖² / Σ_t‖x_t − x̄‖² (Gao's normalised MSE).

    The same function the SAEs train on (`saes.base.fvu_loss`), computed in float64 and returned as a float."""
    return float(fvu_loss(x.double(), x_hat.double()))


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


def _device_batches(sae, x: torch.Tensor, batch_size: int, g: torch.Tensor | None = None):
    """(x, g) in batches of `batch_size` rows, on the dictionary's device (g None when not given)."""
    for i in range(0, len(x), batch_size):
        yield x[i:i + batch_size].to(sae.device), (g[i:i + batch_size].to(sae.device) if g is not None else None)


@torch.no_grad()
def forward_batched(sae, x: torch.Tensor, batch_size: int = 4096, g: torch.Tensor | None = None):
    """``sae(x)`` = (x_hat, z) for many tokens, in batches (inference mode)."""
    xs, zs = [], []
    for xi, gi in _device_batches(sae, x, batch_size, g):
        x_hat, z = sae(xi, gi)
        xs.append(x_hat.cpu())
        zs.append(z.to_sparse().cpu() if z.shape[1] > 8192 else z.cpu())  # on the host, whatever the device
    z = torch.cat([t.to_dense() if t.is_sparse else t for t in zs])
    return torch.cat(xs), z


def reconstruction_metrics(sae, x: torch.Tensor, g: torch.Tensor | None = None, batch_size: int = 4096) -> dict:
    """FVU, nMSE, L0, dead % and dense % of `sae` on activations `x` (eval split).

    `batch_size` matters only for batch-dependent rules (Mutual / Feature Choice in batch mode)."""
    x_hat, per_token, fired = _stream_counts(sae, x, batch_size, g)
    dens = fired.float() / len(x)  # = feature_density(z) over all tokens, without holding z
    return {"fvu": fvu(x, x_hat), "nmse": nmse(x, x_hat), "l0": float(per_token.float().mean()),
            "dead": dead_fraction(dens), "dense": dense_fraction(dens), "density": dens}


@torch.no_grad()
def _stream_counts(sae, x: torch.Tensor, batch_size: int, g: torch.Tensor | None = None, decode: bool = True):
    """`forward_batched`'s x̂, with z reduced batch by batch to what the metrics read: non-zero
    latents per token [N] and tokens on which each latent is active (z > 0) [d_sae]. A dense z of
    all tokens (N × d_sae: 1.8 GB for 100k tokens of a 4608-wide SAE) is never built.
    ``decode=False``: the encoder alone, and None for x̂."""
    if len(x) == 0:
        raise ValueError("no tokens to evaluate: x is empty (is the store's eval split empty?)")
    xs, per_token, fired = [], [], None
    for xi, gi in _device_batches(sae, x, batch_size, g):
        if decode:
            x_hat, nonzero, counts = sae.forward_counts(xi, gi)
            xs.append(x_hat.cpu())
        else:
            nonzero, counts = sae.encode_sparse(xi, gi).counts()
        per_token.append(nonzero.cpu())
        fired = counts.cpu() if fired is None else fired + counts.cpu()
    return torch.cat(xs) if decode else None, torch.cat(per_token), fired


def latent_density(sae, x: torch.Tensor, g: torch.Tensor | None = None, batch_size: int = 4096) -> torch.Tensor:
    """Fraction of the tokens of x on which each latent is active (z > 0), [d_sae]: the ``density``
    of `reconstruction_metrics`, the same numbers, from the encoder alone (no decoding, no FVU over
    all of x: 82k layer-8 tokens through a 4608-wide TopK SAE on 2 CPU cores, 2.5 s instead of 3.9)."""
    return _stream_counts(sae, x, batch_size, g, decode=False)[2].float() / len(x)


@torch.no_grad()
def fvu_by_budget(sae, x: torch.Tensor, budgets: list[int], batch_size: int = 4096) -> list[float]:
    """FVU of `sae` on x when inference runs at each budget `k` in `budgets` (``sae.reconstruct(x, k=k)``:
    k latents per token for TopK, k steps for matching pursuit)."""
    out = []
    for k in budgets:
        x_hat = torch.cat([sae.reconstruct(xi, k=k).cpu() for xi, _ in _device_batches(sae, x, batch_size)])
        out.append(fvu(x, x_hat))
    return out


@torch.no_grad()
def coherence(W_dec: torch.Tensor, chunk: int = 4096) -> dict:
    """How far atoms are from orthogonal: for each atom its largest |cos| with any other atom.

    Returns ``{"mean_max": ..., "max_cos": tensor [d_sae]}``; a random unit-norm dictionary of the
    same shape is the natural reference (`random_coherence`)."""
    W = F.normalize(W_dec.detach().float(), dim=1)
    best = []
    for i in range(0, len(W), chunk):
        c = (W[i:i + chunk] @ W.t()).abs()
        c[torch.arange(len(c)), torch.arange(i, i + len(c))] = 0
        best.append(c.max(1).values)
    m = torch.cat(best).cpu()
    return {"mean_max": float(m.mean()), "max_cos": m}


def random_coherence(d_sae: int, d_in: int, seed: int = 0) -> float:
    """`coherence` of random Gaussian atoms of the same shape (the quasi-orthogonal baseline)."""
    gen = torch.Generator().manual_seed(seed)
    return coherence(torch.randn(d_sae, d_in, generator=gen))["mean_max"]


@torch.no_grad()
def variance_concentration(x: torch.Tensor, top=(0.001, 0.01, 0.1), dims: int = 5) -> dict:
    """Where the variance that FVU divides by lives: the share of Σ_t ‖x_t − x̄‖² held by the top
    fraction of tokens (ranked by their own ‖x_t − x̄‖²) and by the `dims` largest dimensions.

    Returns:
        dict with ``tokens`` {fraction: share}, ``dims`` (share of the top `dims` dimensions),
        ``order`` (token indices, largest contribution first) and ``curve`` (cumulative share, in
        that order) for plotting.
    """
    c = (x.double() - x.double().mean(0)).pow(2)
    per_token, per_dim = c.sum(1), c.sum(0)
    total = float(per_token.sum())
    order = per_token.argsort(descending=True)
    curve = per_token[order].cumsum(0) / total
    n = len(x)
    shares = {q: float(curve[max(1, int(round(q * n))) - 1]) for q in top}
    return {"tokens": shares, "dims": float(per_dim.topk(min(dims, x.shape[1])).values.sum() / total),
            "order": order, "curve": curve.float()}
