"""Matching-pursuit SAE: the pursuit's invariants, its Gram-trick path against the plain algorithm,
gradients, adaptive steps, a SAELens round trip; plus the synthetic hierarchy and its matcher."""

import pytest
import torch

import sae_kit
from sae_kit import synthetic
from sae_kit.metrics import coherence, fvu_by_budget
from sae_kit.pursuit import residual_norms
from sae_kit.saes import load_sae, mp_sae, relu_sae, topk_sae
from sae_kit.saes.matching_pursuit import gram_into, row_max


def plain_pursuit(x, D, b, steps):
    """The textbook algorithm, one token at a time, correlations recomputed from scratch."""
    z = torch.zeros(len(x), len(D), dtype=torch.float64)
    for n, xn in enumerate(x.double()):
        r = xn - b.double()
        for _ in range(steps):
            c = D.double() @ r
            j = int(c.argmax())
            a = max(float(c[j]), 0.0)
            z[n, j] += a
            r = r - a * D[j].double()
    return z


def trained_mp(store, k=8, d_sae=1152, steps=5):
    sae = mp_sae(576, d_sae, k=k, seed=0)
    sae_kit.train(sae, store, batch_size=128, progress=False, max_steps=steps)
    return sae


def test_gram_trick_pursuit_equals_the_plain_algorithm(rng):
    sae = mp_sae(16, 48, k=6, seed=3)
    x = torch.randn(40, 16, generator=rng)
    z = sae.encode(x)
    assert torch.allclose(z.double(), plain_pursuit(x, sae.W_dec.detach(), sae.b_dec.detach(), 6), atol=1e-4)


def test_row_max_gives_max_values_and_first_indices(rng):
    c = torch.randn(64, 512, generator=rng)
    c[0, [3, 300]] = 50.0  # a tie across blocks: the first wins
    c[1, [130, 131]] = 50.0  # a tie inside one block
    c[2] = float("-inf")  # every atom hidden by dropout
    c[3, 7], c[3, 400] = float("nan"), float("nan")
    c[4] = 1.0  # a constant row
    v, j = row_max(c)
    v0, j0 = c.max(1)
    assert torch.equal(j, j0) and torch.equal(v.nan_to_num(), v0.nan_to_num())
    assert j[:5].tolist() == [3, 130, 0, 7, 0]
    c[5, [100, 450]] = 60.0  # a tie between a whole block and the 500 − 384 tail
    c[6, 470] = 70.0  # the maximum in the tail
    for width in (500, 100, 384):  # a tail after whole blocks, no whole block, whole blocks only
        part = c[:, :width].contiguous()
        v, j = row_max(part)
        v0, j0 = part.max(1)
        assert torch.equal(j, j0) and torch.equal(v.nan_to_num(), v0.nan_to_num()), width


@pytest.mark.parametrize("n", [1, 5, 48, 1023, 1024, 1500])
def test_gram_into_is_the_symmetric_product(n, rng):
    W = torch.randn(n, 16, generator=rng)
    G = gram_into(W, torch.full((n, n), float("nan")))
    assert torch.allclose(G, W @ W.t(), rtol=1e-5, atol=1e-5)
    if n >= 1024:  # the blocked path: exactly symmetric
        assert torch.equal(G, G.t())


def test_training_and_inference_pursuits_equal_the_plain_algorithm_as_the_decoder_moves(rng):
    """The training path reuses one Gram buffer; inference caches G per decoder version. Both must
    follow the decoder through optimiser steps and mode switches (d_sae 200: a block and a tail)."""
    sae = mp_sae(16, 200, k=6, seed=3)
    x = torch.randn(40, 16, generator=rng)
    for mode in ("eval", "train", "eval", "train"):
        sae.train(mode == "train")
        z = sae.encode(x).detach()
        assert torch.allclose(z.double(), plain_pursuit(x, sae.W_dec.detach(), sae.b_dec.detach(), 6), atol=1e-4)
        with torch.no_grad():
            sae.W_dec.add_(0.3 * torch.randn(sae.W_dec.shape, generator=rng))  # a decoder step


def test_two_sae_training_in_turn_share_the_gram_buffer_safely(rng):
    """Training-mode G lives in one buffer for the process: two dictionaries of different widths,
    used in turn, must each see their own G."""
    a, b = mp_sae(16, 40, k=4, seed=1), mp_sae(16, 56, k=4, seed=2)
    x = torch.randn(30, 16, generator=rng)
    for sae in (a, b, a, b):
        sae.train()
        z = sae.encode(x).detach()
        assert torch.allclose(z.double(), plain_pursuit(x, sae.W_dec.detach(), sae.b_dec.detach(), 4), atol=1e-4)


