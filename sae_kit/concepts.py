"""Concepts for notebook 04 (Shafran et al. 2025): the kit's concept sentences, the MLP activations
they produce, and how to read a factorisation against them (purity, DiffMean, logit lens, tables).

The factorisation itself is `snmf` (pure tensors); this module runs the model and labels tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import Scale, bars_off, scale_name

DATA = Path(__file__).resolve().parent.parent / "data"


@dataclass(frozen=True)
class Sizes:
    """Notebook 04's sizes at one scale (`sizes`)."""

    snmf_ranks: tuple[int, ...]  # SNMF ranks for the error-vs-rank curve; the middle one is studied
    snmf_iters: int  # iteration cap of the studied fit, the layer scan and the hierarchy; the authors' rule
    #                  usually stops them first (rank 25: ~2,000 iterations; rank 50: ~5,700)
    grid_iters: int  # iteration cap of the error-vs-rank grid (its fits may stop at the cap: the table says so)
    scan_rank: int  # rank of the layer scan's fits (one rank at every scale, so scans compare across scales)
    scan_every: int  # scan every `scan_every`-th layer
    steer_concepts: int  # concepts steered
    steer_kl: tuple[float, ...]  # KL targets for matched-KL steering
    steer_samples: int  # continuations generated per steering setting
    steer_tokens: int  # tokens per continuation
    snmf_patience: int = 1500  # the authors' patience (their CLI and GPT-2 scripts)


_SIZES = {
    "ci": Sizes(snmf_ranks=(10, 25, 50), snmf_iters=3000, grid_iters=400, scan_rank=25, scan_every=6,
                steer_concepts=2, steer_kl=(0.5,), steer_samples=2, steer_tokens=12),
    "lab": Sizes(snmf_ranks=(10, 25, 50, 100), snmf_iters=8000, grid_iters=2000, scan_rank=25, scan_every=3,
                 steer_concepts=8, steer_kl=(0.1, 0.25, 0.5), steer_samples=4, steer_tokens=20),
    "paper": Sizes(snmf_ranks=(10, 25, 50, 100, 200), snmf_iters=30_000, grid_iters=10_000, scan_rank=25, scan_every=3,
                   steer_concepts=20, steer_kl=(0.025, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5), steer_samples=8, steer_tokens=50),
}


def sizes(scale: Scale | str | None = None) -> Sizes:
    """Notebook 04's sizes at `scale` (a `Scale`, its name, or None for ``SAE_KIT_SCALE``)."""
    return _SIZES[scale_name(scale)]


# ---- the concept dataset ------------------------------------------------------------------------
@dataclass
class ConceptSet:
    """Sentences with concept labels (``data/concepts.json``, written for the kit)."""

    names: list[str]  # concept names; label i refers to names[i]
    words: dict[str, list[str]]  # words that name each concept (for steering scores)
    sentences: list[str]
    labels: list[int]  # per sentence: concept index, or -1 for neutral

    @classmethod
    def load(cls, path: str | Path | None = None) -> "ConceptSet":
        path = Path(path) if path else DATA / "concepts.json"
        if not path.exists():
            raise FileNotFoundError(f"no concept file at {path}; pass the path of a JSON file with "
                                    f"'concepts' ({{name: {{words, sentences}}}}) and 'neutral' sentences")
        raw = json.loads(path.read_text())
        names = list(raw["concepts"])
        sentences, labels = [], []
        for i, name in enumerate(names):
            sentences += raw["concepts"][name]["sentences"]
            labels += [i] * len(raw["concepts"][name]["sentences"])
        sentences += raw.get("neutral", [])
        labels += [-1] * len(raw.get("neutral", []))
        return cls(names, {n: raw["concepts"][n].get("words", []) for n in names}, sentences, labels)

    def label_name(self, label: int) -> str:
        return "neutral" if label < 0 else self.names[label]


