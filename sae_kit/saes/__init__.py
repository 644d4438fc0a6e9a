"""Dictionaries behind one contract (`base.SAE`): encode, decode, forward, loss, modes, save/load.

Each dictionary is one file with its config dataclass and a shorthand builder; defining the class
registers it (`registry.REGISTRY`), which is how `load_sae` finds it again.
"""

from .base import SAE, SAEConfig, Selection, SparseCode, fvu_loss, geometric_median, row_topk, sparse_decode
from .io import load_sae, save_sae
from .registry import REGISTRY
from .topk import TopKConfig, TopKSAE, topk_sae
from .choice import (ChoiceConfig, FeatureChoiceSAE, MutualChoiceSAE, capacities, choice_sae, fit_zipf,
                     zipf_line, zipf_probs)
from .gradient import GradientConfig, GradientSAE, gradient_sae
from .matching_pursuit import MatchingPursuitSAE, MPConfig, mp_sae
from .relu import ReluConfig, ReluSAE, relu_sae
from .batch_topk import BatchTopKConfig, BatchTopKSAE, batch_topk_sae