@pytest.mark.parametrize("threshold,dropout", [(0.0, 0.0), (0.0, 0.5), (1.0, 0.0), (1.0, 0.5)])
def test_pursuit_in_token_blocks_equals_one_block(threshold, dropout, monkeypatch, rng):
    """Blocks of tokens that stop at different steps (the threshold) and share dropout's masks give
    the values, the live atoms, the length and the generator state of one block over the batch."""
    from sae_kit.saes import matching_pursuit as M

    sae = mp_sae(16, 200, k=6, seed=3)
    scale = torch.tensor([0.05] * 64 + [3.0] * 64 + [0.5] * 40)[:, None]  # blocks that stop early, late, between
    r0 = torch.randn(168, 16, generator=rng) * scale

    def run(block_bytes):
        monkeypatch.setattr(M, "PURSUIT_BLOCK_BYTES", block_bytes)
        sae._gen.manual_seed(7)
        idx, vals = sae.choose(r0.clone(), 40, threshold=threshold, dropout=dropout)
        return idx, vals, sae._gen.get_state()

    i1, v1, g1 = run(1 << 30)
    i2, v2, g2 = run(1)  # the smallest block: 64 tokens
    assert v1.shape == v2.shape and torch.equal(v1, v2) and torch.equal(g1, g2)
    assert torch.equal(i1[v1 > 0], i2[v2 > 0])
    assert 0 <= int(i2.min()) and int(i2.max()) < 200  # steps after a block stopped name a real atom
    if threshold:
        assert v1.shape[1] < 40  # every token stopped early, at different steps by block
        stopped = (v2 > 0).sum(1)
        assert stopped[:64].max() < stopped[64:128].max()


def test_residual_orthogonal_to_last_atom_and_norm_never_grows(small_store):
    sae = trained_mp(small_store)
    x = small_store.get("eval")[:200]
    rn = residual_norms(sae, x, 24)
    assert (rn[:, 1:] <= rn[:, :-1] * (1 + 1e-5) + 1e-5).all()
    assert (rn[:, -1] < rn[:, 0]).all()
    # after each step: ⟨r, d_j⟩ = 0 and ‖r_t‖² = ‖r_{t−1}‖² − a²
    code = sae.pursue(x, 5)
    idx, vals = code.cols.view(-1, 5), code.vals.view(-1, 5)
    r = x - sae.b_dec.detach()
    for t in range(5):
        d = sae.W_dec.detach()[idx[:, t]]
        new = r - vals[:, t:t + 1] * d
        assert ((new * d).sum(1).abs() <= 1e-3 * r.norm(dim=1)).all()
        assert torch.allclose(new.pow(2).sum(1), r.pow(2).sum(1) - vals[:, t] ** 2, rtol=1e-3, atol=1e-2)
        r = new


def test_gradients_reach_atoms_and_bias_and_training_lowers_fvu(small_store):
    sae = mp_sae(576, 1152, k=8, seed=0)
    x = small_store.get("train", 256)
    sae.train()
    out = sae.loss(x)
    out["loss"].backward()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    assert sae.b_dec.grad is not None and sae.b_dec.grad.abs().sum() > 0
    sae.eval()
    before = sae_kit.reconstruction_metrics(sae, small_store.get("eval"))["fvu"]
    sae_kit.train(sae, small_store, batch_size=128, progress=False, epochs=2)
    after = sae_kit.reconstruction_metrics(sae, small_store.get("eval"))["fvu"]
    assert after < 0.8 * before


def test_more_inference_steps_never_hurt_mp_but_change_topk(small_store):
    x = small_store.get("eval")
    mp = trained_mp(small_store, k=8)
    f = fvu_by_budget(mp, x, [2, 4, 8, 16, 32])
    assert all(b < a for a, b in zip(f, f[1:]))
    tk = topk_sae(576, 1152, 8, seed=0)
    sae_kit.train(tk, small_store, batch_size=128, progress=False, max_steps=5)
    g = fvu_by_budget(tk, x, [8, 16])
    assert g[0] != g[1]  # the TopK path really changes k
    assert tk.cfg.k == 8  # and restores it


def test_residual_threshold_gives_variable_l0(small_store):
    sae = trained_mp(small_store, k=8)
    x = small_store.get("eval")[:300]
    norms = (x - sae.b_dec.detach()).norm(dim=1)
    thr = float(norms.median()) * 0.6
    z = sae.encode(x, k=64, threshold=thr)
    l0 = (z > 0).sum(1)
    assert l0.min() < l0.max()  # tokens stop at different steps
    resid = (x - sae.decode(z)).norm(dim=1)
    stopped = l0 < 60
    assert (resid[stopped] < thr * 1.01).all()


def test_atom_dropout_only_early_in_training(small_store):
    sae = mp_sae(576, 1152, k=4, seed=0, dropout=0.9, dropout_tokens=256)
    x = small_store.get("train", 128)
    sae.train()
    picked_early = torch.unique(sae.pursue(x).cols)
    sae.tokens_seen.fill_(10_000)
    picked_late = torch.unique(sae.pursue(x).cols)
    # with 90% of atoms hidden per step, at most ~4·115 distinct atoms can appear early
    assert len(picked_early) <= 4 * 0.2 * 1152
    assert len(picked_late) > len(picked_early)


