"""The explorer's precompute, its HTML panels and its controls (the browser test is separate:
tests/test_explorer_browser.py)."""

from __future__ import annotations

import re

import pytest
import torch

import sae_kit
from sae_kit import explorer as ex
from sae_kit.metrics import forward_batched


@pytest.fixture(scope="module")
def trained(small_store):
    sae = sae_kit.topk_sae(576, 1152, 8, seed=0)
    sae_kit.train(sae, small_store, batch_size=256, progress=False)
    return sae


@pytest.fixture(scope="module")
def index(trained, small_store, model):
    return ex.build_index(trained, small_store, model)


def test_codes_by_latent_equal_the_dense_code(index, trained, small_store):
    _, z = forward_batched(trained, small_store.get("eval"))
    assert index.n_tokens == len(z)
    for j in torch.nonzero(index.density > 0).flatten()[:50].tolist():
        tok, act = index.examples(j)
        col = z[:, j]
        assert set(tok.tolist()) == set(torch.nonzero(col > 0).flatten().tolist())
        assert torch.allclose(act, col[tok.long()], atol=1e-5)
        assert bool((act[:-1] >= act[1:]).all())  # strongest first
        assert float(index.density[j]) == pytest.approx(float((col > 0).float().mean()))


def test_logit_lens_is_the_atoms_through_the_unembedding(index, trained, model):
    for j in (0, 17, 500):
        logits = trained.W_dec[j].detach() @ model.W_U
        assert index.logit_top[j].tolist() == logits.topk(10).indices.tolist()
        assert index.logit_bottom[j].tolist() == (-logits).topk(10).indices.tolist()
        assert torch.allclose(index.logit_top_val[j], logits.topk(10).values, atol=1e-4)


def test_mlp_atoms_go_through_w_out_and_other_hooks_have_no_lens(model):
    W = torch.randn(3, model.cfg.d_mlp)
    R = ex.atoms_to_residual(model, "blocks.3.mlp.hook_post", W)
    assert torch.allclose(R, W @ model.blocks[3].mlp.W_out, atol=1e-5)
    assert ex.atoms_to_residual(model, "blocks.3.attn.hook_z", torch.randn(2, 576)) is None


def test_neighbours_are_the_most_similar_other_atoms():
    W = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    ids, cos = ex.nearest_neighbours(W, n=2)
    assert ids[0].tolist() == [1, 2] and ids[3].tolist() == [2, 1]
    assert 0 not in ids[0].tolist()  # never itself


def test_quantile_samples_lie_in_their_bands(index):
    j = int(torch.argmax((index.ptr[1:] - index.ptr[:-1])))  # the busiest latent
    tok, act = index.examples(j)
    bands = index.quantile_samples(j, bands=4, per_band=3, seed=1)
    assert sum(b["count"] for b in bands) == len(tok)
    for b in bands:
        assert all(b["lo"] < a <= b["hi"] + 1e-6 for a in b["acts"])
        assert len(b["tokens"]) == min(3, b["count"])
    assert bands == index.quantile_samples(j, bands=4, per_band=3, seed=1)  # seeded


def test_shading_shows_the_latents_activation_on_each_token(index, model):
    j = int(torch.nonzero(index.density > 0).flatten()[0])
    tok, act = index.examples(j)
    acts = dict(zip(tok.tolist(), act.tolist()))
    html = ex.context_html(index, model.tokenizer, int(tok[0]), acts, float(act[0]), left=12, right=4)
    titles = re.findall(r"title='([^']+)'", html)
    ids, pos = index.window_of(int(tok[0]))
    first = max(0, pos - 12)
    w0 = int(tok[0]) // index.per_window * index.per_window
    for q, title in zip(range(first, pos + 5), titles):
        stored = 0 <= q - index.skip_first < index.per_window
        want = acts.get(w0 + q - index.skip_first, 0.0) if stored else None
        assert title == ("not stored" if want is None else f"{want:.2f}")
    assert f"{float(act[0]):.2f}" in titles and "border-bottom" in html  # the example's own token


