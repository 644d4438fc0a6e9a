"""One training loop for every dictionary in `sae_kit.saes`.

Adam (Gao et al.'s eps 6.25e-10), linear warm-up then a linear decay to zero over the last fifth,
unit-norm decoder with the gradient projected onto the sphere's tangent, geometric-median ``b_dec``
from a data sample, dead-latent tracking (inside `SAE.loss`), a ``tqdm.auto`` bar showing loss /
FVU / L0 / dead %, and a returned history for plotting.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .activations import ActivationStore
from .saes.base import release_training_buffers
from .fsutil import atomic_write_bytes
from .config import bars_off, get_scale
from .validate import integer, real

_STAMPS = ("model_name", "hook_name", "store_key", "scale", "activation_scale")  # provenance `train` writes into the config


def default_lr(d_sae: int) -> float:
    """2e-4 · sqrt(16384 / d_sae) (EleutherAI's rule, docs/methods.md §1.4), doubled for short CPU runs."""
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

    def record(self, step: int, tokens: int, out: dict, lr: float) -> None:
        """Append one step: the step, tokens seen so far, `SAE.loss`'s numbers and the learning rate."""
        self.step.append(step)
        self.tokens.append(tokens)
        for name in ("loss", "fvu", "l0", "aux", "dead"):
            v = out.get(name)
            getattr(self, name).append(float(v.detach()) if v is not None else float("nan"))
        self.lr.append(lr)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens[-1] / self.seconds if self.tokens and self.seconds else float("nan")


class HookMismatchError(ValueError):
    """An SAE was used at another hook (or model) than the one it was trained on."""


def check_fits(sae, store, force: bool = False, action: str = "use") -> None:
    """Refuse an SAE on a store it cannot read: a different width always; a different hook or model
    (stamped into ``sae.cfg`` by `train`) unless `force` — an SAE read at another hook reconstructs
    a different signal, and its FVU / ΔCE there mean nothing."""
    spec = store.spec
    if sae.cfg.d_in != spec.d_in:
        raise ValueError(f"cannot {action} an SAE with d_in={sae.cfg.d_in} on store {store.path.name}, whose "
                         f"activations have width {spec.d_in} ({spec.hook}); build the SAE with d_in={spec.d_in}")
    if force:
        return
    for what, have, want in (("hook", sae.cfg.hook_name, spec.hook), ("model", sae.cfg.model_name, spec.model)):
        if have and have != want:
            raise HookMismatchError(
                f"this SAE was trained on {what} {have!r}, but the store holds {want!r}; {action} it on a store "
                f"of {have!r}, or pass force=True if you mean to read it at another {what}")


@torch.enable_grad()  # training needs autograd even when called from inside `torch.no_grad()`
def train(sae, store, batch_size: int = 2048, epochs: int = 1, lr: float | None = None,
          warmup_frac: float = 0.05, decay_frac: float = 0.2, seed: int = 0, grads: bool = False,
          init_b_dec: bool = True, progress: bool = True, desc: str | None = None,
          max_steps: int | None = None, checkpoint: str | Path | None = None, checkpoint_every: int = 200,
          force: bool = False, keep_checkpoint: bool = False, normalize: str | None = None) -> History:
    """Train `sae` on the training split of an `ActivationStore` (or a tensor [N, d_in]).

    Args:
        sae: any `sae_kit.saes.SAE`.
        store: an `ActivationStore`, or a float tensor of activations.
        batch_size: tokens per step.
        epochs: passes over the training split.
        lr: Adam learning rate (> 0); None uses `default_lr(d_sae)`.
        warmup_frac, decay_frac: fractions of the steps for linear warm-up and final linear decay.
        seed: data-order seed.
        grads: feed ∂CE/∂x alongside x (g-SAE); needs a store harvested with gradients.
        init_b_dec: set b_dec to the geometric median of up to 8192 training tokens first.
        progress: show a tqdm bar.
        desc: the bar's label.
        max_steps: stop after this many steps (≥ 1; for quick checks).
        checkpoint: a file to checkpoint into every `checkpoint_every` steps (weights, optimiser,
            step, data order, dead-latent clocks, random generators). Called again with the same
            SAE and arguments after an interruption, `train` resumes there and ends with the same
            weights as an uninterrupted run. Removed when training finishes.
        checkpoint_every: steps between checkpoints.
        keep_checkpoint: leave the last checkpoint on disk at the end (for a caller that removes it once
            it has stored the result itself, as `train_cached` does).
        force: train on a store from another hook / model than the one stamped in ``sae.cfg``.
        normalize: None (train on x as it is) or ``"expected_average"`` (SAELens's
            ``expected_average_only_in``): train on s·x with s = √d_in / mean ‖x‖ over up to 8192
            training tokens, so the average input norm is √d_in whatever the model. After training
            s is folded into the weights (`SAE.fold_input_scale`: the SAE then reads x itself) and
            recorded as ``cfg.activation_scale``, which `save` writes into ``cfg.json``. The FVU loss
            is scale-free, so this changes only the optimiser's view (learning rate, Adam's eps,
            the initial weights against the data), not which tokens dominate the loss.

    Returns:
        The `History` of the run. Training on a store stamps its model, hook and key, and the
        scale, into ``sae.cfg`` (saved with the SAE).
    """
    batch_size = integer("batch_size", batch_size, min=1, hint=" (tokens per step)")
    epochs = integer("epochs", epochs, min=1)
    seed = integer("seed", seed)
    if lr is not None:
        lr = real("lr", lr, min=0, strict_min=True, hint="; pass lr=None for the default")
    warmup_frac = real("warmup_frac", warmup_frac, min=0, max=1)
    decay_frac = real("decay_frac", decay_frac, min=0, max=1)
    if max_steps is not None:
        max_steps = integer("max_steps", max_steps, min=1, hint="; pass None to train on every batch")
    checkpoint_every = integer("checkpoint_every", checkpoint_every, min=1)
    if normalize not in (None, "expected_average"):
        raise ValueError(f"normalize must be None or 'expected_average', got {normalize!r}")
    if normalize and not sae.folds_input_scale:
        raise ValueError(f"normalize={normalize!r} is not available for {type(sae).__name__}: its selection "
                         f"cannot be folded back to raw inputs; train it with normalize=None")
    store = _check_store(sae, store, grads, force)
    device = sae.device
    batches, n_steps = _batches(store, batch_size, epochs, seed, device, grads)
    if max_steps:
        n_steps = min(n_steps, max_steps)
    if n_steps == 0:
        raise ValueError(f"the training data has {_n_train(store):,} tokens, fewer than one batch of {batch_size}; "
                         f"lower batch_size or give more tokens")
    if isinstance(store, ActivationStore):  # provenance: every trained SAE says where it came from
        sae.cfg.model_name, sae.cfg.hook_name, sae.cfg.store_key = store.spec.model, store.spec.hook, store.spec.key()
        sae.cfg.scale = get_scale().name
    lr = default_lr(sae.cfg.d_sae) if lr is None else lr
    opt = adam(sae, lr)
    warm, decay_at = max(1, int(warmup_frac * n_steps)), int((1 - decay_frac) * n_steps)

    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        if step >= decay_at:
            return lr * max(0.0, (n_steps - step) / max(1, n_steps - decay_at))
        return lr

    ckpt = Checkpoint(checkpoint, sae, store, dict(batch_size=batch_size, epochs=epochs, lr=lr, seed=seed,
                      warmup_frac=warmup_frac, decay_frac=decay_frac, grads=grads, init_b_dec=init_b_dec,
                      n_steps=n_steps, normalize=normalize)) if checkpoint is not None else None
    hist, start = History(), 0
    sample = store.get("train", 8192) if isinstance(store, ActivationStore) else store[:8192]
    s = float(sae.cfg.d_in ** 0.5 / sample.norm(dim=1).mean()) if normalize else 1.0
    if ckpt is not None and ckpt.exists():
        start, hist = ckpt.restore(sae, opt)
    elif init_b_dec:
        sae.init_b_dec(sample * s)
    sae.train()
    bar = tqdm(total=n_steps, initial=start, desc=desc or f"train {sae.label}",
               disable=bars_off(progress))
    t0, seen = time.time(), (hist.tokens[-1] if hist.tokens else 0)
    try:  # the step buffers (`training_buffer`) are freed however the loop ends
        for step, batch in enumerate(batches):
            if step >= n_steps:
                break
            if step < start:  # resuming: replay the data order up to the checkpoint
                continue
            x, g = batch if grads else (batch, None)
            if not torch.isfinite(x).all():
                raise FloatingPointError(f"NaN/Inf in the activations of training batch {step}; "
                                         f"re-harvest the store (it may be corrupt) or check its dtype")
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            if normalize:  # the SAE sees s·x; the loss's gradient w.r.t. s·x is g / s
                x, g = x * s, (g / s if g is not None else None)
            out = train_step(sae, opt, x, g)
            seen += len(x)
            hist.record(step, seen, out, lr_at(step))
            if step % 10 == 0 or step == n_steps - 1:
                bar.set_postfix(loss=f"{hist.loss[-1]:.3f}", fvu=f"{hist.fvu[-1]:.3f}",
                                L0=f"{hist.l0[-1]:.1f}", dead=f"{100 * hist.dead[-1]:.1f}%")
            bar.update(1)
            if ckpt is not None and (step + 1) % checkpoint_every == 0 and step + 1 < n_steps:
                ckpt.save(step + 1, sae, opt, hist, seconds=hist.seconds + time.time() - t0)
    finally:
        release_training_buffers()
    bar.close()
    sae.eval()
    if normalize:
        sae.fold_input_scale(s)
    hist.seconds += time.time() - t0
    if ckpt is not None and not keep_checkpoint:
        ckpt.remove()
    return hist


def adam(sae, lr: float) -> torch.optim.Adam:
    """Adam with Gao et al.'s eps, fused into one kernel per tensor where torch has one (CPU and
    CUDA: ~5x faster than the per-op version on 2 CPU cores, `make bench`)."""
    fused = sae.device.type in ("cpu", "cuda") and sae.W_dec.dtype in (torch.float32, torch.float64,
                                                                       torch.float16, torch.bfloat16)
    return torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999), eps=6.25e-10, fused=fused or None)


