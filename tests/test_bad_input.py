"""Bad input against the public API: each case must raise a clear error (type and key words of the
message) or warn, and leave the user's files exactly as they were.

Every case runs in a fresh folder holding a user's files (and, where the case needs one, a copy of a
real store or a saved SAE, damaged on purpose). The folder is fingerprinted before the call and
after it; only the kit's own lock files may appear.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

import sae_kit
from sae_kit.activations import ActivationStore, StoreCorruptError, harvest
from sae_kit.corpus import load_texts
from sae_kit.saes import TopKConfig, load_sae, topk_sae
from sae_kit.train import HookMismatchError

HOOK = "blocks.8.hook_resid_post"


class Env:
    """A user's folder with files in it, plus the real model and a real store."""

    def __init__(self, root: Path, model, store):
        self.root, self.model, self.store = root, model, store
        self.user = root / "my_project"
        (self.user / "data").mkdir(parents=True)
        (self.user / "notes.txt").write_text("my notes, not to be lost\n")
        (self.user / "data" / "results.csv").write_text("a,b\n1,2\n")
        self.file = root / "thesis.tex"
        self.file.write_text("\\documentclass{article}\n")

    def store_copy(self, name: str = "store") -> Path:
        dst = self.root / name
        shutil.copytree(self.store.path, dst)
        return dst

    def saved_sae(self, name: str = "sae") -> Path:
        return topk_sae(576, 1152, 8, seed=0).save(self.root / name)

    def harvest(self, **kw):
        args = dict(model=self.model, hook=HOOK, n_tokens=124, ctx_len=64, progress=False)
        args.update(kw)
        return harvest(**args)

    def sae(self, hook: str = "", model_name: str = ""):
        sae = topk_sae(576, 1152, 8, seed=0)
        sae.cfg.hook_name, sae.cfg.model_name = hook, model_name
        return sae


