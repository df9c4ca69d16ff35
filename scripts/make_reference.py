"""Regenerates the tiny-Llama reference fixtures under tests/fixtures/.

Run from the repository root:

    $(scripts/setup-python.sh) scripts/make_reference.py

For each tiny random config it writes tests/fixtures/<name>/ with
  config.json           HF LlamaConfig
  model.safetensors     random f32 weights under HF names (no lm_head.weight when tied)
  reference.safetensors input_ids, attention_mask, position_ids, labels (int64, [B,S]),
                        logits (f32, [B,S,V]), loss (f32, []), grad.<param> (f32)
and tests/fixtures/README.md. Output is deterministic for a fixed torch/transformers version.
"""

import argparse
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

SEED = 1234
BATCH, SEQ = 3, 10
# Real-token count per row: one full row, two right-padded rows of different lengths.
ROW_LENGTHS = [10, 7, 4]
# Label positions masked in row 0, as a prompt would be.
PROMPT_LEN_ROW0 = 3
PAD_ID = 0
LINEAR_STD = 0.1  # larger than HF's 0.02 so gradients are not tiny
EMBED_STD = 0.1
NORM_NOISE = 0.1  # norm weights are 1 + NORM_NOISE * randn, so RMSNorm weight matters

CONFIGS = {
    "tiny-mha-untied": dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, vocab_size=128,
        max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    "tiny-gqa-tied": dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
        max_position_embeddings=64, rope_theta=100000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True,
    ),
    "tiny-gqa-untied-b3": dict(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=2, vocab_size=96,
        max_position_embeddings=64, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    ),
    # Llama 3.1's frequency scaling with a short original context, so that head_dim 16's eight
    # frequencies fall in all three of its bands, at positions from 1000 on.
    "tiny-llama3-rope": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
        max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                          high_freq_factor=4.0, original_max_position_embeddings=256),
    ),
    # YaRN: its ramp spans frequencies 0 to 4 of 8 here, and cos / sin carry its attention factor.
    "tiny-yarn-rope": dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
        max_position_embeddings=1024, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=256),
    ),
}
# Added to the scaled fixtures' position ids, so RoPE turns its low frequencies far enough for
# their scaling to show in the logits.
POSITION_OFFSET = {"tiny-llama3-rope": 1000, "tiny-yarn-rope": 700}

# RoPE tables alone (tests/fixtures/rope/), for the scalings real checkpoints ship with: each a
# config.json's keys beside the cos / sin transformers' LlamaRotaryEmbedding computes.
ROPE_CASES = {
    "default": dict(head_dim=128, rope_theta=10000.0, max_position_embeddings=4096),
    "linear": dict(head_dim=128, rope_theta=10000.0, max_position_embeddings=16384,
                   rope_scaling=dict(type="linear", factor=4.0)),
    "llama3.1-8b": dict(head_dim=128, rope_theta=500000.0, max_position_embeddings=131072,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    "llama3.2-1b": dict(head_dim=64, rope_theta=500000.0, max_position_embeddings=131072,
                        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                          high_freq_factor=4.0,
                                          original_max_position_embeddings=8192)),
    "yarn": dict(head_dim=128, rope_theta=10000.0, max_position_embeddings=16384,
                 rope_scaling=dict(rope_type="yarn", factor=4.0,
                                   original_max_position_embeddings=4096)),
    "yarn-mscale-untruncated": dict(
        head_dim=64, rope_theta=1000000.0, max_position_embeddings=16384,
        rope_scaling=dict(rope_type="yarn", factor=8.0, mscale=1.2, mscale_all_dim=1.0,
                          beta_fast=16.0, beta_slow=2.0, truncate=False,
                          original_max_position_embeddings=2048)),
    "yarn-attention-factor": dict(
        head_dim=64, rope_theta=10000.0, max_position_embeddings=8192,
        rope_scaling=dict(rope_type="yarn", factor=2.0, attention_factor=0.9,
                          original_max_position_embeddings=4096)),
}
ROPE_POSITIONS = [0, 1, 2, 7, 100, 1000, 4095, 4096, 8191, 8192, 20000, 65536, 131071]


def init_weights(model: LlamaForCausalLM, gen: torch.Generator) -> None:
    # named_parameters() lists a tied embedding once, so it is initialised once.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_NOISE * torch.randn(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(EMBED_STD * torch.randn(p.shape, generator=gen))
            elif name.endswith(".weight") and p.dim() == 2:
                p.copy_(LINEAR_STD * torch.randn(p.shape, generator=gen))
            else:
                raise ValueError(f"unexpected parameter {name} {tuple(p.shape)}")


