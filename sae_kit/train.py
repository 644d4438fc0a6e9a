"""One training loop for every dictionary in `sae_kit.saes`.

Adam (Gao et al.'s eps 6.25e-10), linear warm-up then a linear decay to zero over the last fifth,
unit-norm decoder with the gradient projected onto the sphere's tangent, geometric-median ``b_dec``
from a data sample, dead-latent tracking (inside `SAE.loss`), a ``tqdm.auto`` bar showing loss /
FVU / L0 / dead %, and a returned history for plotting.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .config import bars_off


def default_lr(d_sae: int) -> float:
    """2e-4 · sqrt(16384 / d_sae) (EleutherAI's rule, METHODS §1.4), doubled for short CPU runs."""
    return 4e-4 * math.sqrt(16384 / d_sae)


@dataclass
class History:
    """Per-step training curves; ``history.as_dict()`` for plotting."""

    step: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    fvu: list[float] = field(default_factory=list)
    l0: list[float] = field(default_factory=list)
    aux: list[float] = field(default_factory=list)
    dead: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items()}

    @property
    def tokens_per_second(self) -> float:
        return self.tokens[-1] / self.seconds if self.tokens and self.seconds else float("nan")


def train(sae, store, batch_size: int = 2048, epochs: int = 1, lr: float | None = None,
          warmup_frac: float = 0.05, decay_frac: float = 0.2, seed: int = 0, grads: bool = False,
          init_b_dec: bool = True, progress: bool = True, desc: str | None = None,
          max_steps: int | None = None) -> History:
    """Train `sae` on the training split of an `ActivationStore` (or a tensor [N, d_in]).

    Args:
        sae: any `sae_kit.saes.SAE`.
        store: an `ActivationStore`, or a float tensor of activations.
        batch_size: tokens per step.
        epochs: passes over the training split.
        lr: Adam learning rate; None uses `default_lr(d_sae)`.
        warmup_frac, decay_frac: fractions of the steps for linear warm-up and final linear decay.
        seed: data-order seed.
        grads: feed ∂CE/∂x alongside x (g-SAE); needs a store harvested with gradients.
        init_b_dec: set b_dec to the geometric median of up to 8192 training tokens first.
        progress: show a tqdm bar.
        desc: the bar's label.
        max_steps: stop early (for quick checks).

    Returns:
        The `History` of the run.
    """
    device = sae.device
    batches, n_steps = _batches(store, batch_size, epochs, seed, device, grads)
    if max_steps:
        n_steps = min(n_steps, max_steps)
    if init_b_dec:
        sample = store.get("train", 8192) if hasattr(store, "get") else store[:8192]
        sae.init_b_dec(sample)
    lr = lr or default_lr(sae.cfg.d_sae)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10)
    warm, decay_at = max(1, int(warmup_frac * n_steps)), int((1 - decay_frac) * n_steps)

    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        if step >= decay_at:
            return lr * max(0.0, (n_steps - step) / max(1, n_steps - decay_at))
        return lr

    hist = History()
    sae.train()
    bar = tqdm(total=n_steps, desc=desc or f"train {sae.cfg.architecture} k={sae.cfg.k}", disable=bars_off(progress))
    t0, seen = time.time(), 0
    for step, batch in enumerate(batches):
        if step >= n_steps:
            break
        x, g = batch if grads else (batch, None)
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"NaN/Inf in the activations of training batch {step}; "
                                     f"re-harvest the store (it may be corrupt) or check its dtype")
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        out = sae.loss(x, g)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        sae.project_decoder_grad()
        opt.step()
        sae.normalize_decoder()
        seen += len(x)
        hist.step.append(step)
        hist.tokens.append(seen)
        for name in ("loss", "fvu", "l0", "aux", "dead"):
            v = out.get(name)
            getattr(hist, name).append(float(v.detach()) if v is not None else float("nan"))
        hist.lr.append(lr_at(step))
        if step % 10 == 0 or step == n_steps - 1:
            bar.set_postfix(loss=f"{hist.loss[-1]:.3f}", fvu=f"{hist.fvu[-1]:.3f}",
                            L0=f"{hist.l0[-1]:.1f}", dead=f"{100 * hist.dead[-1]:.1f}%")
        bar.update(1)
    bar.close()
    sae.eval()
    hist.seconds = time.time() - t0
    return hist


def _batches(store, batch_size, epochs, seed, device, grads):
    if isinstance(store, torch.Tensor):
        if grads:
            raise ValueError("grads=True needs an ActivationStore harvested with gradients")
        gen = torch.Generator().manual_seed(seed)
        n = len(store) // batch_size

        def it():
            for _ in range(epochs):
                perm = torch.randperm(len(store), generator=gen)
                for i in range(n):
                    yield store[perm[i * batch_size:(i + 1) * batch_size]].to(device)

        return it(), n * epochs
    return (store.batches(batch_size, "train", epochs=epochs, seed=seed, device=device, grads=grads),
            store.n_batches(batch_size, "train", epochs))


def train_cached(sae, store, progress: bool = True, **train_kw):
    """`train`, or load the result of an identical earlier run from the kit's cache.

    The key is the store, the SAE's class, config and init seed, and the training arguments, so
    notebooks that train the same SAE on the same store share it (e.g. 00 and 05).

    Returns:
        (sae, history): the trained (or loaded) SAE and its `History`.
    """
    import hashlib
    import json
    from dataclasses import asdict

    from .config import cache_dir
    from .saes import load_sae

    desc = {"store": store.spec.key(), "class": type(sae).__name__, "cfg": asdict(sae.cfg),
            "seed": getattr(sae, "init_seed", None), "train": {k: v for k, v in train_kw.items() if k != "desc"}}
    key = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / "saes" / f"{sae.cfg.architecture}-{sae.cfg.d_sae}-k{sae.cfg.k}-{key}"
    if (path / "history.json").exists():
        loaded = load_sae(path, device=sae.device)
        hist = History(**json.loads((path / "history.json").read_text()))
        if progress:
            print(f"loaded cached {sae.cfg.architecture} d_sae={sae.cfg.d_sae} k={sae.cfg.k} from {path.name}")
        return loaded, hist
    hist = train(sae, store, progress=progress, **train_kw)
    sae.save(path)
    tmp = path / "history.json.tmp"
    tmp.write_text(json.dumps(hist.as_dict()))
    tmp.replace(path / "history.json")
    return sae, hist
