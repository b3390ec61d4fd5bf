"""From AdamW to ALSALS: one training loop written both ways (docs/migration.md).

    python examples/migrate_from_adamw.py --steps 200
    python examples/migrate_from_adamw.py --steps 40 --resume-check --out /tmp/ckpt

A small character-level model learns text drawn from a fixed random Markov chain (made
here, nothing downloaded). ``train_adamw`` is a plain PyTorch loop as found in real
training scripts (nanoGPT's ``train.py``): two weight-decay groups, gradient accumulation
over micro-batches, gradient clipping, fp16 autocast with ``torch.amp.GradScaler``, a
warm-up + cosine learning-rate schedule and checkpoints that resume exactly.
``train_alsals`` is the same loop after the switch: the schedule is gone, the forward and
backward passes move into a closure, clipping moves into the optimizer (``max_grad_norm``),
and ``step_with_scaler`` replaces ``scaler.step(optimizer); scaler.update()``.
"""

from __future__ import annotations

import argparse
import bisect
import math
import os
import tempfile
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from alsals import ALSALS
from alsals.integrations.amp import step_with_scaler

# ----------------------------------------------------------------------- the shared parts


@dataclass
class Config:
    steps: int = 200
    batch_size: int = 64  # sequences per optimizer step ...
    micro_batches: int = 4  # ... split into this many forward/backward passes
    lr: float = 1e-2  # AdamW: peak of the schedule; ALSALS: the first search's start
    warmup: int = 20  # AdamW's schedule only
    min_lr: float = 1e-3  # AdamW's schedule only
    weight_decay: float = 0.1
    max_grad_norm: float = 1.0
    dropout: float = 0.1
    amp: bool = True  # fp16 autocast + GradScaler
    dtype: torch.dtype = torch.float32  # of the weights (float64 for exact comparisons)
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    seed: int = 0
    checkpoint: str | None = None  # e.g. "out/ckpt_{step}.pt", written ...
    checkpoint_every: int = 0  # ... every this many steps
    resume: str | None = None  # start from this checkpoint


@dataclass
class Run:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    losses: list[float] = field(default_factory=list)
    log: list = field(default_factory=list)  # AdamW: (lr, grad norm); ALSALS: StepInfo


VOCAB, BLOCK = 16, 8  # characters, context length


def make_text(n: int = 20_000, seed: int = 1234) -> torch.Tensor:
    """A character sequence from a fixed random order-2 Markov chain."""
    gen = torch.Generator().manual_seed(seed)
    probs = (torch.randn(VOCAB, VOCAB, VOCAB, generator=gen) * 3).softmax(-1)
    cumulative = probs.cumsum(-1).tolist()  # [previous][last] -> cumulative probabilities
    text = [0, 1]
    for u in torch.rand(n - 2, generator=gen).tolist():
        row = cumulative[text[-2]][text[-1]]
        text.append(min(bisect.bisect(row, u), VOCAB - 1))
    return torch.tensor(text)


TEXT = make_text()


def get_batch(size: int, data_rng: torch.Generator, device: str):
    """``size`` random windows of the text: inputs (size, BLOCK) and next characters."""
    start = torch.randint(len(TEXT) - BLOCK, (size,), generator=data_rng)
    x = torch.stack([TEXT[i : i + BLOCK] for i in start.tolist()])
    return x.to(device), TEXT[start + BLOCK].to(device)


def make_model(cfg: Config) -> nn.Module:
    torch.manual_seed(cfg.seed)
    return nn.Sequential(
        nn.Embedding(VOCAB, 16),
        nn.Flatten(),
        nn.Linear(BLOCK * 16, 128),
        nn.LayerNorm(128),
        nn.GELU(),
        nn.Dropout(cfg.dropout),
        nn.Linear(128, VOCAB),
    ).to(cfg.device, cfg.dtype)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """nanoGPT's rule: matrices and embeddings decay, biases and norms do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def save_checkpoint(path, step, model, optimizer, scaler, data_rng) -> None:
    """Everything an exact resume needs (the same for both optimizers)."""
    torch.save(
        {
            "step": step,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),  # ALSALS: z, Adam's v + the search state
            "scaler": scaler.state_dict(),  # the loss scale and its growth counter
            "torch_rng": torch.get_rng_state(),  # dropout masks
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "data_rng": data_rng.get_state(),  # the data position
        },
        path,
    )


def load_checkpoint(path, model, optimizer, scaler, data_rng) -> int:
    ckpt = torch.load(path, weights_only=True)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    torch.set_rng_state(ckpt["torch_rng"])
    if ckpt["cuda_rng"]:
        torch.cuda.set_rng_state_all(ckpt["cuda_rng"])
    data_rng.set_state(ckpt["data_rng"])
    return ckpt["step"]


# ------------------------------------------------------------------------------ AdamW


def lr_at(step: int, cfg: Config) -> float:
    """Linear warm-up, then cosine decay to min_lr."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def train_adamw(cfg: Config) -> Run:
    model = make_model(cfg)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    scaler = torch.amp.GradScaler(cfg.device, enabled=cfg.amp)
    data_rng = torch.Generator().manual_seed(cfg.seed + 1)
    step = 0
    if cfg.resume:
        step = load_checkpoint(cfg.resume, model, optimizer, scaler, data_rng)
    run = Run(model, optimizer)
    model.train()
    while step < cfg.steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = get_batch(cfg.batch_size, data_rng, cfg.device)
        micro = list(zip(x.chunk(cfg.micro_batches), y.chunk(cfg.micro_batches), strict=True))
        total = 0.0
        for xb, yb in micro:
            with torch.autocast(cfg.device, dtype=torch.float16, enabled=cfg.amp):
                loss = nn.functional.cross_entropy(model(xb), yb) / cfg.micro_batches
            scaler.scale(loss).backward()
            total = total + loss.detach()
        scaler.unscale_(optimizer)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        run.losses.append(total.item())
        run.log.append((lr, grad_norm.item()))
        if cfg.checkpoint and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            path = cfg.checkpoint.format(step=step)
            save_checkpoint(path, step, model, optimizer, scaler, data_rng)
    return run


