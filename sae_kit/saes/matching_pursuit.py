"""Matching-Pursuit SAE (Costa, Fel, Lubana, Tolooshams, Ba 2025, "From Flat to Hierarchical:
Extracting Sparse Representations with Matching Pursuit", arXiv 2506.03093).

The encoder is not one linear map but `k` unrolled steps of non-negative matching pursuit over the
decoder's own unit-norm atoms (the SAE is tied, ``W_enc = W_decᵀ``, as in SAELens)::

    r = x − b_dec;  z = 0
    repeat k times:  j = argmax_i ReLU(⟨r, d_i⟩);  a = ReLU(⟨r, d_j⟩);  z_j += a;  r −= a·d_j
    x̂ = b_dec + Σ z_j d_j  (= x − r)

After each step the residual is orthogonal to the atom just used (``⟨r, d_j⟩ = 0``) and its norm
drops by exactly ``a``: ``‖r_t‖² = ‖r_{t−1}‖² − a²``. So the error can only fall as steps are added,
and inference may run more steps than training did, or run until ``‖r‖`` falls below a threshold.

CPU speed comes from the Gram trick: the correlations ``c = D r`` are computed once, then updated
with ``c −= a·G[j]`` (``G = D Dᵀ``), so a step costs B×d_sae instead of B×d_in×d_sae. Only the
atom choice uses that path (no gradient, as in SAELens); the values and residuals are then
recomputed along the chosen atoms with autograd, which costs k·B·d_in.

Atom dropout (the authors' remedy for dead atoms): for the first ``dropout_tokens`` training
tokens, each pursuit step may only pick from a random ``1 − dropout`` share of the atoms.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SAE, SAEConfig, SparseCode, _check_input, fvu, sparse_decode


class MatchingPursuitSAE(SAE):
    """Tied dictionary encoded by non-negative matching pursuit. ``cfg.k`` = training steps.

    Knobs in ``cfg.extra``: ``dropout`` (share of atoms hidden per step early in training, default
    0.75), ``dropout_tokens`` (how many training tokens dropout lasts, default 0 = off),
    ``residual_threshold`` (inference stops for a token once ‖r‖ falls below it; 0 = fixed steps).
    """

    saelens_architecture = "matching_pursuit"

    def __init__(self, cfg: SAEConfig, seed: int = 0, device=None, dtype=torch.float32):
        super().__init__(cfg, seed=seed, device=device, dtype=dtype)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long, device=device))
        self._gen = torch.Generator().manual_seed(seed + 1)
        self._gram = None  # (W_dec version, G) cached for inference

    @property
    def W_enc(self) -> torch.Tensor:
        return self.W_dec.t()

    def __setattr__(self, name, value):
        if name in ("W_enc", "b_enc"):  # tied and bias-free: the base class's encoder is not built
            return
        super().__setattr__(name, value)

    # ---- the pursuit -------------------------------------------------------------------------
    def gram(self) -> torch.Tensor:
        """G = D Dᵀ, cached between calls while the decoder is unchanged (not in training)."""
        W = self.W_dec.detach()
        if self.training:
            return W @ W.t()
        key = (W.data_ptr(), self.W_dec._version)
        if self._gram is None or self._gram[0] != key:
            self._gram = (key, W @ W.t())
        return self._gram[1]

    @torch.no_grad()
    def choose(self, r0: torch.Tensor, steps: int, threshold: float = 0.0, dropout: float = 0.0):
        """Atom indices [B, steps] and values [B, steps] of `steps` pursuit steps (no gradient).

        A token stops (value 0 from then on) once its residual norm falls below `threshold`
        after a step, as SAELens does. With `dropout`, each step hides a random share of atoms."""
        D = self.W_dec.detach()
        G = self.gram()
        c = r0 @ D.t()  # [B, d_sae] correlations with the residual
        norm2 = r0.pow(2).sum(1)
        B, n = c.shape
        idx = torch.empty(B, steps, dtype=torch.long, device=c.device)
        vals = torch.zeros(B, steps, dtype=c.dtype, device=c.device)
        active = torch.ones(B, dtype=torch.bool, device=c.device)
        for t in range(steps):
            cm = c
            if dropout > 0:
                hidden = (torch.rand(n, generator=self._gen) < dropout).to(c.device)
                cm = c.masked_fill(hidden, float("-inf"))
            v, j = cm.max(1)
            v = v.clamp_min(0) * active
            idx[:, t], vals[:, t] = j, v
            c -= v[:, None] * G[j]
            if threshold > 0:
                norm2 = norm2 - v * v
                active &= norm2.clamp_min(0).sqrt() >= threshold
                if not active.any():
                    idx, vals = idx[:, :t + 1], vals[:, :t + 1]
                    break
        return idx, vals

    def pursue(self, x: torch.Tensor, steps: int | None = None, threshold: float | None = None) -> SparseCode:
        """Run the pursuit on x [B, d_in]; the values carry gradients to the atoms and b_dec."""
        x = _check_input(x, self.cfg.d_in, self.W_dec.dtype)
        steps = self.cfg.k if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        threshold = self.cfg.extra.get("residual_threshold", 0.0) if threshold is None else float(threshold)
        r = x - self.b_dec
        dropout = 0.0
        if self.training and int(self.tokens_seen) < self.cfg.extra.get("dropout_tokens", 0):
            dropout = self.cfg.extra.get("dropout", 0.75)
        idx, v_nograd = self.choose(r.detach(), steps, threshold, dropout)
        if torch.is_grad_enabled() and (self.W_dec.requires_grad or x.requires_grad):
            live = (v_nograd > 0).to(r.dtype)  # the steps (and tokens) the pursuit actually took
            vals = []
            for t in range(idx.shape[1]):
                d = self.W_dec[idx[:, t]]
                a = F.relu((r * d).sum(1)) * live[:, t]
                r = r - a[:, None] * d
                vals.append(a)
            vals = torch.stack(vals, 1)
        else:
            vals = v_nograd
        B, s = idx.shape
        rows = torch.arange(B, device=x.device).repeat_interleave(s)
        return SparseCode(rows, idx.reshape(-1), vals.reshape(-1), (B, self.cfg.d_sae))

    # ---- the SAE interface -------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Correlations of the first pursuit step, ⟨x − b_dec, d_i⟩."""
        return (x - self.b_dec) @ self.W_dec.t()

    def encode_sparse(self, x, g=None, steps: int | None = None, threshold: float | None = None) -> SparseCode:
        return self.pursue(x, steps, threshold)

    def encode(self, x, g=None, steps: int | None = None, threshold: float | None = None) -> torch.Tensor:
        return self.pursue(x, steps, threshold).dense()

    def forward(self, x, g=None, steps: int | None = None, threshold: float | None = None):
        code = self.pursue(x, steps, threshold)
        return self._decode_code(code), code.dense()

    def reconstruct(self, x, g=None, steps: int | None = None, threshold: float | None = None):
        return self._decode_code(self.pursue(x, steps, threshold))

    def _decode_code(self, code: SparseCode) -> torch.Tensor:
        return sparse_decode(code, self.W_dec) + self.b_dec

    def loss(self, x: torch.Tensor, g: torch.Tensor | None = None) -> dict:
        """FVU of the k-step reconstruction (no sparsity penalty: k sets it)."""
        code = self.pursue(x)
        x_hat = self._decode_code(code)
        main = fvu(x, x_hat)
        out = {"loss": main, "fvu": main.detach(), "aux": torch.zeros(()),
               "l0": code.l0_per_token().float().mean()}
        if self.training:
            self.track_firing(code)
            self.tokens_seen += x.shape[0]
            out["dead"] = self.dead_mask().float().mean()
        return out

    def saelens_cfg(self) -> dict:
        """SAELens ``matching_pursuit`` settings that reproduce this SAE's default inference."""
        return {"residual_threshold": float(self.cfg.extra.get("residual_threshold", 0.0)),
                "max_iterations": self.cfg.k, "stop_on_duplicate_support": False}


