"""Evaluation for notebook 02 (g-SAE vs TopK): every metric in both inference modes.

A g-SAE can select latents with the eval tokens' gradients (its ``"gradient"`` mode, which needs
labels and a backward pass) or without (``"topk"``, what a user has at inference). Results are one
row per (SAE, mode); a TopK SAE has the one mode ``"topk"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Scale, scale_name
from .metrics import reconstruction_metrics
from .splice import Splicer
from .sweeps import each_mode


@dataclass(frozen=True)
class Sizes:
    """Notebook 02's store and training sizes at one scale (`sizes`)."""

    grad_tokens: int  # training tokens harvested with ∂CE/∂x (~140 tok/s on 2 cores)
    grad_eval_tokens: int  # held-out tokens of that store
    grad_epochs: int  # passes over the (smaller) gradient store


_SIZES = {"ci": Sizes(8_192, 2_048, 4), "lab": Sizes(49_152, 10_240, 4), "paper": Sizes(360_000, 40_960, 8)}


def sizes(scale: Scale | str | None = None) -> Sizes:
    """Notebook 02's sizes at `scale` (a `Scale`, its name, or None for ``SAE_KIT_SCALE``)."""
    return _SIZES[scale_name(scale)]


def evaluate_modes(sae, x: torch.Tensor, g: torch.Tensor, splicer: Splicer | None = None) -> list[dict]:
    """FVU, L0, dead %, ΔCE and KL, one row per inference mode of `sae` (a g-SAE: ``topk`` and
    ``gradient``, which gets the eval tokens' gradients; TopK: ``topk``)."""

    def metrics(mode: str) -> dict:
        gm = g if mode in sae.grad_modes else None
        m = reconstruction_metrics(sae, x, gm)
        m.pop("density")
        if splicer is not None:
            s = splicer(sae, g=gm)
            m.update(delta_ce=s["delta_ce"], kl=s["kl"], ce_recovered=s["ce_recovered"])
        return m

    return each_mode(sae, metrics)