def make_batch(vocab: int, gen: torch.Generator, position_offset: int = 0):
    mask = torch.zeros(BATCH, SEQ, dtype=torch.int64)
    for b, n in enumerate(ROW_LENGTHS):
        mask[b, :n] = 1
    # Real tokens avoid PAD_ID so padding is unambiguous in input_ids.
    ids = torch.randint(1, vocab, (BATCH, SEQ), generator=gen, dtype=torch.int64)
    ids = torch.where(mask.bool(), ids, torch.full_like(ids, PAD_ID))
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0) + position_offset
    labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    labels[0, :PROMPT_LEN_ROW0] = -100
    return ids, mask, position_ids, labels


def build_one(name: str, cfg: dict, out_root: str) -> dict:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    config = LlamaConfig(
        **cfg, hidden_act="silu", attention_bias=False, mlp_bias=False,
        initializer_range=0.02, bos_token_id=1, eos_token_id=2, pad_token_id=None,
    )
    # pad_token_id stays None: otherwise nn.Embedding gets padding_idx and zeroes that row's grad.
    model = LlamaForCausalLM._from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    init_weights(model, gen)
    model.train()  # dropout is 0 in these configs; train mode matches a trainer's forward

    ids, mask, pos, labels = make_batch(config.vocab_size, gen, POSITION_OFFSET.get(name, 0))
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, labels=labels)
    out.loss.backward()

    tensors = {
        "input_ids": ids, "attention_mask": mask, "position_ids": pos, "labels": labels,
        "logits": out.logits.detach().float().contiguous(),
        "loss": out.loss.detach().float().reshape(()),
    }
    for pname, p in model.named_parameters():
        if p.grad is None:
            raise RuntimeError(f"{name}: no gradient for {pname}")
        tensors[f"grad.{pname}"] = p.grad.detach().float().contiguous()

    d = os.path.join(out_root, name)
    os.makedirs(d, exist_ok=True)
    model.save_pretrained(d, safe_serialization=True)
    # Holds only bos/eos ids already in config.json plus a version string.
    gen_cfg = os.path.join(d, "generation_config.json")
    if os.path.exists(gen_cfg):
        os.remove(gen_cfg)
    save_file(tensors, os.path.join(d, "reference.safetensors"),
              # One metadata key: safetensors orders several keys arbitrarily, which breaks byte-identical reruns.
              metadata={"generator": f"make_reference.py torch={torch.__version__} "
                                     f"transformers={transformers.__version__}"})
    gmax = max(t.abs().max().item() for k, t in tensors.items() if k.startswith("grad."))
    return {"loss": out.loss.item(), "max_abs_grad": gmax}


README = """# Tiny Llama reference fixtures

Generated by `scripts/make_reference.py` with PyTorch {torch} and transformers {tf}
(CPU, f32, eager attention, `torch.use_deterministic_algorithms(True)`, one thread, seed {seed}).
Regenerate from the repository root with:

    $(scripts/setup-python.sh) scripts/make_reference.py

Each directory is one random model:

| name | hidden | inter | layers | heads | kv heads | head_dim | vocab | rope_theta | rope_scaling | rms_norm_eps | tied |
|---|---|---|---|---|---|---|---|---|---|---|---|
{rows}

Files per directory:

- `config.json`: the HF `LlamaConfig` (`model.save_pretrained`). silu, no biases;
  `max_position_embeddings` 64 but for the scaled-RoPE models (2048 and 1024).
- `model.safetensors`: f32 weights under HF names (`model.embed_tokens.weight`,
  `model.layers.N.self_attn.{{q,k,v,o}}_proj.weight`, `model.layers.N.mlp.{{gate,up,down}}_proj.weight`,
  `model.layers.N.{{input,post_attention}}_layernorm.weight`, `model.norm.weight`, `lm_head.weight`).
  Tied models have no `lm_head.weight`; the head is `model.embed_tokens.weight`.
  Linears and embeddings are N(0, {lstd}^2); norm weights are 1 + {nn}*N(0,1).
- `reference.safetensors`:
  - `input_ids`, `attention_mask`, `position_ids`, `labels`: int64 `[B,S]` = `[{b},{s}]`.
    Rows hold {lens} real tokens, then right padding (pad id {pad}, mask 0).
    `position_ids = clamp(cumsum(attention_mask) - 1, min=0)`, so pads repeat the last real position,
    plus {offsets} for the scaled-RoPE models, so that their low frequencies turn far enough
    for the scaling to show.
    `labels` follow the HF convention: aligned with `input_ids` (the loss shifts them internally),
    -100 on pads and on the first {p0} tokens of row 0.
  - `logits`: f32 `[B,S,V]` from `model(input_ids, attention_mask, position_ids)`. Pad keys are
    masked for every query, so pad-position queries still see the row's real tokens; compare
    pad-position logits only if your masking does the same (real positions are what matter).
  - `loss`: f32 scalar, HF's mean cross-entropy over non-ignored shifted tokens
    (`logits[:, :-1]` against `labels[:, 1:]`).
  - `grad.<param name>`: f32, same shape as the parameter, d loss / d param for every entry in
    `model.named_parameters()` (a tied embedding appears once, as `grad.model.embed_tokens.weight`,
    holding the sum of its embedding and head gradients).
  - safetensors metadata key `generator` records the torch and transformers versions.

`rope/` holds RoPE's tables alone for the scalings real checkpoints use (Llama 3.1 and 3.2's
`llama3`, YaRN with and without `mscale` and truncation, linear, none):

- `cases.json`: for each case, the `config.json` transformers writes for it
  (`LlamaConfig.to_json_string()`);
- `tables.safetensors`: `positions` (int64, {npos} ids up to {maxpos}) and, for each case,
  `inv_freq.<case>` (f32, `LlamaRotaryEmbedding.inv_freq`) and `cos.<case>`, `sin.<case>`
  (f32, `[{npos}, head_dim]`, its forward at those positions).
"""


