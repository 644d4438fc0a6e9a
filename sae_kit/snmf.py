"""Semi-nonnegative matrix factorisation of MLP activations (Shafran, Geiger, Geva 2025,
"Decomposing MLP Activations into Interpretable Features via Semi-Nonnegative Matrix Factorization").

MLP activations ``A`` (neurons × tokens) are factorised as ``A ≈ F Gᵀ``: ``F`` (neurons × K) is
unconstrained — each column a *feature*, a sparse combination of co-firing neurons — and ``G``
(tokens × K) is non-negative — how much each token uses each feature. Because ``G`` is tied to the
tokens, every feature comes with the inputs that build it (its top tokens), and because ``F``
lives in neuron space, ``W_out F_j`` is the feature's write to the residual stream.

One iteration (docs/methods.md §5.1, the authors' ``NMFSemiNMF``):
1. ``F ← A G (GᵀG + 1e-6·I)⁻¹`` (least squares);
2. keep the ``ceil(sparsity · d_mlp)`` largest |F| entries of each column, zero the rest;
3. rescale: unit-norm columns of ``G``, norms moved into ``F``;
4. ``G ← G ⊙ sqrt((P⁺ + G Q⁻) / (P⁻ + G Q⁺ + ε))`` with ``P = AᵀF``, ``Q = FᵀF`` (Ding, Li, Jordan);
5. loss ``‖A − F Gᵀ‖²``; keep the best (F, G); stop after ``patience`` iterations without a
   relative improvement above ``tol``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .config import bars_off

# ---- the factorisation ------------------------------------------------------------------------
@dataclass
class SNMFResult:
    """``F`` [d_mlp, K] features in neuron space, ``G`` [n_tokens, K] ≥ 0 codes, and the loss history."""

    F: torch.Tensor
    G: torch.Tensor
    losses: list[float] = field(default_factory=list)  # relative error ‖A − FGᵀ‖² / ‖A‖² per iteration
    best_iter: int = 0

    @property
    def rel_error(self) -> float:
        return self.losses[self.best_iter]

    @property
    def rank(self) -> int:
        return self.F.shape[1]


def _pos(X):
    return (X.abs() + X) / 2


def _neg(X):
    return (X.abs() - X) / 2


def update_F(A: torch.Tensor, G: torch.Tensor, keep: int, eye: torch.Tensor | None = None) -> torch.Tensor:
    """Steps 1-2: the least-squares F = A G (GᵀG + 1e-6·I)⁻¹, then each column (feature) keeps its
    `keep` largest |F| entries (neurons) and zeros the rest."""
    if eye is None:
        eye = 1e-6 * torch.eye(G.shape[1], device=G.device, dtype=G.dtype)
    F = A @ G @ torch.linalg.inv(G.t() @ G + eye)
    if keep < A.shape[0]:
        thresh = F.abs().topk(keep, dim=0).values[-1:]  # per column
        F = torch.where(F.abs() >= thresh, F, torch.zeros((), device=F.device, dtype=F.dtype))
    return F


def update_G(A: torch.Tensor, F: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """Step 4, Ding, Li and Jordan's multiplicative update, which keeps G ≥ 0:
    G ⊙ sqrt((P⁺ + G Q⁻) / (P⁻ + G Q⁺ + 1e-6)) with P = AᵀF, Q = FᵀF."""
    P, Q = A.t() @ F, F.t() @ F
    return G * torch.sqrt((_pos(P) + G @ _neg(Q)) / (_neg(P) + G @ _pos(Q) + 1e-6))


def fit_snmf(A: torch.Tensor, rank: int, sparsity: float = 0.01, max_iter: int = 2000, patience: int = 200,
             tol: float = 1e-4, seed: int = 0, device=None, progress: bool = True) -> SNMFResult:
    """Factorise A [d_mlp, n_tokens] ≈ F Gᵀ with G ≥ 0 and a fraction `sparsity` of neurons per feature.

    Args:
        A: MLP activations, neurons × tokens (note the orientation: columns are tokens).
        rank: number of features K.
        sparsity: fraction of neurons kept per feature (1.0 = dense F).
        max_iter, patience, tol: stop at `max_iter`, or after `patience` iterations whose relative
            loss improvement over the best so far stays below `tol`.
        seed: the random start (deterministic for a seed, on CPU and CUDA).
        device: where to compute; None = A's device.
    """
    if A.ndim != 2:
        raise ValueError(f"A must be a matrix [d_mlp, n_tokens], got shape {tuple(A.shape)}")
    d, n = A.shape
    if not 0 < rank <= min(d, n):
        raise ValueError(f"rank must be between 1 and min(d_mlp, n_tokens) = {min(d, n)}, got {rank}")
    if not 0 < sparsity <= 1:
        raise ValueError(f"sparsity is the fraction of neurons kept per feature, in (0, 1]; got {sparsity}")
    if not torch.isfinite(A).all():
        raise ValueError("A holds NaN or Inf values; check the activations")
    device = torch.device(device) if device is not None else A.device
    A = A.to(device, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    G = torch.rand(n, rank, generator=gen).clamp_min(1e-6).to(device)
    keep = max(1, math.ceil(sparsity * d))
    eye = 1e-6 * torch.eye(rank, device=device)
    normA = A.pow(2).sum()
    best, best_F, best_G, best_it, since = float("inf"), None, None, 0, 0
    losses = []
    bar = tqdm(range(max_iter), desc=f"SNMF rank {rank}", disable=bars_off(progress))
    for it in bar:
        F = update_F(A, G, keep, eye)
        s = G.norm(dim=0).clamp_min(1e-12)
        G, F = G / s, F * s
        G = update_G(A, F, G)
        Q = F.t() @ F
        # ‖A − FGᵀ‖² = ‖A‖² − 2⟨AᵀF, G⟩ + ⟨FᵀF, GᵀG⟩ (no d×n residual needed)
        loss = float((normA - 2 * (A.t() @ F * G).sum() + (Q * (G.t() @ G)).sum()) / normA)
        losses.append(loss)
        if loss < best * (1 - tol):
            best, best_F, best_G, best_it, since = loss, F.clone(), G.clone(), it, 0
        else:
            since += 1
            if since >= patience:
                break
        if it % 20 == 0:
            bar.set_postfix(rel_err=f"{loss:.4f}", best=f"{best:.4f}")
    bar.close()
    if best_F is None:
        raise FloatingPointError("SNMF produced no finite loss; check A for extreme values or lower the rank")
    return SNMFResult(best_F.cpu(), best_G.cpu(), losses, best_it)


def fit_hierarchical(A: torch.Tensor, ranks: tuple[int, int], sparsity: float = 0.01, parent_sparsity: float = 0.1,
                     **kw) -> tuple[SNMFResult, SNMFResult]:
    """Two-level SNMF (the authors' greedy layer-wise scheme, without their joint fine-tuning):
    ``A ≈ F1 G1ᵀ``, then the codes themselves ``G1ᵀ ≈ F2 G2ᵀ``, so ``A ≈ (F1 F2) G2ᵀ``.

    The ``ranks[1]`` parents are, in neuron space, the columns of ``F1 F2``; parent p's children are
    the level-1 features with the largest positive weights in ``F2[:, p]`` (a fraction
    `parent_sparsity` of them is kept per parent). Returns (level 1, level 2)."""
    if ranks[1] >= ranks[0]:
        raise ValueError(f"a hierarchy needs fewer parents than children; got ranks {ranks}")
    level1 = fit_snmf(A, ranks[0], sparsity=sparsity, **kw)
    level2 = fit_snmf(level1.G.t(), ranks[1], sparsity=parent_sparsity, **kw)
    return level1, level2


def sibling_overlap(level1: SNMFResult, level2: SNMFResult, sparsity: float = 0.01) -> list[dict]:
    """Do features grouped under one parent share neurons?

    The grouping comes from the codes alone (level 2 factorises ``G1``, never looking at ``F1``), so
    comparing neuron supports (top ``ceil(sparsity·d)`` |entries| of each ``F1`` column) is a fair
    test: for each parent with at least two children, the mean Jaccard overlap between pairs of its
    children, against the mean overlap between one of its children and a feature outside the group.
    (A child's overlap with the parent itself would be circular: the parent is built from them.)"""
    d = level1.F.shape[0]
    keep = max(1, math.ceil(sparsity * d))
    sets = [set(level1.F[:, i].abs().topk(keep).indices.tolist()) for i in range(level1.rank)]

    def jac(a, b):
        return len(sets[a] & sets[b]) / max(1, len(sets[a] | sets[b]))

    rows = []
    for p in range(level2.rank):
        children = [i for i in range(level1.rank) if level2.F[i, p] > 0]
        outside = [i for i in range(level1.rank) if i not in children]
        if len(children) < 2 or not outside:
            continue
        sib = [jac(a, b) for ai, a in enumerate(children) for b in children[ai + 1:]]
        other = [jac(a, b) for a in children for b in outside]
        rows.append({"parent": p, "children": children, "jaccard_siblings": sum(sib) / len(sib),
                     "jaccard_others": sum(other) / len(other)})
    return rows