@dataclass
class ConceptActivations:
    """MLP activations of every token of a `ConceptSet` (position 0 of each sentence skipped)."""

    acts: torch.Tensor  # [n_tokens, d_mlp]
    labels: torch.Tensor  # [n_tokens] concept index of the token's sentence, -1 neutral
    sentence: torch.Tensor  # [n_tokens] sentence index
    position: torch.Tensor  # [n_tokens] position in the sentence
    tokens: list[list[int]]  # token ids of each sentence
    hook: str

    @property
    def A(self) -> torch.Tensor:
        """Neurons × tokens, the orientation `fit_snmf` takes."""
        return self.acts.t()


@torch.no_grad()
def concept_activations(model, concepts: ConceptSet, layer, site: str = "mlp.hook_post", progress: bool = True):
    """Run every sentence through the model and collect ``blocks.{layer}.{site}`` at each token but
    the first (the attention sink, as in the kit's stores).

    `layer` may be an int (returns one `ConceptActivations`) or a list (returns {layer: ...}, one pass)."""
    layers = [layer] if isinstance(layer, int) else list(layer)
    for L in layers:
        if not 0 <= L < model.cfg.n_layers:
            raise ValueError(f"layer must be in [0, {model.cfg.n_layers}), got {L}")
    hooks = {L: f"blocks.{L}.{site}" for L in layers}
    acts = {L: [] for L in layers}
    labels, sent, pos, toks = [], [], [], []
    pairs = list(zip(concepts.sentences, concepts.labels))
    for i, (s, lab) in enumerate(tqdm(pairs, desc=f"activations {site}", disable=bars_off(progress))):
        t = model.to_tokens(s, prepend_bos=False)
        _, cache = model.run_with_cache(t, names_filter=list(hooks.values()), stop_at_layer=max(layers) + 1)
        for L, h in hooks.items():
            acts[L].append(cache[h][0, 1:].float().cpu())
        n = t.shape[1] - 1
        labels += [lab] * n
        sent += [i] * n
        pos += list(range(1, n + 1))
        toks.append(t[0].tolist())
    out = {L: ConceptActivations(torch.cat(acts[L]), torch.tensor(labels), torch.tensor(sent), torch.tensor(pos),
                                 toks, hooks[L]) for L in layers}
    return out[layer] if isinstance(layer, int) else out


# ---- reading the features -------------------------------------------------------------------------
def top_tokens(codes: torch.Tensor, feature: int, n: int = 20) -> torch.Tensor:
    """Indices of the `n` tokens with the largest code for `feature` (codes [n_tokens, K])."""
    return codes[:, feature].topk(min(n, len(codes))).indices


def concept_shares(codes: torch.Tensor, labels: torch.Tensor, n_concepts: int, n: int = 20) -> torch.Tensor:
    """[K, n_concepts]: for each feature, the share of its top `n` tokens that carry each concept label
    (neutral tokens count in the denominator, for no concept). Features that never fire get 0."""
    top = codes.topk(min(n, len(codes)), dim=0).indices  # [n, K]
    lab = labels[top]
    shares = torch.stack([(lab == c).float().mean(0) for c in range(n_concepts)], 1)
    return shares * (codes.max(0).values > 0)[:, None]


def purity(codes: torch.Tensor, labels: torch.Tensor, n: int = 20) -> dict:
    """Label purity of each feature's top `n` tokens: the share carrying its most common concept.

    Returns {"label": [K] majority concept (-1 if it never fires), "purity": [K], "mean": float}."""
    n_concepts = int(labels.max()) + 1
    shares = concept_shares(codes, labels, n_concepts, n)
    pur, lab = shares.max(1)
    lab = torch.where(pur > 0, lab, torch.full_like(lab, -1))
    return {"label": lab, "purity": pur, "mean": float(pur.mean())}


def best_for_concept(codes: torch.Tensor, labels: torch.Tensor, concept: int, n: int = 20) -> tuple[int, float]:
    """The feature whose top `n` tokens hold the largest share of `concept` (ties: the stronger
    activation), and that share."""
    n_concepts = int(labels.max()) + 1
    share = concept_shares(codes, labels, n_concepts, n)[:, concept]
    best = share.max()
    ties = (share == best).nonzero()[:, 0]
    j = int(ties[codes[:, ties].max(0).values.argmax()])
    return j, float(best)


