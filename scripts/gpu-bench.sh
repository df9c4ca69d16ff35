#!/usr/bin/env bash
# On the GPU machine, after scripts/gpu-check.sh has unpacked dist/helix-train: helix against
# transformers + PEFT on the same GPU in one command, PyTorch before and after helix so a drift
# in the machine shows. The Llama-2-7B shape with random bf16 weights, one row of SEQ tokens:
#   1. LoRA (configs/bench/lora7b.toml: r 8, alpha 16, the seven projections): tokens/s, MFU and
#      peak GPU memory of both, and the helix / PyTorch ratios;
#   2. helix's LoRA step again with its decoder layers run op by op (model.fused_layers =
#      false), and again with the chunked attention (model.attention = chunked): what the
#      hand-differentiated layer and the FlashAttention kernels buy, as ratios; and with its
#      projections in NF4 (model.quantize_base = nf4, QLoRA): what the dequantizations cost and
#      the memory they save;
#   3. causal attention alone at a 7B layer's shape (32 heads of 128, 1 x SEQ, bf16), forward
#      and backward apart: helix's FlashAttention kernels (helix-train attention-bench, its
#      forward with 128 query rows a block, what training takes at this shape, and with 64)
#      beside
#      PyTorch's scaled_dot_product_attention, its default backend and FlashAttention-2's
#      (scripts/gpu_attention_pytorch.py), in TFLOP/s and as time ratios;
#   4. full SFT cut to SFT_LAYERS decoder layers (configs/bench/sft7b.toml), SFT_ROWS rows of
#      SEQ tokens a step (the optimizer's pass over every weight, f32 masters and moments, is
#      paid once per step: at one row it is a quarter of the step): helix's MFU, and PyTorch's
#      for reference.
# MFU counts model FLOPs per token 4N (LoRA) or 6N (SFT) + 6·L·h·s (causal attention) against
# 989 TFLOP/s; both sides print the same JSON keys (helix-train bench --json).
# Usage: scripts/gpu-bench.sh [SEQ=2048] [SFT_LAYERS=8] [STEPS=5] [SFT_ROWS=4]
set -euo pipefail
cd "$(dirname "$0")/.."
seq=${1:-2048}
sft_layers=${2:-8}
steps=${3:-5}
sft_rows=${4:-4}
source scripts/gpu-env.sh
bin=$BIN
out=${OUT:-/tmp}/gpu-bench
mkdir -p "$out"
torch_lora() { python3 scripts/gpu_step_pytorch.py --method lora --seq "$seq" --steps "$steps"; }

echo "== LoRA, Llama-2-7B shape, 1 x $seq tokens, bf16"
torch_lora | tee "$out/torch-lora-1.json" || echo "PyTorch LoRA failed"
"$bin" bench --config configs/bench/lora7b.toml --random-weights --seq "$seq" --steps "$steps" \
  --json | tee "$out/helix-lora.json" || echo "helix LoRA failed"
torch_lora | tee "$out/torch-lora-2.json" || echo "PyTorch LoRA failed"
echo "== helix LoRA with its layers op by op (model.fused_layers = false), for comparison"
"$bin" bench --config configs/bench/lora7b.toml --set model.fused_layers=false --random-weights \
  --seq "$seq" --steps "$steps" --json | tee "$out/helix-lora-op-by-op.json" \
  || echo "helix LoRA op by op failed"
echo "== helix LoRA with the chunked attention (model.attention = chunked), for comparison"
"$bin" bench --config configs/bench/lora7b.toml --set model.attention=chunked --random-weights \
  --seq "$seq" --steps "$steps" --json | tee "$out/helix-lora-chunked.json" \
  || echo "helix LoRA chunked attention failed"
echo "== helix QLoRA (model.quantize_base = nf4), for comparison"
"$bin" bench --config configs/bench/lora7b.toml --set model.quantize_base=nf4 --random-weights \
  --seq "$seq" --steps "$steps" --json | tee "$out/helix-qlora.json" \
  || echo "helix QLoRA failed"

echo "== causal attention alone, a Llama-2-7B layer's shape, 1 x $seq tokens, bf16"
for rows in 128 64; do
  "$bin" attention-bench --seq "$seq" --forward-rows "$rows" --json \
    | tee "$out/helix-attention-$rows.json" || echo "helix attention ($rows rows) failed"
done
for backend in default flash; do
  python3 scripts/gpu_attention_pytorch.py --seq "$seq" --backend "$backend" \
    | tee "$out/torch-attention-$backend.json" || echo "PyTorch attention ($backend) failed"
done

echo "== full SFT, the first $sft_layers layers of the Llama-2-7B shape, $sft_rows x $seq tokens"
"$bin" bench --config configs/bench/sft7b.toml --random-weights --layers "$sft_layers" \
  --rows "$sft_rows" --seq "$seq" --steps "$steps" --json | tee "$out/helix-sft.json" \
  || echo "helix SFT failed"
python3 scripts/gpu_step_pytorch.py --method sft --layers "$sft_layers" --rows "$sft_rows" \
  --seq "$seq" --steps "$steps" | tee "$out/torch-sft.json" || echo "PyTorch SFT failed"

python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
def load(name):
    path = os.path.join(out, name)
    try:
        return json.load(open(path))
    except (OSError, ValueError):
        return None
