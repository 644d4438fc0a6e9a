import json

import pytest
import torch

import sae_kit
from sae_kit.saes import TopKConfig, fvu_loss, geometric_median, row_topk, topk_sae
from sae_kit.saes import base as saes_base


def dense_reference_loss(sae, x, k, k_aux):
    """Plain autograd TopK + AuxK (all latents dead; the aux top-k skips the pairs the main code kept)."""
    pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
    v, i = pre.topk(k, -1)
    z = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
    x_hat = z @ sae.W_dec + sae.b_dec
    e = (x - x_hat).detach()
    main = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, i, True)
    va, ia = pre.masked_fill(main, float("-inf")).topk(k_aux, -1)
    e_hat = torch.zeros_like(pre).scatter(-1, ia, torch.relu(va)) @ sae.W_dec
    return plain_fvu(x, x_hat) + sae.cfg.aux_coef * plain_fvu(e, e_hat)


def plain_fvu(x, x_hat):
    """The FVU as plain autograd sees it (`fvu_loss` has its own backward when x is data)."""
    return (x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def test_sparse_backward_equals_dense_autograd(rng):
    x = torch.randn(64, 24, generator=rng) * 3 + 1
    sae = topk_sae(24, 96, 5, seed=1, k_aux=12, dead_tokens=1)
    sae.train()
    sae.tokens_since_fired += 10  # every latent dead: AuxK active over all of them
    sae.loss(x)["loss"].backward()
    ours = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    dense_reference_loss(sae, x, 5, 12).backward()
    for n, p in sae.named_parameters():
        assert torch.allclose(ours[n], p.grad, atol=1e-6, rtol=1e-4), n


@pytest.mark.parametrize("scale", [1.0, 1 / 32, 3.7])
def test_fvu_loss_backward_is_autograds_bit_for_bit(rng, scale):
    x = torch.randn(257, 33, generator=rng) * 3 + 1
    x_hat = (x + torch.randn(257, 33, generator=rng)).requires_grad_()
    ours = fvu_loss(x, x_hat)
    (ours * scale).backward()
    g_ours, x_hat.grad = x_hat.grad.clone(), None
    ref = plain_fvu(x, x_hat)
    (ref * scale).backward()
    assert torch.equal(ours, ref) and torch.equal(g_ours, x_hat.grad)


def test_fvu_loss_refuses_a_second_derivative_rather_than_a_wrong_one(rng):
    x = torch.randn(20, 4, generator=rng)
    x_hat = torch.randn(20, 4, generator=rng).requires_grad_()
    w = torch.tensor(2.0, requires_grad=True)  # the gradient depends on w, and on x̂ through d
    (g,) = torch.autograd.grad(w * fvu_loss(x, x_hat), x_hat, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()  # a plain backward would give ∂/∂w and silently drop ∂/∂x̂


def test_fvu_loss_with_x_needing_a_gradient_differentiates_x_too(rng):
    x = (torch.randn(40, 6, generator=rng) + 2).requires_grad_()
    x_hat = torch.randn(40, 6, generator=rng).requires_grad_()
    fvu_loss(x, x_hat).backward()
    gx, gh = x.grad.clone(), x_hat.grad.clone()
    x.grad = x_hat.grad = None
    plain_fvu(x, x_hat).backward()
    assert torch.allclose(gx, x.grad) and torch.allclose(gh, x_hat.grad) and gx.abs().sum() > 0


def test_decoder_gradient_projection_in_blocks_equals_one_pass(rng):
    sae = topk_sae(24, 1300, 5)  # 1300 atoms: two full blocks of 512 and a shorter one
    g = torch.randn(1300, 24, generator=rng)
    sae.W_dec.grad = g.clone()
    sae.project_decoder_grad()
    W = sae.W_dec.detach()
    ref = g.addcmul(torch.linalg.vecdot(g, W)[:, None], W, value=-1)
    assert torch.equal(sae.W_dec.grad, ref)
    assert torch.linalg.vecdot(sae.W_dec.grad, W).abs().max() < 1e-5  # tangent to every atom


def test_aux_pairs_skip_the_main_codes_pairs():
    """A hand-checkable case: 2 tokens, 5 latents, latents 1..4 eligible, k_aux 2."""
    from sae_kit.saes.base import SparseCode, aux_pairs

    pre = torch.tensor([[9.0, 8.0, 7.0, 1.0, 0.5],
                        [0.0, 3.0, 6.0, 5.0, 4.0]])
    eligible = torch.tensor([False, True, True, True, True])
    main = SparseCode(torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2]), torch.ones(3), (2, 5))
    rows, cols, ok = aux_pairs(pre, eligible, 2, main)
    # token 0: latent 1 is kept by the main code, 0 is not eligible -> 2 and 3; token 1: 2 is kept -> 3 and 4
    assert rows.tolist() == [0, 0, 1, 1]
    assert cols.tolist() == [2, 3, 3, 4]
    assert ok.tolist() == [1, 1, 1, 1]
    # without the main code's pairs masked, token 0 would take latent 1 again (the double count)
    assert aux_pairs(pre, eligible, 2)[1].tolist()[:2] == [1, 2]
    # fewer free eligible pairs than k_aux: the extra slot is marked not ok
    rows, cols, ok = aux_pairs(pre, torch.tensor([False, True, True, False, False]), 2, main)
    assert ok.tolist() == [1, 0, 1, 0]
    assert cols[0] == 2 and cols[2] == 1


