"""Look at what a latent responds to: its top-activating tokens with their context."""

from __future__ import annotations

import html

import torch

from .metrics import forward_batched


@torch.no_grad()
def top_contexts(sae, store, latent: int, tokenizer, n: int = 8, window: int = 12,
                 split: str = "eval", z: torch.Tensor | None = None) -> list[dict]:
    """The `n` tokens of a split on which `latent` fires hardest, with `window` tokens before them.

    Args:
        sae: the dictionary.
        store: the `ActivationStore` (its token windows give the context).
        latent: latent index.
        tokenizer: the model's tokenizer.
        n, window: how many contexts, how many tokens of left context.
        split: ``"eval"`` or ``"train"``.
        z: precomputed latents of that split (saves re-encoding when exploring many latents).

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
