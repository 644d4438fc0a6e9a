"""The one contract every dictionary follows, and the sparse kernels that make CPU training fast.

A dictionary is an `SAE`: ``encode(x) -> z``, ``decode(z) -> x_hat``, ``forward(x) -> (x_hat, z)``
and ``loss(x, g=None) -> dict``, with a typed config (a dataclass per method, `config_class`).
Parameters follow SAELens names and layouts: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]`` (rows are unit-norm atoms), ``b_dec [d_in]`` (subtracted before encoding,
added after decoding).

What a dictionary declares (class attributes, no side channels):
- ``architecture``: its short name; ``config_class``: its config dataclass;
- ``modes``: its inference modes, the first the default (``sae.mode``; switch for a block with
  ``with sae.using("batch"):``); ``grad_modes``: the modes whose selection needs ∂CE/∂x;
- ``budget``: what the sparsity budget ``k`` means for it (None: it has none). Every encode method
  takes ``k=`` to run at another budget than the trained one;
- ``saelens_architecture`` plus `saelens_cfg` / `saelens_tensors`: how it is saved for SAELens.
Defining a subclass registers it (`registry.REGISTRY`), so `load_sae` can rebuild it by name.

A TopK-family subclass says only *which* latents to keep (`select`); training then runs on the
sparse code (rows, cols, vals): the decoder is an ``embedding_bag`` over the kept atoms (forward and
backward), and the encoder's backward (`_GatherPre`) gathers only the kept encoder columns for ∂x.
A dictionary with another encoder (matching pursuit) overrides `encode_sparse` instead.
`benchmarks/bench_train_step.py` measures the step against plain dense autograd.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ..validate import activations as _valid_activations
from ..validate import integer, real
from .registry import register


# AuxK runs as dense GEMMs on the B × n_eligible block when n_eligible ≤ this × k_aux (measured
# crossover on 2 cores of an AMD EPYC, `make bench`), else on the sparse kernels. On an Intel Xeon the
# dense block wins up to ~8× (README); the two round differently, so moving it retrains SAEs to other bits
DENSE_AUX_WIDTH = 4


@dataclass
class SAEConfig:
    """What every dictionary has. Each method's config adds its own knobs (and its budget `k`)."""

    d_in: int  # width of the activations read
    d_sae: int  # number of latents (atoms)
    dead_tokens: int = 50_000  # a latent is dead after this many training tokens without firing (Gao: 10M)
    aux_coef: float = 1 / 32  # weight of the auxiliary loss on dead latents (Gao et al.'s AuxK: 1/32)
    k_aux: int | None = None  # latents the auxiliary loss may use per token; None = d_in // 2 (Gao App. B.1)
    model_name: str = ""  # stamped by `train` from the store: the model the SAE was trained on
    hook_name: str = ""  # stamped by `train`: the hook it reads (evaluate / Splicer refuse another)
    store_key: str = ""  # stamped by `train`: the activation store it was trained on
    scale: str = ""  # stamped by `train`: the kit's scale (SAE_KIT_SCALE) when it was trained
    activation_scale: float = 1.0  # stamped by `train(normalize=...)`: trained on x × this, folded into the weights

    def __post_init__(self):
        self.d_in = integer("d_in", self.d_in, min=1)
        self.d_sae = integer("d_sae", self.d_sae, min=1)
        self.dead_tokens = integer("dead_tokens", self.dead_tokens, min=1)
        self.aux_coef = real("aux_coef", self.aux_coef, min=0)
        self.k_aux = self.d_in // 2 if self.k_aux is None else integer("k_aux", self.k_aux, min=1)
        if hasattr(self, "k"):
            self.k = integer("k", self.k, hint=f" (the sparsity budget, 0 < k < d_sae={self.d_sae})")
            self.check_budget()

    def check_budget(self) -> None:
        """The budget must leave latents unused: 0 < k < d_sae (matching pursuit relaxes this)."""
        if self.k <= 0 or self.k >= self.d_sae:
            raise ValueError(f"k must satisfy 0 < k < d_sae; got k={self.k}, d_sae={self.d_sae}. "
                             f"Pick a smaller k or a wider dictionary")


