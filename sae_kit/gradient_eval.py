"""Evaluation for notebook 02 (g-SAE vs TopK): every metric in both inference modes.

A g-SAE can select latents with the eval tokens' gradients (``inference="gradient"``, which needs
labels and a backward pass) or without (``"topk"``, what a user has at inference). TopK SAEs have
one mode; their numbers are copied to both columns so tables and plots line up.
"""

from __future__ import annotations

import torch

from .metrics import Splicer, reconstruction_metrics


def evaluate_modes(sae, x: torch.Tensor, g: torch.Tensor, splicer: Splicer | None = None) -> dict:
    """FVU, L0, dead %, ΔCE and KL; plain keys for ``topk`` mode, ``*_grad`` for gradient mode."""
    modes = ["topk", "gradient"] if hasattr(sae, "inference") else ["topk"]
    out = {}
    for mode in modes:
        if hasattr(sae, "inference"):
            sae.inference = mode
        m = reconstruction_metrics(sae, x, g if mode == "gradient" else None)
        m.pop("density")
        if splicer is not None:
            s = splicer(sae, g=g if mode == "gradient" else None)
            m.update(delta_ce=s["delta_ce"], kl=s["kl"], ce_recovered=s["ce_recovered"])
        out.update({(key if mode == "topk" else f"{key}_grad"): v for key, v in m.items()})
    if hasattr(sae, "inference"):
        sae.inference = "topk"
    else:
        out.update({f"{key}_grad": v for key, v in list(out.items())})
    return out
