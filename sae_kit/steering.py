"""Steering measures: how much does adding a latent's decoder direction move the model's output?

`steering_effects` adds α·d_i (d_i unit-norm, so α is the push's norm) at the SAE's layer, at every
stored position of random eval contexts, and reports KL(clean ‖ steered) of the next-token
distribution per latent. At a fixed α this is an "effect per unit norm" (Olmo et al. 2024 compare
how effectively g-SAE and TopK latents steer in arbitrary contexts; their exact measure is not
public, so this proxy is the kit's choice).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .config import bars_off

from .metrics import Splicer


@torch.no_grad()
def steering_effects(splicer: Splicer, sae, latents, alpha: float, progress: bool = True) -> torch.Tensor:
    """KL(clean ‖ steered) for each latent in `latents` when α·d_i is added at the layer.

    Args:
        splicer: a `Splicer` on the store the SAE was trained on (its eval windows are the contexts).
        sae: the dictionary whose decoder rows are the directions.
        latents: latent indices.
        alpha: norm of the push (same for every latent, so effects compare per unit norm).

    Returns:
        Tensor [len(latents)] of KL values (nats/token).
    """
    out = []
    for i in tqdm(list(latents), desc="steering", disable=bars_off(progress), leave=False):
        d = sae.W_dec[i].detach()
        out.append(splicer(replace=lambda a, d=d: a + alpha * d.to(a.device, a.dtype))["kl"])
    return torch.tensor(out)


def alive_latents(density: torch.Tensor, n: int, seed: int = 0, min_density: float = 1e-4) -> list[int]:
    """`n` random latents with density ≥ `min_density` (a fair sample to compare dictionaries on)."""
    alive = torch.nonzero(density >= min_density).flatten()
    pick = torch.randperm(len(alive), generator=torch.Generator().manual_seed(seed))[:n]
    return alive[pick].tolist()
