import json

import numpy as np
import pytest
import torch

import sae_kit
from sae_kit.activations import ActivationStore, StoreMismatchError, harvest, validate_hook


def test_unknown_hook_lists_the_layer_range(model):
    with pytest.raises(ValueError, match=r"30 layers \(0-29\)"):
        validate_hook(model, "blocks.40.hook_resid_post")
    with pytest.raises(ValueError, match="hook_resid_post"):
        validate_hook(model, "blocks.3.hook_nonsense")


def test_store_holds_real_activations_with_splits(small_store, model):
    s = small_store
    assert s.d_in == 576 and len(s) == s.spec.n_windows * 62
    x = s.get("eval")
    assert x.shape == (len(s.token_range("eval")), 576) and torch.isfinite(x).all()
    # the stored activation equals a fresh forward pass at the same window and position
    w = s.window_range("eval").start
    _, cache = model.run_with_cache(s.tokens[w:w + 1].long(), names_filter=s.spec.hook, stop_at_layer=9)
    fresh = cache[s.spec.hook][0, 1:63]
    assert torch.allclose(x[:62], fresh, rtol=2e-3, atol=2e-3)  # fp16 storage
    # token_ids lines up with get(): the first eval token is position 1 of the first eval window
    ids = s.token_ids("eval")
    assert len(ids) == len(x) and ids[:62].tolist() == s.tokens[w, 1:63].tolist()


def test_stores_join_documents_without_endoftext(small_store, model):
    """No mid-window <|endoftext|>: it is a massive activation that would dominate the variance."""
    eot = model.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert small_store.spec.separator == "\n\n" and not bool((small_store.tokens == eot).any())
    sep = model.tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    assert bool(torch.isin(small_store.tokens, torch.tensor(sep, dtype=small_store.tokens.dtype)).any())


def test_batches_cover_the_train_split_once_per_epoch(small_store):
    n_train = len(small_store.token_range("train"))
    assert n_train % 93 == 0  # 30 windows x 62 tokens: batches of 93 tile it exactly
    xs = list(small_store.batches(93, "train", epochs=1, seed=0, chunk_tokens=500))
    assert len(xs) == n_train // 93
    seen = torch.cat(xs)
    full = small_store.get("train")
    key = lambda t: t[torch.argsort(t[:, 0] * 1e4 + t[:, 1])]
    assert torch.equal(key(seen), key(full))  # every token exactly once, order shuffled
    assert not torch.equal(seen, full)


def test_device_resident_batches_equal_the_chunked_reads(small_store, monkeypatch):
    """On a GPU a split is moved there once and batches are gathered there; they must be the very
    batches (same tokens, same order) that the chunked memmap reads give. Checked on the CPU by
    letting the resident path serve the CPU too."""
    import sae_kit.activations as acts

    kw = dict(batch_size=93, split="train", epochs=2, seed=3, chunk_tokens=500, device="cpu")
    chunked = list(small_store.batches(**kw))
    monkeypatch.setattr(acts, "_RESIDENT_DEVICES", ("cuda", "cpu"))
    fresh = ActivationStore(small_store.path)
    resident = list(fresh.batches(**kw))
    assert fresh.__dict__.get("_on_device")  # the resident path did serve these
    assert len(resident) == len(chunked) and all(torch.equal(a, b) for a, b in zip(resident, chunked))


def test_store_for_another_model_or_hook_is_refused(small_store):
    with pytest.raises(StoreMismatchError, match="hook"):
        ActivationStore(small_store.path, expect={"hook": "blocks.3.hook_resid_post"})
    with pytest.raises(StoreMismatchError, match="d_in"):
        ActivationStore(small_store.path, expect={"d_in": 768})
    with pytest.raises(StoreMismatchError, match="model"):
        ActivationStore(small_store.path, expect={"model": "gpt2"})


def test_interrupted_harvest_leaves_no_store_and_resumes_to_identical_data(model, tmp_path):
    kw = dict(n_tokens=620, ctx_len=64, eval_tokens=124, progress=False, batch_windows=4)
    with pytest.raises(KeyboardInterrupt):
        harvest(model, "blocks.2.hook_resid_post", path=tmp_path / "a", _stop_after=4, **kw)
    assert not (tmp_path / "a").exists()  # never a half-written store under the final name
    with pytest.raises(FileNotFoundError, match="resume"):
        ActivationStore(tmp_path / "a")
    progress = json.loads((tmp_path / "a.partial" / "progress.json").read_text())
    assert progress["windows_done"] == 4
    resumed = harvest(model, "blocks.2.hook_resid_post", path=tmp_path / "a", **kw)
    fresh = harvest(model, "blocks.2.hook_resid_post", path=tmp_path / "b", **kw)
    assert not (tmp_path / "a.partial").exists()
    np.testing.assert_array_equal(np.asarray(resumed.acts), np.asarray(fresh.acts))


def test_harvest_with_gradients_matches_autograd(model, tmp_path):
    s = harvest(model, "blocks.8.hook_resid_post", n_tokens=62, ctx_len=64, with_grads=True,
                dtype="float32", path=tmp_path / "g", progress=False)
    x, g = s.get("train", grads=True)
    toks = s.tokens[:1].long()
    holder = {}

    def grab(a, hook):
        a = a.detach().requires_grad_(True)
        holder["a"] = a
        return a

    with torch.enable_grad():
        logits = model.run_with_hooks(toks, fwd_hooks=[("blocks.8.hook_resid_post", grab)])
        ce = torch.nn.functional.cross_entropy(logits[0, :-1], toks[0, 1:], reduction="sum")
        ce.backward()
    ref = holder["a"].grad[0, 1:63]
    assert torch.allclose(g, ref, rtol=1e-3, atol=1e-6 * float(ref.abs().max()))
    assert float(g.norm()) > 0


def test_nan_activations_are_refused_in_training(small_store):
    x = small_store.get("train")[:600].clone()
    x[5, 3] = float("nan")
    sae = sae_kit.topk_sae(576, 1152, 8)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        sae_kit.train(sae, x, batch_size=200, progress=False, init_b_dec=False)


def test_nan_from_a_broken_model_is_refused_at_harvest(model, tmp_path):
    w = model.blocks[1].mlp.W_out
    saved = w.detach().clone()
    try:
        with torch.no_grad():
            w[0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match="NaN/Inf in activations"):
            harvest(model, "blocks.2.hook_resid_post", n_tokens=124, ctx_len=64, path=tmp_path / "n",
                    progress=False)
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert not (tmp_path / "n").exists()
