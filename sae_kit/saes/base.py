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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..validate import activations as _valid_activations
from ..validate import integer, real
from .registry import register


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
    """vals = pre[rows, cols] with pre = x_c @ W_enc + b_enc, computed outside the graph.

    The backward only needs the kept entries: ∂x_c is an embedding_bag over the kept encoder
    columns (k rows of W_encᵀ per token instead of a dense B×d_sae×d_in GEMM), ∂W_enc is one GEMM
    against the scattered gradient. (torch 2.13's CPU sparse matmuls measured slower than that GEMM.)
    Needs `rows` sorted ascending.
    """

    @staticmethod
    def forward(ctx, x_c, W_enc, b_enc, rows, cols, pre):
        ctx.save_for_backward(x_c, W_enc, rows, cols)
        return pre[rows, cols]

    @staticmethod
    def backward(ctx, g_vals):
        x_c, W_enc, rows, cols = ctx.saved_tensors
        B, n = x_c.shape[0], W_enc.shape[1]
        g_x = g_W = g_b = None
        if ctx.needs_input_grad[0]:
            offsets = torch.searchsorted(rows, torch.arange(B, device=rows.device))
            g_x = F.embedding_bag(cols, W_enc.t().contiguous(), offsets, mode="sum", per_sample_weights=g_vals)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            G = torch.zeros(B, n, dtype=g_vals.dtype, device=g_vals.device)
            G[rows, cols] = g_vals  # (row, col) pairs are unique
            g_W = x_c.t() @ G if ctx.needs_input_grad[1] else None
            g_b = G.sum(0) if ctx.needs_input_grad[2] else None
        return g_x, g_W, g_b, None, None, None


@dataclass
class SparseCode:
    """A batch's kept latents: flat (row, col, value) triples, rows sorted ascending."""

    rows: torch.Tensor  # [nnz] long
    cols: torch.Tensor  # [nnz] long
    vals: torch.Tensor  # [nnz] float, ReLU'd (may hold zeros where fewer than k were positive)
    shape: tuple[int, int]  # (B, d_sae)
    pre: torch.Tensor | None = None  # [B, d_sae] pre-activations the selection saw (no grad)
    cutoff: torch.Tensor | None = None  # a batch rule's selection cut-off, for `after_step` (no grad)

    def dense(self) -> torch.Tensor:
        """z [B, d_sae]; a latent kept twice for one token (matching pursuit) adds up."""
        z = torch.zeros(self.shape, dtype=self.vals.dtype, device=self.vals.device)
        return z.index_put((self.rows, self.cols), self.vals, accumulate=True)

    def l0_per_token(self) -> torch.Tensor:
        """Distinct active latents per token."""
        keep = self.vals > 0
        flat = torch.unique(self.rows[keep] * self.shape[1] + self.cols[keep])
        return torch.bincount(flat // self.shape[1], minlength=self.shape[0])

    def fired(self) -> torch.Tensor:
        """[d_sae] bool: latents active on at least one token of the batch."""
        return torch.bincount(self.cols[self.vals > 0], minlength=self.shape[1]) > 0


def sparse_decode(code: SparseCode, W_dec: torch.Tensor) -> torch.Tensor:
    """Σ_kept vals · W_dec[col] per token, as an embedding_bag (no dense z)."""
    B = code.shape[0]
    offsets = torch.searchsorted(code.rows, torch.arange(B, device=code.rows.device))
    return F.embedding_bag(code.cols, W_dec, offsets, mode="sum", per_sample_weights=code.vals)


def fvu_loss(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Σ‖x − x̂‖² / Σ‖x − x̄‖² over the batch (Gao et al.'s normalised MSE), as a differentiable tensor.

    The training loss; `sae_kit.metrics.fvu` is the same quantity as a float64 number for reports."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


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
        self.W_enc = nn.Parameter(W_dec.t().clone().to(device, dtype))
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

    def encode_sparse(self, x: torch.Tensor, g: torch.Tensor | None = None, k: int | None = None) -> SparseCode:
        """Select latents and return their values with the sparse backward attached."""
        x = _check_input(x, self.cfg.d_in, self.W_dec.dtype)
        x_c = x - self.b_dec
        with torch.no_grad():
            pre = x_c @ self.W_enc + self.b_enc
            rows, cols, cutoff = self.select(pre, g, k)
        vals = F.relu(_GatherPre.apply(x_c, self.W_enc, self.b_enc, rows, cols, pre))
        return SparseCode(rows, cols, vals, (x.shape[0], self.cfg.d_sae), pre, cutoff)

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

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def loss(self, x: torch.Tensor, g: torch.Tensor | None = None) -> dict:
        """FVU of the reconstruction + aux_coef · AuxK loss on dead latents (+ any `penalty`); updates dead stats."""
        x = x.to(self.W_dec.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        code = self.encode_sparse(x, g)
        x_hat = sparse_decode(code, self.W_dec) + self.b_dec
        main = fvu_loss(x, x_hat)
        aux = self.aux_loss(x, x_hat.detach(), code.pre)
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

    def aux_loss(self, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
        """AuxK: the top k_aux eligible latents reconstruct the detached residual x − x̂."""
        eligible = self.aux_eligible()
        n_el = int(eligible.sum())
        if n_el == 0 or not self.training or self.cfg.aux_coef == 0:
            return torch.zeros((), device=x.device)
        k_aux = min(self.cfg.k_aux, n_el)
        with torch.no_grad():
            cols = pre.masked_fill(~eligible, float("-inf")).topk(k_aux, dim=-1).indices.reshape(-1)
            rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(k_aux)
        vals = F.relu(_GatherPre.apply(x - self.b_dec, self.W_enc, self.b_enc, rows, cols, pre))
        e = x - x_hat
        e_hat = sparse_decode(SparseCode(rows, cols, vals, pre.shape), self.W_dec)
        return fvu_loss(e, e_hat).nan_to_num(0.0)

    # ---- decoder geometry (Gao et al.) -------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def project_decoder_grad(self) -> None:
        """Remove the gradient component parallel to each atom (keeps the step on the sphere)."""
        if self.W_dec.grad is not None:
            self.W_dec.grad -= (self.W_dec.grad * self.W_dec).sum(1, keepdim=True) * self.W_dec

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