class _GatherPre(torch.autograd.Function):
    """vals = pre[rows, cols] with pre = (x − b_dec) @ W_enc + b_enc, computed outside the graph.

    The backward touches only the kept (token, latent) pairs, never a dense B×d_sae matrix:
    - ∂W_encᵀ is an embedding_bag: each latent sums g·x_c over the tokens that kept it (the pairs
      sorted by latent, `by_col`). At d_in 576, d_sae 4608, k 32, batch 4096 that is ~8 ms on
      2 CPU cores against ~140 ms for the dense GEMM it replaces (`make bench`);
    - ∂b_enc sums g per latent, and ∂b_dec = −W_enc·∂b_enc (one matrix-vector product);
    - ∂x (only when x itself needs a gradient) is an embedding_bag over the kept encoder columns.
    Needs `rows` sorted ascending and (row, col) pairs unique.
    """

    @staticmethod
    def forward(ctx, x, b_dec, W_enc, b_enc, x_c, rows, cols, by_col, pre):
        ctx.save_for_backward(x_c, W_enc, rows, cols, *by_col)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, g_vals):
        x_c, W_enc, rows, cols, order, col_offsets = ctx.saved_tensors
        need_x, need_bdec, need_W, need_benc = ctx.needs_input_grad[:4]
        g_x = g_bdec = g_W = g_b = None
        if need_x:
            offsets = torch.searchsorted(rows, torch.arange(x_c.shape[0], device=rows.device))
            g_x = F.embedding_bag(cols, W_enc.t().contiguous(), offsets, mode="sum", per_sample_weights=g_vals)
        if need_W:
            g_W = _transposed(F.embedding_bag(rows[order], x_c, col_offsets, mode="sum", per_sample_weights=g_vals[order]))
        if need_benc or need_bdec:
            g_b = torch.zeros(W_enc.shape[1], dtype=g_vals.dtype, device=g_vals.device).index_add_(0, cols, g_vals)
            g_bdec = -(W_enc @ g_b) if need_bdec else None
        return g_x, g_bdec, g_W, g_b if need_benc else None, None, None, None, None, None


def _transposed(a: torch.Tensor) -> torch.Tensor:
    """aᵀ as a fresh contiguous tensor (`copy_transposed`)."""
    return copy_transposed(torch.empty(a.shape[1], a.shape[0], dtype=a.dtype, device=a.device), a)