def test_save_load_and_sae_lens_round_trip(tmp_path, small_store):
    sae_lens = pytest.importorskip("sae_lens")
    sae = trained_mp(small_store, k=8)
    path = sae.save(tmp_path / "mp")
    again = load_sae(path)
    x = small_store.get("eval")[:128]
    with torch.no_grad():
        assert torch.allclose(again.encode(x), sae.encode(x))
        theirs = sae_lens.SAE.load_from_disk(str(path), device="cpu")
        assert type(theirs).__name__ == "MatchingPursuitSAE"
        assert torch.allclose(theirs.encode(x), sae.encode(x), atol=1e-3)
        assert torch.allclose(theirs.decode(theirs.encode(x)), sae.reconstruct(x), atol=1e-2)


def test_steps_must_be_positive():
    sae = mp_sae(8, 16, k=2)
    with pytest.raises(ValueError, match="steps"):
        sae.encode(torch.zeros(2, 8), k=0)


def test_coherence_of_orthonormal_and_duplicated_atoms():
    assert coherence(torch.eye(6))["mean_max"] == pytest.approx(0.0)
    W = torch.eye(4).repeat(2, 1)
    assert coherence(W)["mean_max"] == pytest.approx(1.0)


# ---- synthetic hierarchy ------------------------------------------------------------------------
def test_hierarchy_structure_and_geometry():
    h = synthetic.Hierarchy(seed=0, sibling_cos=0.4)
    x, codes = h.sample(20_000)
    on = codes > 0
    G = h.features @ h.features.t()
    for p in range(h.n_parents):
        ch = h.children_of(p)
        assert (on[:, ch].sum(1) <= 1).all()  # mutually exclusive
        assert not (on[:, ch].any(1) & ~on[:, p]).any()  # only with the parent
        assert torch.allclose(G[ch][:, ch], 0.6 * torch.eye(3) + 0.4, atol=1e-5)
        assert G[p, ch].abs().max() < 1e-5
    assert torch.allclose(x, codes @ h.features)
    assert on[:, h.groups["parent"]].float().mean() == pytest.approx(0.2, abs=0.01)
    assert on[:, h.groups["singleton"]].float().mean() == pytest.approx(0.05, abs=0.005)


def test_hierarchy_rejects_impossible_settings():
    with pytest.raises(ValueError, match="mutually exclusive"):
        synthetic.Hierarchy(n_children=3, p_child=0.5)
    with pytest.raises(ValueError, match="sibling_cos"):
        synthetic.Hierarchy(sibling_cos=1.0)


def test_match_finds_a_permuted_noisy_copy(rng):
    h = synthetic.Hierarchy(seed=1)
    perm = torch.randperm(h.n_features, generator=rng)
    W = h.features[perm] + 0.01 * torch.randn(h.n_features, h.d, generator=rng)
    m = synthetic.match(W, h.features, h.groups)
    assert (torch.as_tensor(m["assignment"])[perm] == torch.arange(h.n_features)).all()
    assert m["mean"] > 0.99 and m["parent"] > 0.99
    assert synthetic.absorption(W, h, m["assignment"]) == pytest.approx(0.0, abs=0.05)


def test_relu_l1_penalty_controls_sparsity():
    h = synthetic.Hierarchy(seed=0)
    x, _ = h.sample(256 * 300)
    l0 = []
    for coef in (0.0, 0.5):
        sae = relu_sae(h.d, h.n_features, l1_coef=coef, seed=0)
        sae_kit.train(sae, x, batch_size=256, lr=1e-2, progress=False)
        l0.append(sae_kit.reconstruction_metrics(sae, x[:4096])["l0"])
    assert l0[1] < 0.6 * l0[0]


def test_mp_may_run_more_steps_than_atoms_but_topk_may_not():
    sae = mp_sae(4, 3, k=6)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    assert sae.pursue(x).cols.numel() == 5 * 6
    with pytest.raises(ValueError, match="k must satisfy"):
        topk_sae(4, 3, k=3)


def test_pursuit_backward_equals_autograd_replay():
    """The reverse-recurrence backward gives the gradients of autograd through the replayed pursuit."""
    import torch.nn.functional as F

    from sae_kit.saes import mp_sae

    gen = torch.Generator().manual_seed(3)
    sae = mp_sae(6, 10, 5).double()
    x = torch.randn(7, 6, generator=gen, dtype=torch.float64) * 2
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(6, generator=gen, dtype=torch.float64) * 0.1)
    w = torch.randn(7, 6, generator=gen, dtype=torch.float64)
    code = sae.pursue(x)
    ((sae._decode_code(code) * w).sum() + (code.vals ** 2).sum()).backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    idx, v = sae.choose((x - sae.b_dec).detach(), 5)
    r, vals = x - sae.b_dec, []
    for t in range(5):  # the textbook replay with autograd
        d = sae.W_dec[idx[:, t]]
        a = F.relu((r * d).sum(1)) * (v[:, t] > 0)
        r = r - a[:, None] * d
        vals.append(a)
    vals = torch.stack(vals, 1)
    x_hat = (vals[..., None] * sae.W_dec[idx]).sum(1) + sae.b_dec
    ((x_hat * w).sum() + (vals ** 2).sum()).backward()
    for n, p in sae.named_parameters():
        assert torch.allclose(ours[n], p.grad, atol=1e-10), n
