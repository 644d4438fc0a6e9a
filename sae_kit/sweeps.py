"""Train-and-evaluate sweeps over dictionary variants, and fair comparisons between them.

A `Variant` knows how to build its SAE for a given k and seed; `run_sweep` trains every variant at
every k (plus extra seeds at one k, for error bars) and evaluates each in each of its inference
modes (`each_mode`). The result is a `Sweep`: one tidy table with a row per (label, k, seed, mode)
and a column per metric, plus the trained SAEs. `matched_l0_gap` compares a variant with a
reference frontier at the variant's own L0, and `seed_spread` gives the seed-to-seed noise a claim
must beat. A row's ``default`` column marks the dictionary's default mode (``sae.modes[0]``), which
is what a comparison uses unless it names a mode.

Given an ``eval_key`` (`digest` of everything the evaluation reads besides the SAE), `run_sweep`
also keeps each SAE's evaluation rows in the kit's cache, keyed by that digest, the SAE's class,
config and weights, and the kit's own code: a notebook run again on a warm cache reads them
back instead of evaluating every dictionary again, and any change to the data, the dictionary or
the kit's code evaluates afresh.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from .train import config_without_stamps, train_cached, weights_digest


@dataclass
class Variant:
    """A label, a builder ``build(k, seed) -> SAE``, and how to train it."""

    label: str
    build: Callable
    train_kw: dict = field(default_factory=dict)  # e.g. {"grads": True} for g-SAE, {"batch_size": 5120}
    seeds: tuple | None = None  # its own seeds (e.g. one for an ablation); None: the sweep's


@dataclass
class Sweep:
    """What `run_sweep` returns: ``table`` (a row per label, k, seed and mode) and the trained SAEs
    and training histories, keyed by (label, k, seed)."""

    table: pd.DataFrame
    saes: dict = field(default_factory=dict)
    histories: dict = field(default_factory=dict)

    def sae(self, label: str, k: int, seed: int = 0):
        return self.saes[label, k, seed]

    def rows(self, label: str, mode: str | None = None, **where) -> pd.DataFrame:
        """`pick` on this sweep's table."""
        return pick(self.table, label, mode, **where)


def each_mode(sae, evaluate: Callable[[str], dict]) -> list[dict]:
    """``evaluate(mode)`` with `sae` switched into each of its inference modes in turn; one row per
    mode, with ``mode`` and ``default`` (the dictionary's default mode) filled in."""
    rows = []
    for mode in sae.modes:
        with sae.using(mode):
            rows.append({"mode": mode, "default": mode == sae.modes[0], **evaluate(mode)})
    return rows


def digest(*parts) -> str:
    """A short hash of what an evaluation reads: tensors and arrays (dtype, shape and bytes), numbers
    (floats to 12 significant digits), strings, None, and dicts / lists / tuples of them; an object
    with a ``digest()`` method (a `Splicer`) gives its own. Anything else is refused rather than
    hashed by its (unstable) repr."""
    h = hashlib.sha256()

    def feed(o):
        if isinstance(o, torch.Tensor):
            o = o.detach().cpu().contiguous().numpy()
        if isinstance(o, np.ndarray):
            h.update(f"array {o.dtype} {o.shape}".encode())
            h.update(np.ascontiguousarray(o).tobytes())
        elif isinstance(o, (float, np.floating)):
            # 12 significant digits: a refit that moves only the last bits (threaded least squares,
            # e.g. the Zipf fit) keys alike; a value that differs in earnest does not
            h.update(f"float {float(o):.12g};".encode())
        elif o is None or isinstance(o, (bool, int, str, np.integer)):
            h.update(f"{type(o).__name__} {o!r};".encode())
        elif isinstance(o, dict):
            h.update(b"{")
            for key in sorted(o, key=str):
                feed(str(key))
                feed(o[key])
            h.update(b"}")
        elif isinstance(o, (list, tuple)):
            h.update(b"[")
            for item in o:
                feed(item)
            h.update(b"]")
        elif callable(getattr(o, "digest", None)):
            h.update(f"{type(o).__name__} {o.digest()};".encode())
        else:
            raise TypeError(f"digest: cannot hash a {type(o).__name__}; give tensors, numbers, strings or "
                            f"containers of them")

    for p in parts:
        feed(p)
    return h.hexdigest()[:20]


@functools.lru_cache(maxsize=1)
def kit_code_digest() -> str:
    """A hash of the kit's own code: cached evaluations are keyed by it, so a change to any metric
    (or anything else in the kit) never serves numbers the current code would not give.

    It hashes each module's syntax tree without its docstrings (`code_fingerprint`), so an edit to
    a comment, a docstring or a line break does not throw away every cached evaluation (in notebook
    01 at `lab`, half an hour of work), while any change to what the code does still does."""
    return code_digest(Path(__file__).resolve().parent)


