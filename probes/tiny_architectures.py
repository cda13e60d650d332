"""Tiny random configs of the architectures layerscope is tested on, beyond its core families.

Each is two blocks of width 64 with the byte vocabulary, built with `AutoConfig.for_model`
from one set of sizes plus what the architecture needs to stay tiny (expert counts, head
sizes, rotary widths).  The adapters of these models are derived from TransformerLens'
mapping like any other (`probes.architectures`); the tests check each against HF
`output_hidden_states`.
"""

from __future__ import annotations

TINY_ARCH_SIZES = dict(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                       bos_token_id=256, eos_token_id=257, pad_token_id=258, tie_word_embeddings=False)

# Architectures without grouped-query attention take no KV-head count.
_NO_GQA = dict(num_key_value_heads=None)
_SMALL_EXPERTS = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

# tiny name -> (HF model_type, what that architecture needs on top of TINY_ARCH_SIZES)
TINY_ARCHITECTURES: dict[str, tuple[str, dict]] = {
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": ("qwen2_moe", dict(_SMALL_EXPERTS, shared_expert_intermediate_size=32)),
    "qwen3": ("qwen3", dict(head_dim=16)),
    "qwen3-moe": ("qwen3_moe", dict(_SMALL_EXPERTS, head_dim=16)),
    "gemma2": ("gemma2", dict(head_dim=16)),
    "gemma3": ("gemma3_text", dict(head_dim=16, sliding_window=8)),
    "phi": ("phi", {}),
    "phi3": ("phi3", {}),
    "olmo": ("olmo", {}),
    "olmo2": ("olmo2", {}),
    "olmoe": ("olmoe", _SMALL_EXPERTS),
    "gpt-neox-parallel": ("gpt_neox", dict(_NO_GQA, use_parallel_residual=True)),
    "gptj": ("gptj", dict(_NO_GQA, rotary_dim=8)),
    "opt": ("opt", dict(_NO_GQA, ffn_dim=128, word_embed_proj_dim=64)),
    "bloom": ("bloom", _NO_GQA),
    "falcon": ("falcon", dict(_NO_GQA, multi_query=False)),
    "stablelm": ("stablelm", {}),
    "starcoder2": ("starcoder2", {}),
    "granite": ("granite", {}),
    "cohere": ("cohere", {}),
    "smollm3": ("smollm3", {}),
    "roberta": ("roberta", dict(_NO_GQA, pad_token_id=1)),
    "mpt": ("mpt", dict(_NO_GQA, d_model=64, n_heads=4, n_layers=2, expansion_ratio=2)),
    "nemotron": ("nemotron", {}),
}

MASKED_LM_TYPES = ("bert", "roberta")


def tiny_architecture_config(name: str):
    """The HF config of the tiny `name` model."""
    from transformers import AutoConfig

    model_type, extra = TINY_ARCHITECTURES[name]
    return AutoConfig.for_model(model_type, **{**TINY_ARCH_SIZES, **extra})
