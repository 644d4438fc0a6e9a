"""Train-and-evaluate sweeps over dictionary variants, and fair comparisons between them.

A `Variant` knows how to build its SAE for a given k and seed; `run_sweep` trains every variant at
every k (plus extra seeds at one k, for error bars) and evaluates each with a function you pass.
`matched_l0_gap` compares a variant with a reference frontier at the variant's own L0, and
`seed_spread` gives the seed-to-seed noise a claim must beat.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .train import train


@dataclass
class Variant:
    """A label, a builder ``build(k, seed) -> SAE``, and how to train it."""

    label: str
    build: Callable
    train_kw: dict = field(default_factory=dict)  # e.g. {"grads": True} for g-SAE


def run_sweep(variants: list[Variant], store, ks, evaluate: Callable, batch_size: int, epochs: int,
              seeds=(0,), extra_seed_k: int | None = None) -> list[dict]:
    """Train and evaluate every variant at every k (first seed), and at `extra_seed_k` every seed.

    Args:
        variants: what to train.
        store: the `ActivationStore` to train on.
        ks: the k values.
        evaluate: ``evaluate(sae, k) -> dict`` of metrics (must include ``l0``).
        batch_size, epochs: training settings shared by all.
        seeds: seeds; all of them are used only at `extra_seed_k`.

    Returns:
        One dict per trained SAE: label, k, seed, sae, history and the metrics.
    """
    rows = []
    for v in variants:
        for k in ks:
            for seed in (seeds if k == extra_seed_k else seeds[:1]):
                sae = v.build(k, seed)
                hist = train(sae, store, batch_size=batch_size, epochs=epochs, seed=seed,
                             desc=f"{v.label} k={k} seed={seed}", **v.train_kw)
                rows.append({"label": v.label, "k": k, "seed": seed, "sae": sae, "history": hist,
                             **evaluate(sae, k)})
    return rows


def matched_l0_gap(rows: list[dict], label: str, reference: str, key: str = "fvu") -> list[float]:
    """log(metric of `label` / metric of `reference` interpolated at the variant's L0), seed 0, per k.

    The reference frontier is interpolated (extrapolated at the ends) linearly in log-log space;
    negative means the variant is better.
    """
    ref = sorted((r for r in rows if r["label"] == reference and r["seed"] == 0), key=lambda r: r["l0"])
    if len(ref) < 2:
        raise ValueError(f"need the reference {reference!r} at two or more k to interpolate")
    lx = np.log([r["l0"] for r in ref])
    ly = np.log([r[key] for r in ref])
    gaps = []
    for r in sorted((r for r in rows if r["label"] == label and r["seed"] == 0), key=lambda r: r["k"]):
        l = np.log(max(r["l0"], 1e-9))
        if lx[0] <= l <= lx[-1]:
            y = np.interp(l, lx, ly)
        else:
            i = 0 if l < lx[0] else len(lx) - 2
            y = ly[i] + (ly[i + 1] - ly[i]) * (l - lx[i]) / (lx[i + 1] - lx[i])
        gaps.append(float(np.log(r[key]) - y))
    return gaps


def seed_spread(rows: list[dict], label: str, k: int, key: str = "fvu") -> tuple[float, float, int]:
    """(mean, sample standard deviation, count) of a metric over seeds at one k (sd is nan for one seed)."""
    vals = [r[key] for r in rows if r["label"] == label and r["k"] == k]
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan"), len(vals)


def decided_gap(rows: list[dict], label: str, reference: str, k: int, key: str = "fvu") -> tuple[list[float], bool | None, float]:
    """Is `label` better than `reference` on `key` at matched L0 at every k, beyond seed noise?

    Returns:
        (log gaps per k, verdict, noise) where noise = 2 × the larger relative seed sd of the two
        at `k`; the verdict is None when any gap is within the noise or the gaps disagree in sign.
    """
    gaps = matched_l0_gap(rows, label, reference, key)
    noises = []
    for lab in (label, reference):
        mean, sd, n = seed_spread(rows, lab, k, key)
        noises.append(2 * sd / abs(mean) if n > 1 else float("nan"))
    noise = float("nan") if any(np.isnan(noises)) else max(noises)
    if not np.isfinite(noise):
        return gaps, None, noise
    if all(g < -noise for g in gaps):
        return gaps, True, noise
    if all(g > noise for g in gaps):
        return gaps, False, noise
    return gaps, None, noise
