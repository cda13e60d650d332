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

# Tests on tiny models run on one thread: their matrices are too small to split, so a
# second thread only adds a wait at every op, and that wait is long whenever the other core
# is busy (the app server and Chromium in the browser tests, another job on the machine).
# Tests on real weights get two.
REAL_THREADS = max(1, min(2, os.cpu_count() or 1))


def pytest_configure(config):
    # beartype's notes that typing.Callable and typing.Iterator are deprecated aliases
    config.addinivalue_line("filterwarnings", "ignore::beartype.roar.BeartypeDecorHintPep585DeprecationWarning")


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # before the test's fixtures, so that a real model's module fixtures get two threads too
    torch.set_num_threads(REAL_THREADS if item.get_closest_marker("real") else 1)


@pytest.fixture(scope="session")
def tiny_models():
    """Every tiny family, loaded once with eager attention so patterns are available."""
    return {family: load_model(f"tiny-{family}", attn_implementation="eager") for family in TINY_FAMILIES}


@pytest.fixture(scope="session")
def smollm2():
    return load_model("smollm2-135m", attn_implementation="eager")


@pytest.fixture
def one_thread():
    """One thread for a test on real weights that a busy second core would slow more than it helps."""
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
