"""Checks for the lab exercises: your function against the kit's own, and against known mistakes.

Every exercise in the notebooks ends with a line like ::

    sae_kit.checks.check("00.topk_select", topk_select)

which runs `topk_select` on a few seeded cases and compares the result with the kit's
implementation of the same step. When they agree it says so in one line. When they do not, it
compares your result with **mutants**: known wrong versions, each tied to one misconception
("top-k taken over the batch (dim 0), not over the latents"). If yours matches a mutant, the
message names that mistake; otherwise it says on which case, where, and by how much you differ.

`CHECKS` holds every check by exercise id; `tests/test_checks.py` makes sure each check passes on
the kit's implementation and catches each of its mutants with that mutant's message.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

__all__ = ["CHECKS", "Check", "CheckFailed", "Mutant", "check"]


class CheckFailed(AssertionError):
    """Your function's result is not the kit's; the message says how."""

    def _render_traceback_(self):  # IPython shows this instead of a traceback through the kit
        return [str(self)]


@dataclass
class Mutant:
    """A known wrong version of the step, and the misconception it stands for."""

    message: str
    fn: Callable


@dataclass
class Check:
    """One exercise's check.

    Attributes:
        id: the exercise id, ``"NN.name"`` (NN: the notebook).
        task: one line: what the function must do (the stub's message repeats it).
        cases: builds the seeded cases, a list of argument tuples.
        reference: the kit's own implementation, with the exercise's signature.
        mutants: known mistakes.
        atol, rtol: how close a float result must be.
    """

    id: str
    task: str
    cases: Callable[[], list[tuple]]
    reference: Callable
    mutants: list[Mutant] = field(default_factory=list)
    atol: float = 1e-5
    rtol: float = 1e-4
    normalise: Callable | None = None  # maps a result to its comparable form (e.g. ignore idle steps)

    def __call__(self, fn: Callable, quiet: bool = False) -> bool:
        cases = self.cases()
        expected = [self.reference(*_clone(args)) for args in cases]
        got = [fn(*_clone(args)) for args in cases]  # the student's errors (a stub's too) surface here
        first = next(((i, d) for i, (g, e) in enumerate(zip(got, expected))
                      if (d := self.difference(g, e)) is not None), None)
        if first is None:
            if not quiet:
                print(f"✔ {self.id}: matches the kit on {len(cases)} seeded cases.")
            return True
        for m in self.mutants:
            wrong = [m.fn(*_clone(args)) for args in cases]
            if all(self.difference(g, w) is None for g, w in zip(got, wrong)):
                raise CheckFailed(f"✘ {self.id}: your result matches a known mistake: {m.message}.")
        i, diff = first
        raise CheckFailed(f"✘ {self.id}: differs from the kit on case {i + 1} of {len(cases)} "
                          f"({_describe(cases[i])}): {diff}.")

    def difference(self, got: Any, expected: Any) -> str | None:
        """None if `got` equals `expected` (floats within atol/rtol), else what differs."""
        if self.normalise is not None:
            try:
                got = self.normalise(got)
            except Exception:  # a malformed result: let the comparison below say what is wrong
                pass
            expected = self.normalise(expected)
        return _difference(got, expected, self.atol, self.rtol)


def _clone(args: tuple) -> tuple:
    """Fresh copies, so a function that writes into its inputs cannot spoil the next call."""
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _describe(args: tuple) -> str:
    parts = []
    for a in args:
        if isinstance(a, torch.Tensor):
            parts.append(f"tensor {tuple(a.shape)}" if a.ndim else f"{a.item():.4g}")
        else:
            parts.append(repr(a))
    return ", ".join(parts)


def _difference(got, expected, atol, rtol, where: str = "the result") -> str | None:
    if isinstance(expected, tuple):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            n = len(got) if isinstance(got, (tuple, list)) else 1
            return f"{where} should be a tuple of {len(expected)} values, got {n}"
        for j, (g, e) in enumerate(zip(got, expected)):
            d = _difference(g, e, atol, rtol, f"value {j + 1} of the result")
            if d is not None:
                return d
        return None
    if isinstance(expected, torch.Tensor):
        if isinstance(got, (list, tuple)) or type(got).__module__ == "numpy":
            try:
                got = torch.as_tensor(got)
            except (TypeError, ValueError, RuntimeError):
                pass
        if not isinstance(got, torch.Tensor):
            return f"{where} should be a tensor, got {type(got).__name__}"
        if tuple(got.shape) != tuple(expected.shape):
            return f"{where} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
        if expected.dtype == torch.bool and got.dtype != torch.bool and not bool(((got == 0) | (got == 1)).all()):
            return f"{where} should be a boolean mask (True/False), got values other than 0 and 1"
        if not expected.is_floating_point() and expected.dtype != torch.bool and got.is_floating_point() \
                and not bool((got == got.round()).all()):
            return f"{where} should hold whole numbers (counts), got fractions"
        if expected.dtype == torch.bool or not expected.is_floating_point():
            bad = got.to(expected.dtype) != expected
            if bad.any():
                at = tuple(int(i) for i in bad.nonzero()[0])
                return (f"{where} differs at {int(bad.sum())} of {bad.numel()} entries, first at index {at} "
                        f"(yours {got[at].item()}, expected {expected[at].item()})")
            return None
        g, e = got.detach().double(), expected.detach().double()
        if not torch.isfinite(g).all():
            return f"{where} holds NaN or Inf"
        err = (g - e).abs()
        bad = err > atol + rtol * e.abs()
        if bad.any():
            at = tuple(int(i) for i in torch.unravel_index((err * bad).flatten().argmax(), g.shape))
            return (f"{where} differs by up to {float(err.max()):.3g} (at index {at}: yours {g[at].item():.5g}, "
                    f"expected {e[at].item():.5g})")
        return None
    if isinstance(expected, float):
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if isinstance(got, bool) or not isinstance(got, numbers.Real):
            return f"{where} should be a number, got {type(got).__name__}"
        g = float(got)
        if not abs(g - expected) <= atol + rtol * abs(expected):
            return f"{where} is {g:.6g}, expected {expected:.6g}"
        return None
    if got != expected:
        return f"{where} is {got!r}, expected {expected!r}"
    return None


CHECKS: dict[str, Check] = {}


def register(c: Check) -> Check:
    if c.id in CHECKS:
        raise ValueError(f"check {c.id} registered twice")
    CHECKS[c.id] = c
    return c


def check(exercise_id: str, fn: Callable, quiet: bool = False) -> bool:
    """Run exercise `exercise_id`'s check on your function `fn`; True if it passes, else `CheckFailed`."""
    if exercise_id not in CHECKS:
        raise KeyError(f"no check named {exercise_id!r}; the checks are: {', '.join(sorted(CHECKS))}")
    if not callable(fn):
        raise TypeError(f"check({exercise_id!r}, fn) needs your function, got {type(fn).__name__}")
    return CHECKS[exercise_id](fn, quiet=quiet)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ==== 00 · quickstart ============================================================================
def _topk_cases():
    out = []
    for seed, (B, n, k) in enumerate([(6, 20, 3), (8, 32, 5), (5, 12, 4)]):
        pre = torch.randn(B, n, generator=_gen(seed)) - 0.8  # most entries negative
        pre[0] = -torch.rand(n, generator=_gen(seed + 10))  # a token with no positive pre-activation
        out.append((pre, k))
    return out


def _topk_ref(pre, k):
    from .saes import topk_sae

    sel = topk_sae(2, pre.shape[1], k).select(pre)
    return torch.zeros_like(pre).index_put((sel.rows, sel.cols), pre[sel.rows, sel.cols].relu())


def _scatter_topk(pre, idx, vals):
    return torch.zeros_like(pre).scatter(-1, idx, vals)


register(Check(
    id="00.topk_select",
    task="keep each token's k largest pre-activations (ReLU'd), zero elsewhere: pre [B, d_sae] -> z [B, d_sae]",
    cases=_topk_cases, reference=_topk_ref,
    mutants=[
        Mutant("top-k taken over the batch (dim 0), not over the latents (dim -1): each latent kept its k "
               "strongest tokens", lambda pre, k: torch.zeros_like(pre).scatter(
                   0, pre.topk(k, dim=0).indices, pre.topk(k, dim=0).values.relu())),
        Mutant("the ReLU after the top-k is missing: a token whose k-th largest value is negative keeps "
               "negative activations", lambda pre, k: _scatter_topk(pre, pre.topk(k, -1).indices, pre.topk(k, -1).values)),
        Mutant("top-k of |pre|, the largest magnitudes, not the largest values",
               lambda pre, k: _scatter_topk(pre, pre.abs().topk(k, -1).indices,
                                            pre.gather(-1, pre.abs().topk(k, -1).indices).relu())),
        Mutant("the k smallest values kept (topk(..., largest=False))",
               lambda pre, k: _scatter_topk(pre, pre.topk(k, -1, largest=False).indices,
                                            pre.topk(k, -1, largest=False).values.relu())),
    ]))


def _recon_cases():
    out = []
    for seed, (B, d) in enumerate([(40, 8), (64, 16), (30, 5)]):
        g = _gen(seed)
        x = torch.randn(B, d, generator=g) * torch.linspace(0.5, 3, d) + torch.linspace(-4, 6, d)  # offset means
        x[0] *= 12  # one high-norm token, like the residual stream's massive activations
        x_hat = x + 0.6 * torch.randn(B, d, generator=g) * x.std(0)
        out.append((x, x_hat))
    return out


def _uncentred_ratio_of_sums(x, x_hat):
    return float((x - x_hat).pow(2).sum() / x.pow(2).sum())


def _mean_of_centred_token_ratios(x, x_hat):
    return float(((x - x_hat).pow(2).sum(1) / (x - x.mean(0)).pow(2).sum(1)).mean())


def _fvu_ref(x, x_hat):
    from .metrics import fvu

    return fvu(x, x_hat)


register(Check(
    id="00.fvu",
    task="fraction of variance unexplained: Σ_t ‖x_t − x̂_t‖² / Σ_t ‖x_t − x̄‖², x̄ the mean token",
    cases=_recon_cases, reference=_fvu_ref,
    mutants=[
        Mutant("FVU divided by the uncentred mean square Σ‖x_t‖²: the mean token x̄ was not subtracted",
               _uncentred_ratio_of_sums),
        Mutant("the mean of per-token ratios ‖x_t − x̂_t‖² / ‖x_t − x̄‖², not a ratio of sums",
               _mean_of_centred_token_ratios),
        Mutant("one global mean (x.mean(), a number) subtracted instead of the mean token x̄ = x.mean(0)",
               lambda x, xh: float((x - xh).pow(2).sum() / (x - x.mean()).pow(2).sum())),
        Mutant("the plain MSE, not divided by the variance at all",
               lambda x, xh: float((x - xh).pow(2).mean())),
        Mutant("MSE over x.var(): one global mean over all entries, and N − 1 in the variance; the FVU "
               "divides sums, with the mean token x̄ = x.mean(0)",
               lambda x, xh: float((x - xh).pow(2).mean() / x.var())),
        Mutant("the mean of per-dimension FVUs (scikit-learn's r2 averaging), not one ratio of sums over "
               "all dimensions", lambda x, xh: float(((x - xh).pow(2).sum(0) / (x - x.mean(0)).pow(2).sum(0)).mean())),
    ]))


def _nmse_ref(x, x_hat):
    from .metrics import nmse

    return nmse(x, x_hat)


register(Check(
    id="00.nmse",
    task="per-token normalised MSE: the mean over tokens of ‖x_t − x̂_t‖² / ‖x_t‖²",
    cases=_recon_cases, reference=_nmse_ref,
    mutants=[
        Mutant("a ratio of sums Σ‖x_t − x̂_t‖² / Σ‖x_t‖²: high-norm tokens dominate it, which is exactly what "
               "the per-token version avoids", _uncentred_ratio_of_sums),
        Mutant("each token's error divided by its distance to the mean token ‖x_t − x̄‖², not by ‖x_t‖²",
               _mean_of_centred_token_ratios),
        Mutant("the norms were not squared: mean of ‖x_t − x̂_t‖ / ‖x_t‖",
               lambda x, xh: float(((x - xh).norm(dim=1) / x.norm(dim=1)).mean())),
    ]))


def _proj_cases():
    out = []
    for seed, (n, d) in enumerate([(12, 6), (20, 9), (7, 4)]):
        g = _gen(seed)
        W = torch.randn(n, d, generator=g)
        W = W / W.norm(dim=1, keepdim=True)
        out.append((W, torch.randn(n, d, generator=g)))
    return out


def _proj_ref(W_dec, grad):
    from .saes import topk_sae

    sae = topk_sae(W_dec.shape[1], W_dec.shape[0], 1)
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
    sae.W_dec.grad = grad.clone()
    sae.project_decoder_grad()
    return sae.W_dec.grad


register(Check(
    id="00.project_decoder_grad",
    task="remove from each atom's gradient (row of grad) its component along that atom (row of W_dec, unit norm)",
    cases=_proj_cases, reference=_proj_ref,
    mutants=[
        Mutant("the component was removed along the columns of W_dec (one per input dimension), not along each "
               "atom (row)", lambda W, g: g - (g * W).sum(0, keepdim=True) * W),
        Mutant("the parallel component was kept and the tangent one removed (grad·d)d instead of "
               "grad − (grad·d)d", lambda W, g: (g * W).sum(1, keepdim=True) * W),
        Mutant("one number (the whole matrices' inner product) was used for every atom",
               lambda W, g: g - (g * W).sum() * W),
    ]))


def _ce_cases():
    out = []
    for seed, (N, T, V) in enumerate([(3, 8, 11), (2, 6, 7)]):
        g = _gen(seed)
        clean = torch.log_softmax(torch.randn(N, T, V, generator=g) * 2, -1)
        spliced = torch.log_softmax(clean + torch.randn(N, T, V, generator=g), -1)
        spliced[:, 0] = torch.log_softmax(torch.randn(N, V, generator=g) * 6, -1)  # position 0 is far off
        tokens = torch.randint(0, V, (N, T), generator=g)
        out.append((clean, spliced, tokens))
    return out


def _ce_ref(clean, spliced, tokens):
    from .splice import delta_ce_from_logp

    return delta_ce_from_logp(clean, spliced, tokens)


def _ce_at(lp, tokens, pos: slice, shift: int = 1):
    t = tokens[:, pos.start + shift: (pos.stop + shift) if pos.stop is not None else None]
    return -lp[:, pos][:, : t.shape[1]].gather(-1, t[..., None]).mean()


register(Check(
    id="00.delta_ce",
    task="ΔCE = CE(spliced) − CE(clean) over the predictions from positions 1..T−2, each of the next token",
    cases=_ce_cases, reference=_ce_ref,
    mutants=[
        Mutant("ΔCE includes position 0, the attention sink (the kit neither stores nor splices it)",
               lambda c, s, t: float(_ce_at(s, t, slice(0, t.shape[1] - 1)) - _ce_at(c, t, slice(0, t.shape[1] - 1)))),
        Mutant("off by one: each position was scored against its own token, not the next one",
               lambda c, s, t: float(_ce_at(s, t, slice(1, t.shape[1] - 1), 0) - _ce_at(c, t, slice(1, t.shape[1] - 1), 0))),
        Mutant("the sign is flipped: CE(clean) − CE(spliced)",
               lambda c, s, t: -_ce_ref(c, s, t)),
    ]))


# ==== 01 · TopK vs Feature / Mutual Choice =========================================================
def _choice_cases():
    return [(torch.randn(B, n, generator=_gen(s)) * torch.linspace(0.3, 2, B)[:, None], k)
            for s, (B, n, k) in enumerate([(8, 12, 3), (10, 16, 2), (6, 30, 4)])]


def _mc_ref(pre, k):
    from .saes import choice_sae

    return choice_sae("mc", 2, pre.shape[1], k).batch_keep(pre)[0]


def _mask_of(pre, flat_idx):
    return torch.zeros(pre.numel(), dtype=torch.bool).index_fill(0, flat_idx, True).view_as(pre)


register(Check(
    id="01.mutual_choice_keep",
    task="Mutual Choice: keep the k·B largest entries of the whole B × n matrix; return the boolean keep mask",
    cases=_choice_cases, reference=_mc_ref,
    mutants=[
        Mutant("k kept per token (dim -1): that is TopK, not Mutual Choice",
               lambda pre, k: torch.zeros_like(pre, dtype=torch.bool).scatter(-1, pre.topk(k, -1).indices, True)),
        Mutant("k entries kept in the whole batch, not k·B (the budget is k per token on average)",
               lambda pre, k: _mask_of(pre, pre.flatten().topk(k).indices)),
        Mutant("the same number k·B/n kept in every column (per feature): that is Feature Choice",
               lambda pre, k: torch.zeros_like(pre, dtype=torch.bool).scatter(
                   0, pre.topk(max(1, k * pre.shape[0] // pre.shape[1]), 0).indices, True)),
    ]))


def _zipf_cases():
    out = []
    for s, (n, alpha, b) in enumerate([(10, 1.0, 1.0), (16, 0.7, 3.0), (8, 1.4, 0.5)]):
        out.append((torch.rand(n, generator=_gen(s)), alpha, b))
    return out


def _zipf_ref(density, alpha, b):
    from .saes.choice import zipf_probs

    p = zipf_probs(len(density), alpha, b)
    out = torch.empty_like(p)
    out[density.argsort(descending=True)] = p
    return out


def _zipf_by_rank(density, p, descending=True):
    out = torch.empty_like(p)
    out[density.argsort(descending=descending)] = p
    return out


def _zipf_p(n, alpha, b, start=1):
    r = torch.arange(start, n + start, dtype=torch.float64)
    p = (r + b) ** (-alpha)
    return (p / p.sum()).float()


register(Check(
    id="01.zipf_shares",
    task="each feature's share of the budget: p ∝ (rank + b)^−α, rank 1 = the densest feature, shares summing to 1",
    cases=_zipf_cases, reference=_zipf_ref,
    mutants=[
        Mutant("ranked ascending: the rarest feature got the largest share (sort densities in descending order)",
               lambda d, a, b: _zipf_by_rank(d, _zipf_p(len(d), a, b), descending=False)),
        Mutant("shares given in feature-index order, not by density rank (the rich-get-richer loop needs ranks)",
               lambda d, a, b: _zipf_p(len(d), a, b)),
        Mutant("ranks counted from 0, not from 1", lambda d, a, b: _zipf_by_rank(d, _zipf_p(len(d), a, b, start=0))),
        Mutant("the permutation applied the wrong way round: argsort gives the feature at each rank, not each "
               "feature's rank (scatter the shares to those positions, or argsort twice)",
               lambda d, a, b: _zipf_p(len(d), a, b)[d.argsort(descending=True)]),
        Mutant("the shares do not sum to 1 (not normalised)",
               lambda d, a, b: _zipf_by_rank(d, (torch.arange(1, len(d) + 1, dtype=torch.float64) + b).pow(-a).float())),
    ]))


# ==== 02 · gradient SAEs =========================================================================
def _gsae_cases():
    out = []
    for s, (B, d, n, beta) in enumerate([(5, 6, 14, 1.0), (7, 4, 10, 0.3), (4, 8, 20, 2.0)]):
        g = _gen(s)
        W = torch.randn(n, d, generator=g)
        W = W / W.norm(dim=1, keepdim=True)
        pre = torch.randn(B, n, generator=g)
        grad = torch.randn(B, d, generator=g) * torch.logspace(-2, 1, B)[:, None]  # tokens of very different loss
        out.append((pre, grad, W, beta))
    return out


def _gsae_ref(pre, grad, W_dec, beta):
    from .saes import gradient_sae

    sae = gradient_sae(W_dec.shape[1], W_dec.shape[0], 1, beta=beta)
    with torch.no_grad():
        sae.W_dec.copy_(W_dec)
    return sae.selection_score(pre, grad)


def _gsae_with(pre, grad, W, beta, signed=False, norm_dim=1, relu=True):
    z = pre.clamp_min(0) if relu else pre
    a = grad @ W.t()
    a = a if signed else a.abs()
    a = a / a.mean(norm_dim, keepdim=True) if norm_dim is not None else a
    return z * (1 + beta * a)


register(Check(
    id="02.gsae_score",
    task="g-SAE selection score: z·(1 + β·a) with z = ReLU(pre), a = |W_dec g| scaled so each token's a averages 1",
    cases=_gsae_cases, reference=_gsae_ref,
    mutants=[
        Mutant("|d_i·g| not scaled per token: tokens with large gradients (high loss) get a far larger push",
               lambda p, g, W, b: _gsae_with(p, g, W, b, norm_dim=None)),
        Mutant("the signed d_i·g used instead of its magnitude |d_i·g|", lambda p, g, W, b: _gsae_with(p, g, W, b, signed=True)),
        Mutant("a scaled over the batch (dim 0), not per token (dim 1)", lambda p, g, W, b: _gsae_with(p, g, W, b, norm_dim=0)),
        Mutant("the raw pre-activation, not ReLU(pre): a negative pre-activation times a large gradient term "
               "becomes a large negative score", lambda p, g, W, b: _gsae_with(p, g, W, b, relu=False)),
    ]))


# ==== 03 · matching pursuit ======================================================================
def _mp_cases():
    out = []
    for s, (B, d, n, steps) in enumerate([(4, 6, 10, 3), (5, 8, 16, 5), (3, 4, 6, 6)]):
        g = _gen(s)
        D = torch.randn(n, d, generator=g)
        D = D / D.norm(dim=1, keepdim=True)
        x = torch.randn(B, d, generator=g)
        out.append((x, D, steps))
    g = _gen(9)  # every correlation negative: a non-negative pursuit must stand still (values 0)
    D = torch.rand(6, 4, generator=g) + 0.1
    out.append((-torch.rand(3, 4, generator=g) - 0.1, D / D.norm(dim=1, keepdim=True), 3))
    return out


def _mp_ref(x, D, steps):
    from .saes import mp_sae

    sae = mp_sae(D.shape[1], D.shape[0], steps)
    with torch.no_grad():
        sae.W_dec.copy_(D)
        sae.b_dec.zero_()
    idx, vals = sae.choose(x, steps)
    r = x - (vals[..., None] * D[idx]).sum(1)
    return idx, vals, r


def _mp_wrong(x, D, steps, update=True, relu=True, absmax=False):
    c = x @ D.t()
    G = D @ D.t()
    B = x.shape[0]
    idx = torch.zeros(B, steps, dtype=torch.long)
    vals = torch.zeros(B, steps)
    for t in range(steps):
        v, j = (c.abs() if absmax else c).max(1)
        v = c.gather(1, j[:, None])[:, 0]
        v = v.clamp_min(0) if relu else v
        idx[:, t], vals[:, t] = j, v
        if update:
            c = c - v[:, None] * G[j]
    r = x - (vals[..., None] * D[idx]).sum(1)
    return idx, vals, r


register(Check(
    id="03.mp_encode",
    task="non-negative matching pursuit with the Gram trick: per step pick j = argmax c, a = ReLU(c_j), "
         "c −= a·G[j]; return (idx [B, steps], vals [B, steps], residual [B, d]) (idx is not checked where vals = 0)",
    cases=_mp_cases, reference=_mp_ref, normalise=lambda out: (torch.where(out[1] > 0, out[0], -1), *out[1:]),
    mutants=[
        Mutant("MP subtracted ⟨x, d⟩ instead of ⟨r, d⟩: the correlations were never updated, so every step "
               "reads the input, not the residual", lambda x, D, s: _mp_wrong(x, D, s, update=False)),
        Mutant("the coefficient was not ReLU'd: a negative correlation was subtracted (this pursuit is "
               "non-negative)", lambda x, D, s: _mp_wrong(x, D, s, relu=False)),
        Mutant("the atom was chosen by |c| (largest magnitude), not by the largest positive correlation",
               lambda x, D, s: _mp_wrong(x, D, s, absmax=True, relu=False)),
    ]))


def _l0_cases():
    out = []
    for s, (B, steps, n) in enumerate([(6, 5, 4), (8, 6, 5)]):
        g = _gen(s)
        idx = torch.randint(0, n, (B, steps), generator=g)  # few atoms: repeats are common
        vals = torch.rand(B, steps, generator=g) * (torch.rand(B, steps, generator=g) > 0.25)
        out.append((idx, vals))
    return out


def _l0_ref(idx, vals):
    from .saes.base import SparseCode

    B, s = idx.shape
    rows = torch.arange(B).repeat_interleave(s)
    return SparseCode(rows, idx.reshape(-1), vals.reshape(-1), (B, int(idx.max()) + 1)).l0_per_token()


def _l0_wrong(idx, vals, distinct=True, positive=True):
    out = []
    for i, v in zip(idx, vals):
        keep = v > 0 if positive else torch.ones_like(v, dtype=torch.bool)
        out.append(len(set(i[keep].tolist())) if distinct else int(keep.sum()))
    return torch.tensor(out)


register(Check(
    id="03.distinct_l0",
    task="L0 per token of a pursuit code: the number of distinct atoms with a positive value",
    cases=_l0_cases, reference=_l0_ref,
    mutants=[
        Mutant("pursuit steps counted, not distinct atoms: an atom picked twice counts once",
               lambda i, v: _l0_wrong(i, v, distinct=False)),
        Mutant("steps whose value is 0 counted as active (a stopped pursuit keeps picking with value 0)",
               lambda i, v: _l0_wrong(i, v, positive=False)),
    ]))


# ==== 04 · semi-NMF ==============================================================================
def _snmf_cases():
    out = []
    for s, (d, n, K) in enumerate([(10, 30, 3), (16, 40, 5)]):
        g = _gen(s)
        A = torch.randn(d, K, generator=g) @ torch.rand(K, n, generator=g) + 0.1 * torch.randn(d, n, generator=g)
        F = torch.randn(d, K, generator=g)
        G = torch.rand(n, K, generator=g) + 0.05
        out.append((A, F, G))
    return out


from .snmf import _neg, _pos  # noqa: E402  (the kit's own positive / negative parts)


def _snmf_G_ref(A, F, G):
    from .snmf import update_G

    return update_G(A, F, G)


register(Check(
    id="04.snmf_update_G",
    task="the multiplicative update G ⊙ sqrt((P⁺ + G Q⁻) / (P⁻ + G Q⁺ + 1e-6)), P = AᵀF, Q = FᵀF",
    cases=_snmf_cases, reference=_snmf_G_ref,
    mutants=[
        Mutant("the positive and negative parts were swapped (P⁻ + G Q⁺ on top): the update then climbs the loss",
               lambda A, F, G: G * torch.sqrt((_neg(A.t() @ F) + G @ _pos(F.t() @ F))
                                              / (_pos(A.t() @ F) + G @ _neg(F.t() @ F) + 1e-6))),
        Mutant("the square root is missing: the step is too large (Ding et al.'s update takes the root)",
               lambda A, F, G: G * (_pos(A.t() @ F) + G @ _neg(F.t() @ F)) / (_neg(A.t() @ F) + G @ _pos(F.t() @ F) + 1e-6)),
        Mutant("the G·Q⁻ and G·Q⁺ terms were left out (only P⁺ / P⁻): the update ignores how the features "
               "overlap (Q = FᵀF)",
               lambda A, F, G: G * torch.sqrt(_pos(A.t() @ F) / (_neg(A.t() @ F) + 1e-6))),
    ]))


def _snmf_F_cases():
    return [(A, G, keep) for (A, _, G), keep in zip(_snmf_cases(), (3, 4))]


def _snmf_F_ref(A, G, keep):
    from .snmf import update_F

    return update_F(A, G, keep)


def _F_ls(A, G):
    return A @ G @ torch.linalg.inv(G.t() @ G + 1e-6 * torch.eye(G.shape[1]))


def _keep_top(F, keep, dim=0, signed=False):
    score = F if signed else F.abs()
    t = score.topk(keep, dim=dim).values.narrow(dim, keep - 1, 1)
    return torch.where(score >= t, F, torch.zeros(()))


register(Check(
    id="04.snmf_update_F",
    task="F = A G (GᵀG + 1e-6·I)⁻¹, then each column (feature) keeps its `keep` largest |F| entries, zero elsewhere",
    cases=_snmf_F_cases, reference=_snmf_F_ref, atol=1e-4,
    mutants=[
        Mutant("each row (neuron) kept its largest entries, not each column (feature)",
               lambda A, G, k: _keep_top(_F_ls(A, G), min(k, G.shape[1]), dim=1)),
        Mutant("the largest signed values kept, not the largest |F|: strongly negative neuron weights were dropped",
               lambda A, G, k: _keep_top(_F_ls(A, G), k, signed=True)),
        Mutant("no sparsification: the dense least-squares F", lambda A, G, k: _F_ls(A, G)),
    ]))


# ==== 05 · dark matter ===========================================================================
def _dm_cases():
    out = []
    for s, (n, d, m) in enumerate([(60, 4, 3), (80, 5, 2)]):
        g = _gen(s)
        x = torch.randn(2 * n, d, generator=g) + 2.0
        e = x @ torch.randn(d, m, generator=g) + 1.5 + 0.5 * torch.randn(2 * n, m, generator=g)
        out.append((x[:n], e[:n], x[n:], e[n:]))
    return out


def _dm_ref(x_fit, e_fit, x_test, e_test):
    from .dark_matter import lstsq, predict, r2_scores

    return r2_scores(e_test, predict(x_test, lstsq(x_fit, e_fit)))["r2_mean_dim"]


def _dm_wrong(x_fit, e_fit, x_test, e_test, intercept=True, centred=True, test=True, pooled=False, fit_mean=False):
    def X(x):
        return torch.cat([x, torch.ones(len(x), 1)], 1).double() if intercept else x.double()
    W = torch.linalg.lstsq(X(x_fit), e_fit.double()).solution
    xs, es = (x_test, e_test) if test else (x_fit, e_fit)
    es = es.double()
    sse = (es - X(xs) @ W).pow(2).sum(0)
    mean = e_fit.double().mean(0) if fit_mean else es.mean(0)
    sst = (es - mean).pow(2).sum(0) if centred else es.pow(2).sum(0)
    return float(1 - sse.sum() / sst.sum()) if pooled else float((1 - sse / sst).mean())


register(Check(
    id="05.error_r2",
    task="fit e ≈ [x, 1]·W by least squares on the fit tokens; return the held-out R², per error dimension "
         "then averaged",
    cases=_dm_cases, reference=_dm_ref, atol=1e-6,
    mutants=[
        Mutant("no intercept column: the fit was forced through the origin, and the error's mean is not "
               "predicted", lambda *a: _dm_wrong(*a, intercept=False)),
        Mutant("R² against the uncentred total Σe² instead of Σ(e − ē)²: it flatters any fit of an error with "
               "a non-zero mean", lambda *a: _dm_wrong(*a, centred=False)),
        Mutant("scored on the tokens the map was fitted on, not the held-out ones",
               lambda *a: _dm_wrong(*a, test=False)),
        Mutant("one pooled R² (1 − ΣSSE / ΣSST over all dimensions), not the mean of per-dimension R² (the kit "
               "reports the pooled one too, as vector_r2_global)", lambda *a: _dm_wrong(*a, pooled=True)),
        Mutant("the test errors centred on the fit tokens' mean, not on their own",
               lambda *a: _dm_wrong(*a, fit_mean=True)),
    ]))
