import os
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore", category=DeprecationWarning)

# Shape annotations are checked under pytest.  jaxtyping wraps every function and
# dataclass of layerscope imported from here on (so this runs before the first layerscope
# import); shape_checking.typechecked runs beartype on those with a jaxtyping annotation
# and leaves the rest alone (why: see that module).  typeguard 4 cannot be the checker: it
# recompiles a function from its source, finds none for hooked code and silently checks
# nothing.  The wrapping costs about 15% of the suite's CPU time.
from jaxtyping import install_import_hook  # noqa: E402

install_import_hook(["layerscope"], "shape_checking.typechecked")

from layerscope.probes.zoo import TINY_FAMILIES, load_model  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_configure(config):
    # beartype's notes that typing.Callable and typing.Iterator are deprecated aliases
    config.addinivalue_line("filterwarnings", "ignore::beartype.roar.BeartypeDecorHintPep585DeprecationWarning")


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


@pytest.fixture(scope="module")
def saved_llama(tmp_path_factory):
    """tiny-llama saved as a local HF folder, for the loading tests."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama-saved"
    loaded = load_model("tiny-llama")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    return folder
