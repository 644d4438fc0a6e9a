import math

import pandas as pd
import pytest
import torch

import sae_kit
from sae_kit import sweeps


def rows(label, pts, seed=0, mode="topk", default=True):
    return [{"label": label, "k": k, "l0": l0, "fvu": f, "seed": seed, "mode": mode, "default": default}
            for k, l0, f in pts]


def T(*parts):
    return pd.DataFrame([r for p in parts for r in p])


def test_matched_l0_gap_interpolates_the_reference_frontier_in_log_log():
    ref = rows("ref", [(8, 8.0, 0.4), (32, 32.0, 0.1)])  # FVU ∝ L0^-1 on log-log
    var = rows("var", [(16, 16.0, 0.1)])  # reference at L0 16 is 0.2
    assert sweeps.matched_l0_gap(T(ref, var), "var", "ref")[0] == pytest.approx(math.log(0.5))
    out = rows("out", [(64, 64.0, 0.05)])  # extrapolated reference: 0.05
    assert sweeps.matched_l0_gap(T(ref, out), "out", "ref")[0] == pytest.approx(0.0, abs=1e-9)


def test_points_outside_the_reference_range_are_flagged_in_the_verdict():
    ref = rows("ref", [(8, 8.0, 0.4), (32, 32.0, 0.1)]) + rows("ref", [(32, 32.0, 0.101)], seed=1)
    var = rows("var", [(4, 6.0, 0.2), (16, 16.0, 0.05), (64, 48.0, 0.02)]) + rows("var", [(16, 16.0, 0.051)], seed=1)
    assert sweeps.extrapolated(T(ref, var), "var", "ref") == {4: pytest.approx(0.75), 64: pytest.approx(1.5)}
    reason = sweeps.decided_gap(T(ref, var), "var", "ref")[1].reason
    assert "2 point(s) lie outside ref's L0 range" in reason and "k=4 (L0 0.75× ref's lowest)" in reason and "k=64 (L0 1.50× ref's highest)" in reason
    assert sweeps.extrapolated(T(ref, rows("var", [(8, 7.99, 0.3)])), "var", "ref") == {}  # a hair outside
    inside = rows("var", [(16, 16.0, 0.05)]) + rows("var", [(16, 16.0, 0.051)], seed=1)
    assert sweeps.extrapolated(T(ref, inside), "var", "ref") == {}
    assert "outside" not in sweeps.decided_gap(T(ref, inside), "var", "ref")[1].reason


def test_decided_gap_needs_seeds_and_a_gap_beyond_their_noise():
    ref = rows("ref", [(8, 8.0, 0.4), (32, 32.0, 0.1)])
    better = rows("var", [(8, 8.0, 0.2), (32, 32.0, 0.05)])
    assert sweeps.decided_gap(T(ref, better), "var", "ref")[1].held is None  # one seed: undecided
    seeds = rows("ref", [(32, 32.0, 0.101)], seed=1) + rows("var", [(32, 32.0, 0.051)], seed=1)
    gaps, verdict, noise = sweeps.decided_gap(T(ref, better, seeds), "var", "ref")
    assert verdict.held is True and noise < 0.1
    assert sweeps.decided_gap(T(ref, better, seeds), "ref", "var")[1].held is False  # the other way round
    noisy = rows("ref", [(32, 32.0, 0.3)], seed=1) + rows("var", [(32, 32.0, 0.051)], seed=1)
    assert sweeps.decided_gap(T(ref, better, noisy), "var", "ref")[1].held is None


def test_a_mode_is_compared_only_when_named():
    ref = rows("ref", [(8, 8.0, 0.4), (32, 32.0, 0.1)])
    var = rows("var", [(16, 16.0, 0.2)]) + rows("var", [(16, 16.0, 0.1)], mode="gradient", default=False)
    assert sweeps.matched_l0_gap(T(ref, var), "var", "ref")[0] == pytest.approx(0.0, abs=1e-9)
    assert sweeps.matched_l0_gap(T(ref, var), "var", "ref", mode="gradient")[0] == pytest.approx(math.log(0.5))
    with pytest.raises(ValueError, match="no rows"):
        sweeps.pick(T(ref, var), "var", mode="batch")


