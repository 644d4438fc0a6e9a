"""TopK SAE with AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders", arXiv 2406.04093).

Implements: TopK activation (top-k pre-activations, ReLU after the top-k), tied initialisation
(W_enc = W_decᵀ), unit-norm decoder rows with the gradient's parallel component removed, geometric-
median ``b_dec``, and AuxK: the top ``k_aux`` pre-activations among *dead* latents reconstruct the
detached residual, weighted 1/32. The main loss is the FVU (MSE over the variance of the batch),
which is Gao et al.'s normalised MSE. The shared parts live in `base.SAE`; TopK adds its `select`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .base import SAE, SAEConfig, Selection, row_topk


@dataclass
class TopKConfig(SAEConfig):
    k: int = 32  # latents kept per token


class TopKSAE(SAE):
    """Each token keeps its own k largest pre-activations. ``aux_coef=0`` turns AuxK off."""

    architecture = "topk"
    config_class = TopKConfig
    modes = ("topk",)
    budget = "latents kept per token"
    saelens_architecture = "topk"

    def select(self, pre, g=None, k=None):
        k = self._budget(k)
        idx = row_topk(pre, k)[1]  # [B, k], as pre.topk(k) has them
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
        return Selection(rows, idx.reshape(-1))

    def saelens_cfg(self) -> dict:
        return {"k": self.cfg.k}


def topk_sae(d_in: int, d_sae: int, k: int, seed: int = 0, device=None, **cfg) -> TopKSAE:
    """Shorthand: ``topk_sae(576, 4608, 32)``; other `TopKConfig` fields as keywords."""
    return TopKSAE(TopKConfig(d_in=d_in, d_sae=d_sae, k=k, **cfg), seed=seed, device=device)
