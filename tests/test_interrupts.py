"""Runs killed with a real SIGKILL, and two processes writing one store at once.

Each scenario runs in child processes (one torch thread each, so results are bitwise comparable)
that kill themselves at a chosen moment with ``os.kill(os.getpid(), SIGKILL)``: no clean-up code
runs, exactly as when a kernel dies or a user pulls the plug.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sae_kit
from sae_kit.saes import load_sae

HOOK = "blocks.4.hook_resid_post"


def run(code: str, *args, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout)


KILL_AT_CALL = """
    import os, signal
    def kill_at(obj, name, n):
        '''SIGKILL this process on the n-th call of obj.name.'''
        real, calls = getattr(obj, name), [0]
        def wrapped(*a, **k):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        setattr(obj, name, wrapped)
"""

TRAIN = KILL_AT_CALL + """
    import sys, torch, sae_kit
    torch.set_num_threads(1)
    arch, ckpt, out, kill = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    x = torch.randn(3000, 16, generator=torch.Generator().manual_seed(0)) * 2 + 0.5
    if arch == "topk":  # AuxK on (latents die after 300 tokens)
        sae = sae_kit.topk_sae(16, 64, 4, seed=0, dead_tokens=300, k_aux=8)
    else:  # matching pursuit with atom dropout: a random generator outside the state dict
        sae = sae_kit.mp_sae(16, 64, 4, seed=0, dropout=0.5, dropout_tokens=10**6)
    if kill:
        kill_at(sae, "loss", kill)
    hist = sae_kit.train(sae, x, batch_size=100, epochs=3, checkpoint=ckpt, checkpoint_every=7, progress=False)
    torch.save({"state": sae.state_dict(), "fvu": hist.fvu, "steps": hist.step}, out)
"""


@pytest.mark.parametrize("arch", ["topk", "mp"])
def test_training_killed_resumes_to_identical_weights(arch, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    killed = run(TRAIN, arch, ckpt, tmp_path / "never.pt", 40)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert ckpt.exists() and not (tmp_path / "never.pt").exists()
    resumed = run(TRAIN, arch, ckpt, tmp_path / "resumed.pt", 0)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming training from step 35" in resumed.stdout
    assert not ckpt.exists()  # removed once training finished
    fresh = run(TRAIN, arch, tmp_path / "other.ckpt", tmp_path / "fresh.pt", 0)
    assert fresh.returncode == 0, fresh.stderr
    a, b = torch.load(tmp_path / "resumed.pt"), torch.load(tmp_path / "fresh.pt")
    assert a["steps"] == list(range(90)) and a["fvu"] == b["fvu"]
    for name, t in b["state"].items():
        assert torch.equal(a["state"][name], t), name


SAVE = KILL_AT_CALL + """
    import sys, torch, sae_kit, sae_kit.fsutil as fs, safetensors.torch as st
    path, stage = sys.argv[1], sys.argv[2]
    sae_kit.topk_sae(16, 64, 4, seed=0).save(path)  # version 1
    if stage == "writing":  # killed while the new weights are half written
        kill_at(st, "save_file", 2)
    else:  # killed between moving the old version aside and moving the new one in
        kill_at(fs.os, "replace", 2)
    sae_kit.topk_sae(16, 64, 4, seed=1).save(path)  # version 2, never finishes
"""


@pytest.mark.parametrize("stage", ["writing", "swapping"])
def test_save_killed_keeps_the_previous_sae(stage, tmp_path):
    path = tmp_path / "sae"
    r = run(SAVE, path, stage)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert len(list(tmp_path.iterdir())) >= 2  # debris of the killed save is on disk
    v1 = sae_kit.topk_sae(16, 64, 4, seed=0)
    assert torch.equal(load_sae(path).W_dec, v1.W_dec)  # the previous version, whole
    v3 = sae_kit.topk_sae(16, 64, 4, seed=3)
    v3.save(path)  # the next save cleans up after the dead one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert torch.equal(load_sae(path).W_dec, v3.W_dec)


HARVEST = KILL_AT_CALL + """
    import sys, time, pathlib, sae_kit, sae_kit.activations as A
    path, mode, corpus = sys.argv[1], sys.argv[2], sys.argv[3] or None
    model = sae_kit.load_model(device="cpu")
    if mode == "kill":
        A.CHECKPOINT_SECONDS = 0  # a resume point after every batch, so the kill lands after some
        kill_at(A, "_forward", 3)
    else:  # two racers: start together once both have loaded the model
        me, other = pathlib.Path(path + "." + mode), pathlib.Path(path + "." + ("b" if mode == "a" else "a"))
        me.write_text("ready")
        while not other.exists():
            time.sleep(0.05)
    s = sae_kit.harvest(model, "%s", n_tokens=1240, ctx_len=64, eval_tokens=124, batch_windows=4, path=path,
                        corpus=corpus, progress=False)
    print("rows", len(s))
