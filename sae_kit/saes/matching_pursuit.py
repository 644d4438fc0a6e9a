"""Matching-Pursuit SAE (Costa, Fel, Lubana, Tolooshams, Ba 2025, "From Flat to Hierarchical:
Extracting Sparse Representations with Matching Pursuit", arXiv 2506.03093).

The encoder is not one linear map but `k` unrolled steps of non-negative matching pursuit over the
decoder's own unit-norm atoms (the SAE is tied, ``W_enc = W_decᵀ``, as in SAELens)::

    r = x − b_dec;  z = 0
    repeat k times:  j = argmax_i ReLU(⟨r, d_i⟩);  a = ReLU(⟨r, d_j⟩);  z_j += a;  r −= a·d_j
    x̂ = b_dec + Σ z_j d_j  (= x − r)

After each step the residual is orthogonal to the atom just used (``⟨r, d_j⟩ = 0``) and its norm
drops by exactly ``a``: ``‖r_t‖² = ‖r_{t−1}‖² − a²``. So the error can only fall as steps are added,
and inference may run more steps than training did, or run until ``‖r‖`` falls below a threshold.

CPU speed comes from the Gram trick: the correlations ``c = D r`` are computed once, then updated
with ``c −= a·G[j]`` (``G = D Dᵀ``), so a step costs B×d_sae instead of B×d_in×d_sae. Only the
atom choice uses that path (no gradient, as in SAELens); the values' gradients then run the
recurrence backwards along the chosen atoms (`_PursuitValues`), which costs k·B·d_in. Two more
exact savings: G is symmetric, so only its upper blocks are multiplied (`gram_into`), and each
step's argmax is taken block by block (`row_max`), since a row-wise max-with-index is not
vectorised on CPU while a block maximum is.

Atom dropout (the authors' remedy for dead atoms): for the first ``dropout_tokens`` training
tokens, each pursuit step may only pick from a random ``1 − dropout`` share of the atoms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..validate import integer, real
from .base import (SAE, SAEConfig, SparseCode, _check_input, copy_transposed, fvu_loss, sparse_decode,
                   training_buffer)


@dataclass
class MPConfig(SAEConfig):
    k: int = 32  # pursuit steps per token in training (an atom may be picked again, so L0 ≤ k)
    aux_coef: float = 0.0  # no auxiliary loss (atom dropout is the authors' remedy for dead atoms)
    dropout: float = 0.75  # share of atoms hidden at each pursuit step while dropout lasts
    dropout_tokens: int = 0  # training tokens during which atom dropout is on (0 = off)
    residual_threshold: float = 0.0  # inference stops for a token once ‖r‖ falls below it (0 = k steps)

    def __post_init__(self):
        super().__post_init__()
        self.dropout = real("dropout", self.dropout, min=0, max=1)
        self.dropout_tokens = integer("dropout_tokens", self.dropout_tokens, min=0)
        self.residual_threshold = real("residual_threshold", self.residual_threshold, min=0)

    def check_budget(self) -> None:
        """Any number of steps ≥ 1: pursuit may run more steps than it has atoms."""
        if self.k <= 0:
            raise ValueError(f"k (pursuit steps) must be at least 1, got {self.k}")


ARGMAX_BLOCK = 128  # row_max's block width
GRAM_BLOCKS = 3  # gram_into's row blocks: (b + 1) / (2b) of the full product's work
GRAM_BLOCKS_FROM = 1024  # below this many atoms G is one product: the blocks would save nothing
# CPU: tokens are pursued in blocks whose correlations fill ~8 MiB (a block's per-step operations
# pay a fixed overhead each, smaller blocks keep their correlations in cache: on an Intel Xeon
# (family 6 model 207) a training step was 5-6% faster at 8 MiB than at 4, and 16 was no better at
# batch 1024; a block's correlations plus G's chosen rows, ~16 MiB, still fit the 32 MiB L3 of an
# AMD EPYC core complex)
PURSUIT_BLOCK_BYTES = 1 << 23


def row_max(c: torch.Tensor, block: int = ARGMAX_BLOCK):
    """``c.max(1)`` for c [B, n]: the same values and the same (first) indices, taken as the maximum of
    per-block maxima (a last, shorter block holds the n mod `block` tail). On CPU ``max(1)`` with
    indices walks each row element by element, while ``amax`` over blocks is vectorised: ~5× faster
    at 1024 × 4608. `c` itself is only read, so the caller keeps it contiguous for its arithmetic."""
    B, n = c.shape
    m = n - n % block  # the columns in whole blocks
    if m == 0:
        return c.max(1)
    cb = c[:, :m].view(B, m // block, block)
    tops = cb.amax(2)  # [B, m/block]
    if m < n:
        tops = torch.cat([tops, c[:, m:].amax(1, keepdim=True)], 1)
    blk = tops.argmax(1)  # the first block holding the row's maximum
    rows = torch.arange(B, device=c.device)
    inner = cb[rows, blk.clamp_max(m // block - 1)].argmax(1)  # its first position there
    j = blk * block + inner
    if m < n:
        j = torch.where(blk == m // block, m + c[:, m:].argmax(1), j)
    return tops.gather(1, blk[:, None]).squeeze(1), j


def gram_into(W: torch.Tensor, out: torch.Tensor, blocks: int = GRAM_BLOCKS) -> torch.Tensor:
    """``out = W Wᵀ`` (W [n, d]). From `GRAM_BLOCKS_FROM` atoms on, only the blocks on and above the
    diagonal are multiplied and the rest mirrored: 2/3 of the full product's work at the default 3
    blocks, and an exactly symmetric G. One product's G is symmetric only up to its last bits where
    the BLAS sums (i, j) and (j, i) in different orders, so the two agree to rounding, not always bit
    for bit (they did on all 16 of the kit's cached lab MP SAEs, at 1 and 2 threads)."""
    n = W.shape[0]
    if n < GRAM_BLOCKS_FROM:
        return torch.mm(W, W.t(), out=out)
    edges = [round(i * n / blocks) for i in range(blocks + 1)]
    for a, b in zip(edges[:-1], edges[1:]):
        torch.mm(W[a:b], W[a:].t(), out=out[a:b, a:])
    for a, b in zip(edges[:-1], edges[1:]):
        copy_transposed(out[b:, a:b], out[a:b, b:])
    return out


class _PursuitValues(torch.autograd.Function):
    """The pursuit's values a_t = ReLU(⟨r_{t−1}, d_{j_t}⟩), r_t = r_{t−1} − a_t d_{j_t}, r_0 = x − b_dec,
    with the atoms j_t already chosen (`choose`, which also computed the values).

    The backward runs the recurrence in reverse without storing the k residuals: each is rebuilt
    from the next, r_{t−1} = r_t + a_t d_{j_t}. With R̄ = ∂L/∂r_t carried back from the end (0 at t = k),
    ā_t = ∂L/∂a_t − R̄·d_{j_t} (masked where a_t = 0), then ∂d_{j_t} += ā_t r_{t−1} − a_t R̄ and
    R̄ += ā_t d_{j_t}; ∂x = R̄ at t = 0 and ∂b_dec = −Σ_tokens R̄. That is ~7 passes over a B×d_in
    matrix per step, against autograd's replay of the whole recurrence (`make bench`)."""

    @staticmethod
    def forward(ctx, x, b_dec, W_dec, idx, vals):
        ctx.save_for_backward(x, b_dec, W_dec, idx, vals)
        return vals.clone()

    @staticmethod
    def backward(ctx, g_vals):
        x, b_dec, W_dec, idx, vals = ctx.saved_tensors
        W = W_dec.detach()
        B, steps = idx.shape
        offsets = torch.arange(0, B * steps, steps, device=idx.device)
        r = (x - b_dec).detach() - F.embedding_bag(idx.reshape(-1), W, offsets, mode="sum",
                                                   per_sample_weights=vals.reshape(-1))
        live = (vals > 0).to(vals.dtype)
        r_bar = torch.zeros_like(r)
        g_W = torch.zeros_like(W)
        d, tmp, tmp2 = (torch.empty_like(r) for _ in range(3))  # B×d_in buffers reused by every step
        for t in range(steps - 1, -1, -1):
            torch.index_select(W, 0, idx[:, t], out=d)
            a = vals[:, t:t + 1]
            r.add_(torch.mul(a, d, out=tmp))  # r_{t-1}
            a_bar = (g_vals[:, t] - torch.mul(r_bar, d, out=tmp).sum(1)) * live[:, t]
            torch.mul(r, a_bar[:, None], out=tmp).sub_(torch.mul(a, r_bar, out=tmp2))  # ā_t r_{t−1} − a_t R̄
            g_W.index_add_(0, idx[:, t], tmp)
            r_bar.add_(torch.mul(a_bar[:, None], d, out=tmp))
        g_x = r_bar if ctx.needs_input_grad[0] else None
        g_b = -r_bar.sum(0) if ctx.needs_input_grad[1] else None
        return g_x, g_b, g_W if ctx.needs_input_grad[2] else None, None, None


class MatchingPursuitSAE(SAE):
    """Tied dictionary encoded by non-negative matching pursuit; its budget `k` is the number of
    pursuit steps (`MPConfig` has the dropout and residual-threshold knobs)."""

    architecture = "matching_pursuit"
    config_class = MPConfig
    modes = ("pursuit",)
    budget = "pursuit steps per token"
    saelens_architecture = "matching_pursuit"

    def __init__(self, cfg: MPConfig, seed: int = 0, device=None, dtype=torch.float32):
        super().__init__(cfg, seed=seed, device=device, dtype=dtype)
        self.register_buffer("tokens_seen", torch.zeros((), dtype=torch.long, device=device))
        self._gen = torch.Generator().manual_seed(seed + 1)
        self._gram = None  # (W_dec version, G) cached for inference

    @property
    def W_enc(self) -> torch.Tensor:
        return self.W_dec.t()

    def __setattr__(self, name, value):
        if name in ("W_enc", "b_enc"):  # tied and bias-free: the base class's encoder is not built
            return
        super().__setattr__(name, value)

    # ---- the pursuit -------------------------------------------------------------------------
    def gram(self) -> torch.Tensor:
        """G = D Dᵀ, cached between calls while the decoder is unchanged. In training the decoder
        changes every step: G is recomputed each call into one buffer shared by the thread (a fresh
        d_sae² tensor per step costs its page faults too, and a buffer per SAE would keep 85 MB alive
        in every trained lab SAE), so it is only valid until the next training-mode call."""
        W = self.W_dec.detach()
        n = W.shape[0]
        if self.training:
            self._gram = None
            return gram_into(W, training_buffer("gram", (n, n), W.dtype, W.device))
        key = (W.data_ptr(), self.W_dec._version)
        if self._gram is None or self._gram[0] != key:
            self._gram = (key, gram_into(W, torch.empty(n, n, dtype=W.dtype, device=W.device)))
        return self._gram[1]

    @torch.no_grad()
    def choose(self, r0: torch.Tensor, steps: int, threshold: float = 0.0, dropout: float = 0.0):
        """Atom indices [B, steps] and values [B, steps] of `steps` pursuit steps (no gradient).

        A token stops (value 0 from then on; its later atom indices mean nothing) once its residual
        norm falls below `threshold` after a step, as SAELens does; the arrays end at the step where
        the last token stopped. With `dropout`, each step hides a random share of atoms (the same
        atoms for every token). On CPU the tokens are pursued in blocks whose correlations stay in
        cache (`PURSUIT_BLOCK_BYTES`); each token's steps, and so its result, do not depend on that."""
        D = self.W_dec.detach()
        G = self.gram()
        B, n = r0.shape[0], D.shape[0]
        c = r0 @ D.t()  # [B, d_sae] correlations with the residual
        norm2 = r0.pow(2).sum(1)
        idx = torch.empty(B, steps, dtype=torch.long, device=c.device)
        vals = torch.zeros(B, steps, dtype=c.dtype, device=c.device)
        # tokens per block: all of them off CPU; on CPU about PURSUIT_BLOCK_BYTES of correlations, in
        # multiples of 64 tokens, so each block's b × d_sae updates split into whole vectors
        per = B
        if c.device.type == "cpu":
            per = max(64, PURSUIT_BLOCK_BYTES // (n * c.element_size()) // 64 * 64)
        rows = torch.empty(min(B, per), n, dtype=c.dtype, device=c.device)  # G's chosen rows, reused
        hidden = []  # dropout's hidden atoms of each step, drawn once for all blocks
        ran = [self._pursue_block(c[a:a + per], G, idx[a:a + per], vals[a:a + per], norm2[a:a + per],
                                  threshold, dropout, hidden, rows) for a in range(0, B, per)]
        last = max(ran, default=steps)
        for a, t in zip(range(0, B, per), ran):  # a block whose tokens all stopped early keeps its last atom
            idx[a:a + per, t:last] = idx[a:a + per, t - 1:t]
        return idx[:, :last], vals[:, :last]

    def _pursue_block(self, c, G, idx, vals, norm2, threshold, dropout, hidden, rows) -> int:
        """The pursuit's steps for one block of tokens, in place: `c` [b, d_sae] holds their
        correlations (contiguous rows); returns the number of steps it ran."""
        rows = rows[:len(c)]
        active = torch.ones(len(c), dtype=torch.bool, device=c.device)
        steps = idx.shape[1]
        for t in range(steps):
            cm = c
            if dropout > 0:
                if len(hidden) == t:
                    hidden.append((torch.rand(c.shape[1], generator=self._gen) < dropout).to(c.device))
                cm = c.masked_fill(hidden[t], float("-inf"))
            v, j = row_max(cm)
            v = v.clamp_min(0) * active
            idx[:, t], vals[:, t] = j, v
            torch.index_select(G, 0, j, out=rows)
            c.addcmul_(rows, v[:, None], value=-1)  # c −= a·G[j], with no fresh b×d_sae tensor per step
            if threshold > 0:
                norm2 = norm2 - v * v
                active &= norm2.clamp_min(0).sqrt() >= threshold
                if not active.any():
                    return t + 1
        return steps

    def pursue(self, x: torch.Tensor, steps: int | None = None, threshold: float | None = None) -> SparseCode:
        """Run the pursuit on x [B, d_in]; the values carry gradients to the atoms and b_dec."""
        x = _check_input(x, self.cfg.d_in, self.W_dec.dtype)
        steps = self._budget(steps)
        threshold = self.cfg.residual_threshold if threshold is None else real("threshold", threshold, min=0)
        r = x - self.b_dec
        dropout = 0.0
        if self.training and int(self.tokens_seen) < self.cfg.dropout_tokens:
            dropout = self.cfg.dropout
        idx, v_nograd = self.choose(r.detach(), steps, threshold, dropout)
        if torch.is_grad_enabled() and (self.W_dec.requires_grad or x.requires_grad or self.b_dec.requires_grad):
            vals = _PursuitValues.apply(x, self.b_dec, self.W_dec, idx, v_nograd)
        else:
            vals = v_nograd
        B, s = idx.shape
        rows = torch.arange(B, device=x.device).repeat_interleave(s)
        return SparseCode(rows, idx.reshape(-1), vals.reshape(-1), (B, self.cfg.d_sae))

    # ---- the SAE interface -------------------------------------------------------------------
    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Correlations of the first pursuit step, ⟨x − b_dec, d_i⟩."""
        return (x - self.b_dec) @ self.W_dec.t()

    def encode_sparse(self, x, g=None, k: int | None = None, threshold: float | None = None) -> SparseCode:
        """The pursuit's code; `k` steps (default the trained `cfg.k`), stopping a token early once
        its residual norm falls below `threshold` (default `cfg.residual_threshold`)."""
        return self.pursue(x, k, threshold)

    def encode(self, x, g=None, k: int | None = None, threshold: float | None = None) -> torch.Tensor:
        return self.pursue(x, k, threshold).dense()

    def forward(self, x, g=None, k: int | None = None, threshold: float | None = None):
        code = self.pursue(x, k, threshold)
        return self._decode_code(code), code.dense()

    def reconstruct(self, x, g=None, k: int | None = None, threshold: float | None = None):
        return self._decode_code(self.pursue(x, k, threshold))

    def _decode_code(self, code: SparseCode) -> torch.Tensor:
        return sparse_decode(code, self.W_dec) + self.b_dec

    def loss(self, x: torch.Tensor, g: torch.Tensor | None = None) -> dict:
        """FVU of the k-step reconstruction (no sparsity penalty: k sets it)."""
        code = self.pursue(x)
        x_hat = self._decode_code(code)
        main = fvu_loss(x, x_hat)
        out = {"loss": main, "fvu": main.detach(), "aux": torch.zeros(()),
               "l0": code.l0_per_token().float().mean()}
        if self.training:
            self.track_firing(code)
            self.tokens_seen += x.shape[0]
            out["dead"] = self.dead_mask().float().mean()
        return out

    def fold_thresholds(self, s: float) -> None:
        self.cfg.residual_threshold = self.cfg.residual_threshold / s  # ‖r‖ is in input units

    def saelens_cfg(self) -> dict:
        """SAELens ``matching_pursuit`` settings that reproduce this SAE's default inference."""
        return {"k": self.cfg.k, "residual_threshold": float(self.cfg.residual_threshold),
                "max_iterations": self.cfg.k, "stop_on_duplicate_support": False}


def mp_sae(d_in: int, d_sae: int, k: int, seed: int = 0, device=None, **cfg) -> MatchingPursuitSAE:
    """Shorthand: ``mp_sae(576, 4608, 32, dropout_tokens=200_000)``; other `MPConfig` fields as keywords."""
    return MatchingPursuitSAE(MPConfig(d_in=d_in, d_sae=d_sae, k=k, **cfg), seed=seed, device=device)
