"""Reference outputs of Hugging Face PEFT for helix's LoRA and P-tuning parity tests.

    $(scripts/setup-python.sh) scripts/peft_reference.py fixtures [--methods lora,dora,...]
        rewrites tests/fixtures/<tiny>/{lora,dora,ptuning,ptuning-lstm}/ (those named) for the
        tiny models made by scripts/make_reference.py, on their committed batch
        (reference.safetensors)
    $(scripts/setup-python.sh) scripts/peft_reference.py model --model DIR --alpaca FILE --out DIR
        the same for a real model (SmolLM2 imported by helix), on a batch of real Alpaca rows
        that it writes to DIR/batch.safetensors; computed in f64 (--dtype float32 for PyTorch's
        f32 run), so helix's f32 gradients are held to the exact values rather than to another
        f32 rounding of them (PEFT f32 is itself 6.4e-5 from them on SmolLM2's adapter gradients)

Each method directory holds
  adapter_config.json, adapter_model.safetensors   PEFT's own save_pretrained output
  encoder.safetensors   (P-tuning) the whole prompt encoder, PEFT's parameter names, so helix
                        starts from the same weights
  reference.safetensors logits (f32 [B, n+S, V]), loss (f32 []), param_counts (int64 [2]:
                        PEFT's get_nb_trainable_parameters, trainable and all), grad.<name> for every
                        trainable tensor (LoRA: keys as in adapter_model.safetensors; P-tuning:
                        prompt_encoder.default.<module>)

LoRA: r=8, lora_alpha=16, dropout 0, all seven projections (rsLoRA on one tiny model); every
lora_A / lora_B is set to seeded N(0, 0.1^2) so that B is non-zero and every adapter weight gets
a gradient. DoRA (one tiny model): the same, and each magnitude set to its row norms of
W + s*BA times seeded (1 + N(0, 0.1^2)), so that it differs from the norm it divides by. P-tuning: 10 virtual tokens, MLP encoder (and a 2-layer LSTM on one tiny model),
PyTorch's own initialisation. Forward in train mode (dropout is 0), eager attention; f32 for the
tiny fixtures, f64 for a real model (gradients saved as f32).
"""

import argparse
import json
import os

import peft
import torch
import transformers
from peft import LoraConfig, PromptEncoderConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM

SEED = 4321
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTER_STD = 0.1
TINY = {
    "tiny-mha-untied": dict(rslora=False, lstm=False, encoder_hidden=32, dora=False),
    "tiny-gqa-tied": dict(rslora=False, lstm=True, encoder_hidden=32, dora=True),
    "tiny-gqa-untied-b3": dict(rslora=True, lstm=False, encoder_hidden=40, dora=False),
}
VIRTUAL_TOKENS = 10


def versions() -> str:
    return (f"peft_reference.py torch={torch.__version__} transformers={transformers.__version__} "
            f"peft={peft.__version__}")


DTYPE = torch.float32


def load_base(model_dir: str) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=DTYPE, attn_implementation="eager")


def run(model, batch: dict, out_dir: str, base_name: str, grad_key) -> dict:
    model.train()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], labels=batch["labels"])
    out.loss.backward()
    trainable, total = model.get_nb_trainable_parameters()
    tensors = {"logits": out.logits.detach().float().contiguous(),
               "loss": out.loss.detach().float().reshape(()),
               "param_counts": torch.tensor([trainable, total], dtype=torch.int64)}
    n = 0
    for pname, p in model.named_parameters():
        if p.requires_grad:
            tensors["grad." + grad_key(pname)] = p.grad.detach().float().contiguous()
            n += 1
        elif p.grad is not None:
            raise RuntimeError(f"frozen {pname} has a gradient")
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    # base_model_name_or_path is a path of this machine: record the model's name instead.
    cfg_path = os.path.join(out_dir, "adapter_config.json")
    c = json.load(open(cfg_path))
    c["base_model_name_or_path"] = base_name
    if isinstance(c.get("target_modules"), list):
        c["target_modules"] = sorted(c["target_modules"])  # saved from a set: fix the order
    json.dump(c, open(cfg_path, "w"), indent=2, sort_keys=True)
    readme = os.path.join(out_dir, "README.md")
    if os.path.exists(readme):
        os.remove(readme)
    save_file(tensors, os.path.join(out_dir, "reference.safetensors"), metadata={"generator": versions()})
    return {"loss": out.loss.item(), "trainable": n}


