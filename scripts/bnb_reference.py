"""Reference 4-bit checkpoints from bitsandbytes + transformers, for helix's reader of them
(tests/bnb_4bit.rs). From a tiny Llama (tiny-gqa-tied's shape with intermediate_size 128, so
every row is whole blocks of 64: see the note below; seeded random weights), writes two
directories under tests/fixtures/ (or OUT), each what `save_pretrained` writes for a model
loaded with `BitsAndBytesConfig(load_in_4bit=True, ...)`, plus reference.safetensors:

  bnb-nf4-bf16   NF4, double quantization, bf16 (the QLoRA recipe's checkpoint)
  bnb-fp4-f32    FP4, no double quantization, f32

  reference.safetensors:
    dense.<name>   bitsandbytes' dequantize_4bit of each 4-bit weight (its dtype and shape)
    input_ids      [2, 12] int64
    logits         [2, 12, vocab] f32: transformers' forward of the 4-bit model (bitsandbytes'
                   gemm_4bit), which the script checks against its dense model's with the
                   dense weights above

and bnb-parts/, weights alone (F.quantize_4bit, stored as QuantState.as_dict packs them) in the
shapes the tiny model lacks: more than 256 blocks (three double-quantization groups), an odd
element count, f16, quant_storage bf16, FP4 with double quantization, NF4 without.

bitsandbytes 0.50.2's native CPU kernel for dequantize_4bit blocks each row apart, which differs
from how it quantized (the flattened weight in blocks, as its CUDA kernels and its portable
implementation block it) wherever a row is not whole blocks (the tiny model's down_proj, 160
columns): it gives a weight 0.21 from the original where the portable one gives 0.045. The
reference therefore puts that portable implementation in place of F.dequantize_4bit, for both
the dense weights it writes and the model's forward.

With bitsandbytes kept out of scripts/setup-python.sh's environment (as torchao is: PEFT imports
what it finds):

    py=$(scripts/setup-python.sh)
    "$py" -m pip install -q --no-deps --target ~/.cache/helix/bnb bitsandbytes==0.50.2
    PYTHONPATH=~/.cache/helix/bnb "$py" scripts/bnb_reference.py [OUT]
"""

import os
import shutil
import sys
import tempfile

import bitsandbytes
import bitsandbytes.functional as F
import torch
import transformers
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.backends.utils import _get_4bit_code
from bitsandbytes.nn import Linear4bit
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = os.path.join(HERE, "..", "tests", "fixtures", "tiny-gqa-tied", "config.json")


def _portable_dequantize_4bit(A, quant_state):
    """bitsandbytes' dequantize_4bit with its portable kernel (see the module's note)."""
    qs = quant_state
    absmax = qs.absmax
    if qs.nested:
        absmax = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    code = _get_4bit_code(qs.quant_type, A.device)
    return _dequantize_4bit_compute(A.view(torch.uint8).reshape(-1), absmax.float(), code, qs.blocksize, qs.shape, qs.dtype)


# The 4-bit matmul (bitsandbytes.autograd) looks the function up in this module at each call.
F.dequantize_4bit = _portable_dequantize_4bit

CASES = {
    "bnb-nf4-bf16": dict(quant_type="nf4", double_quant=True, dtype=torch.bfloat16),
    "bnb-fp4-f32": dict(quant_type="fp4", double_quant=False, dtype=torch.float32),
}


def write_source(path):
    """The tiny dense model the 4-bit checkpoints are made from."""
    config = transformers.LlamaConfig.from_json_file(SHAPE)
    config.intermediate_size = 128
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(config).save_pretrained(path)


def write_case(source, out, quant_type, double_quant, dtype):
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant_type,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=dtype,
    )
    model = AutoModelForCausalLM.from_pretrained(
        source, quantization_config=config, device_map="cpu", dtype=dtype
    )
    model.eval()
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out)
    os.remove(os.path.join(out, "generation_config.json"))

    ref = {}
    for name, module in model.named_modules():
        if isinstance(module, Linear4bit):
            # The forward as on a GPU (dequantize, then a dense matmul), not the repacked
            # AVX512-BF16 CPU kernel, on CPUs that have it.
            module.support_avx512bf16_for_cpu = False
            w = module.weight
            ref[f"dense.{name}.weight"] = F.dequantize_4bit(w.data, w.quant_state).contiguous()
    assert ref, "no 4-bit layers"
    g = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float()
    # The 4-bit forward is dequantize, then a dense matmul: transformers' dense model with
    # those weights gives the same logits, to the matmuls' rounding.
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    dense.eval()
    with torch.no_grad():
        params = dict(dense.named_parameters())
        for key, w in ref.items():
            params[key[len("dense."):]].copy_(w)
        dense_logits = dense(input_ids=input_ids).logits.float()
    diff = (logits - dense_logits).abs().max().item()
    assert diff <= 1e-5 * logits.abs().max().item() or dtype != torch.float32, diff
    print(f"{out}: 4-bit forward vs dense forward on its weights: max |dlogits| {diff:.3e}")
    ref["input_ids"] = input_ids
    ref["logits"] = logits.contiguous()
    save_file(ref, os.path.join(out, "reference.safetensors"))
    print(f"wrote {out}: {len(ref) - 2} 4-bit weights ({quant_type}, double_quant={double_quant}, {dtype})")


PARTS = {
    # name: (shape, dtype, quant_type, double_quant, quant_storage)
    "groups.f16.weight": ((300, 129), torch.float16, "nf4", True, torch.bfloat16),
    "odd.fp4_nested.weight": ((7, 33), torch.float32, "fp4", True, torch.uint8),
    "plain.nf4.weight": ((128, 256), torch.bfloat16, "nf4", False, torch.uint8),
}


def write_parts(out):
    g = torch.Generator().manual_seed(11)
    stored, ref = {}, {}
    for name, (shape, dtype, quant_type, double_quant, storage) in PARTS.items():
        w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
        q, state = F.quantize_4bit(
            w, blocksize=64, quant_type=quant_type, compress_statistics=double_quant, quant_storage=storage
        )
        stored[name] = q
        for k, v in state.as_dict(packed=True).items():
            stored[f"{name}.{k}"] = v
        ref[f"dense.{name}"] = F.dequantize_4bit(q, state).contiguous()
    os.makedirs(out, exist_ok=True)
    save_file(stored, os.path.join(out, "model.safetensors"))
    save_file(ref, os.path.join(out, "reference.safetensors"))
    print(f"wrote {out}: {len(ref)} 4-bit weights")


def main():
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", "tests", "fixtures")
    print(f"bitsandbytes {bitsandbytes.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as source:
        write_source(source)
        for name, case in CASES.items():
            write_case(source, os.path.join(root, name), **case)
    write_parts(os.path.join(root, "bnb-parts"))


if __name__ == "__main__":
    main()
