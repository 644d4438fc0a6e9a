import pytest
import torch

import sae_kit
from sae_kit.saes import capacities, choice_sae, fit_zipf, row_topk, zipf_probs

# a hand-checkable 3-token x 4-feature affinity matrix
PRE = torch.tensor([[9.0, 1.0, 0.5, 3.0],
                    [8.0, 7.0, 0.2, 0.1],
                    [6.0, 5.0, 4.0, 2.0]])


def kept(mask):
    return {tuple(ij) for ij in mask.nonzero().tolist()}


def test_mutual_choice_keeps_the_top_k_times_b_entries_of_the_batch():
    sae = choice_sae("mc", 2, 4, k=2)  # budget k*B = 6
    keep, cutoff = sae.batch_keep(PRE)
    assert kept(keep) == {(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)}  # 9, 8, 7, 6, 5, 4
    assert float(cutoff) == 4.0
    # token 0 gets 1 feature, token 2 gets 3: adaptive per-token L0, same total as TopK
    assert keep.sum(1).tolist() == [1, 2, 3]


def test_mutual_choice_ties_at_the_cut_off_fill_the_budget_exactly():
    sae = choice_sae("mc", 2, 4, k=1)
    pre = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    assert int(sae.batch_keep(pre)[0].sum()) == 2


def test_feature_choice_uniform_keeps_each_features_top_m_tokens():
    sae = choice_sae("fc", 2, 4, k=2)  # k*B = 6 over 4 features: capacities 2,2,1,1 (rounded), sum 6
    m = sae.feature_capacities(3)
    assert int(m.sum()) == 6 and set(m.tolist()) <= {1, 2}
    keep, _ = sae.batch_keep(PRE)
    for j in range(4):
        col = PRE[:, j]
        top = set(col.topk(int(m[j])).indices.tolist())
        assert {i for i, jj in kept(keep) if jj == j} == top
    assert keep.sum(0).tolist() == m.tolist()


def test_capacities_sum_to_budget_respect_cap_and_follow_zipf():
    p = zipf_probs(1000, alpha=1.2, b=2.0)
    m = capacities(p, total=32 * 512, cap=512, min_one=True)
    assert int(m.sum()) == 32 * 512
    assert int(m.max()) <= 512 and int(m.min()) >= 1  # every feature gets a slot
    assert bool((m[:-1] >= m[1:]).all())  # more probable ranks never get less
    heavy = capacities(torch.tensor([100.0, 1.0, 1.0]), total=10, cap=4)
    assert heavy.tolist()[0] == 4 and int(heavy.sum()) == 10  # clipped at B, excess redistributed


def test_capacities_water_fill_by_hand():
    # shares 0.5, 0.3, 0.2 of 10 slots, cap 4: the first is clipped at 4 and its excess 1 goes to the
    # others in proportion 3:2 -> 3.6, 2.4 -> floors 3, 2 and the last slot to the larger remainder
    assert capacities(torch.tensor([0.5, 0.3, 0.2]), total=10, cap=4).tolist() == [4, 4, 2]
    # two clipped in a cascade: 0.6, 0.3, 0.05, 0.05 of 9 slots, cap 3 -> 3, 3, then 1.5, 1.5 -> 2, 1
    m = capacities(torch.tensor([0.6, 0.3, 0.05, 0.05]), total=9, cap=3)
    assert m[:2].tolist() == [3, 3] and sorted(m[2:].tolist()) == [1, 2]
    # order does not matter: the same weights shuffled give the same capacities, shuffled
    p = zipf_probs(500, 1.1, 3.0)
    perm = torch.randperm(500, generator=torch.Generator().manual_seed(0))
    assert torch.equal(capacities(p[perm], 8 * 256, 256), capacities(p, 8 * 256, 256)[perm])


