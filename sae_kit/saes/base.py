"""The one interface every dictionary shares, and the sparse kernels that make CPU training fast.

Every dictionary is an `SAE` with ``encode(x) -> z``, ``decode(z) -> x_hat``, ``forward(x) ->
(x_hat, z)`` and ``loss(x, g=None) -> dict``. Parameters follow SAELens names and layouts:
``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``, ``W_dec [d_sae, d_in]`` (rows are unit-norm atoms),
``b_dec [d_in]`` (subtracted before encoding, added after decoding).

A subclass says only *which* latents to keep (`select`); training then runs on the sparse code
(rows, cols, vals): the decoder is an ``embedding_bag`` over the kept atoms (forward and backward),
and the encoder's backward (`_GatherPre`) gathers only the kept encoder columns for ∂x.
`benchmarks/bench_train_step.py` measures the step against plain dense autograd.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..validate import activations as _valid_activations
from ..validate import integer, real


@dataclass
class SAEConfig:
    d_in: int
    d_sae: int
    k: int = 32  # active latents per token (TopK), or the average per token (batch rules)
    k_aux: int | None = None  # AuxK latents; None = d_in // 2 (Gao et al. App. B.1 heuristic)
    aux_coef: float = 1 / 32  # Gao et al.'s AuxK weight
    dead_tokens: int = 50_000  # a latent is dead after this many tokens without firing (Gao: 10M)
    architecture: str = "topk"
    model_name: str = ""  # stamped by `train` from the store: the model the SAE was trained on
    hook_name: str = ""  # stamped by `train`: the hook it reads (evaluate / Splicer refuse another)
    store_key: str = ""  # stamped by `train`: the activation store it was trained on
    extra: dict = field(default_factory=dict)  # method-specific knobs, saved with the weights

    def __post_init__(self):
        self.d_in = integer("d_in", self.d_in, min=1)
        self.d_sae = integer("d_sae", self.d_sae, min=1)
        self.k = integer("k", self.k, hint=f" (active latents per token, 0 < k < d_sae={self.d_sae})")
        self.dead_tokens = integer("dead_tokens", self.dead_tokens, min=1)
        self.aux_coef = real("aux_coef", self.aux_coef, min=0)
        if self.k_aux is not None:
            self.k_aux = integer("k_aux", self.k_aux, min=1)
        if not isinstance(self.extra, dict):
            raise TypeError(f"extra must be a dict of method knobs, got {type(self.extra).__name__}")
        # matching pursuit may run more steps than it has atoms (an atom can be picked again)
        if self.k <= 0 or (self.k >= self.d_sae and self.architecture != "matching_pursuit"):
            raise ValueError(f"k must satisfy 0 < k < d_sae; got k={self.k}, d_sae={self.d_sae}. "
                             f"Pick a smaller k or a wider dictionary")
        if self.k_aux is None:
            self.k_aux = self.d_in // 2


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


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Σ‖x − x̂‖² / Σ‖x − x̄‖² over the batch (Gao et al.'s normalised MSE)."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


class SAE(nn.Module):
    """Base dictionary: TopK-style encoder/decoder with AuxK; subclasses override `select`."""

    def __init__(self, cfg: SAEConfig, seed: int = 0, device=None, dtype=torch.float32):
        super().__init__()
        self.cfg = cfg
        self.init_seed = seed
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

    # ---- the method-specific part ------------------------------------------------------------
    def select(self, pre: torch.Tensor, g: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Which (row, col) entries of `pre` [B, d_sae] to keep; rows sorted. TopK by default."""
        idx = pre.topk(self.cfg.k, dim=-1).indices  # [B, k]
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(self.cfg.k)
        return rows, idx.reshape(-1)

    def after_step(self, pre: torch.Tensor, code: SparseCode) -> None:
        """Hook for per-step statistics (thresholds, densities); runs in training mode, no grad."""

    # ---- the shared part ---------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def encode_sparse(self, x: torch.Tensor, g: torch.Tensor | None = None) -> SparseCode:
        """Select latents and return their values with the sparse backward attached."""
        x = _check_input(x, self.cfg.d_in, self.W_dec.dtype)
        x_c = x - self.b_dec
        with torch.no_grad():
            pre = x_c @ self.W_enc + self.b_enc
            rows, cols = self.select(pre, g)
        vals = F.relu(_GatherPre.apply(x_c, self.W_enc, self.b_enc, rows, cols, pre))
        return SparseCode(rows, cols, vals, (x.shape[0], self.cfg.d_sae), pre)

    def encode(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        """Dense latents z [B, d_sae]."""
        return self.encode_sparse(x, g).dense()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        if not isinstance(z, torch.Tensor) or z.ndim != 2 or z.shape[1] != self.cfg.d_sae:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"decode expects latents z of shape [batch, {self.cfg.d_sae}], got {shape}")
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor, g: torch.Tensor | None = None):
        code = self.encode_sparse(x, g)
        return sparse_decode(code, self.W_dec) + self.b_dec, code.dense()

    def reconstruct(self, x: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        return sparse_decode(self.encode_sparse(x, g), self.W_dec) + self.b_dec

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fired >= self.cfg.dead_tokens

    def loss(self, x: torch.Tensor, g: torch.Tensor | None = None) -> dict:
        """FVU of the reconstruction + aux_coef · AuxK loss on dead latents (+ any `penalty`); updates dead stats."""
        x = x.to(self.W_dec.dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        code = self.encode_sparse(x, g)
        x_hat = sparse_decode(code, self.W_dec) + self.b_dec
        main = fvu(x, x_hat)
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
        return fvu(e, e_hat).nan_to_num(0.0)

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
        return f"{c.architecture}: d_in={c.d_in}, d_sae={c.d_sae}, k={c.k}"


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

