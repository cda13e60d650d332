"""The zoo's named models and their descriptions, without importing torch.

`probes.zoo` builds the models themselves and imports torch and transformers, which takes
seconds; `layerscope models` lists them from here.  `tests/test_cli.py` checks that the
tiny families named here are the ones the zoo builds.
"""

from __future__ import annotations

from layerscope.probes.tiny_architectures import TINY_ARCHITECTURES

EMBEDDED_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama family, 30 layers, RMSNorm, Pre-LN), dequantised Q4_1",
    "minilm-l6": "all-MiniLM-L6-v2 (BERT encoder, 6 layers, LayerNorm, Post-LN)",
    "gemma3-270m": "Gemma 3 270M (18 layers, RMSNorm, Peri-LN, 4 query heads on 1 KV head), dequantised Q4_K_M",
}
TINY_FAMILIES = ("gpt2", "llama", "qwen2", "mistral", "gemma", "gpt-neox", "bert")


def list_models() -> list[dict]:
    """The zoo's named models with a one-line description each."""
    rows = [{"model": name, "kind": "embedded", "description": desc} for name, desc in EMBEDDED_MODELS.items()]
    rows += [{"model": f"tiny-{f}", "kind": "tiny", "description": f"seeded random {f}, 4 layers, d_model 64"}
             for f in TINY_FAMILIES]
    rows += [{"model": f"tiny-{name}", "kind": "tiny", "description": f"seeded random {model_type}, 2 layers, d_model 64"}
             for name, (model_type, _) in TINY_ARCHITECTURES.items()]
    return rows
