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
    snmf_iters: int  # SNMF iteration cap (early stopping usually ends sooner)
    steer_concepts: int  # concepts steered
    steer_kl: tuple[float, ...]  # KL targets for matched-KL steering
    steer_samples: int  # continuations generated per steering setting
    steer_tokens: int  # tokens per continuation


_SIZES = {
    "ci": Sizes(snmf_ranks=(10, 25, 50), snmf_iters=300, steer_concepts=2, steer_kl=(0.5,), steer_samples=2,
                steer_tokens=12),
    "lab": Sizes(snmf_ranks=(10, 25, 50, 100), snmf_iters=2000, steer_concepts=8, steer_kl=(0.1, 0.25, 0.5),
                 steer_samples=4, steer_tokens=20),
    "paper": Sizes(snmf_ranks=(10, 25, 50, 100, 200), snmf_iters=10_000, steer_concepts=20,
                   steer_kl=(0.025, 0.05, 0.1, 0.15, 0.25, 0.35, 0.5), steer_samples=8, steer_tokens=50),
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


def shuffled_purity(codes: torch.Tensor, labels: torch.Tensor, n: int = 20, repeats: int = 200, seed: int = 0) -> torch.Tensor:
    """Mean purity when sentence labels are shuffled (chance level), one value per repeat."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(repeats):
        out.append(purity(codes, labels[torch.randperm(len(labels), generator=gen)], n)["mean"])
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
