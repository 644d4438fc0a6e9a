"""Look at what a latent means: an interactive explorer for JupyterLab, and a static card of it.

``explore(sae, store, model)`` returns an ipywidgets app. It first builds a `LatentIndex` once per
(dictionary, store) and caches it on disk; after that, switching latents only reads memory:

- the sparse codes of the store's eval split, grouped by latent: density, largest activation, an
  activation histogram, the top examples and samples from several activation bands, each shown
  with context on both sides and every token shaded by the latent's activation on it;
- the logit lens: each atom through the unembedding, ``W_dec W_U`` (an MLP-neuron atom goes
  through the layer's ``W_out`` first), with its most promoted and most suppressed tokens;
- each atom's nearest neighbours by cosine (buttons: click one to go there);
- a box to type text and see the latent's activation on every token, and a steering box that adds
  α·d to the stream and shows the continuation next to the clean one (`steering.Steerer`).

``LatentCard`` (``explorer.card(j)``, or `latent_card`) renders the same panels for one latent as
static HTML, so an executed notebook shows something where no kernel runs (nbconvert, GitHub).
`top_contexts` / `context_table` are the older, plain-table view.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import random
import time
from dataclasses import dataclass, fields
from functools import lru_cache

import numpy as np
import torch

from .config import cache_dir
from .metrics import forward_batched
from .train import config_without_stamps, weights_digest

_FORMAT = 2  # bump when `LatentIndex` changes, to invalidate cached indexes


# ---- the precompute ----------------------------------------------------------------------------
@dataclass
class LatentIndex:
    """Everything the explorer shows, computed once per (dictionary, store) (`build_index`)."""

    hook: str
    tokens: torch.Tensor  # [n_windows, ctx_len] the split's token windows
    skip_first: int  # stored positions of a window start here ...
    per_window: int  # ... and there are this many
    ptr: torch.Tensor  # [d_sae + 1] latent j's entries are tok/act[ptr[j]:ptr[j + 1]] (CSR by latent)
    tok: torch.Tensor  # [nnz] flat token index into the split (window · per_window + position)
    act: torch.Tensor  # [nnz] activation there (> 0), sorted descending within each latent
    density: torch.Tensor  # [d_sae] share of the split's tokens the latent fires on
    top_token_ids: torch.Tensor  # [d_sae, 10] token ids of each latent's 10 strongest examples (-1: none)
    logit_top: torch.Tensor | None  # [d_sae, n] token ids most promoted by the atom (None: no logit lens)
    logit_top_val: torch.Tensor | None
    logit_bottom: torch.Tensor | None  # [d_sae, n] most suppressed
    logit_bottom_val: torch.Tensor | None
    neighbours: torch.Tensor  # [d_sae, n] nearest atoms by cosine
    neighbour_cos: torch.Tensor
    n_stored: int  # tokens that have a code (windows of unequal length leave padding out)

    @property
    def d_sae(self) -> int:
        return len(self.density)

    @property
    def n_tokens(self) -> int:
        return self.n_stored

    def examples(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(flat token indices, activations) where latent `j` fires, strongest first."""
        if not 0 <= j < self.d_sae:
            raise ValueError(f"latent must be in 0-{self.d_sae - 1}, got {j}")
        a, b = int(self.ptr[j]), int(self.ptr[j + 1])
        return self.tok[a:b], self.act[a:b]

    def max_act(self, j: int) -> float:
        _, act = self.examples(j)
        return float(act[0]) if len(act) else 0.0

    def window_of(self, t: int) -> tuple[list[int], int]:
        """The token ids of the window holding flat token `t`, and the token's position in it."""
        w, p = divmod(int(t), self.per_window)
        return self.tokens[w].tolist(), p + self.skip_first

    def quantile_samples(self, j: int, bands: int = 4, per_band: int = 3, seed: int = 0) -> list[dict]:
        """Random examples from activation bands (fractions of the max): (3/4, 1], (1/2, 3/4], ...

        Returns one dict per band: ``lo``, ``hi`` (activation bounds), ``count`` and ``tokens`` (a
        seeded sample of flat token indices in that band)."""
        tok, act = self.examples(j)
        top = self.max_act(j)
        rng = random.Random(seed * 1_000_003 + j)
        out = []
        for i in range(bands):
            hi, lo = top * (bands - i) / bands, top * (bands - i - 1) / bands
            inside = ((act <= hi) & (act > lo)).nonzero().flatten().tolist()
            chosen = sorted(rng.sample(inside, min(per_band, len(inside))))
            out.append({"lo": lo, "hi": hi, "count": len(inside), "tokens": tok[chosen].tolist(),
                        "acts": act[chosen].tolist()})
        return out


