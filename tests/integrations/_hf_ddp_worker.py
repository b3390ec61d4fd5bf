"""Worker for test_hf_trainer: LineSearchTrainer under torchrun (2 processes, gloo, CPU).

    python -m torch.distributed.run --nproc_per_node 2 _hf_ddp_worker.py OUT_DIR

A small random BERT (no checkpoint needed); saves each rank's final weights, decisions and
the first micro-batch it trained on.
"""

from __future__ import annotations

import gc
import os
import sys

import torch
import torch.distributed as dist
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from alsals import MomentumALSALS
from alsals.integrations.hf import LineSearchTrainer


class Record(TrainerCallback):
    def __init__(self) -> None:
        self.trainer = None
        self.decisions: list[tuple] = []

    def on_step_end(self, args, state, control, **kwargs):
        info = self.trainer.optimizer.optimizer.last_step
        self.decisions.append((info.kind, info.trials, info.step_size, info.loss))


def main(out: str) -> None:
    set_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=2,
    )  # fmt: skip
    model = BertForSequenceClassification(config)
    initial = torch.cat([p.detach().flatten() for p in model.parameters()])
    gen = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, 100, (8,), generator=gen), "labels": torch.tensor(i % 2)}
        for i in range(64)
    ]
    record = Record()
    args = TrainingArguments(
        output_dir=out,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=6,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        ddp_backend="gloo",
        seed=0,
    )
    trainer = LineSearchTrainer(
        model=model,
        args=args,
        train_dataset=data,
        optimizer_cls_and_kwargs=(MomentumALSALS, {"lr": 0.1, "slope": "analytic"}),
        callbacks=[record],
    )
    record.trainer = trainer
    first = next(iter(trainer.get_train_dataloader()))["input_ids"]
    trainer.train()
    torch.save(
        {
            "wrapped": type(trainer.model_wrapped).__name__,
            "initial": initial,
            "weights": torch.cat([p.detach().flatten() for p in trainer.model.parameters()]),
            "decisions": record.decisions,
            "first_batch": first,
        },
        os.path.join(out, f"rank{os.environ['RANK']}.pt"),
    )
    # The DDP model (and the communication work it still references) goes while the process
    # group is alive: gloo work freed during interpreter shutdown can abort the process
    # (SIGABRT after training had finished, about 1 run in 5), as in _distributed_worker.
    del trainer
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
