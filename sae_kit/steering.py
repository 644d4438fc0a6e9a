"""Steering measures: how much does adding a latent's decoder direction move the model's output?

`steering_effects` adds α·d_i (d_i unit-norm, so α is the push's norm) at the SAE's layer, at every
stored position of random eval contexts, and reports KL(clean ‖ steered) of the next-token
distribution per latent. At a fixed α this is an "effect per unit norm" (Olmo et al. 2024 compare
how effectively g-SAE and TopK latents steer in arbitrary contexts; their exact measure is not
public, so this proxy is the kit's choice).

`Steerer` is the matched-KL protocol of the SNMF paper (Shafran et al. 2025, METHODS §5.1): add
α·v at a hook at every position, find α by bisection so that KL(clean ‖ steered) of the next token
after a neutral prompt hits a target, generate continuations, and score them. Without an LLM
judge the kit scores with two proxies, each in [0, 1]:

- **concept** = 1 − exp(−Δ), Δ = how much steering raises the log-probability mass on the
  concept's own words, averaged over the generated positions (the steered model against the clean
  model on the same steered text); 0 when it does not raise it;
- **fluency** = min(1, ppl_ref / ppl): the clean model's perplexity on unsteered samples of the
  same prompt against its perplexity on the steered text;

combined by their harmonic mean (0 if either is 0), as AxBench combines its judge's scores.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .config import bars_off

from .splice import Splicer


@torch.no_grad()
def steering_effects(splicer: Splicer, sae, latents, alpha: float, progress: bool = True) -> torch.Tensor:
    """KL(clean ‖ steered) for each latent in `latents` when α·d_i is added at the layer.

    Args:
        splicer: a `Splicer` on the store the SAE was trained on (its eval windows are the contexts).
        sae: the dictionary whose decoder rows are the directions.
        latents: latent indices.
        alpha: norm of the push (same for every latent, so effects compare per unit norm).

    Returns:
        Tensor [len(latents)] of KL values (nats/token).
    """
    out = []
    for i in tqdm(list(latents), desc="steering", disable=bars_off(progress), leave=False):
        d = sae.W_dec[i].detach()
        out.append(splicer(replace=lambda a, d=d: a + alpha * d.to(a.device, a.dtype))["kl"])
    return torch.tensor(out)


def alive_latents(density: torch.Tensor, n: int, seed: int = 0, min_density: float = 1e-4) -> list[int]:
    """`n` random latents with density ≥ `min_density` (a fair sample to compare dictionaries on)."""
    alive = torch.nonzero(density >= min_density).flatten()
    pick = torch.randperm(len(alive), generator=torch.Generator().manual_seed(seed))[:n]
    return alive[pick].tolist()


def concept_token_ids(tokenizer, words: list[str]) -> list[int]:
    """First token of each word, with and without a leading space and capitalised."""
    ids = set()
    for w in words:
        for v in (" " + w, w, " " + w.capitalize(), w.capitalize()):
            t = tokenizer.encode(v, add_special_tokens=False)
            if t:
                ids.add(t[0])
    return sorted(ids)


class Steerer:
    """Steer a model by adding α·v at `hook`, with α chosen to hit a KL target (see the module doc)."""

    def __init__(self, model, hook: str, prompt: str = "I think that", n_samples: int = 4, new_tokens: int = 20,
                 top_k: int = 30, top_p: float = 0.3, seed: int = 0):
        self.model, self.hook, self.prompt = model, hook, prompt
        self.n_samples, self.new_tokens, self.top_k, self.top_p, self.seed = n_samples, new_tokens, top_k, top_p, seed
        self.tokens = model.to_tokens(prompt, prepend_bos=False)
        with torch.no_grad():
            self.clean_lp = model(self.tokens)[0, -1].float().log_softmax(-1)
        self._ref_ppl = None

    def _hook(self, v: torch.Tensor, alpha: float):
        add = (alpha * v).to(self.model.cfg.device, self.model.cfg.dtype)
        return [(self.hook, lambda act, hook: act + add)]

    @torch.no_grad()
    def kl(self, v: torch.Tensor, alpha: float) -> float:
        """KL(clean ‖ steered) of the next token after the prompt."""
        lp = self.model.run_with_hooks(self.tokens, fwd_hooks=self._hook(v, alpha))[0, -1].float().log_softmax(-1)
        return float((self.clean_lp.exp() * (self.clean_lp - lp)).sum())

    def alpha_for_kl(self, v: torch.Tensor, target: float, lo: float = 1e-2, hi: float = 1e4,
                     iters: int = 20, tol: float = 0.01) -> tuple[float, float]:
        """Bisection (in log α) for KL = target. Returns (α, KL reached); α = hi if even hi falls short."""
        k_hi = self.kl(v, hi)
        if k_hi < target:
            return hi, k_hi
        a, k = hi, k_hi
        for _ in range(iters):
            a = math.sqrt(lo * hi)
            k = self.kl(v, a)
            if abs(k - target) <= tol * target:
                break
            lo, hi = (a, hi) if k < target else (lo, a)
        return a, k

    @torch.no_grad()
    def generate(self, v: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
        """`n_samples` continuations [n, prompt + new_tokens] (same sampling seed for every call)."""
        torch.manual_seed(self.seed)
        hooks = self._hook(v, alpha) if v is not None else []
        with self.model.hooks(fwd_hooks=hooks):
            return self.model.generate(self.tokens.repeat(self.n_samples, 1), max_new_tokens=self.new_tokens,
                                       do_sample=True, top_k=self.top_k, top_p=self.top_p, stop_at_eos=False,
                                       verbose=False, use_past_kv_cache=True)

    @torch.no_grad()
    def _clean_nll(self, toks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        P = self.tokens.shape[1]
        lp = self.model(toks).float().log_softmax(-1)[:, P - 1:-1]
        return lp, -lp.gather(-1, toks[:, P:, None])[..., 0]

    def reference_ppl(self) -> float:
        if self._ref_ppl is None:
            self._ref_ppl = float(self._clean_nll(self.generate())[1].mean().exp())
        return self._ref_ppl

    @torch.no_grad()
    def score(self, v: torch.Tensor, alpha: float, concept_ids: list[int]) -> dict:
        """Generate with α·v; score ``concept_score``, ``fluency`` and their ``harmonic`` mean."""
        toks = self.generate(v, alpha)
        P = self.tokens.shape[1]
        clean_lp, nll = self._clean_nll(toks)
        steered_lp = self.model.run_with_hooks(toks, fwd_hooks=self._hook(v, alpha)).float().log_softmax(-1)[:, P - 1:-1]
        ids = torch.tensor(concept_ids, device=toks.device)
        delta = float((steered_lp[..., ids].logsumexp(-1) - clean_lp[..., ids].logsumexp(-1)).mean())
        ppl = float(nll.mean().exp())
        concept = 1 - math.exp(-max(delta, 0.0))
        fluency = min(1.0, self.reference_ppl() / ppl)
        harmonic = 0.0 if concept == 0 or fluency == 0 else 2 * concept * fluency / (concept + fluency)
        return {"concept_score": concept, "fluency": fluency, "harmonic": harmonic, "delta_logmass": delta, "ppl": ppl,
                "text": self.model.tokenizer.decode(toks[0, P:].tolist())}


def matched_kl_comparison(steerer: Steerer, directions: dict, concept_ids: dict, targets, signs=(1, -1),
                          progress: bool = True) -> list[dict]:
    """Steer every direction at every KL target and both signs; keep the better sign per target.

    Args:
        directions: {method: {concept: unit vector at the steerer's hook}}.
        concept_ids: {concept: token ids its concept score counts}.
        targets: KL values to match.

    Returns:
        One row per (method, concept, target): α (signed), KL reached, concept_score, fluency, harmonic.
    """
    jobs = [(m, c, t) for m in directions for c in directions[m] for t in targets]
    rows = []
    for m, c, t in tqdm(jobs, desc="steering", disable=bars_off(progress)):
        v = directions[m][c]
        best = None
        for sgn in signs:
            a, k = steerer.alpha_for_kl(sgn * v, t)
            r = {"method": m, "concept": c, "target_kl": t, "alpha": sgn * a, "kl": k,
                 **steerer.score(sgn * v, a, concept_ids[c])}
            if best is None or r["harmonic"] > best["harmonic"]:
                best = r
        rows.append(best)
    return rows