def train_step(sae, opt: torch.optim.Optimizer, x: torch.Tensor, g: torch.Tensor | None = None) -> dict:
    """One optimiser step on batch x (and its gradients g): loss, backward, the decoder's gradient
    made tangent to the unit sphere, Adam, atoms renormalised. Returns `sae.loss`'s dict."""
    out = sae.loss(x, g)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    sae.project_decoder_grad()
    opt.step()
    sae.normalize_decoder()
    return out


def _check_store(sae, store, grads: bool, force: bool):
    """The training data, checked against the SAE before anything changes."""
    if isinstance(store, ActivationStore):
        check_fits(sae, store, force, action="train")
        if grads and not store.spec.with_grads:
            raise ValueError(f"grads=True needs a store harvested with gradients; {store.path.name} has none "
                             f"(harvest(..., with_grads=True))")
        return store
    if isinstance(store, torch.Tensor):
        if grads:
            raise ValueError("grads=True needs an ActivationStore harvested with gradients, not a tensor")
        if store.ndim != 2 or store.shape[1] != sae.cfg.d_in:
            raise ValueError(f"training tensor must have shape [tokens, {sae.cfg.d_in}] for this SAE, got "
                             f"{tuple(store.shape)}")
        if not store.is_floating_point():
            raise TypeError(f"training tensor must be floating point, got {store.dtype}; convert with x.float()")
        if store.dtype != sae.W_dec.dtype:
            warnings.warn(f"training tensor is {store.dtype}; converting it to the SAE's {sae.W_dec.dtype}",
                          UserWarning, stacklevel=3)
            store = store.to(sae.W_dec.dtype)
        return store
    raise TypeError(f"train needs an ActivationStore (sae_kit.harvest) or a torch.Tensor [tokens, d_in], got "
                    f"{type(store).__name__}" + ("; wrap a numpy array with torch.from_numpy(x)"
                                                 if type(store).__module__ == "numpy" else ""))