# ----------------------------------------------------------------------------- ALSALS


def train_alsals(cfg: Config) -> Run:
    model = make_model(cfg)
    optimizer = ALSALS(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,  # where the first search starts; the search picks every step size
        max_grad_norm=cfg.max_grad_norm,  # clips after accumulation and unscaling
        buffers=model.buffers(),  # BatchNorm statistics stay out of trials (none here)
    )
    scaler = torch.amp.GradScaler(cfg.device, enabled=cfg.amp)
    data_rng = torch.Generator().manual_seed(cfg.seed + 1)
    step = 0
    if cfg.resume:
        step = load_checkpoint(cfg.resume, model, optimizer, scaler, data_rng)
    run = Run(model, optimizer)
    model.train()
    while step < cfg.steps:
        x, y = get_batch(cfg.batch_size, data_rng, cfg.device)
        micro = list(zip(x.chunk(cfg.micro_batches), y.chunk(cfg.micro_batches), strict=True))

        def closure(backward: bool, micro=micro) -> torch.Tensor:
            # Called once with backward=True, then with False for each trial of the search.
            if backward:
                optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for xb, yb in micro:
                with torch.autocast(cfg.device, dtype=torch.float16, enabled=cfg.amp):
                    loss = nn.functional.cross_entropy(model(xb), yb) / cfg.micro_batches
                if backward:
                    scaler.scale(loss).backward()
                total = total + loss.detach()
            return total

        loss = step_with_scaler(optimizer, closure, scaler)  # unscale, clip, search, update
        step += 1
        run.losses.append(loss.item())
        run.log.append(optimizer.last_step)
        if cfg.checkpoint and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            path = cfg.checkpoint.format(step=step)
            save_checkpoint(path, step, model, optimizer, scaler, data_rng)
    return run


# ------------------------------------------------------------------------------- main


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    return all(torch.equal(p, q) for p, q in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--resume-check", action="store_true", help="stop halfway, resume")
    parser.add_argument("--out", default=None, help="folder for the checkpoints")
    args = parser.parse_args()
    if args.steps < (2 if args.resume_check else 1):
        parser.error("--steps must be at least 1 (2 with --resume-check: it stops halfway)")
    cfg = Config(steps=args.steps)

    runs = {"adamw": train_adamw(cfg), "alsals": train_alsals(cfg)}
    print(f"{'step':>5} {'AdamW loss':>10} {'lr':>8}   {'ALSALS loss':>11} {'step size':>9} trials")
    for i in range(0, cfg.steps, max(1, cfg.steps // 20)):
        (lr, _), info = runs["adamw"].log[i], runs["alsals"].log[i]
        print(
            f"{i + 1:5d} {runs['adamw'].losses[i]:10.4f} {lr:8.2e}   "
            f"{runs['alsals'].losses[i]:11.4f} {info.step_size:9.2e} {info.trials:6d}"
        )
    if args.resume_check:
        if args.out is None:
            with tempfile.TemporaryDirectory() as out:
                resume_check(cfg, out)
        else:
            os.makedirs(args.out, exist_ok=True)
            resume_check(cfg, args.out)


def resume_check(cfg: Config, out: str) -> None:
    """Train each optimizer straight through, checkpointing halfway, then resume from the
    checkpoint: the resumed run must end with the same weights, bit for bit."""
    half = cfg.steps // 2
    for name, train in (("adamw", train_adamw), ("alsals", train_alsals)):
        path = os.path.join(out, name + "_{step}.pt")
        full = train(replace(cfg, checkpoint=path, checkpoint_every=half))
        resumed = train(replace(cfg, resume=path.format(step=half)))
        identical = same_weights(resumed.model, full.model)
        print(f"{name}: resumed from step {half}, bit-identical to the full run: {identical}")


if __name__ == "__main__":
    main()
