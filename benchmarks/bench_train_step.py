"""Side-by-side cost of one SAE training step, as ratios measured in one run (`make bench`).

Section 1 puts the kit's TopK step next to SAELens's own TopK training step (training_forward_pass,
backward, grad-norm clip, Adam, as its SAETrainer runs it) on the same batches, with AuxK idle (no
dead latents) and on (10% of latents dead), at two batch sizes. The "floor" row is the work any
TopK step must do: the encoder GEMM (x − b_dec)·W_enc + b_enc (into a buffer kept between steps)
and the per-token top-k, the top-k taken the kit's way (`row_topk`, the same result as
``torch.topk``); "floor, torch.topk" is the same work with ``torch.topk``, for what the top-k alone
costs. The "least exact step" row adds to the floor only what an exact TopK step cannot skip with the
kit's kernels (`least_grads`: the sparse decode, the three sparse backward passes, one fused Adam
update): its ratio to SAELens is the most any step built from these kernels could reach.
Section 2 times every other dictionary against the kit's TopK (selection cost: auxiliary losses
idle), and the g-SAE's extra product alone (a g-SAE step costs at least TopK's plus it), on real
layer-8 activations (`--data random` for Gaussian batches, which hide the batch
rules' cost on the few high-norm tokens); section 3 the kit's matching pursuit against the textbook autograd pursuit; section 4 the
harvest's tokens/s against the bare model on the same windows (a forward to the hooked layer; with
gradients, a full forward and backward). Contenders are interleaved round by round, so
machine noise hits them alike; ratios are medians of per-round ratios. Peak RSS is measured per
contender in a fresh subprocess (a few steps alone), so one contender's memory does not hide
another's. Shapes: d_in 576, d_sae 4608, k 32 (override with flags).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sae_kit.saes import choice_sae, fvu_loss, gradient_sae, mp_sae, row_topk, topk_sae
from sae_kit.activations import _forward
from sae_kit.saes.base import by_col
from sae_kit.config import cpu_name
from sae_kit.train import adam, train_step

DEAD_SHARE = 0.10
DEVICE = torch.device("cpu")  # --device; contenders and batches live there


def where() -> str:
    """The machine the numbers come from, for the tables' titles: ratios move with the processor
    (its caches decide how the sparse and blocked kernels fare against the GEMM)."""
    if DEVICE.type == "cuda":
        return f"{torch.cuda.get_device_name(DEVICE)}"
    return f"{torch.get_num_threads()} threads of {cpu_name()}"


def sync():
    """Wait for queued GPU work, so a step's time is its own (a no-op on CPU)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


# ---- contenders: each is make(args, batch) -> step() -----------------------------------------
def kit_topk(a, x, dead):
    sae = topk_sae(a.d_in, a.d_sae, a.k, device=DEVICE)
    return _kit(sae, x, dead)


def _kit(sae, x, dead, g=None):
    sae.train()
    opt = adam(sae, 1e-4)
    n_dead = int(dead * sae.cfg.d_sae)

    def step():
        if n_dead:  # keep the same latents dead every step (the bench is about cost, not learning)
            sae.tokens_since_fired[:n_dead] = sae.cfg.dead_tokens
        train_step(sae, opt, x, g)
    return step


def saelens_topk(a, x, dead):
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=a.d_in, d_sae=a.d_sae, k=a.k, dtype="float32",
                                                device=str(DEVICE), aux_loss_coefficient=1 / 32))
    sae.train()
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)
    mask = torch.zeros(a.d_sae, dtype=torch.bool, device=DEVICE)
    mask[:int(dead * a.d_sae)] = True

    def step():
        out = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=mask,
                                                       n_training_steps=0, is_logging_step=False))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    return step


def floor(a, x, dead, select=row_topk):
    """The encoder GEMM and the top-k: what every TopK step must compute, nothing else. The GEMM
    writes into one buffer kept between steps, as the kit's training step does (`training_buffer`):
    a fresh B × d_sae output would add its page faults to the floor."""
    W, b = torch.randn(a.d_in, a.d_sae, device=DEVICE) / a.d_in ** 0.5, torch.zeros(a.d_sae, device=DEVICE)
    out = torch.empty(len(x), a.d_sae, device=DEVICE)

    def step():
        select(torch.addmm(b, x, W, out=out), a.k)
    return step