def fingerprint(root: Path) -> dict:
    """Every path under `root` with a hash of its content (folders: None). Lock files are the kit's."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.name.endswith((".lock", ".lock.json")):
            continue
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
    return out


@dataclass
class Case:
    id: str
    act: Callable[[Env], object]  # does the bad thing
    exc: type | None  # None: a warning is expected instead (see `warns`)
    words: tuple[str, ...]  # key words of the message, all required (case-insensitive)
    setup: Callable[[Env], None] | None = None  # prepares the folder (before the fingerprint)
    warns: type | None = None


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def _nan_store(env: Env) -> Path:
    p = env.store_copy("nan_store")
    a = np.load(p / "acts.npy", mmap_mode="r+")
    a[5, 3] = np.nan
    a.flush()
    return p


def _no_eval_store(env: Env) -> Path:
    p = env.store_copy("no_eval")
    meta = json.loads((p / "meta.json").read_text())
    meta["eval_windows"] = 0
    (p / "meta.json").write_text(json.dumps(meta))
    return p


def _binary_file(env: Env) -> None:
    (env.root / "weights.bin").write_bytes(bytes(range(256)) * 64)


CASES = [
    # ---- harvest: never write into, or delete, a user's folder; check arguments first ----
    Case("harvest into a user's folder", lambda e: e.harvest(path=e.user), FileExistsError,
         ("refusing", "not an activation store", "notes.txt", "nothing was changed")),
    Case("harvest onto a user's file", lambda e: e.harvest(path=e.file), FileExistsError,
         ("existing file", "nothing was changed")),
    Case("harvest whose .partial folder is a user's", lambda e: e.harvest(path=e.root / "acts"), FileExistsError,
         ("unfinished activation store", "nothing was changed"),
         setup=lambda e: shutil.copytree(e.user, e.root / "acts.partial")),
    Case("n_tokens not a whole number", lambda e: e.harvest(n_tokens=1000.5, path=e.root / "s"), ValueError,
         ("n_tokens", "whole number")),
    Case("n_tokens a string", lambda e: e.harvest(n_tokens="1000", path=e.root / "s"), TypeError,
         ("n_tokens", "whole number", "str")),
    Case("n_tokens zero", lambda e: e.harvest(n_tokens=0, path=e.root / "s"), ValueError, ("n_tokens", "at least 1")),
    Case("eval_tokens negative", lambda e: e.harvest(eval_tokens=-5, path=e.root / "s"), ValueError,
         ("eval_tokens", "at least 0")),
    Case("eval_tokens leave no training tokens", lambda e: e.harvest(eval_tokens=124, path=e.root / "s"),
         ValueError, ("eval_tokens", "no training tokens")),
    Case("ctx_len beyond the model's context", lambda e: e.harvest(ctx_len=5000, path=e.root / "s"), ValueError,
         ("ctx_len", "at most 2048", "context")),
    Case("ctx_len too short", lambda e: e.harvest(ctx_len=2, path=e.root / "s"), ValueError, ("ctx_len", "at least 3")),
    Case("batch_windows zero", lambda e: e.harvest(batch_windows=0, path=e.root / "s"), ValueError,
         ("batch_windows", "at least 1")),
    Case("unknown dtype", lambda e: e.harvest(dtype="bfloat16", path=e.root / "s"), ValueError, ("dtype", "float16")),
    Case("unknown hook", lambda e: e.harvest(hook="blocks.8.hook_resid_mid_typo", path=e.root / "s"), ValueError,
         ("unknown hook", "hook_resid_post")),
    Case("hook beyond the last layer", lambda e: e.harvest(hook="blocks.40.hook_resid_post", path=e.root / "s"),
         ValueError, ("30 layers",)),
    Case("hook that is not per token", lambda e: e.harvest(hook="blocks.3.attn.hook_pattern", path=e.root / "s"),
         ValueError, ("one vector per token", "hook_resid_post")),
    Case("binary file as corpus", lambda e: e.harvest(corpus=str(e.root / "weights.bin"), path=e.root / "s"),
         ValueError, ("does not look like utf-8 text", "weights.bin"), setup=_binary_file),
    Case("mistyped corpus file", lambda e: e.harvest(corpus="my_corpus.txt", path=e.root / "s"), FileNotFoundError,
         ("no such file or folder",)),
    Case("corpus name without network", lambda e: load_texts("wikitext-typo", allow_network=False),
         FileNotFoundError, ("no such file or folder", "allow_network")),
    Case("corpus of the wrong type", lambda e: load_texts(["some", "texts"]), TypeError, ("corpus", "list")),
    Case("empty corpus file", lambda e: e.harvest(corpus=str(e.root / "empty.txt"), path=e.root / "s"), ValueError,
         ("empty",), setup=lambda e: _write(e.root / "empty.txt", "  \n")),
    Case("corpus too small for the windows", lambda e: e.harvest(corpus=str(e.root / "tiny.txt"), path=e.root / "s"),
         ValueError, ("window", "larger corpus"), setup=lambda e: _write(e.root / "tiny.txt", "just a few words\n")),
    # ---- damaged stores: detected on opening, named, repairable ----
    Case("store with a corrupt meta.json", lambda e: ActivationStore(e.root / "store"), StoreCorruptError,
         ("meta.json", "damaged", "repair=true"),
         setup=lambda e: _write(e.store_copy() / "meta.json", "{\"spec\": {trunc")),
    Case("store with a truncated acts.npy", lambda e: ActivationStore(e.root / "store"), StoreCorruptError,
         ("acts.npy", "truncated", "repair=true"), setup=lambda e: _truncate(e.store_copy() / "acts.npy", 5000)),
    Case("store with a missing tokens.npy", lambda e: ActivationStore(e.root / "store"), StoreCorruptError,
         ("tokens.npy", "missing"), setup=lambda e: (e.store_copy() / "tokens.npy").unlink()),
    Case("harvest over a damaged store without repair",
         lambda e: e.harvest(path=e.root / "store", n_tokens=e.store.spec.n_tokens, eval_tokens=620),
         StoreCorruptError, ("acts.npy", "repair=true"), setup=lambda e: _truncate(e.store_copy() / "acts.npy", 5000)),
    Case("NaN in a store", lambda e: ActivationStore(e.root / "nan_store").get("train"), StoreCorruptError,
         ("nan/inf", "nan_store", "damaged"), setup=_nan_store),
    Case("not a store", lambda e: ActivationStore(e.user), FileNotFoundError, ("no activation store",)),
    Case("unknown split", lambda e: e.store.get("test"), ValueError, ("split", "'train' or 'eval'")),
    Case("batches of zero tokens", lambda e: next(e.store.batches(0)), ValueError, ("batch_size", "at least 1")),
    # ---- dictionaries: config and input ----
    Case("k of zero", lambda e: topk_sae(576, 4608, 0), ValueError, ("k must satisfy",)),
    Case("k not a whole number", lambda e: topk_sae(576, 4608, 3.5), ValueError, ("k", "whole number")),
    Case("negative width", lambda e: topk_sae(576, -1, 8), ValueError, ("d_sae", "at least 1")),
    Case("negative aux_coef", lambda e: TopKConfig(d_in=8, d_sae=32, k=4, aux_coef=-1), ValueError, ("aux_coef",)),
    Case("NaN in encode's input", lambda e: e.sae().encode(torch.full((4, 576), float("nan"))), ValueError,
         ("nan or inf", "4 of 4 rows")),
    Case("Inf in encode's input", lambda e: e.sae().encode(torch.tensor([[float("inf")] * 576])), ValueError,
         ("nan or inf",)),
    Case("wrong width into encode", lambda e: e.sae().encode(torch.zeros(4, 768)), ValueError,
         ("[batch, 576]", "d_in=576")),
    Case("numpy array into encode", lambda e: e.sae().encode(np.zeros((4, 576), np.float32)), TypeError,
         ("torch.tensor", "torch.from_numpy")),
    Case("integer tensor into encode", lambda e: e.sae().encode(torch.zeros(4, 576, dtype=torch.long)), TypeError,
         ("floating point",)),
    Case("float64 into encode is converted, with a warning", lambda e: e.sae().encode(torch.zeros(4, 576, dtype=torch.float64)),
         None, ("float64", "converting"), warns=UserWarning),
    Case("wrong latent width into decode", lambda e: e.sae().decode(torch.zeros(4, 576)), ValueError,
         ("decode", "[batch, 1152]")),
    Case("negative g-SAE beta", lambda e: sae_kit.gradient_sae(576, 1152, 8, beta=-1), ValueError, ("beta",)),
    # ---- save / load ----
    Case("save into a user's folder", lambda e: e.sae().save(e.user), FileExistsError,
         ("refusing", "not a saved sae", "nothing was changed")),
    Case("save onto a user's file", lambda e: e.sae().save(e.file), FileExistsError, ("existing file",)),
    Case("save into a SAELens SAE of the user's", lambda e: e.sae().save(e.root / "theirs"), FileExistsError,
         ("not a saved sae written by sae_kit",), setup=lambda e: _saelens_only(e.saved_sae("theirs"))),
    Case("harvest into a folder holding someone else's meta.json", lambda e: e.harvest(path=e.root / "exp"),
         FileExistsError, ("not an activation store",),
         setup=lambda e: _write((e.root / "exp").mkdir() or e.root / "exp" / "meta.json", '{"experiment": 3}')),
    Case("a budget above the width", lambda e: e.sae().encode(torch.zeros(2, 576), k=5000), ValueError,
         ("0 < k < d_sae",)),
    Case("save into a saved SAE the user added files to", lambda e: e.sae().save(e.root / "sae"), FileExistsError,
         ("refusing", "my_notes.md"), setup=lambda e: _write(e.saved_sae() / "my_notes.md", "mine")),
    Case("load a corrupt cfg.json", lambda e: load_sae(e.root / "sae"), ValueError, ("cfg.json", "not valid json"),
         setup=lambda e: _write(e.saved_sae() / "cfg.json", "{oops")),
    Case("load a truncated safetensors", lambda e: load_sae(e.root / "sae"), ValueError,
         ("sae_weights.safetensors", "truncated"),
         setup=lambda e: _truncate(e.saved_sae() / "sae_weights.safetensors", 100)),
    Case("load an unknown class", lambda e: load_sae(e.root / "sae"), ValueError, ("jumprelusae", "topksae"),
         setup=lambda e: _rename_class(e.saved_sae(), "JumpReluSAE")),
    Case("load from nowhere", lambda e: load_sae(e.root / "nope"), FileNotFoundError, ("no sae at",)),
    Case("load weights of another width", lambda e: load_sae(e.root / "sae"), ValueError, ("do not fit", "d_sae=2304"),
         setup=lambda e: _change_width(e.saved_sae(), 2304)),
    # ---- training ----
    Case("lr of zero", lambda e: sae_kit.train(e.sae(), e.store, lr=0, progress=False), ValueError,
         ("lr", "greater than 0", "lr=none")),
    Case("negative lr", lambda e: sae_kit.train(e.sae(), e.store, lr=-1e-3, progress=False), ValueError, ("lr",)),
    Case("max_steps of zero", lambda e: sae_kit.train(e.sae(), e.store, max_steps=0, progress=False), ValueError,
         ("max_steps", "at least 1")),
    Case("epochs of zero", lambda e: sae_kit.train(e.sae(), e.store, epochs=0, progress=False), ValueError,
         ("epochs", "at least 1")),
    Case("batch_size of zero", lambda e: sae_kit.train(e.sae(), e.store, batch_size=0, progress=False), ValueError,
         ("batch_size", "at least 1")),
    Case("fewer tokens than one batch", lambda e: _train_keeps_b_dec(e, torch.randn(100, 576), batch_size=512),
         ValueError, ("fewer than one batch", "100 tokens")),
    Case("SAE width differs from the store's", lambda e: sae_kit.train(topk_sae(768, 1536, 8), e.store, progress=False),
         ValueError, ("d_in=768", "width 576")),
    Case("gradients from a store without them", lambda e: sae_kit.train(e.sae(), e.store, grads=True, progress=False),
         ValueError, ("with_grads=true",)),
    Case("numpy array as training data", lambda e: sae_kit.train(e.sae(), np.zeros((4096, 576), np.float32)),
         TypeError, ("activationstore", "torch.from_numpy")),
    Case("train on another hook's store", lambda e: sae_kit.train(e.sae(hook="blocks.3.hook_resid_post"), e.store,
                                                                  progress=False),
         HookMismatchError, ("blocks.3.hook_resid_post", HOOK, "force=true")),
    Case("checkpoint onto a user's file", lambda e: sae_kit.train(e.sae(), e.store, batch_size=256, checkpoint=e.file,
                                                                             progress=False),
         FileExistsError, ("not a sae_kit training checkpoint", "nothing was changed")),
    # ---- evaluation and splicing ----
    Case("evaluate at another hook", lambda e: sae_kit.evaluate(e.sae(hook="blocks.3.hook_resid_post"), e.store),
         HookMismatchError, ("trained on hook", "blocks.3.hook_resid_post", "force=true")),
    Case("evaluate an SAE of another model", lambda e: sae_kit.evaluate(e.sae(HOOK, "gpt2"), e.store),
         HookMismatchError, ("model", "gpt2")),
    Case("splice at another hook", lambda e: sae_kit.Splicer(e.model, e.store, n_seqs=2)(e.sae("blocks.3.hook_resid_post")),
         HookMismatchError, ("splice", "blocks.3.hook_resid_post")),
    Case("evaluate a store without an eval split",
         lambda e: sae_kit.evaluate(e.sae(HOOK), ActivationStore(e.root / "no_eval")), ValueError,
         ("no eval split", "eval_tokens"), setup=_no_eval_store),
    Case("explore a store without an eval split",
         lambda e: sae_kit.explore(e.sae(HOOK), ActivationStore(e.root / "no_eval"), e.model), ValueError,
         ("no eval split", "eval_tokens"), setup=_no_eval_store),
    Case("evaluate an SAE of another width", lambda e: sae_kit.evaluate(topk_sae(768, 1536, 8), e.store), ValueError,
         ("d_in=768",)),
    # ---- configuration ----
    Case("unknown scale", lambda e: sae_kit.get_scale("huge"), ValueError, ("unknown scale", "ci, lab, paper")),
    Case("seed not a whole number", lambda e: sae_kit.setup(seed="one"), TypeError, ("seed", "whole number")),
    Case("negative seed", lambda e: sae_kit.setup(seed=-1), ValueError, ("seed", "at least 0")),
    Case("model name not a string", lambda e: sae_kit.load_model(135), TypeError, ("model name", "smollm2-135m")),
]


def _saelens_only(path: Path) -> None:
    """Make a saved SAE look like one SAELens wrote: no sae_kit metadata, no kit state."""
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["metadata"].pop("sae_kit")
    (path / "cfg.json").write_text(json.dumps(cfg))
    (path / "sae_kit_state.safetensors").unlink()


def _rename_class(path: Path, name: str) -> None:
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["metadata"]["sae_kit"]["class"] = name
    (path / "cfg.json").write_text(json.dumps(cfg))


def _change_width(path: Path, d_sae: int) -> None:
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["metadata"]["sae_kit"]["cfg"]["d_sae"] = d_sae
    (path / "cfg.json").write_text(json.dumps(cfg))


def _train_keeps_b_dec(e: Env, x: torch.Tensor, **kw):
    sae = e.sae()
    before = sae.b_dec.detach().clone()
    try:
        sae_kit.train(sae, x, progress=False, **kw)
    finally:
        assert torch.equal(sae.b_dec, before), "a refused training run still moved b_dec"


def test_the_suite_is_large():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, model, small_store, tmp_path):
    env = Env(tmp_path, model, small_store)
    if case.setup:
        case.setup(env)
    store_before = fingerprint(small_store.path)
    before = fingerprint(tmp_path)
    if case.exc is None:
        with pytest.warns(case.warns) as record:
            case.act(env)
        msg = " ".join(str(w.message) for w in record)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(case.exc) as info:
                case.act(env)
        msg = str(info.value)
    for word in case.words:
        assert word.lower() in msg.lower(), f"{word!r} missing from the message: {msg}"
    assert fingerprint(tmp_path) == before, "the call changed files on disk"
    assert fingerprint(small_store.path) == store_before


def test_damaged_store_is_repaired_on_request(model, small_store, tmp_path):
    """The fix the corrupt-store errors point to works: repair=True re-harvests the same data."""
    env = Env(tmp_path, model, small_store)
    path = env.store_copy()
    _truncate(path / "acts.npy", 5000)
    s = small_store.spec
    kw = dict(n_tokens=s.n_tokens, eval_tokens=small_store.eval_windows * s.per_window)
    repaired = env.harvest(path=path, repair=True, **kw)
    np.testing.assert_array_equal(np.asarray(repaired.acts), np.asarray(small_store.acts))
    assert not (tmp_path / "store.partial").exists()


def test_a_store_with_nan_is_repaired_on_request(model, small_store, tmp_path):
    env = Env(tmp_path, model, small_store)
    path = _nan_store(env)
    with pytest.raises(StoreCorruptError, match="NaN/Inf in .*acts.npy"):
        ActivationStore(path).verify()
    s = small_store.spec
    repaired = env.harvest(path=path, repair=True, n_tokens=s.n_tokens,
                           eval_tokens=small_store.eval_windows * s.per_window)
    repaired.verify()
    np.testing.assert_array_equal(np.asarray(repaired.acts), np.asarray(small_store.acts))


def test_harvest_reuses_an_empty_folder_and_a_finished_store(model, tmp_path):
    (tmp_path / "s").mkdir()
    a = harvest(model, HOOK, n_tokens=124, ctx_len=64, path=tmp_path / "s", progress=False)
    b = harvest(model, HOOK, n_tokens=124, ctx_len=64, path=tmp_path / "s", progress=False)
    np.testing.assert_array_equal(np.asarray(a.acts), np.asarray(b.acts))


def test_evaluate_at_another_hook_runs_when_forced(small_store):
    sae = topk_sae(576, 1152, 8, seed=0)
    sae.cfg.hook_name = "blocks.3.hook_resid_post"
    out = sae_kit.evaluate(sae, small_store, force=True)
    assert np.isfinite(out["fvu"])


def test_training_stamps_where_the_sae_came_from(small_store, tmp_path):
    sae = topk_sae(576, 1152, 8, seed=0)
    sae_kit.train(sae, small_store, batch_size=256, max_steps=2, progress=False)
    assert (sae.cfg.hook_name, sae.cfg.model_name, sae.cfg.store_key, sae.cfg.scale) == (
        small_store.spec.hook, small_store.spec.model, small_store.spec.key(), "ci")
    loaded = load_sae(sae.save(tmp_path / "sae"))
    assert loaded.cfg.hook_name == HOOK and loaded.cfg.store_key == small_store.spec.key()
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == HOOK  # SAELens reads these two
    assert cfg["metadata"]["model_name"] == small_store.spec.model


def test_save_replaces_an_earlier_sae_and_cleans_debris(tmp_path):
    path = topk_sae(576, 1152, 8, seed=0).save(tmp_path / "sae")
    # what a save killed by SIGKILL leaves behind (pid 999999999 does not exist), and a user's backup
    from sae_kit.fsutil import _HOST

    shutil.copytree(path, tmp_path / f"sae.sae-kit-tmp-{_HOST}-999999999")
    shutil.copytree(path, tmp_path / f"sae.sae-kit-old-{_HOST}-999999999")
    shutil.copytree(path, tmp_path / "sae.old2024")  # the user's own backup: not the kit's to delete
    shutil.copytree(path, tmp_path / "sae.sae-kit-tmp-otherhost-999999999")  # another host's: left alone
    sae2 = topk_sae(576, 1152, 8, seed=1)
    sae2.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae", "sae.old2024", "sae.sae-kit-tmp-otherhost-999999999"]
    assert torch.equal(load_sae(path).W_dec, sae2.W_dec)


def test_a_harvest_killed_before_its_last_rename_is_not_redone(model, tmp_path, monkeypatch):
    from sae_kit import activations

    kw = dict(n_tokens=620, ctx_len=64, eval_tokens=124, progress=False)
    done = harvest(model, HOOK, path=tmp_path / "s", **kw)
    before = np.asarray(done.acts).copy()
    (tmp_path / "s").rename(tmp_path / "s.partial")  # finished, progress.json gone, not yet renamed
    monkeypatch.setattr(activations, "_forward", lambda *a, **k: pytest.fail("re-harvested a finished store"))
    again = harvest(model, HOOK, path=tmp_path / "s", **kw)
    np.testing.assert_array_equal(np.asarray(again.acts), before)
    assert not (tmp_path / "s.partial").exists()


def test_the_same_eval_split_is_required(model, small_store):
    s = small_store.spec
    with pytest.raises(sae_kit.StoreMismatchError, match="eval windows"):
        harvest(model, HOOK, n_tokens=s.n_tokens, eval_tokens=(small_store.eval_windows - 1) * s.per_window,
                path=small_store.path, progress=False)


def test_rerunning_an_interrupted_training_resumes_the_same_object(tmp_path):
    x = torch.randn(3000, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(batch_size=100, epochs=2, checkpoint=tmp_path / "run.ckpt", checkpoint_every=5, progress=False)
    sae = topk_sae(16, 64, 4, seed=0, dead_tokens=300)
    real, calls = sae.loss, [0]

    def loss(*a, **k):
        calls[0] += 1
        if calls[0] == 23:
            raise KeyboardInterrupt  # the user stops the cell
        return real(*a, **k)

    sae.loss = loss
    with pytest.raises(KeyboardInterrupt):
        sae_kit.train(sae, x, **kw)
    del sae.loss  # the cell runs again with the same, partly trained object
    hist = sae_kit.train(sae, x, **kw)
    fresh = topk_sae(16, 64, 4, seed=0, dead_tokens=300)
    ref = sae_kit.train(fresh, x, **{**kw, "checkpoint": tmp_path / "other.ckpt"})
    assert hist.fvu == ref.fvu and hist.step == list(range(60))
    assert torch.equal(sae.W_dec, fresh.W_dec) and torch.equal(sae.W_enc, fresh.W_enc)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_agrees_with_isfinite_everywhere(dtype):
    from sae_kit.validate import all_finite

    big = torch.finfo(dtype).max
    x = torch.randn(37, 11).to(dtype)
    assert all_finite(x) and all_finite(x.t()) and all_finite(torch.full((3, 2), big, dtype=dtype))
    assert all_finite(torch.empty(0, 11, dtype=dtype))  # as isfinite(...).all() on an empty tensor
    for bad in (float("nan"), float("inf"), -float("inf")):
        for pos in ((0, 0), (36, 10), (17, 4)):
            y = x.clone()
            y[pos] = bad
            assert not all_finite(y) and not all_finite(y.t()), (bad, pos)
    y = x.clone()
    y[3, 3], y[9, 9] = float("inf"), -float("inf")  # both ends at once
    assert not all_finite(y)


def test_all_finite_falls_back_where_aminmax_is_missing(monkeypatch):
    from sae_kit.validate import all_finite

    def missing(*a, **k):
        raise NotImplementedError("aminmax is not implemented for this device")

    monkeypatch.setattr(torch, "aminmax", missing)
    assert all_finite(torch.ones(3, 2)) and not all_finite(torch.tensor([[1.0, float("nan")]]))


@pytest.mark.parametrize("metric", ["reconstruction_metrics", "latent_density"])
def test_metrics_on_no_tokens_say_so(metric):
    """An empty activation tensor (an empty eval split) is a clear ValueError, not torch.cat's error."""
    from sae_kit import metrics

    sae = sae_kit.topk_sae(8, 32, 4)
    with pytest.raises(ValueError, match="no tokens to evaluate"):
        getattr(metrics, metric)(sae, torch.zeros(0, 8))
