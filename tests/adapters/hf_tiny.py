"""Tiny Hugging Face causal LMs built from configs (no hub), shared by the adapter tests."""

import pytest

transformers = pytest.importorskip("transformers")

VOCAB = 61  # odd sizes catch shape mix-ups


def tiny_gpt2():
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=24,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_llama():
    config = transformers.LlamaConfig(
        num_hidden_layers=2,
        hidden_size=24,
        intermediate_size=40,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=VOCAB,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return transformers.LlamaForCausalLM(config).eval()


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
