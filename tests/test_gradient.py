import pytest
import torch

import sae_kit
from sae_kit.saes import gradient_sae, topk_sae
from sae_kit.steering import alive_latents, steering_effects


@pytest.fixture(scope="module")
def grad_store(model, tmp_path_factory):
    """A real store with ∂CE/∂x: 10 windows of layer-8 residuals (~5 s to harvest)."""
    return sae_kit.harvest(model, "blocks.8.hook_resid_post", n_tokens=620, eval_tokens=124, ctx_len=64,
                           with_grads=True, dtype="float32", path=tmp_path_factory.mktemp("g") / "s", progress=False)


def test_selection_prefers_latents_that_matter_downstream_but_keeps_plain_values():
    sae = gradient_sae(2, 3, k=1, beta=1.0)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
        sae.W_enc.zero_()
        sae.b_dec.zero_()
        sae.b_enc.copy_(torch.tensor([1.0, 0.9, 0.1]))  # z = (1.0, 0.9, 0.1) for any x = 0
    x = torch.zeros(1, 2)
    g = torch.tensor([[0.0, 3.0]])  # only latent 1's direction moves the loss
    with sae.using("gradient"):
        z = sae.encode(x, g)
    assert torch.nonzero(z[0]).flatten().tolist() == [1] and float(z[0, 1].detach()) == pytest.approx(0.9)
    assert sae.mode == "topk"
    assert torch.nonzero(sae.encode(x, g)[0]).flatten().tolist() == [0]  # plain TopK ignores g


def _two_token_sae(normalise, beta=1.0):
    """Atoms e0, e1, e0 (unit norm) with z = (1.0, 0.9, 0.1) for x = 0: hand-checkable scores."""
    sae = gradient_sae(2, 3, k=1, beta=beta, normalise=normalise)
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]))
        sae.W_enc.zero_()
        sae.b_dec.zero_()
        sae.b_enc.copy_(torch.tensor([1.0, 0.9, 0.1]))
    return sae


# two tokens with the same gradient direction (e1) but sizes 3 and 0.03: |W_dec g| = (0, 3, 0), (0, .03, 0)
G = torch.tensor([[0.0, 3.0], [0.0, 0.03]])
Z = torch.tensor([[1.0, 0.9, 0.1], [1.0, 0.9, 0.1]])


@pytest.mark.parametrize("normalise,factor", [
    ("token", [[0.0, 3.0, 0.0], [0.0, 3.0, 0.0]]),  # each row divided by its own mean (1 and 0.01)
    ("batch", [[0.0, 3 / 0.505, 0.0], [0.0, 0.03 / 0.505, 0.0]]),  # divided by the batch mean, 3.03 / 6 = 0.505
    ("raw", [[0.0, 3.0, 0.0], [0.0, 0.03, 0.0]]),  # as it is
])
def test_each_normalisation_scales_the_gradient_term_as_documented(normalise, factor):
    sae = _two_token_sae(normalise)
    a = sae.gradient_factor(G)
    assert torch.allclose(a, torch.tensor(factor), rtol=1e-5, atol=1e-7)
    assert torch.allclose(sae.selection_score(Z, G), Z * (1 + a))  # β = 1


@pytest.mark.parametrize("normalise,kept", [
    ("token", [1, 1]),  # both tokens get the full push: the tiny gradient counts as much as the large one
    ("batch", [1, 0]),  # the small-gradient token keeps its plain top-1: 0.9·(1 + 0.0594) < 1.0
    ("raw", [1, 0]),  # 0.9·(1 + 0.03) < 1.0
])
def test_per_token_normalisation_gives_a_small_gradient_the_same_pull(normalise, kept):
    sae = _two_token_sae(normalise)
    with sae.using("gradient"):
        z = sae.encode(torch.zeros(2, 2), G)
    assert z.argmax(1).tolist() == kept
    assert torch.allclose(z.max(1).values, torch.tensor([0.9 if i == 1 else 1.0 for i in kept]))  # plain values


def test_normalisation_is_saved_with_the_config_and_checked(tmp_path):
    sae = gradient_sae(8, 32, 4, beta=0.2, normalise="batch", seed=1)
    again = sae_kit.load_sae(sae.save(tmp_path / "g"))
    assert again.cfg.normalise == "batch" and again.cfg.beta == 0.2
    x, g = torch.randn(6, 8), torch.randn(6, 8)
    with sae.using("gradient"), again.using("gradient"):
        assert torch.equal(again.encode(x, g), sae.encode(x, g))
    assert gradient_sae(8, 32, 4).cfg.normalise == "token"  # the default: the kit's spec (docs/methods.md §3.1)
    with pytest.raises(ValueError, match="normalise must be one of"):
        gradient_sae(8, 32, 4, normalise="layer")


