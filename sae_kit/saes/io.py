"""Save and load dictionaries in SAELens's on-disk layout (``cfg.json`` + ``sae_weights.safetensors``).

``sae_lens.SAE.load_from_disk(path)`` reads what `save_sae` writes: TopK-style dictionaries are
saved as SAELens ``"topk"``, matching pursuit as ``"matching_pursuit"``; the kit's own config (architecture, k_aux, thresholds...) rides along
in ``metadata.sae_kit`` so `load_sae` rebuilds the exact class. Writes go to a temporary folder
that is renamed into place, so an interrupted save never leaves a half-written SAE; a folder that
holds anything but a saved SAE is never written into (see `sae_kit.fsutil`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path


from ..fsutil import claim_dir, locked, recover_stale, replace_dir, temp_sibling
from .registry import REGISTRY

_WEIGHTS, _CFG = "sae_weights.safetensors", "cfg.json"
_STATE = "sae_kit_state.safetensors"
_CORE = ("W_enc", "b_enc", "W_dec", "b_dec")  # SAELens's tensors (a tied SAE has no W_enc / b_enc)
# what a saved SAE folder may hold (history.json: written beside the weights by `train_cached`)
SAE_FILES = {_CFG, _WEIGHTS, _STATE, "history.json"}


def save_sae(sae, path: str | Path) -> Path:
    path = Path(path)
    with locked(path, "the saved SAE", beside=False):  # two saves to one path: one after the other
        return _save_locked(sae, path)


def _save_locked(sae, path: Path) -> Path:
    from safetensors.torch import save_file

    recover_stale(path)
    claim_dir(path, "a saved SAE", markers={_CFG, _WEIGHTS}, allowed=SAE_FILES, is_ours=_written_by_kit)
    tmp = temp_sibling(path)
    tensors = {n: p.detach().cpu().contiguous() for n, p in sae.state_dict().items()}
    extra = {n: t.detach().cpu().contiguous() for n, t in sae.saelens_tensors().items()}
    save_file({**{n: tensors[n] for n in _CORE if n in tensors}, **extra}, str(tmp / _WEIGHTS))
    kit_state = {n: t for n, t in tensors.items() if n not in _CORE}
    save_file(kit_state, str(tmp / _STATE))
    c = sae.cfg
    cfg = {
        "architecture": sae.saelens_architecture, "d_in": c.d_in, "d_sae": c.d_sae,
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
        "normalize_activations": "none", "reshape_activations": "none",
        **sae.saelens_cfg(),
        "metadata": {"model_name": c.model_name, "hook_name": c.hook_name,
                     "sae_kit": {"class": type(sae).__name__, "cfg": asdict(c), "init_seed": sae.init_seed}},
    }
    (tmp / _CFG).write_text(json.dumps(cfg, indent=1))
    replace_dir(tmp, path)
    return path


def _written_by_kit(path: Path) -> bool:
    """Whether ``cfg.json`` says sae_kit wrote this folder (a SAELens SAE of the user's is not ours)."""
    try:
        cfg = json.loads((path / _CFG).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(cfg, dict) and isinstance(cfg.get("metadata"), dict) and "sae_kit" in cfg["metadata"]


def load_sae(path: str | Path, device=None):
    """Load a dictionary written by `save_sae` back into its own class."""
    from safetensors.torch import load_file

    path = Path(path)
    recover_stale(path)  # a save killed between its two renames: put the previous version back
    if not (path / _CFG).exists():
        raise FileNotFoundError(f"no SAE at {path} (expected {_CFG} and {_WEIGHTS})")
    try:
        cfg = json.loads((path / _CFG).read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / _CFG} is not valid JSON ({e}); the saved SAE is damaged: save it again") from None
    meta = cfg.get("metadata", {}).get("sae_kit") if isinstance(cfg, dict) else None
    if meta is None:
        raise ValueError(f"{path} is a SAELens SAE not written by sae_kit; load it with sae_lens.SAE.load_from_disk")
    cls = REGISTRY.get(meta.get("class"))
    if cls is None:
        raise ValueError(f"{path / _CFG} names the dictionary class {meta.get('class')!r}, which this sae_kit "
                         f"does not know (known: {', '.join(sorted(REGISTRY))}); upgrade sae_kit or re-save the SAE")
    try:
        sae = cls(cls.config_class(**_upgrade(cls, meta["cfg"])), seed=int(meta.get("init_seed", 0)), device=device)
    except (TypeError, KeyError, ValueError) as e:
        raise ValueError(f"{path / _CFG} holds a config this sae_kit cannot build ({e})") from None
    state = {}
    for name in (_WEIGHTS, _STATE):
        if name == _STATE and not (path / name).exists():
            continue
        try:
            part = load_file(str(path / name))
        except Exception as e:  # safetensors raises its own error type for a truncated file
            raise ValueError(f"{path / name} cannot be read ({type(e).__name__}: {e}); the file is damaged "
                             f"or truncated: save the SAE again") from None
        state.update({n: part[n] for n in _CORE if n in part} if name == _WEIGHTS else part)
    try:
        sae.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"the weights in {path} do not fit a {cls.__name__} with d_in={sae.cfg.d_in}, "
                         f"d_sae={sae.cfg.d_sae}: {str(e).splitlines()[0]} ...") from None
    sae.eval()
    return sae.to(device) if device is not None else sae


def _upgrade(cls, cfg: dict) -> dict:
    """A config saved by an earlier sae_kit (one `SAEConfig` with an ``extra`` dict of method knobs
    and an ``architecture`` string) as the fields of the class's own config dataclass."""
    cfg = dict(cfg)
    if "extra" in cfg or "architecture" in cfg:
        cfg.pop("architecture", None)
        cfg.update(cfg.pop("extra", None) or {})
        known = {f.name for f in fields(cls.config_class)}
        cfg = {n: v for n, v in cfg.items() if n in known}  # e.g. the unused k of a ReLU SAE
    return cfg
