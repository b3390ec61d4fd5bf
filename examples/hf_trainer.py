"""Fine-tune a pretrained BERT-style model with ALSALS through the Hugging Face Trainer.

    python -m alsals_bench.data.fetch --only minilm     # once: the offline MiniLM checkpoint
    HF_HUB_OFFLINE=1 python examples/hf_trainer.py [--model PATH] [--out DIR]

``LineSearchTrainer`` is a ``transformers.Trainer``: same arguments, same loop, same
checkpoints. What changes: the optimizer is a line search (here ALSALS), its step runs
trial evaluations of the gradient-accumulation window, and the logged ``learning_rate``
is the step size it picked (``learning_rate``/``lr_scheduler_type``/``warmup_*`` of
``TrainingArguments`` do not apply). The run checkpoints at step 4 and resumes from it,
ending on the same weights as without the interruption.
"""

from __future__ import annotations

import argparse
import os
import random

import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    TrainingArguments,
    set_seed,
)

from alsals import ALSALS
from alsals.integrations.hf import LineSearchTrainer

GOOD = ["wonderful", "delightful", "clever", "moving", "excellent", "charming", "gripping"]
BAD = ["boring", "awful", "silly", "dull", "tedious", "clumsy", "forgettable"]
TEMPLATES = ["a {} film", "the plot was {}", "{} acting throughout", "an utterly {} evening"]


def toy_sentiment(tokenizer, n: int = 96, seed: int = 0) -> list[dict]:
    """Template sentences labelled by the adjective they use (1 = positive)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        text = rng.choice(TEMPLATES).format(rng.choice(GOOD if label else BAD))
        enc = tokenizer(text, padding="max_length", truncation=True, max_length=16)
        rows.append({k: torch.tensor(v) for k, v in enc.items()} | {"labels": torch.tensor(label)})
    return rows


def default_model_path() -> str:
    from alsals_bench.data.offline import minilm_path

    return str(minilm_path())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="a local checkpoint (default: MiniLM)")
    parser.add_argument("--out", default="runs/hf_trainer")
    args = parser.parse_args()
    path = args.model or default_model_path()

    tokenizer = AutoTokenizer.from_pretrained(path)
    train = toy_sentiment(tokenizer)

    def trainer(max_steps: int) -> LineSearchTrainer:
        set_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        # BERT's forward takes **kwargs but its loss ignores num_items_in_batch, so the
        # Trainer would sum the 2 micro-batch means instead of averaging them; this asks
        # for the mean (the line search follows whichever objective the Trainer uses).
        model.accepts_loss_kwargs = False
        training_args = TrainingArguments(
            output_dir=args.out,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,  # the line search tests the 16-example window
            max_steps=max_steps,
            logging_steps=1,
            save_strategy="steps",
            save_steps=4,
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            seed=0,
        )
        return LineSearchTrainer(
            model=model,
            args=training_args,
            train_dataset=train,
            # a pretrained model wants a small first step: the search grows it if it can
            optimizer_cls_and_kwargs=(ALSALS, {"lr": 1e-3}),
        )

    straight = trainer(max_steps=8)
    straight.train()
    for entry in straight.state.log_history:
        if "loss" in entry:
            print(
                f"step {entry['step']}: loss {entry['loss']:.4f}  "
                f"step size {entry['learning_rate']:.2e}"
            )

    resumed = trainer(max_steps=8)
    resumed.train(resume_from_checkpoint=os.path.join(args.out, "checkpoint-4"))
    same = all(
        torch.equal(a, b)
        for a, b in zip(straight.model.parameters(), resumed.model.parameters(), strict=True)
    )
    print(f"resumed from step 4 to the same weights as the uninterrupted run: {same}")


if __name__ == "__main__":
    main()
