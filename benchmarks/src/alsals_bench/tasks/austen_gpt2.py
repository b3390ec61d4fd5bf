"""A GPT-2 language model trained from scratch on Jane Austen: stand-in for GPT-2/OpenWebText.

The six novels are tokenized with the real GPT-2 BPE (``gpt2_tokenizer()``); only the
~15.3k token ids that occur are kept and renumbered densely, so the embedding (and the
output layer tied to it) is a third of GPT-2's while the tokenization stays GPT-2's. The
last 5% of each book is held out for validation; the training parts are joined with
``<|endoftext|>`` between books. Training batches are random windows (nanoGPT's sampling)
drawn from a generator seeded by the run's seed; validation uses a fixed set of
non-overlapping windows of the held-out text and reports the mean token loss and its
perplexity.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from alsals_bench.data.fullscale import random_lm_batch
from alsals_bench.data.offline import gpt2_tokenizer, load_austen_texts
from alsals_bench.models.gpt2 import GPT2_EOT, gpt2_lm
from alsals_bench.tasks._util import eval_mode
from alsals_bench.tasks.base import Budget, Task, TaskRun, long_budget

VAL_FRACTION = 0.05
_CORPUS: dict[str, Any] = {}  # tokenized once per process: it takes a few seconds


def austen_corpus() -> dict[str, Any]:
    """The tokenized, remapped corpus: ``train`` (1-D int64), ``val`` (one tensor per book),
    ``vocab`` (the GPT-2 ids kept, sorted; new id = position) and ``eot`` (its new id)."""
    if not _CORPUS:
        tokenizer = gpt2_tokenizer()
        books = [torch.tensor(tokenizer.encode(text).ids) for text in load_austen_texts()]
        vocab = torch.unique(torch.cat([*books, torch.tensor([GPT2_EOT])]))
        remap = torch.full((int(vocab.max()) + 1,), -1, dtype=torch.int64)
        remap[vocab] = torch.arange(len(vocab))
        eot = remap[GPT2_EOT].view(1)
        train_parts, val_parts = [], []
        for book in books:
            cut = len(book) - math.ceil(VAL_FRACTION * len(book))
            train_parts += [remap[book[:cut]], eot]
            val_parts.append(remap[book[cut:]])
        _CORPUS.update(train=torch.cat(train_parts[:-1]), val=val_parts, vocab=vocab, eot=int(eot))
    return _CORPUS


def lm_windows(parts: list[Tensor], block_size: int, limit: int | None) -> tuple[Tensor, Tensor]:
    """Non-overlapping (input, target) windows of ``block_size`` from each part, at most
    ``limit`` in all, spread evenly over the parts' windows (the same every call)."""
    windows = [
        part[i : i + block_size + 1]
        for part in parts
        for i in range(0, len(part) - block_size, block_size)
    ]
    if limit is not None and limit < len(windows):
        step = len(windows) / limit
        windows = [windows[int(k * step)] for k in range(limit)]
    stacked = torch.stack(windows)
    return stacked[:, :-1].contiguous(), stacked[:, 1:].contiguous()


def lm_loss(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Mean next-token cross-entropy of a causal LM on (inputs, targets)."""
    x, y = batch
    logits = model(input_ids=x).logits
    return nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


@torch.no_grad()
def lm_metrics(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> dict[str, float]:
    """Mean token loss over fixed windows (eval mode), and its perplexity."""
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(x), batch_size):
            xb, yb = x[start : start + batch_size], y[start : start + batch_size]
            logits = model(input_ids=xb).logits.float()
            total += nn.functional.cross_entropy(
                logits.flatten(0, 1), yb.flatten(), reduction="sum"
            ).item()
            count += yb.numel()
    val_loss = total / count
    return {"val_loss": val_loss, "perplexity": math.exp(min(val_loss, 50.0))}


# Sized so that one MomentumALSALS run takes about two minutes on 2 CPU cores.
QUICK = Budget(
    steps=160,
    batch_size=16,
    eval_every=40,
    warmup_steps=16,
    options={"size": "mini", "block_size": 64, "eval_windows": 64},
)


class AustenGPT2(Task):
    name = "austen-gpt2"
    description = (
        "GPT-2-architecture LM from scratch on Jane Austen's 6 novels (~0.99M GPT-2 BPE tokens, "
        "vocabulary remapped to the 15.3k ids used; last 5% of each book held out): "
        "stand-in for GPT-2 on OpenWebText"
    )
    domain = "nlp"
    adam_lr = 6e-4
    adam_grid = (2e-4, 6e-4, 2e-3, 6e-3, 2e-2)
    metrics = ("val_loss", "perplexity")
    requires = ("austen", "gpt2-bpe")
    budgets = {
        "smoke": Budget(
            steps=4,
            batch_size=2,
            eval_every=2,
            warmup_steps=1,
            options={"size": "tiny", "block_size": 16, "eval_windows": 4},
        ),
        "quick": QUICK,
        "long": long_budget(QUICK),
        # A bigger model and context for GPU runs: 6 layers, width 384, context 256,
        # 10k steps of 32 windows (about 80 passes over the training text).
        "paper": Budget(
            steps=10000,
            batch_size=32,
            eval_every=500,
            warmup_steps=1000,
            options={"size": "small", "block_size": 256, "eval_windows": None},
        ),
    }

    def setup(self, seed: int, budget: Budget, device: torch.device) -> TaskRun:
        opts = budget.options
        block_size = opts.get("block_size", 128)
        corpus = austen_corpus()
        train = corpus["train"]
        x_val, y_val = lm_windows(corpus["val"], block_size, opts.get("eval_windows"))
        x_val, y_val = x_val.to(device), y_val.to(device)

        torch.manual_seed(seed)
        model = gpt2_lm(
            opts.get("size", "mini"),
            vocab_size=len(corpus["vocab"]),
            n_positions=block_size,
            dropout=opts.get("dropout", 0.1),
        ).to(device)
        model.config.bos_token_id = model.config.eos_token_id = corpus["eot"]
        generator = torch.Generator().manual_seed(seed)

        def next_batch():
            x, y = random_lm_batch(train, budget.batch_size, block_size, generator)
            return x.to(device), y.to(device)

        def evaluate(model):
            return lm_metrics(model, x_val, y_val, max(budget.batch_size, 16))

        return TaskRun(model=model, next_batch=next_batch, loss=lm_loss, evaluate=evaluate)
