"""Worker for test_distributed: one rank of a 2-process gloo job training with DDP."""

from __future__ import annotations

import datetime
import gc
import warnings

import torch
import torch.distributed as dist
from torch import nn

from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS
from alsals.diagnostics import scan_direction

OPTIMIZERS = {"SLS": SLS, "AdamSLS": AdamSLS, "MomentumALSALS": MomentumALSALS}


# What rank 1 sees at each step of the "divergent" run while rank 0 trains normally.
RANK1_EVENTS = [
    "normal",
    "no_grad",
    "nan_loss",
    "zero_grad",
    "normal",
    "no_grad",
    "normal",
    "nan_without_grad",  # finite with backward, NaN in the trials' evaluations
    "normal",
]


def divergent_run(rank: int, cls: type) -> list[tuple[str, int]]:
    """Each rank with its own local state at every step: no gradient, a NaN, a zero
    gradient, NaN trials on rank 1 only. Every rank must issue the same collectives (gloo would fail
    on a mismatch, NCCL would hang)."""
    torch.manual_seed(0)
    w = torch.randn(5, requires_grad=True)
    opt = cls([w], lr=1.0)
    kinds = []
    for event in RANK1_EVENTS:
        mine = event if rank == 1 else "normal"

        def closure(backward: bool, mine=mine):
            loss = ((w - 1.0) ** 2).sum()
            if mine == "nan_loss" or (mine == "nan_without_grad" and not backward):
                loss = loss * float("nan")
            if mine == "zero_grad":
                loss = loss * 0.0 + 1.0
            if backward:
                opt.zero_grad()
                if mine != "no_grad":
                    loss.backward()
            return loss.detach()

        opt.step(closure)
        kinds.append((opt.last_step.kind, opt.last_step.trials))
    return kinds


