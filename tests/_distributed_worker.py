"""Worker for test_distributed: one rank of a 2-process gloo job training with DDP."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from alsals import ALSALS, SLS, AdamSLS

OPTIMIZERS = {"SLS": SLS, "AdamSLS": AdamSLS, "ALSALS": ALSALS}


def run(rank: int, world: int, init_method: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    try:
        results = {}
        for name, cls in OPTIMIZERS.items():
            torch.manual_seed(0)  # same initial weights on every rank
            model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = cls(ddp.parameters(), lr=30.0)
            data_gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
            decisions, local_losses = [], []
            for _ in range(6):
                x = torch.randn(32, 6, generator=data_gen)
                y = (x.sum(dim=1) > 0).float()

                def closure(x=x, y=y, ddp=ddp):
                    out = ddp(x).squeeze(-1)
                    return nn.functional.binary_cross_entropy_with_logits(out, y)

                local_losses.append(float(opt.step(closure)))
                info = opt.last_step
                decisions.append((info.kind, info.trials, info.step_size, info.loss))
            weights = torch.cat([p.detach().flatten() for p in model.parameters()])
            results[name] = {"decisions": decisions, "weights": weights, "local": local_losses}
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