def _index_key(sae, store, split: str, n_logits: int, n_neighbours: int) -> str:
    desc = {"class": type(sae).__name__, "cfg": config_without_stamps(sae), "mode": sae.mode,
            "store": store.spec.key(), "split": split, "n": [n_logits, n_neighbours], "format": _FORMAT,
            "weights": weights_digest(sae)}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:20]


def atoms_to_residual(model, hook: str, W: torch.Tensor) -> torch.Tensor | None:
    """Dictionary atoms [n, d] as residual-stream directions [n, d_model]: as they are for residual
    hooks, through the layer's ``W_out`` for MLP neurons (``mlp.hook_post``); None for other hooks."""
    parts = hook.split(".")
    if parts[-1] in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out"):
        return W
    if len(parts) == 4 and parts[2:] == ["mlp", "hook_post"]:
        W_out = model.blocks[int(parts[1])].mlp.W_out.detach()
        return W.to(W_out.device, W_out.dtype) @ W_out
    return None


@torch.no_grad()
def logit_lens(model, hook: str, W: torch.Tensor, n: int = 10, chunk: int = 512):
    """For each atom: the `n` token ids its direction promotes most and least, ``W_resid W_U``.

    Returns (top ids, top values, bottom ids, bottom values), each [n_atoms, n]; all None when the
    hook has no path to the unembedding (`atoms_to_residual`)."""
    R = atoms_to_residual(model, hook, W.detach())
    if R is None:
        return None, None, None, None
    W_U = model.W_U.detach()
    out = [[], [], [], []]
    for i in range(0, len(R), chunk):
        logits = R[i:i + chunk].to(W_U.device, W_U.dtype) @ W_U
        top, bottom = logits.topk(n, dim=1), (-logits).topk(n, dim=1)
        for lst, t in zip(out, (top.indices, top.values, bottom.indices, -bottom.values)):
            lst.append(t.cpu())
    return tuple(torch.cat(lst) for lst in out)