def lora(model_dir: str, batch: dict, out_dir: str, base_name: str, rslora: bool, dora: bool = False) -> dict:
    torch.manual_seed(SEED)
    gen = torch.Generator().manual_seed(SEED)
    model = get_peft_model(load_base(model_dir), LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, bias="none",
        task_type="CAUSAL_LM", use_rslora=rslora, use_dora=dora))
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "lora_A" in pname or "lora_B" in pname:
                p.copy_(ADAPTER_STD * torch.randn(p.shape, generator=gen))
        for module in model.modules():
            if dora and hasattr(module, "lora_magnitude_vector") and "default" in module.lora_magnitude_vector:
                s = module.scaling["default"]
                w = module.base_layer.weight + s * module.lora_B["default"].weight @ module.lora_A["default"].weight
                m = module.lora_magnitude_vector["default"].weight
                m.copy_(torch.linalg.norm(w, dim=1) * (1 + ADAPTER_STD * torch.randn(m.shape, generator=gen)))
    # PEFT's saved names drop the adapter name: ...q_proj.lora_A.default.weight -> ...lora_A.weight,
    # and the magnitude's ".weight": ...lora_magnitude_vector.default.weight -> ...lora_magnitude_vector
    def key(n: str) -> str:
        n = n.replace(".default.", ".")
        return n[:-len(".weight")] if n.endswith("lora_magnitude_vector.weight") else n
    return run(model, batch, out_dir, base_name, key)


def ptuning(model_dir: str, batch: dict, out_dir: str, base_name: str, encoder: str, hidden: int) -> dict:
    torch.manual_seed(SEED)
    model = get_peft_model(load_base(model_dir), PromptEncoderConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS,
        encoder_reparameterization_type=encoder, encoder_hidden_size=hidden,
        encoder_num_layers=2, encoder_dropout=0.0))
    state = {n: p.detach().clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    stats = run(model, batch, out_dir, base_name, lambda n: n)
    save_file(state, os.path.join(out_dir, "encoder.safetensors"), metadata={"generator": versions()})
    return stats


def all_methods(model_dir: str, batch: dict, out_root: str, base_name: str, rslora: bool, lstm: bool,
                encoder_hidden: int, dora: bool = False, methods=None) -> None:
    jobs = [("lora", lambda d: lora(model_dir, batch, d, base_name, rslora)),
            ("ptuning", lambda d: ptuning(model_dir, batch, d, base_name, "MLP", encoder_hidden))]
    if lstm:
        jobs.append(("ptuning-lstm", lambda d: ptuning(model_dir, batch, d, base_name, "LSTM", encoder_hidden)))
    if dora:
        jobs.append(("dora", lambda d: lora(model_dir, batch, d, base_name, rslora, dora=True)))
    for method, job in jobs:
        if methods is not None and method not in methods:
            continue
        s = job(os.path.join(out_root, method))
        print(f"{base_name}/{method}: loss {s['loss']:.6f}, {s['trainable']} trainable tensors")


def alpaca_batch(model_dir: str, alpaca: str) -> dict:
    """Two real Alpaca rows in Stanford's template, right-padded, answer-only labels."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = json.load(open(alpaca))[:2]
    ids, labels = [], []
    for r in rows:
        prompt = ("Below is an instruction that describes a task. Write a response that appropriately "
                  f"completes the request.\n\n### Instruction:\n{r['instruction']}\n\n### Response:\n")
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        a = tok(r["output"], add_special_tokens=False)["input_ids"][:24] + [tok.eos_token_id]
        ids.append(p + a)
        labels.append([-100] * len(p) + a)
    s = max(len(x) for x in ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    batch = {
        "input_ids": torch.tensor([x + [pad] * (s - len(x)) for x in ids]),
        "labels": torch.tensor([x + [-100] * (s - len(x)) for x in labels]),
        "attention_mask": torch.tensor([[1] * len(x) + [0] * (s - len(x)) for x in ids]),
    }
    batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    return batch


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fixtures")
    f.add_argument("--methods", help="comma-separated: lora, dora, ptuning, ptuning-lstm (default all)")
    m = sub.add_parser("model")
    m.add_argument("--model", required=True)
    m.add_argument("--alpaca", required=True)
    m.add_argument("--out", required=True)
    m.add_argument("--name", default="smollm2")
    m.add_argument("--encoder-hidden", type=int, default=128)
    m.add_argument("--dtype", choices=["float64", "float32"], default="float64")
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    if args.cmd == "fixtures":
        for name, o in TINY.items():
            base = os.path.join("tests/fixtures", name)
            ref = load_file(os.path.join(base, "reference.safetensors"))
            batch = {k: ref[k] for k in ("input_ids", "attention_mask", "position_ids", "labels")}
            methods = args.methods.split(",") if args.methods else None
            all_methods(base, batch, base, name, o["rslora"], o["lstm"], o["encoder_hidden"], o["dora"], methods)
    else:
        global DTYPE
        DTYPE = getattr(torch, args.dtype)
        os.makedirs(args.out, exist_ok=True)
        batch = alpaca_batch(args.model, args.alpaca)
        save_file({k: v.contiguous() for k, v in batch.items()}, os.path.join(args.out, "batch.safetensors"))
        all_methods(args.model, batch, args.out, args.name, False, False, args.encoder_hidden)


if __name__ == "__main__":
    main()
