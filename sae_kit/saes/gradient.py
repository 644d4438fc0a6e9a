"""Gradient SAE, g-SAE (Olmo et al. 2024, "Features that Make a Difference: Leveraging Gradients
for Improved Dictionary Learning", arXiv 2411.10397).

A TopK SAE whose *selection* also looks downstream: latent i's score is

    z_i + β · z_i · a_i,    a_i = |d_i · g| / s,

where d_i is latent i's unit-norm decoder row, g = ∂(next-token CE)/∂x at the SAE's site and s a
scale set by ``normalise``. The product z_i (d_i · g) is attribution patching's first-order estimate
of how much the loss would change if latent i were removed, so the rule prefers latents that both
fire and matter. The *kept values* stay the plain activations z_i: gradients change which latents
are kept, nothing else. β = 0 is TopK exactly. Training otherwise follows TopK (AuxK, unit-norm
decoder, tied init).

No public code exists; the paper's summary gives the term β z ∘ |W_decᵀ ∇_x L| with no scaling of
the gradient. The scale s is the kit's choice (``GradientConfig.normalise``, saved with the SAE):

- ``"token"`` (default, the kit's spec, docs/methods.md §3.1): s = mean_j |d_j · g| over the
  dictionary, per token. a averages 1 on every token, so β is unitless, and a token whose loss
  barely depends on x gets the same push as a high-loss token: only g's *direction* counts.
- ``"batch"``: s = the mean of |d_j · g| over the whole batch (tokens and latents). β is unitless
  and tokens keep their relative gradient sizes: a token with a 10× larger gradient gets a 10×
  larger push. In the ``"gradient"`` mode at inference the scale is that of the batch `encode` is
  given, so a token's selection depends a little on the other tokens of its batch.
- ``"raw"``: s = 1, the paper's formula as written. β then has units (1 / the gradient's size):
  with the kit's g (CE *summed* over a 64-token window) |d_i · g| is about 0.01 on SmolLM2's
  layer 8, so β = 1 is a very small push; a loss averaged over the batch would shrink it further.

g comes from the store (one backward pass per token at harvest, since it does not depend on the
SAE); it is the gradient of the *summed* next-token CE of the window.
At inference a user rarely has g (it needs labels and a backward pass), so the g-SAE has two
modes: ``"topk"`` (plain TopK on the g-SAE's weights; the default, what a user would have) and
``"gradient"`` (needs g; ``with sae.using("gradient"): sae.encode(x, g)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..validate import real
from .base import Selection, row_topk, training_buffer
from .topk import TopKConfig, TopKSAE

NORMALISATIONS = ("token", "batch", "raw")  # how |d_i · g| is scaled before β (see the module doc)


@dataclass
class GradientConfig(TopKConfig):
    beta: float = 1.0  # weight of the gradient term in the selection score (0 = TopK)
    normalise: str = "token"  # scale of |d_i·g|: "token" (mean 1 per token), "batch" (mean 1 per batch), "raw"

    def __post_init__(self):
        super().__post_init__()
        self.beta = real("beta", self.beta, min=0)
        if self.normalise not in NORMALISATIONS:
            raise ValueError(f"normalise must be one of {', '.join(map(repr, NORMALISATIONS))}, got "
                             f"{self.normalise!r}: 'token' scales |d_i·g| to mean 1 on each token, 'batch' to "
                             f"mean 1 over the batch, 'raw' leaves the gradient as it is (the paper's formula)")


@torch.no_grad()
def gradient_factor(g: torch.Tensor, W_dec: torch.Tensor, normalise: str = "token",
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """a [B, n] = |d_i · g| for atoms `W_dec` [n, d] and gradients `g` [B, d], scaled by `normalise`:
    ``"token"`` divides each row by its mean (a averages 1 on every token), ``"batch"`` divides by
    the mean over the whole batch (a averages 1 over the batch; tokens keep their relative sizes),
    ``"raw"`` leaves it as it is. `out`: a [B, n] tensor to compute it in (a training buffer)."""
    if normalise not in NORMALISATIONS:
        raise ValueError(f"normalise must be one of {', '.join(map(repr, NORMALISATIONS))}, got {normalise!r}")
    a = torch.mm(g.to(W_dec.dtype), W_dec.t(), out=out).abs_()  # in place from here: B × n temporaries are the cost
    if normalise == "token":
        return a.div_(a.mean(1, keepdim=True).clamp_min(1e-12))
    if normalise == "batch":
        return a.div_(a.mean().clamp_min(1e-12))
    return a


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
        idx = row_topk(self.selection_score(pre, g), k)[1]
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
        return Selection(rows, idx.reshape(-1))

    @property
    def folds_input_scale(self) -> bool:
        """Whether an SAE trained on s·x (with g/s) can be folded to read x (`SAE.fold_input_scale`):
        yes for the token and batch normalisations, whose factor a is scale-free, so the selection
        commutes with s; not for ``"raw"``, whose gradient term shrinks by 1/s."""
        return self.cfg.normalise != "raw"

    def gradient_factor(self, g: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """a [B, d_sae] = |d_i · g| scaled as ``cfg.normalise`` says (`gradient_factor`)."""
        return gradient_factor(g, self.W_dec, self.cfg.normalise, out)

    @torch.no_grad()
    def selection_score(self, pre: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """z + β·z·a with a = `gradient_factor` (|d_i · g|, scaled as ``cfg.normalise`` says). In a
        training step on CPU its two B × d_sae temporaries are `training_buffer`s (valid until the
        next step): fresh ones cost ~30 ms of page faults per step at batch 4096."""
        a = relu = None
        if self.training and pre.device.type == "cpu" and self.W_dec.dtype == pre.dtype:
            a = training_buffer("gsae_factor", pre.shape, pre.dtype, pre.device)
            relu = training_buffer("gsae_relu", pre.shape, pre.dtype, pre.device)
        a = self.gradient_factor(g, a).to(pre.dtype)  # ours (fresh or the buffer): updated in place
        return a.mul_(self.cfg.beta).add_(1).mul_(torch.clamp_min(pre, 0, out=relu))


def gradient_sae(d_in: int, d_sae: int, k: int, beta: float = 1.0, seed: int = 0, device=None,
                 normalise: str = "token", **cfg) -> GradientSAE:
    """Shorthand: ``gradient_sae(576, 4608, 32, beta=1.0)``; ``normalise="batch"`` or ``"raw"`` for
    the other scalings of the gradient term (`GradientConfig`)."""
    return GradientSAE(GradientConfig(d_in=d_in, d_sae=d_sae, k=k, beta=beta, normalise=normalise, **cfg),
                       seed=seed, device=device)
