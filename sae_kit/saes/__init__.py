"""Dictionaries behind one interface (`base.SAE`): encode, decode, forward, loss, save/load."""

from .base import SAE, SAEConfig, SparseCode, fvu, geometric_median, sparse_decode
from .io import load_sae, save_sae
from .choice import FeatureChoiceSAE, MutualChoiceSAE, capacities, choice_sae, fit_zipf, zipf_probs
from .gradient import GradientSAE, gradient_sae
from .matching_pursuit import (MatchingPursuitSAE, coherence, fvu_by_steps, mp_sae, random_coherence,
                               reconstruct_with, residual_norms)
from .relu import ReluSAE, relu_sae
from .topk import TopKSAE, topk_sae

# class name -> class, for load_sae; each new dictionary file registers itself here
REGISTRY: dict[str, type[SAE]] = {c.__name__: c for c in (SAE, TopKSAE, MutualChoiceSAE, FeatureChoiceSAE, GradientSAE,
                                                           MatchingPursuitSAE, ReluSAE)}