def shuffled_purity(codes: torch.Tensor, labels: torch.Tensor, n: int = 20, repeats: int = 200, seed: int = 0,
                    sentence: torch.Tensor | None = None) -> torch.Tensor:
    """Mean purity when the labels are shuffled (the chance level), one value per repeat.

    With `sentence` (each token's sentence index) whole sentences swap labels, so a feature that
    fires on the tokens of one or two sentences keeps that clustering under the null: the fair
    chance level, because every token of a sentence shares its label. Without it single tokens
    swap labels, which breaks that clustering and makes chance look lower than it is."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    if sentence is not None:
        n_sent = int(sentence.max()) + 1
        per_sentence = torch.full((n_sent,), -1, dtype=labels.dtype)
        per_sentence[sentence] = labels
    for _ in range(repeats):
        if sentence is None:
            shuffled = labels[torch.randperm(len(labels), generator=gen)]
        else:
            shuffled = per_sentence[torch.randperm(n_sent, generator=gen)][sentence]
        out.append(purity(codes, shuffled, n)["mean"])
    return torch.tensor(out)


def context_string(model, acts: ConceptActivations, token: int, window: int = 8) -> str:
    """The token at flat index `token` with up to `window` tokens of left context, marked [[like this]]."""
    s, p = int(acts.sentence[token]), int(acts.position[token])
    ids = acts.tokens[s]
    left = model.tokenizer.decode(ids[max(0, p - window):p])
    right = model.tokenizer.decode(ids[p + 1:p + 1 + window // 2])
    return f"{left}[[{model.tokenizer.decode([ids[p]])}]]{right}".replace("\n", " ")


def feature_table(model, acts: ConceptActivations, codes: torch.Tensor, features: list[int],
                  concepts: ConceptSet, n: int = 4, n_purity: int = 20):
    """A pandas table: each feature's majority concept, purity and its top contexts."""
    import pandas as pd

    pur = purity(codes, acts.labels, n_purity)
    rows = []
    for j in features:
        rows.append({"feature": j, "concept": concepts.label_name(int(pur["label"][j])),
                     "purity": round(float(pur["purity"][j]), 2),
                     "top contexts": " · ".join(context_string(model, acts, int(t)) for t in top_tokens(codes, j, n))})
    return pd.DataFrame(rows)


@torch.no_grad()
def logit_lens(model, layer: int, direction: torch.Tensor, k: int = 8) -> list[str]:
    """Top tokens promoted by a neuron-space direction: unembed(ln_final(W_out · direction))."""
    W_out = model.blocks[layer].mlp.W_out.detach().float().cpu()
    resid = direction.float().cpu() @ W_out
    logits = model.unembed(model.ln_final(resid.to(model.cfg.device, model.cfg.dtype)[None, None]))[0, 0].float()
    return [model.tokenizer.decode([int(i)]) for i in logits.topk(k).indices]


def diff_means(acts: torch.Tensor, labels: torch.Tensor, n_concepts: int) -> torch.Tensor:
    """Difference-in-means directions [n_concepts, d]: mean over the concept's tokens minus the mean
    over every other token, unit-normed (the DiffMean baseline)."""
    out = []
    for c in range(n_concepts):
        m = labels == c
        if m.sum() == 0:
            raise ValueError(f"concept {c} has no tokens")
        v = acts[m].mean(0) - acts[~m].mean(0)
        out.append(v / v.norm().clamp_min(1e-12))
    return torch.stack(out)


# ---- the claims table -----------------------------------------------------------------------------
MIN_UNITS = 5  # a bootstrap interval over fewer concepts (or parents) than this is no evidence: not decided

SOURCE = "Shafran et al. 2025, abstract"


def convergence_text(fit) -> str:
    """How an `snmf.SNMFResult` stopped, in words (the caveat every SNMF verdict carries)."""
    head = f"{fit.n_iter} iterations, best at {fit.best_iter + 1}"
    if fit.converged:
        return f"{head}, stopped by the authors' rule (no new best for {fit.patience} iterations)"
    return (f"{head}, stopped at the iteration cap before the authors' rule fired: NOT converged "
            f"(best error still fell {fit.final_rel_change:.2%} over the last "
            f"{min(fit.patience or fit.n_iter, fit.n_iter // 2)} iterations)")


