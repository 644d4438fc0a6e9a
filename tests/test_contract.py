"""The dictionary contract, checked for every registered dictionary: shapes, budgets, modes,
gradient flow, save/load round trip and SAELens's reading of the saved files.

A new dictionary file under ``sae_kit/saes/`` is covered here as soon as its class is defined.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import sae_kit
from sae_kit.saes import REGISTRY, SAE, load_sae

D_IN, D_SAE, B = 16, 64, 96


def build(cls, **over) -> SAE:
    cfg = cls.config_class(d_in=D_IN, d_sae=D_SAE, **over)
    if hasattr(cfg, "k"):  # a small budget so batch rules and pursuits have room
        cfg = dataclasses.replace(cfg, k=4)
    return cls(cfg, seed=0)


def trained(cls, rng) -> tuple[SAE, torch.Tensor, torch.Tensor]:
    x = torch.randn(1024, D_IN, generator=rng) @ torch.randn(D_IN, D_IN, generator=rng)
    g = torch.randn(1024, D_IN, generator=rng)
    sae = build(cls)
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for i in range(0, 1024, B):  # a few real steps: thresholds, densities and clocks get set
        out = sae.loss(x[i:i + B], g[i:i + B])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    sae.eval()
    return sae, x[:B], g[:B]


CLASSES = sorted(REGISTRY.values(), key=lambda c: c.__name__)


def test_every_dictionary_file_is_registered():
    names = {c.__name__ for c in CLASSES}
    assert {"TopKSAE", "MutualChoiceSAE", "FeatureChoiceSAE", "GradientSAE", "MatchingPursuitSAE", "ReluSAE",
            "BatchTopKSAE"} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_declarations(cls):
    assert issubclass(cls, SAE) and cls.architecture and cls.modes
    assert dataclasses.is_dataclass(cls.config_class)
    assert cls.grad_modes <= set(cls.modes)
    assert (cls.budget is None) == ("k" not in {f.name for f in dataclasses.fields(cls.config_class)})


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_shapes_modes_and_budget(cls, rng):
    sae, x, g = trained(cls, rng)
    for mode in sae.modes:
        with sae.using(mode):
            gm = g if mode in sae.grad_modes else None
            z = sae.encode(x, gm)
            x_hat, z2 = sae(x, gm)
            assert z.shape == (B, D_SAE) and x_hat.shape == (B, D_IN) and torch.equal(z, z2)
            assert torch.allclose(sae.decode(z), x_hat, atol=1e-5)
            assert torch.allclose(sae.reconstruct(x, gm), x_hat, atol=1e-5)
            assert bool((z >= 0).all())
        assert sae.mode == sae.modes[0]
    with pytest.raises(ValueError, match="inference modes"):
        sae.mode = "no-such-mode"
    if cls.budget is None:
        with pytest.raises(ValueError, match="no sparsity budget"):
            sae.encode(x, k=2)
    else:
        mode = "batch" if "batch" in sae.modes else sae.modes[0]
        with sae.using(mode):
            z1 = sae.encode(x, g if mode in sae.grad_modes else None, k=1)
        assert float((z1 > 0).sum(1).float().mean()) <= 1 + 1e-6  # a budget of one latent per token on average


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_gradients_flow_and_the_callers_config_is_untouched(cls, rng):
    cfg = cls.config_class(d_in=D_IN, d_sae=D_SAE)
    before = dataclasses.asdict(cfg)
    sae = cls(cfg)
    assert dataclasses.asdict(cfg) == before and sae.cfg is not cfg
    sae.train()
    x = torch.randn(B, D_IN, generator=rng)
    out = sae.loss(x, torch.randn(B, D_IN, generator=rng))
    assert {"loss", "fvu", "l0", "aux", "dead"} <= set(out)
    out["loss"].backward()
    assert sae.W_dec.grad is not None and torch.isfinite(sae.W_dec.grad).all() and sae.W_dec.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_save_load_and_sae_lens_read_the_same_dictionary(cls, rng, tmp_path):
    sae, x, g = trained(cls, rng)
    path = sae.save(tmp_path / cls.__name__)
    again = load_sae(path)
    assert type(again) is cls and again.cfg == sae.cfg
    for name, t in sae.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    assert torch.equal(again.encode(x), sae.encode(x))
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(path), device="cpu")
    with torch.no_grad():  # SAELens's inference = the default mode's (a g-SAE reads as plain TopK)
        ours = sae.reconstruct(x)
        assert torch.allclose(theirs.decode(theirs.encode(x)), ours, atol=1e-3 * float(ours.abs().max()))


def test_a_config_saved_by_an_earlier_version_loads(tmp_path, rng):
    """SAEs saved before configs were typed carry one config with an ``extra`` dict and ``architecture``."""
    import json

    sae = sae_kit.choice_sae("fc", D_IN, D_SAE, 4, capacity="zipf", zipf_alpha=1.3)
    path = sae.save(tmp_path / "old")
    cfg = json.loads((path / "cfg.json").read_text())
    kit = cfg["metadata"]["sae_kit"]["cfg"]
    old = {n: kit.pop(n) for n in ("capacity", "zipf_alpha", "zipf_b", "aux", "tau", "ema", "density_decay")}
    kit.pop("store_key")
    kit.update(architecture="fc", extra=old)
    (path / "cfg.json").write_text(json.dumps(cfg))
    again = load_sae(path)
    assert again.cfg.capacity == "zipf" and again.cfg.zipf_alpha == 1.3 and type(again).__name__ == "FeatureChoiceSAE"


def test_a_dictionary_refuses_another_methods_config():
    with pytest.raises(TypeError, match="needs a TopKConfig"):
        sae_kit.TopKSAE(sae_kit.saes.ChoiceConfig(d_in=4, d_sae=8, k=2))


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_folding_an_input_scale_is_exact(cls, rng):
    """An SAE trained on s·x, folded, reads x and returns (its output on s·x) / s, in every mode."""
    sae, x, g = trained(cls, rng)
    s = 0.37
    if not sae.folds_input_scale:
        with pytest.raises(ValueError, match="cannot fold"):
            sae.fold_input_scale(s)
        return
    before, W_dec = {}, sae.W_dec.detach().clone()
    with torch.no_grad():
        for mode in sae.modes:
            with sae.using(mode):  # a gradient mode gets the gradient w.r.t. s·x, g / s
                before[mode] = sae.reconstruct(s * x, g / s if mode in sae.grad_modes else None) / s
        sae.fold_input_scale(s)
        assert sae.cfg.activation_scale == pytest.approx(s)
        for mode in sae.modes:
            with sae.using(mode):
                after = sae.reconstruct(x, g if mode in sae.grad_modes else None)
                assert torch.allclose(after, before[mode], atol=1e-4 * float(after.abs().max())), mode
    assert torch.equal(sae.W_dec, W_dec)  # the atoms are untouched (unit norm stays unit norm)


def test_matching_pursuit_with_a_residual_threshold_folds_exactly(rng):
    sae = sae_kit.mp_sae(D_IN, D_SAE, 6, residual_threshold=3.0)
    x = 4 * torch.randn(256, D_IN, generator=rng)
    s = 0.25
    with torch.no_grad():
        before = sae.reconstruct(s * x) / s
        sae.fold_input_scale(s)
        assert torch.allclose(sae.reconstruct(x), before, atol=1e-4 * float(before.abs().max()))
    assert sae.cfg.residual_threshold == pytest.approx(12.0)


def test_a_loaded_sae_keeps_its_init_seed(tmp_path):
    sae = sae_kit.choice_sae("fc", D_IN, D_SAE, 4, capacity="zipf", seed=3)
    again = load_sae(sae.save(tmp_path / "seeded"))
    assert again.init_seed == 3 and torch.equal(again.start_density(), sae.start_density())


def test_training_with_expected_average_normalisation(rng, tmp_path):
    x = 40.0 * (torch.randn(2048, D_IN, generator=rng) @ torch.randn(D_IN, D_IN, generator=rng))
    sae = sae_kit.topk_sae(D_IN, D_SAE, 4)
    sae_kit.train(sae, x, batch_size=256, epochs=2, normalize="expected_average", progress=False)
    s = D_IN ** 0.5 / float(x[:8192].norm(dim=1).mean())
    assert sae.cfg.activation_scale == pytest.approx(s, rel=1e-5)
    assert sae_kit.reconstruction_metrics(sae, x)["fvu"] < 0.9  # folded: it reads raw x
    again = load_sae(sae.save(tmp_path / "normed"))
    assert again.cfg.activation_scale == pytest.approx(s, rel=1e-5)
    with pytest.raises(ValueError, match="normalize must be"):
        sae_kit.train(sae_kit.topk_sae(D_IN, D_SAE, 4), x, batch_size=256, normalize="layer")
