"""A small Llama with random weights, saved by transformers (config.json, model.safetensors, bf16)
with the Llama 2 tokenizer files beside it: a model for the GPU machine's training smoke run
(scripts/gpu-check.sh), which has no checkpoint and no network.

Usage: python scripts/make_random_llama.py OUT_DIR TOKENIZER_DIR [--layers 4] [--hidden 512]
"""
import argparse
import shutil
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("out")
ap.add_argument("tokenizer")
ap.add_argument("--layers", type=int, default=4)
ap.add_argument("--hidden", type=int, default=512)
a = ap.parse_args()
torch.manual_seed(0)
cfg = LlamaConfig(
    hidden_size=a.hidden,
    intermediate_size=a.hidden * 8 // 3 // 64 * 64,
    num_hidden_layers=a.layers,
    num_attention_heads=a.hidden // 64,
    num_key_value_heads=a.hidden // 128,
    vocab_size=32000,
    max_position_embeddings=4096,
    torch_dtype="bfloat16",
)
model = LlamaForCausalLM(cfg).to(torch.bfloat16)
model.save_pretrained(a.out, safe_serialization=True)
for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]:
    shutil.copy(Path(a.tokenizer) / name, Path(a.out) / name)
print(f"{a.out}: random Llama, {a.layers} layers, hidden {a.hidden}, "
      f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters")
