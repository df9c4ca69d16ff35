"""helix → PEFT / transformers: loads what helix wrote and compares with helix's own outputs.

    $(scripts/setup-python.sh) scripts/peft_interop.py --dir DIR --model NAME=MODEL_DIR ...

DIR/<NAME>/lora, DIR/<NAME>/dora (LoRA with use_dora) and DIR/<NAME>/ptuning are adapters helix
trained and saved in PEFT's format
(tests/peft_parity.rs, write_helix_adapters_for_peft_interop), each with helix_logits.safetensors
(logits on batch.safetensors). For each:
  - PeftModel.from_pretrained(base, adapter) gives helix's logits (real and virtual positions);
  - DIR/<NAME>/merged (`helix-train export --adapter …/lora`) and DIR/<NAME>/merged-dora
    (`… --adapter …/dora`), when present, load with AutoModelForCausalLM.from_pretrained and give
    the same logits as helix's LoRA / DoRA model;
  - DIR/<NAME>/<method>/generate.json (`helix-train generate --adapter … --print-ids`), when
    present: PEFT's greedy generate from the same prompt ids gives the same new tokens.
Prints one line per check; exits 1 if generation differs or any logits differ by more than
--tol (1e-4) times max(1, largest |logit|): the same relative precision for the tiny models
(logits up to ~3) and for a real model whose logits reach 30.
"""

import argparse
import json
import os
import sys

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM


def base(model_dir: str):
    return LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()


def compare(what: str, got: torch.Tensor, want: torch.Tensor, keep: torch.Tensor, tol: float) -> bool:
    if got.shape != want.shape:
        print(f"FAIL {what}: shape {tuple(got.shape)} vs helix {tuple(want.shape)}")
        return False
    d = ((got - want).abs() * keep[..., None]).max().item()
    scale = want.abs().max().item()
    limit = tol * max(1.0, scale)
    ok = d <= limit
    print(f"{'ok  ' if ok else 'FAIL'} {what}: max |Δ logits| {d:.3e} (limit {limit:.1e}; max |logit| {scale:.1f})")
    return ok


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--model", action="append", required=True, help="NAME=MODEL_DIR")
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()
    torch.set_num_threads(2)
    ok = True
    for spec in args.model:
        name, model_dir = spec.split("=", 1)
        for method in ("lora", "dora", "ptuning"):
            d = os.path.join(args.dir, name, method)
            if method == "dora" and not os.path.isdir(d):
                continue
            helix = load_file(os.path.join(d, "helix_logits.safetensors"))["logits"]
            b = load_file(os.path.join(d, "batch.safetensors"))
            mask = b["attention_mask"]
            with torch.no_grad():
                model = PeftModel.from_pretrained(base(model_dir), d).eval()
                out = model(input_ids=b["input_ids"], attention_mask=mask).logits
            n = out.shape[1] - mask.shape[1]  # virtual tokens in front (P-tuning)
            keep = torch.cat([torch.ones(mask.shape[0], n, dtype=mask.dtype), mask], 1).float()
            ok &= compare(f"{name}/{method}: PeftModel.from_pretrained(helix adapter)", out, helix, keep, args.tol)
            merged = os.path.join(args.dir, name, {"lora": "merged", "dora": "merged-dora"}.get(method, ""))
            if method in ("lora", "dora") and os.path.isdir(merged):
                with torch.no_grad():
                    m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
                    out = m(input_ids=b["input_ids"], attention_mask=mask).logits
                ok &= compare(f"{name}/{os.path.basename(merged)}: AutoModelForCausalLM.from_pretrained(helix export)",
                              out, helix, keep, args.tol)
            gen_path = os.path.join(d, "generate.json")
            if os.path.exists(gen_path):
                g = json.load(open(gen_path))
                ids = torch.tensor([g["prompt_ids"]])
                with torch.no_grad():
                    seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                         max_new_tokens=len(g["new_ids"]))
                new = seq[0, ids.shape[1]:].tolist()
                same = new == g["new_ids"]
                ok &= same
                print(f"{'ok  ' if same else 'FAIL'} {name}/{method}: PEFT generate {len(new)} tokens "
                      f"{'==' if same else '!='} helix-train generate --adapter")
                if not same:
                    print(f"     PEFT  {new}\n     helix {g['new_ids']}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
