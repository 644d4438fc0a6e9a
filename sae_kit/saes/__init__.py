"""Dictionaries behind one interface (`base.SAE`): encode, decode, forward, loss, save/load."""

from .base import SAE, SAEConfig, SparseCode, fvu, geometric_median, sparse_decode
from .io import load_sae, save_sae
from .topk import TopKSAE, topk_sae

# class name -> class, for load_sae; each new dictionary file registers itself here
REGISTRY: dict[str, type[SAE]] = {"SAE": SAE, "TopKSAE": TopKSAE}