def convergence_table(fits: dict):
    """A pandas table, one row per fit ({name: `snmf.SNMFResult`}): rank, iterations run, the best
    iteration, what stopped it, the best relative error and its relative change over the last
    patience (or half the run) — 0 on a plateau."""
    import pandas as pd

    return pd.DataFrame([{"fit": name, "rank": f.rank, "iterations": f.n_iter, "best at": f.best_iter + 1,
                          "stopped by": "authors' rule" if f.converged else "iteration cap",
                          "rel_error": round(f.rel_error, 4), "final rel. change": f"{f.final_rel_change:.1e}"}
                         for name, f in fits.items()])


def _paired(diffs, unit: str, what: str, min_units: int):
    """(mean, lo, hi, Verdict) for paired differences: held if the 95% bootstrap interval of their
    mean lies above 0, did not hold if below 0; not decided with fewer than `min_units`."""
    import numpy as np

    from .claims import Verdict, bootstrap_ci, interval

    diffs = [float(d) for d in diffs if np.isfinite(float(d))]  # a concept missing a method drops out
    m, lo, hi = bootstrap_ci(diffs)
    if len(diffs) < min_units:
        return m, lo, hi, Verdict(None, f"only {len(diffs)} {unit}: an interval over fewer than {min_units} "
                                        f"{unit} is no evidence")
    return m, lo, hi, interval(lo, hi, 0.0, what=f"the 95% interval of the mean {what} over {len(diffs)} {unit}")


