"""Harvest a model's activations at one hook into a disk store; read them back in batches.

A store is a folder: ``meta.json`` (what it holds and where from), ``acts.npy`` [N, d_in],
``tokens.npy`` [n_windows, ctx_len] (the windows the activations came from), and optionally
``grads.npy`` [N, d_in] = ∂(summed next-token cross-entropy)/∂activation for g-SAE. The ``.npy``
files are memory-mapped, so stores larger than RAM work. Harvesting writes into ``<name>.partial``
and records its progress; an interrupted harvest resumes there, and only a finished store is
renamed to its final name, so no reader ever sees a half-written store. A lock beside the store
makes a second process harvesting the same store wait for the first and then reuse its result.
A folder that is not a store is never written into or deleted; a damaged store (truncated file,
unreadable ``meta.json``) is detected on opening, named, and re-harvested with ``repair=True``.

Which positions are stored: position 0 of every window is left out (the first position of a
Llama-family model is an attention sink whose residual norm is about 5× the others at layer 8 of
SmolLM2-135M, and would dominate any reconstruction loss), and so is the last position (it has no
next-token target, hence no gradient and no CE). A window of 64 tokens thus gives 62 stored tokens.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .config import bars_off, cache_dir
from .corpus import fingerprint, load_texts, token_windows
from .fsutil import atomic_write_text, claim_dir, locked
from .models import model_id
from .validate import all_finite, integer

SKIP_FIRST = 1  # leave out position 0 (attention sink)
SKIP_LAST = 1  # leave out the last position (no next-token target)
_FORMAT = 1
DOC_SEPARATOR = "\n\n"  # text between joined documents in a store's windows


@dataclass(frozen=True)
class StoreSpec:
    """Everything that decides a store's content; two stores with equal specs hold equal data."""

    model: str
    hook: str
    d_in: int
    n_windows: int
    ctx_len: int
    corpus: str  # corpus fingerprint
    seed: int
    dtype: str  # "float16" | "float32"
    with_grads: bool
    skip_first: int = SKIP_FIRST
    skip_last: int = SKIP_LAST
    separator: str = DOC_SEPARATOR  # between documents: no <|endoftext|> (a massive activation) mid-window
    format: int = _FORMAT

    @property
    def per_window(self) -> int:
        return self.ctx_len - self.skip_first - self.skip_last

    @property
    def n_tokens(self) -> int:
        return self.n_windows * self.per_window

    def key(self) -> str:
        import hashlib

        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:10]
        slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{self.model}-{self.hook}-{self.n_tokens}").strip("-")
        return f"{slug}-{h}"


class StoreMismatchError(ValueError):
    """A store was opened for a model / hook / width it was not built for."""


class StoreCorruptError(ValueError):
    """A store's files are unreadable or do not match its ``meta.json`` (e.g. a truncated ``.npy``)."""


STORE_FILES = {"meta.json", "acts.npy", "tokens.npy", "grads.npy"}  # what a finished store holds
PARTIAL_FILES = STORE_FILES | {"progress.json", "progress.tmp", "meta.tmp"}  # an unfinished one (.tmp: older kits)
_REPAIR = "; re-harvest it with harvest(..., repair=True), which replaces the damaged store"


def validate_hook(model, hook: str) -> int:
    """Check `hook` exists on `model`; return its layer index. Raise a helpful error otherwise."""
    n = model.cfg.n_layers
    if hook in model.hook_dict:
        m = re.match(r"blocks\.(\d+)\.", hook)
        return int(m.group(1)) if m else (n - 1 if hook.startswith("ln_final") else 0)
    m = re.match(r"blocks\.(\d+)\.(.+)", hook)
    if m and int(m.group(1)) >= n:
        raise ValueError(f"unknown hook {hook!r}: this model has {n} layers (0-{n - 1})")
    kinds = sorted({k.split(".", 2)[2] for k in model.hook_dict if k.startswith("blocks.0.")})
    raise ValueError(f"unknown hook {hook!r}. Hooks look like 'blocks.{{L}}.<name>' with L in 0-{n - 1} "
                     f"and <name> one of: {', '.join(kinds)}")


