"""What a model is run on: token windows from a corpus, from literal text, or from ids.

`windows(model, source, ...)` takes a loaded model instead of its tokenizer, BOS and
context; `windows_for` turns whatever a user passes as a corpus into windows, or says
clearly why it cannot.
"""

from __future__ import annotations

import warnings

import torch

from layerscope.probes.corpus import (LITERAL_PREFIX, STDLIB, CorpusSpec, TokenWindows, corpus_hash,
                                      token_windows, user_path)
from layerscope.probes.errors import UserError
from layerscope.probes.zoo import LoadedModel

FILE_SUFFIXES = (".txt", ".jsonl")


def windows(model: LoadedModel, source: str = STDLIB, seq_len: int = 128, max_tokens: int = 4096,
            batch_size: int = 8) -> TokenWindows:
    """`source` cut into windows of `seq_len` tokens (BOS first where the family has one),
    up to `max_tokens`: "stdlib", a .txt or .jsonl file, or "text:..." for literal text,
    which is measured whole whatever `seq_len` says (see `text_windows`)."""
    if source.startswith(LITERAL_PREFIX):
        return text_windows(model, source.removeprefix(LITERAL_PREFIX), batch_size)
    spec = CorpusSpec(source, seq_len, max_tokens, batch_size)
    return token_windows(spec, model.tokenizer, model.bos_token_id, model.max_context)


def text_windows(model: LoadedModel, text: str, batch_size: int = 8, max_length: int | None = None) -> TokenWindows:
    """Literal text measured whole: one window of the text's own tokens, with BOS where the
    family uses one and no EOS.  A text longer than the context (or `max_length`) is split
    into windows of that length; what is left over, shorter than a window, is left out
    and a warning says how many tokens that is."""
    if not text.strip():
        raise UserError("the text is empty: give the text to measure")
    body = model.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [model.bos_token_id] if model.bos_token_id is not None else []
    length = min(len(body) + len(bos), model.max_context, max_length or model.max_context)
    if length < 2:
        raise UserError(f"the text is {len(body)} token(s) long; at least 2 tokens are needed to measure")
    per_window = length - len(bos)
    n_windows = len(body) // per_window
    left_out = len(body) - n_windows * per_window
    if n_windows > 1 or left_out:
        warnings.warn(f"the text is {len(body)} tokens, longer than one window of {length}: it is measured as "
                      f"{n_windows} window{'s' if n_windows > 1 else ''} of {per_window} text tokens"
                      + (" after BOS" if bos else "")
                      + (f", and its last {left_out} tokens are left out" if left_out else ""))
    ids = torch.tensor(body[:n_windows * per_window]).view(n_windows, per_window)
    if bos:
        ids = torch.cat([torch.full((n_windows, 1), bos[0]), ids], dim=1)
    first = f"BOS token {bos[0]} at position 0 of every window" if bos else \
        "no BOS: position 0 is an ordinary corpus token"
    spec = CorpusSpec(LITERAL_PREFIX + text, length, ids.numel(), batch_size)
    return TokenWindows(spec, ids, corpus_hash([text]), first)


def windows_for(model: LoadedModel, corpus) -> TokenWindows:
    """Windows from what a user passed as a corpus: windows as they are; a string naming
    the stdlib corpus, a .txt/.jsonl file or `text:...`; other strings as literal text;
    or a [batch, pos] tensor of token ids."""
    if isinstance(corpus, TokenWindows):
        return corpus
    if isinstance(corpus, torch.Tensor):
        if corpus.dim() != 2 or corpus.dtype not in (torch.int32, torch.int64):
            raise UserError(f"token ids must be an integer tensor of shape [batch, pos], got "
                            f"{corpus.dtype} {tuple(corpus.shape)}")
        spec = CorpusSpec("token ids", corpus.shape[1], corpus.numel(), corpus.shape[0])
        return TokenWindows(spec, corpus.long(), "token-ids", "as given")
    if isinstance(corpus, str):
        if corpus == STDLIB or corpus.startswith(LITERAL_PREFIX):
            return windows(model, corpus)
        if "\n" not in corpus and corpus.endswith(FILE_SUFFIXES):
            path = user_path(corpus, "corpus file")
            if not path.exists():
                raise UserError(f"corpus file {corpus!r} does not exist")
            return windows(model, str(path))
        return text_windows(model, corpus)
    raise UserError(f"a corpus is token windows (layerscope.windows(model, source)), a string (text, "
                    f"'stdlib' or a .txt/.jsonl path) or a [batch, pos] id tensor, not {type(corpus).__name__}")
