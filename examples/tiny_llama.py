"""A small random Llama (transformers ``LlamaForCausalLM``, GQA 4:2, seeded) for quick runs:
``qcompile examples/tiny_llama.py --target w4a16``. No tokenizer: it evaluates nothing."""
import torch
from transformers import LlamaConfig, LlamaForCausalLM


def build_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      attn_implementation="sdpa", use_cache=False)
    return LlamaForCausalLM(cfg)


def calibration_data():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 1024, (1, 64), generator=g) for _ in range(4)]