def test_run_sweep_gives_one_row_per_mode(rng):
    x = torch.randn(512, 8, generator=rng)
    variants = [sweeps.Variant("TopK", lambda k, seed: sae_kit.topk_sae(8, 32, k, seed=seed)),
                sweeps.Variant("MC", lambda k, seed: sae_kit.choice_sae("mc", 8, 32, k, seed=seed))]
    evaluate = lambda sae, k: sweeps.each_mode(sae, lambda mode: {"l0": sae_kit.reconstruction_metrics(sae, x[:64])["l0"]})
    sweep = sweeps.run_sweep(variants, x, (2, 4), evaluate, batch_size=64, epochs=1, seeds=(0, 1), extra_seed_k=4)
    t = sweep.table
    assert len(t) == 3 * 1 + 3 * 2  # TopK: k=2 seed 0, k=4 seeds 0-1, one mode; MC: the same in two modes
    assert set(t[t.label == "MC"]["mode"]) == {"threshold", "batch"} and set(t[t.label == "TopK"]["mode"]) == {"topk"}
    assert t.groupby(["label", "k", "seed"])["default"].sum().eq(1).all()  # one default row each
    assert sweep.sae("MC", 4, 1).mode == "threshold"  # modes restored after evaluation


def test_run_sweep_every_seed_at_every_k_and_a_variants_own_seeds_and_batch(rng):
    x = torch.randn(512, 8, generator=rng)
    variants = [sweeps.Variant("TopK", lambda k, seed: sae_kit.topk_sae(8, 32, k, seed=seed)),
                sweeps.Variant("wide batch", lambda k, seed: sae_kit.topk_sae(8, 32, k, seed=seed),
                               train_kw={"batch_size": 128}, seeds=(0,))]
    evaluate = lambda sae, k: [{"mode": "topk", "default": True, "l0": float(k)}]
    sweep = sweeps.run_sweep(variants, x, (2, 4), evaluate, batch_size=64, epochs=1, seeds=(0, 1, 2), extra_seed_k="all")
    t = sweep.table
    assert sorted(t[t.label == "TopK"].seed.tolist()) == [0, 0, 1, 1, 2, 2]  # three seeds at both k
    assert t[t.label == "wide batch"].seed.tolist() == [0, 0]  # its own single seed
    # a batch of 128 gives 512 * 0.9 / 128 -> fewer steps than a batch of 64
    assert len(sweep.histories["wide batch", 2, 0].loss) < len(sweep.histories["TopK", 2, 0].loss)


def test_cache_key_arguments_fill_in_defaults():
    """seed=0 given or left out, a description or a progress bar: the same training, the same key."""
    from sae_kit.train import training_arguments

    a = training_arguments({"batch_size": 64, "epochs": 2})
    assert a == training_arguments({"batch_size": 64, "epochs": 2, "seed": 0, "desc": "x", "progress": False})
    assert a != training_arguments({"batch_size": 64, "epochs": 2, "seed": 1})
    assert a["lr"] is None and a["grads"] is False