def hook_width(model, hook: str) -> int:
    """Width of the flattened activation at `hook` (e.g. d_model for resid, d_mlp for mlp.hook_post)."""
    layer = validate_hook(model, hook)
    out = {}
    toks = torch.zeros(1, 3, dtype=torch.long, device=model.cfg.device)  # 3: unlike any head count
    with torch.no_grad():
        model.run_with_hooks(toks, stop_at_layer=layer + 1,
                             fwd_hooks=[(hook, lambda a, hook: out.setdefault("a", a))])
    shape = tuple(out["a"].shape)
    if len(shape) < 2 or shape[1] != 3 or shape[0] != 1:
        raise ValueError(f"hook {hook!r} does not hold one vector per token (for 3 tokens it gives shape "
                         f"{shape}, e.g. attention patterns are [batch, head, query, key]); an SAE needs a "
                         f"per-token hook such as 'blocks.{layer}.hook_resid_post', 'blocks.{layer}.mlp.hook_post' "
                         f"or 'blocks.{layer}.attn.hook_z'")
    return int(np.prod(shape[2:]))


class ActivationStore:
    """A finished store on disk. Open with `ActivationStore(path)` or get one from `harvest`."""

    def __init__(self, path: str | Path, expect: dict | None = None):
        self.path = Path(path)
        meta_file = self.path / "meta.json"
        if not meta_file.exists():
            hint = " (an unfinished harvest: run harvest() again to resume it)" \
                if self.path.with_name(self.path.name + ".partial").exists() else ""
            raise FileNotFoundError(f"no activation store at {self.path}{hint}")
        try:
            meta = json.loads(meta_file.read_text())
            self.spec = StoreSpec(**{"separator": "<|endoftext|>", **meta["spec"]})  # older stores joined documents with EOT
            self.eval_windows = int(meta.get("eval_windows", 0))
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
            raise StoreCorruptError(f"{meta_file} is damaged ({type(e).__name__}: {e}){_REPAIR}") from None
        for field, want in (expect or {}).items():
            have = getattr(self.spec, field)
            if have != want:
                raise StoreMismatchError(
                    f"store {self.path.name} was built for {field}={have!r}, not {want!r}; harvest a "
                    f"store for this {field} (sae_kit.harvest) or open the matching one")
        s = self.spec
        self.acts = self._open("acts.npy", (s.n_tokens, s.d_in), s.dtype)
        self.tokens = torch.from_numpy(np.array(self._open("tokens.npy", (s.n_windows, s.ctx_len), "int32")))
        self.grads = self._open("grads.npy", (s.n_tokens, s.d_in), s.dtype) if s.with_grads else None

    def verify(self, chunk_tokens: int = 1 << 16) -> None:
        """Scan every stored value for NaN/Inf (one pass over the files); raise `StoreCorruptError`."""
        for name, arr in (("acts.npy", self.acts), ("grads.npy", self.grads)):
            if arr is None:
                continue
            for s in range(0, len(arr), chunk_tokens):
                if not np.isfinite(arr[s:s + chunk_tokens]).all():
                    raise StoreCorruptError(f"NaN/Inf in {self.path / name} (tokens {s}-{s + chunk_tokens - 1}): "
                                            f"the store's data is damaged{_REPAIR}")

    def _open(self, name: str, shape: tuple, dtype: str) -> np.ndarray:
        """Memory-map one of the store's arrays, checking its size and type against the spec."""
        f = self.path / name
        try:
            a = np.load(f, mmap_mode="r")
        except FileNotFoundError:
            raise StoreCorruptError(f"{f} is missing from the store{_REPAIR}") from None
        except (ValueError, OSError, EOFError) as e:  # a truncated file cannot be mapped
            raise StoreCorruptError(f"{f} cannot be read ({e}): the file is truncated or damaged{_REPAIR}") from None
        if a.shape != shape or a.dtype != np.dtype(dtype):
            raise StoreCorruptError(f"{f} holds {a.dtype} {a.shape}, but meta.json says {dtype} {shape}{_REPAIR}")
        return a

    def __len__(self) -> int:
        return self.spec.n_tokens

    @property
    def d_in(self) -> int:
        return self.spec.d_in

    def __repr__(self) -> str:
        s = self.spec
        return (f"ActivationStore({s.model} {s.hook}: {s.n_tokens:,} tokens x {s.d_in}, {s.dtype}, "
                f"grads={s.with_grads}, eval windows={self.eval_windows}, at {self.path})")

    # -- splits: the last `eval_windows` windows are held out (windows are shuffled at harvest) --
    def window_range(self, split: str) -> range:
        n_train = self.spec.n_windows - self.eval_windows
        if split == "train":
            return range(0, n_train)
        if split == "eval":
            return range(n_train, self.spec.n_windows)
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")

    def token_range(self, split: str) -> range:
        w, p = self.window_range(split), self.spec.per_window
        return range(w.start * p, w.stop * p)

    def get(self, split: str = "eval", n: int | None = None, device=None, grads: bool = False):
        """The first `n` tokens of a split as fp32 tensors: x [n, d_in] (and g when `grads`)."""
        r = self.token_range(split)
        stop = r.stop if n is None else min(r.stop, r.start + n)
        what = f"tokens {r.start}-{stop - 1} of store {self.path}"
        x = _to_tensor(self.acts[r.start:stop], device, what)
        if not grads:
            return x
        return x, _to_tensor(self._need_grads()[r.start:stop], device, "gradients of " + what)

    def token_ids(self, split: str = "eval", n: int | None = None) -> torch.Tensor:
        """The token ids [n] of the activations `get(split, n)` returns, in the same order."""
        s, w = self.spec, self.window_range(split)
        ids = self.tokens[w.start:w.stop, s.skip_first:s.skip_first + s.per_window].reshape(-1)
        return ids if n is None else ids[:n]

    def _need_grads(self):
        if self.grads is None:
            raise ValueError(f"store {self.path.name} has no gradients; harvest with with_grads=True")
        return self.grads

    def batches(self, batch_size: int, split: str = "train", epochs: int = 1, seed: int = 0,
                device=None, grads: bool = False, chunk_tokens: int = 1 << 18) -> Iterator:
        """Shuffled batches of x (or (x, g)), reading the memmap in chunks so RAM stays bounded.

        Each epoch visits chunks in a random order and shuffles tokens inside each chunk; the
        windows were already shuffled at harvest time, so this mixes well. Drops a final partial batch.
        """
        batch_size = integer("batch_size", batch_size, min=1)
        epochs = integer("epochs", epochs, min=1)
        chunk_tokens = integer("chunk_tokens", chunk_tokens, min=1)
        if grads:
            self._need_grads()
        r = self.token_range(split)
        if len(r) < batch_size:
            raise ValueError(f"split {split!r} has {len(r)} tokens, fewer than one batch of {batch_size}")
        rng = np.random.default_rng(seed)
        starts = np.arange(r.start, r.stop, chunk_tokens)
        resident = self._resident(split, r, device, grads)  # on a GPU: the split, moved there once
        for _ in range(epochs):
            leftover_x = leftover_g = None
            for s in rng.permutation(starts):
                e = min(s + chunk_tokens, r.stop)
                perm = rng.permutation(e - s)
                if resident is not None:  # the same tokens in the same order, gathered on the GPU
                    p = torch.from_numpy(perm + (s - r.start)).to(resident[0].device)
                    x = resident[0][p]
                    g = resident[1][p] if grads else None
                else:
                    what = f"tokens {s}-{e - 1} of store {self.path}"
                    x = _to_tensor(self.acts[s:e][perm], device, what)
                    g = _to_tensor(self._need_grads()[s:e][perm], device, "gradients of " + what) if grads else None
                if leftover_x is not None:
                    x = torch.cat([leftover_x, x])
                    g = torch.cat([leftover_g, g]) if grads else None
                n_full = len(x) // batch_size * batch_size
                for i in range(0, n_full, batch_size):
                    yield (x[i:i + batch_size], g[i:i + batch_size]) if grads else x[i:i + batch_size]
                leftover_x = x[n_full:]
                leftover_g = g[n_full:] if grads else None

    def _resident(self, split: str, r: range, device, grads: bool):
        """On a CUDA device, the split's activations (and gradients) as float32 on that device, kept
        for the store's lifetime: every epoch of every SAE then gathers its batches there instead of
        converting and copying each chunk from the memmap (the host work that dominates a GPU
        run). On other devices None: the chunked memmap reads keep RAM bounded."""
        dev = torch.device(device) if device is not None else None
        if dev is None or dev.type not in _RESIDENT_DEVICES:
            return None
        cache = self.__dict__.setdefault("_on_device", {})
        key = (split, str(dev))
        if key not in cache or (grads and cache[key][1] is None):
            what = f"tokens {r.start}-{r.stop - 1} of store {self.path}"
            x = cache[key][0] if key in cache else _to_tensor(self.acts[r.start:r.stop], dev, what)
            g = _to_tensor(self._need_grads()[r.start:r.stop], dev, "gradients of " + what) if grads else None
            cache[key] = (x, g)
        return cache[key]

    def n_batches(self, batch_size: int, split: str = "train", epochs: int = 1) -> int:
        return len(self.token_range(split)) // batch_size * epochs


