"""Gradient SAE, g-SAE (Olmo et al. 2024, "Features that Make a Difference: Leveraging Gradients
for Improved Dictionary Learning", arXiv 2411.10397).

A TopK SAE whose *selection* also looks downstream: latent i's score is

    z_i + β · z_i · |d_i · ĝ|,

where d_i is latent i's unit-norm decoder row and g = ∂(next-token CE)/∂x at the SAE's site. The
product z_i (d_i · g) is attribution patching's first-order estimate of how much the loss would
change if latent i were removed, so the rule prefers latents that both fire and matter. The *kept
values* stay the plain activations z_i: gradients change which latents are kept, nothing else.
β = 0 is TopK exactly. Training otherwise follows TopK (AuxK, unit-norm decoder, tied init).

No public code exists; these are the kit's choices (docs/methods.md §3.1):
- g is normalised per token, ĝ = g / mean_j |d_j · g| over the dictionary, so the factor
  |d_i · ĝ| averages 1 for every token and β is unitless;
- g comes from the store (one backward pass per token at harvest, since it does not depend on
  the SAE); it is the gradient of the *summed* next-token CE of the window.
At inference a user rarely has g (it needs labels and a backward pass), so the g-SAE has two
modes: ``"topk"`` (plain TopK on the g-SAE's weights; the default, what a user would have) and
``"gradient"`` (needs g; ``with sae.using("gradient"): sae.encode(x, g)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validate import real
from .base import Selection
from .topk import TopKConfig, TopKSAE


@dataclass
class GradientConfig(TopKConfig):
    beta: float = 1.0  # weight of the gradient term in the selection score (0 = TopK)

    def __post_init__(self):
        super().__post_init__()
        self.beta = real("beta", self.beta, min=0)


class GradientSAE(TopKSAE):
    """TopK with gradient-informed selection. Modes: ``"topk"`` (default: plain TopK on these
    weights, what a user has at inference) and ``"gradient"`` (needs g for every token)."""

    architecture = "gsae"
    config_class = GradientConfig
    modes = ("topk", "gradient")
    grad_modes = frozenset({"gradient"})
    saelens_architecture = "topk"  # what a user gets at inference: plain TopK on these weights

    def select(self, pre, g=None, k=None):
        use_g = self.training or self.mode == "gradient"
        if use_g and g is None:
            raise ValueError("g-SAE selection needs the gradient g of each token: train on a store "
                             "harvested with with_grads=True (train(..., grads=True)), or encode in the "
                             "'topk' mode (the default; `with sae.using('topk'):`)")
        if not use_g or self.cfg.beta == 0:
            return super().select(pre, k=k)
        k = self._budget(k)
        idx = self.selection_score(pre, g).topk(k, dim=-1).indices
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
        return Selection(rows, idx.reshape(-1))

    @torch.no_grad()
    def selection_score(self, pre: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """z + β·z·|W_dec ĝ| with ĝ normalised so the factor averages 1 per token."""
        z = pre.clamp_min(0)
        a = (g.to(pre.dtype) @ self.W_dec.t()).abs()  # [B, d_sae]: |d_i · g|
        a = a / a.mean(1, keepdim=True).clamp_min(1e-12)
        return z * (1 + self.cfg.beta * a)


def gradient_sae(d_in: int, d_sae: int, k: int, beta: float = 1.0, seed: int = 0, device=None, **cfg) -> GradientSAE:
    """Shorthand: ``gradient_sae(576, 4608, 32, beta=1.0)``."""
    return GradientSAE(GradientConfig(d_in=d_in, d_sae=d_sae, k=k, beta=beta, **cfg), seed=seed, device=device)
