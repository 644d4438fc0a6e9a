"""Gradient SAE, g-SAE (Olmo et al. 2024, "Features that Make a Difference: Leveraging Gradients
for Improved Dictionary Learning", arXiv 2411.10397).

A TopK SAE whose *selection* also looks downstream: latent i's score is

    z_i + β · z_i · |d_i · ĝ|,

where d_i is latent i's unit-norm decoder row and g = ∂(next-token CE)/∂x at the SAE's site. The
product z_i (d_i · g) is attribution patching's first-order estimate of how much the loss would
change if latent i were removed, so the rule prefers latents that both fire and matter. The *kept
values* stay the plain activations z_i: gradients change which latents are kept, nothing else.
β = 0 is TopK exactly. Training otherwise follows TopK (AuxK, unit-norm decoder, tied init).

No public code exists; these are the kit's choices (METHODS §3.1, [recon]):
- g is normalised per token, ĝ = g / mean_j |d_j · g| over the dictionary, so the factor
  |d_i · ĝ| averages 1 for every token and β is unitless;
- g comes from the store (one backward pass per token at harvest, since it does not depend on
  the SAE); it is the gradient of the *summed* next-token CE of the window.
At inference a user rarely has g (it needs labels and a backward pass), so `sae.inference` picks
``"gradient"`` (needs g) or ``"topk"`` (plain TopK on the g-SAE's weights; the default, what a
user would have).
"""

from __future__ import annotations

import torch

from .base import SAE, SAEConfig


class GradientSAE(SAE):
    """TopK with gradient-informed selection; ``extra={"beta": 1.0}``."""

    saelens_architecture = "topk"  # what a user gets at inference: plain TopK on these weights

    def __init__(self, cfg: SAEConfig, seed: int = 0, device=None, dtype=torch.float32):
        cfg.extra = {"beta": 1.0, **cfg.extra}
        if cfg.extra["beta"] < 0:
            raise ValueError(f"beta must be ≥ 0, got {cfg.extra['beta']}")
        super().__init__(cfg, seed=seed, device=device, dtype=dtype)
        self.inference = "topk"

    def select(self, pre, g=None):
        use_g = self.training or self.inference == "gradient"
        if use_g and g is None:
            raise ValueError("g-SAE selection needs the gradient g of each token: train on a store "
                             "harvested with with_grads=True (train(..., grads=True)), or set "
                             "sae.inference = 'topk'")
        if not use_g or self.cfg.extra["beta"] == 0:
            return super().select(pre)
        score = self.selection_score(pre, g)
        idx = score.topk(self.cfg.k, dim=-1).indices
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(self.cfg.k)
        return rows, idx.reshape(-1)

    @torch.no_grad()
    def selection_score(self, pre: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """z + β·z·|W_dec ĝ| with ĝ normalised so the factor averages 1 per token."""
        z = pre.clamp_min(0)
        a = (g.to(pre.dtype) @ self.W_dec.t()).abs()  # [B, d_sae]: |d_i · g|
        a = a / a.mean(1, keepdim=True).clamp_min(1e-12)
        return z * (1 + self.cfg.extra["beta"] * a)


def gradient_sae(d_in: int, d_sae: int, k: int, beta: float = 1.0, seed: int = 0, device=None, **cfg) -> GradientSAE:
    """Shorthand: ``gradient_sae(576, 4608, 32, beta=1.0)``."""
    extra = {**cfg.pop("extra", {}), "beta": beta}
    return GradientSAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, architecture="gsae", extra=extra, **cfg),
                       seed=seed, device=device)