def assert_same_topk(pre, k):
    """row_topk's values and indices are torch.topk's, bit for bit and in the same order."""
    ours, theirs = row_topk(pre, k), pre.topk(k, dim=1)
    assert torch.equal(ours[1], theirs[1])
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0, equal_nan=True)  # NaN ≠ NaN for torch.equal


@pytest.mark.parametrize("k", [1, 8, 32, 64, 128, 200])
def test_row_topk_is_torch_topk_on_pre_activations(rng, k):
    """The kit's shapes (B 256, d_sae 4608): the hierarchy runs (topk_levels has levels) and agrees."""
    pre = torch.randn(256, 576, generator=rng) * 3 @ (torch.randn(576, 4608, generator=rng) / 24)
    assert len(saes_base.topk_levels(4608, k)) > 1
    assert_same_topk(pre, k)


@pytest.mark.parametrize("values", ["integers", "eighths", "floor"])
def test_row_topk_hands_rows_with_ties_to_torch_topk(rng, values):
    """Ties everywhere (small integers, values on a 1/8 grid, rows where only ~28 entries rise above a
    floor the rest sit on, as after a ReLU): the order among equal values is torch.topk's own."""
    pre = {"integers": torch.randint(0, 30, (128, 4608), generator=rng).float(),
           "eighths": (torch.randn(128, 4608, generator=rng) * 8).round() / 8,
           "floor": torch.randn(128, 4608, generator=rng).clamp_min(2.5)}[values]
    assert_same_topk(pre, 32)


def test_row_topk_without_its_tie_check_would_differ(rng, monkeypatch):
    """The tie check is what keeps rows with equal values right: skipping it (a hierarchy that trusts
    its own order among ties) gives other indices on tied data, so the test above can fail."""
    pre = torch.randint(0, 30, (128, 4608), generator=rng).float()
    real_any = torch.Tensor.any
    monkeypatch.setattr(torch.Tensor, "any", lambda t, *a, **kw: real_any(t, *a, **kw) & False
                        if t.dtype == torch.bool and t.dim() == 1 else real_any(t, *a, **kw))
    ours = row_topk(pre, 32)
    monkeypatch.undo()
    assert not torch.equal(ours[1], pre.topk(32, dim=1).indices)


def test_row_topk_answers_distinct_rows_itself(rng, monkeypatch):
    """On tie-free pre-activations no row is handed to torch.topk over the whole row (the speed-up
    is real): torch.topk only ever sees the narrowed rows."""
    pre = torch.randn(256, 576, generator=rng) @ (torch.randn(576, 4608, generator=rng) / 24)
    widths, real_topk = [], torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk", lambda t, *a, **kw: widths.append(t.shape[-1]) or real_topk(t, *a, **kw))
    row_topk(pre, 32)
    monkeypatch.undo()
    assert widths and max(widths) < 4608 // 8
    assert_same_topk(pre, 32)


