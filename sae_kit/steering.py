"""Steering measures: how much does adding a latent's decoder direction move the model's output?

`steering_effects` adds α·d_i (d_i unit-norm, so α is the push's norm) at the SAE's layer, at every
stored position of random eval contexts, and reports KL(clean ‖ steered) of the next-token
distribution per latent. At a fixed α this is an "effect per unit norm" (Olmo et al. 2024 compare
how effectively g-SAE and TopK latents steer in arbitrary contexts; their exact measure is not
public, so this proxy is the kit's choice).

`Steerer` is the matched-KL protocol of the SNMF paper (Shafran et al. 2025, docs/methods.md §5.1): add
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
        return self._hook_rows(v.reshape(1, -1), torch.tensor([float(alpha)]))

    def _hook_rows(self, V: torch.Tensor, alphas: torch.Tensor, repeat: int = 1):
        """A hook adding α_r·v_r to batch row r (each row repeated `repeat` times in the batch)."""
        add = (alphas.reshape(-1, 1).to(V.device, V.dtype) * V).repeat_interleave(repeat, 0)
        add = add.to(self.model.cfg.device, self.model.cfg.dtype)
        return [(self.hook, lambda act, hook: act + add.reshape(add.shape[0], *([1] * (act.ndim - 2)), -1))]

    @torch.no_grad()
    def kl(self, v: torch.Tensor, alpha: float) -> float:
        """KL(clean ‖ steered) of the next token after the prompt."""
        return float(self.kl_rows(v.reshape(1, -1), torch.tensor([float(alpha)]))[0])

    @torch.no_grad()
    def kl_rows(self, V: torch.Tensor, alphas: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        """KL(clean ‖ steered) for many directions V [R, d] at their α [R], in batched forwards."""
        out = []
        for i in range(0, len(V), chunk):
            Vc, ac = V[i:i + chunk], alphas[i:i + chunk]
            toks = self.tokens.repeat(len(Vc), 1)
            lp = self.model.run_with_hooks(toks, fwd_hooks=self._hook_rows(Vc, ac))[:, -1].float().log_softmax(-1)
            out.append((self.clean_lp.exp() * (self.clean_lp - lp)).sum(-1).cpu())
        return torch.cat(out)

    def alpha_for_kl(self, v: torch.Tensor, target: float, lo: float = 1e-2, hi: float = 1e4,
                     iters: int = 20, tol: float = 0.01) -> tuple[float, float]:
        """Bisection (in log α) for KL = target. Returns (α, KL reached); α = hi if even hi falls short."""
        a, k = self.alpha_for_kl_rows(v.reshape(1, -1), torch.tensor([float(target)]), lo, hi, iters, tol)
        return float(a[0]), float(k[0])

    def alpha_for_kl_rows(self, V: torch.Tensor, targets: torch.Tensor, lo: float = 1e-2, hi: float = 1e4,
                          iters: int = 20, tol: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
        """`alpha_for_kl` for every row of V [R, d] at once: each bisection step is one batched
        forward over the rows still searching (the same steps as one row at a time)."""
        R = len(V)
        targets = targets.double()
        lo_, hi_ = torch.full((R,), float(lo), dtype=torch.float64), torch.full((R,), float(hi), dtype=torch.float64)
        k = self.kl_rows(V, hi_).double()
        a = hi_.clone()
        active = k >= targets  # rows whose target is reachable bisect; the others keep α = hi
        for _ in range(iters):
            if not bool(active.any()):
                break
            rows = active.nonzero().flatten()
            mid = (lo_[rows] * hi_[rows]).sqrt()
            km = self.kl_rows(V[rows], mid).double()
            a[rows], k[rows] = mid, km
            t = targets[rows]
            done = (km - t).abs() <= tol * t
            below = km < t
            lo_[rows] = torch.where(below, mid, lo_[rows])
            hi_[rows] = torch.where(below, hi_[rows], mid)
            active[rows[done]] = False
        return a, k

    @torch.no_grad()
    def generate(self, v: torch.Tensor | None = None, alpha: float = 0.0) -> torch.Tensor:
        """`n_samples` continuations [n, prompt + new_tokens] (same sampling seed for every call)."""
        if v is None:
            return self._generate([])
        return self.generate_rows(v.reshape(1, -1), torch.tensor([float(alpha)]))

    @torch.no_grad()
    def generate_rows(self, V: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        """`n_samples` continuations for each row of V at its α, in one batched generation:
        [R·n_samples, prompt + new_tokens], row r's samples at r·n … r·n + n − 1."""
        return self._generate(self._hook_rows(V, alphas, repeat=self.n_samples), len(V))

    def _generate(self, hooks, rows: int = 1) -> torch.Tensor:
        torch.manual_seed(self.seed)
        with self.model.hooks(fwd_hooks=hooks):
            return self.model.generate(self.tokens.repeat(rows * self.n_samples, 1), max_new_tokens=self.new_tokens,
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
        return self.score_rows(v.reshape(1, -1), torch.tensor([float(alpha)]), [concept_ids])[0]

    @torch.no_grad()
    def score_rows(self, V: torch.Tensor, alphas: torch.Tensor, concept_ids: list[list[int]],
                   chunk: int = 16) -> list[dict]:
        """`score` for every row of V at its α: one batched generation, then scoring in chunks of
        `chunk` rows (the steered log-probabilities are n_samples × new_tokens × vocab per row)."""
        toks_all = self.generate_rows(V, alphas)
        P, n = self.tokens.shape[1], self.n_samples
        out = []
        for i in range(0, len(V), chunk):
            rows = range(i, min(i + chunk, len(V)))
            toks = toks_all[i * n:(rows[-1] + 1) * n]
            clean_lp, nll = self._clean_nll(toks)
            steered_lp = self.model.run_with_hooks(toks, fwd_hooks=self._hook_rows(V[i:rows[-1] + 1], alphas[i:rows[-1] + 1],
                                                                                   repeat=n)).float().log_softmax(-1)[:, P - 1:-1]
            for j, r in enumerate(rows):
                s = slice(j * n, (j + 1) * n)
                ids = torch.tensor(concept_ids[r], device=toks.device)
                delta = float((steered_lp[s][..., ids].logsumexp(-1) - clean_lp[s][..., ids].logsumexp(-1)).mean())
                ppl = float(nll[s].mean().exp())
                concept = 1 - math.exp(-max(delta, 0.0))
                fluency = min(1.0, self.reference_ppl() / ppl)
                harmonic = 0.0 if concept == 0 or fluency == 0 else 2 * concept * fluency / (concept + fluency)
                out.append({"concept_score": concept, "fluency": fluency, "harmonic": harmonic, "delta_logmass": delta,
                            "ppl": ppl, "text": self.model.tokenizer.decode(toks[j * n, P:].tolist())})
        return out


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
    jobs = [(m, c, t, sgn) for m in directions for c in directions[m] for t in targets for sgn in signs]
    if not jobs:
        return []
    V = torch.stack([sgn * directions[m][c].float() for m, c, _, sgn in jobs])
    bar = tqdm(total=3, desc="steering (batched: α search, generation, scoring)", disable=bars_off(progress))
    alphas, kls = steerer.alpha_for_kl_rows(V, torch.tensor([float(t) for _, _, t, _ in jobs]))
    bar.update(1)
    scores = steerer.score_rows(V, alphas.float(), [concept_ids[c] for _, c, _, _ in jobs])
    bar.update(2)
    bar.close()
    best = {}
    for (m, c, t, sgn), a, k, sc in zip(jobs, alphas.tolist(), kls.tolist(), scores):
        r = {"method": m, "concept": c, "target_kl": t, "alpha": sgn * a, "kl": k, **sc}
        if (m, c, t) not in best or r["harmonic"] > best[m, c, t]["harmonic"]:
            best[m, c, t] = r
    return list(best.values())
