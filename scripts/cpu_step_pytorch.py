"""One LoRA training step of SmolLM2-135M on the CPU with transformers + PEFT, timed: the
PyTorch side of scripts/cpu-step-vs-pytorch.sh. The same shapes and settings as helix's
`smollm2_step/lora_4x256` bench (benches/train_step.rs): 4 rows of 256 pseudo-random tokens,
loss on every token after the first, LoRA r 8, alpha 16 on the seven projections, no dropout,
f32, sdpa attention, global-norm clipping at 1.0 and AdamW.

Usage: python scripts/cpu_step_pytorch.py MODEL_DIR [STEPS] [--dora]   (prints the median step time)
       --dora: PEFT's DoRA (use_dora=True) in place of LoRA
"""
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM


def main():
    args = [a for a in sys.argv[1:] if a != "--dora"]
    dora = "--dora" in sys.argv[1:]
    model_dir = args[0]
    steps = int(args[1]) if len(args) > 1 else 10
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    )
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, use_dora=dora)
    )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    ids = torch.randint(0, model.config.vocab_size, (4, 256))
    labels = ids.clone()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    for _ in range(2):  # warm-up
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    print(
        f"pytorch{' DoRA' if dora else ''}: {torch.__version__}, {torch.get_num_threads()} threads, "
        f"median {statistics.median(times):.4f} s over {steps} steps "
        f"(min {min(times):.4f}, max {max(times):.4f})"
    )


if __name__ == "__main__":
    main()
