"""Reference NF4 quantization from torchao (the NF4Tensor torchtune's QLoRA uses), for helix's NF4
parity tests. Writes tests/fixtures/nf4/nf4.safetensors (or the path given), for each case C:

  C.weight               the input, in the case's dtype
  C.quantized_data       uint8 [numel/2], two 4-bit codes a byte (element 2i in the high nibble)
  C.quantized_scalers    int8 [numel/64], each block's absmax less their mean, quantized per 256 blocks
  C.quantization_factor  [numel/64/256], the case's dtype: 256 / (2 * absmax) of each scaler block
  C.scaler_mean          [1], the case's dtype: mean of the block absmaxes
  C.nf4                  [16], the case's dtype: torchao's code table rounded to that dtype
  C.dequantized          torchao's dequantization (NF4Tensor.get_original_weight()), input's shape/dtype

Cases: bf16 (128x256, N(0, 0.02^2), block 5 all zeros, three outliers), bf16_wide (64x1024,
N(0, 1)), f32 (128x256, N(0, 0.02^2)). block_size 64, scaler_block_size 256 (to_nf4's defaults).

With torchao kept out of scripts/setup-python.sh's environment (PEFT 0.17.1 fails to import
its LoRA layers with torchao 0.18 installed there):

    py=$(scripts/setup-python.sh)
    "$py" -m pip install -q --no-deps --target ~/.cache/helix/torchao torchao==0.18.0
    PYTHONPATH=~/.cache/helix/torchao "$py" scripts/nf4_reference.py [OUT]
"""

import os
import sys

import torch
import torchao
from safetensors.torch import save_file
from torchao.quantization import to_nf4

SEED = 2024
BLOCK = 64
SCALER_BLOCK = 256
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def case_bf16(gen: torch.Generator) -> torch.Tensor:
    w = (0.02 * torch.randn(128, 256, generator=gen)).to(torch.bfloat16)
    flat = w.view(-1)
    flat[5 * BLOCK:6 * BLOCK] = 0  # an all-zero block: absmax 0, so torchao quantizes 0/0
    flat[1000], flat[7000], flat[20000] = 0.5, -0.3, 0.25
    return w


def case_bf16_wide(gen: torch.Generator) -> torch.Tensor:
    return torch.randn(64, 1024, generator=gen).to(torch.bfloat16)


def case_f32(gen: torch.Generator) -> torch.Tensor:
    return 0.02 * torch.randn(128, 256, generator=gen)


CASES = {"bf16": case_bf16, "bf16_wide": case_bf16_wide, "f32": case_f32}


def main() -> None:
    out = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures/nf4/nf4.safetensors"
    out = os.path.join(ROOT, out)
    torch.set_num_threads(1)
    tensors = {}
    for i, (name, make) in enumerate(CASES.items()):
        w = make(torch.Generator().manual_seed(SEED + i)).contiguous()
        assert w.numel() % (BLOCK * SCALER_BLOCK) == 0
        t = to_nf4(w, block_size=BLOCK, scaler_block_size=SCALER_BLOCK)
        deq = t.get_original_weight()
        assert torch.equal(deq, t.to(w.dtype)), "get_original_weight and .to(dtype) differ"
        assert deq.shape == w.shape and deq.dtype == w.dtype
        tensors.update({
            f"{name}.weight": w,
            f"{name}.quantized_data": t.quantized_data,
            f"{name}.quantized_scalers": t.quantized_scalers,
            f"{name}.quantization_factor": t.quantization_factor,
            f"{name}.scaler_mean": t.scaler_mean.reshape(1),
            f"{name}.nf4": t.nf4,
            f"{name}.dequantized": deq,
        })
        err = (deq.float() - w.float()).abs()
        print(f"{name}: {w.dtype} {list(w.shape)}, scaler_mean {t.scaler_mean.item():.6g}, "
              f"max |dequantized - weight| {err.max().item():.6g}, mean {err.mean().item():.6g}")
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_file(tensors, out, metadata={
        "generator": f"nf4_reference.py torch={torch.__version__} torchao={torchao.__version__}"})
    print(f"wrote {out} ({os.path.getsize(out)} bytes)")


if __name__ == "__main__":
    main()
