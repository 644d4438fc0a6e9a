"""TopK SAE with AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093).

Implements: TopK activation (top-k pre-activations, ReLU after the top-k), tied initialisation
(W_enc = W_decᵀ), unit-norm decoder rows with the gradient's parallel component removed, geometric-
median ``b_dec``, and AuxK: the top ``k_aux`` pre-activations among *dead* latents reconstruct the
detached residual, weighted 1/32. The main loss is the FVU (MSE over the variance of the batch),
which is Gao et al.'s normalised MSE. All of that lives in `base.SAE`; TopK is its default `select`.
"""

from __future__ import annotations

from .base import SAE, SAEConfig


class TopKSAE(SAE):
    """Each token keeps its own k largest pre-activations. ``aux_coef=0`` turns AuxK off."""

    saelens_architecture = "topk"


def topk_sae(d_in: int, d_sae: int, k: int, seed: int = 0, device=None, **cfg) -> TopKSAE:
    """Shorthand: ``topk_sae(576, 4608, 32)``."""
    return TopKSAE(SAEConfig(d_in=d_in, d_sae=d_sae, k=k, architecture="topk", **cfg), seed=seed, device=device)