def test_only_the_scale_free_normalisations_can_fold_an_input_scale():
    g = torch.randn(5, 8, generator=torch.Generator().manual_seed(0))
    for norm in ("token", "batch", "raw"):
        sae = gradient_sae(8, 32, 4, normalise=norm)
        # training on 7·x sees g / 7; a ≈ 1 on average, and float32 rounding in |d_i·g| near
        # cancellation leaves ~1e-6 absolute differences, so compare at that scale
        same = torch.allclose(sae.gradient_factor(g / 7.0), sae.gradient_factor(g), rtol=1e-5, atol=1e-5)
        assert same == sae.folds_input_scale == (norm != "raw")


def test_a_saved_config_without_normalise_loads_with_the_default(tmp_path):
    import json

    path = gradient_sae(8, 32, 4, beta=2.0).save(tmp_path / "old")
    cfg = json.loads((path / "cfg.json").read_text())
    del cfg["metadata"]["sae_kit"]["cfg"]["normalise"]  # as written before the option existed
    (path / "cfg.json").write_text(json.dumps(cfg))
    assert sae_kit.load_sae(path).cfg.normalise == "token"


def test_beta_zero_is_topk_exactly(grad_store):
    a = topk_sae(576, 1152, 8, seed=4)
    b = gradient_sae(576, 1152, 8, beta=0.0, seed=4)
    sae_kit.train(a, grad_store, batch_size=62, seed=1, progress=False)
    sae_kit.train(b, grad_store, batch_size=62, seed=1, grads=True, progress=False)
    assert torch.equal(a.W_dec, b.W_dec) and torch.equal(a.W_enc, b.W_enc)


def test_gradients_change_what_a_trained_gsae_keeps(grad_store):
    sae = gradient_sae(576, 1152, 8, beta=4.0, seed=0)
    hist = sae_kit.train(sae, grad_store, batch_size=62, grads=True, progress=False)
    assert hist.fvu[-1] < hist.fvu[0]
    x, g = grad_store.get("eval", grads=True)
    with sae.using("gradient"):
        z_g = sae.encode(x, g)
    z_t = sae.encode(x)
    assert ((z_g > 0) != (z_t > 0)).any()
    assert (z_g > 0).sum(1).max() <= 8


def test_training_a_gsae_without_gradients_is_a_clear_error(small_store):
    sae = gradient_sae(576, 1152, 8)
    with pytest.raises(ValueError, match="with_grads=True"):
        sae_kit.train(sae, small_store, batch_size=62, progress=False, max_steps=1)


def test_gsae_round_trips_and_reads_as_topk(tmp_path):
    sae = gradient_sae(8, 32, 4, beta=2.0, seed=1)
    again = sae_kit.load_sae(sae.save(tmp_path / "g"))
    assert type(again).__name__ == "GradientSAE" and again.cfg.beta == 2.0
    x = torch.randn(5, 8)
    assert torch.equal(again.encode(x), sae.encode(x))


def test_splice_with_gradient_selection(model, grad_store):
    sae = gradient_sae(576, 1152, 8, beta=4.0, seed=0)
    sae_kit.train(sae, grad_store, batch_size=62, grads=True, progress=False)
    splicer = sae_kit.Splicer(model, grad_store, n_seqs=2, progress=False)
    _, g = grad_store.get("eval", grads=True)
    with sae.using("gradient"):
        with_g = splicer(sae, g=g)
    plain = splicer(sae)
    assert with_g["ce_spliced"] != plain["ce_spliced"]
    with pytest.raises(ValueError, match="rows"):
        splicer(sae, g=g[:10])


def test_steering_effect_is_zero_at_zero_push_and_grows_with_it(model, small_store):
    sae = topk_sae(576, 1152, 8, seed=0)
    splicer = sae_kit.Splicer(model, small_store, n_seqs=2, progress=False)
    kl = [float(steering_effects(splicer, sae, [3], alpha, progress=False)[0]) for alpha in (0.0, 20.0, 80.0)]
    assert kl[0] == pytest.approx(0.0, abs=1e-5) and 0 < kl[1] < kl[2]
    dens = torch.tensor([0.0, 0.5, 0.2, 0.0, 0.01])
    assert sorted(alive_latents(dens, 10)) == [1, 2, 4]


def test_evaluate_gives_the_gradients_to_the_splice_in_gradient_mode(model, grad_store):
    sae = gradient_sae(576, 1152, 8, beta=4.0, seed=0)
    sae_kit.train(sae, grad_store, batch_size=62, grads=True, progress=False)
    with sae.using("gradient"):
        out = sae_kit.evaluate(sae, grad_store, model, n_seqs=2, grads=True, progress=False)
    plain = sae_kit.evaluate(sae, grad_store, model, n_seqs=2, progress=False)
    assert out["ce_spliced"] != plain["ce_spliced"] and out["fvu"] != plain["fvu"]
