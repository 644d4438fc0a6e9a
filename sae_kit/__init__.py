"""sae-kit: reproduce sparse-dictionary interpretability papers on a real language model.

Start with ``sae_kit.setup(seed=0)``; sizes come from ``SAE_KIT_SCALE`` (ci | lab | paper).
"""

from . import checks, plots
from .activations import ActivationStore, StoreMismatchError, default_hook, get_store, harvest
from .claims import Claims
from .config import Scale, cache_dir, get_device, get_scale, results_dir, setup
from .corpus import load_texts, stdlib_docs, token_windows
from .explorer import context_table, explore, latent_card, top_contexts
from .metrics import reconstruction_metrics
from .splice import Splicer, evaluate, splice_metrics
from .models import DEFAULT_MODEL, ModelNotInstalledError, load_model
from .saes import (SAE, BatchTopKSAE, FeatureChoiceSAE, GradientSAE, MatchingPursuitSAE, MutualChoiceSAE, ReluSAE,
                   SAEConfig, TopKSAE, batch_topk_sae, choice_sae, gradient_sae, load_sae, mp_sae, relu_sae, topk_sae)
from .train import History, HookMismatchError, train, train_cached

__version__ = "0.1.0"