def mp_sae(d_in: int, d_sae: int, k: int, seed: int = 0, device=None, dropout: float = 0.75,
           dropout_tokens: int = 0, residual_threshold: float = 0.0, **cfg) -> MatchingPursuitSAE:
    """Shorthand: ``mp_sae(576, 4608, 32, dropout_tokens=200_000)``."""
    extra = {"dropout": dropout, "dropout_tokens": int(dropout_tokens), "residual_threshold": residual_threshold}
    extra.update(cfg.pop("extra", {}))
    return MatchingPursuitSAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, architecture="matching_pursuit",
                                        aux_coef=0.0, extra=extra, **cfg), seed=seed, device=device)


# ---- analysis helpers (any dictionary) --------------------------------------------------------
@torch.no_grad()
def residual_norms(sae: MatchingPursuitSAE, x: torch.Tensor, steps: int) -> torch.Tensor:
    """‖r_t‖ for t = 0..steps, per token, [B, steps + 1], replaying the chosen atoms exactly."""
    code = sae.pursue(x.to(sae.device), steps, threshold=0.0)
    B = x.shape[0]
    idx, vals = code.cols.view(B, steps), code.vals.view(B, steps)
    r = x.to(sae.device) - sae.b_dec
    out = [r.norm(dim=1)]
    for t in range(steps):
        r = r - vals[:, t:t + 1] * sae.W_dec[idx[:, t]]
        out.append(r.norm(dim=1))
    return torch.stack(out, 1).cpu()


@torch.no_grad()
def reconstruct_with(sae: SAE, x: torch.Tensor, latents: int) -> torch.Tensor:
    """Reconstruct x keeping `latents` latents per token: matching pursuit runs that many steps;
    any other SAE keeps its top `latents` pre-activations (a TopK at a k it was not trained for)."""
    from dataclasses import replace

    x = x.to(sae.device)
    if isinstance(sae, MatchingPursuitSAE):
        return sae.reconstruct(x, steps=latents)
    cfg = sae.cfg
    sae.cfg = replace(cfg, k=int(latents))
    try:
        return sae.reconstruct(x)
    finally:
        sae.cfg = cfg


@torch.no_grad()
def fvu_by_steps(sae: SAE, x: torch.Tensor, steps: list[int], batch_size: int = 4096) -> list[float]:
    """FVU of `sae` on x when inference keeps `s` latents per token, for each s in `steps`
    (see `reconstruct_with`)."""
    from ..metrics import fvu as fvu_metric

    return [fvu_metric(x, torch.cat([reconstruct_with(sae, x[i:i + batch_size], s).cpu()
                                     for i in range(0, len(x), batch_size)])) for s in steps]


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
