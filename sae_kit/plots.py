"""Matplotlib figures the notebooks share. Each returns its Figure (and saves it when asked)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch


def save_figure(fig, name: str | None = None):
    """Save `fig` as results/figures/<name>.png (folder from $SAE_KIT_RESULTS) when a name is given."""
    if name:
        folder = Path(os.environ.get("SAE_KIT_RESULTS", "results")) / "figures"
        folder.mkdir(parents=True, exist_ok=True)
        fig.savefig(folder / f"{name}.png", dpi=110, bbox_inches="tight")
    return fig


def _smooth(y, w: int):
    y = np.asarray(y, dtype=float)
    if len(y) < 2 * w or w < 2:
        return y
    return np.convolve(y, np.ones(w) / w, mode="valid")


def training_curves(histories: dict, save: str | None = None):
    """FVU, L0 and dead % against tokens seen, one line per run ({label: History})."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    for label, h in histories.items():
        w = max(1, len(h.step) // 20)
        t = np.asarray(h.tokens)[w - 1:] if w > 1 and len(h.step) >= 2 * w else np.asarray(h.tokens)
        for ax, key in zip(axes, ("fvu", "l0", "dead")):
            y = _smooth(getattr(h, key), w)
            ax.plot(t[: len(y)], 100 * y if key == "dead" else y, label=label)
    for ax, title in zip(axes, ("FVU (train batch)", "L0 (active latents / token)", "dead latents (%)")):
        ax.set_title(title)
        ax.set_xlabel("tokens seen")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, save)


def density_histogram(densities: dict, save: str | None = None):
    """Histogram of log10 feature density per run ({label: density tensor}); dead latents at left."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    bins = np.linspace(-6, 0, 49)
    for label, d in densities.items():
        d = torch.as_tensor(d).float().numpy()
        ax.hist(np.log10(np.clip(d, 1e-6, None)), bins=bins, histtype="step", lw=1.5,
                label=f"{label} (dead {100 * np.mean(d == 0):.1f}%)")
    ax.set_xlabel("log10 feature density (fraction of tokens active)")
    ax.set_ylabel("latents")
    ax.axvline(-6, color="grey", ls=":", lw=1)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, save)


def frontier(points: dict, x: str = "l0", y: str = "fvu", logy: bool = True, save: str | None = None, ax=None):
    """Metric `y` against `x` for several variants ({label: list of metric dicts}), one line each."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 3.8))
    for label, rows in points.items():
        rows = sorted(rows, key=lambda r: r[x])
        ax.plot([r[x] for r in rows], [r[y] for r in rows], "o-", label=label)
    ax.set_xlabel(x.upper() if x == "l0" else x)
    ax.set_ylabel(y)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, save)


def allocation_picture(pre: torch.Tensor, k: int, save: str | None = None):
    """What TopK, Mutual Choice and Feature Choice keep of one small B×n affinity matrix."""
    from .saes import choice_sae

    B, n = pre.shape
    topk = torch.zeros_like(pre, dtype=torch.bool).scatter_(1, pre.topk(k, 1).indices, True)
    mc = choice_sae("mc", 2, n, k).batch_keep(pre)
    fc = choice_sae("fc", 2, n, k).batch_keep(pre)
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.2), gridspec_kw={"width_ratios": [1.15, 1, 1, 1]})
    im = axes[0].imshow(pre.numpy(), cmap="viridis")
    axes[0].set_title("affinities (pre-activations)")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    for ax, (name, keep) in zip(axes[1:], [(f"TopK: {k} per token", topk), (f"Mutual Choice: top {k * B} overall", mc),
                                           (f"Feature Choice: {k * B // n}-{-(-k * B // n)} per feature", fc)]):
        ax.imshow(keep.numpy(), cmap="Greys", vmin=0, vmax=1.4)
        for t in range(B):
            ax.text(n - 0.4, t, f" {int(keep[t].sum())}", va="center", fontsize=8, color="tab:red")
        ax.set_title(name, fontsize=10)
    for ax in axes:
        ax.set_xlabel("feature")
        ax.set_ylabel("token")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.text(0.99, 0.02, "red: features kept per token", ha="right", fontsize=8, color="tab:red")
    fig.tight_layout()
    return save_figure(fig, save)


def zipf_plot(densities: dict, fit: dict, save: str | None = None):
    """Feature density against rank (log-log) per run, with the fitted Zipf–Mandelbrot line."""
    from .saes.choice import zipf_line

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, d in densities.items():
        d = torch.sort(torch.as_tensor(d).float(), descending=True).values
        alive = d > 0
        ax.loglog(torch.arange(1, len(d) + 1)[alive].numpy(), d[alive].numpy(), lw=1.5, label=label)
    r, line = zipf_line(fit, fit["n"])
    ax.loglog(r.numpy(), line.numpy(), "k--", lw=1,
              label=f"Zipf fit: α={fit['alpha']:.2f}, b={fit['b']:g}, R²={fit['r2']:.3f}")
    ax.set_xlabel("feature rank")
    ax.set_ylabel("density (fraction of tokens)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, save)


def bars(values: dict, ylabel: str, save: str | None = None, ax=None, errors: dict | None = None):
    """A bar per label ({label: value}), optional error bars."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.5, 3.2))
    labels = list(values)
    ax.bar(labels, [values[l] for l in labels], yerr=[(errors or {}).get(l, 0) for l in labels],
           color=[f"C{i}" for i in range(len(labels))], capsize=3)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", rotation=30)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save_figure(fig, save)


def l0_histograms(l0s: dict, k: int, save: str | None = None):
    """Histogram of active features per token for several SAEs ({label: per-token L0})."""
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    top = max(float(torch.as_tensor(v).max()) for v in l0s.values())
    bins = np.arange(0, top + 2) - 0.5
    for label, v in l0s.items():
        ax.hist(torch.as_tensor(v).numpy(), bins=bins, histtype="step", lw=1.5, density=True, label=label)
    ax.axvline(k, color="grey", ls=":", lw=1)
    ax.set_xlabel("active features per token (L0)")
    ax.set_ylabel("share of tokens")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, save)


def difficulty_scatter(results: dict, save: str | None = None):
    """Per-token L0 of choice SAEs against the TopK error norm ({label: per_token_difficulty dict})."""
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (label, r) in zip(axes[0], results.items()):
        ax.scatter(r["err"].numpy(), r["l0"].numpy(), s=3, alpha=0.25)
        ax.set_xscale("log")
        ax.set_xlabel("TopK reconstruction error ‖e‖ (token difficulty)")
        ax.set_ylabel(f"{label}: features per token")
        ax.set_title(f"{label}: Spearman ρ = {r['rho']:.2f}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, save)
