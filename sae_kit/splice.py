"""Splicing a reconstruction into the real model: ΔCE, CE recovered and KL (docs/methods.md §7).

`Splicer` replaces the hooked activation with a dictionary's reconstruction (or any replacement)
inside the language model and measures the next-token cross-entropy, CE-loss-recovered against
zero-ablation, and KL(clean ‖ spliced). `evaluate` combines it with the reconstruction metrics of
`metrics`. An SAE is refused at another hook or model than it was trained on (`train.check_fits`).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .config import bars_off
from .metrics import reconstruction_metrics
from .train import check_fits


class Splicer:
    """Cross-entropy with an activation spliced in at the store's hook, on the store's eval windows.

    CE recovered is reported against two ablations: zero (``ce_recovered``, the usual one) and the
    mean training activation (``ce_recovered_mean``): zero-ablating a residual stream is harsh, so
    against zero almost any reconstruction "recovers" most of the loss.

    Built once per store: it caches the residual stream entering the hook's block, the clean
    next-token log-probabilities (fp16) and the zero-ablation CE, so each spliced dictionary then
    costs one forward pass from the hook's layer on. Splicing replaces the activation at the stored
    positions only (all but the first and last of each window, see `activations`), and CE / KL are
    averaged over the next-token predictions made from those positions.

    Args:
        model: the HookedTransformer the store was harvested from.
        store: an `ActivationStore`.
        n_seqs: eval windows to use.
        batch_seqs: windows per forward pass.
    """

    def __init__(self, model, store, n_seqs: int = 64, batch_seqs: int = 16, progress: bool = True):
        from .activations import validate_hook

        spec = store.spec
        if str(getattr(model.cfg, "model_name", "")) != spec.model:
            raise ValueError(f"store was harvested from {spec.model!r}, not {model.cfg.model_name!r}")
        self.model, self.spec, self.batch_seqs, self.progress = model, spec, batch_seqs, progress
        self.path = store.path
        self.layer = validate_hook(model, spec.hook)
        self.windows = store.tokens[list(store.window_range("eval"))][:n_seqs].long()
        if len(self.windows) == 0:
            raise ValueError("the store has no eval windows; harvest with eval_tokens > 0")
        self.sl = slice(spec.skip_first, spec.ctx_len - spec.skip_last)
        self.targets = self.windows[:, self.sl.start + 1: self.sl.stop + 1]
        self.resid, self.logp_clean = [], []
        ce_clean = ce_zero = ce_mean = 0.0
        # mean ablation: every spliced position gets the mean training activation (gentler than
        # zero-ablating a residual stream, whose norm the next layers expect)
        sample = store.get("train", 8192)
        self.mean_act = (sample if len(sample) else store.get("eval", 8192)).float().mean(0)
        with torch.no_grad():
            for i in self._chunks("cache clean CE"):
                toks = self.windows[i:i + batch_seqs].to(model.cfg.device)
                _, cache = model.run_with_cache(toks, names_filter=f"blocks.{self.layer}.hook_resid_pre",
                                                stop_at_layer=self.layer + 1)
                resid = cache[f"blocks.{self.layer}.hook_resid_pre"]
                self.resid.append(resid)
                lp = self._run(resid, None)
                self.logp_clean.append(lp.half())
                ce_clean += self._ce_sum(lp, i)
                ce_zero += self._ce_sum(self._run(resid, torch.zeros_like), i)
                ce_mean += self._ce_sum(self._run(resid, self._mean_like), i)
        n = self.targets.numel()
        self.ce_clean, self.ce_zero, self.ce_mean = ce_clean / n, ce_zero / n, ce_mean / n

    def digest(self) -> str:
        """A hash of what a splice reads besides the dictionary: the model (its name, and its clean,
        zero- and mean-ablated CE on these windows, which move with any change of its weights), the
        hook, the windows, the scored positions, the mean activation and the batching."""
        from .sweeps import digest

        return digest(str(getattr(self.model.cfg, "model_name", "")), self.spec.hook, self.windows,
                      [self.sl.start, self.sl.stop], self.mean_act, self.batch_seqs,
                      [self.ce_clean, self.ce_zero, self.ce_mean], str(self.model.cfg.dtype))

    def _mean_like(self, a):
        return self.mean_act.to(a.device, a.dtype).expand_as(a.reshape(*a.shape[:-1], -1)).reshape(a.shape)

    def _chunks(self, desc):
        return tqdm(range(0, len(self.windows), self.batch_seqs), desc=desc, disable=bars_off(self.progress), leave=False)

    def _run(self, resid, fn):
        hooks = [] if fn is None else [(self.spec.hook, _splice_hook(fn, self.sl))]
        logits = self.model.run_with_hooks(resid, start_at_layer=self.layer, fwd_hooks=hooks)
        return torch.log_softmax(logits[:, self.sl].float(), -1)

    def _ce_sum(self, lp, i):
        t = self.targets[i:i + self.batch_seqs].to(lp.device)
        return float(-lp.gather(-1, t[..., None]).sum())

    @torch.no_grad()
    def __call__(self, sae=None, replace=None, g: torch.Tensor | None = None, force: bool = False) -> dict:
        """ΔCE, CE recovered and KL(clean ‖ spliced) for `sae` (or a `replace` function
        act [B, P, d_in] -> replacement). Returns a dict of nats/token numbers.

        `g`: per-token gradients of the eval split (``store.get("eval", grads=True)[1]``), for
        dictionaries whose current mode needs them (a g-SAE in its ``"gradient"`` mode).
        `force`: splice an SAE at another hook / model than the one it was trained on."""
        if replace is None and sae is None:
            raise ValueError("pass an sae or a replace function")
        if sae is not None:
            check_fits(sae, self, force, action="splice")
        P = self.sl.stop - self.sl.start
        if g is not None and len(g) < len(self.windows) * P:
            raise ValueError(f"g has {len(g)} rows; the splice needs {len(self.windows) * P} (eval split order)")
        ce = kl = 0.0
        for b, i in enumerate(self._chunks("splice CE")):
            if replace is None:
                g_b = g[i * P:(i + self.batch_seqs) * P] if g is not None else None
                fn = _reconstruct_with(sae, self.spec.d_in, g_b)
            else:
                fn = replace
            lp = self._run(self.resid[b], fn)
            ce += self._ce_sum(lp, i)
            kl += float(_kl_terms(self.logp_clean[b], lp).sum())  # (overwrites lp)
        n = self.targets.numel()
        s, c, z, m = ce / n, self.ce_clean, self.ce_zero, self.ce_mean
        return {"ce_clean": c, "ce_spliced": s, "ce_zero": z, "ce_mean_ablated": m, "delta_ce": s - c,
                "ce_recovered": (z - s) / (z - c) if z != c else float("nan"),
                "ce_recovered_mean": (m - s) / (m - c) if m != c else float("nan"), "kl": kl / n}

    @torch.no_grad()
    def per_window(self, replace=None) -> dict:
        """Per-window CE and KL(clean ‖ spliced), [n_windows] each, of a `replace` function
        (None: the clean model). The mean over windows equals the number ``__call__`` gives (every
        window scores the same positions); per-window numbers are what a bootstrap over windows needs."""
        ce, kl = [], []
        for b, i in enumerate(self._chunks("splice CE per window")):
            lp = self._run(self.resid[b], replace)
            t = self.targets[i:i + self.batch_seqs].to(lp.device)
            ce.append(-lp.gather(-1, t[..., None])[..., 0].double().mean(1))
            kl.append(_kl_terms(self.logp_clean[b], lp).sum(-1).double().mean(1))  # (overwrites lp)
        return {"ce": torch.cat(ce).cpu().numpy(), "kl": torch.cat(kl).cpu().numpy()}


def _kl_terms(logp_clean: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """p_clean · (log p_clean − log p) for every vocabulary entry: the same values, bit for bit, as
    ``lp_clean.exp() * (lp_clean - lp)`` with ``lp_clean = logp_clean.float()``, computed in the
    storage of `lp` (overwritten) and of that one float copy. The plain expression allocates three more
    tensors of the logits' size (16 windows × 62 positions × a 49k vocabulary: ~195 MB each), each a
    fresh mapping whose pages the kernel faults in: a splice at `lab` (64 windows) took 7.2 s
    instead of 8.1 (median of 3, 2 CPU cores)."""
    lp_clean = logp_clean.float()
    return torch.sub(lp_clean, lp, out=lp).mul_(lp_clean.exp_())


def delta_ce_from_logp(logp_clean: torch.Tensor, logp_spliced: torch.Tensor, tokens: torch.Tensor,
                       skip_first: int = 1, skip_last: int = 1) -> float:
    """ΔCE (nats per prediction) from whole-window log-probabilities, scored as `Splicer` scores it.

    Args:
        logp_clean, logp_spliced: [n_windows, T, vocab] log-softmax of the clean and spliced runs.
        tokens: [n_windows, T] the windows' tokens.
        skip_first, skip_last: positions left out at each end (the store's; 1 and 1 by default).

    The predictions scored are those made from positions skip_first .. T−1−skip_last (the stored,
    spliced positions), each against the next token. Position 0 is left out: the first token is an
    attention sink with an outsized norm, and the kit neither stores nor splices it.
    """
    sl = slice(skip_first, tokens.shape[1] - skip_last)
    targets = tokens[:, sl.start + 1: sl.stop + 1].long()[..., None]
    ce = [-lp[:, sl].gather(-1, targets).double().mean() for lp in (logp_clean, logp_spliced)]
    return float(ce[1] - ce[0])


def splice_metrics(model, store, sae=None, n_seqs: int = 64, batch_seqs: int = 16,
                   replace=None, progress: bool = True, force: bool = False, g: torch.Tensor | None = None) -> dict:
    """One-off `Splicer` call; build a `Splicer` yourself to evaluate many dictionaries."""
    if sae is not None:
        check_fits(sae, store, force, action="splice")
    return Splicer(model, store, n_seqs, batch_seqs, progress)(sae, replace, g=g, force=force)


def _reconstruct_with(sae, d_in: int, g: torch.Tensor | None):
    def replace(a):
        flat = a.reshape(-1, d_in).to(sae.device, torch.float32)
        gg = g.to(sae.device) if g is not None else None
        return sae.reconstruct(flat, gg).to(a.dtype).reshape(a.shape)
    return replace


def _splice_hook(fn, sl: slice):
    def hook(act, hook):
        shape = act.shape
        a = act.reshape(*shape[:2], -1)
        a = a.clone()
        a[:, sl] = fn(a[:, sl])
        return a.reshape(shape)
    return hook


def evaluate(sae, store, model=None, n_seqs: int = 64, progress: bool = True, grads: bool = False,
             splicer: Splicer | None = None, force: bool = False) -> dict:
    """Reconstruction metrics on the eval split, plus splice metrics when `model` (or a `Splicer`) is given.

    Refuses an SAE trained at another hook or model than the store's (`HookMismatchError`) unless `force`."""
    check_fits(sae, store, force, action="evaluate")
    if store.eval_windows == 0:
        raise ValueError(f"store {store.path.name} has no eval split; harvest it with eval_tokens > 0 "
                         f"(evaluating on training tokens would flatter the SAE)")
    if splicer is not None and splicer.spec != store.spec:
        raise ValueError("the Splicer was built on another store than the one being evaluated; build it "
                         "with the same store")
    if grads:
        x, g = store.get("eval", grads=True)
    else:
        x, g = store.get("eval"), None
    out = reconstruction_metrics(sae, x, g)
    g_splice = g if g is not None and sae.mode in sae.grad_modes else None  # the mode's selection needs them
    if splicer is not None:
        out.update(splicer(sae, g=g_splice, force=force))
    elif model is not None:
        out.update(splice_metrics(model, store, sae, n_seqs=n_seqs, progress=progress, force=force, g=g_splice))
    return out