def least(a, x, dead):
    """The part of an exact TopK step that the kit's kernels cannot skip (`least_grads`, then one fused
    Adam update of the four parameters): no autograd, no AuxK, no decoder geometry, and W_enc held
    latent-major so its gradient needs no transpose. A bound on the step, not a step that learns."""
    d_in, n = a.d_in, a.d_sae
    W_dec = torch.randn(n, d_in, device=DEVICE) / d_in ** 0.5
    params = [p.requires_grad_() for p in (W_dec.clone(), W_dec, torch.zeros(n, device=DEVICE),
                                           torch.zeros(d_in, device=DEVICE))]
    opt = torch.optim.Adam(params, lr=1e-4, eps=6.25e-10, fused=True)
    out = torch.empty(len(x), n, device=DEVICE)

    def step():
        for p, g in zip(params, least_grads(x, *params, a.k, out)):
            p.grad = g
        opt.step()
    return step


@torch.no_grad()
def least_grads(x, W_enc_t, W_dec, b_enc, b_dec, k, out=None):
    """Gradients of ½‖x̂ − x‖² for (W_encᵀ, W_dec, b_enc, b_dec) of a TopK SAE, by the kit's kernels with
    nothing else: the encoder GEMM (into `out`) and `row_topk`, the decode as an embedding_bag, ∂vals
    as embedding_bag's per-pair dot product, ∂W_dec and ∂W_encᵀ as embedding_bags over the pairs
    sorted by latent (`by_col`), ∂b_enc an index_add, ∂b_dec one matrix-vector product."""
    B, n = x.shape[0], W_dec.shape[0]
    rows = torch.arange(B, device=x.device).repeat_interleave(k)
    offsets = torch.arange(0, B * k, k, device=x.device)
    x_c = x - b_dec
    vals, idx = row_topk(torch.addmm(b_enc, x_c, W_enc_t.t(), out=out), k)
    cols, vals = idx.reshape(-1), vals.reshape(-1).relu()
    g_out = F.embedding_bag(cols, W_dec, offsets, mode="sum", per_sample_weights=vals) + b_dec - x
    g_vals = torch.ops.aten._embedding_bag_per_sample_weights_backward(g_out, W_dec, cols, offsets, rows, 0)
    g_vals = g_vals * (vals > 0)
    order, col_offsets = by_col(cols, n)
    by_latent = rows[order]
    g_W_dec = F.embedding_bag(by_latent, g_out, col_offsets, mode="sum", per_sample_weights=vals[order])
    g_W_enc_t = F.embedding_bag(by_latent, x_c, col_offsets, mode="sum", per_sample_weights=g_vals[order])
    g_b_enc = torch.zeros(n, device=x.device).index_add_(0, cols, g_vals)
    return g_W_enc_t, g_W_dec, g_b_enc, g_out.sum(0) - W_enc_t.t() @ g_b_enc


def floor_torch_topk(a, x, dead):
    """The floor with ``torch.topk`` for the top-k."""
    return floor(a, x, dead, lambda pre, k: pre.topk(k, dim=-1))


def dense_topk(a, x, dead):
    """The same TopK math written as plain dense autograd (z scattered into a B×d_sae matrix)."""
    sae = topk_sae(a.d_in, a.d_sae, a.k, aux_coef=0.0, device=DEVICE)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step():
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc
        v, i = pre.topk(sae.cfg.k, -1)
        z = torch.zeros_like(pre).scatter(-1, i, torch.relu(v))
        loss = fvu_loss(x, z @ sae.W_dec + sae.b_dec)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def kit_mc(a, x, dead):
    return _kit(choice_sae("mc", a.d_in, a.d_sae, a.k, device=DEVICE), x, dead)


def kit_fc(a, x, dead):
    return _kit(choice_sae("fc", a.d_in, a.d_sae, a.k, device=DEVICE), x, dead)


def kit_fc_zipf(a, x, dead):
    return _kit(choice_sae("fc", a.d_in, a.d_sae, a.k, capacity="zipf", aux="none", device=DEVICE), x, dead)