def test_row_topk_when_the_largest_values_crowd_one_unit(rng):
    """The k + 1 largest values all in the descendants of one coarsest unit (columns ≡ u mod 72 at
    n = 4608, k = 16), and a row whose k-th and (k + 1)-th values are equal with the (k + 1)-th
    alone in its coarsest unit (levels keeping only k units could drop it and miss the tie)."""
    k, n = 16, 4608
    coarsest = saes_base.topk_levels(n, k)[-1]
    pre = torch.randn(96, n, generator=rng)
    crowd = torch.arange(5, n, coarsest)[:k + 1]  # one coarsest unit's columns
    pre[:48, crowd] = 10 + torch.rand(48, k + 1, generator=rng)
    top = 10 + torch.rand(48, k, generator=rng)
    pre[48:, crowd[:k]] = top
    pre[48:, 7] = top.min(1).values  # the k-th value again, in another coarsest unit
    assert_same_topk(pre, k)


def test_row_topk_nan_inf_and_signed_zero_rows(rng):
    pre = torch.randn(96, 4608, generator=rng)
    pre[3, 100] = float("nan")
    pre[5, 7] = float("inf")
    pre[6, :40] = float("-inf")
    pre[7] = 0.0
    pre[7, ::2] = -0.0
    pre[8, :3] = float("nan")
    assert_same_topk(pre, 16)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.int64])
def test_row_topk_levels_in_other_dtypes(rng, dtype):
    x = torch.randn(128, 4608, generator=rng) * 1000
    assert_same_topk(x.to(dtype), 32)


@pytest.mark.parametrize("shape, k", [((64, 16 * 33), 32), ((100, 4610), 32), ((32, 4608), 32), ((200, 96), 20),
                                      ((0, 4608), 8)])
def test_row_topk_at_the_edges_of_the_levels(rng, shape, k):
    """The narrowest rows the levels run on (16·(k + 1) columns), and where they do not: a width they
    do not divide, a batch under TOPK_ROWS_FROM, rows too short, an empty batch (torch.topk itself)."""
    assert_same_topk(torch.randn(*shape, generator=rng), k)


def test_row_topk_on_a_transposed_view_and_with_a_gradient(rng):
    """Not contiguous, or recording a gradient: torch.topk, so autograd sees its usual gradient."""
    pre = torch.randn(4608, 256, generator=rng).t()
    assert_same_topk(pre, 32)
    leaf = torch.randn(128, 4608, generator=rng, requires_grad=True)
    vals, _ = row_topk(leaf, 8)
    vals.sum().backward()  # torch.topk's own gradient: 1 at each kept entry
    assert int(leaf.grad.sum()) == 128 * 8


def test_topk_keeps_exactly_the_k_largest(rng):
    sae = topk_sae(8, 32, 3, seed=0)
    x = torch.randn(10, 8, generator=rng)
    z = sae.encode(x)
    pre = sae.pre_acts(x)
    for t in range(10):
        kept = set(torch.nonzero(z[t]).flatten().tolist())
        top = set(pre[t].topk(3).indices.tolist())
        assert kept <= top and len(kept) == int((pre[t].topk(3).values > 0).sum())


@pytest.mark.parametrize("k,d_sae", [(0, 10), (-1, 10), (10, 10), (11, 10)])
def test_bad_k_is_a_clear_error(k, d_sae):
    with pytest.raises(ValueError, match="0 < k < d_sae"):
        TopKConfig(d_in=4, d_sae=d_sae, k=k)


def test_wrong_input_width_is_a_clear_error():
    sae = topk_sae(8, 32, 3)
    with pytest.raises(ValueError, match="d_in=8"):
        sae.encode(torch.randn(4, 9))


def test_geometric_median_of_hand_checkable_points():
    # three points on a line and one far outlier: the median sits at the middle point, the mean doesn't
    x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0], [100.0, 0.0]])
    m = geometric_median(x, iters=500)
    assert 1.0 <= float(m[0]) <= 2.0 and abs(float(m[1])) < 1e-6
    sq = torch.tensor([[1.0, 1.0], [-1.0, 1.0], [1.0, -1.0], [-1.0, -1.0]])
    assert torch.allclose(geometric_median(sq), torch.zeros(2), atol=1e-5)


