import json

import pytest
import torch

from sae_kit import metrics, splice
from sae_kit.claims import Claims


def test_fvu_and_nmse_on_hand_checkable_numbers():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0]])  # mean (2, 0); total variance 2
    x_hat = torch.tensor([[2.0, 0.0], [2.0, 0.0]])  # errors 1 and 1
    assert metrics.fvu(x, x_hat) == pytest.approx(1.0)
    assert metrics.nmse(x, x_hat) == pytest.approx((1 / 1 + 1 / 9) / 2)
    assert metrics.fvu(x, x) == 0.0


def test_l0_density_dead_dense():
    z = torch.tensor([[1.0, 0.0, 0.0, 2.0], [0.5, 0.0, 0.0, 0.0], [0.2, 0.0, 0.0, 0.0]])
    assert metrics.l0(z) == pytest.approx(4 / 3)
    d = metrics.feature_density(z)
    assert d.tolist() == pytest.approx([1.0, 0.0, 0.0, 1 / 3])
    assert metrics.dead_fraction(d) == 0.5
    assert metrics.dense_fraction(d, 0.5) == 0.25


def test_splice_identity_costs_nothing_and_zero_costs_a_lot(model, small_store):
    out = splice.splice_metrics(model, small_store, replace=lambda a: a, n_seqs=4, progress=False)
    assert out["delta_ce"] == pytest.approx(0.0, abs=1e-4) and out["kl"] == pytest.approx(0.0, abs=1e-4)
    assert out["ce_zero"] > out["ce_clean"] + 1.0
    assert out["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert out["ce_clean"] < out["ce_mean_ablated"] < out["ce_zero"]  # mean ablation: gentler than zero
    assert out["ce_recovered_mean"] == pytest.approx(1.0, abs=1e-4)
    noisy = splice.splice_metrics(model, small_store, replace=lambda a: a + 30 * torch.randn_like(a),
                                   n_seqs=4, progress=False)
    assert noisy["delta_ce"] > 0.05 and noisy["kl"] > 0.05


def test_kl_terms_are_the_plain_expression_bit_for_bit():
    """`splice._kl_terms` works in the spliced log-probabilities' own storage and gives exactly
    ``lp_clean.exp() * (lp_clean - lp)`` (the clean ones stored in half precision, as `Splicer` keeps them)."""
    gen = torch.Generator().manual_seed(0)
    lp = torch.log_softmax(3 * torch.randn(2, 5, 1000, generator=gen), -1)
    logp_clean = torch.log_softmax(3 * torch.randn(2, 5, 1000, generator=gen), -1).half()
    lp_clean = logp_clean.float()
    plain = lp_clean.exp() * (lp_clean - lp)
    out = splice._kl_terms(logp_clean, lp)
    assert out.data_ptr() == lp.data_ptr() and torch.equal(out, plain)
    assert torch.equal(out.sum(), plain.sum())


def test_splice_kl_per_window_agrees_with_the_call(model, small_store):
    """KL and CE from `Splicer.__call__` and `Splicer.per_window` (both through `_kl_terms`) agree,
    and match KL(clean ‖ spliced) recomputed here from the model's own logits."""
    s = splice.Splicer(model, small_store, n_seqs=4, progress=False)
    noise = lambda a: a + 5 * torch.sin(torch.arange(a.numel(), dtype=a.dtype).reshape(a.shape))
    out, per = s(replace=noise), s.per_window(noise)
    assert float(per["kl"].mean()) == pytest.approx(out["kl"], rel=1e-6)  # (float32 sums in another order)
    assert float(per["ce"].mean()) == pytest.approx(out["ce_spliced"], rel=1e-6)
    lp = s._run(s.resid[0], noise)
    lp_clean = s.logp_clean[0].float()
    expect = (lp_clean.exp() * (lp_clean - lp)).sum(-1).double().mean(1)
    assert torch.equal(torch.as_tensor(per["kl"][:len(expect)]), expect)


def test_claims_render_and_round_trip(tmp_path):
    c = Claims("99_test", scale="ci")
    c.add("a | b", "paper", "measured", True)
    c.add("undecided", "p", "m", None, "too small")
    assert "**held**" in c.to_markdown() and "a \\| b" in c.to_markdown()
    assert "not decided" in c._repr_html_()
    path = c.save(tmp_path)
    assert json.loads(path.read_text())["claims"][1]["held"] is None
    again = Claims.load(path)
    assert [x.verdict for x in again.items] == ["held", "not decided"]


def test_report_gathers_claims(tmp_path):
    from sae_kit.report import write_report

    Claims("00_x", scale="ci").save(tmp_path)
    report = write_report(tmp_path, {"00_x": 61.0}, "ci")
    text = report.read_text()
    assert "## 00_x (1.0 min)" in text
    Claims("01_y", scale="ci").save(tmp_path)
    run = {"seconds": 120.0, "date": "2026-11-30 03:00 UTC", "commit": "abc1234", "machine": "2 CPU cores"}
    text = write_report(tmp_path, {"01_y": run}, "ci").read_text()
    assert "## 01_y (2.0 min)" in text and "ran date 2026-11-30 03:00 UTC, commit abc1234, machine 2 CPU cores" in text


def test_a_run_record_says_whether_the_cache_was_cold(tmp_path, monkeypatch):
    """A notebook's time means little without knowing what it had to train: the record counts what
    the run added to the cache, ignoring locks and resume points."""
    from sae_kit.report import cache_contents, cache_state, write_report

    monkeypatch.setenv("SAE_KIT_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "saes" / "topk-k8-old").mkdir(parents=True)
    before = cache_contents()
    (tmp_path / "cache" / "saes" / "topk-k16-new").mkdir()
    (tmp_path / "cache" / "saes" / "topk-k32-new.ckpt").write_bytes(b"")
    (tmp_path / "cache" / "stores").mkdir()
    (tmp_path / "cache" / "stores" / "layer8").mkdir()
    (tmp_path / "cache" / "stores" / "layer8.lock").write_bytes(b"")
    state = cache_state(before, cache_contents())
    assert state == {"built": {"saes": 1, "stores": 1, "snmf": 0, "evals": 0},
                     "found": {"saes": 1, "stores": 0, "snmf": 0, "evals": 0}}
    assert cache_state(cache_contents(), cache_contents())["built"] == {"saes": 0, "stores": 0, "snmf": 0, "evals": 0}
    Claims("00_x", scale="ci").save(tmp_path / "out")
    run = {"seconds": 60.0, "cache": state}
    text = write_report(tmp_path / "out", {"00_x": run}, "ci").read_text()
    assert "built 1 SAE, 1 activation store (1 cache entries were there already)" in text
    run["cache"] = cache_state(before, before)
    assert "warm cache: nothing trained, harvested or evaluated afresh" in write_report(
        tmp_path / "out", {"00_x": run}, "ci").read_text()
    old = {"built": {"saes": 0, "stores": 0, "snmf": 0}, "found": {"saes": 3, "stores": 1, "snmf": 0}}
    assert "warm cache: nothing trained or harvested" in write_report(  # a record from before evaluations were cached
        tmp_path / "out", {"00_x": {**run, "cache": old}}, "ci").read_text()


def test_provenance_names_the_commit_and_machine():
    from sae_kit.report import provenance

    from sae_kit.config import cpu_name

    p = provenance()
    assert p["commit"] and "CPU cores" in p["machine"] and p["date"].endswith("UTC")
    assert cpu_name() in p["machine"] and cpu_name()  # the processor: results' last digits depend on it


def test_cached_splicer_matches_a_plain_full_forward(model, small_store):
    """The Splicer's shortcut (cached resid, start_at_layer) must equal splicing in a full forward pass."""
    noise = torch.randn(4, 62, 576, generator=torch.Generator().manual_seed(0)) * 20
    replace = lambda a: a + noise[: len(a)].to(a.dtype)
    ours = splice.Splicer(model, small_store, n_seqs=4, batch_seqs=4, progress=False)(replace=replace)
    spec = small_store.spec
    toks = small_store.tokens[list(small_store.window_range("eval"))][:4].long()
    def hook(act, hook):
        act = act.clone()
        act[:, 1:63] = replace(act[:, 1:63])
        return act
    with torch.no_grad():
        logits = model.run_with_hooks(toks, fwd_hooks=[(spec.hook, hook)])
        clean = model(toks)
    lp = torch.log_softmax(logits[:, 1:63], -1)
    ce = float(-lp.gather(-1, toks[:, 2:64, None]).mean())
    ce_clean = float(-torch.log_softmax(clean[:, 1:63], -1).gather(-1, toks[:, 2:64, None]).mean())
    assert ours["ce_spliced"] == pytest.approx(ce, abs=2e-3)
    assert ours["ce_clean"] == pytest.approx(ce_clean, abs=2e-3)


def test_delta_ce_from_logp_scores_what_the_splicer_scores(model, small_store):
    """The exercise's reference (whole-window log-probs) and the Splicer agree on ΔCE."""
    from sae_kit.splice import Splicer, _splice_hook, delta_ce_from_logp

    sp = Splicer(model, small_store, n_seqs=4, progress=False)
    fn = lambda a: a * 0.7  # noqa: E731
    out = sp(replace=fn)
    toks = sp.windows.to(model.cfg.device)
    with torch.no_grad():
        lp_clean = model(toks).float().log_softmax(-1)
        lp_spliced = model.run_with_hooks(toks, fwd_hooks=[(sp.spec.hook, _splice_hook(fn, sp.sl))]).float().log_softmax(-1)
    ours = delta_ce_from_logp(lp_clean, lp_spliced, toks, sp.spec.skip_first, sp.spec.skip_last)
    assert out["delta_ce"] > 0.01
    assert ours == pytest.approx(out["delta_ce"], abs=2e-3)


@pytest.mark.parametrize("make", ["topk", "mc_batch", "mp", "gsae"])
def test_streamed_metrics_equal_the_dense_latents(make):
    """`reconstruction_metrics` counts L0 and densities from the kept pairs batch by batch; the
    numbers must be those of the dense z of all tokens, bit for bit."""
    import contextlib

    from sae_kit.metrics import dead_fraction, dense_fraction, feature_density, forward_batched, fvu, l0, nmse
    from sae_kit.saes import choice_sae, gradient_sae, mp_sae, topk_sae

    torch.manual_seed(0)
    x = torch.randn(3000, 32) * 3
    x[:20] *= 30  # a few high-norm tokens, as at layer 8
    g = torch.randn_like(x) if make == "gsae" else None
    sae = {"topk": lambda: topk_sae(32, 256, 8, device="cpu"), "mc_batch": lambda: choice_sae("mc", 32, 256, 8, device="cpu"),
           "mp": lambda: mp_sae(32, 256, 8, device="cpu"), "gsae": lambda: gradient_sae(32, 256, 8, device="cpu")}[make]()
    mode = lambda: sae.using("batch") if make == "mc_batch" else contextlib.nullcontext()
    with mode():
        x_hat, z = forward_batched(sae, x, batch_size=700, g=g)
        new = metrics.reconstruction_metrics(sae, x, g, batch_size=700)
    dens = feature_density(z)
    assert torch.equal(new["density"], dens)
    with mode():  # the encoder-only density (what notebook 01 reads on its wider sample)
        assert torch.equal(metrics.latent_density(sae, x, g, batch_size=700), dens)
    assert (new["fvu"], new["nmse"], new["l0"], new["dead"], new["dense"]) == (
        fvu(x, x_hat), nmse(x, x_hat), l0(z), dead_fraction(dens), dense_fraction(dens))


def test_sparse_code_counts_merge_a_latent_kept_twice():
    from sae_kit.saes.base import SparseCode

    code = SparseCode(rows=torch.tensor([0, 0, 0, 1, 1, 2]), cols=torch.tensor([3, 3, 1, 2, 2, 0]),
                      vals=torch.tensor([0.5, 0.25, 0.0, 0.0, 0.0, 2.0]), shape=(4, 5))
    per_token, fired = code.counts()
    z = code.dense()
    assert per_token.tolist() == (z != 0).sum(1).tolist() == [1, 0, 1, 0]
    assert fired.tolist() == (z > 0).sum(0).tolist() == [1, 0, 0, 1, 0]