def _n_train(store) -> int:
    return len(store.token_range("train")) if isinstance(store, ActivationStore) else len(store)


def config_without_stamps(sae) -> dict:
    """`sae.cfg` as a dict without the provenance `train` stamps in (what identifies the dictionary)."""
    return {k: v for k, v in asdict(sae.cfg).items() if k not in _STAMPS}


def weights_digest(sae) -> str:
    """A hash of `sae`'s weights and buffers (its whole state dict)."""
    h = hashlib.sha256()
    for t in sae.state_dict().values():
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def initial_digest(sae) -> str:
    """`weights_digest` of `sae` when it first met `train` (remembered on the object)."""
    if getattr(sae, "_initial_digest", None) is None:
        sae._initial_digest = weights_digest(sae)
    return sae._initial_digest


class Checkpoint:
    """One training run's checkpoint file: written atomically, read back only by the same run.

    "The same run" is a hash of the SAE's class, config and initial weights (`initial_digest`:
    the weights when this SAE object first met `train`, so re-running the same object, or a fresh
    one built the same way, resumes), the data (store key, or the tensor's shape and a sample of its
    values) and every argument that shapes the steps. A checkpoint from another run is replaced, with
    a warning; a file that is not a kit checkpoint is refused (an empty file is not a file's content
    to lose, and is replaced).
    """

    MARK = "sae_kit.train checkpoint v1"

    def __init__(self, path, sae, store, args: dict):
        self.path = Path(path)
        if self.path.is_dir():
            raise IsADirectoryError(f"checkpoint={self.path} is a folder; give a file path, e.g. {self.path / 'run.ckpt'}")
        h = hashlib.sha256()
        cfg = config_without_stamps(sae)
        h.update(json.dumps({"class": type(sae).__name__, "cfg": cfg, "args": args}, sort_keys=True,
                            default=str).encode())
        h.update(initial_digest(sae).encode())
        if isinstance(store, ActivationStore):
            h.update(store.spec.key().encode())
        else:
            h.update(str(tuple(store.shape)).encode())
            h.update(store[:: max(1, len(store) // 64)].detach().cpu().contiguous().numpy().tobytes())
        self.key = h.hexdigest()
        if self.path.exists() and self.path.stat().st_size > 0 and self._read() is None:
            raise FileExistsError(f"checkpoint={self.path} exists and is not a sae_kit training checkpoint; "
                                  f"nothing was changed: give another file name")

    def _read(self) -> dict | None:
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # not a torch file, or a damaged one
            return None
        return state if isinstance(state, dict) and state.get("mark") == self.MARK else None

    def exists(self) -> bool:
        """Whether a checkpoint of this very run is on disk."""
        state = self._read() if self.path.exists() else None
        if state is not None and state["key"] != self.key:
            warnings.warn(f"checkpoint {self.path} is from another run (other SAE, data or arguments); "
                          f"starting afresh and replacing it", UserWarning, stacklevel=3)
            return False
        return state is not None

    def save(self, step: int, sae, opt, hist: History, seconds: float) -> None:
        gens = {n: g.get_state() for n, g in vars(sae).items() if isinstance(g, torch.Generator)}
        state = {"mark": self.MARK, "key": self.key, "step": step, "sae": sae.state_dict(),
                 "opt": opt.state_dict(), "hist": {**hist.as_dict(), "seconds": seconds},
                 "torch_rng": torch.get_rng_state(), "generators": gens}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.path, lambda f: torch.save(state, f))

    def restore(self, sae, opt) -> tuple[int, History]:
        state = self._read()
        sae.load_state_dict(state["sae"])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["torch_rng"])
        for n, s in state["generators"].items():
            getattr(sae, n).set_state(s)
        print(f"sae_kit: resuming training from step {state['step']} ({self.path})")
        return int(state["step"]), History(**state["hist"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _batches(store, batch_size, epochs, seed, device, grads):
    if isinstance(store, torch.Tensor):
        gen = torch.Generator().manual_seed(seed)
        n = len(store) // batch_size

        def it():
            for _ in range(epochs):
                perm = torch.randperm(len(store), generator=gen)
                for i in range(n):
                    yield store[perm[i * batch_size:(i + 1) * batch_size]].to(device)

        return it(), n * epochs
    if len(store.token_range("train")) < batch_size:
        return iter(()), 0
    return (store.batches(batch_size, "train", epochs=epochs, seed=seed, device=device, grads=grads),
            store.n_batches(batch_size, "train", epochs))


_NOT_IN_KEY = ("sae", "store", "progress", "desc", "checkpoint", "checkpoint_every", "keep_checkpoint", "force")


def training_arguments(train_kw: dict) -> dict:
    """`train`'s arguments that decide the result, defaults filled in: ``seed=0`` given or left out
    keys alike, so notebooks that train the same SAE the same way share one cache entry."""
    import inspect

    bound = inspect.signature(train).bind(None, None, **train_kw)
    bound.apply_defaults()
    return {k: v for k, v in bound.arguments.items() if k not in _NOT_IN_KEY}


# Part of every cache key of `train_cached`: bump it when a change to the kit changes the weights a
# training run produces (2: AuxK no longer re-picks the main code's pairs; 3: Mutual / Feature Choice
# start from random Zipf ranks), so no stale SAE is reused.
TRAINING_REVISION = 3


def train_cached(sae, store, progress: bool = True, **train_kw):
    """`train`, or load the result of an identical earlier run from the kit's cache.

    The key is the store, the SAE's class, config and init seed, the training arguments and
    `TRAINING_REVISION` (bumped whenever a change to the kit changes what training produces), so
    notebooks that train the same SAE on the same store share it (e.g. 00 and 05). Training
    checkpoints beside the cached SAE, so an interrupted run (a killed kernel) resumes where it
    stopped when the cell runs again.

    A tensor of activations (not a store) is trained on without caching.

    Returns:
        (sae, history): the trained (or loaded) SAE and its `History`.
    """
    from .config import cache_dir

    if not isinstance(store, ActivationStore):  # a tensor of activations: nothing to key a cache on
        return sae, train(sae, store, progress=progress, **train_kw)
    cfg = config_without_stamps(sae)  # a re-run of a trained object keys alike
    desc = {"revision": TRAINING_REVISION, "store": store.spec.key(), "class": type(sae).__name__, "cfg": cfg,
            "seed": getattr(sae, "init_seed", None), "train": training_arguments(train_kw)}
    key = hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = cache_dir() / "saes" / f"{sae.label.replace(' ', '-').replace('=', '')}-{sae.cfg.d_sae}-{key}"
    own = path.with_name(path.name + ".ckpt")  # the cache's own checkpoint, beside the entry
    ckpt = train_kw.setdefault("checkpoint", own)

    def tidy():  # only once the entry is complete: a kill before this point resumes from the checkpoint
        if ckpt is not None:
            Path(ckpt).unlink(missing_ok=True)

    out = cached_run(path, sae, lambda: train(sae, store, progress=progress, keep_checkpoint=True, **train_kw),
                     progress, done=tidy)
    own.unlink(missing_ok=True)  # one left by a run killed between completing the entry and removing it
    return out


def cached_run(path: Path, sae, fit, progress: bool = True, done=None):
    """(sae, history) from the finished cache entry at `path`, or from ``fit()`` (which trains `sae`
    in place and returns its `History`), then saved there.

    One trainer per entry: a second process asking for the same entry (another notebook open at
    once) waits for the first, then loads its result. `done` runs after the entry is complete.
    """
    from .fsutil import atomic_write_text, locked

    cached = _load_cached(path, sae, progress)
    if cached is not None:
        return cached
    with locked(path, f"the cached SAE {sae.label}"):
        cached = _load_cached(path, sae, progress)
        if cached is not None:
            return cached
        hist = fit()
        sae.save(path)
        atomic_write_text(path / "history.json", json.dumps(hist.as_dict()))
        if done is not None:
            done()
    return sae, hist


def _load_cached(path: Path, sae, progress: bool):
    """(sae, history) from a finished cache entry, or None."""
    from .saes import load_sae

    if not (path / "history.json").exists():
        return None
    loaded = load_sae(path, device=sae.device)
    hist = History(**json.loads((path / "history.json").read_text()))
    if progress:
        print(f"loaded cached {sae.label} d_sae={sae.cfg.d_sae} from {path.name}")
    return loaded, hist