def test_index_is_cached_on_disk_and_keyed_by_the_weights(trained, small_store, model, index):
    again = ex.build_index(trained, small_store, model)
    assert torch.equal(again.act, index.act) and torch.equal(again.logit_top, index.logit_top)
    other = sae_kit.topk_sae(576, 1152, 8, seed=1)
    assert ex._index_key(other, small_store, "eval", 10, 8) != ex._index_key(trained, small_store, "eval", 10, 8)


def test_card_renders_every_static_panel(index, model):
    j = int(torch.nonzero(index.density > 0).flatten()[0])
    html = ex.LatentCard(index, model.tokenizer, j)._repr_html_()
    for part in (f"latent {j}", "<svg", "top examples", "samples by activation", "promotes", "suppresses",
                 "nearest atoms", "sae-kit-tok"):
        assert part in html


def test_app_controls(trained, small_store, model, index):
    app = ex.Explorer(index, model, trained.W_dec.detach(),
                      lambda t: ex.activations_on_text(trained, model, index.hook, t), latent=3)
    assert "latent 3" in app.view.value
    app.latent.value = 7  # what typing a number does
    assert "latent 7" in app.view.value and len(app.near.children) == 8
    app.near.children[0].click()  # a neighbour button
    assert f"latent {index.neighbours[7, 0]}" in app.view.value
    app.band.value = (app.band.min, app.band.max)
    app.random.click()
    assert float(index.density[app.latent.value]) > 0
    j = app.latent.value
    top_word = model.tokenizer.decode([int(index.top_token_ids[j, 0])])
    assert j in app.search(top_word, limit=10_000)
    app.text.value = "import os\nimport sys"
    app.run_text.click()
    n_tok = len(model.to_tokens(app.text.value, prepend_bos=False)[0])
    assert app.text_out.value.count("class='sae-kit-tok'") == n_tok
    app.prompt.value, app.alpha.value = "The", 20.0
    app.steer_button.click()
    assert "clean" in app.steer_out.value and "steered" in app.steer_out.value
    assert all(ms < 1000 for ms in app.switch_ms[:3])
    bundle = app._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle and "sae-kit-card" in bundle["text/html"]


def test_bad_latent_is_a_clear_error(index):
    with pytest.raises(ValueError, match="latent must be in 0-1151"):
        index.examples(5000)


def test_snmf_features_are_explored_on_the_concept_sentences(model):
    from sae_kit import concepts, snmf

    cs = concepts.ConceptSet(["a", "b"], {"a": [], "b": []},
                             ["The cat sat on the mat.", "Rain fell all day long over the hills."], [0, 1])
    acts = concepts.concept_activations(model, cs, 6, progress=False)
    fit = snmf.fit_snmf(acts.A, 3, sparsity=0.1, max_iter=50, progress=False, seed=0)
    app = ex.explore_snmf(fit, acts, model)
    L = max(len(t) for t in acts.tokens)
    flat = (acts.sentence * (L - 1) + acts.position - 1).tolist()
    for j in range(3):
        tok, act = app.index.examples(j)
        want = {flat[r]: float(fit.G[r, j]) for r in range(len(flat)) if fit.G[r, j] > 0}
        assert dict(zip(tok.tolist(), act.tolist())) == pytest.approx(want)
        logits = fit.F[:, j].float() @ model.blocks[6].mlp.W_out @ model.W_U
        assert app.index.logit_top[j].tolist() == logits.topk(10).indices.tolist()
    app.text.value = "The dog ran"
    app.run_text.click()
    assert app.text_out.value.count("class='sae-kit-tok'") == len(model.to_tokens("The dog ran", prepend_bos=False)[0])
    assert "latent" in app.card(0)._repr_html_()