def copy_transposed(dst: torch.Tensor, src: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``dst.copy_(src.t())``, copied on CPU in blocks of `block` rows of src: each block's reads
    and writes stay in cache, where one strided copy walks a whole column of dst per row of src
    (2 CPU cores: ~2.5 ms for 4608×576 against 4-9 ms; the mirror half of a 4608-atom Gram matrix,
    `matching_pursuit.gram_into`, ~7 ms against ~19). A copy: the values are the same either way."""
    if src.device.type != "cpu":
        return dst.copy_(src.t())
    for i in range(0, src.shape[0], block):
        dst[:, i:i + block].copy_(src[i:i + block].t())
    return dst


class _SparseDecode(torch.autograd.Function):
    """Σ_kept vals · W_dec[col] per token (an embedding_bag), with a backward that stays sparse:
    ∂vals is embedding_bag's own per-pair dot product, ∂W_dec an embedding_bag over the pairs
    sorted by latent (each atom sums vals·∂x̂ over the tokens that kept it)."""

    @staticmethod
    def forward(ctx, vals, W_dec, rows, cols, offsets, by_col):
        ctx.save_for_backward(vals, W_dec, rows, cols, offsets, *by_col)
        return F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=vals)

    @staticmethod
    def backward(ctx, g_out):
        vals, W_dec, rows, cols, offsets, order, col_offsets = ctx.saved_tensors
        g_out = g_out.contiguous()
        g_vals = g_W = None
        if ctx.needs_input_grad[0]:
            g_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(g_out, W_dec, cols, offsets, rows, 0)
        if ctx.needs_input_grad[1]:
            g_W = F.embedding_bag(rows[order], g_out, col_offsets, mode="sum", per_sample_weights=vals[order])
        return g_vals, g_W, None, None, None, None


def sort_keys(keys: torch.Tensor, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sort(keys, stable=True)`` (sorted keys, order) for integer keys in [0, bound), sorted on
    CPU as the narrowest integer type that holds them (int16 or int32): the same order, since a
    stable sort has only one answer, found ~2× faster (2 CPU threads, keys below 4608: 295k keys in
    ~2 ms instead of ~8, 33k in ~0.4 instead of ~0.9). The sorted keys come back in that type."""
    if keys.device.type == "cpu" and bound <= 2 ** 31:
        keys = keys.to(torch.int16 if bound <= 2 ** 15 else torch.int32)
    return torch.sort(keys, stable=True)


def by_col(cols: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, offsets): the pairs sorted by latent, and where each latent's run starts."""
    sorted_cols, order = sort_keys(cols, n)
    return order, torch.searchsorted(sorted_cols, torch.arange(n, dtype=sorted_cols.dtype, device=cols.device))


@dataclass
class SparseCode:
    """A batch's kept latents: flat (row, col, value) triples, rows sorted ascending."""

    rows: torch.Tensor  # [nnz] long
    cols: torch.Tensor  # [nnz] long
    vals: torch.Tensor  # [nnz] float, ReLU'd (may hold zeros where fewer than k were positive)
    shape: tuple[int, int]  # (B, d_sae)
    pre: torch.Tensor | None = None  # [B, d_sae] pre-activations the selection saw (no grad; in a
    # training step on CPU a `training_buffer`, valid until the next one)
    cutoff: torch.Tensor | None = None  # a batch rule's selection cut-off, for `after_step` (no grad)
    _by_col: tuple | None = None

    def by_col(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, offsets) of the pairs sorted by latent, computed once (the sparse backward's)."""
        if self._by_col is None:
            self._by_col = by_col(self.cols, self.shape[1])
        return self._by_col

    def dense(self) -> torch.Tensor:
        """z [B, d_sae]; a latent kept twice for one token (matching pursuit) adds up."""
        z = torch.zeros(self.shape, dtype=self.vals.dtype, device=self.vals.device)
        return z.index_put((self.rows, self.cols), self.vals, accumulate=True)

    def l0_per_token(self) -> torch.Tensor:
        """Distinct active latents per token (a latent kept twice counts once)."""
        return self.counts()[0]

    def counts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(non-zero latents per token [B], tokens on which each latent is > 0 [d_sae]) of `dense()`,
        from the pairs alone: a latent kept twice for one token counts once, by its summed value."""
        d = self.shape[1]
        key, inv = torch.unique(self.rows * d + self.cols, return_inverse=True)
        z = torch.zeros(len(key), dtype=self.vals.dtype, device=self.vals.device).index_add_(0, inv, self.vals)
        nonzero, positive = key[z != 0], key[z > 0]
        return (torch.bincount(nonzero // d, minlength=self.shape[0]),
                torch.bincount(positive % d, minlength=d))

    def fired(self) -> torch.Tensor:
        """[d_sae] bool: latents active on at least one token of the batch."""
        return torch.bincount(self.cols[self.vals > 0], minlength=self.shape[1]) > 0


_BUFFERS = threading.local()  # `training_buffer`'s tensors: one dict per thread, one tensor per name


def _training_buffers() -> dict[str, torch.Tensor]:
    """This thread's training buffers (two SAEs trained in two threads never share one)."""
    if not hasattr(_BUFFERS, "d"):
        _BUFFERS.d = {}
    return _BUFFERS.d


def training_buffer(name: str, shape: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised tensor for a training step's large temporary (the B × d_sae pre-activations,
    matching pursuit's d_sae² Gram matrix, the g-SAE's score), reused from step to step: one per
    `name` (per thread), reallocated when the shape, dtype or device changes. A fresh tensor of that
    size is a fresh mapping from the allocator whose pages the kernel faults in and zeroes at every
    step (glibc maps blocks over 32 MiB each time: at batch 4096 and d_sae 4608 that was ~14 ms of a
    TopK step on 2 CPU cores). Its contents are valid only until the next call with the same name;
    `release_training_buffers` (`train` calls it when it ends) frees them."""
    buffers = _training_buffers()
    buf = buffers.get(name)
    if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype or buf.device != torch.device(device):
        buffers.pop(name, None)  # the old one goes before the new one is allocated
        buf = buffers[name] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def release_training_buffers() -> None:
    """Free this thread's `training_buffer`s (the next training step allocates them again)."""
    _training_buffers().clear()


def mask_pairs(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask.nonzero(as_tuple=True)`` for a 2-D bool mask: (rows, cols) in row-major order, the same
    tensors, found ~2-3× faster on CPU when the mask is sparse (B = 1024-4096, d_sae = 4608, 1-8%
    set, 2 threads: e.g. ~2.2 ms against ~6.3 at B = 1024).

    ``nonzero`` visits every flag one by one. Here the flags are read 8 at a time as 64-bit words:
    only the words with a flag set (``!= 0``) are expanded back into their 8 flags, and positions come
    out sorted because words and the flags within a word are taken in order. When over half the
    words hold a flag, there is nothing to skip, and the mask goes to ``nonzero`` itself. Off CPU, and
    for masks whose flags cannot be read as words (not contiguous, size or offset not a multiple of 8),
    it is ``nonzero``."""
    n = mask.shape[1]
    flat = mask.reshape(-1) if mask.is_contiguous() else None
    if (mask.device.type != "cpu" or mask.dtype != torch.bool or flat is None or not flat.numel()
            or flat.numel() % 8 or mask.storage_offset() % 8):
        return mask.nonzero(as_tuple=True)
    hit = (flat.view(torch.int64) != 0).nonzero().flatten()  # words holding any set flag, in order
    if 2 * len(hit) > flat.numel() // 8:
        return mask.nonzero(as_tuple=True)
    sub = flat.view(-1, 8).index_select(0, hit).nonzero()  # (which hit word, which of its 8 flags)
    pos = hit[sub[:, 0]] * 8 + sub[:, 1]
    return pos // n, pos % n


TOPK_SPREAD = 4  # row_topk: units per unit of the next coarser level
TOPK_ROWS_FROM = 64  # row_topk: fewer rows than this go straight to torch.topk (its overhead wins)


def topk_levels(n: int, k: int, spread: int | None = None) -> list[int]:
    """`row_topk`'s units per level, finest first (``[4608, 1152, 288, 72]`` for n = 4608, k = 32):
    each level is `spread` times coarser while that divides and leaves ≥ 2(k + 1) units. Just `[n]`
    (no levels: plain ``torch.topk``) when the rows are too short for the levels to pay, under
    4·spread·(k + 1) elements (at n = 4608 that is k ≥ 288, where the two cost the same)."""
    spread = spread or TOPK_SPREAD
    sizes = [n]
    if n < 4 * spread * (k + 1):
        return sizes
    while sizes[-1] % spread == 0 and sizes[-1] // spread >= 2 * (k + 1):
        sizes.append(sizes[-1] // spread)
    return sizes


def row_topk(pre: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``pre.topk(k, dim=1)`` (values descending, indices) for pre [B, n], bit for bit the same, ties
    included, and on CPU ~1.5× faster at the kit's shapes (B = 1024, n = 4608, k = 32: ~9 ms
    against ~14 on 2 threads; 1.3-1.9× at k = 8-64, B = 1024-4096).

    ``torch.topk`` runs a partial sort over every element of every row, one scalar at a time. Here
    the row is split into units of a hierarchy (`topk_levels`): a unit of the next level holds
    `TOPK_SPREAD` units of this one, and its maximum (a vectorised ``amax``) is the maximum of those.
    From the coarsest level down, only the children of the k + 1 units with the largest maxima are
    kept: every unit left out has a maximum no larger than the smallest of the kept ones, of which
    there are k + 1, so the k + 1 largest elements of the row are among the ~4(k + 1) finally kept
    (ties aside). When those k + 1 values are all distinct, the top k are the only possible answer,
    in the only possible order, and so exactly what ``torch.topk`` returns; a row where two of them
    are equal (or one is NaN) is handed to ``torch.topk`` itself, whose order among ties is its own.
    Off CPU, for small batches, and where the levels would not narrow anything, it is ``torch.topk``.
    """
    B, n = pre.shape
    sizes = topk_levels(n, k)
    if (pre.device.type != "cpu" or len(sizes) < 2 or B < TOPK_ROWS_FROM or k < 1 or not pre.is_contiguous()
            or (pre.requires_grad and torch.is_grad_enabled())):
        return pre.topk(k, dim=1)
    with torch.no_grad():
        w = TOPK_SPREAD
        maxes = [pre]  # unit u of level l + 1 holds units u + sizes[l + 1]·i, i < w, of level l
        for m in sizes[1:]:
            maxes.append(maxes[-1].view(B, w, m).amax(1))
        kept = maxes[-1].topk(k + 1, dim=1, sorted=False).indices
        spread = torch.arange(w, device=pre.device)
        for level in range(len(sizes) - 2, -1, -1):
            units = (kept[:, :, None] + sizes[level + 1] * spread).view(B, -1)  # the kept units' children
            if level:
                kept = units.gather(1, maxes[level].gather(1, units).topk(k + 1, dim=1, sorted=False).indices)
        top, at = pre.gather(1, units).topk(k + 1, dim=1)
        ties = (top[:, 1:] == top[:, :-1]).any(1) | torch.isnan(top).any(1)
        vals, idx = top[:, :k].contiguous(), units.gather(1, at[:, :k])
        if bool(ties.any()):
            rows = ties.nonzero().flatten()
            vals[rows], idx[rows] = pre[rows].topk(k, dim=1)
    return vals, idx


@torch.no_grad()
def aux_choice(pre: torch.Tensor, eligible: torch.Tensor, k_aux: int, code: SparseCode | None = None):
    """(el, idx, ok): the eligible latents `el`, and per token the positions `idx` [B, k_aux] (into
    `el`) of its top k_aux pre-activations among them, skipping the (token, latent) pairs `code`
    already kept; ``ok`` [B, k_aux] is 0 where a token had fewer than k_aux such pairs."""
    el = eligible.nonzero().flatten()
    sub = pre[:, el]  # [B, n_eligible], a copy
    if code is not None and code.cols.numel():
        pos = torch.full((pre.shape[1],), -1, dtype=torch.long, device=pre.device)
        pos[el] = torch.arange(len(el), device=pre.device)
        p = pos[code.cols]
        hit = p >= 0
        sub[code.rows[hit], p[hit]] = float("-inf")
    top, idx = sub.topk(min(k_aux, len(el)), dim=-1, sorted=False)
    return el, idx, (top > float("-inf")).to(pre.dtype)


def aux_pairs(pre: torch.Tensor, eligible: torch.Tensor, k_aux: int, code: SparseCode | None = None):
    """`aux_choice` as flat (rows, cols, ok) triples, rows sorted."""
    el, idx, ok = aux_choice(pre, eligible, k_aux, code)
    rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(idx.shape[1])
    return rows, el[idx.reshape(-1)], ok.reshape(-1)


def sparse_decode(code: SparseCode, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_kept vals · W_dec[col] per token, as an embedding_bag (no dense z); sparse backward."""
    B = code.shape[0]
    offsets = torch.searchsorted(code.rows, torch.arange(B, device=code.rows.device))
    if torch.is_grad_enabled() and (code.vals.requires_grad or W_dec.requires_grad):
        return _SparseDecode.apply(code.vals, W_dec, code.rows, code.cols, offsets, code.by_col())
    return F.embedding_bag(code.cols, W_dec, offsets, mode="sum", per_sample_weights=code.vals)


def fvu_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Σ‖x − x̂‖² / Σ‖x − x̄‖² over the batch (Gao et al.'s normalised MSE), as a differentiable tensor.

    The training loss; `sae_kit.metrics.fvu` is the same quantity as a float64 number for reports.
    When only x̂ carries a gradient (training: x is data), the backward is one pass (`_FVU`)."""
    if x_hat.requires_grad and not x.requires_grad and torch.is_grad_enabled():
        return _FVU.apply(x, x_hat)
    d, den = _fvu_parts(x, x_hat)
    return d.pow(2).sum() / den


def _fvu_parts(x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x − x̂, Σ‖x − x̄‖² clamped away from 0): the FVU's residual and denominator."""
    return x - x_hat, (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


class _FVU(torch.autograd.Function):
    """`fvu_loss` for data x and a reconstruction x̂ that needs a gradient: ∂/∂x̂ = −2(x − x̂)·g/den
    in one pass over the batch, where autograd's chain (pow, sum, sub) makes three. Bit-identical
    to that chain: it computes −(g/den · 2d), and doubling is exact in floating point."""

    @staticmethod
    def forward(ctx, x, x_hat):
        d, den = _fvu_parts(x, x_hat)
        ctx.save_for_backward(d, den)
        return d.pow(2).sum() / den

    @staticmethod
    @once_differentiable  # a second derivative through it raises instead of coming out wrong
    def backward(ctx, g):
        d, den = ctx.saved_tensors
        return None, d * (-2 * (g / den))


class Selection(NamedTuple):
    """What `select` keeps: (row, col) pairs with rows sorted, and optionally the cut-off it used."""

    rows: torch.Tensor
    cols: torch.Tensor
    cutoff: torch.Tensor | None = None


class SAE(nn.Module):
    """A sparse dictionary: encoder, unit-norm decoder atoms, dead-latent clock, auxiliary loss.

    Subclasses implement `select` (which pre-activations to keep) or override `encode_sparse`,
    and declare the class attributes below. Construct with the method's config dataclass; the
    caller's config is copied, never changed.
    """

    architecture: ClassVar[str] = ""  # short name (training bars, cache folder names)
    config_class: ClassVar[type] = SAEConfig
    modes: ClassVar[tuple[str, ...]] = ("default",)  # inference modes; the first is the default
    grad_modes: ClassVar[frozenset] = frozenset()  # modes whose selection needs the gradient g
    budget: ClassVar[str | None] = None  # what `k` means for this dictionary (None: no budget)
    saelens_architecture: ClassVar[str] = "topk"  # the SAELens class whose inference matches `encode`

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        register(cls)

    def __init__(self, cfg: SAEConfig, seed: int = 0, device=None, dtype=torch.float32):
        if not isinstance(cfg, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got "
                            f"{type(cfg).__name__}; build it with the shorthand (e.g. sae_kit.topk_sae) "
                            f"or {self.config_class.__name__}(d_in=..., d_sae=..., ...)")
        super().__init__()
        self.cfg = replace(cfg)  # a copy: the caller's config is not touched
        self.init_seed = seed
        self._mode = self.modes[0]
        gen = torch.Generator().manual_seed(seed)
        # tied init (Gao et al.): W_enc = W_decᵀ, atoms unit-norm; nn.Linear's uniform bound
        bound = 1 / cfg.d_in ** 0.5
        W_dec = (torch.rand(cfg.d_sae, cfg.d_in, generator=gen) * 2 - 1) * bound
        W_dec = W_dec / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec.to(device, dtype))
        self.W_enc = nn.Parameter(W_dec.t().contiguous().to(device, dtype))  # row-major: fused Adam wants it
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, device=device, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, device=device, dtype=dtype))
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.d_sae, dtype=torch.long, device=device))
        self.eval()  # inference mode unless `train` says otherwise (batch rules only apply in training)

    # ---- inference modes ---------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """The inference mode `encode` uses outside training (one of `modes`)."""
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in self.modes:
            raise ValueError(f"{type(self).__name__} has inference modes {', '.join(map(repr, self.modes))}; "
                             f"got {value!r}")
        self._mode = value

    @contextlib.contextmanager
    def using(self, mode: str):
        """``with sae.using("batch"): ...`` runs the block in another inference mode, then restores it."""
        old = self.mode
        self.mode = mode
        try:
            yield self
        finally:
            self._mode = old

    # ---- the method-specific part ------------------------------------------------------------
    def select(self, pre: torch.Tensor, g: torch.Tensor | None = None, k: int | None = None) -> Selection:
        """Which (row, col) entries of `pre` [B, d_sae] to keep (rows sorted), at budget `k`
        (None: the trained budget)."""
        raise NotImplementedError(f"{type(self).__name__} must define select() or override encode_sparse()")

    def after_step(self, pre: torch.Tensor, code: SparseCode) -> None:
        """Hook for per-step statistics (thresholds, densities); runs in training mode, no grad."""

    def _budget(self, k: int | None) -> int | None:
        """The budget to run at: the trained `cfg.k`, or an explicit `k` (None for a dictionary
        without a budget, which refuses an explicit one)."""
        if self.budget is None:
            if k is not None:
                raise ValueError(f"{type(self).__name__} has no sparsity budget; call it without k")
            return None
        if k is None:
            return self.cfg.k
        k = integer("k", k, min=1, hint=f" ({self.budget})")
        replace(self.cfg, k=k)  # the config's own rule says whether this budget fits (e.g. k < d_sae)
        return k

    # ---- the shared part ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def label(self) -> str:
        """A short description for progress bars and cache names, e.g. ``topk k=32``."""
        k = getattr(self.cfg, "k", None)
        return self.architecture + (f" k={k}" if k is not None else "")

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def reads_pre_by_latent(self) -> bool:
        """Whether the selection reads the pre-activations latent by latent (then `encode_sparse`
        lays them out latent-major: ``pre`` is the [B, d_sae] view of a [d_sae, B] matrix)."""
        return False

    def encode_sparse(self, x: torch.Tensor, g: torch.Tensor | None = None, k: int | None = None) -> SparseCode:
        """Select latents and return their values with the sparse backward attached."""
        x = _check_input(x, self.cfg.d_in, self.W_dec.dtype)
        x_c = x - self.b_dec
        by_latent, B, n = self.reads_pre_by_latent(), x.shape[0], self.cfg.d_sae
        out = None  # in a training step on CPU, pre goes into a buffer reused every step
        if self.training and torch.is_grad_enabled() and x.device.type == "cpu":
            out = training_buffer("pre", (n, B) if by_latent else (B, n), x_c.dtype, x.device)
        with torch.no_grad():
            if by_latent:  # [d_sae, B] from the GEMM, seen as [B, d_sae]: no transpose
                pre = torch.addmm(self.b_enc[:, None], self.W_enc.t(), x_c.t(), out=out).t()
            else:
                pre = torch.addmm(self.b_enc, x_c, self.W_enc, out=out)
            rows, cols, cutoff = self.select(pre, g, k)
        code = SparseCode(rows, cols, None, (x.shape[0], self.cfg.d_sae), pre, cutoff)
        code.vals = F.relu(self._gather(x, x_c, code))
        return code

    def _gather(self, x: torch.Tensor, x_c: torch.Tensor, code: SparseCode) -> torch.Tensor:
        """pre[rows, cols] of `code`, with the sparse backward when a gradient is being recorded."""
        if torch.is_grad_enabled():
            return _GatherPre.apply(x, self.b_dec, self.W_enc, self.b_enc, x_c.detach(), code.rows, code.cols,
                                    code.by_col(), code.pre)
        return code.pre[code.rows, code.cols]

    def encode(self, x: torch.Tensor, g: torch.Tensor | None = None, k: int | None = None) -> torch.Tensor:
        """Dense latents z [B, d_sae]."""
        return self.encode_sparse(x, g, k).dense()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != self.cfg.d_sae:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"decode expects latents z of shape [batch, {self.cfg.d_sae}], got {shape}")
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None, k: int | None = None):
        """(x_hat, z)."""
        code = self.encode_sparse(x, g, k)
        return sparse_decode(code, self.W_dec) + self.b_dec, code.dense()

    def reconstruct(self, x: torch.Tensor, g: torch.Tensor | None = None, k: int | None = None) -> torch.Tensor:
        """x_hat without building the dense z."""
        return sparse_decode(self.encode_sparse(x, g, k), self.W_dec) + self.b_dec

    def forward_counts(self, x: torch.Tensor, g: torch.Tensor | None = None):
        """(x_hat, non-zero latents per token [B], tokens on which each latent is > 0 [d_sae]): what
        the metrics read of ``self(x, g)``, without the dense z."""
        code = self.encode_sparse(x, g)
        return (sparse_decode(code, self.W_dec) + self.b_dec, *code.counts())

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def loss(self, x: torch.Tensor, g: torch.Tensor | None = None) -> dict:
        """FVU of the reconstruction + aux_coef · AuxK loss on dead latents (+ any `penalty`); updates dead stats."""
        x = x.to(self.W_dec.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        code = self.encode_sparse(x, g)
        x_hat = sparse_decode(code, self.W_dec) + self.b_dec
        main = fvu_loss(x, x_hat)
        aux = self.aux_loss(x, x_hat.detach(), code.pre, code)
        out = {"loss": main + self.cfg.aux_coef * aux + self.penalty(x, code), "fvu": main.detach(), "aux": aux.detach(),
               "l0": (code.vals > 0).sum().float() / x.shape[0]}
        if self.training:
            self.track_firing(code)
            with torch.no_grad():
                self.after_step(code.pre, code)
            out["dead"] = self.dead_mask().float().mean()
        return out

    @torch.no_grad()
    def track_firing(self, code: SparseCode) -> None:
        """Count tokens since each latent last fired (the dead-latent clock)."""
        self.tokens_since_fired += code.shape[0]
        self.tokens_since_fired[code.fired()] = 0

    def penalty(self, x: torch.Tensor, code: SparseCode) -> torch.Tensor:
        """An extra term of the loss (a sparsity penalty); none for TopK-style rules."""
        return torch.zeros((), device=x.device)

    def aux_eligible(self) -> torch.Tensor:
        """Latents the auxiliary loss may use: dead ones (AuxK). Subclasses may widen it."""
        return self.dead_mask()

    def aux_loss(self, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor,
                 code: SparseCode | None = None) -> torch.Tensor:
        """AuxK: the top k_aux eligible latents reconstruct the detached residual x − x̂.

        Pairs the main code already kept (`code`) are not eligible again: a latent that is dead
        by the clock but kept for this token already reconstructs x there, and picking it again
        would count it twice and push it down where it helps. The top-k runs on the eligible
        columns only (a B × n_eligible matrix, not B × d_sae)."""
        eligible = self.aux_eligible()
        if not self.training or self.cfg.aux_coef == 0 or not bool(eligible.any()):
            return torch.zeros((), device=x.device)
        with torch.no_grad():
            el, idx, ok = aux_choice(pre, eligible, self.cfg.k_aux, code)
        e = x - x_hat
        if len(el) <= DENSE_AUX_WIDTH * idx.shape[1]:
            # few eligible latents for the budget (the usual case): the kept pairs fill much of the
            # B × n_eligible block, and dense GEMMs on that block beat the sparse kernels
            mask = torch.zeros(pre.shape[0], len(el), dtype=pre.dtype, device=pre.device).scatter_(1, idx, ok)
            # index_select, not W_enc[:, el]: its backward adds the block into zeros (index_add)
            # where advanced indexing's runs an index_put with accumulation, ~2 ms more per step
            W = self.W_enc.index_select(1, el)
            # (x − b_dec)·W + b_enc written as x·W + (b_enc − b_dec·W): x needs no gradient, so
            # autograd skips the B × d_in GEMM it would spend on ∂(x − b_dec)
            z = F.relu(torch.addmm(self.b_enc.index_select(0, el) - self.b_dec @ W, x.detach(), W)) * mask
            e_hat = z @ self.W_dec.index_select(0, el)
        else:
            rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(idx.shape[1])
            aux = SparseCode(rows, el[idx.reshape(-1)], None, pre.shape, pre)
            aux.vals = F.relu(self._gather(x, (x - self.b_dec).detach(), aux)) * ok.reshape(-1)
            e_hat = sparse_decode(aux, self.W_dec)
        return fvu_loss(e, e_hat).nan_to_num(0.0)

    # ---- decoder geometry (Gao et al.) -------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each atom (keeps the step on the sphere)."""
        if self.W_dec.grad is None:
            return
        g, W = self.W_dec.grad, self.W_dec.detach()
        # in place; on CPU in blocks of atoms, so each block's product stays in cache for the update
        # (each atom's own dot product and update: the result does not depend on the block)
        step = 512 if g.device.type == "cpu" else len(g)
        for s in range(0, len(g), step):
            gb, wb = g[s:s + step], W[s:s + step]
            gb.addcmul_(torch.linalg.vecdot(gb, wb)[:, None], wb, value=-1)

    folds_input_scale = True  # False where the selection is not positive-homogeneous in x (g-SAE)

    @torch.no_grad()
    def fold_input_scale(self, s: float) -> None:
        """Make this SAE, trained on s·x, read x itself: its code becomes z/s and its output x̂/s.

        The pre-activations W_enc(s·x − b_dec) + b_enc are s times W_enc(x − b_dec/s) + b_enc/s, and
        every selection the kit has (top-k, thresholds, ReLU, pursuit on the residual) commutes with a
        positive scale, so dividing b_enc, b_dec (and thresholds, `fold_thresholds`) by s is exact.
        The decoder's atoms stay unit-norm. SAELens folds its scaling factor the same way on save.
        """
        if not self.folds_input_scale:
            raise ValueError(f"{type(self).__name__} cannot fold an input scale (its selection is not "
                             f"positive-homogeneous in x); train it with normalize=None")
        for name in ("b_enc", "b_dec"):  # (matching pursuit has no b_enc)
            bias = getattr(self, name, None)
            if bias is not None:
                bias.div_(s)
        self.fold_thresholds(s)
        self.cfg.activation_scale = float(self.cfg.activation_scale * s)

    def fold_thresholds(self, s: float) -> None:
        """Divide any learned inference thresholds by s (see `fold_input_scale`); none here."""

    @torch.no_grad()
    def init_b_dec(self, x: torch.Tensor, iters: int = 100) -> None:
        """Set b_dec to the geometric median of a data sample (Weiszfeld iterations)."""
        self.b_dec.copy_(geometric_median(x.to(self.device, self.b_dec.dtype), iters))

    # ---- save / load in SAELens layout -------------------------------------------------------
    def saelens_cfg(self) -> dict:
        """Fields of SAELens's ``cfg.json`` this architecture needs beyond the common ones."""
        return {}

    def saelens_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors SAELens's architecture needs beyond W_enc/b_enc/W_dec/b_dec (e.g. thresholds)."""
        return {}

    def save(self, path: str | Path) -> Path:
        """Write ``cfg.json`` + ``sae_weights.safetensors`` (SAELens layout), atomically."""
        from .io import save_sae

        return save_sae(self, path)

    @classmethod
    def load(cls, path: str | Path, device=None) -> "SAE":
        from .io import load_sae

        return load_sae(path, device=device)

    def extra_repr(self) -> str:
        c = self.cfg
        return f"{self.label}: d_in={c.d_in}, d_sae={c.d_sae}, mode={self.mode!r}"


def _check_input(x: torch.Tensor, d_in: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """x checked (a float tensor [batch, d_in], finite) and in the SAE's dtype; see `validate.activations`."""
    return _valid_activations(x, d_in, dtype)


@torch.no_grad()
def geometric_median(x: torch.Tensor, iters: int = 100, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows of x."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(eps)
        m_new = (w[:, None] * x).sum(0) / w.sum()
        if (m_new - m).norm() < 1e-5 * m.norm().clamp_min(1e-8):
            return m_new
        m = m_new
    return m