def test_run_sweep_reads_cached_evaluations_back(rng, monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_KIT_CACHE", str(tmp_path))
    x = torch.randn(512, 8, generator=rng)
    variants = [sweeps.Variant("TopK", lambda k, seed: sae_kit.topk_sae(8, 32, k, seed=seed, device="cpu"))]
    calls = []

    def evaluate(sae, k):
        calls.append(k)
        m = sae_kit.reconstruction_metrics(sae, x[:64])
        return [{"mode": "topk", "default": True, "l0": m["l0"], "fvu": m["fvu"], "ce": float("nan"), "n": 3}]

    run = lambda key: sweeps.run_sweep(variants, x, (2, 4), evaluate, batch_size=64, epochs=1, seeds=(0, 1),
                                       extra_seed_k=4, eval_key=key)
    key = sweeps.digest("evaluate", x[:64])
    first = run(key).table
    assert calls == [2, 4, 4]
    again = run(key).table  # the same SAEs (same seeds, same training) on the same data: read back
    assert calls == [2, 4, 4]
    pd.testing.assert_frame_equal(first, again)
    assert again["n"].dtype == first["n"].dtype
    run(sweeps.digest("evaluate", x[64:128]))  # other eval tokens: evaluated afresh
    assert calls == [2, 4, 4] * 2
    for f in (tmp_path / "evals").iterdir():
        f.write_text("{not json")  # a damaged entry is evaluated again, not trusted
    pd.testing.assert_frame_equal(run(key).table, first)
    assert len(calls) == 9


def test_cached_evaluation_follows_the_weights_and_skips_what_json_would_change(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_KIT_CACHE", str(tmp_path))
    sae = sae_kit.topk_sae(8, 32, 2, device="cpu")
    calls = []
    ev = lambda: calls.append(1) or [{"mode": "topk", "fvu": 0.5}]
    sweeps.cached_evaluation(sae, ev, "k", "TopK")
    sweeps.cached_evaluation(sae, ev, "k", "TopK")
    assert len(calls) == 1
    with torch.no_grad():
        sae.W_dec[0, 0] += 1e-3  # other weights: another dictionary
    sweeps.cached_evaluation(sae, ev, "k", "TopK")
    assert len(calls) == 2
    odd = lambda: calls.append(1) or [{"mode": "topk", "fvu": torch.tensor(0.5)}]  # not plain JSON
    sweeps.cached_evaluation(sae, odd, "k2", "TopK")
    sweeps.cached_evaluation(sae, odd, "k2", "TopK")
    assert len(calls) == 4
    assert sweeps.cached_evaluation(sae, ev, None, "TopK") == ev() and len(calls) == 6  # no key: no cache


def test_digest_follows_every_value_and_refuses_what_it_cannot_hash():
    x = torch.zeros(4, 3)
    y = x.clone()
    y[3, 2] = 1e-7
    assert sweeps.digest(x) != sweeps.digest(y) and sweeps.digest(x) == sweeps.digest(x.clone())
    assert sweeps.digest(x) != sweeps.digest(x.double()) and sweeps.digest(x) != sweeps.digest(x.reshape(3, 4))
    assert sweeps.digest({"a": 1, "b": x}) == sweeps.digest({"b": x, "a": 1})
    assert sweeps.digest(1) != sweeps.digest(1.0) != sweeps.digest("1")
    # the Zipf fit's alpha from two runs (threaded least squares): the same key; another alpha: not
    assert sweeps.digest({"alpha": 0.9111477986708507}) == sweeps.digest({"alpha": 0.9111477986708526})
    assert sweeps.digest(0.9111477986708507) != sweeps.digest(0.91114779867)
    with pytest.raises(TypeError, match="cannot hash a object"):
        sweeps.digest(object())


def test_code_fingerprint_ignores_comments_docstrings_and_layout_but_not_code():
    base = 'def f(x):\n    """Doc."""\n    return x + 1  # add\n'
    same = ['"""Module doc."""\ndef f(x):\n    return x + 1\n',
            'def f(x):\n    """Another doc,\n    two lines."""\n\n    return (x\n            + 1)\n']
    for src in same:
        assert sweeps.code_fingerprint(src) == sweeps.code_fingerprint(base), src
    other = ['def f(x):\n    return x + 2\n', 'def f(x):\n    return x - 1\n', 'def f(y):\n    return y + 1\n',
             'def f(x):\n    "Doc."\n    s = "a string that is not a docstring"\n    return x + 1\n']
    for src in other:
        assert sweeps.code_fingerprint(src) != sweeps.code_fingerprint(base), src
    # a body that is only a docstring becomes `pass`, still a valid tree
    assert sweeps.code_fingerprint('class A:\n    """Doc."""\n') == sweeps.code_fingerprint('class A:\n    pass\n')


def test_code_digest_follows_code_files_and_names_not_docs(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.py").write_text('"""A."""\nX = 1\n')
    (tmp_path / "sub" / "b.py").write_text("def g():\n    return 2\n")
    first = sweeps.code_digest(tmp_path)
    (tmp_path / "a.py").write_text('"""A, better explained."""\n# a comment\nX = 1\n')
    (tmp_path / "notes.md").write_text("not code")
    assert sweeps.code_digest(tmp_path) == first
    for change in (lambda: (tmp_path / "sub" / "b.py").write_text("def g():\n    return 3\n"),
                   lambda: (tmp_path / "c.py").write_text("Y = 0\n"),
                   lambda: (tmp_path / "a.py").rename(tmp_path / "a2.py")):
        change()
        assert sweeps.code_digest(tmp_path) != first
        first = sweeps.code_digest(tmp_path)
    assert len(sweeps.kit_code_digest()) == 20
