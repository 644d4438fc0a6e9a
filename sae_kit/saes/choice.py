"""Feature Choice and Mutual Choice SAEs, and aux_zipf_loss (Ayonrinde 2024, arXiv 2411.02124).

Sparsification as an allocation problem: a batch of B tokens and n features form a B×n matrix of
affinities (pre-activations), and the budget is k·B kept entries.
- TopK (`topk.py`): every token (row) keeps its own k.
- **Mutual Choice** (MC): keep the k·B largest entries anywhere in the matrix. This is BatchTopK
  (Bussmann et al. 2024): tokens that need more features get more.
- **Feature Choice** (FC): every feature (column) j keeps its own top m_j tokens, Σ m_j = k·B.
  A token may get zero features; a feature with m_j positive affinities can never be dead.

The paper has no public code; these parts are the kit's reconstruction (docs/methods.md §2.2), each a
field of `ChoiceConfig`:
- FC capacities: ``capacity="uniform"`` (m_j = k·B/n) or ``"zipf"``: m_j ∝ (r_j + b)^−α for the
  feature's rank r_j by running density, (α, b) fitted on a trained TopK SAE's densities
  (`fit_zipf`). Capacities are clipped at B and rounded so they sum to exactly k·B.
- aux_zipf_loss (``aux="zipf"``): the AuxK term (top k_aux eligible pre-activations reconstruct
  the detached residual, weight 1/32), where *eligible* = dead, or *under-used*: running density
  below ``tau`` × the Zipf-predicted density k·p(rank) for the feature's rank. ``aux="auxk"``
  uses dead latents only (AuxK), ``aux="none"`` switches it off. The paper's optional per-latent
  shortfall weighting is not implemented.
- Inference without the batch: a learned threshold θ, the EMA (``ema``) of each batch's selection
  cut-off — one global θ for MC (the k·B-th largest value, as BatchTopK does), one θ_j per
  feature for FC (its m_j-th largest value). The ``"threshold"`` mode (default) encodes
  each token alone as z = pre·[pre > θ] (a JumpReLU; saved as SAELens ``"jumprelu"``); the
  ``"batch"`` mode (``with sae.using("batch"):``) applies the batch rule to whatever batch
  `encode` is given, at the trained budget or ``k=``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..validate import real
from .base import SAE, SAEConfig, Selection, mask_pairs, row_topk, sort_keys


@dataclass
class ChoiceConfig(SAEConfig):
    k: int = 32  # average latents per token: a batch of B tokens keeps k·B (token, latent) pairs
    capacity: str = "uniform"  # Feature Choice: "uniform" (m_j = k·B/n) or "zipf" (m_j ∝ (rank + b)^−α)
    zipf_alpha: float = 1.0  # α of the Zipf capacities and of aux_zipf's expected densities (`fit_zipf`)
    zipf_b: float = 1.0  # b of the same law
    aux: str = "auxk"  # auxiliary loss: "auxk" (dead latents), "zipf" (dead or under-used), "none"
    tau: float = 0.1  # under-used: running density below tau × the Zipf-expected density
    ema: float = 0.9  # EMA of the batch cut-off that becomes the inference threshold
    density_decay: float = 0.98  # EMA decay of each latent's running density
    min_one: bool = False  # FC: one guaranteed slot per feature per batch (costs n / kB of the budget)

    def __post_init__(self):
        super().__post_init__()
        if self.aux not in ("auxk", "zipf", "none"):
            raise ValueError(f"aux must be 'auxk', 'zipf' or 'none', got {self.aux!r}")
        if self.capacity not in ("uniform", "zipf"):
            raise ValueError(f"capacity must be 'uniform' or 'zipf', got {self.capacity!r}")
        for name in ("tau", "ema", "density_decay"):
            setattr(self, name, real(name, getattr(self, name), min=0, max=1))
        if self.aux == "none":
            self.aux_coef = 0.0


def zipf_probs(n: int, alpha: float, b: float, device=None) -> torch.Tensor:
    """p(r) ∝ (r + b)^−α for ranks r = 1..n, normalised to sum to 1."""
    r = torch.arange(1, n + 1, dtype=torch.float64, device=device)
    p = (r + b) ** (-alpha)
    return (p / p.sum()).float()


def capacities(probs: torch.Tensor, total: int, cap: int, min_one: bool = False) -> torch.Tensor:
    """Integer capacities ∝ probs, each ≤ cap, summing to exactly `total` (largest remainder).

    Shares above `cap` are clipped and their excess shared among the rest in proportion
    (water-filling, in closed form on the sorted weights: no loop).

    Args:
        probs: [n] non-negative weights.
        total: k·B, the batch's budget.
        cap: B, the most tokens a feature can take.
        min_one: first give every feature one slot (when total ≥ n), then share the rest. A Zipf
            tail rounded to zero never fires and never climbs in rank; but at small k the floor
            costs a large part of the budget (n / kB: 56% at k = 8, B = 1024, n = 4608), so it is
            off unless asked for (`ChoiceConfig.min_one`).
    """
    n = len(probs)
    if total > n * cap:
        raise ValueError(f"budget {total} exceeds n*B = {n * cap}")
    if min_one and total >= n:
        return 1 + capacities(probs, total - n, cap - 1)
    if total == 0:
        return torch.zeros(n, dtype=torch.long, device=probs.device)
    p = probs.double() / probs.double().sum()
    ps, order = p.sort(descending=True)
    # with the t largest clipped at cap, the rest share (total − t·cap) in proportion; the first t
    # for which the largest unclipped share fits under cap is the water level
    t = torch.arange(n, dtype=torch.float64, device=p.device)
    tail = ps.flip(0).cumsum(0).flip(0)  # Σ_{i ≥ t} p_i
    fits = (total - t * cap) * ps <= cap * tail * (1 + 1e-12)
    n_clip = int(fits.to(torch.int8).argmax()) if bool(fits.any()) else n
    ms = torch.full_like(ps, float(cap))
    if n_clip < n:
        ms[n_clip:] = (total - n_clip * cap) * ps[n_clip:] / tail[n_clip]
    m = torch.empty_like(ms).scatter_(0, order, ms.clamp(max=cap))
    base = m.floor()
    short = int(round(total - float(base.sum())))
    if short > 0:
        frac = (m - base).masked_fill(base >= cap, -1.0)
        base[frac.topk(short).indices] += 1
    return base.long()


def fit_zipf(density: torch.Tensor, bs=(0.0, 1.0, 3.0, 10.0, 30.0, 100.0), head: float = 0.9) -> dict:
    """Fit log density = c − α·log(rank + b) to the alive features' densities (sorted descending).

    The offset b is kept small (≤ 100) so the law stays a power law over most ranks: with b near
    the number of features, (r + b)^−α is an exponential in disguise and fits anything smooth.
    Only the `head` fraction of alive ranks is fitted, since the paper reports the law failing at
    the low end; r2 is that fit's R² in log-log space.

    Returns:
        dict with alpha, b, c, r2 and n (features fitted).
    """
    d = np.sort(density[density > 0].double().cpu().numpy())[::-1]
    d = d[: max(3, int(head * len(d)))]
    if len(d) < 3:
        raise ValueError("need at least 3 alive features to fit a Zipf law")
    r = np.arange(1, len(d) + 1, dtype=np.float64)
    y = np.log(d)
    yc = y - y.mean()
    best = None
    for b in bs:
        # the two-parameter least squares in closed form, with numpy's pairwise sums: the same bits on
        # every run (a threaded lstsq moved alpha in its last bits from run to run, and alpha is part
        # of the Zipf SAEs' configs, hence of their cache keys)
        u = -np.log(r + b)
        uc = u - u.mean()
        alpha = float((uc * yc).sum() / (uc * uc).sum())
        c = float(y.mean() - alpha * u.mean())
        resid = y - (c + alpha * u)
        r2 = 1 - float((resid * resid).sum() / (yc * yc).sum())
        if best is None or r2 > best["r2"]:
            best = {"alpha": alpha, "b": b, "c": c, "r2": r2, "n": len(d)}
    return best


class _ChoiceSAE(SAE):
    """Shared parts: running densities, learned thresholds, aux_zipf eligibility, inference modes."""

    config_class = ChoiceConfig
    modes = ("threshold", "batch")
    budget = "average latents per token over the batch (batch mode)"
    saelens_architecture = "jumprelu"
    per_feature_threshold = False

    def __init__(self, cfg: ChoiceConfig, seed: int = 0, device=None, dtype=torch.float32):
        super().__init__(cfg, seed=seed, device=device, dtype=dtype)
        n = cfg.d_sae
        # initial running densities: the Zipf-expected ones in a random (seeded) order, so the first
        # ranks are a random permutation. Equal starting densities would rank the features in index
        # order, ties broken the same way every step.
        self.register_buffer("density", self.start_density().to(device))
        self.register_buffer("threshold", torch.zeros(n if self.per_feature_threshold else 1, device=device))
        self.register_buffer("threshold_ready", torch.zeros((), dtype=torch.bool, device=device))

    def start_density(self) -> torch.Tensor:
        """The running densities training starts from (a function of the config and init seed)."""
        c = self.cfg
        perm = torch.randperm(c.d_sae, generator=torch.Generator().manual_seed(self.init_seed))
        return (c.k * zipf_probs(c.d_sae, c.zipf_alpha, c.zipf_b)).clamp(max=1.0)[perm]

    def select(self, pre, g=None, k=None):
        if self.training or self.mode == "batch":
            return self.batch_select(pre, self._budget(k))
        else:
            if k is not None:
                raise ValueError("threshold inference has no budget: each latent fires above its learned "
                                 "threshold. Encode in batch mode for a budget: with sae.using('batch'): ...")
            if not bool(self.threshold_ready):
                raise RuntimeError("threshold inference needs thresholds learned in training; train the SAE "
                                   "first or encode in batch mode (with sae.using('batch'): ...)")
            keep, cutoff = pre > self.threshold.clamp_min(0), None
        rows, cols = mask_pairs(keep)  # row-major: rows come out sorted
        return Selection(rows, cols, cutoff)

    def batch_keep(self, pre: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep mask [B, d_sae], the selection's cut-off) of the batch rule at budget `k` (None: cfg.k)."""
        raise NotImplementedError

    def batch_select(self, pre: torch.Tensor, k: int | None = None) -> Selection:
        """The batch rule's kept pairs (rows sorted); the same pairs as `batch_keep`'s mask."""
        keep, cutoff = self.batch_keep(pre, k)
        rows, cols = mask_pairs(keep)  # row-major: rows come out sorted
        return Selection(rows, cols, cutoff)

    def zipf_expected_density(self) -> torch.Tensor:
        """k·p(rank) for each feature, ranked by its running density."""
        c = self.cfg
        p = zipf_probs(c.d_sae, c.zipf_alpha, c.zipf_b, self.density.device)
        ranks = torch.empty_like(self.density, dtype=torch.long)
        ranks[self.density.argsort(descending=True)] = torch.arange(self.cfg.d_sae, device=self.density.device)
        return (self.cfg.k * p[ranks]).clamp(max=1.0)

    def under_used(self) -> torch.Tensor:
        return self.density < self.cfg.tau * self.zipf_expected_density()

    def aux_eligible(self):
        if self.cfg.aux == "zipf":
            return self.dead_mask() | self.under_used()
        return self.dead_mask()

    def after_step(self, pre, code):
        d = self.cfg.density_decay
        fired = torch.bincount(code.cols[code.vals > 0], minlength=self.cfg.d_sae).float() / pre.shape[0]
        self.density.mul_(d).add_((1 - d) * fired)
        cut = code.cutoff.clamp_min(0)
        if bool(self.threshold_ready):
            self.threshold.mul_(self.cfg.ema).add_((1 - self.cfg.ema) * cut)
        else:
            self.threshold.copy_(cut.expand_as(self.threshold))
            self.threshold_ready.fill_(True)

    def fold_thresholds(self, s: float) -> None:
        self.threshold.div_(s)

    def saelens_tensors(self):
        return {"threshold": self.threshold.clamp_min(0).expand(self.cfg.d_sae).clone()}