def test_training_lowers_fvu_keeps_decoder_unit_norm_and_tracks_dead(small_store):
    sae = topk_sae(576, 1152, 16, seed=0, dead_tokens=400)
    x = small_store.get("eval")
    before = sae_kit.reconstruction_metrics(sae, x)["fvu"]
    hist = sae_kit.train(sae, small_store, batch_size=128, epochs=2, progress=False)
    after = sae_kit.reconstruction_metrics(sae, x)["fvu"]
    assert after < 0.8 * before
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(1152), atol=1e-5)
    assert len(hist.fvu) == len(hist.dead) == len(hist.tokens) and hist.tokens[-1] > 0
    assert all(0 <= d <= 1 for d in hist.dead)


def test_training_called_inside_no_grad_still_trains(small_store):
    """A caller under `torch.no_grad()` (an evaluation helper, a notebook cell) gets the same weights."""
    def run(no_grad):
        sae = topk_sae(576, 1152, 8, seed=3)
        with torch.no_grad() if no_grad else torch.enable_grad():
            hist = sae_kit.train(sae, small_store, batch_size=128, progress=False, seed=5, max_steps=4)
        return hist.loss, sae.W_dec.detach().clone()

    (l1, w1), (l2, w2) = run(False), run(True)
    assert l1 == l2 and torch.equal(w1, w2)
    assert not torch.equal(w1, topk_sae(576, 1152, 8, seed=3).W_dec)  # it did train


def test_auxk_gives_dead_latents_gradient(rng):
    x = torch.randn(32, 16, generator=rng)
    sae = topk_sae(16, 64, 2, seed=0, k_aux=8, dead_tokens=1)
    sae.train()
    sae.tokens_since_fired[:32] = 100  # the first half are dead
    out = sae.loss(x)
    assert float(out["aux"]) > 0
    out["loss"].backward()
    # dead latents get gradient only through AuxK
    assert float(sae.W_dec.grad[:32].abs().sum()) > 0
    sae.zero_grad()
    sae.cfg.aux_coef = 0.0
    sae.tokens_since_fired[:32] = 100
    out = sae.loss(x)
    out["loss"].backward()
    never_selected = torch.ones(64, dtype=torch.bool)
    never_selected[sae.encode(x).nonzero()[:, 1]] = False
    assert float(sae.W_dec.grad[never_selected].abs().sum()) == 0


def test_same_seed_same_numbers(small_store):
    def run():
        torch.manual_seed(123)
        sae = topk_sae(576, 1152, 8, seed=3)
        hist = sae_kit.train(sae, small_store, batch_size=128, progress=False, seed=5, max_steps=6)
        return hist.loss, sae.W_dec.detach().clone()

    (l1, w1), (l2, w2) = run(), run()
    assert l1 == l2 and torch.equal(w1, w2)