def kit_gsae(a, x, dead):
    g = torch.randn_like(x)
    return _kit(gradient_sae(a.d_in, a.d_sae, a.k, beta=0.3, device=DEVICE), x, dead, g)


def gsae_gemm(a, x, dead):
    """The product the g-SAE's score adds to a TopK step, alone: g·W_decᵀ, one B × d_in × d_sae GEMM
    into a kept buffer. A g-SAE step costs at least a TopK step plus this."""
    g, W = torch.randn_like(x), torch.randn(a.d_sae, a.d_in, device=DEVICE) / a.d_in ** 0.5
    out = torch.empty(len(x), a.d_sae, device=DEVICE)

    def step():
        torch.mm(g, W.t(), out=out)
    return step


def kit_mp(a, x, dead):
    return _kit(mp_sae(a.d_in, a.d_sae, a.k, device=DEVICE), x, 0.0)


def textbook_mp(a, x, dead):
    """Matching pursuit as usually written: correlations recomputed (and differentiated) each step."""
    sae = mp_sae(a.d_in, a.d_sae, a.k, device=DEVICE)
    opt = torch.optim.Adam(sae.parameters(), lr=1e-4)

    def step():
        r = x - sae.b_dec
        for _ in range(sae.cfg.k):
            c = r @ sae.W_dec.t()
            j = c.argmax(1, keepdim=True)
            r = r - torch.relu(c.gather(1, j)) * sae.W_dec[j[:, 0]]
        loss = fvu_loss(x, x - r)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


CONTENDERS = {f.__name__: f for f in (kit_topk, saelens_topk, floor, least, floor_torch_topk, dense_topk, kit_mc, kit_fc,
                                      kit_fc_zipf, kit_gsae, gsae_gemm, kit_mp, textbook_mp)}


# ---- timing -----------------------------------------------------------------------------------
def time_rounds(steps: dict, rounds: int) -> dict[str, list[float]]:
    """Seconds per step of each contender, interleaved round by round (one warm-up step each)."""
    for step in steps.values():
        step()
    sync()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - t)
    return times


def ratio(times, num, den) -> float:
    """Median over rounds of time[num] / time[den]."""
    return statistics.median(a / b for a, b in zip(times[num], times[den]))


