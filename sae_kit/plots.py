"""Matplotlib figures the notebooks share. Each returns its Figure (and saves it when asked)."""

from __future__ import annotations


import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch


def save_figure(fig, name: str | None = None):
    """Save `fig` as <results>/figures/<name>.png (`config.results_dir`) when a name is given."""
    if name:
        from .config import results_dir

        folder = results_dir() / "figures"
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
    """Metric `y` against `x` for several variants ({label: rows}), one line each; rows are a list of
    metric dicts or a table (a `Sweep` table filtered to one variant)."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(5.5, 3.8))
    for label, rows in points.items():
        rows = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else rows
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


def allocation_picture(pre: torch.Tensor, masks: dict, save: str | None = None):
    """What each rule keeps of one small B×n affinity matrix: `masks` maps a title to a boolean mask
    (`allocation.allocation_masks`)."""
    B, n = pre.shape
    fig, axes = plt.subplots(1, 1 + len(masks), figsize=(3.5 * (1 + len(masks)), 3.2),
                             gridspec_kw={"width_ratios": [1.15] + [1] * len(masks)})
    im = axes[0].imshow(pre.numpy(), cmap="viridis")
    axes[0].set_title("affinities (pre-activations)")
    fig.colorbar(im, ax=axes[0], fraction=0.046)
    for ax, (name, keep) in zip(axes[1:], masks.items()):
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
    """Per-token L0 of choice SAEs against the TopK relative error ({label: per_token_difficulty dict})."""
    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (label, r) in zip(axes[0], results.items()):
        ax.scatter(r["err"].numpy(), r["l0"].numpy(), s=3, alpha=0.25)
        ax.set_xscale("log")
        ax.set_xlabel("TopK relative error ‖e‖ / ‖x‖ (token difficulty)")
        ax.set_ylabel(f"{label}: features per token")
        ax.set_title(f"{label}: Spearman ρ = {r['rho']:.2f}")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, save)


def recovery_heatmaps(rows: list[dict], groups: dict, save: str | None = None):
    """Cosine between true features (rows) and their Hungarian-matched atoms (columns), one panel
    per method (`pursuit.recovery_benchmark` rows; the first seed of each method is drawn)."""
    first = {}
    for r in rows:
        first.setdefault(r["method"], r)
    fig, axes = plt.subplots(1, len(first), figsize=(3.3 * len(first), 3.5), squeeze=False)
    edges = np.cumsum([len(v) for v in groups.values()])[:-1] - 0.5
    for ax, (name, r) in zip(axes[0], first.items()):
        m = r["match"]
        C = m["cos"][:, m["assignment"]]
        im = ax.imshow(C, vmin=-1, vmax=1, cmap="RdBu_r")
        for e in edges:
            ax.axhline(e, color="k", lw=0.6)
            ax.axvline(e, color="k", lw=0.6)
        ax.set_title(f"{name}\nmatched cos {m['mean']:.2f}", fontsize=9)
        ax.set_xlabel("matched atom")
        ax.set_xticks([])
        ax.set_yticks([])
    plural = {"child": "children"}
    axes[0][0].set_ylabel(" | ".join(plural.get(g, g + "s") for g in groups) + " (top → bottom)", fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), fraction=0.02)
    return save_figure(fig, save)


def pursuit_small_multiples(trace: dict, shape=(8, 8), save: str | None = None):
    """Matching pursuit on one input, step by step (`pursuit.pursuit_trace`): the atom picked (with
    its coefficient), the reconstruction so far, and the residual left, for images of `shape`."""
    steps, x0, norms = len(trace["idx"]), trace["x"], trace["norms"]
    fig, axes = plt.subplots(3, steps + 1, figsize=(1.25 * (steps + 1), 4.1))
    panels = [(trace["b_dec"], "start: b_dec", trace["recon"][0])]  # (atom, title, reconstruction so far)
    for t in range(steps):
        panels.append((trace["atoms"][t], f"#{int(trace['idx'][t])} ×{float(trace['vals'][t]):.2f}", trace["recon"][t + 1]))
    for col, (atom, title, rec) in enumerate(panels):
        for row, (img, signed) in enumerate([(atom, True), (rec, False), (x0 - rec, True)]):
            ax = axes[row, col]
            lim = float(img.abs().max()) or 1.0
            ax.imshow(img.reshape(shape).numpy(), cmap="RdBu_r" if signed else "gray_r",
                      vmin=-lim if signed else 0, vmax=lim)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, col].set_title(title, fontsize=7)
        axes[2, col].set_xlabel(f"‖r‖={float(norms[col]):.2f}", fontsize=7)
    for row, name in enumerate(["atom picked", "reconstruction", "residual"]):
        axes[row, 0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    return save_figure(fig, save)


def progressive_grid(recons: dict, x: torch.Tensor, steps: list[int], shape=(8, 8), save: str | None = None):
    """Reconstructions of the same images after more and more inference steps.

    `recons` maps a row label to {steps: reconstructions [n_images, d]}; the originals come first."""
    n_img = x.shape[0]
    fig, axes = plt.subplots(len(recons) * n_img, len(steps) + 1,
                             figsize=(1.0 * (len(steps) + 1), 1.05 * len(recons) * n_img), squeeze=False)
    for i, (label, by_step) in enumerate(recons.items()):
        for j in range(n_img):
            row = axes[i * n_img + j]
            row[0].imshow(x[j].reshape(shape).numpy(), cmap="gray_r", vmin=0, vmax=1)
            for c, s in enumerate(steps):
                row[c + 1].imshow(by_step[s][j].reshape(shape).numpy(), cmap="gray_r", vmin=0, vmax=1)
            row[0].set_ylabel(label if j == 0 else "", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    axes[0][0].set_title("input", fontsize=8)
    for c, s in enumerate(steps):
        axes[0][c + 1].set_title(f"{s} steps", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, save)


def fvu_vs_steps(curves: dict, trained_k=None, save: str | None = None, ax=None):
    """FVU against the number of latents kept at inference ({label: (steps, fvus)}); a dotted line at
    the training k (one value, or {label: k})."""
    fig, ax = (ax.figure, ax) if ax is not None else plt.subplots(figsize=(6.2, 3.6))
    for i, (label, (steps, f)) in enumerate(curves.items()):
        ax.plot(steps, f, "o-" if "MP" in label else "s--", ms=3.5, color=f"C{i}", label=label)
        k = trained_k.get(label) if isinstance(trained_k, dict) else trained_k
        if k is not None:
            ax.axvline(k, color=f"C{i}", ls=":", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("latents per token at inference (MP steps / TopK k′)")
    ax.set_ylabel("FVU (held out)")
    ax.legend(fontsize=7.5)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return save_figure(fig, save)


def coherence_histogram(max_cos: dict, reference: float | None = None, save: str | None = None):
    """Histogram of each atom's largest |cos| with another atom ({label: tensor}); a line at the
    mean for random atoms of the same shape."""
    fig, ax = plt.subplots(figsize=(6.2, 3.3))
    for i, (label, v) in enumerate(max_cos.items()):
        v = torch.as_tensor(v).numpy()
        ax.hist(v, bins=50, range=(0, 1), histtype="step", lw=1.5, density=True, color=f"C{i}",
                label=f"{label} (mean {v.mean():.2f})")
    if reference is not None:
        ax.axvline(reference, color="grey", ls=":", label=f"random atoms ({reference:.2f})")
    ax.set_xlabel("max |cos| with any other atom")
    ax.set_ylabel("density")
    ax.legend(fontsize=7.5)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save_figure(fig, save)


def steering_curves(rows: list[dict], save: str | None = None):
    """Concept, fluency and harmonic-mean scores against the KL target, one line per method
    (rows from `steering.matched_kl_comparison`; mean over concepts, bars = standard error)."""
    import pandas as pd

    df = pd.DataFrame(rows)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), sharex=True)
    for ax, key in zip(axes, ["concept_score", "fluency", "harmonic"]):
        for i, (m, g) in enumerate(df.groupby("method", sort=False)):
            s = g.groupby("target_kl")[key].agg(["mean", "sem"]).fillna(0)
            ax.errorbar(s.index, s["mean"], yerr=s["sem"], marker="o", ms=4, capsize=3, color=f"C{i}", label=m)
        ax.set_xscale("log")
        targets = sorted(df["target_kl"].unique())
        ax.set_xticks(targets, [f"{t:g}" for t in targets])
        ax.minorticks_off()
        ax.set_xlabel("KL(clean ‖ steered) target")
        ax.set_title({"concept_score": "concept", "harmonic": "harmonic mean"}.get(key, key), fontsize=10)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, save)


def variance_concentration(norms: torch.Tensor, conc: dict, labels: list[str] | None = None, save: str | None = None):
    """Left: token norms (log counts). Right: the cumulative share of the variance against the
    fraction of tokens that hold it, largest first (`metrics.variance_concentration`); the text of
    the largest tokens when `labels` (one string per token) is given."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.4))
    a.hist(norms.numpy(), bins=60)
    a.set_yscale("log")
    a.set_xlabel("‖x‖ of a token's activation")
    a.set_ylabel("tokens")
    n = len(conc["curve"])
    frac = torch.arange(1, n + 1) / n
    b.plot(frac.numpy(), conc["curve"].numpy())
    b.plot([1 / n, 1], [1 / n, 1], ls=":", c="grey", label="every token alike")
    b.set_xscale("log")
    b.set_xlabel("fraction of tokens, largest contribution first")
    b.set_ylabel("share of Σ‖x − x̄‖²")
    for q, s in conc["tokens"].items():
        b.annotate(f"{100 * q:g}% → {100 * s:.0f}%", (q, s), textcoords="offset points", xytext=(4, -12), fontsize=8)
    if labels:
        top = [labels[i] for i in conc["order"][:8].tolist()]
        b.set_title("largest: " + ", ".join(repr(t) for t in top), fontsize=8)
    b.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, save)


def beta_sweep(beta_table: pd.DataFrame, reference: pd.DataFrame, k: int, save: str | None = None):
    """ΔCE and FVU against β for each (normalisation, mode) of a g-SAE β sweep (`gradient_eval.beta_sweep`),
    with the reference TopK (β = 0) as a line and its seed spread as a band."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
    for ax, key, title in zip(axes, ("delta_ce", "fvu"), ("ΔCE", "FVU")):
        m = reference[key].mean()
        sd = reference[key].std(ddof=1) if len(reference) > 1 else 0.0
        ax.axhline(m, color="k", lw=1, label="TopK (β = 0)")
        ax.axhspan(m - sd, m + sd, color="k", alpha=0.1)
        for (norm, mode), t in beta_table.groupby(["normalise", "mode"], sort=False):
            ax.plot(t["beta"], t[key], "o-" if mode == "topk" else "s--", label=f"{norm}, {mode} mode")
        ax.set_xlabel("β")
        ax.set_ylabel(title)
        ax.set_title(f"{title} at k = {k}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, save)