""" % HOOK


def test_harvest_killed_resumes_to_identical_data(model, tmp_path):
    r = run(HARVEST, tmp_path / "s", "kill", "")
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert not (tmp_path / "s").exists()
    assert json.loads((tmp_path / "s.partial" / "progress.json").read_text())["windows_done"] == 8  # 2 batches of 4
    kw = dict(n_tokens=1240, ctx_len=64, eval_tokens=124, batch_windows=4, progress=False)
    resumed = sae_kit.harvest(model, HOOK, path=tmp_path / "s", **kw)
    fresh = sae_kit.harvest(model, HOOK, path=tmp_path / "fresh", **kw)
    np.testing.assert_array_equal(np.asarray(resumed.acts), np.asarray(fresh.acts))
    assert not (tmp_path / "s.partial").exists()


def test_two_processes_harvest_one_store(model, tmp_path):
    path = tmp_path / "shared"
    corpus = tmp_path / "corpus.txt"  # a small file: both racers reach the lock within milliseconds
    corpus.write_text("\n\n".join(sae_kit.stdlib_docs()[:60]))
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(HARVEST), str(path), who, str(corpus)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for who in "ab"]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        assert "rows 1240" in out
    waited = [err for _, err in outs if "waiting for the activation store" in err]
    assert len(waited) == 1, "one run should have waited for the other"
    assert "another run is writing it (pid" in waited[0]
    fresh = sae_kit.harvest(model, HOOK, n_tokens=1240, ctx_len=64, eval_tokens=124, batch_windows=4,
                            path=tmp_path / "alone", corpus=str(corpus), progress=False)
    np.testing.assert_array_equal(np.asarray(sae_kit.ActivationStore(path).acts), np.asarray(fresh.acts))
    assert not Path(str(path) + ".partial").exists()


HOLD = """
    import sys, time, pathlib
    from sae_kit.fsutil import locked
    with locked(pathlib.Path(sys.argv[1]), "the activation store"):
        pathlib.Path(sys.argv[2]).write_text("holding")
        time.sleep(30)
"""


def test_a_busy_store_names_the_run_holding_it(tmp_path):
    from sae_kit.fsutil import ArtefactBusyError, locked

    path, flag = tmp_path / "store", tmp_path / "holding"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), str(path), str(flag)], env=env)
    try:
        for _ in range(2400):  # a busy machine (parallel test workers) can be slow to start it
            if flag.exists():
                break
            holder.poll()
            assert holder.returncode is None, "the lock holder died"
            time.sleep(0.05)
        assert flag.exists(), "the lock holder did not take the lock within 120 s"
        with pytest.raises(ArtefactBusyError, match=rf"another run \(pid {holder.pid} on"):
            with locked(path, "the activation store", timeout=0.5):
                pass
    finally:
        holder.kill()
        holder.wait()
    with locked(path, "the activation store", timeout=5):  # a killed holder leaves no stale lock
        pass


TRAIN_CACHED = """
    import sys, time, pathlib, torch, sae_kit
    torch.set_num_threads(1)
    store_path, sync, me = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
    store = sae_kit.ActivationStore(store_path)
    (sync / me).write_text("ready")  # start together: both reach train_cached within milliseconds
    while len(list(sync.iterdir())) < 2:
        time.sleep(0.02)
    sae, hist = sae_kit.train_cached(sae_kit.topk_sae(store.d_in, 512, 8, seed=0), store, batch_size=64, epochs=4,
                                     progress=False)
    torch.save(sae.state_dict(), sync.parent / f"{me}.pt")
"""


def test_two_kernels_training_one_cached_sae_train_it_once(small_store, tmp_path):
    """Two notebooks open at once asking for the same SAE: one trains, the other waits and loads it."""
    (tmp_path / "sync").mkdir()
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "SAE_KIT_CACHE": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(TRAIN_CACHED), str(small_store.path),
                               str(tmp_path / "sync"), who], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for who in "ab"]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err
    waited = [err for _, err in outs if "waiting for the cached SAE topk k=8" in err]
    assert len(waited) == 1, f"one kernel should have waited for the other: {[e for _, e in outs]}"
    entries = [p for p in (tmp_path / "cache" / "saes").iterdir() if p.is_dir()]
    assert len(entries) == 1 and (entries[0] / "history.json").exists()
    assert not list((tmp_path / "cache" / "saes").glob("*.ckpt"))
    a, b = torch.load(tmp_path / "a.pt"), torch.load(tmp_path / "b.pt")
    for name, t in a.items():
        assert torch.equal(b[name], t), name