def peak_rss_mb(name: str, dead: float, a, batch: int) -> float:
    """Memory one contender's step needs: the peak resident set of a fresh process over 3 steps,
    minus its resident set once the contender and batch are built (Linux: peak reset through
    /proc/self/clear_refs)."""
    code = (f"import sys,torch; torch.set_num_threads({torch.get_num_threads()});"
            f"import benchmarks.bench_train_step as b; a=b.parse([]);"
            f"a.d_in,a.d_sae,a.k={a.d_in},{a.d_sae},{a.k};"
            f"x=torch.randn({batch},{a.d_in})*3; s=b.CONTENDERS[{name!r}](a,x,{dead});"
            f"base=b.rss_kb('VmRSS'); open('/proc/self/clear_refs','w').write('5');"
            f"[s() for _ in range(3)]; print(b.rss_kb('VmHWM')-base)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def rss_kb(field: str) -> int:
    """A field of /proc/self/status, in kB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def table(title, rows):
    print(f"\n{title}")
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for j, r in enumerate(rows):
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def saelens_rows():
    """Section 1's rows: (name, contender, dead share, the SAELens row it is compared with or None)."""
    rows = [("floor", "floor", 0.0, None), ("floor, torch.topk", "floor_torch_topk", 0.0, None),
            ("least exact step", "least", 0.0, "SAELens TopK, aux idle")]
    for dead, tag in ((0.0, "aux idle"), (DEAD_SHARE, f"{DEAD_SHARE:.0%} dead, aux on")):
        rows += [(f"SAELens TopK, {tag}", "saelens_topk", dead, f"SAELens TopK, {tag}"),
                 (f"kit TopK, {tag}", "kit_topk", dead, f"SAELens TopK, {tag}")]
    return rows


def section_saelens(a, results):
    for batch in a.batches:
        torch.manual_seed(0)
        x = torch.randn(batch, a.d_in, device=DEVICE) * 3
        spec = saelens_rows()
        times = time_rounds({name: CONTENDERS[c](a, x, dead) for name, c, dead, _ in spec}, a.rounds)
        rows = [("step", "ms/step", "vs SAELens (same aux)", "vs floor", "step memory MB")]
        for name, contender, dead, versus in spec:
            ms = 1000 * statistics.median(times[name])
            vs_sl = ratio(times, versus, name) if versus else float("nan")
            vs_floor = ratio(times, "floor", name)
            rss = peak_rss_mb(contender, dead, a, batch) if a.rss else float("nan")
            rows.append((name, f"{ms:.0f}", f"{vs_sl:.2f}x" if versus else "", f"{100 * vs_floor:.0f}%", f"{rss:.0f}"))
            results[f"b{batch} {name}"] = {"ms": ms, "vs_saelens": vs_sl, "vs_floor": vs_floor, "peak_rss_mb": rss}
        table(f"TopK training step, batch {batch}, d_in {a.d_in}, d_sae {a.d_sae}, k {a.k}, "
              f"{where()}, {a.rounds} rounds (vs SAELens: its time / ours; "
              f"vs floor: floor / ours)", rows)


def section_dense(a, results):
    """The kit's TopK step against the same math as plain dense autograd, and the floor: which path
    wins depends on the device (on a GPU the dense GEMMs are cheap and the sparse gathers are not)."""
    for batch in a.batches:
        torch.manual_seed(0)
        x = torch.randn(batch, a.d_in, device=DEVICE) * 3
        steps = {"floor": floor(a, x, 0), "kit_topk": kit_topk(a, x, 0.0), "dense_topk": dense_topk(a, x, 0.0)}
        times = time_rounds(steps, a.rounds)
        rows = [("step", "ms/step", "vs kit TopK (its time / the kit's)")]
        for n, ts in times.items():
            r = ratio(times, n, "kit_topk")
            rows.append((n, f"{1000 * statistics.median(ts):.2f}", f"{r:.2f}x"))
            results[f"b{batch} dense {n}"] = {"ms": 1000 * statistics.median(ts), "vs_kit_topk": r}
        table(f"TopK step, kit (sparse backward) against dense autograd, batch {batch}, d_sae {a.d_sae}, "
              f"{where()} (aux idle)", rows)


def layer8_activations(n: int, d_in: int) -> torch.Tensor:
    """n real activations at the kit's default layer (a small harvest in a temporary folder): the
    batch rules' cost depends on the data. At layer 8 a few high-norm tokens take hundreds of
    latents under Mutual Choice, which Gaussian batches never show."""
    import shutil
    import tempfile

    from sae_kit import harvest, load_model

    model = load_model()
    if model.cfg.d_model != d_in:
        raise SystemExit(f"--data real needs --d-in {model.cfg.d_model} (the model's width); pass --data random")
    tmp = Path(tempfile.mkdtemp(prefix="sae-kit-bench-"))
    try:
        store = harvest(model, "blocks.8.hook_resid_post", n_tokens=n, path=tmp / "store", progress=False,
                        dtype="float32")
        return store.get("train", n).clone()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


FAMILY_LABELS = {"gsae_gemm": "gsae_gemm (the g-SAE's extra GEMM alone)"}


def section_family(a, results):
    real = layer8_activations(max(a.batches), a.d_in) if a.data == "real" else None
    for batch in a.batches:
        torch.manual_seed(0)
        x = (real[:batch] if real is not None else torch.randn(batch, a.d_in) * 3).to(DEVICE)
        names = ["kit_topk", "kit_mc", "kit_fc", "kit_fc_zipf", "kit_gsae", "gsae_gemm", "kit_mp"]
        steps = {n: CONTENDERS[n](a, x, 0.0) for n in names}
        times = time_rounds(steps, a.rounds)
        rows = [("dictionary", "ms/step", "vs kit TopK (its time / TopK's)")]
        for n in names:
            r = ratio(times, n, "kit_topk")
            rows.append((FAMILY_LABELS.get(n, n), f"{1000 * statistics.median(times[n]):.0f}", f"{r:.2f}x"))
            results[f"b{batch} family {n}"] = {"ms": 1000 * statistics.median(times[n]), "vs_topk": r}
        data = "real layer-8 activations" if real is not None else "Gaussian batches"
        table(f"Every dictionary's step against TopK's, batch {batch}, {data} (aux idle)", rows)


def section_mp(a, results):
    x = torch.randn(a.batches[0] // 4, a.d_in, device=DEVICE) * 3
    steps = {n: CONTENDERS[n](a, x, 0.0) for n in ("kit_mp", "textbook_mp")}
    times = time_rounds(steps, a.rounds)
    r = ratio(times, "textbook_mp", "kit_mp")
    results["mp textbook/kit"] = r
    table(f"Matching pursuit, batch {len(x)}", [("step", "ms/step"), *(
        (n, f"{1000 * statistics.median(t):.0f}") for n, t in times.items()), ("textbook / kit", f"{r:.2f}x")])


def section_harvest(a, results):
    """Tokens/s of `harvest` against a bare forward (and forward + backward) on the same windows."""
    import shutil
    import tempfile

    from sae_kit import ActivationStore, harvest, load_model
    from sae_kit.activations import validate_hook

    model = load_model()
    hook = "blocks.8.hook_resid_post"
    layer = validate_hook(model, hook)
    rows = [("harvest", "tokens/s", "bare model, tokens/s", "harvest / bare")]
    for grads in (False, True):
        tag = "with gradients" if grads else "activations"
        t_h, t_b = [], []
        for r in range(a.harvest_rounds):
            tmp = Path(tempfile.mkdtemp(prefix="sae-kit-bench-"))
            try:
                t = time.perf_counter()
                harvest(model, hook, n_tokens=a.harvest_tokens, path=tmp / "store", with_grads=grads,
                        progress=False, seed=r)
                t_h.append(time.perf_counter() - t)
                toks = ActivationStore(tmp / "store").tokens
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            t = time.perf_counter()
            for w0 in range(0, len(toks), 32):  # harvest's batch_windows
                _bare(model, toks[w0:w0 + 32], layer, grads)
            t_b.append(time.perf_counter() - t)
        n = a.harvest_tokens
        ratio_ = statistics.median(b / h for h, b in zip(t_h, t_b))
        rows.append((tag, f"{n / statistics.median(t_h):.0f}", f"{n / statistics.median(t_b):.0f}", f"{ratio_:.2f}x"))
        results[f"harvest {tag}"] = {"tokens_per_s": n / statistics.median(t_h),
                                     "bare_tokens_per_s": n / statistics.median(t_b), "ratio": ratio_}
    table(f"Harvest at {hook}, {a.harvest_tokens} tokens, {a.harvest_rounds} rounds (harvest / bare: "
          f"harvest's tokens/s over the bare model's)", rows)


def _bare(model, toks, layer, grads):
    """The model's own work for one batch, as the harvest runs it (`activations._forward`), without
    the conversion, the disk writes and the progress file."""
    _forward(model, toks.long(), f"blocks.{layer}.hook_resid_post", layer, grads)


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sections", nargs="+", default=["saelens", "family", "mp", "harvest"],
                    help="any of saelens family mp harvest dense (dense: the kit against plain dense autograd)")
    ap.add_argument("--data", choices=["real", "random"], default="real",
                    help="the family section's batches: real layer-8 activations (default) or Gaussian")
    ap.add_argument("--harvest-tokens", type=int, default=8192)
    ap.add_argument("--harvest-rounds", type=int, default=3)
    ap.add_argument("--no-rss", dest="rss", action="store_false", help="skip the peak-RSS subprocesses")
    ap.add_argument("--json", help="also write the numbers to this file")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda: where contenders and batches live")
    return ap.parse_args(argv)


def main():
    global DEVICE
    a = parse()
    DEVICE = torch.device(a.device)
    if DEVICE.type == "cuda":
        a.rss = False  # peak RSS is host memory: it says nothing about a GPU step
    results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "device": where()}
    for s in a.sections:
        {"saelens": section_saelens, "family": section_family, "mp": section_mp, "harvest": section_harvest,
         "dense": section_dense}[s](a, results)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