def test_min_one_is_a_knob_and_off_by_default():
    p = zipf_probs(1000, alpha=1.5, b=0.0)
    plain, floored = capacities(p, total=4 * 512, cap=512), capacities(p, total=4 * 512, cap=512, min_one=True)
    assert int((plain == 0).sum()) > 0 and int(floored.min()) == 1
    assert int(plain.sum()) == int(floored.sum()) == 4 * 512
    sae = choice_sae("fc", 4, 1000, k=4, capacity="zipf", zipf_alpha=1.5, zipf_b=0.0)
    assert sae.cfg.min_one is False and int((sae.feature_capacities(512) == 0).sum()) > 0
    sae.cfg.min_one = True
    assert int(sae.feature_capacities(512).min()) == 1


def test_zipf_ranks_start_from_a_seeded_random_permutation():
    a, b = (choice_sae("fc", 4, 50, k=2, capacity="zipf", seed=s) for s in (0, 1))
    assert not torch.equal(a.density, b.density)  # different seeds, different starting ranks
    assert torch.equal(a.density.sort().values, b.density.sort().values)  # the same Zipf densities
    assert int(a.density.argmax()) != 0 or int(b.density.argmax()) != 0  # not index order
    assert torch.equal(a.start_density(), choice_sae("fc", 4, 50, k=2, capacity="zipf", seed=0).density)


def test_capacities_refuse_an_impossible_budget():
    with pytest.raises(ValueError, match="exceeds"):
        capacities(torch.ones(3), total=10, cap=3)


def test_zipf_fit_recovers_a_planted_law():
    r = torch.arange(1, 2001, dtype=torch.float64)
    dens = 0.5 * (r + 3.0) ** -1.3
    fit = fit_zipf(dens.float())
    assert fit["alpha"] == pytest.approx(1.3, abs=0.02) and fit["b"] == 3.0 and fit["r2"] > 0.999


def train_tiny(sae, x, steps=30):
    sae_kit.train(sae, x, batch_size=64, epochs=steps, progress=False, lr=1e-3, max_steps=steps)
    return sae


@pytest.mark.parametrize("rule", ["mc", "fc"])
def test_thresholds_encode_one_token_without_the_batch(rule, rng):
    x = torch.randn(256, 16, generator=rng) @ torch.randn(16, 16, generator=rng)
    sae = train_tiny(choice_sae(rule, 16, 48, k=4, seed=0), x)
    assert bool(sae.threshold_ready)
    assert sae.mode == "threshold"  # the default
    z_all = sae.encode(x[:32])
    z_one = torch.cat([sae.encode(x[i:i + 1]) for i in range(32)])
    # batch-independent: same support, same values (up to BLAS rounding of a 1-row vs 32-row matmul)
    assert torch.equal(z_all > 0, z_one > 0) and torch.allclose(z_all, z_one, atol=1e-5)
    assert 0 < float((z_all > 0).sum(1).float().mean()) < 16
    with sae.using("batch"):
        assert float((sae.encode(x[:64]) > 0).sum()) <= 4 * 64
        assert float((sae.encode(x[:64], k=2) > 0).sum()) <= 2 * 64  # an explicit budget
    assert sae.mode == "threshold"  # restored after the block
    with pytest.raises(ValueError, match="no budget"):
        sae.encode(x[:4], k=2)


def test_untrained_threshold_inference_is_a_clear_error():
    sae = choice_sae("mc", 4, 8, k=2)
    sae.eval()
    with pytest.raises(RuntimeError, match="thresholds"):
        sae.encode(torch.randn(3, 4))


def test_aux_zipf_makes_under_used_features_eligible():
    sae = choice_sae("mc", 4, 10, k=2, aux="zipf", tau=0.5, zipf_alpha=1.0, zipf_b=0.0)
    sae.density.copy_(torch.tensor([0.5, 0.4, 0.3, 0.2, 0.1, 0.09, 0.08, 0.07, 0.06, 0.0001]))
    expected = sae.zipf_expected_density()
    assert bool((expected[:-1] >= expected[1:]).all())
    under = sae.under_used()
    assert bool(under[-1]) and not bool(under[0])
    assert bool(sae.aux_eligible()[-1]) and not bool(sae.dead_mask().any())
    plain = choice_sae("mc", 4, 10, k=2, aux="auxk")
    plain.density.copy_(sae.density)
    assert not bool(plain.aux_eligible().any())


