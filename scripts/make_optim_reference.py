"""Reference numbers for helix's AdamW, gradient clipping and LR schedules, from PyTorch and
transformers. Writes tests/fixtures/optim/reference.safetensors:

  init.<p>             initial parameters (f32): w (4x6) and emb (5x3) decay, norm (6) does not
  grad.<k>.<p>         the raw gradient of step k (before clipping), k = 0..STEPS-1
  lr.<k>               the learning rate of step k (cosine with min lr, warmup 2, from
                       transformers' get_cosine_with_min_lr_schedule_with_warmup)
  norm.<k>             clip_grad_norm_'s returned norm at step k (max_norm 1.0)
  param.<k>.<p>        parameters after step k (torch.optim.AdamW, foreach=False)
  sched.cosine / sched.linear / sched.constant   lr for steps 0..50 of a 50-step run with
                       5 warmup steps and base lr 1e-3 (cosine down to min_lr 1e-4)

    $(scripts/setup-python.sh) scripts/make_optim_reference.py
"""

import torch
import transformers
from safetensors.torch import save_file
from transformers import (get_constant_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup,
                          get_linear_schedule_with_warmup)

STEPS = 6
LR = 1e-2


def main() -> None:
    torch.manual_seed(7)
    params = {"w": torch.randn(4, 6), "emb": torch.randn(5, 3), "norm": 1 + 0.1 * torch.randn(6)}
    out = {f"init.{k}": v.clone() for k, v in params.items()}
    ps = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    opt = torch.optim.AdamW([{"params": [ps["w"], ps["emb"]], "weight_decay": 0.1},
                             {"params": [ps["norm"]], "weight_decay": 0.0}],
                            lr=LR, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=STEPS,
                                                        min_lr=1e-3)
    for k in range(STEPS):
        # Large early gradients so clipping acts on some steps and not others.
        scale = 4.0 if k % 2 == 0 else 0.05
        for name, p in ps.items():
            g = scale * torch.randn(p.shape)
            out[f"grad.{k}.{name}"] = g.clone()
            p.grad = g
        out[f"lr.{k}"] = torch.tensor(opt.param_groups[0]["lr"], dtype=torch.float64)
        out[f"norm.{k}"] = torch.nn.utils.clip_grad_norm_(list(ps.values()), 1.0).double()
        opt.step()
        sched.step()
        for name, p in ps.items():
            out[f"param.{k}.{name}"] = p.detach().clone()

    for name, make in [
        ("cosine", lambda o: get_cosine_with_min_lr_schedule_with_warmup(o, 5, 50, min_lr=1e-4)),
        ("linear", lambda o: get_linear_schedule_with_warmup(o, 5, 50)),
        ("constant", lambda o: get_constant_schedule_with_warmup(o, 5)),
    ]:
        o = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        s = make(o)
        lrs = []
        for _ in range(51):
            lrs.append(o.param_groups[0]["lr"])
            o.step()
            s.step()
        out[f"sched.{name}"] = torch.tensor(lrs, dtype=torch.float64)
    save_file({k: v.contiguous() for k, v in out.items()}, "tests/fixtures/optim/reference.safetensors",
              metadata={"generator": f"make_optim_reference.py torch={torch.__version__} "
                                     f"transformers={transformers.__version__}"})
    print("wrote tests/fixtures/optim/reference.safetensors")


if __name__ == "__main__":
    main()