def guard_run(rank: int) -> dict:
    """``loss_rise_guard`` under DDP: noisy linear regression (a loss that cannot reach 0),
    each rank its own mini-batches of 8, ``MomentumALSALS`` without the Polyak cap, until the guard
    has fired. It decides on the loss averaged over ranks, so both ranks must fire at the
    same steps and keep the same ceiling."""
    gen = torch.Generator().manual_seed(0)  # the same data set on every rank
    x = torch.randn(512, 16, dtype=torch.float64, generator=gen) / 4.0
    y = x @ torch.randn(16, dtype=torch.float64, generator=gen)
    y = y + torch.randn(512, dtype=torch.float64, generator=gen)
    model = nn.Linear(16, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = MomentumALSALS(ddp.parameters(), loss_floor=None)
    batches = torch.Generator().manual_seed(200 + rank)  # each rank its own batches
    fired = []
    for k in range(500):
        idx = torch.randint(0, 512, (8,), generator=batches)

        def closure(idx=idx, ddp=ddp):
            return 0.5 * ((ddp(x[idx]).squeeze(-1) - y[idx]) ** 2).mean()

        opt.step(closure)
        if opt.last_step.loss_rose:
            fired.append(k)
    state = opt.state[model.weight]["line_search"]
    return {"fired": fired, "state": state, "weights": model.weight.detach().clone()}


def floor_run(rank: int) -> dict:
    """A loss that goes below ``loss_floor=0`` under DDP (a least-squares fit minus 3, each
    rank its own half of the data): the floor is refuted from trial losses averaged over
    ranks, so both ranks refute it at the same step and keep the same state and weights."""
    gen = torch.Generator().manual_seed(0)  # the same data set on every rank
    x = torch.randn(256, 8, dtype=torch.float64, generator=gen)
    y = x @ torch.randn(8, dtype=torch.float64, generator=gen)
    model = nn.Linear(8, 1, bias=False).double()
    nn.init.zeros_(model.weight)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = MomentumALSALS(ddp.parameters())
    idx = torch.arange(rank, 256, 2)  # each rank its own half
    refuted_at = None
    for k in range(100):

        def closure(ddp=ddp):
            return 0.5 * ((ddp(x[idx]).squeeze(-1) - y[idx]) ** 2).mean() - 3.0

        opt.step(closure)
        if refuted_at is None and opt.search_state.floor_refuted:
            refuted_at = k
    state = opt.state[model.weight]["line_search"]
    return {"refuted_at": refuted_at, "state": state, "weights": model.weight.detach().clone()}


def undo_run(rank: int) -> dict:
    """AdamSLS (whose momentum updates are untested) under DDP, each rank its own batches;
    after 5 steps rank 1's loss is NaN on two steps in a row: the mean is NaN on both
    ranks, so both undo the last update alike and keep the same weights."""
    gen = torch.Generator().manual_seed(0)  # the same data set on every rank
    x = torch.randn(64, 6, dtype=torch.float64, generator=gen)
    y = x @ torch.randn(6, dtype=torch.float64, generator=gen)
    model = nn.Linear(6, 1).double()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = AdamSLS(ddp.parameters(), lr=0.1)
    kinds = []
    for k in range(9):
        idx = torch.arange(rank, 64, 2)[8 * (k % 4) : 8 * (k % 4) + 8]

        def closure(idx=idx, k=k):
            loss = 0.5 * ((ddp(x[idx]).squeeze(-1) - y[idx]) ** 2).mean()
            return loss * float("nan") if (rank == 1 and k in (5, 6)) else loss

        opt.step(closure)
        kinds.append(opt.last_step.kind)
    state = opt.state[model.weight]["line_search"]
    return {"kinds": kinds, "state": state, "weights": model.weight.detach().clone()}


class Tie(nn.Module):
    """``max(w0 + w1, -w0) + 0.01 ||w - c||^2 + 5`` at a tie of the two pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        w = self.w
        return torch.stack([w[0] + w[1], -w[0]]).max() + 0.01 * ((w - c) ** 2).sum() + 5.0


def kink_run(rank: int) -> dict:
    """``MomentumALSALS(params)`` under DDP from a tie whose pieces are the same on every rank and
    whose quadratic differs by rank: the search's trials (mean losses) contradict its slope
    alike on both ranks, which step through the kink together (phase 5.8)."""
    model = Tie()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = MomentumALSALS(ddp.parameters())
    c = torch.tensor([0.5 * rank, -0.5 * rank], dtype=torch.float64)
    kinds = []
    for _ in range(5):
        opt.step(lambda: ddp(c))
        kinds.append(opt.last_step.kind)
    state = opt.state[model.w]["line_search"]
    return {"kinds": kinds, "state": state, "weights": model.w.detach().clone()}


def schedule_free_run(rank: int) -> dict:
    """ALSALS under DDP, each rank its own data; then the divergent events."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = ALSALS(ddp.parameters(), lr=30.0, loss_floor=None)
    data_gen = torch.Generator().manual_seed(100 + rank)
    decisions, written = [], None
    for k in range(24):
        if k == 14:  # an lr cut 1000x: the search climbs from it where it cannot pay
            for group in opt.param_groups:
                group["lr"] *= 1e-3
            written = opt.param_groups[0]["lr"]
        x = torch.randn(32, 6, generator=data_gen)
        y = (x.sum(dim=1) > 0).float()

        def closure(x=x, y=y, ddp=ddp):
            return nn.functional.binary_cross_entropy_with_logits(ddp(x).squeeze(-1), y)

        opt.step(closure)
        info = opt.last_step
        decisions.append((info.kind, info.trials, info.step_size, info.loss))
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {
        "decisions": decisions,
        "written": written,
        "weights": weights,
        "divergent": divergent_run(rank, ALSALS),
    }


class _Factorisation(nn.Module):
    """Two factor matrices whose product's entries a batch is fitted to."""

    def __init__(self, n: int, rank: int, gen: torch.Generator) -> None:
        super().__init__()
        self.u = nn.Parameter(0.1 * torch.randn(n, rank, dtype=torch.float64, generator=gen))
        self.v = nn.Parameter(0.1 * torch.randn(n, rank, dtype=torch.float64, generator=gen))

    def forward(self, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return (self.u[i] * self.v[j]).sum(-1)


def start_rise_run(rank: int) -> dict:
    """``start_rise`` under DDP: a matrix factorisation whose batch losses climb from the
    start at ``ALSALS``'s first step size (each rank its own batches of 32 entries). The rule
    judges the loss averaged over ranks, so both ranks cut at the same step and keep the
    same state and weights."""
    gen = torch.Generator().manual_seed(0)  # the same data and initial weights on every rank
    n = 200
    truth = torch.randn(n, 4, dtype=torch.float64, generator=gen)
    truth = truth @ torch.randn(n, 4, dtype=torch.float64, generator=gen).T / 2.0
    seen = torch.randperm(n * n, generator=gen)[: n * n // 5]
    i, j = seen // n, seen % n
    r = truth[i, j] + 0.3 * torch.randn(len(seen), dtype=torch.float64, generator=gen)
    model = _Factorisation(n, 16, gen)
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = ALSALS(ddp.parameters())
    batches = torch.Generator().manual_seed(300 + rank)
    cut_at = None
    for k in range(60):
        b = torch.randint(0, len(r), (32,), generator=batches)

        def closure(b=b, ddp=ddp):
            return ((ddp(i[b], j[b]) - r[b]) ** 2).mean()

        opt.step(closure)
        if cut_at is None and opt.search_state.start_ceiling < float("inf"):
            cut_at = k
    return {
        "cut_at": cut_at,
        "state": opt.search_state,
        "weights": torch.cat([p.detach().flatten() for p in model.parameters()]),
    }


def retry_run(rank: int) -> dict:
    """``late_retry`` under DDP: a search at every third step after a one-step first phase,
    each rank its own batches, every sixth of them (a search's) with inputs 5x larger, on
    which searches cut; whether a cut is retried is read from the trials' losses averaged
    over ranks, so both ranks arm and run the same retries and keep the same weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = ALSALS(ddp.parameters(), lr=1.0, initial_searches=1, search_interval=3)
    data_gen = torch.Generator().manual_seed(400 + rank)
    decisions, armed = [], []
    for k in range(60):
        x = torch.randn(16, 6, generator=data_gen)
        y = (x.sum(dim=1) > 0).float()
        x = x * 5.0 if k % 6 == 3 else x

        def closure(x=x, y=y, ddp=ddp):
            return nn.functional.binary_cross_entropy_with_logits(ddp(x).squeeze(-1), y)

        opt.step(closure)
        info = opt.last_step
        decisions.append((info.kind, info.trials, info.step_size))
        if opt.search_state.retry_from > 0.0:
            armed.append(k)
    return {
        "decisions": decisions,
        "armed": armed,
        "weights": torch.cat([p.detach().flatten() for p in model.parameters()]),
    }


def regrowth_run(rank: int) -> dict:
    """``regrowth`` under DDP: each rank its own batches (two of them, at searches, with
    inputs 20x larger), cuts left standing (no retries); whether a search's first trial
    passed as linear is read from the trial's loss and the promise averaged over ranks, so
    both ranks take the same verdicts at the same steps and keep the same weights."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = ALSALS(
        ddp.parameters(),
        lr=1.0,
        initial_searches=1,
        search_interval=3,
        late_retry=False,
        cut_retry=False,
    )
    data_gen = torch.Generator().manual_seed(400 + rank)
    decisions, regrown = [], []
    for k in range(60):
        x = torch.randn(16, 6, generator=data_gen)
        y = (x.sum(dim=1) > 0).float()
        x = x * 20.0 if k in (9, 27) else x

        def closure(x=x, y=y, ddp=ddp):
            return nn.functional.binary_cross_entropy_with_logits(ddp(x).squeeze(-1), y)

        opt.step(closure)
        info = opt.last_step
        decisions.append((info.kind, info.trials, info.step_size))
        if opt.search_state.regrow:
            regrown.append(k)
    return {
        "decisions": decisions,
        "regrown": regrown,
        "state": opt.search_state,
        "weights": torch.cat([p.detach().flatten() for p in model.parameters()]),
    }


def mismatch_run(rank: int) -> dict:
    """Each optimizer built with another ``c``, or another ``lr`` (where the first search
    starts), on each rank: the first step's error, on every rank (no hang, no drift)."""
    errors: dict[str, dict] = {"c": {}, "lr": {}}
    for setting, values in (("c", (0.1, 0.5)), ("lr", (0.1, 0.2))):
        for name, cls in {**OPTIMIZERS, "ALSALS": ALSALS}.items():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = cls(ddp.parameters(), **{setting: values[rank]})
            x = torch.randn(8, 6)
            try:
                opt.step(lambda x=x, ddp=ddp: ddp(x).pow(2).mean())
                errors[setting][name] = None
            except ValueError as err:
                errors[setting][name] = str(err)
    return errors


def refused_step(opt, closure, watched: list) -> tuple[str | None, str | None]:
    """A step's ``ValueError`` message (``None`` where it stepped), and ``"moved"`` where a
    tensor of ``watched`` changed (``None`` where none did)."""
    before = [p.detach().clone() for p in watched]
    try:
        opt.step(closure)
        error = None
    except ValueError as err:
        error = str(err)
    moved = any(not torch.equal(a, p) for a, p in zip(before, watched, strict=True))
    return error, "moved" if moved else None


def partitioned_run(rank: int) -> dict:
    """Each rank an optimizer over its own part of the model, as torch's
    ZeroRedundancyOptimizer builds them: the first step's error, on every rank (the trials
    would move each rank's part alone, and the slope average a part's terms over ranks)."""
    errors: dict[str, str | None] = {}
    for name, cls in {**OPTIMIZERS, "ALSALS": ALSALS}.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = cls(list(model[2 * rank].parameters()))
        x = torch.randn(8, 6)
        errors[name], errors[f"{name}-moved"] = refused_step(
            opt, lambda x=x, ddp=ddp: ddp(x).pow(2).mean(), list(model.parameters())
        )
    return errors


def later_group_run(rank: int) -> dict:
    """A group added after the first step, of another shape on each rank: the next step's
    error on every rank, the new group not moved (the check ran at the first step only)."""
    errors: dict[str, str | None] = {}
    for name, cls in {**OPTIMIZERS, "ALSALS": ALSALS}.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))
        extra = nn.Linear(2 + rank, 1)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = cls(model.parameters())
        x, xe = torch.randn(8, 6), torch.randn(4, 2 + rank)
        opt.step(lambda x=x, ddp=ddp: ddp(x).pow(2).mean())
        opt.add_param_group({"params": list(extra.parameters())})
        errors[name], errors[f"{name}-moved"] = refused_step(
            opt,
            lambda x=x, xe=xe, ddp=ddp, extra=extra: ddp(x).pow(2).mean() + extra(xe).pow(2).mean(),
            list(extra.parameters()),
        )
    return errors


