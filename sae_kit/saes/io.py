"""Save and load dictionaries in SAELens's on-disk layout (``cfg.json`` + ``sae_weights.safetensors``).

``sae_lens.SAE.load_from_disk(path)`` reads what `save_sae` writes: TopK-style dictionaries are
saved as SAELens ``"topk"``, matching pursuit as ``"matching_pursuit"``; the kit's own config (architecture, k_aux, thresholds...) rides along
in ``metadata.sae_kit`` so `load_sae` rebuilds the exact class. Writes go to a temporary folder
that is renamed into place, so an interrupted save never leaves a half-written SAE.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from .base import SAE, SAEConfig

_WEIGHTS, _CFG = "sae_weights.safetensors", "cfg.json"
_CORE = ("W_enc", "b_enc", "W_dec", "b_dec")  # SAELens's tensors (a tied SAE has no W_enc / b_enc)


def saelens_architecture(sae: SAE) -> str:
    """The SAELens architecture whose inference matches this SAE's `encode` (plain TopK)."""
    return getattr(sae, "saelens_architecture", "topk")


def save_sae(sae: SAE, path: str | Path) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    tensors = {n: p.detach().cpu().contiguous() for n, p in sae.state_dict().items()}
    extra = tensors_for_saelens(sae)
    save_file({**{n: tensors[n] for n in _CORE if n in tensors}, **extra}, str(tmp / _WEIGHTS))
    kit_state = {n: t for n, t in tensors.items() if n not in _CORE}
    save_file(kit_state, str(tmp / "sae_kit_state.safetensors"))
    c = sae.cfg
    cfg = {
        "architecture": saelens_architecture(sae), "d_in": c.d_in, "d_sae": c.d_sae, "k": c.k,
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        **(sae.saelens_cfg() if hasattr(sae, "saelens_cfg") else {}),
        "metadata": {"model_name": c.model_name, "hook_name": c.hook_name,
                     "sae_kit": {"class": type(sae).__name__, "cfg": asdict(c)}},
    }
    (tmp / _CFG).write_text(json.dumps(cfg, indent=1))
    if path.exists():
        backup = path.with_name(path.name + f".old{os.getpid()}")
        os.replace(path, backup)
        os.replace(tmp, path)
        shutil.rmtree(backup)
    else:
        os.replace(tmp, path)
    return path


def tensors_for_saelens(sae: SAE) -> dict[str, torch.Tensor]:
    """Extra tensors SAELens's architecture needs (e.g. JumpReLU thresholds); none for TopK."""
    fn = getattr(sae, "saelens_tensors", None)
    return {n: t.detach().cpu().contiguous() for n, t in (fn() if fn else {}).items()}


def load_sae(path: str | Path, device=None) -> SAE:
    """Load a dictionary written by `save_sae` back into its own class."""
    from safetensors.torch import load_file

    from . import REGISTRY

    path = Path(path)
    if not (path / _CFG).exists():
        raise FileNotFoundError(f"no SAE at {path} (expected {_CFG} and {_WEIGHTS})")
    meta = json.loads((path / _CFG).read_text()).get("metadata", {}).get("sae_kit")
    if meta is None:
        raise ValueError(f"{path} is a SAELens SAE not written by sae_kit; load it with sae_lens.SAE.load_from_disk")
    cls = REGISTRY[meta["class"]]
    sae = cls(SAEConfig(**meta["cfg"]), device=device)
    state = load_file(str(path / _WEIGHTS))
    state = {n: state[n] for n in _CORE if n in state}
    if (path / "sae_kit_state.safetensors").exists():
        state.update(load_file(str(path / "sae_kit_state.safetensors")))
    sae.load_state_dict(state)
    sae.eval()
    return sae.to(device) if device is not None else sae
