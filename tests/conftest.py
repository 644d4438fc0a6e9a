import os

import pytest
import torch

os.environ.setdefault("SAE_KIT_SCALE", "ci")


@pytest.fixture(scope="session")
def model():
    """The real offline model (converted once into the kit's cache, a few seconds after that)."""
    import sae_kit

    return sae_kit.load_model(device="cpu")


@pytest.fixture(scope="session")
def small_store(model, tmp_path_factory):
    """A real store: ~2.5k tokens of layer-8 residuals from the standard library's documentation."""
    import sae_kit

    path = tmp_path_factory.mktemp("stores") / "small"
    return sae_kit.harvest(model, "blocks.8.hook_resid_post", n_tokens=2_480, eval_tokens=620,
                           ctx_len=64, path=path, progress=False)


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)
