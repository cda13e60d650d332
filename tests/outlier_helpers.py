"""Helpers shared by the outlier-measurement tests."""

import torch
import torch.nn.functional as F

from layerscope.probes.capture import Batch, Capture
from layerscope.probes.corpus import CorpusSpec, token_windows


def small_windows(loaded, max_tokens=128, seq_len=32, batch_size=2):
    spec = CorpusSpec("stdlib", seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size)
    return token_windows(spec, loaded.tokenizer, loaded.bos_token_id, loaded.max_context)


def hand_capture(loaded, reducer, batches) -> Capture:
    """Fold hand-built (token ids, activations) batches into one reducer, as capture would."""
    state = reducer.start(loaded)
    offset = 0
    for ids, acts in batches:
        state.update(acts, Batch(ids, None, offset))
        offset += ids.shape[0]
    return Capture({reducer.name: state.result()}, "hand", loaded.n_layers, offset * batches[0][0].shape[1],
                   "hand", 0.0, 0)


def next_token_loss(loaded, windows) -> float:
    """Mean next-token cross-entropy of a plain forward over all windows at once."""
    with torch.no_grad():
        logits = loaded.model(windows.input_ids).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), windows.input_ids[:, 1:].flatten()).item()
