"""One training step of a Llama-shaped model with random bf16 weights on GPU 0, with
transformers (+ PEFT for LoRA), timed the way `helix-train bench` times helix's: the PyTorch side
of scripts/gpu-bench.sh. Same step: `rows` rows of `seq` random tokens, loss on every token after
the first, sdpa attention, global-norm clipping at 1.0, AdamW (betas 0.9, 0.999, no weight
decay); the same model-FLOP formula for MFU; peak memory measured the same way, as the whole
device's memory in use (total - free) polled every millisecond by a thread.

Usage: python scripts/gpu_step_pytorch.py --method lora|sft [--layers N] [--seq 2048] [--rows 1]
       [--r 8] [--alpha 16] [--targets q_proj,k_proj,...] [--warmup 2] [--steps 5]
       [--recompute] [--peak-tflops 989] [--device cpu (a smoke test of this script)]
Prints one JSON object with the keys helix-train bench --json prints.
"""
import argparse
import json
import statistics
import threading
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

LLAMA2_7B = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=False,
)


def model_flops_per_token(cfg, method, seq):
    """helix's plan::model_flops_per_token with causal attention: 4N (LoRA) or 6N (SFT) over
    the matmul weights, plus 6*L*h*s."""
    h, l, i, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    head_dim = h // cfg.num_attention_heads
    q, kv = cfg.num_attention_heads * head_dim, cfg.num_key_value_heads * head_dim
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i
    matmul = l * per_layer + v * h  # the LM head multiplies; the embedding lookup does not
    weights = (6 if method == "sft" else 4) * matmul
    return weights + 6 * l * h * seq


class MemoryPeak:
    def __init__(self):
        self.peak, self.stop = 0, False
        self.thread = threading.Thread(target=self.poll, daemon=True)
        self.thread.start()

    def poll(self):
        while not self.stop:
            free, total = torch.cuda.mem_get_info()
            self.peak = max(self.peak, total - free)
            time.sleep(0.001)

    def finish(self):
        self.stop = True
        self.thread.join()
        return self.peak


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["lora", "sft"], default="lora")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument(
        "--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--recompute", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()

    torch.manual_seed(0)
    cfg = LlamaConfig(**{**LLAMA2_7B, "num_hidden_layers": a.layers})
    cfg._attn_implementation = "sdpa"
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    gpu = a.device == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    with torch.device(a.device):
        model = LlamaForCausalLM(cfg)
    torch.set_default_dtype(torch.float32)
    if a.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=a.r, lora_alpha=a.alpha, lora_dropout=0.0, target_modules=a.targets.split(",")
        )
        model = get_peft_model(model, lora)
    if a.recompute:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if a.method == "lora":
            model.enable_input_require_grads()
    model.train()
    sync()
    if gpu:
        torch.cuda.empty_cache()
    load_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0)
    ids = torch.randint(0, cfg.vocab_size, (a.rows, a.seq), device=a.device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sync()
        return loss.item()

    memory = MemoryPeak() if gpu else None
    losses = [step() for _ in range(a.warmup)]
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t)
    peak = memory.finish() if gpu else None
    median = statistics.median(times)
    tokens = a.rows * a.seq
    per_token = model_flops_per_token(cfg, a.method, a.seq)
    tflops = per_token * tokens / median / 1e12
    print(
        json.dumps(
            {
                "framework": f"pytorch {torch.__version__}",
                "method": a.method,
                "device": torch.cuda.get_device_name(0) if gpu else "cpu",
                "layers": a.layers,
                "dtype": "bf16",
                "rows": a.rows,
                "seq": a.seq,
                "activation_checkpointing": a.recompute,
                "built_s": load_s,
                "median_step_s": median,
                "step_s": times,
                "tokens_per_s": tokens / median,
                "model_flops_per_token": per_token,
                "model_tflops_per_s": tflops,
                "mfu": tflops / a.peak_tflops,
                "peak_tflops": a.peak_tflops,
                "peak_device_bytes": peak,
                "peak_allocated_bytes": torch.cuda.max_memory_allocated() if gpu else None,
                "losses": losses,
            }
        )
    )


if __name__ == "__main__":
    main()
