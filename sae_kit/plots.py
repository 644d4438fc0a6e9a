"""Matplotlib figures the notebooks share. Each returns its Figure (and saves it when asked)."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch


def _save(fig, name: str | None):
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
    return _save(fig, save)


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
    return _save(fig, save)


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
    return _save(fig, save)