def _written(key: str, value):
    """What rank 0 writes for ``key`` over ``value``: another valid setting."""
    if key == "loss_floor":  # (None <-> a number: the line searches' Polyak sums come or go)
        return 0.0 if value is None else None
    if key == "max_grad_norm":  # (the clip's norm joins the first collective)
        return 1e-3 if value is None else None
    if key == "lr_tensor":  # (a tensor, as a scheduler with a tensor lr writes it)
        return torch.tensor(value * 0.5)
    return value * (2 if key == "weight_decay" else 0.5)


#: Rank 0's writes after two steps: the setting and the groups it writes it in.
WRITTEN_ON_ONE_RANK = {
    "lr": (0, 1),
    "lr_tensor": (0, 1),
    "c": (0, 1),
    "weight_decay": (1,),
    "loss_floor": (0, 1),
    "max_grad_norm": (0, 1),
}


def _refused_after_rank0_changes(rank: int, cls: type, change) -> tuple[str | None, str | None]:
    """Two DDP steps of ``cls`` over two groups (the second with a weight decay), then
    ``change(optimizer)`` on rank 0 alone (valid there: an error raised on one rank alone
    hangs the other in its next collective, as in any torch program), then
    :func:`refused_step` on the third batch, watching every weight."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))
    ddp = nn.parallel.DistributedDataParallel(model)
    groups = [
        {"params": list(model[0].parameters())},
        {"params": list(model[2].parameters()), "weight_decay": 0.1},
    ]
    opt = cls(groups)
    gen = torch.Generator().manual_seed(10 + rank)
    batches = [torch.randn(8, 6, generator=gen) for _ in range(3)]
    for x in batches[:2]:
        opt.step(lambda x=x, ddp=ddp: ddp(x).pow(2).mean())
    if rank == 0:
        change(opt)
    return refused_step(
        opt, lambda x=batches[2], ddp=ddp: ddp(x).pow(2).mean(), list(model.parameters())
    )


def written_on_one_rank_run(rank: int, written: dict = WRITTEN_ON_ONE_RANK) -> dict:
    """After two steps rank 0 alone writes a setting (``lr``, as a scheduler stepped on one
    rank would, also as a tensor; ``c``; the second group's ``weight_decay``;
    ``loss_floor`` and ``max_grad_norm``, which change what the line searches' first
    collective holds): the next step's error on both ranks, nothing moved (each rank went
    its own way: rank 0 searched from the written lr while rank 1 reused its step size, and
    their collectives paired wrongly, a hang; or rank 0's first collective had another size,
    an abort)."""

    def write(opt, key: str, indices: tuple[int, ...]) -> None:
        setting = "lr" if key == "lr_tensor" else key
        for i in indices:
            group = opt.param_groups[i]
            group[setting] = _written(key, group[setting])

    errors: dict[str, dict] = {}
    for key, indices in written.items():
        errors[key] = {}
        for name, cls in {**OPTIMIZERS, "ALSALS": ALSALS}.items():
            errors[key][name], errors[key][f"{name}-moved"] = _refused_after_rank0_changes(
                rank, cls, lambda opt, key=key, indices=indices: write(opt, key, indices)
            )
    return errors


def moved_between_groups_run(rank: int) -> dict:
    """After two steps rank 0 alone moves the first layer's bias into the second group:
    the next step's error on both ranks, nothing moved."""

    def move(opt) -> None:
        opt.param_groups[1]["params"].append(opt.param_groups[0]["params"].pop())

    errors: dict[str, str | None] = {}
    for name, cls in {**OPTIMIZERS, "ALSALS": ALSALS}.items():
        errors[name], errors[f"{name}-moved"] = _refused_after_rank0_changes(rank, cls, move)
    return errors