def test_save_load_round_trip_is_exact_and_atomic(tmp_path, rng):
    sae = topk_sae(16, 64, 4, seed=2, model_name="m", hook_name="h")
    sae.tokens_since_fired += 7
    path = sae.save(tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]
    cfg = json.loads((path / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["metadata"]["hook_name"] == "h"
    again = sae_kit.load_sae(path)
    x = torch.randn(20, 16, generator=rng)
    assert torch.equal(again.reconstruct(x), sae.reconstruct(x))
    assert torch.equal(again.tokens_since_fired, sae.tokens_since_fired)
    sae.save(path)  # overwriting leaves one clean folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_sae_lens_loads_our_file_and_reconstructs_the_same(tmp_path, small_store):
    sae_lens = pytest.importorskip("sae_lens")
    sae = topk_sae(576, 1152, 16, seed=0)
    sae_kit.train(sae, small_store, batch_size=128, progress=False, max_steps=5)
    path = sae.save(tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(str(path), device="cpu")
    x = small_store.get("eval")[:256]
    with torch.no_grad():
        ours_hat, ours_z = sae(x)
        their_z = theirs.encode(x)
        their_hat = theirs.decode(their_z)
    assert type(theirs).__name__ == "TopKSAE"
    assert torch.allclose(their_z, ours_z, atol=1e-4)
    assert torch.allclose(their_hat, ours_hat, atol=1e-3)


@pytest.mark.parametrize("shape", [(1, 7), (300, 5), (256, 3), (513, 40)])
def test_copy_transposed_equals_the_plain_transpose_into_a_strided_view(shape, rng):
    """Blocks of 256 rows of src, a tail block, and a destination that is a slice of a wider matrix
    (how `gram_into` mirrors G's upper blocks)."""
    src = torch.randn(*shape, generator=rng)
    wide = torch.full((shape[1] + 3, shape[0] + 5), float("nan"))
    dst = wide[2:2 + shape[1], 4:4 + shape[0]]
    out = saes_base.copy_transposed(dst, src)
    assert out.data_ptr() == dst.data_ptr() and torch.equal(dst, src.t())
    assert torch.isnan(wide[:2]).all() and torch.isnan(wide[:, :4]).all()  # nothing outside the view
    assert torch.equal(saes_base._transposed(src), src.t()) and saes_base._transposed(src).is_contiguous()


def test_training_steps_reuse_one_pre_activation_buffer_and_inference_does_not(rng):
    """In training on CPU the B × d_sae pre-activations go into one buffer (per thread)
    (`training_buffer`); outside training `encode_sparse` hands back a fresh tensor a caller may keep."""
    x = torch.randn(64, 12, generator=rng)
    sae = topk_sae(12, 48, 4, aux_coef=0.0)
    from sae_kit.train import adam, train_step

    opt = adam(sae, 1e-3)
    sae.train()
    seen = set()
    for _ in range(3):
        code = sae.encode_sparse(x)
        seen.add(code.pre.data_ptr())
        train_step(sae, opt, x)
    assert len(seen) == 1 and saes_base._training_buffers()["pre"].data_ptr() in seen
    assert sae.encode_sparse(x[:32]).pre.shape == (32, 48)  # another batch size: reallocated to fit
    sae.eval()
    with torch.no_grad():
        kept = sae.encode_sparse(x).pre
    assert kept.data_ptr() != saes_base._training_buffers()["pre"].data_ptr()
    saes_base.release_training_buffers()
    assert not saes_base._training_buffers()


def test_sharing_the_training_buffers_changes_no_number(rng, monkeypatch):
    """SAEs trained step by step in turn share the thread's buffers (pre-activations, matching
    pursuit's Gram matrix, the g-SAE's score); each must end with the weights it gets when trained alone on fresh
    tensors (no buffer at all), and `train` frees the buffers when it returns."""
    from sae_kit.saes import choice_sae, gradient, gradient_sae, matching_pursuit, mp_sae
    from sae_kit.train import adam, train, train_step

    x = torch.randn(256, 16, generator=rng) * 2
    x[::17] *= 20  # a few high-norm tokens, as at layer 8
    g = torch.randn(256, 16, generator=rng)  # read by the g-SAE only

    def makers():
        return [lambda: topk_sae(16, 64, 4, seed=1, dead_tokens=256), lambda: choice_sae("mc", 16, 64, 4, seed=2),
                lambda: mp_sae(16, 64, 4, seed=3), lambda: gradient_sae(16, 64, 4, beta=0.5, seed=4)]

    def steps(saes, order):
        opts = [adam(s, 1e-2) for s in saes]
        for s in saes:
            s.train()
        for t in range(6):
            for i in order:
                b = slice(64 * (t % 4), 64 * (t % 4 + 1))
                train_step(saes[i], opts[i], x[b], g[b])
        return [torch.cat([p.detach().flatten() for p in s.parameters()]) for s in saes]

    together = steps([m() for m in makers()], [0, 1, 2, 3])
    with monkeypatch.context() as m:
        def fresh(name, shape, dtype, device):
            return torch.full(shape, float("nan"), dtype=dtype, device=device)
        m.setattr(saes_base, "training_buffer", fresh)
        m.setattr(matching_pursuit, "training_buffer", fresh)
        m.setattr(gradient, "training_buffer", fresh)
        alone = [steps([make()], [0])[0] for make in makers()]
    for a, b in zip(together, alone):
        assert torch.equal(a, b)
    train(topk_sae(16, 64, 4), x, batch_size=64, progress=False)
    assert not saes_base._training_buffers()


def test_training_buffers_are_per_thread_and_freed_when_training_stops(rng, monkeypatch):
    """Two trainings in two threads must not write into one buffer, and `train` frees the buffers
    however its loop ends (here: an interrupt after two steps, as an interrupted cell)."""
    import importlib
    import threading

    T = importlib.import_module("sae_kit.train")  # the module (`sae_kit.train` is also the function)

    mine = saes_base.training_buffer("pre", (4, 8), torch.float32, "cpu")
    theirs = []
    t = threading.Thread(target=lambda: theirs.append(saes_base.training_buffer("pre", (4, 8), torch.float32, "cpu")))
    t.start()
    t.join()
    assert theirs[0].data_ptr() != mine.data_ptr()
    assert saes_base.training_buffer("pre", (4, 8), torch.float32, "cpu").data_ptr() == mine.data_ptr()

    real_step, steps = T.train_step, []

    def interrupted(*a, **kw):
        out = real_step(*a, **kw)
        steps.append(len(saes_base._training_buffers()))
        if len(steps) == 2:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(T, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        T.train(topk_sae(16, 64, 4), torch.randn(256, 16, generator=rng), batch_size=64, progress=False)
    assert steps == [1, 1] and not saes_base._training_buffers()  # the pre buffer, then freed


@pytest.mark.parametrize("density", [0.0, 0.003, 0.03, 0.2, 0.9])
@pytest.mark.parametrize("shape", [(64, 4608), (37, 771), (1, 8), (0, 16), (16, 0)])
def test_mask_pairs_equals_nonzero(density, shape, rng):
    """`mask_pairs` is ``nonzero(as_tuple=True)``: the same rows and columns in the same order, for
    sparse masks (the 64-bit word path), dense ones (over half the words set: plain nonzero), sizes
    that are not a multiple of 8, and empty ones."""
    mask = torch.rand(*shape, generator=rng) < density
    rows, cols = saes_base.mask_pairs(mask)
    expect = mask.nonzero(as_tuple=True)
    assert torch.equal(rows, expect[0]) and torch.equal(cols, expect[1])


def test_mask_pairs_reads_words_and_handles_views(rng, monkeypatch):
    """A sparse mask is never handed to nonzero flag by flag (the word path is what runs), and views
    whose flags are not 8-aligned words (a transpose, a slice at an odd offset) still give nonzero's
    answer."""
    mask = torch.rand(256, 4608, generator=rng) < 0.01
    mask[7, :] = True  # a dense row, and the flags at the very ends
    mask[-1, -1] = True
    seen, real_nonzero = [], torch.Tensor.nonzero
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda t, *a, **kw: seen.append(t.numel()) or real_nonzero(t, *a, **kw))
    rows, cols = saes_base.mask_pairs(mask)
    monkeypatch.undo()
    assert seen and max(seen) < mask.numel() // 2
    expect = mask.nonzero(as_tuple=True)
    assert torch.equal(rows, expect[0]) and torch.equal(cols, expect[1])
    for view in (mask.t(), mask[:, 3:], mask.view(-1)[3:3 + 255 * 4608].view(255, 4608)):
        rows, cols = saes_base.mask_pairs(view)
        expect = view.nonzero(as_tuple=True)
        assert torch.equal(rows, expect[0]) and torch.equal(cols, expect[1])


@pytest.mark.parametrize("bound", [1, 7, 4608, 2 ** 15, 2 ** 15 + 1, 5 * 10 ** 6, 2 ** 31 + 5])
def test_sort_keys_is_torch_sort_stable(bound, rng):
    """`sort_keys` sorts in a narrower integer type and still returns torch.sort(stable=True)'s order,
    ties (many equal keys) included; `by_col`'s offsets are where each latent's run starts."""
    keys = torch.randint(0, min(bound, 2 ** 62), (20_000,), generator=rng)
    keys[::3] = keys[0]  # heavy ties
    values, order = saes_base.sort_keys(keys, bound)
    expect = torch.sort(keys, stable=True)
    assert torch.equal(order, expect.indices) and torch.equal(values.long(), expect.values)
    if bound <= 5000:
        got_order, offsets = saes_base.by_col(keys, bound)
        assert torch.equal(got_order, expect.indices)
        assert torch.equal(offsets, torch.searchsorted(expect.values, torch.arange(bound)))