def code_digest(root: Path) -> str:
    """A hash of every ``*.py`` file under `root`: its path and its `code_fingerprint`."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(code_fingerprint(path.read_text(encoding="utf-8")).encode())
    return h.hexdigest()[:20]


def code_fingerprint(source: str) -> str:
    """The Python code in `source` as text that ignores comments, docstrings and layout: its syntax
    tree (`ast.dump`, no line numbers) with each module's, class's and function's docstring removed.
    Every other string constant, name and operator counts."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, include_attributes=False)


def _json_rows(rows) -> str | None:
    """`rows` as JSON if they survive the round trip unchanged (plain numbers, strings, booleans)."""
    try:
        text = json.dumps(rows)
    except (TypeError, ValueError):
        return None
    back = json.loads(text)
    same = lambda a, b: a == b or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    if len(back) != len(rows) or any(set(a) != set(b) or any(not same(a[c], b[c]) or type(a[c]) is not type(b[c])
                                                             for c in a) for a, b in zip(rows, back)):
        return None
    return text


def cached_evaluation(sae, evaluate: Callable[[], list], eval_key: str | None, name: str) -> list:
    """``evaluate()``, or its rows from the kit's cache when the same SAE (class, config, weights and
    buffers) was evaluated on the same data (`eval_key`) by the same kit code and torch version.
    `eval_key` None: no caching."""
    if eval_key is None:
        return evaluate()
    from .config import cache_dir
    from .fsutil import atomic_write_text

    key = digest(eval_key, kit_code_digest(), torch.__version__, type(sae).__name__,
                 json.dumps(config_without_stamps(sae), sort_keys=True, default=str), weights_digest(sae))
    path = cache_dir() / "evals" / f"{''.join(c if c.isalnum() else '-' for c in name)}-{key}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            path.unlink(missing_ok=True)  # a damaged entry of the kit's own cache: evaluate again
    rows = evaluate()
    text = _json_rows(rows)
    if text is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)
    return rows


def run_sweep(variants: list[Variant], store, ks, evaluate: Callable, batch_size: int, epochs: int,
              seeds=(0,), extra_seed_k: "int | str | None" = None, eval_key: str | None = None) -> Sweep:
    """Train (or reload from the cache: `train_cached`) and evaluate every variant at every k (first
    seed), and at `extra_seed_k` every seed (``"all"``: every seed at every k).

    Args:
        variants: what to train.
        store: the `ActivationStore` to train on.
        ks: the k values.
        evaluate: ``evaluate(sae, k) -> list of rows`` (one per inference mode, e.g. from `each_mode`;
            each with ``mode``, ``default`` and the metrics, which must include ``l0``).
        batch_size, epochs: training settings shared by all (a variant's ``train_kw`` may override them).
        seeds: seeds (a variant's own ``seeds`` replace them); all are used only at `extra_seed_k`.
        eval_key: `digest` of everything `evaluate` reads besides the SAE and k (eval tokens, reference
            densities, the `Splicer`...): each SAE's rows are then cached (`cached_evaluation`). None:
            evaluate every time.

    Returns:
        A `Sweep`.
    """
    out, records = Sweep(pd.DataFrame()), []
    for v in variants:
        for k in ks:
            own = seeds if v.seeds is None else v.seeds
            for seed in (own if extra_seed_k == "all" or k == extra_seed_k else own[:1]):
                kw = {"batch_size": batch_size, "epochs": epochs, **v.train_kw}
                sae, hist = train_cached(v.build(k, seed), store, seed=seed, desc=f"{v.label} k={k} seed={seed}", **kw)
                out.saes[v.label, k, seed], out.histories[v.label, k, seed] = sae, hist
                rows = cached_evaluation(sae, lambda: evaluate(sae, k), None if eval_key is None else
                                         digest(eval_key, k), f"{v.label}-k{k}-seed{seed}")
                records += [{"label": v.label, "k": k, "seed": seed, **row} for row in rows]
    out.table = pd.DataFrame(records)
    return out


def pick(table: pd.DataFrame, label: str, mode: str | None = None, **where) -> pd.DataFrame:
    """Rows of one variant in one mode (None: its default mode), filtered further by ``column=value``."""
    t = table[table["label"] == label]
    t = t[t["default"]] if mode is None else t[t["mode"] == mode]
    for col, value in where.items():
        t = t[t[col] == value]
    if t.empty:
        raise ValueError(f"no rows for {label!r} in mode {mode or 'default'!r} with {where}")
    return t


def _frontier(table: pd.DataFrame, label: str, key: str, mode: str | None) -> pd.DataFrame:
    """One row per k: the metric and L0 averaged over the seeds run at that k."""
    return pick(table, label, mode).groupby("k", sort=True)[["l0", key]].mean().reset_index()