class MutualChoiceSAE(_ChoiceSAE):
    """Keep the k·B largest pre-activations of the batch (= BatchTopK)."""

    architecture = "mc"

    def _candidates(self, pre, k):
        """Each row's top 4k values (descending) and the budget-th largest of them."""
        budget = k * pre.shape[0]
        cand = row_topk(pre, min(pre.shape[1], 4 * k))[0]  # [B, 4k]
        kth = cand.reshape(-1).kthvalue(cand.numel() - budget + 1).values
        return cand, kth, budget

    def batch_select(self, pre, k=None):
        """The same pairs, cut-off and order as `batch_keep`'s mask, found without a search over
        the whole B × d_sae matrix.

        The budget-th largest of each row's top c = 1.5k entries is a lower bound on the batch's
        cut-off (it is the budget-th largest of a subset of the entries). The entries at or above
        that bound are a small superset of the selection; the exact cut-off is the budget-th
        largest among them, and ties at it are taken in row-major order, as `batch_keep` takes
        them. On a trained Mutual Choice SAE some tokens keep 500-900 latents at k = 32, so no fixed
        number of candidates per row holds the selection: on real layer-8 batches of 1024 this
        takes ~35 ms on one CPU thread where a whole-matrix search took ~185 ms.

        The entries at or above the bound come from the candidates themselves, except in the rows
        whose c-th candidate reaches the bound (a row's entries above its c-th largest value are all
        among its candidates): only those rows, ~17% of a real batch once training has begun, are
        scanned whole (`_at_or_above`). Sorted by (row, column), they are exactly
        ``(pre >= low).nonzero()``. At B = 1024 on 2 CPU threads a whole-matrix comparison and
        ``nonzero`` took ~9 of the ~23 ms of this selection; with `mask_pairs`, ~4-7 of ~13-21."""
        k = self.cfg.k if k is None else k
        B, n = pre.shape
        budget = k * B
        c = min(n, max(k + 1, (3 * k) // 2))
        cand, at = row_topk(pre, c)
        low = cand.reshape(-1).kthvalue(B * c - budget + 1).values
        rows, cols = _at_or_above(pre, cand, at, low)  # row-major, holds every kept pair
        vals = pre[rows, cols]
        kth = vals.kthvalue(vals.numel() - budget + 1).values
        keep = vals > kth
        short = budget - int(keep.sum())
        if short > 0:  # ties at the cut-off: the first ones in row-major order, as batch_keep does
            keep[(vals == kth).nonzero().flatten()[:short]] = True
        return Selection(rows[keep], cols[keep], kth.reshape(1))

    def batch_keep(self, pre, k=None):
        k = self.cfg.k if k is None else k
        # the budget-th largest entry, searched among each row's top 4k first (exact unless some
        # row would keep more than 4k; then over the whole matrix)
        cand, kth, budget = self._candidates(pre, k)
        if bool((cand[:, -1] > kth).any()):
            flat = pre.reshape(-1)
            kth = flat.kthvalue(flat.numel() - budget + 1).values
        keep = pre > kth
        short = budget - int(keep.sum())
        if short > 0:  # ties at the cut-off: take just enough of them
            tie = (pre == kth).reshape(-1).nonzero().flatten()[:short]
            keep.view(-1)[tie] = True
        return keep, kth.reshape(1)


def _at_or_above(pre: torch.Tensor, cand: torch.Tensor, at: torch.Tensor, low: torch.Tensor):
    """``(pre >= low).nonzero(as_tuple=True)`` (rows, columns in row-major order), given each row's
    top c entries `cand` (descending) at columns `at`: a row whose c-th candidate is below `low`
    has every entry ≥ `low` among its candidates; only the other rows are compared whole. When
    they are over a fifth of the batch, the whole matrix is (copying those rows costs more). On
    real layer-8 batches at k = 32 they were ~17% after 60 training steps and ~45% before any;
    B = 4096, 2 CPU threads, with `mask_pairs`: 15.6 against 17.0 ms at 17%, 44 against 21 at 45%."""
    B, n = pre.shape
    whole = cand[:, -1] >= low  # [B]: rows that may hold more than their candidates
    if 5 * int(whole.sum()) > B:  # (an untrained dictionary: ~45% of a real batch) one pass is cheaper
        return mask_pairs(pre >= low)
    pick = (cand >= low) & ~whole[:, None]
    rows = torch.arange(B, device=pre.device)[:, None].expand_as(at)[pick]
    cols = at[pick]
    if bool(whole.any()):
        full = whole.nonzero().flatten()
        r, cc = mask_pairs(pre[full] >= low)
        rows, cols = torch.cat([rows, full[r]]), torch.cat([cols, cc])
    order = sort_keys(rows * n + cols, B * n)[1]  # each (row, column) once: no ties to break
    return rows[order], cols[order]


class FeatureChoiceSAE(_ChoiceSAE):
    """Each feature keeps its top m_j tokens of the batch; uniform or Zipf capacities."""

    architecture = "fc"
    per_feature_threshold = True

    def feature_capacities(self, batch: int, k: int | None = None) -> torch.Tensor:
        c = self.cfg
        k = c.k if k is None else k
        if c.capacity == "uniform":
            probs = torch.ones(c.d_sae, device=self.density.device)
        else:  # by rank of running density
            p = zipf_probs(c.d_sae, c.zipf_alpha, c.zipf_b, self.density.device)
            probs = torch.empty_like(p)
            probs[self.density.argsort(descending=True)] = p
        return capacities(probs, k * batch, batch, min_one=c.min_one)

    def reads_pre_by_latent(self) -> bool:
        return self.training or self.mode == "batch"  # the batch rule ranks each feature's tokens

    def _feature_tops(self, pre, k=None):
        """Each feature's top m_j tokens of the batch: (per-feature cut-offs [n], and per capacity
        group (feature ids [g], their top token ids [g, m_max], which of those are within m_j))."""
        B = pre.shape[0]
        m = self.feature_capacities(B, k)  # [n]
        kth = torch.zeros(pre.shape[1], dtype=pre.dtype, device=pre.device)
        # Zipf capacities range from 1 to hundreds: one top-m_max over every feature would sort each
        # one nearly whole (~0.1 s at B = 1024, ~0.7 s at 5120). Features are grouped by capacity
        # (powers of two) and each group takes only its own largest m. The top-k runs along the rows
        # of preᵀ, where each feature's tokens are contiguous (`encode_sparse` computes pre latent-
        # major for this rule, so preᵀ costs nothing): ~1.7× faster than along the columns of pre at
        # B = 5120, n = 4608 on 2 CPU cores.
        # The top-k is `row_topk` (torch.topk's result, faster on CPU), on preᵀ itself when one group
        # holds every feature (uniform capacities: no copy of the B × n matrix).
        pre_t = pre.t().contiguous()  # [n, B]; a no-op when pre came from `encode_sparse`
        group = torch.ceil(torch.log2(m.clamp_min(1).double())).long()
        groups = []
        for g in torch.unique(group[m > 0]).tolist():
            cols = torch.nonzero((group == g) & (m > 0)).flatten()
            mg = m[cols]
            rows = pre_t if len(cols) == len(pre_t) else pre_t.index_select(0, cols)  # (cols ascending)
            vals, idx = row_topk(rows, int(mg.max()))  # [|cols|, m_max], per feature, descending
            groups.append((cols, idx, torch.arange(idx.shape[1], device=pre.device)[None, :] < mg[:, None]))
            kth[cols] = vals.gather(1, (mg - 1)[:, None])[:, 0]  # cut-off per feature: its m_j-th largest value
        # features with m_j = 0 keep their threshold (or, before any, their largest value)
        none = m == 0
        if bool(none.any()):
            kth[none] = self.threshold[none] if bool(self.threshold_ready) else pre_t[none].max(1).values
        return kth, groups

    def batch_keep(self, pre, k=None):
        kth, groups = self._feature_tops(pre, k)
        keep_t = torch.zeros(pre.shape[1], pre.shape[0], dtype=torch.bool, device=pre.device)
        for cols, idx, ok in groups:
            keep_t[cols] = torch.zeros(len(cols), pre.shape[0], dtype=torch.bool, device=pre.device).scatter_(1, idx, ok)
        return keep_t.t(), kth

    def batch_select(self, pre, k=None):
        """The kept (token, feature) pairs straight from each feature's top tokens, sorted by token
        then feature: the same pairs, in the same order, as ``batch_keep(pre).nonzero()``, without
        the B × d_sae mask."""
        kth, groups = self._feature_tops(pre, k)
        rows = torch.cat([idx[ok] for _, idx, ok in groups]) if groups else pre.new_zeros(0, dtype=torch.long)
        cols = torch.cat([c[:, None].expand_as(idx)[ok] for c, idx, ok in groups]) if groups else rows
        order = sort_keys(rows * pre.shape[1] + cols, pre.numel())[1]  # each pair once: no ties
        return Selection(rows[order], cols[order], kth)


def choice_sae(rule: str, d_in: int, d_sae: int, k: int, seed: int = 0, device=None, **cfg) -> _ChoiceSAE:
    """Shorthand: ``choice_sae("mc", 576, 4608, 32, aux="zipf")``; rule is "mc" or "fc"; other
    `ChoiceConfig` fields as keywords."""
    cls = {"mc": MutualChoiceSAE, "fc": FeatureChoiceSAE}.get(rule)
    if cls is None:
        raise ValueError(f"rule must be 'mc' (Mutual Choice) or 'fc' (Feature Choice), got {rule!r}")
    return cls(ChoiceConfig(d_in=d_in, d_sae=d_sae, k=k, **cfg), seed=seed, device=device)


def zipf_line(fit: dict, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ranks, fitted densities) for plotting a `fit_zipf` result."""
    r = torch.arange(1, n + 1, dtype=torch.float64)
    return r, torch.exp(fit["c"] - fit["alpha"] * (r + fit["b"]).log())


