"""BatchTopK SAE (Bussmann, Leask, Nanda 2024, "BatchTopK Sparse Autoencoders", arXiv 2412.06410).

The worked example of docs/architecture.md: a whole new dictionary in one file. Training keeps the
k·B largest ReLU'd pre-activations of the batch (tokens share one budget); inference keeps every
pre-activation above one global threshold θ, the running average (β = 0.999) of the smallest value
kept in each training batch, as in dictionary_learning's BatchTopK trainer. The kit's Mutual Choice
SAE (`choice.py`) is the same training rule with a faster cut-off search and a θ that follows the
cut-off with β = 0.9.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validate import real
from .base import SAE, SAEConfig, Selection, mask_pairs


@dataclass
class BatchTopKConfig(SAEConfig):
    k: int = 32  # average latents per token: the batch keeps its k·B largest activations
    threshold_beta: float = 0.999  # running-average weight of the inference threshold

    def __post_init__(self):
        super().__post_init__()
        self.threshold_beta = real("threshold_beta", self.threshold_beta, min=0, max=1)


class BatchTopKSAE(SAE):
    architecture = "batchtopk"
    config_class = BatchTopKConfig
    modes = ("threshold", "batch")  # one token at a time with θ, or the batch rule
    budget = "average latents per token over the batch (batch mode)"
    saelens_architecture = "jumprelu"

    def __init__(self, cfg: BatchTopKConfig, seed: int = 0, device=None, dtype=torch.float32):
        super().__init__(cfg, seed=seed, device=device, dtype=dtype)
        self.register_buffer("threshold", torch.full((), -1.0, device=device))  # < 0: not learned yet

    def select(self, pre, g=None, k=None):
        if self.training or self.mode == "batch":
            top = pre.clamp_min(0).flatten().topk(self._budget(k) * pre.shape[0])
            positive = top.values > 0
            flat = top.indices[positive].sort().values  # row-major order: rows come out sorted
            cutoff = top.values[positive].min() if bool(positive.any()) else pre.new_zeros(())
            return Selection(flat // pre.shape[1], flat % pre.shape[1], cutoff)
        if k is not None or float(self.threshold) < 0:
            raise ValueError("threshold mode takes no budget and needs a trained threshold; encode in batch "
                             "mode instead: with sae.using('batch'): ...")
        rows, cols = mask_pairs(pre > self.threshold)
        return Selection(rows, cols)

    def after_step(self, pre, code):
        if float(self.threshold) < 0:
            self.threshold.copy_(code.cutoff)
        else:
            b = self.cfg.threshold_beta
            self.threshold.mul_(b).add_((1 - b) * code.cutoff)

    def fold_thresholds(self, s: float) -> None:
        self.threshold.div_(s)  # (a negative "not learned yet" stays negative)

    def saelens_tensors(self):
        return {"threshold": self.threshold.clamp_min(0).expand(self.cfg.d_sae).clone()}


def batch_topk_sae(d_in: int, d_sae: int, k: int, seed: int = 0, device=None, **cfg) -> BatchTopKSAE:
    """Shorthand: ``batch_topk_sae(576, 4608, 32)``."""
    return BatchTopKSAE(BatchTopKConfig(d_in=d_in, d_sae=d_sae, k=k, **cfg), seed=seed, device=device)