t1, h, t2 = load("torch-lora-1.json"), load("helix-lora.json"), load("torch-lora-2.json")
gib = lambda b: b / 2**30
def phases(what, r):
    # Where helix's median step went (helix-train bench's median_phase_s).
    p = r and r.get("median_phase_s")
    if p:
        print(f"{what}, helix's step: forward + backward {p['forward_backward']:.3f} s, gradient "
              f"norm {p['clip']:.3f} s, AdamW {p['optimizer']:.3f} s (median step "
              f"{r['median_step_s']:.3f} s)")
if not (t1 and h and t2):
    print(f"LoRA 7B: no comparison (PyTorch {bool(t1)}/{bool(t2)}, helix {bool(h)})")
else:
    tps = (t1["tokens_per_s"] + t2["tokens_per_s"]) / 2
    mem = max(t1["peak_device_bytes"], t2["peak_device_bytes"])
    print(f"LoRA 7B: helix {h['tokens_per_s']:.0f} tokens/s, MFU {100*h['mfu']:.1f} %, peak GPU "
          f"{gib(h['peak_device_bytes']):.1f} GiB | PyTorch {tps:.0f} tokens/s (runs "
          f"{t1['tokens_per_s']:.0f}, {t2['tokens_per_s']:.0f}), MFU {100*(t1['mfu']+t2['mfu'])/2:.1f} %, "
          f"peak GPU {gib(mem):.1f} GiB")
    print(f"LoRA 7B: helix / PyTorch tokens/s = {h['tokens_per_s']/tps:.2f} (goal >= 1.3); "
          f"peak memory helix / PyTorch = {h['peak_device_bytes']/mem:.2f} (goal <= 1.0); "
          f"MFU {100*h['mfu']:.1f} % (goal >= 45 %)")
phases("LoRA 7B", h)
o = load("helix-lora-op-by-op.json")
if h and o:
    print(f"LoRA 7B, helix layers op by op: {o['tokens_per_s']:.0f} tokens/s, peak GPU "
          f"{gib(o['peak_device_bytes']):.1f} GiB; fused / op by op tokens/s = "
          f"{h['tokens_per_s']/o['tokens_per_s']:.2f}, peak memory = "
          f"{h['peak_device_bytes']/o['peak_device_bytes']:.2f}")
c = load("helix-lora-chunked.json")
if h and c:
    print(f"LoRA 7B, helix with the chunked attention: {c['tokens_per_s']:.0f} tokens/s, peak GPU "
          f"{gib(c['peak_device_bytes']):.1f} GiB; {h.get('attention', '?')} / chunked tokens/s = "
          f"{h['tokens_per_s']/c['tokens_per_s']:.2f}, peak memory = "
          f"{h['peak_device_bytes']/c['peak_device_bytes']:.2f}")
n = load("helix-qlora.json")
if h and n:
    print(f"QLoRA 7B (NF4 projections): {n['tokens_per_s']:.0f} tokens/s, peak GPU "
          f"{gib(n['peak_device_bytes']):.1f} GiB; NF4 / bf16 tokens/s = "
          f"{n['tokens_per_s']/h['tokens_per_s']:.2f}, peak memory = "
          f"{n['peak_device_bytes']/h['peak_device_bytes']:.2f}")
ha, h64 = load("helix-attention-128.json"), load("helix-attention-64.json")
if ha and h64:
    print(f"attention alone, helix forward: {ha['forward_ms']:.3f} ms with 128 query rows a block "
          f"({ha['forward_tflops']:.0f} TFLOP/s), {h64['forward_ms']:.3f} ms with 64 "
          f"({h64['forward_tflops']:.0f}); 64 / 128 time = {h64['forward_ms'] / ha['forward_ms']:.2f}")
for backend in ("default", "flash"):
    ta = load(f"torch-attention-{backend}.json")
    if ha and ta:
        print(f"attention alone, 7B layer, {ha['seq']} tokens: helix forward {ha['forward_ms']:.3f} ms "
              f"({ha['forward_tflops']:.0f} TFLOP/s), backward {ha['backward_ms']:.3f} ms "
              f"({ha['backward_tflops']:.0f} TFLOP/s) | PyTorch sdpa {backend}: forward "
              f"{ta['forward_ms']:.3f} ms ({ta['forward_tflops']:.0f}), backward {ta['backward_ms']:.3f} ms "
              f"({ta['backward_tflops']:.0f}); PyTorch / helix time, forward + backward = "
              f"{(ta['forward_ms'] + ta['backward_ms']) / (ha['forward_ms'] + ha['backward_ms']):.2f}")
s, ts = load("helix-sft.json"), load("torch-sft.json")
if s:
    line = (f"SFT 7B shape, {s['layers']} layers, {s['rows']} x {s['seq']} tokens: helix {s['tokens_per_s']:.0f} tokens/s, MFU "
            f"{100*s['mfu']:.1f} % (goal >= 45 %), peak GPU {gib(s['peak_device_bytes']):.1f} GiB")
    if ts:
        line += (f" | PyTorch {ts['tokens_per_s']:.0f} tokens/s, MFU {100*ts['mfu']:.1f} %, "
                 f"peak GPU {gib(ts['peak_device_bytes']):.1f} GiB")
    print(line)
    phases("SFT 7B shape", s)
PY