def test_bad_rule_and_knobs_are_clear_errors():
    with pytest.raises(ValueError, match="'mc'"):
        choice_sae("xx", 4, 8, 2)
    with pytest.raises(ValueError, match="aux"):
        choice_sae("mc", 4, 8, 2, aux="l1")


@pytest.mark.parametrize("rule", ["mc", "fc"])
def test_choice_sae_round_trips_and_sae_lens_reads_it_as_jumprelu(rule, tmp_path, rng):
    x = torch.randn(256, 16, generator=rng)
    sae = train_tiny(choice_sae(rule, 16, 48, k=4, seed=1, **({"capacity": "zipf"} if rule == "fc" else {})), x)
    path = sae.save(tmp_path / rule)
    again = sae_kit.load_sae(path)
    assert type(again) is type(sae) and torch.equal(again.threshold, sae.threshold)
    assert torch.equal(again.encode(x[:20]), sae.encode(x[:20]))
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(path), device="cpu")
    with torch.no_grad():
        assert torch.allclose(theirs.encode(x[:20]), sae.encode(x[:20]), atol=1e-5)


def test_mutual_choice_fast_search_equals_the_full_search(rng):
    sae = choice_sae("mc", 2, 64, k=2)  # candidates: each row's top 8
    for skew in (0.0, 6.0):  # skewed: one token holds most of the big affinities -> full search path
        pre = torch.randn(16, 64, generator=rng)
        pre[0] += skew
        keep, _ = sae.batch_keep(pre)
        top = pre.reshape(-1).topk(32).indices
        expect = torch.zeros(16 * 64, dtype=torch.bool)
        expect[top] = True
        assert torch.equal(keep.reshape(-1), expect)


def test_mutual_choice_fast_selection_equals_the_mask():
    """batch_select (a lower bound from each row's candidates, then the exact cut-off among the entries
    above it) keeps exactly batch_keep's pairs in its order, also when one token keeps far more
    than its candidates and when the cut-off is tied."""
    from sae_kit.saes import choice_sae

    sae = choice_sae("mc", 4, 64, 3)
    gen = torch.Generator().manual_seed(0)
    spiky = torch.randn(16, 64, generator=gen)
    spiky[2] += 10  # token 2 takes far more than its 1.5k candidates
    tied = torch.randn(32, 64, generator=gen).round()  # many entries equal to the cut-off
    for pre in (torch.randn(32, 64, generator=gen), spiky, tied):
        rows, cols, cut = sae.batch_select(pre)
        keep, cut2 = sae.batch_keep(pre)
        assert torch.equal(keep.nonzero(), torch.stack([rows, cols], 1))  # the same pairs, in row-major order
        assert bool((rows[1:] >= rows[:-1]).all()) and torch.equal(cut, cut2)
        assert len(rows) == 3 * len(pre)


def test_feature_choice_zipf_keeps_each_features_own_top_m_across_capacity_groups():
    """Capacities from 1 to dozens fall in different groups; each column still keeps exactly its top m_j."""
    sae = choice_sae("fc", 4, 64, k=8, capacity="zipf", zipf_alpha=1.5, zipf_b=0.0)
    pre = torch.randn(96, 64, generator=torch.Generator().manual_seed(3))
    m = sae.feature_capacities(96)
    assert int(m.max()) >= 16 and int(m[m > 0].min()) <= 2  # several groups
    keep, kth = sae.batch_keep(pre)
    assert keep.sum(0).tolist() == m.tolist()
    for j in torch.nonzero(m > 0).flatten().tolist():
        top = pre[:, j].topk(int(m[j]))
        assert set(torch.nonzero(keep[:, j]).flatten().tolist()) == set(top.indices.tolist())
        assert float(kth[j]) == float(top.values[-1])  # the cut-off is the m_j-th largest


