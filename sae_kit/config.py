"""Scale profiles, device choice, cache directory and `setup(seed)`.

One switch, the environment variable ``SAE_KIT_SCALE`` (``ci`` | ``lab`` | ``paper``), picks every
size in the kit; notebooks run the same code at every scale.
"""

from __future__ import annotations

import os
import random
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

SCALES = ("ci", "lab", "paper")


@dataclass(frozen=True)
class Scale:
    """Sizes shared by every notebook at one scale. Sizes that only one paper's analysis uses live
    with that analysis (e.g. `gradient_eval.sizes`, `concepts.sizes`), keyed by the same scale name."""

    name: str
    n_tokens: int  # tokens harvested into the activation store
    ctx_len: int  # tokens per window; Gao et al. use 64 for GPT-2
    batch_size: int  # SAE training batch, in tokens
    expansion: int  # d_sae = expansion * d_in
    k: int  # default TopK sparsity
    k_sweep: tuple[int, ...]  # k values for frontier plots
    width_sweep: tuple[int, ...]  # expansions d_sae / d_in for scaling plots (dark matter)
    epochs: int  # passes over the store's training split
    eval_tokens: int  # held-out tokens for FVU / L0 / density
    ce_seqs: int  # sequences for spliced cross-entropy (ΔCE, KL)
    seeds: tuple[int, ...]  # seeds for error bars where gaps are small
    dead_tokens: int  # a latent is dead after this many training tokens without firing (AuxK)


_PROFILES = {
    "ci": Scale(
        "ci", n_tokens=24_576, ctx_len=64, batch_size=512, expansion=4, k=16, k_sweep=(8, 16, 32),
        width_sweep=(1, 2, 4), epochs=1, eval_tokens=4_096, ce_seqs=16, seeds=(0,), dead_tokens=8_192),
    # lab: small batches and two epochs give ~400 optimiser steps per SAE (~45 s on 2 cores)
    "lab": Scale(
        "lab", n_tokens=204_800, ctx_len=64, batch_size=1024, expansion=8, k=32, k_sweep=(8, 16, 32, 64),
        width_sweep=(1, 2, 4, 8), epochs=2, eval_tokens=20_480, ce_seqs=64, seeds=(0, 1), dead_tokens=50_000),
    # paper: a GPU; the offline corpus holds ~410k tokens, so paper scale goes wide and many
    # epochs over all of it (give a larger corpus to harvest() for more tokens)
    "paper": Scale(
        "paper", n_tokens=360_000, ctx_len=64, batch_size=4096, expansion=16, k=32, k_sweep=(8, 16, 32, 64),
        width_sweep=(2, 4, 8, 16, 32), epochs=8, eval_tokens=40_960, ce_seqs=256, seeds=(0, 1, 2),
        dead_tokens=1_000_000),
}


def scale_name(scale: "Scale | str | None" = None) -> str:
    """The name of a scale (a `Scale`, a name, or None for ``SAE_KIT_SCALE``), checked."""
    if isinstance(scale, Scale):
        return scale.name
    return get_scale(scale).name


def get_scale(name: str | None = None, **overrides) -> Scale:
    """Return the scale profile named by `name`, else by ``SAE_KIT_SCALE`` (default ``lab``).

    Args:
        name: ``ci``, ``lab`` or ``paper``; None reads the environment variable.
        **overrides: fields to change, e.g. ``get_scale("ci", k=8)``.
    """
    name = (name or os.environ.get("SAE_KIT_SCALE") or "lab").strip().lower()
    if name not in _PROFILES:
        raise ValueError(f"unknown scale {name!r}; SAE_KIT_SCALE must be one of {', '.join(SCALES)}")
    return replace(_PROFILES[name], **overrides)


def get_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present, else CPU. Apple MPS only when asked for by name.

    Args:
        device: an explicit choice (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``); None picks.
    """
    if device is None:
        device = os.environ.get("SAE_KIT_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA GPU; use device='cpu'")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise RuntimeError("device 'mps' was asked for but this torch build has no MPS; use device='cpu'")
    return device


def cpu_name() -> str:
    """The processor's model name (Linux /proc/cpuinfo, else the platform's): speed ratios, and the
    last digits of trained results, move with it (BLAS kernels differ between processor families)."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            info = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        info = {key.strip(): value.strip() for key, value in info.items()}
        return f"{info['model name']}, family {info.get('cpu family', '?')} model {info.get('model', '?')}"
    except (OSError, KeyError, ValueError):
        return platform.processor() or platform.machine()


def bars_off(progress: bool = True) -> bool:
    """tqdm's `disable`: off when `progress` is false or ``TQDM_DISABLE=1`` (CI sets it: under nbval,
    thousands of widget-bar updates can flood the kernel's output channel)."""
    return not progress or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


def cache_dir() -> Path:
    """Where converted models and activation stores live (``SAE_KIT_CACHE`` overrides)."""
    root = os.environ.get("SAE_KIT_CACHE")
    if root:
        path = Path(root).expanduser()
    else:
        base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(base) / "sae_kit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def results_dir() -> Path:
    """Where claims tables and figures go: $SAE_KIT_RESULTS if set, else ``results/`` at the root of
    the sae-kit checkout that holds the working directory (so a notebook run from ``notebooks/`` or
    ``labs/`` in JupyterLab, `make reproduce` and the tests all write to one place), else
    ``./results``."""
    env = os.environ.get("SAE_KIT_RESULTS")
    if env:
        return Path(env).expanduser()
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        project = folder / "pyproject.toml"
        if project.is_file() and (folder / "sae_kit").is_dir():
            try:
                if 'name = "sae-kit"' in project.read_text(errors="replace"):
                    return folder / "results"
            except OSError:
                break
    return here / "results"


def setup(seed: int = 0, device: str | None = None, quiet: bool = True) -> torch.device:
    """Seed every generator, pick the device, enable fast-but-safe matmuls; first cell of a notebook.

    Args:
        seed: seed for python, numpy and torch.
        device: forced device, else CUDA when present, else CPU.
        quiet: hide the deprecation chatter of TransformerLens 3.x and friends.

    Returns:
        The chosen device.
    """
    from .validate import integer

    seed = integer("seed", seed, min=0, max=2**32 - 1)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    dev = get_device(device)
    if dev.type == "cuda":
        # full fp32 products, as on a CPU: TF32 (10 mantissa bits) would add ~1e-3 relative noise to the
        # model's splices, the pursuit's residual-norm check and SNMF's stopping rule; at the kit's
        # sizes fp32 costs a GPU little
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    if quiet:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*TransformerBridge.*")
    scale = get_scale()
    print(f"sae_kit: scale={scale.name} device={dev} seed={seed} torch={torch.__version__} "
          f"threads={torch.get_num_threads()}")
    return dev