def rope_text(c: dict) -> str:
    r = c.get("rope_scaling")
    if not r:
        return "none"
    return ", ".join(f"{k} {v}" for k, v in r.items() if k != "rope_type").join(
        (f"{r['rope_type']} (", ")"))


def build_rope_tables(out_root: str) -> None:
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    positions = torch.tensor([ROPE_POSITIONS], dtype=torch.int64)
    cases, tensors = {}, {"positions": positions[0].clone()}
    for name, c in ROPE_CASES.items():
        heads = 4
        config = LlamaConfig(
            hidden_size=heads * c["head_dim"], num_attention_heads=heads,
            num_key_value_heads=heads, intermediate_size=4 * heads * c["head_dim"],
            num_hidden_layers=1, vocab_size=32, **c,
        )
        rotary = LlamaRotaryEmbedding(config)
        x = torch.zeros(1, dtype=torch.float32)
        cos, sin = rotary(x, positions)
        cases[name] = json.loads(config.to_json_string())
        tensors[f"inv_freq.{name}"] = rotary.inv_freq.float().contiguous()
        tensors[f"cos.{name}"] = cos[0].float().contiguous()
        tensors[f"sin.{name}"] = sin[0].float().contiguous()
    d = os.path.join(out_root, "rope")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "cases.json"), "w") as f:
        json.dump(cases, f, indent=1, sort_keys=True)
        f.write("\n")
    save_file(tensors, os.path.join(d, "tables.safetensors"),
              metadata={"generator": f"make_reference.py torch={torch.__version__} "
                                     f"transformers={transformers.__version__}"})
    print(f"rope: {len(cases)} cases at {len(ROPE_POSITIONS)} positions")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="tests/fixtures", help="output root (default: tests/fixtures)")
    ap.add_argument("--only", choices=sorted(CONFIGS), action="append",
                    help="build only this config (repeatable)")
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)  # fixed reduction order, so reruns give identical bytes

    names = args.only or list(CONFIGS)
    os.makedirs(args.out, exist_ok=True)
    build_rope_tables(args.out)
    for name in names:
        stats = build_one(name, CONFIGS[name], args.out)
        print(f"{name}: loss {stats['loss']:.6f}  max|grad| {stats['max_abs_grad']:.4g}")
        d = os.path.join(args.out, name)
        for f in sorted(os.listdir(d)):
            print(f"  {f:24s} {os.path.getsize(os.path.join(d, f)):>9,d} B")

    rows = []
    for name, c in CONFIGS.items():
        hd = c["hidden_size"] // c["num_attention_heads"]
        rows.append(
            f"| `{name}` | {c['hidden_size']} | {c['intermediate_size']} | {c['num_hidden_layers']} | "
            f"{c['num_attention_heads']} | {c['num_key_value_heads']} | {hd} | {c['vocab_size']} | "
            f"{c['rope_theta']:g} | {rope_text(c)} | {c['rms_norm_eps']:g} | "
            f"{str(c['tie_word_embeddings']).lower()} |"
        )
    readme = README.format(
        torch=torch.__version__, tf=transformers.__version__, seed=SEED, rows="\n".join(rows),
        lstd=LINEAR_STD, nn=NORM_NOISE, b=BATCH, s=SEQ, lens=ROW_LENGTHS, pad=PAD_ID,
        p0=PROMPT_LEN_ROW0,
        offsets=" and ".join(f"{v} (`{k}`)" for k, v in POSITION_OFFSET.items()),
        npos=len(ROPE_POSITIONS), maxpos=max(ROPE_POSITIONS),
    )
    with open(os.path.join(args.out, "README.md"), "w") as f:
        f.write(readme)
    print(f"wrote {os.path.join(args.out, 'README.md')}")


if __name__ == "__main__":
    sys.exit(main())