@pytest.mark.parametrize("capacity,min_one", [("zipf", False), ("zipf", True), ("uniform", False)])
def test_feature_choice_selection_equals_the_mask_in_order(capacity, min_one):
    """batch_select builds the pairs from each feature's top tokens without the B × d_sae mask: the
    same pairs as batch_keep's mask, in its row-major order (the sparse kernels need rows sorted),
    with ties and with features that get no slot (Zipf tail rounded to zero)."""
    sae = choice_sae("fc", 4, 64, k=2, capacity=capacity, zipf_alpha=1.5, zipf_b=0.0, min_one=min_one)
    gen = torch.Generator().manual_seed(5)
    tied = torch.randn(40, 64, generator=gen).round()  # many equal values in every column
    for pre in (torch.randn(40, 64, generator=gen), tied):
        if capacity == "zipf" and not min_one:
            assert int((sae.feature_capacities(40) == 0).sum()) > 0  # some features get no slot
        rows, cols, cut = sae.batch_select(pre)
        keep, cut2 = sae.batch_keep(pre)
        assert torch.equal(torch.stack([rows, cols], 1), keep.nonzero())
        assert torch.equal(cut, cut2) and len(rows) == 2 * 40


def test_zipf_fit_is_the_least_squares_fit_and_the_same_on_every_run():
    """alpha enters the Zipf SAEs' configs and so their cache keys: it must not move in its last bits
    between runs or thread counts (a threaded lstsq did, and retrained cached SAEs)."""
    g = torch.Generator().manual_seed(0)
    r = torch.arange(1, 4001, dtype=torch.float64)
    dens = (0.3 * (r + 10.0) ** -0.9 * torch.exp(0.2 * torch.randn(len(r), generator=g, dtype=torch.float64))).float()
    fit = fit_zipf(dens)
    d = torch.sort(dens[dens > 0].double(), descending=True).values[: int(0.9 * len(dens))]
    ranks = torch.arange(1, len(d) + 1, dtype=torch.float64)
    X = torch.stack([torch.ones(len(d), dtype=torch.float64), -(ranks + fit["b"]).log()], 1)
    coef = torch.linalg.lstsq(X, d.log()[:, None]).solution[:, 0]
    assert fit["alpha"] == pytest.approx(float(coef[1]), rel=1e-9) and fit["c"] == pytest.approx(float(coef[0]), rel=1e-9)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fit_zipf(dens)
    finally:
        torch.set_num_threads(threads)
    assert one == fit == fit_zipf(dens.clone())


@pytest.mark.parametrize("data", ["gaussian", "spiky", "tied", "integers"])
def test_mutual_choice_candidate_pairs_equal_the_whole_matrix_comparison(data):
    """`_at_or_above` builds ``(pre >= low).nonzero()`` from each row's candidates plus the rows that
    may hold more than them, at a batch where `row_topk` takes its levels path (B ≥ 64), with a
    few rows far above the rest (layer 8's high-norm tokens) and with heavy ties at the bound
    (gaussian, spiky: 10-13% of the rows compared whole; tied: 24%, and integers: all of them, over
    the fifth of the batch where the one-pass comparison takes over)."""
    from sae_kit.saes.choice import _at_or_above

    gen = torch.Generator().manual_seed(1)
    pre = torch.randn(256, 768, generator=gen)
    if data == "spiky":
        pre[::37] += 4
    elif data == "tied":
        pre = (pre * 2).round() / 2
    elif data == "integers":
        pre = torch.randint(-3, 4, (256, 768), generator=gen).float()
    sae = choice_sae("mc", 4, 768, 8)
    B, c, budget = 256, 12, 8 * 256
    cand, at = row_topk(pre, c)
    low = cand.reshape(-1).kthvalue(B * c - budget + 1).values
    rows, cols = _at_or_above(pre, cand, at, low)
    expect = (pre >= low).nonzero(as_tuple=True)
    assert torch.equal(rows, expect[0]) and torch.equal(cols, expect[1])
    r2, c2, cut = sae.batch_select(pre)
    keep, cut2 = sae.batch_keep(pre)
    assert torch.equal(keep.nonzero(), torch.stack([r2, c2], 1)) and torch.equal(cut, cut2)