_RESIDENT_DEVICES = ("cuda",)  # where `batches` keeps a split on the device instead of reading chunks


def _to_tensor(a: np.ndarray, device, what: str = "store data") -> torch.Tensor:
    t = torch.from_numpy(np.array(a, dtype=np.float32))  # a copy: memmaps are read-only
    if not all_finite(t):
        raise StoreCorruptError(f"NaN/Inf in {what}: the store's data is damaged{_REPAIR}")
    return t.to(device) if device is not None else t


# a harvest saves a resume point (flushed rows, then progress.json) about this often, and when it
# is interrupted (a stopped cell): a killed process loses at most this much work plus one batch, and
# the forward passes are not held up by a flush after every batch
CHECKPOINT_SECONDS = 2.0


def _save_point(part: Path, spec, acts, grads, windows_done: int) -> None:
    """A harvest's resume point: the rows written so far reach the disk, then the count that vouches for them."""
    acts.flush()
    if grads is not None:
        grads.flush()
    _atomic_json(part / "progress.json", {"spec": asdict(spec), "windows_done": windows_done})


def _atomic_json(path: Path, obj: dict) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1))


def harvest(model, hook: str, n_tokens: int, ctx_len: int = 64, corpus=None, seed: int = 0,
            eval_tokens: int = 0, dtype: str = "float16", with_grads: bool = False,
            batch_windows: int = 32, path: str | Path | None = None, progress: bool = True,
            repair: bool = False, allow_network: bool | None = None, lock_timeout: float | None = None,
            _stop_after: int | None = None) -> ActivationStore:
    """Run `model` over real text and store the activations at `hook` (reusing a finished store).

    Args:
        model: a HookedTransformer (e.g. from `load_model`).
        hook: a TransformerLens hook name with one vector per token, e.g. ``"blocks.8.hook_resid_post"``.
        n_tokens: stored tokens wanted, train and eval together (rounded up to whole windows).
        ctx_len: tokens per window (at most the model's context length).
        corpus: a `load_texts` source (None = the standard library's documentation).
        seed: window shuffle seed.
        eval_tokens: tokens held out as the eval split (whole windows at the end of the store).
        dtype: ``"float16"`` (half the disk) or ``"float32"``.
        with_grads: also store ∂(summed next-token CE)/∂activation (one backward pass per batch).
        batch_windows: windows per model forward.
        path: store folder; default under the kit's cache dir, named from the spec. It must be new,
            empty, or an earlier store: a folder holding anything else is refused, never overwritten.
        progress: show a tqdm bar with tokens/s.
        repair: check a finished store at `path` (files against meta.json, every value finite) and
            replace it by harvesting again if it is damaged; without it, a damaged store raises
            `StoreCorruptError` when opened or read.
        allow_network: let a corpus name that is not a file or folder be read as a Hugging Face dataset
            (see `load_texts`).
        lock_timeout: seconds to wait when another process is harvesting the same store (None: until
            it finishes; then its store is reused).

    Returns:
        The finished `ActivationStore`.
    """
    # every argument is checked before anything is created on disk
    if dtype not in ("float16", "float32"):
        raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
    n_tokens = integer("n_tokens", n_tokens, min=1)
    eval_tokens = integer("eval_tokens", eval_tokens, min=0, hint=" (tokens held out for evaluation; 0 for none)")
    seed = integer("seed", seed)
    batch_windows = integer("batch_windows", batch_windows, min=1, hint=" (windows per model forward)")
    n_ctx = int(getattr(model.cfg, "n_ctx", 0) or 0) or None
    ctx_len = integer("ctx_len", ctx_len, min=SKIP_FIRST + SKIP_LAST + 1, max=n_ctx,
                      hint=f" (tokens per window; this model's context is {n_ctx} tokens)" if n_ctx else "")
    layer = validate_hook(model, hook)
    per_window = ctx_len - SKIP_FIRST - SKIP_LAST
    n_windows = -(-n_tokens // per_window)
    eval_windows = -(-eval_tokens // per_window) if eval_tokens else 0
    if eval_windows >= n_windows:
        raise ValueError(f"eval_tokens ({eval_tokens}) leaves no training tokens out of {n_tokens}")
    d_in = hook_width(model, hook)
    if path is not None:
        _claim_store_path(Path(path))
    docs = load_texts(corpus, allow_network=allow_network)
    spec = StoreSpec(model=model_id(model), hook=hook, d_in=d_in, n_windows=n_windows,
                     ctx_len=ctx_len, corpus=fingerprint(docs), seed=seed, dtype=dtype, with_grads=with_grads)
    windows = token_windows(model.tokenizer, docs, ctx_len, n_windows, seed=seed,
                            separator=spec.separator)  # the corpus is big enough
    final = Path(path) if path is not None else cache_dir() / "stores" / spec.key()
    part = final.with_name(final.name + ".partial")
    _claim_store_path(final)
    with locked(final, "the activation store", timeout=lock_timeout):
        return _harvest_locked(model, spec, final, part, layer, windows, eval_windows, batch_windows, repair,
                               progress, _stop_after)


def _written_by_kit(folder: Path) -> bool:
    """A store folder is the kit's if its meta.json holds a store spec, or (meta.json damaged) if it
    holds the kit's arrays beside it."""
    try:
        return "spec" in json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError, TypeError, UnicodeDecodeError):
        return (folder / "acts.npy").exists() and (folder / "tokens.npy").exists()


def _claim_store_path(final: Path) -> None:
    """Refuse a store path whose folder (or its ``.partial``) holds anything but the kit's store files."""
    hint = " (or leave path=None to use the kit's cache)"
    claim_dir(final, "an activation store", markers={"meta.json"}, allowed=STORE_FILES, hint=hint,
              is_ours=_written_by_kit)
    claim_dir(final.with_name(final.name + ".partial"), "an unfinished activation store", markers=set(),
              allowed=PARTIAL_FILES, hint=hint)


def _finished_store(final: Path, spec: StoreSpec, repair: bool, eval_windows: int) -> ActivationStore | None:
    """The finished store at `final` if it holds `spec`; None when there is none (or it was damaged and
    `repair` asks to replace it)."""
    if not (final / "meta.json").exists():
        return None
    try:
        store = ActivationStore(final)
        if repair:  # a store that opens may still hold damaged values
            store.verify()
    except StoreCorruptError:
        if not repair:
            raise
        shutil.rmtree(final)  # only the kit's own files: `claim_dir` checked the folder's content
        return None
    if store.spec != spec:
        raise StoreMismatchError(f"{final} holds a different store ({store.spec}); pick another path")
    if store.eval_windows != eval_windows:
        raise StoreMismatchError(f"{final} holds the same tokens split into {store.eval_windows} eval windows, not "
                                 f"{eval_windows}; ask for the same eval_tokens, or harvest to another path")
    return store


def _harvest_locked(model, spec: StoreSpec, final: Path, part: Path, layer: int, windows, eval_windows: int,
                    batch_windows: int, repair: bool, progress: bool, _stop_after) -> ActivationStore:
    store = _finished_store(final, spec, repair, eval_windows)
    if store is not None:
        return store
    if (part / "meta.json").exists() and not (part / "progress.json").exists():  # killed just before the rename
        try:
            done = ActivationStore(part)
            if done.spec == spec and done.eval_windows == eval_windows:
                if final.exists():
                    shutil.rmtree(final)  # an empty folder, or a damaged store being repaired
                part.rename(final)
                return ActivationStore(final)
        except StoreCorruptError:
            pass
    hook, ctx_len, n_windows, per_window, dtype = spec.hook, spec.ctx_len, spec.n_windows, spec.per_window, spec.dtype
    with_grads = spec.with_grads
    done = 0
    if (part / "progress.json").exists():
        try:
            prog = json.loads((part / "progress.json").read_text())
            same = prog["spec"] == asdict(spec)
            done = int(prog["windows_done"]) if same else 0
            if same:  # the arrays must exist at full size to resume into them
                for name in ("acts.npy",) + (("grads.npy",) if with_grads else ()):
                    a = np.load(part / name, mmap_mode="r")
                    if a.shape != (spec.n_tokens, spec.d_in):
                        raise ValueError(f"{name} has shape {a.shape}")
        except (ValueError, KeyError, TypeError, OSError, EOFError):
            same, done = False, 0  # a damaged partial store: start it again
        if not same:
            shutil.rmtree(part)  # the kit's own unfinished store (checked by `claim_dir`)
    part.mkdir(parents=True, exist_ok=True)
    np.save(part / "tokens.npy", windows.numpy().astype(np.int32))
    mode = "r+" if done else "w+"
    shape = (spec.n_tokens, spec.d_in)
    acts = np.lib.format.open_memmap(part / "acts.npy", mode=mode, dtype=dtype, shape=shape)
    grads = np.lib.format.open_memmap(part / "grads.npy", mode=mode, dtype=dtype, shape=shape) \
        if with_grads else None
    if not done:
        _atomic_json(part / "progress.json", {"spec": asdict(spec), "windows_done": 0})
    sl = slice(SKIP_FIRST, ctx_len - SKIP_LAST)
    bar = tqdm(total=spec.n_tokens, initial=done * per_window, unit="tok", disable=bars_off(progress),
               desc=f"harvest {hook}" + (" +grads" if with_grads else ""))
    t0 = saved_at = time.monotonic()
    written = done  # windows whose rows (activations and gradients) are in the arrays
    try:
        for w0 in range(done, n_windows, batch_windows):
            toks = windows[w0:w0 + batch_windows].to(model.cfg.device)
            a, g = _forward(model, toks, hook, layer, with_grads)
            a = a[:, sl].reshape(-1, spec.d_in)
            if not all_finite(a):
                raise FloatingPointError(f"NaN/Inf in activations at {hook} for windows {w0}-{w0 + len(toks) - 1}; "
                                         f"the model's weights or dtype ({model.cfg.dtype}) are broken")
            t_sl = slice(w0 * per_window, (w0 + len(toks)) * per_window)
            acts[t_sl] = a.float().cpu().numpy().astype(dtype)
            if with_grads:
                grads[t_sl] = g[:, sl].reshape(-1, spec.d_in).float().cpu().numpy().astype(dtype)
            written = w0 + len(toks)
            stop = _stop_after is not None and written >= _stop_after
            if stop or written >= n_windows or time.monotonic() - saved_at >= CHECKPOINT_SECONDS:
                _save_point(part, spec, acts, grads, written)
                saved_at = time.monotonic()
            bar.update(len(toks) * per_window)
            bar.set_postfix(tok_s=f"{(written - done) * ctx_len / (time.monotonic() - t0):.0f}")
            if stop:  # tests: simulate an interrupt
                raise KeyboardInterrupt("harvest stopped by _stop_after")
    except KeyboardInterrupt:  # a stopped cell: keep every whole batch written so far
        _save_point(part, spec, acts, grads, written)
        bar.close()
        raise
    bar.close()
    del acts, grads
    _atomic_json(part / "meta.json", {"spec": asdict(spec), "eval_windows": eval_windows,
                                      "seconds": round(time.monotonic() - t0, 1)})
    (part / "progress.json").unlink()
    if final.exists():  # an empty folder, or a damaged store being repaired (checked above)
        shutil.rmtree(final)
    part.rename(final)
    return ActivationStore(final)


def _forward(model, toks: torch.Tensor, hook: str, layer: int, with_grads: bool):
    """Activations at `hook` [B, T, ...]; with grads also ∂(Σ next-token CE)/∂activation."""
    saved = {}
    if not with_grads:
        with torch.no_grad():
            model.run_with_hooks(toks, stop_at_layer=layer + 1,
                                 fwd_hooks=[(hook, lambda a, hook: saved.setdefault("a", a))])
        a = saved["a"]
        return a.reshape(*a.shape[:2], -1), None

    def grab(a, hook):
        a = a.detach().requires_grad_(True)  # leaf: the rest of the model builds its graph from here
        saved["a"] = a
        return a

    with torch.enable_grad():
        logits = model.run_with_hooks(toks, fwd_hooks=[(hook, grab)])
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        ce = -logp.gather(-1, toks[:, 1:, None]).sum()  # summed, so gradients don't shrink with B·T
        (grad,) = torch.autograd.grad(ce, saved["a"])
    a = saved["a"].detach()
    return a.reshape(*a.shape[:2], -1), grad.reshape(*grad.shape[:2], -1)


def default_hook(model, depth: float = 0.3) -> str:
    """The residual stream after the layer at `depth` of the model (0.3 of SmolLM2's 30 layers = 8)."""
    layer = min(model.cfg.n_layers - 1, int(round(depth * model.cfg.n_layers)) - 1)
    return f"blocks.{max(layer, 0)}.hook_resid_post"


def get_store(model, scale, hook: str | None = None, with_grads: bool = False, seed: int = 0,
              n_tokens: int | None = None, eval_tokens: int | None = None, **kw) -> ActivationStore:
    """The store a notebook uses at `scale` (harvested on first use, reused after): `n_tokens`
    training and `eval_tokens` held-out tokens, by default the scale's."""
    hook = hook or default_hook(model)
    n = scale.n_tokens if n_tokens is None else n_tokens
    n_eval = scale.eval_tokens if eval_tokens is None else eval_tokens
    return harvest(model, hook, n_tokens=n + n_eval, ctx_len=scale.ctx_len, seed=seed,
                   eval_tokens=n_eval, with_grads=with_grads, **kw)