def matched_l0_gap(table: pd.DataFrame, label: str, reference: str, key: str = "fvu", mode: str | None = None,
                   ref_mode: str | None = None) -> list[float]:
    """log(metric of `label` / metric of `reference` interpolated at the variant's L0), per k.

    Each k's point is the mean over the seeds run at that k (for both). The reference frontier is
    interpolated (extrapolated at the ends) linearly in log-log space; negative means the variant is
    lower. `mode` / `ref_mode`: the inference modes compared (None: each dictionary's default).
    """
    ref = _frontier(table, reference, key, ref_mode).sort_values("l0", kind="stable")
    if len(ref) < 2:
        raise ValueError(f"need the reference {reference!r} at two or more k to interpolate")
    lx, ly = np.log(ref["l0"].to_numpy()), np.log(ref[key].to_numpy())
    gaps = []
    for _, r in _frontier(table, label, key, mode).iterrows():
        l = np.log(max(r["l0"], 1e-9))
        if lx[0] <= l <= lx[-1]:
            y = np.interp(l, lx, ly)
        else:
            i = 0 if l < lx[0] else len(lx) - 2
            y = ly[i] + (ly[i + 1] - ly[i]) * (l - lx[i]) / (lx[i + 1] - lx[i])
        gaps.append(float(np.log(r[key]) - y))
    return gaps


def extrapolated(table: pd.DataFrame, label: str, reference: str, mode: str | None = None,
                 ref_mode: str | None = None, tol: float = 0.01) -> dict[int, float]:
    """The k whose `label` point lies outside the reference's L0 range by more than `tol` (relative),
    so `matched_l0_gap` extrapolates the reference there: {k: the point's L0 / the nearest end of
    the range} (below 1: under the smallest reference L0; above 1: over the largest). A point a hair
    outside (MP's distinct L0 7.99 against TopK's 8) is not flagged: the end segment is exact there."""
    ref = pick(table, reference, ref_mode).groupby("k")["l0"].mean()
    lo, hi = float(ref.min()), float(ref.max())
    out = {}
    for k, l0 in pick(table, label, mode).groupby("k", sort=True)["l0"].mean().items():
        if l0 < lo * (1 - tol):
            out[int(k)] = float(l0) / lo
        elif l0 > hi * (1 + tol):
            out[int(k)] = float(l0) / hi
    return out


def extrapolated_text(outside: dict[int, float], reference: str) -> str:
    """One clause for a verdict's reason: which points were judged against an extrapolated frontier."""
    if not outside:
        return ""
    pts = ", ".join(f"k={k} (L0 {f:.2f}× {reference}'s {'lowest' if f < 1 else 'highest'})" for k, f in outside.items())
    return (f"; {len(outside)} point(s) lie outside {reference}'s L0 range, so its frontier is extrapolated "
            f"there: {pts}")


def seed_spread(table: pd.DataFrame, label: str, k: int, key: str = "fvu", mode: str | None = None) -> tuple[float, float, int]:
    """(mean, sample standard deviation, count) of a metric over seeds at one k (sd is nan for one seed)."""
    vals = pick(table, label, mode, k=k)[key].to_numpy()
    return float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else float("nan"), len(vals)


def seed_noise(table: pd.DataFrame, labels, key: str = "fvu", modes=None) -> float:
    """The seed noise a gap between `labels` must beat: 2 × the largest relative seed sd of any of
    them at any k run with two or more seeds (nan when none was). With n seeds per point, the sd of
    a mean is smaller by √n; the rule keeps the single-seed sd, which is conservative."""
    modes = modes or [None] * len(labels)
    rel = []
    for label, mode in zip(labels, modes):
        for k in pick(table, label, mode)["k"].unique():
            mean, sd, n = seed_spread(table, label, k, key, mode)
            if n > 1:
                rel.append(2 * sd / abs(mean))
    return float(max(rel)) if rel else float("nan")


def decided_gap(table: pd.DataFrame, label: str, reference: str, key: str = "fvu", mode: str | None = None,
                ref_mode: str | None = None, better: str = "lower"):
    """Is `label` better than `reference` on `key` at matched L0 at every k, beyond seed noise?

    Returns:
        (log gaps per k, `Verdict`, noise), noise from `seed_noise`; the verdict is not decided when
        any gap is within the noise, or when there was only one seed. The reason names any point
        judged against an extrapolated frontier (`extrapolated`).
    """
    from .claims import Verdict, beats_noise

    gaps = matched_l0_gap(table, label, reference, key, mode, ref_mode)
    noise = seed_noise(table, [label, reference], key, [mode, ref_mode])
    v = beats_noise(gaps, noise, better, what=f"{label} / {reference} {key} at matched L0")
    outside = extrapolated(table, label, reference, mode, ref_mode)
    return gaps, Verdict(v.held, v.reason + extrapolated_text(outside, reference)), noise


def second_opinion(table: pd.DataFrame, label: str, reference: str, key: str, verdict, mode: str | None = None,
                   ref_mode: str | None = None):
    """The same matched-L0 rule (`decided_gap`) on a second metric, beside a verdict on the first:
    (log gaps, noise, its `Verdict`, "the same verdict" or "verdict '<its word>'")."""
    from .claims import agreement

    gaps, other, noise = decided_gap(table, label, reference, key, mode, ref_mode)
    return gaps, noise, other, agreement(verdict, other)
