import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)

from layerscope.probes.zoo import TINY_FAMILIES, load_model  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_models():
    """Every tiny family, loaded once with eager attention so patterns are available."""
    return {family: load_model(f"tiny-{family}", attn_implementation="eager") for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m", attn_implementation="eager")


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread, and on a shared machine the second core is busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def token_batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (2, 16), generator=generator)
    ids[:, 0] = 256
    return ids