def claims(purity_mean: float, chance, shares, steer, tree, fit=None, layer: int | None = None,
           n_concepts: int = 20, scale: str | None = None, min_units: int = MIN_UNITS):
    """Notebook 04's claims table from its results.

    Args:
        purity_mean: mean label purity of the SNMF features (`purity(...)["mean"]`).
        chance: mean purities under sentence-level label shuffles (`shuffled_purity(..., sentence=)`).
        shares: one row per concept with columns ``SNMF share`` and ``SAE share`` (`best_for_concept`).
        steer: rows of `steering.matched_kl_comparison` (columns concept, method, harmonic).
        tree: one row per parent with ``Jaccard siblings`` and ``Jaccard child–outsider``.
        fit: the studied `snmf.SNMFResult`; its convergence goes into every SNMF row's reason.
        layer: the layer studied (picked by the layer scan's purity).
        n_concepts: concepts in the data set.

    Returns:
        `Claims` for ``04_snmf``; each row has its rule, this run's reason, the paper's source and
        the notebook's figure.
    """
    import numpy as np

    from .claims import Claims, threshold

    out = Claims("04_snmf", scale)
    conv = f"SNMF fit: {convergence_text(fit)}" if fit is not None else ""
    join = lambda *parts: "; ".join(p for p in parts if p)

    chance = np.asarray(chance, dtype=float)
    top, q95 = float(chance.max()), float(np.quantile(chance, 0.95))
    shares_snmf = np.asarray(shares["SNMF share"], dtype=float)
    n_cov = int((shares_snmf >= 0.5).sum())
    v = threshold(purity_mean, top, q95, what="mean purity")
    out.add("SNMF features align with the concepts", "SNMF features align with human-interpretable concepts",
            f"mean purity {purity_mean:.2f} vs sentence-shuffled labels {chance.mean():.2f} (95th percentile {q95:.2f}, "
            f"max {top:.2f} of {len(chance)}); {n_cov}/{n_concepts} concepts have a feature with ≥ 50% of its top tokens",
            v.held, note=join(v.reason, f"layer {layer} was chosen with this purity (among the scan's purest, and early)" if layer is not None else "", conv),
            rule="held: the features' mean purity (share of each feature's 20 top tokens from sentences of its majority "
                 "concept; neutral sentences count against it) is above every one of the label shuffles, which swap "
                 "whole sentences' labels; did not hold: below the shuffles' 95th percentile; else not decided. "
                 "One SNMF seed; the layer was picked by this same purity",
            source=SOURCE, figure="04_purity (and 04_layer_scan)")

    m, lo, hi, v = _paired(shares_snmf - np.asarray(shares["SAE share"], dtype=float), "concepts",
                           "SNMF − SAE share", min_units)
    out.add("SNMF features are more concept-pure than SAE latents",
            "the kit's input-side comparison (the paper compares with SAEs on steering and concept detection)",
            f"best share per concept: SNMF {shares_snmf.mean():.2f}, SAE {np.mean(shares['SAE share']):.2f}; "
            f"difference {m:+.2f} [{lo:+.2f}, {hi:+.2f}]",
            v.held, note=join(v.reason, conv),
            rule="per concept, the best SNMF feature's share of the concept among its 20 top tokens minus the best SAE "
                 "latent's; held if the 95% bootstrap interval of the mean difference (over concepts) lies above 0, did "
                 "not hold if below 0, else not decided. Confounded both ways: SNMF is fitted to these very tokens, the "
                 "SAE was trained on the kit's general corpus and picks its best of d_sae latents against SNMF's K "
                 "features; one seed each",
            source=SOURCE, figure="table of best features per concept")

    per = steer.groupby(["concept", "method"])["harmonic"].mean().unstack() if len(steer) else None
    kl = sorted(set(steer["target_kl"])) if len(steer) and "target_kl" in steer else []
    base_rule = ("per steered concept, the harmonic score (offline concept and fluency proxies, mean over the KL "
                 "targets) of SNMF minus {b}; held if the 95% bootstrap interval of the mean difference (over "
                 "concepts) lies above 0, did not hold if below 0, else not decided; fewer than {n} concepts: not "
                 "decided. Concepts where SNMF has a feature with ≥ 50% of its top tokens are steered first (topped up "
                 "with the next-best concepts when fewer qualify), so this leans towards concepts SNMF has found; "
                 "one seed")
    for b, claim, extra in (
            ("DiffMean", "SNMF steers better than difference-in-means at matched KL", ""),
            ("SAE", "SNMF steers better than SAE latents at matched KL",
             "; the SAE was trained on the kit's general corpus, not on concept text")):
        if per is None or b not in per or "SNMF" not in per:
            out.add(claim, f"SNMF outperforms {b} on causal steering", "not run", None, rule=base_rule.format(b=b, n=min_units),
                    source=SOURCE, figure="04_steering")
            continue
        m, lo, hi, v = _paired(per["SNMF"] - per[b], "concepts", f"SNMF − {b} score", min_units)
        out.add(claim, f"SNMF outperforms {'difference-in-means (supervised)' if b == 'DiffMean' else 'SAEs'} on causal steering",
                f"harmonic score SNMF {per['SNMF'].mean():.3f}, {b} {per[b].mean():.3f}; difference {m:+.3f} "
                f"[{lo:+.3f}, {hi:+.3f}] over {len(per)} concepts × KL {kl}",
                v.held, note=join(v.reason, conv), rule=base_rule.format(b=b, n=min_units) + extra,
                source=SOURCE, figure="04_steering")

    jd = np.asarray(tree["Jaccard siblings"], dtype=float) - np.asarray(tree["Jaccard child–outsider"], dtype=float) \
        if len(tree) else np.zeros(0)
    m, lo, hi, v = _paired(jd, "parents", "sibling − outsider Jaccard", min_units)
    sib = f"{np.mean(tree['Jaccard siblings']):.3f}" if len(tree) else "n/a"
    oth = f"{np.mean(tree['Jaccard child–outsider']):.3f}" if len(tree) else "n/a"
    out.add("features grouped under one parent share neurons",
            "specific neuron combinations are reused across semantically-related features (hierarchy)",
            f"mean Jaccard between siblings {sib} vs child–outsider {oth}; difference {m:+.3f} [{lo:+.3f}, {hi:+.3f}] "
            f"over {len(jd)} parents",
            v.held, note=v.reason,
            rule="per parent of the two-level SNMF with at least two children, the mean Jaccard overlap of the neuron "
                 "supports (top 1% |F₁| entries) between its children minus that between its children and features "
                 "outside the group; held if the 95% bootstrap interval over parents lies above 0, did not hold if "
                 f"below 0, else not decided; fewer than {min_units} parents: not decided. Grouping comes from the codes "
                 "alone, so shared neurons are not built in; one seed",
            source=SOURCE, figure="two-level tree table")
    return out
