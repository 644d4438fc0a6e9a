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
5. loss ``‖A − F Gᵀ‖²``; keep the best (F, G); stop after ``patience`` iterations without an
   improvement: by default the authors' rule (the squared error falls more than ``tol`` = 1e-4
   below its best; patience 1,500), which on these activations means "no new best at all".

With hard thresholding of F the loss is not monotone: after a fast drop it wanders on a plateau
(supports switch), so a fit records how it stopped (`SNMFResult.stop`, `n_iter`,
`final_rel_change`) and the notebook plots every curve. `fit_snmf_cached` keeps fits on disk.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .config import bars_off

# ---- the factorisation ------------------------------------------------------------------------
# Part of every cache key of `fit_snmf_cached`: bump it when a change here changes what a fit returns.
# 2: the authors' stopping rule is the default, and the result records how the fit stopped;
# 3: subnormal entries of G are set to 0 after each update (`flush_subnormal`)
SNMF_REVISION = 3


@dataclass
class SNMFResult:
    """``F`` [d_mlp, K] features in neuron space, ``G`` [n_tokens, K] ≥ 0 codes, and how the fit went."""

    F: torch.Tensor
    G: torch.Tensor
    losses: list[float] = field(default_factory=list)  # relative error ‖A − FGᵀ‖² / ‖A‖² per iteration
    best_iter: int = 0  # the iteration whose (F, G) is returned
    stop: str = ""  # "patience": the stopping rule fired (converged by it); "max_iter": the cap came first
    patience: int = 0  # the rule's patience (sets the window of `final_rel_change`)
    rule: str = ""  # the stopping rule, in words

    @property
    def rel_error(self) -> float:
        return self.losses[self.best_iter]

    @property
    def rank(self) -> int:
        return self.F.shape[1]

    @property
    def n_iter(self) -> int:
        """Iterations run."""
        return len(self.losses)

    @property
    def converged(self) -> bool:
        """Whether the stopping rule ended the fit (rather than the iteration cap)."""
        return self.stop == "patience"

    def rel_change(self, window: int) -> float:
        """How much the best relative error fell over the last `window` iterations, relative to it:
        (best before them − best at the end) / best at the end. 0 on a plateau."""
        if not self.losses:
            return float("nan")
        n = len(self.losses)
        window = max(1, min(window, n - 1))
        before, end = min(self.losses[:n - window]), min(self.losses)
        return (before - end) / end if end > 0 else 0.0

    @property
    def final_rel_change(self) -> float:
        """`rel_change` over the rule's patience, or over the second half of a shorter run."""
        return self.rel_change(min(self.patience or len(self.losses), len(self.losses) // 2))


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


def project(A: torch.Tensor, F: torch.Tensor) -> torch.Tensor:
    """P = AᵀF [n_tokens, K], touching only the neurons some feature keeps (F is sparse: with 1% of
    neurons per feature most rows of F are zero, so this is a few times cheaper than ``A.t() @ F``)."""
    rows = F.abs().sum(1).nonzero().flatten()  # [≤ keep·K] neurons in some feature's support
    if len(rows) > A.shape[0] // 2:
        return A.t() @ F
    return A[rows].t() @ F[rows]


def update_G(A: torch.Tensor, F: torch.Tensor, G: torch.Tensor, P: torch.Tensor | None = None) -> torch.Tensor:
    """Step 4, Ding, Li and Jordan's multiplicative update, which keeps G ≥ 0:
    G ⊙ sqrt((P⁺ + G Q⁻) / (P⁻ + G Q⁺ + 1e-6)) with P = AᵀF (pass it if already computed), Q = FᵀF."""
    P = A.t() @ F if P is None else P
    Q = F.t() @ F
    return G * torch.sqrt((_pos(P) + G @ _neg(Q)) / (_neg(P) + G @ _pos(Q) + 1e-6))


def flush_subnormal(G: torch.Tensor) -> torch.Tensor:
    """G ≥ 0 with its subnormal entries (0 < g < the dtype's smallest normal number, ~1.2e-38 in
    float32) set to 0, in place. The multiplicative update drives unused entries of G towards 0
    geometrically, and at `lab` scale up to 10% of them end up subnormal: an Intel core computes
    with those through a microcode assist, ~100× slower per operation (one SNMF iteration on
    [1536 × 2409] went from 3.3 ms to 143 ms; AMD cores handle them at full speed). Such an entry
    adds nothing a float32 sum can hold next to a normal number."""
    return G.masked_fill_(G < torch.finfo(G.dtype).tiny, 0.0)


TOL_KINDS = ("absolute", "relative")


def fit_snmf(A: torch.Tensor, rank: int, sparsity: float = 0.01, max_iter: int = 2000, patience: int = 1500,
             tol: float = 1e-4, tol_kind: str = "absolute", seed: int = 0, device=None,
             progress: bool = True) -> SNMFResult:
    """Factorise A [d_mlp, n_tokens] ≈ F Gᵀ with G ≥ 0 and a fraction `sparsity` of neurons per feature.

    The default stopping rule is the authors' (``NMFSemiNMF.fit``; their GPT-2 scripts: 2,000
    iterations, patience 1,500): an iteration counts as an improvement when the squared error
    ‖A − FGᵀ‖² (not normalised) falls more than `tol` = 1e-4 below the best so far; stop after
    `patience` iterations without one. ‖A‖² of SmolLM2's MLP activations on the concept set is
    10⁴–10⁶, so that tolerance means "any new best" (a relative 10⁻⁹ or less). ``tol_kind="relative"`` asks for a
    fraction `tol` of the best relative error instead (the kit's rule before, with patience 200:
    it stopped about 3× sooner).

    Args:
        A: MLP activations, neurons × tokens (note the orientation: columns are tokens).
        rank: number of features K.
        sparsity: fraction of neurons kept per feature (1.0 = dense F).
        max_iter: the iteration cap; `SNMFResult.stop` says whether it or the rule ended the fit.
        patience, tol, tol_kind: the stopping rule above.
        seed: the random start (deterministic for a seed, on CPU and CUDA).
        device: where to compute; None = A's device.

    Returns:
        `SNMFResult`: the best (F, G) seen, the relative error per iteration, and how it stopped.
    """
    if A.ndim != 2:
        raise ValueError(f"A must be a matrix [d_mlp, n_tokens], got shape {tuple(A.shape)}")
    d, n = A.shape
    if not 0 < rank <= min(d, n):
        raise ValueError(f"rank must be between 1 and min(d_mlp, n_tokens) = {min(d, n)}, got {rank}")
    if not 0 < sparsity <= 1:
        raise ValueError(f"sparsity is the fraction of neurons kept per feature, in (0, 1]; got {sparsity}")
    if tol_kind not in TOL_KINDS:
        raise ValueError(f"tol_kind must be one of {TOL_KINDS}, got {tol_kind!r}")
    if max_iter < 1 or patience < 1 or tol < 0:
        raise ValueError(f"need max_iter ≥ 1, patience ≥ 1 and tol ≥ 0; got {max_iter}, {patience}, {tol}")
    if not torch.isfinite(A).all():
        raise ValueError("A holds NaN or Inf values; check the activations")
    device = torch.device(device) if device is not None else A.device
    A = A.to(device, torch.float32)
    gen = torch.Generator().manual_seed(seed)
    G = torch.rand(n, rank, generator=gen).clamp_min(1e-6).to(device)
    keep = max(1, math.ceil(sparsity * d))
    eye = 1e-6 * torch.eye(rank, device=device)
    normA = float(A.double().pow(2).sum())
    # the rule compares errors in the units it is stated in: ‖A − FGᵀ‖² (absolute) or relative error
    unit = normA if tol_kind == "absolute" else 1.0
    best, best_F, best_G, best_it, since, stop = float("inf"), None, None, 0, 0, "max_iter"
    losses = []
    bar = tqdm(range(max_iter), desc=f"SNMF rank {rank}", disable=bars_off(progress))
    for it in bar:
        F = update_F(A, G, keep, eye)
        s = G.norm(dim=0).clamp_min(1e-12)
        G, F = G / s, F * s
        P = project(A, F)  # AᵀF: F is unchanged by the G update, so the loss below reuses it
        G = flush_subnormal(update_G(A, F, G, P))
        # ‖A − FGᵀ‖² = ‖A‖² − 2⟨AᵀF, G⟩ + ⟨FᵀF, GᵀG⟩ (no d×n residual; sums in float64)
        cross = (P * G).sum(dtype=torch.float64)
        gram = ((F.t() @ F) * (G.t() @ G)).sum(dtype=torch.float64)
        loss = float((normA - 2 * cross + gram) / normA)
        losses.append(loss)
        err = loss * unit
        if best == float("inf") or err < best - (tol if tol_kind == "absolute" else tol * best):
            best, best_F, best_G, best_it, since = err, F.clone(), G.clone(), it, 0
        else:
            since += 1
            if since >= patience:
                stop = "patience"
                break
        if it % 20 == 0:
            bar.set_postfix(rel_err=f"{loss:.4f}", best=f"{best / unit:.4f}")
    bar.close()
    if best_F is None or not math.isfinite(best):
        raise FloatingPointError("SNMF produced no finite loss; check A for extreme values or lower the rank")
    rule = (f"stop after {patience} iterations without the squared error falling {tol:g} below its best"
            if tol_kind == "absolute" else
            f"stop after {patience} iterations without the relative error falling {tol:g}× below its best")
    return SNMFResult(best_F.cpu(), best_G.cpu(), losses, best_it, stop, patience, rule + f" (cap {max_iter})")


_FIT_SIGNATURE = inspect.signature(fit_snmf)  # the cache key's argument names and defaults


def fit_snmf_cached(A: torch.Tensor, rank: int, progress: bool = True, cache: bool = True, **kw) -> SNMFResult:
    """`fit_snmf`, or the result of an identical earlier fit from the kit's cache.

    The key is A's bytes and shape, every argument that decides the result (defaults filled in)
    and `SNMF_REVISION`; the file is ``cache_dir()/snmf/<key>.pt``, written atomically, so a killed
    run never leaves a half-written fit. `device` is not part of the key (CPU and CUDA fits of one
    seed agree up to float rounding)."""
    import hashlib
    import json

    from .config import cache_dir
    from .fsutil import atomic_write_bytes

    bound = _FIT_SIGNATURE.bind(A, rank, **kw)
    bound.apply_defaults()
    args = {k: v for k, v in bound.arguments.items() if k not in ("A", "device", "progress")}
    a = A.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(a.numpy().tobytes())
    h.update(json.dumps({"shape": list(a.shape), "revision": SNMF_REVISION, **args}, sort_keys=True).encode())
    path = cache_dir() / "snmf" / f"rank{rank}-{h.hexdigest()[:20]}.pt"
    if cache and path.exists():
        d = torch.load(path, weights_only=True)
        return SNMFResult(d["F"], d["G"], d["losses"].tolist(), int(d["best_iter"]), d["stop"], int(d["patience"]), d["rule"])
    res = fit_snmf(A, rank, progress=progress, **kw)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"F": res.F, "G": res.G, "losses": torch.tensor(res.losses, dtype=torch.float64),
                 "best_iter": res.best_iter, "stop": res.stop, "patience": res.patience, "rule": res.rule}
        atomic_write_bytes(path, lambda f: torch.save(state, f))
    return res


def fit_hierarchical(A: torch.Tensor, ranks: tuple[int, int], sparsity: float = 0.01, parent_sparsity: float = 0.1,
                     level1: SNMFResult | None = None, **kw) -> tuple[SNMFResult, SNMFResult]:
    """Two-level SNMF (the authors' greedy layer-wise scheme, without their joint fine-tuning):
    ``A ≈ F1 G1ᵀ``, then the codes themselves ``G1ᵀ ≈ F2 G2ᵀ``, so ``A ≈ (F1 F2) G2ᵀ``.

    The ``ranks[1]`` parents are, in neuron space, the columns of ``F1 F2``; parent p's children are
    the level-1 features with the largest positive weights in ``F2[:, p]`` (a fraction
    `parent_sparsity` of them is kept per parent). `level1`: an existing fit of A at ``ranks[0]``
    (e.g. the one studied), used instead of fitting it again. Other keywords go to `fit_snmf`.
    Returns (level 1, level 2)."""
    if ranks[1] >= ranks[0]:
        raise ValueError(f"a hierarchy needs fewer parents than children; got ranks {ranks}")
    if level1 is None:
        level1 = fit_snmf(A, ranks[0], sparsity=sparsity, **kw)
    elif level1.rank != ranks[0] or level1.G.shape[0] != A.shape[1]:
        raise ValueError(f"level1 has rank {level1.rank} and {level1.G.shape[0]} tokens; expected rank {ranks[0]} "
                         f"and A's {A.shape[1]} tokens")
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
