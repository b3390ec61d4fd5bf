"""Data-parallel training with ALSALS under torchrun (CPU, gloo), with gradient accumulation.

    torchrun --nproc_per_node 2 examples/ddp_train.py --accum 4

Each rank reads its own shard of the data (``DistributedSampler``). One optimizer step takes
one batch per rank and splits it into ``--accum`` micro-batches. The closure takes the
``backward`` argument, so it runs backward itself: under ``ddp.no_sync()`` for every
micro-batch but the last, so DDP all-reduces the gradients once per step, not once per
micro-batch. Trial evaluations (``backward=False``) call the plain module, skipping DDP's
hooks. The optimizer averages the losses it compares over the ranks, so every rank accepts
the same step sizes and the weights stay identical.

Without torchrun the script runs as a single process. ``--out DIR`` saves what each rank
ended with (weights, decisions, number of gradient all-reduces) for the tests.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from alsals import ALSALS


def make_dataset(n: int = 512, features: int = 20, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = (x[:, :5].sum(dim=1) + 0.5 * torch.randn(n, generator=gen) > 0).long()
    return TensorDataset(x, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32, help="per rank and step")
    parser.add_argument("--accum", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="folder for rank<i>.pt results")
    args = parser.parse_args()

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        dist.init_process_group("gloo")
    train(args, distributed)
    if distributed:
        # DDP's reducer still references communication work: free it while the process group
        # is alive (gloo work freed during interpreter shutdown can abort the process).
        gc.collect()
        dist.barrier()  # no rank tears gloo down while a peer still has a collective in flight
        dist.destroy_process_group()


def train(args: argparse.Namespace, distributed: bool) -> None:
    """Train on this rank's shard; with ``--out``, save what this rank ended with."""
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1

    torch.manual_seed(args.seed)  # identical initial weights on every rank
    model = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 2))
    ddp = DistributedDataParallel(model) if distributed else model
    allreduces = [0]
    if distributed:

        def counting_allreduce(state, bucket):
            allreduces[0] += 1
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, counting_allreduce)

    optimizer = ALSALS(model.parameters())

    dataset = make_dataset(seed=args.seed)
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True
    )
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    decisions, local_losses, steps = [], [], 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a new shuffle each epoch, the same on every rank
        for x, y in loader:
            micro = list(zip(x.chunk(args.accum), y.chunk(args.accum), strict=True))
            n = len(x)

            def closure(backward: bool, micro=micro, n=n):
                if backward:
                    optimizer.zero_grad()
                net = ddp if backward else model  # trials: no DDP hooks needed
                total = torch.zeros(())
                for i, (xb, yb) in enumerate(micro):
                    last = i == len(micro) - 1
                    sync = contextlib.nullcontext() if last or not distributed else ddp.no_sync()
                    with sync if backward else contextlib.nullcontext():
                        # weight by size: the sum over micro-batches is the batch mean
                        loss = nn.functional.cross_entropy(net(xb), yb) * (len(xb) / n)
                        if backward:
                            loss.backward()
                    total = total + loss.detach()
                return total

            local_losses.append(optimizer.step(closure).item())
            info = optimizer.last_step
            decisions.append((info.kind, info.trials, info.step_size, info.loss))
            steps += 1
        if rank == 0:
            print(
                f"epoch {epoch}: mean loss over ranks {info.loss:.4f}  "
                f"step size {optimizer.param_groups[0]['lr']:.3e}  trials {info.trials}"
            )

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        torch.save(
            {
                "weights": torch.cat([p.detach().flatten() for p in model.parameters()]),
                "decisions": decisions,
                "local_losses": local_losses,
                "steps": steps,
                "allreduces": allreduces[0],
                "world": world,
            },
            os.path.join(args.out, f"rank{rank}.pt"),
        )


if __name__ == "__main__":
    main()