def tensor_lr_on_every_rank_run(rank: int) -> dict:
    """Every rank writes the same ``lr`` as a 0-dim tensor after two steps: the next step
    is taken on every rank (no false 'different settings'), the weights alike."""
    taken: dict[str, object] = {}
    for name, cls in {**OPTIMIZERS, "ALSALS": ALSALS}.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = cls(model.parameters())
        gen = torch.Generator().manual_seed(10 + rank)
        for step in range(4):
            x = torch.randn(8, 6, generator=gen)
            if step == 2:
                opt.param_groups[0]["lr"] = torch.tensor(opt.param_groups[0]["lr"] * 0.5)
            opt.step(lambda x=x, ddp=ddp: ddp(x).pow(2).mean())
        taken[name] = torch.cat([p.detach().flatten() for p in model.parameters()])
    return taken


def fsdp1_run(rank: int) -> dict:
    """FSDP1's flat shards, of one shape on every rank (padded): refused at the first step."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    errors: dict[str, str | None] = {}
    for name, cls in {**OPTIMIZERS, "ALSALS": ALSALS}.items():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))
        fsdp = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
        params = list(fsdp.parameters())
        opt = cls(params)
        x = torch.randn(8, 6)
        errors[name], errors[f"{name}-moved"] = refused_step(
            opt, lambda x=x, fsdp=fsdp: fsdp(x).pow(2).mean(), params
        )
    return errors


def overflow_run(rank: int) -> list[str]:
    """A float16 tensor whose gradient rank 0 alone writes by hand at the first step, large
    enough that its square overflows Adam's moment: every rank runs the overflow check (the
    risk travels with the step's sums), skips that step alike, and goes on."""
    w = torch.zeros(3, requires_grad=True)
    h = torch.ones(2, dtype=torch.float16)
    opt = ALSALS([w, h], lr=1e-3, eps=1e-4)
    target = torch.tensor([200.0, 0.0, 0.0])
    kinds = []
    for step in range(3):

        def closure(step=step):
            h.grad = (
                torch.tensor([9000.0, 1.0], dtype=torch.float16)
                if rank == 0 and step == 0
                else None
            )
            return ((w - target) ** 2).sum()

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(closure)
        kinds.append(opt.last_step.kind)
    return kinds