@torch.no_grad()
def nearest_neighbours(W: torch.Tensor, n: int = 8, chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """Each atom's `n` nearest other atoms by cosine: (ids [n_atoms, n], cosines)."""
    U = torch.nn.functional.normalize(W.detach().float(), dim=1)
    ids, cos = [], []
    for i in range(0, len(U), chunk):
        c = U[i:i + chunk] @ U.t()
        c[torch.arange(len(c)), torch.arange(i, i + len(c))] = -2.0  # not yourself
        top = c.topk(min(n, len(U) - 1), dim=1)
        ids.append(top.indices.cpu())
        cos.append(top.values.cpu())
    return torch.cat(ids), torch.cat(cos)


@torch.no_grad()
def build_index(sae, store, model, split: str = "eval", n_logits: int = 10, n_neighbours: int = 8,
                batch_size: int = 4096, cache: bool = True) -> LatentIndex:
    """The explorer's precompute for `sae` on a store's split, read from the kit's cache when an
    identical one exists (same weights, mode, store and sizes)."""
    path = cache_dir() / "explorer" / f"{_index_key(sae, store, split, n_logits, n_neighbours)}.pt"
    if cache and path.exists():
        return LatentIndex(**torch.load(path, weights_only=True))
    if len(store.token_range(split)) == 0:
        raise ValueError(f"store {store.path.name} has no {split} split to explore; harvest it with eval_tokens > 0 "
                         f"or explore split='train'")
    grads = sae.mode in sae.grad_modes
    x, g = store.get(split, grads=True) if grads else (store.get(split), None)
    rows, cols, vals = [], [], []
    for i in range(0, len(x), batch_size):
        gb = g[i:i + batch_size].to(sae.device) if g is not None else None
        code = sae.encode_sparse(x[i:i + batch_size].to(sae.device), gb)
        keep = code.vals > 0
        rows.append(code.rows[keep].cpu() + i)
        cols.append(code.cols[keep].cpu())
        vals.append(code.vals[keep].detach().float().cpu())
    spec = store.spec
    index = index_from_codes(torch.cat(rows), torch.cat(cols), torch.cat(vals), sae.cfg.d_sae,
                             store.tokens[list(store.window_range(split))].int(), spec.skip_first, spec.per_window,
                             sae.W_dec.detach(), model, spec.hook, n_logits, n_neighbours)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        torch.save({f.name: getattr(index, f.name) for f in fields(index)}, tmp)
        os.replace(tmp, path)
    return index


@torch.no_grad()
def index_from_codes(rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n: int, windows: torch.Tensor,
                     skip_first: int, per_window: int, directions: torch.Tensor, model, hook: str,
                     n_logits: int = 10, n_neighbours: int = 8, n_stored: int | None = None) -> LatentIndex:
    """A `LatentIndex` from any code: (row = flat token, col = latent, val > 0) triples over the
    windows [n_windows, ctx_len] (flat token = window · per_window + position − skip_first; a
    token id of −1 is padding) and the latents' directions [n, d] at `hook`. `n_stored`: the tokens
    that had a code (default every position of every window); densities are shares of it."""
    N = len(windows) * per_window
    n_stored = N if n_stored is None else n_stored
    z = torch.sparse_coo_tensor(torch.stack([cols, rows]), vals, (n, N), check_invariants=True).coalesce()
    col, tok = z.indices()  # sorted by latent, then token; a latent picked twice for a token adds up
    act = z.values()
    counts = torch.bincount(col, minlength=n)
    ptr = torch.zeros(n + 1, dtype=torch.long)
    ptr[1:] = counts.cumsum(0)
    # strongest first within each latent: by activation, then (stably) by latent
    by_act = torch.argsort(-act, stable=True)
    order = by_act[torch.argsort(col[by_act], stable=True)]
    tok, act = tok[order].int(), act[order].float()
    flat = windows[:, skip_first:skip_first + per_window].reshape(-1)
    top_ids = torch.full((n, 10), -1, dtype=torch.long)
    for j in torch.nonzero(counts).flatten().tolist():
        ex = tok[ptr[j]:ptr[j] + min(10, int(counts[j]))].long()
        top_ids[j, :len(ex)] = flat[ex].long()
    lt, ltv, lb, lbv = logit_lens(model, hook, directions, n_logits)
    nb, nbc = nearest_neighbours(directions, n_neighbours)
    return LatentIndex(hook=hook, tokens=windows.int(), skip_first=skip_first, per_window=per_window, ptr=ptr,
                       tok=tok, act=act, density=counts.float() / n_stored, top_token_ids=top_ids, logit_top=lt,
                       logit_top_val=ltv, logit_bottom=lb, logit_bottom_val=lbv, neighbours=nb, neighbour_cos=nbc,
                       n_stored=n_stored)


# ---- HTML pieces (pure functions of the index) ---------------------------------------------------
@lru_cache(maxsize=65536)
def _token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([int(token_id)])


def _show(s: str) -> str:
    """A token's text, escaped, with whitespace made visible."""
    return html.escape(s).replace("\n", "⏎").replace(" ", "&nbsp;") or "∅"


def _shade(a: float, vmax: float) -> str:
    alpha = 0.0 if vmax <= 0 else min(1.0, max(0.0, a / vmax))
    return f"rgba(255,140,0,{alpha:.2f})"


def context_html(index: LatentIndex, tokenizer, t: int, acts: dict[int, float], vmax: float,
                 left: int = 12, right: int = 4) -> str:
    """One example: `left` tokens before flat token `t` and `right` after, each shaded by the latent's
    activation on it (`acts`: flat token → activation); the example's own token is underlined."""
    ids, pos = index.window_of(t)
    w0 = (int(t) // index.per_window) * index.per_window  # flat index of the window's first stored position
    spans = []
    for q in range(max(0, pos - left), min(len(ids), pos + right + 1)):
        if ids[q] < 0:  # padding after a short sentence
            break
        flat = w0 + q - index.skip_first
        stored = 0 <= q - index.skip_first < index.per_window
        a = acts.get(flat, 0.0) if stored else 0.0
        style = f"background:{_shade(a, vmax)};" + ("border-bottom:2px solid #c00;font-weight:bold;" if q == pos else "")
        tip = f"{a:.2f}" if stored else "not stored"
        spans.append(f"<span class='sae-kit-tok' style='{style}' title='{tip}'>{_show(_token_text(tokenizer, ids[q]))}</span>")
    return f"<div style='font-family:monospace;white-space:nowrap;overflow:hidden'>{''.join(spans)}</div>"


def histogram_svg(values: torch.Tensor, width: int = 320, height: int = 90, bins: int = 30) -> str:
    """An inline SVG histogram of a latent's non-zero activations (counts on a log scale)."""
    if len(values) == 0:
        return "<i>never fires on these tokens</i>"
    v = values.numpy()
    counts, edges = np.histogram(v, bins=bins, range=(0, float(v.max())))
    hmax = np.log1p(counts.max())
    bw = width / bins
    bars = "".join(f"<rect x='{i * bw:.1f}' y='{height - 14 - (height - 14) * np.log1p(c) / hmax:.1f}' "
                   f"width='{bw - 1:.1f}' height='{(height - 14) * np.log1p(c) / hmax:.1f}' fill='#e8870e'>"
                   f"<title>{edges[i]:.2f}-{edges[i + 1]:.2f}: {c}</title></rect>" for i, c in enumerate(counts))
    axis = (f"<text x='0' y='{height - 2}' font-size='10'>0</text>"
            f"<text x='{width}' y='{height - 2}' font-size='10' text-anchor='end'>{edges[-1]:.2f}</text>")
    return f"<svg width='{width}' height='{height}' class='sae-kit-hist'>{bars}{axis}</svg>"


def _logit_list(tokenizer, ids, vals, colour: str) -> str:
    if ids is None:
        return "<i>no logit lens at this hook</i>"
    return "<br>".join(f"<span style='color:{colour}'>{v:+.2f}</span> <code>{_show(_token_text(tokenizer, i))}</code>"
                       for i, v in zip(ids.tolist(), vals.tolist()))


def latent_html(index: LatentIndex, tokenizer, j: int, n_top: int = 8, bands: int = 4, per_band: int = 2,
                seed: int = 0, neighbours: bool = True) -> str:
    """Every static panel of latent `j` as one HTML block (the card, and the app's main view)."""
    tok, act = index.examples(j)
    vmax = index.max_act(j)
    acts = dict(zip(tok.tolist(), act.tolist()))
    head = (f"<div class='sae-kit-header'><b>latent {j}</b> · fires on {100 * float(index.density[j]):.3f}% of "
            f"{index.n_tokens:,} tokens · max activation {vmax:.2f}</div>")
    top = "".join(f"<div style='display:flex;gap:8px'><code>{a:6.2f}</code>{context_html(index, tokenizer, t, acts, vmax)}</div>"
                  for t, a in zip(tok[:n_top].tolist(), act[:n_top].tolist())) or "<i>no examples</i>"
    samples = ""
    for band in (index.quantile_samples(j, bands, per_band, seed) if len(tok) else []):
        rows = "".join(f"<div style='display:flex;gap:8px'><code>{a:6.2f}</code>{context_html(index, tokenizer, t, acts, vmax)}</div>"
                       for t, a in zip(band["tokens"], band["acts"]))
        samples += (f"<div style='margin-top:4px'><i>activation {band['lo']:.2f}-{band['hi']:.2f} "
                    f"({band['count']} tokens)</i>{rows}</div>")
    logits = ""
    if index.logit_top is not None:
        logits = (f"<td style='vertical-align:top;padding-left:12px'><b>promotes</b><br>"
                  f"{_logit_list(tokenizer, index.logit_top[j], index.logit_top_val[j], '#080')}</td>"
                  f"<td style='vertical-align:top;padding-left:12px'><b>suppresses</b><br>"
                  f"{_logit_list(tokenizer, index.logit_bottom[j], index.logit_bottom_val[j], '#a00')}</td>")
    near = ""
    if neighbours:
        near = "<div><b>nearest atoms</b> " + ", ".join(
            f"{int(i)} ({float(c):.2f})" for i, c in zip(index.neighbours[j], index.neighbour_cos[j])) + "</div>"
    return (f"<div class='sae-kit-card'>{head}<table><tr>"
            f"<td style='vertical-align:top'><b>activations</b><br>{histogram_svg(act)}</td>{logits}</tr></table>"
            f"<div class='sae-kit-examples'><b>top examples</b>{top}</div>"
            f"<div class='sae-kit-samples'><b>samples by activation</b>{samples}</div>{near}</div>")


class LatentCard:
    """One latent's panels as static HTML (shown by Jupyter, nbconvert and GitHub alike)."""

    def __init__(self, index: LatentIndex, tokenizer, latent: int):
        self.index, self.tokenizer, self.latent = index, tokenizer, latent

    def _repr_html_(self) -> str:
        return latent_html(self.index, self.tokenizer, self.latent)

    def __repr__(self) -> str:
        tok, act = self.index.examples(self.latent)
        words = [_token_text(self.tokenizer, self.index.window_of(t)[0][self.index.window_of(t)[1]])
                 for t in tok[:5].tolist()]
        return f"latent {self.latent}: density {float(self.index.density[self.latent]):.4f}, top tokens {words}"


def latent_card(sae, store, model, latent: int) -> LatentCard:
    """The static card of one latent (builds or loads the `LatentIndex`)."""
    return LatentCard(build_index(sae, store, model), model.tokenizer, latent)


@torch.no_grad()
def hook_activations(model, hook: str, text: str) -> tuple[list[int], torch.Tensor]:
    """The tokens of `text` and the model's activation at `hook` on each, [n_tokens, d]."""
    toks = model.to_tokens(text, prepend_bos=False)
    if toks.shape[1] == 0:
        return [], torch.zeros(0, 0)
    layer = int(hook.split(".")[1]) if hook.startswith("blocks.") else model.cfg.n_layers - 1
    _, cache = model.run_with_cache(toks, names_filter=hook, stop_at_layer=layer + 1)
    return toks[0].tolist(), cache[hook][0].reshape(toks.shape[1], -1).float()


@torch.no_grad()
def activations_on_text(sae, model, hook: str, text: str) -> tuple[list[int], torch.Tensor]:
    """The tokens of `text` and the dictionary's code on each, [n_tokens, d_sae] (first token
    included, though the dictionary never saw a window's first position in training)."""
    ids, x = hook_activations(model, hook, text)
    if not ids:
        return [], torch.zeros(0, sae.cfg.d_sae)
    return ids, sae.encode(x.to(sae.device)).cpu()


# ---- the app -----------------------------------------------------------------------------------
def explore(sae, store, model, latent: int | None = None, seed: int = 0) -> "Explorer":
    """An interactive explorer of `sae`'s latents on the store's eval split (see the module doc)."""
    index = build_index(sae, store, model)
    return Explorer(index, model, sae.W_dec.detach(), lambda text: activations_on_text(sae, model, index.hook, text),
                    latent=latent, seed=seed)


def explore_snmf(fit, acts, model, latent: int | None = None, seed: int = 0) -> "Explorer":
    """The explorer on SNMF features (`snmf.fit_snmf` on `concepts.concept_activations`): examples
    come from the concept sentences, directions are the columns of F (neuron space, read through
    ``W_out`` by the logit lens), and typed text is encoded by non-negative least squares on F."""
    from scipy.optimize import nnls

    L = max(len(t) for t in acts.tokens)
    windows = torch.full((len(acts.tokens), L), -1, dtype=torch.int32)
    for s, ids in enumerate(acts.tokens):
        windows[s, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
    G = fit.G.detach().cpu().float()
    flat = acts.sentence.long() * (L - 1) + acts.position.long() - 1  # position 0 is never collected
    r, c = torch.nonzero(G > 0, as_tuple=True)
    F = fit.F.detach().cpu().float()
    index = index_from_codes(flat[r], c, G[r, c], G.shape[1], windows, 1, L - 1, F.t(), model, acts.hook,
                             n_stored=len(G))
    F64 = F.double().numpy()

    def encode_text(text: str):
        ids, x = hook_activations(model, acts.hook, text)
        if not ids:
            return [], torch.zeros(0, G.shape[1])
        return ids, torch.tensor(np.stack([nnls(F64, xi)[0] for xi in x.double().cpu().numpy()])).float()

    return Explorer(index, model, F.t(), encode_text, latent=latent, seed=seed)


class Explorer:
    """The ipywidgets app `explore` returns; ``explorer.card(j)`` gives the static card of a latent.

    ``explorer.show(j)`` switches latent (as the controls do); ``explorer.switch_ms`` holds how long
    each switch took. `directions` [n, d] are the latents' directions at the index's hook (steering
    adds them); ``encode_text(text) -> (token ids, codes [n_tokens, n])`` powers the text box."""

    def __init__(self, index: LatentIndex, model, directions: torch.Tensor, encode_text=None,
                 latent: int | None = None, seed: int = 0):
        import ipywidgets as W

        self.index, self.model, self.tok = index, model, model.tokenizer
        self.directions, self.encode_text = directions, encode_text
        self.rng = random.Random(seed)
        self.switch_ms: list[float] = []
        alive = torch.nonzero(index.density > 0).flatten()
        start = int(latent) if latent is not None else (int(alive[0]) if len(alive) else 0)
        n = index.d_sae
        self.latent = W.BoundedIntText(value=start, min=0, max=n - 1, description="latent", layout=W.Layout(width="170px"))
        self.latent.add_class("sae-kit-latent")
        self.slider = W.IntSlider(value=start, min=0, max=n - 1, readout=False, layout=W.Layout(width="300px"))
        W.jslink((self.latent, "value"), (self.slider, "value"))
        self.random = W.Button(description="random alive latent", layout=W.Layout(width="170px"))
        self.random.add_class("sae-kit-random")
        dens = index.density[alive].log10() if len(alive) else torch.tensor([-6.0, 0.0])
        lo, hi = float(dens.min()), float(dens.max())
        self.band = W.FloatRangeSlider(value=(lo, hi), min=lo, max=max(hi, lo + 1e-3), step=0.05,
                                       description="log₁₀ density", readout_format=".1f",
                                       style={"description_width": "initial"}, layout=W.Layout(width="380px"))
        self.query = W.Text(placeholder="a token, e.g.  import", description="search", layout=W.Layout(width="260px"))
        self.query.add_class("sae-kit-search")
        self.search_button = W.Button(description="find latents", layout=W.Layout(width="110px"))
        self.found = W.HBox([])
        self.view = W.HTML()
        self.view.add_class("sae-kit-view")
        self.near = W.HBox([])
        self.text = W.Textarea(placeholder="type text, then run: the latent's activation on each token",
                               layout=W.Layout(width="520px", height="60px"))
        self.text.add_class("sae-kit-textbox")
        self.run_text = W.Button(description="run text")
        self.run_text.add_class("sae-kit-run-text")
        self.text_out = W.HTML()
        self.text_out.add_class("sae-kit-text-result")
        self.prompt = W.Text(value="I think that", description="prompt", layout=W.Layout(width="300px"))
        self.alpha = W.FloatText(value=round(4 * max(index.max_act(start), 1.0), 1), description="α",
                                 layout=W.Layout(width="150px"))
        self.steer_button = W.Button(description="steer")
        self.steer_out = W.HTML()
        self.steer_out.add_class("sae-kit-steer-result")
        self.latent.observe(lambda ch: self.show(ch["new"]), names="value")
        self.random.on_click(lambda _: self._random())
        self.search_button.on_click(lambda _: self._search())
        self.run_text.on_click(lambda _: self._run_text())
        self.steer_button.on_click(lambda _: self._steer())
        self.widget = W.VBox([
            W.HBox([self.latent, self.slider, self.random]), W.HBox([self.band, self.query, self.search_button]),
            self.found, self.view, W.HBox([W.HTML("<b>nearest atoms</b>&nbsp;"), self.near]),
            W.HTML("<b>test your text</b>"), W.HBox([self.text, self.run_text]), self.text_out,
            W.HTML("<b>steer</b> (add α·d to the stream at the dictionary's hook)"),
            W.HBox([self.prompt, self.alpha, self.steer_button]), self.steer_out])
        self.widget.add_class("sae-kit-explorer")
        self.show(start)

    # -- what the controls do --
    def show(self, j: int) -> None:
        import ipywidgets as W

        t0 = time.perf_counter()
        j = int(j)
        if self.latent.value != j:
            self.latent.value = j  # observers call show again
            return
        self.view.value = latent_html(self.index, self.tok, j, neighbours=False)
        buttons = []
        for i, c in zip(self.index.neighbours[j].tolist(), self.index.neighbour_cos[j].tolist()):
            b = W.Button(description=f"{i} ({c:.2f})", layout=W.Layout(width="auto"))
            b.on_click(lambda _, i=i: self.show(i))
            buttons.append(b)
        self.near.children = buttons
        self.text_out.value = ""
        self.steer_out.value = ""
        if self.text.value.strip():
            self._run_text()
        self.switch_ms.append(1000 * (time.perf_counter() - t0))

    def _random(self) -> None:
        lo, hi = self.band.value
        d = self.index.density.clamp_min(1e-12).log10()
        pool = torch.nonzero((self.index.density > 0) & (d >= lo - 1e-6) & (d <= hi + 1e-6)).flatten().tolist()
        if pool:
            self.show(self.rng.choice(pool))

    def search(self, text: str, limit: int = 12) -> list[int]:
        """Latents whose atom promotes a token of `text` (logit lens) or whose strongest examples are it."""
        ids = set()
        for variant in (text, " " + text.strip(), text.strip()):
            t = self.tok.encode(variant, add_special_tokens=False)
            if t:
                ids.add(t[0])
        if not ids:
            return []
        want = torch.tensor(sorted(ids))
        fires = torch.isin(self.index.top_token_ids, want).sum(1)
        promotes = torch.isin(self.index.logit_top, want).any(1) if self.index.logit_top is not None else 0
        score = fires.float() + 5 * torch.as_tensor(promotes).float()
        hits = torch.nonzero(score > 0).flatten()
        return hits[score[hits].argsort(descending=True)][:limit].tolist()

    def _search(self) -> None:
        import ipywidgets as W

        buttons = []
        for j in self.search(self.query.value):
            b = W.Button(description=str(j), layout=W.Layout(width="auto"))
            b.on_click(lambda _, j=j: self.show(j))
            buttons.append(b)
        self.found.children = buttons or [W.HTML("<i>no latent found</i>")]

    def _run_text(self) -> None:
        j = int(self.latent.value)
        if self.encode_text is None:
            self.text_out.value = "<i>this dictionary has no encoder for new text</i>"
            return
        ids, z = self.encode_text(self.text.value)
        col = z[:, j] if len(ids) else torch.zeros(0)
        vmax = max(self.index.max_act(j), float(col.max()) if len(col) else 0.0)
        spans = "".join(f"<span class='sae-kit-tok' style='background:{_shade(float(a), vmax)}' title='{float(a):.2f}'>"
                        f"{_show(_token_text(self.tok, i))}</span>" for i, a in zip(ids, col.tolist()))
        self.text_out.value = (f"<div style='font-family:monospace'>{spans}</div>"
                               f"<small>max here {float(col.max()) if len(col) else 0:.2f}; "
                               f"fires on {int((col > 0).sum())} of {len(ids)} tokens</small>")

    def _steer(self) -> None:
        from .steering import Steerer

        j = int(self.latent.value)
        s = Steerer(self.model, self.index.hook, prompt=self.prompt.value or " ", n_samples=1, new_tokens=20)
        P = s.tokens.shape[1]
        clean = self.tok.decode(s.generate()[0, P:].tolist())
        steered = self.tok.decode(s.generate(self.directions[j], float(self.alpha.value))[0, P:].tolist())
        self.steer_out.value = ("<table><tr><th>clean</th><th>steered</th></tr><tr>"
                                f"<td style='vertical-align:top'>{html.escape(clean)}</td>"
                                f"<td style='vertical-align:top'>{html.escape(steered)}</td></tr></table>")

    def card(self, latent: int | None = None) -> LatentCard:
        """The static card of `latent` (default: the one shown)."""
        return LatentCard(self.index, self.tok, int(self.latent.value if latent is None else latent))

    def _repr_mimebundle_(self, **kw):
        """The live widget, plus the shown latent's static card for frontends without widgets."""
        bundle = dict(self.widget._repr_mimebundle_(**kw) or {})
        bundle["text/html"] = latent_html(self.index, self.tok, int(self.latent.value))
        return bundle


# ---- the plain table (earlier view) ----------------------------------------------------------------
@torch.no_grad()
def top_contexts(sae, store, latent: int, tokenizer, n: int = 8, window: int = 12,
                 split: str = "eval", z: torch.Tensor | None = None) -> list[dict]:
    """The `n` tokens of a split on which `latent` fires hardest, with `window` tokens before them.

    Returns:
        One dict per context: ``value``, ``token`` (the activating token), ``left`` (context text).
    """
    if not 0 <= latent < sae.cfg.d_sae:
        raise ValueError(f"latent must be in 0-{sae.cfg.d_sae - 1}, got {latent}")
    spec = store.spec
    if z is None:
        _, z = forward_batched(sae, store.get(split))
    col = z[:, latent]
    vals, idx = col.topk(min(n, int((col > 0).sum())))
    w0 = store.window_range(split).start
    out = []
    for v, i in zip(vals.tolist(), idx.tolist()):
        w, p = divmod(i, spec.per_window)
        pos = p + spec.skip_first
        toks = store.tokens[w0 + w].tolist()
        out.append({"value": v, "token": tokenizer.decode([toks[pos]]),
                    "left": tokenizer.decode(toks[max(0, pos - window):pos])})
    return out


class ContextTable:
    """Top contexts of several latents, shown as an HTML table in Jupyter (plain text elsewhere)."""

    def __init__(self, rows: dict[int, list[dict]]):
        self.rows = rows

    def _repr_html_(self) -> str:
        parts = ["<table><tr><th>latent</th><th style='text-align:left'>top contexts (activating token in bold)</th></tr>"]
        for latent, ctxs in self.rows.items():
            cells = "<br>".join(
                f"<code>{c['value']:.1f}</code> …{html.escape(c['left'][-60:])}"
                f"<b style='background:#ffe08a'>{html.escape(c['token'])}</b>" for c in ctxs)
            parts.append(f"<tr><td>{latent}</td><td style='text-align:left'>{cells}</td></tr>")
        return "".join(parts) + "</table>"

    def __repr__(self) -> str:
        return "\n".join(f"latent {latent}: " + " | ".join(f"…{c['left'][-30:]!r}[{c['token']!r}]" for c in ctxs)
                         for latent, ctxs in self.rows.items())


def context_table(sae, store, latents: list[int], tokenizer, n: int = 5, split: str = "eval") -> ContextTable:
    """`top_contexts` for several latents, encoding the split once."""
    _, z = forward_batched(sae, store.get(split))
    return ContextTable({j: top_contexts(sae, store, j, tokenizer, n=n, split=split, z=z) for j in latents})
