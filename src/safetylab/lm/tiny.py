"""Tiny random-initialised causal LMs of each supported architecture (vocab 99, width 32),
built from configs: the fakes for tests and examples, as Transformers' model testers use."""

from __future__ import annotations

import torch
from torch import nn

ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "gemma", "gpt2", "gpt_neox", "phi", "opt")


def tiny_config(arch: str, n_layers: int = 4, vocab_size: int = 99, d_model: int = 32):
    """A Transformers config for a tiny model of family ``arch`` (one of :data:`ARCHITECTURES`)."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch in ("llama", "mistral", "qwen2", "gemma"):
        cls = {"llama": tf.LlamaConfig, "mistral": tf.MistralConfig, "qwen2": tf.Qwen2Config, "gemma": tf.GemmaConfig}[arch]
        return cls(hidden_size=d_model, intermediate_size=37, num_hidden_layers=n_layers, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=d_model // 4, max_position_embeddings=256, **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=4, n_positions=256, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=d_model, intermediate_size=37, num_hidden_layers=n_layers,
                                num_attention_heads=4, max_position_embeddings=256, **common)
    if arch == "phi":
        return tf.PhiConfig(hidden_size=d_model, intermediate_size=37, num_hidden_layers=n_layers,
                            num_attention_heads=4, max_position_embeddings=256, **common)
    if arch == "opt":
        # word_embed_proj_dim != hidden_size exercises OPT's project_in/project_out.
        return tf.OPTConfig(hidden_size=d_model, ffn_dim=37, num_hidden_layers=n_layers, num_attention_heads=4,
                            word_embed_proj_dim=d_model // 2, max_position_embeddings=256, **common)
    raise ValueError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")


def tiny_causal_lm(arch: str, n_layers: int = 4, seed: int = 0) -> nn.Module:
    """A random-initialised ``*ForCausalLM`` of family ``arch`` in eval mode (float32)."""
    import transformers as tf

    config = tiny_config(arch, n_layers)
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config)
    return model.eval()
