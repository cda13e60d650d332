"""Corpora: where the text comes from, and how it becomes fixed-length token windows.

The embedded default is the docstrings of the running Python's standard library (read
with `ast`, never imported), so a corpus is always present offline.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from jaxtyping import Int

from layerscope.probes.errors import UserError

STDLIB = "stdlib"
LITERAL_PREFIX = "text:"
MIN_DOCSTRING_CHARS = 200


@dataclass(frozen=True)
class CorpusSpec:
    """Which text, cut into windows of `seq_len` tokens, up to `max_tokens` tokens in all."""

    source: str = STDLIB
    seq_len: int = 128
    max_tokens: int = 4096
    batch_size: int = 8

    def describe(self) -> str:
        if self.source.startswith(LITERAL_PREFIX):
            return "literal text"
        return self.source


@functools.lru_cache(maxsize=1)
def stdlib_docstrings() -> tuple[str, ...]:
    """Docstrings longer than 200 characters from the top-level stdlib modules, in file-name order.

    Parsing the stdlib takes seconds, so the list is kept in the cache folder, one file per
    Python build and stdlib location."""
    from layerscope.probes.zoo import cache_dir

    root = Path(sysconfig.get_paths()["stdlib"])
    key = hashlib.sha256(f"{sys.version}|{root}|{MIN_DOCSTRING_CHARS}".encode()).hexdigest()[:16]
    cached = cache_dir() / "corpus" / f"stdlib-docstrings-{key}.json"
    try:
        return tuple(json.loads(cached.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    docs = _parse_stdlib_docstrings(root)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.with_name(f".{cached.name}.{os.getpid()}")
        staging.write_text(json.dumps(docs), encoding="utf-8")
        os.replace(staging, cached)
    except OSError:
        pass  # a read-only cache only costs the parse next time
    return docs


def _parse_stdlib_docstrings(root: Path) -> tuple[str, ...]:
    docs: list[str] = []
    for path in sorted(root.glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > MIN_DOCSTRING_CHARS:
                    docs.append(doc)
    # ast.walk yields the module node first as well; keep each docstring once, in order.
    return tuple(dict.fromkeys(docs))


def _read_utf8(path: Path) -> str:
    if not path.exists():
        raise UserError(f"corpus file {path} does not exist")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"corpus file {path} is not UTF-8 (byte {err.start})") from None


def _jsonl_texts(path: Path) -> list[str]:
    texts = []
    for number, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number} is not valid JSON") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{number} has no string field 'text'")
        texts.append(record["text"])
    return texts


def documents(source: str) -> list[str]:
    """The documents of a corpus source: 'stdlib', a .txt or .jsonl path, or 'text:...'."""
    if source == STDLIB:
        docs = list(stdlib_docstrings())
    elif source.startswith(LITERAL_PREFIX):
        docs = [source[len(LITERAL_PREFIX):]]
    else:
        path = Path(source).expanduser()
        if path.suffix == ".jsonl":
            docs = _jsonl_texts(path)
        elif path.suffix == ".txt":
            docs = [_read_utf8(path)]
        elif not path.exists():
            raise UserError(f"corpus {source!r} is neither 'stdlib', 'text:...', nor an existing .txt/.jsonl file")
        else:
            raise UserError(f"corpus file {path} must end in .txt or .jsonl")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise UserError(f"corpus {CorpusSpec(source).describe()!r} is empty")
    return docs


def corpus_hash(docs: list[str]) -> str:
    digest = hashlib.sha256()
    for doc in docs:
        digest.update(doc.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


@dataclass
class TokenWindows:
    """A corpus cut into windows; iterate it for [batch, pos] token batches."""

    spec: CorpusSpec
    input_ids: Int[torch.Tensor, "window pos"]
    corpus_sha256: str
    first_position: str

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()

    def __iter__(self) -> Iterator[Int[torch.Tensor, "batch pos"]]:
        yield from self.input_ids.split(self.spec.batch_size)

    def __len__(self) -> int:
        return -(-self.input_ids.shape[0] // self.spec.batch_size)

    def head(self, max_tokens: int) -> "TokenWindows":
        """The first windows holding at most `max_tokens` tokens (at least one window)."""
        keep = max(1, max_tokens // self.input_ids.shape[1])
        return TokenWindows(self.spec, self.input_ids[:keep], self.corpus_sha256, self.first_position)

    def manifest(self) -> dict:
        return {
            **asdict(self.spec),
            "source": self.spec.describe(),
            "corpus_sha256": self.corpus_sha256,
            "windows": self.input_ids.shape[0],
            "tokens": self.n_tokens,
            "first_position": self.first_position,
            "python": sys.version.split()[0],
        }


def token_windows(spec: CorpusSpec, tokenizer, bos_token_id: int | None, max_context: int,
                  skip_windows: int = 0) -> TokenWindows:
    """Tokenise a corpus into `seq_len`-token windows, each starting with BOS when the family has one.

    Documents are joined with EOS (when the tokenizer has one) and cut in order, so the
    same spec always gives the same windows.  `skip_windows` drops that many windows
    first, which gives disjoint train and evaluation splits of one corpus.
    """
    if spec.max_tokens <= 0:
        raise UserError(f"max_tokens must be positive, got {spec.max_tokens}")
    if spec.seq_len < 2:
        raise UserError(f"seq_len must be at least 2, got {spec.seq_len}")
    if spec.seq_len > max_context:
        raise UserError(f"seq_len {spec.seq_len} is above the model's context of {max_context} tokens")
    if spec.batch_size <= 0:
        raise UserError(f"batch_size must be positive, got {spec.batch_size}")
    docs = documents(spec.source)
    body = spec.seq_len - (1 if bos_token_id is not None else 0)
    n_windows = max(1, spec.max_tokens // spec.seq_len)
    wanted = (n_windows + skip_windows) * body
    stream: list[int] = []
    separator = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for doc in docs:
        stream += tokenizer(doc, add_special_tokens=False)["input_ids"] + separator
        if len(stream) >= wanted:
            break
    available = len(stream) // body - skip_windows
    if available < 1:
        raise UserError(f"corpus {spec.describe()!r} has {len(stream)} tokens, fewer than one window "
                        f"of {spec.seq_len} (after skipping {skip_windows} windows)")
    n_windows = min(n_windows, available)
    ids = torch.tensor(stream[skip_windows * body:(skip_windows + n_windows) * body]).view(n_windows, body)
    if bos_token_id is not None:
        ids = torch.cat([torch.full((n_windows, 1), bos_token_id), ids], dim=1)
        first = f"BOS token {bos_token_id} at position 0 of every window"
    else:
        first = "no BOS: position 0 is an ordinary corpus token"
    return TokenWindows(spec, ids, corpus_hash(docs), first)
