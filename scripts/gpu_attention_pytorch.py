"""PyTorch's causal scaled_dot_product_attention at the shape `helix-train attention-bench`
times, forward and backward apart, printed as one JSON object with the same keys.

Inputs are random and laid out as helix's (q, k, v views of [B, S, heads, D]; the output's
gradient [B, S, Hq, D] read heads first). FLOPs count the causal half of the matmuls: the
forward 4·B·Hq·D·S(S+1)/2, the backward 2.5 times that. Times are wall clock around
synchronized calls, medians of --repeats, as helix's.

  python3 scripts/gpu_attention_pytorch.py [--seq 2048] [--heads 32] [--backend default|flash|cudnn|efficient]
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=None)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--dtype", choices=["bf16", "f16"], default="bf16")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--backend", choices=["default", *BACKENDS], default="default")
    p.add_argument("--device", default="cuda", help="cuda, or cpu to try the script here")
    a = p.parse_args()
    b, hq, s, d = a.batch, a.heads, a.seq, a.head_dim
    hkv = a.kv_heads or hq
    if hq % hkv:
        p.error(f"--heads {hq} is not a multiple of --kv-heads {hkv}")
    dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[a.dtype]
    dev = a.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

    def projection(heads):
        x = torch.randn(b, s, heads, d, device=dev, dtype=dtype).transpose(1, 2)
        return x.detach().requires_grad_(True)

    q, k, v = projection(hq), projection(hkv), projection(hkv)
    dout = torch.randn(b, s, hq, d, device=dev, dtype=dtype).transpose(1, 2)
    gqa = {"enable_gqa": True} if hkv != hq else {}

    def attention():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)

    fwd, bwd = [], []
    for i in range(a.warmup + a.repeats):
        q.grad = k.grad = v.grad = None
        sync()
        t0 = time.perf_counter()
        if a.backend == "default":
            out = attention()
        else:
            with sdpa_kernel(BACKENDS[a.backend]):
                out = attention()
        sync()
        t1 = time.perf_counter()
        out.backward(dout)
        sync()
        t2 = time.perf_counter()
        del out
        if i >= a.warmup:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
    f_ms, b_ms = statistics.median(fwd), statistics.median(bwd)
    flops = 4.0 * b * hq * d * (s * (s + 1) / 2)
    tf = lambda fl, ms: fl / (ms * 1e-3) / 1e12
    print(json.dumps({
        "implementation": f"torch_sdpa_{a.backend}",
        "torch": torch.__version__,
        "batch": b, "q_heads": hq, "kv_heads": hkv, "seq": s, "head_dim": d, "dtype": a.dtype,
        "forward_ms": f_ms, "backward_ms": b_ms,
        "forward_tflops": tf(flops, f_ms), "backward_tflops": tf(2.5 * flops, b_ms),
        "tflops": tf(3.5 * flops, f_ms + b_ms),
    }))


if __name__ == "__main__":
    main()