def tiny_gradient_run(rank: int) -> list[str]:
    """Rank 0's gradient is so small that float32's squares underflow to 0 (a loss scaled by
    1e-25); rank 1's is exactly 0 at the first step: both ranks decide again in float64
    together (a second collective on every rank), and both step."""
    w = torch.zeros(3, requires_grad=True)
    opt = ALSALS([w])
    target = torch.tensor([1.0, -2.0, 0.5])
    kinds = []
    for step in range(4):

        def closure(step=step):
            if rank == 1 and step == 0:
                return (w * 0.0).sum() + 1e-25  # (a gradient of exactly 0 on this rank)
            return 1e-25 * ((w - target) ** 2).sum()

        opt.step(closure)
        kinds.append(opt.last_step.kind)
    return kinds


def run(rank: int, world: int, init_method: str, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.save(train_all(rank), f"{out_dir}/rank{rank}.pt")
        # The DDP models (and the communication work they still reference) go while the
        # process group is alive: gloo work freed during interpreter shutdown can abort.
        gc.collect()
        dist.barrier()  # no rank tears gloo down while a peer still has a collective in flight
    finally:
        dist.destroy_process_group()


def dtensor_loss_run(rank: int) -> dict:
    """Each optimizer's DDP run with the loss returned as a replicated DTensor (tensor
    parallelism's ``loss_parallel`` returns one) and with the plain loss: decisions and
    weights of both."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    runs = {}
    for name, cls in {**OPTIMIZERS, "ALSALS": ALSALS}.items():
        for as_dtensor in (False, True):
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
            ddp = nn.parallel.DistributedDataParallel(model)
            opt = cls(ddp.parameters(), lr=30.0)
            data_gen = torch.Generator().manual_seed(100 + rank)
            decisions = []
            for _ in range(6):
                x = torch.randn(32, 6, generator=data_gen)
                y = (x.sum(dim=1) > 0).float()

                def closure(x=x, y=y, ddp=ddp, as_dtensor=as_dtensor):
                    loss = nn.functional.binary_cross_entropy_with_logits(ddp(x).squeeze(-1), y)
                    return DTensor.from_local(loss, mesh, [Replicate()]) if as_dtensor else loss

                opt.step(closure)
                info = opt.last_step
                decisions.append((info.kind, info.trials, info.step_size, info.loss))
            weights = torch.cat([p.detach().flatten() for p in model.parameters()])
            runs[name, as_dtensor] = {"decisions": decisions, "weights": weights}
    return runs


def train_all(rank: int) -> dict:
    """Each optimizer on this rank's data under DDP: decisions, weights, losses."""
    results = {
        "guard": guard_run(rank),
        "start_rise": start_rise_run(rank),
        "retry": retry_run(rank),
        "regrowth": regrowth_run(rank),
        "floor": floor_run(rank),
        "undo": undo_run(rank),
        "kink": kink_run(rank),
        "schedule_free": schedule_free_run(rank),
        "mismatch": mismatch_run(rank),
        "partitioned": partitioned_run(rank),
        "later_group": later_group_run(rank),
        "fsdp1": fsdp1_run(rank),
        "written_on_one_rank": written_on_one_rank_run(rank),
        "tensor_lr": tensor_lr_on_every_rank_run(rank),
        "moved_between_groups": moved_between_groups_run(rank),
        "overflow": overflow_run(rank),
        "tiny": tiny_gradient_run(rank),
        "dtensor_loss": dtensor_loss_run(rank),
    }
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
        x = torch.randn(32, 6, generator=data_gen)
        y = (x.sum(dim=1) > 0).float()
        scan = scan_direction(
            opt,
            lambda x=x, y=y, ddp=ddp: nn.functional.binary_cross_entropy_with_logits(
                ddp(x).squeeze(-1), y
            ),
            [1e-9, 1e-3, 1e-1],
        )
        results[name] = {
            "scan": scan.decreases,
            "decisions": decisions,
            "weights": weights,
            "local": local_losses,
            "divergent": divergent_run(rank, cls),
        }
    return results
