"""Synthetic data with a known feature hierarchy, and a matcher from learned atoms to true features.

`Hierarchy` follows the MP-SAE paper's toy setting (docs/methods.md §4.2): in ``d`` dimensions, a few
*parents*, each with mutually exclusive *children* (at most one child is on, and only when its
parent is), plus independent *singletons*. Each active feature contributes ``m · f`` with a
magnitude ``m ~ 1.5 + 0.25·N(0, 1)`` (clipped at 0).

The geometry is what the paper calls *conditionally orthogonal*: features that can be active
together are orthogonal (a parent and its children, different families, singletons), while
siblings, which are never active together, may share directions: ``cos(child_i, child_j) =
sibling_cos``. Nothing in the data forbids that, yet a linear encoder reading one sibling also
reads a share of the others. ``parent_child_cos`` can tilt children towards their parent as well
(default 0).

`match` pairs learned decoder atoms with true features by the Hungarian algorithm on cosine
similarity and reports how well each group (parents / children / singletons) is recovered.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Hierarchy:
    """A synthetic feature hierarchy with ground truth. ``Hierarchy(seed=0).sample(10_000)``."""

    d: int = 20
    n_parents: int = 3
    n_children: int = 3  # per parent, mutually exclusive
    n_singletons: int = 8
    p_parent: float = 0.2
    p_child: float = 0.2  # each child, given its parent; all children off with 1 − n_children·p_child
    p_singleton: float = 0.05
    magnitude: float = 1.5
    magnitude_std: float = 0.25
    sibling_cos: float = 0.5
    parent_child_cos: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if self.n_children * self.p_child > 1:
            raise ValueError(f"children are mutually exclusive, so n_children·p_child must be ≤ 1; "
                             f"got {self.n_children}·{self.p_child}")
        if self.n_features > self.d:
            raise ValueError(f"{self.n_features} features need d ≥ {self.n_features} for an orthonormal start; got d={self.d}")
        for name in ("sibling_cos", "parent_child_cos"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        gen = torch.Generator().manual_seed(self.seed)
        q, _ = torch.linalg.qr(torch.randn(self.d, self.d, generator=gen))
        dirs = q[:, :self.n_features].t().clone()  # [n_features, d], orthonormal
        # siblings: mix each family's orthonormal child directions to the Gram matrix
        # (1 − s)·I + s·11ᵀ, through its Cholesky factor (they stay in the family's own subspace)
        n, sc = self.n_children, self.sibling_cos
        L = torch.linalg.cholesky((1 - sc) * torch.eye(n) + sc * torch.ones(n, n))
        e = self.parent_child_cos
        for p in range(self.n_parents):
            ch = self.children_of(p)
            dirs[ch] = L @ dirs[ch]
            dirs[ch] = e * dirs[p] + (1 - e * e) ** 0.5 * dirs[ch]
        self.features = dirs  # unit-norm rows

    @property
    def n_features(self) -> int:
        return self.n_parents * (1 + self.n_children) + self.n_singletons

    def children_of(self, p: int) -> list[int]:
        start = self.n_parents + p * self.n_children
        return list(range(start, start + self.n_children))

    @property
    def groups(self) -> dict[str, list[int]]:
        """Feature indices by role."""
        n_ch = self.n_parents * self.n_children
        return {"parent": list(range(self.n_parents)),
                "child": list(range(self.n_parents, self.n_parents + n_ch)),
                "singleton": list(range(self.n_parents + n_ch, self.n_features))}

    def sample(self, n: int, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [n, d], codes [n, n_features]): activations and their true feature magnitudes."""
        gen = torch.Generator().manual_seed(self.seed + 1 if seed is None else seed)
        codes = torch.zeros(n, self.n_features)
        on_parent = torch.rand(n, self.n_parents, generator=gen) < self.p_parent
        codes[:, :self.n_parents] = on_parent.float()
        u = torch.rand(n, self.n_parents, generator=gen)  # one draw picks at most one child
        for p in range(self.n_parents):
            for i, c in enumerate(self.children_of(p)):
                pick = (u[:, p] >= i * self.p_child) & (u[:, p] < (i + 1) * self.p_child)
                codes[:, c] = (pick & on_parent[:, p]).float()
        s = self.groups["singleton"]
        codes[:, s] = (torch.rand(n, len(s), generator=gen) < self.p_singleton).float()
        mags = (self.magnitude + self.magnitude_std * torch.randn(n, self.n_features, generator=gen)).clamp_min(0)
        codes = codes * mags
        return codes @ self.features, codes


def match(W_dec: torch.Tensor, truth: torch.Tensor, groups: dict[str, list[int]] | None = None) -> dict:
    """Hungarian matching of atoms (rows of W_dec) to true features (rows of `truth`) by cosine.

    Returns ``{"cos": [n_true, n_atoms] cosines, "assignment": atom index per true feature,
    "matched": matched cosine per true feature, "mean": their mean, and one mean per group}``.
    Cosines are signed: the kit's codes are non-negative, so an atom pointing the wrong way does
    not recover a feature."""
    from scipy.optimize import linear_sum_assignment

    A = torch.nn.functional.normalize(W_dec.detach().float().cpu(), dim=1)
    T = torch.nn.functional.normalize(truth.detach().float().cpu(), dim=1)
    cos = (T @ A.t()).numpy()
    rows, cols = linear_sum_assignment(-cos)
    assignment = np.full(len(T), -1)
    assignment[rows] = cols
    matched = np.where(assignment >= 0, cos[np.arange(len(T)), np.maximum(assignment, 0)], 0.0)
    out = {"cos": cos, "assignment": assignment, "matched": matched, "mean": float(matched.mean())}
    for name, idx in (groups or {}).items():
        out[name] = float(matched[idx].mean())
    return out


def absorption(W_dec: torch.Tensor, h: Hierarchy, assignment) -> float:
    """Mean cosine between each child's matched atom and its parent's true direction.

    A clean child atom has ``parent_child_cos`` here (0 by default); an atom that has absorbed
    its parent (fires for "parent + child" as one latent) points partly along the parent."""
    A = torch.nn.functional.normalize(W_dec.detach().float().cpu(), dim=1)
    vals = [float(A[assignment[c]] @ h.features[p]) for p in range(h.n_parents) for c in h.children_of(p)]
    return float(np.mean(vals))


def digits(test_frac: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8×8 handwritten digits (1,797 images, no download), scaled to [0, 1].

    Returns (train [n, 64], test [m, 64]), split at random with `seed`."""
    from sklearn.datasets import load_digits

    X = torch.tensor(load_digits().data, dtype=torch.float32) / 16
    perm = torch.randperm(len(X), generator=torch.Generator().manual_seed(seed))
    n_test = int(test_frac * len(X))
    return X[perm[n_test:]], X[perm[:n_test]]
