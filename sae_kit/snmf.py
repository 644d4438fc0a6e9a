"""Semi-nonnegative matrix factorisation of MLP activations (Shafran, Geiger, Geva 2025,
"Decomposing MLP Activations into Interpretable Features via Semi-Nonnegative Matrix Factorization").

MLP activations ``A`` (neurons × tokens) are factorised as ``A ≈ F Gᵀ``: ``F`` (neurons × K) is
unconstrained — each column a *feature*, a sparse combination of co-firing neurons — and ``G``
(tokens × K) is non-negative — how much each token uses each feature. Because ``G`` is tied to the
tokens, every feature comes with the inputs that build it (its top tokens), and because ``F``
lives in neuron space, ``W_out F_j`` is the feature's write to the residual stream.

One iteration (METHODS §5.1, the authors' ``NMFSemiNMF``):
1. ``F ← A G (GᵀG + 1e-6·I)⁻¹`` (least squares);
2. keep the ``ceil(sparsity · d_mlp)`` largest |F| entries of each column, zero the rest;
3. rescale: unit-norm columns of ``G``, norms moved into ``F``;
4. ``G ← G ⊙ sqrt((P⁺ + G Q⁻) / (P⁻ + G Q⁺ + ε))`` with ``P = AᵀF``, ``Q = FᵀF`` (Ding, Li, Jordan);
5. loss ``‖A − F Gᵀ‖²``; keep the best (F, G); stop after ``patience`` iterations without a
   relative improvement above ``tol``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import bars_off

DATA = Path(__file__).resolve().parent.parent / "data"


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
        F = A @ G @ torch.linalg.inv(G.t() @ G + eye)
        if keep < d:
            thresh = F.abs().topk(keep, dim=0).values[-1:]  # per column
            F = torch.where(F.abs() >= thresh, F, torch.zeros((), device=device))
        s = G.norm(dim=0).clamp_min(1e-12)
        G, F = G / s, F * s
        P, Q = A.t() @ F, F.t() @ F
        G = G * torch.sqrt((_pos(P) + G @ _neg(Q)) / (_neg(P) + G @ _pos(Q) + 1e-6))
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


# ---- the concept dataset ------------------------------------------------------------------------
@dataclass
class ConceptSet:
    """Sentences with concept labels (``data/concepts.json``, written for the kit)."""

    names: list[str]  # concept names; label i refers to names[i]
    words: dict[str, list[str]]  # words that name each concept (for steering scores)
    sentences: list[str]
    labels: list[int]  # per sentence: concept index, or -1 for neutral

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ConceptSet":
        path = Path(path) if path else DATA / "concepts.json"
        if not path.exists():
            raise FileNotFoundError(f"no concept file at {path}; pass the path of a JSON file with "
                                    f"'concepts' ({{name: {{words, sentences}}}}) and 'neutral' sentences")
        raw = json.loads(path.read_text())
        names = list(raw["concepts"])
        sentences, labels = [], []
        for i, name in enumerate(names):
            sentences += raw["concepts"][name]["sentences"]
            labels += [i] * len(raw["concepts"][name]["sentences"])
        sentences += raw.get("neutral", [])
        labels += [-1] * len(raw.get("neutral", []))
        return cls(names, {n: raw["concepts"][n].get("words", []) for n in names}, sentences, labels)

    def label_name(self, label: int) -> str:
        return "neutral" if label < 0 else self.names[label]


@dataclass
class ConceptActivations:
    """MLP activations of every token of a `ConceptSet` (position 0 of each sentence skipped)."""

    acts: torch.Tensor  # [n_tokens, d_mlp]
    labels: torch.Tensor  # [n_tokens] concept index of the token's sentence, -1 neutral
    sentence: torch.Tensor  # [n_tokens] sentence index
    position: torch.Tensor  # [n_tokens] position in the sentence
    tokens: list[list[int]]  # token ids of each sentence
    hook: str

    @property
    def A(self) -> torch.Tensor:
        """Neurons × tokens, the orientation `fit_snmf` takes."""
        return self.acts.t()


@torch.no_grad()
def concept_activations(model, concepts: ConceptSet, layer, site: str = "mlp.hook_post", progress: bool = True):
    """Run every sentence through the model and collect ``blocks.{layer}.{site}`` at each token but
    the first (the attention sink, as in the kit's stores).

    `layer` may be an int (returns one `ConceptActivations`) or a list (returns {layer: ...}, one pass)."""
    layers = [layer] if isinstance(layer, int) else list(layer)
    for L in layers:
        if not 0 <= L < model.cfg.n_layers:
            raise ValueError(f"layer must be in [0, {model.cfg.n_layers}), got {L}")
    hooks = {L: f"blocks.{L}.{site}" for L in layers}
    acts = {L: [] for L in layers}
    labels, sent, pos, toks = [], [], [], []
    pairs = list(zip(concepts.sentences, concepts.labels))
    for i, (s, lab) in enumerate(tqdm(pairs, desc=f"activations {site}", disable=bars_off(progress))):
        t = model.to_tokens(s, prepend_bos=False)
        _, cache = model.run_with_cache(t, names_filter=list(hooks.values()), stop_at_layer=max(layers) + 1)
        for L, h in hooks.items():
            acts[L].append(cache[h][0, 1:].float().cpu())
        n = t.shape[1] - 1
        labels += [lab] * n
        sent += [i] * n
        pos += list(range(1, n + 1))
        toks.append(t[0].tolist())
    out = {L: ConceptActivations(torch.cat(acts[L]), torch.tensor(labels), torch.tensor(sent), torch.tensor(pos),
                                 toks, hooks[L]) for L in layers}
    return out[layer] if isinstance(layer, int) else out


# ---- reading the features -------------------------------------------------------------------------
def top_tokens(codes: torch.Tensor, feature: int, n: int = 20) -> torch.Tensor:
    """Indices of the `n` tokens with the largest code for `feature` (codes [n_tokens, K])."""
    return codes[:, feature].topk(min(n, len(codes))).indices


def concept_shares(codes: torch.Tensor, labels: torch.Tensor, n_concepts: int, n: int = 20) -> torch.Tensor:
    """[K, n_concepts]: for each feature, the share of its top `n` tokens that carry each concept label
    (neutral tokens count in the denominator, for no concept). Features that never fire get 0."""
    top = codes.topk(min(n, len(codes)), dim=0).indices  # [n, K]
    lab = labels[top]
    shares = torch.stack([(lab == c).float().mean(0) for c in range(n_concepts)], 1)
    return shares * (codes.max(0).values > 0)[:, None]


def purity(codes: torch.Tensor, labels: torch.Tensor, n: int = 20) -> dict:
    """Label purity of each feature's top `n` tokens: the share carrying its most common concept.

    Returns {"label": [K] majority concept (-1 if it never fires), "purity": [K], "mean": float}."""
    n_concepts = int(labels.max()) + 1
    shares = concept_shares(codes, labels, n_concepts, n)
    pur, lab = shares.max(1)
    lab = torch.where(pur > 0, lab, torch.full_like(lab, -1))
    return {"label": lab, "purity": pur, "mean": float(pur.mean())}


def best_for_concept(codes: torch.Tensor, labels: torch.Tensor, concept: int, n: int = 20) -> tuple[int, float]:
    """The feature whose top `n` tokens hold the largest share of `concept` (ties: the stronger
    activation), and that share."""
    n_concepts = int(labels.max()) + 1
    share = concept_shares(codes, labels, n_concepts, n)[:, concept]
    best = share.max()
    ties = (share == best).nonzero()[:, 0]
    j = int(ties[codes[:, ties].max(0).values.argmax()])
    return j, float(best)


def shuffled_purity(codes: torch.Tensor, labels: torch.Tensor, n: int = 20, repeats: int = 200, seed: int = 0) -> torch.Tensor:
    """Mean purity when sentence labels are shuffled (chance level), one value per repeat."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(repeats):
        out.append(purity(codes, labels[torch.randperm(len(labels), generator=gen)], n)["mean"])
    return torch.tensor(out)


def context_string(model, acts: ConceptActivations, token: int, window: int = 8) -> str:
    """The token at flat index `token` with up to `window` tokens of left context, marked [[like this]]."""
    s, p = int(acts.sentence[token]), int(acts.position[token])
    ids = acts.tokens[s]
    left = model.tokenizer.decode(ids[max(0, p - window):p])
    right = model.tokenizer.decode(ids[p + 1:p + 1 + window // 2])
    return f"{left}[[{model.tokenizer.decode([ids[p]])}]]{right}".replace("\n", " ")


def feature_table(model, acts: ConceptActivations, codes: torch.Tensor, features: list[int],
                  concepts: ConceptSet, n: int = 4, n_purity: int = 20):
    """A pandas table: each feature's majority concept, purity and its top contexts."""
    import pandas as pd

    pur = purity(codes, acts.labels, n_purity)
    rows = []
    for j in features:
        rows.append({"feature": j, "concept": concepts.label_name(int(pur["label"][j])),
                     "purity": round(float(pur["purity"][j]), 2),
                     "top contexts": " · ".join(context_string(model, acts, int(t)) for t in top_tokens(codes, j, n))})
    return pd.DataFrame(rows)


@torch.no_grad()
def logit_lens(model, layer: int, direction: torch.Tensor, k: int = 8) -> list[str]:
    """Top tokens promoted by a neuron-space direction: unembed(ln_final(W_out · direction))."""
    W_out = model.blocks[layer].mlp.W_out.detach().float().cpu()
    resid = direction.float().cpu() @ W_out
    logits = model.unembed(model.ln_final(resid.to(model.cfg.device, model.cfg.dtype)[None, None]))[0, 0].float()
    return [model.tokenizer.decode([int(i)]) for i in logits.topk(k).indices]


def diff_means(acts: torch.Tensor, labels: torch.Tensor, n_concepts: int) -> torch.Tensor:
    """Difference-in-means directions [n_concepts, d]: mean over the concept's tokens minus the mean
    over every other token, unit-normed (the DiffMean baseline)."""
    out = []
    for c in range(n_concepts):
        m = labels == c
        if m.sum() == 0:
            raise ValueError(f"concept {c} has no tokens")
        v = acts[m].mean(0) - acts[~m].mean(0)
        out.append(v / v.norm().clamp_min(1e-12))
    return torch.stack(out)
