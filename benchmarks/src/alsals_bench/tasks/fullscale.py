"""The paper's experiments at full scale, for a GPU and your own copies of the data.

None of these datasets (or BERT's weights) can be downloaded on the benchmark machines, so
these tasks are ``offline = False``: each reads its data location from a budget option
``data_dir`` or an environment variable, and says which when it is missing:

==================  =======================================  ==========================
task                data                                     location
==================  =======================================  ==========================
gpt2-owt            OpenWebText, nanoGPT's train.bin/val.bin ``ALSALS_OWT_DIR``
bert-{mrpc,sst2,    GLUE TSVs (the folder holding MRPC/,     ``ALSALS_GLUE_DIR``; model
qnli,mnli}          SST-2/, QNLI/, MNLI/)                    ``ALSALS_BERT_PATH``
resnet34-cifar10    CIFAR-10 python batches                  ``ALSALS_CIFAR_DIR``
resnet34-cifar100   CIFAR-100 python batches                 ``ALSALS_CIFAR_DIR``
resnet50-imagenet   ImageNet folder: train/ and val/<class>/  ``ALSALS_IMAGENET_DIR``
==================  =======================================  ==========================

Each has a ``"paper"`` budget following Sec. IV-C and a ``"smoke"`` budget (two steps,
tiny sizes) that the tests run on tiny files in the same formats.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from alsals_bench.data.fullscale import (
    ImageFolderDataset,
    load_cifar10,
    load_cifar100,
    load_glue,
    load_openwebtext,
    random_lm_batch,
)
from alsals_bench.models.gpt2 import gpt2_lm
from alsals_bench.models.resnet import resnet34, resnet50
from alsals_bench.tasks._util import (
    crop_flip,
    eval_mode,
    fixed_subset,
    image_classification_run,
    normalize_uint8,
)
from alsals_bench.tasks.austen_gpt2 import lm_loss, lm_metrics
from alsals_bench.tasks.base import Budget, Task, TaskRun, batch_stream
from alsals_bench.tasks.minilm import SequenceClassificationTask


class DataLocationError(FileNotFoundError):
    """A full-scale task was not told where its data (or model) is."""


def data_location(budget: Budget, env: str, what: str) -> Path:
    """The folder from ``budget.options["data_dir"]``, else ``$env``, else a clear error."""
    value = budget.options.get("data_dir") or os.environ.get(env)
    if not value:
        raise DataLocationError(
            f"no data for this task: set {env} to {what} (or pass the budget option data_dir)"
        )
    path = Path(value).expanduser()
    if not path.exists():
        raise DataLocationError(f"{env} / data_dir points to {path}, which does not exist")
    return path


# --------------------------------------------------------------------------- GPT-2


class GPT2OpenWebText(Task):
    name = "gpt2-owt"
    description = (
        "GPT-2 124M from scratch on OpenWebText (nanoGPT's train.bin/val.bin, $ALSALS_OWT_DIR): "
        "the paper's large-scale transformer experiment"
    )
    domain = "nlp"
    adam_lr = 6e-4
    adam_grid = (2e-4, 6e-4, 1.2e-3)
    metrics = ("val_loss", "perplexity")
    offline = False
    budgets = {
        "smoke": Budget(
            steps=2,
            batch_size=2,
            eval_every=2,
            warmup_steps=1,
            options={"size": "tiny", "block_size": 16, "n_positions": 16, "eval_batches": 2},
        ),
        # nanoGPT's config/train_gpt2.py: micro-batches of 12 x 1024 tokens, 600k
        # iterations, 2000 warm-up steps (the paper warms every optimizer up for 2000
        # steps), evaluation every 1000 steps on 200 batches, dropout 0. nanoGPT also
        # accumulates 40 micro-batches per step; a task's loss is one batch, so one step
        # here is one micro-batch.
        "paper": Budget(
            steps=600_000,
            batch_size=12,
            eval_every=1000,
            warmup_steps=2000,
            options={"size": "124M", "block_size": 1024, "eval_batches": 200, "dropout": 0.0},
        ),
    }

    def data_root(self, budget: Budget) -> Path:
        return data_location(
            budget, "ALSALS_OWT_DIR", "the folder with nanoGPT's train.bin and val.bin"
        )

    def check_data(self, budget: Budget) -> None:
        self.data_root(budget)

    def setup(self, seed: int, budget: Budget, device: torch.device) -> TaskRun:
        opts = budget.options
        root = self.data_root(budget)
        tokens = load_openwebtext(root)
        block_size = opts.get("block_size", 1024)
        # A fixed validation sample (the same for every seed and evaluation).
        val_gen = torch.Generator().manual_seed(0)
        val = [
            random_lm_batch(tokens["val"], budget.batch_size, block_size, val_gen)
            for _ in range(opts.get("eval_batches", 200))
        ]
        x_val = torch.cat([x for x, _ in val]).to(device)
        y_val = torch.cat([y for _, y in val]).to(device)

        torch.manual_seed(seed)
        model = gpt2_lm(
            opts.get("size", "124M"),
            n_positions=opts.get("n_positions", 1024),
            dropout=opts.get("dropout", 0.1),
        ).to(device)
        generator = torch.Generator().manual_seed(seed)

        def next_batch():
            x, y = random_lm_batch(tokens["train"], budget.batch_size, block_size, generator)
            return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        def evaluate(model):
            return lm_metrics(model, x_val, y_val, budget.batch_size)

        return TaskRun(model=model, next_batch=next_batch, loss=lm_loss, evaluate=evaluate)


# --------------------------------------------------------------------------- BERT on GLUE

# Official GLUE folder names, and training-set sizes (for the 5-epoch paper budgets).
_GLUE = {
    "mrpc": ("MRPC", 3668, 2),
    "sst2": ("SST-2", 67349, 2),
    "qnli": ("QNLI", 104743, 2),
    "mnli": ("MNLI", 392702, 3),
}


class BertGlue(SequenceClassificationTask):
    """BERT-base fine-tuned on a GLUE task: [CLS] pooling, sequences up to 256, batch 32."""

    offline = False
    adam_grid = (1e-5, 2e-5, 5e-5, 1e-4)

    def __init__(self, glue_task: str) -> None:
        folder, n_train, num_labels = _GLUE[glue_task]
        self.glue_task, self.folder, self.num_labels = glue_task, folder, num_labels
        self.name = f"bert-{glue_task}"
        self.description = (
            f"BERT-base ($ALSALS_BERT_PATH, default bert-base-uncased) fine-tuned on GLUE "
            f"{folder} ($ALSALS_GLUE_DIR/{folder}), accuracy on the dev set"
        )
        epoch = n_train // 32
        self.budgets = {
            "smoke": Budget(steps=2, batch_size=4, eval_every=2, options={"max_length": 32}),
            # Sec. IV-C: batch 32, maximum sequence length 256, five epochs.
            "paper": Budget(
                steps=5 * epoch, batch_size=32, eval_every=epoch, options={"max_length": 256}
            ),
        }

    def model_path(self, budget: Budget) -> str:
        return budget.options.get("model_path") or os.environ.get(
            "ALSALS_BERT_PATH", "bert-base-uncased"
        )

    def check_data(self, budget: Budget) -> None:
        self._glue_root(budget)  # where the data is; the model is checked when a run starts

    def setup(self, seed: int, budget: Budget, device: torch.device) -> TaskRun:
        self._glue_root(budget)  # the data's whereabouts first: that check is local
        path = self.model_path(budget)
        try:  # fail early and clearly when the model is not where we were told
            from transformers import AutoConfig

            AutoConfig.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise DataLocationError(
                f"cannot load BERT from {path!r}: set ALSALS_BERT_PATH (or the budget option "
                f"model_path) to a local copy of bert-base-uncased (a folder with config.json, "
                f"the weights and vocab.txt), or make the Hugging Face hub reachable ({err})"
            ) from err
        return super().setup(seed, budget, device)

    def data_key(self, budget: Budget) -> tuple:
        return (self.glue_task, *self._glue_root(budget))

    def _glue_root(self, budget: Budget) -> tuple[Path | None, str]:
        """The task folder and source (``"tsv"``, or ``"hf"`` with the budget option
        ``glue_source="hf"``: Hugging Face ``datasets``)."""
        if budget.options.get("glue_source") == "hf":
            root, source = None, "hf"
        else:
            base = data_location(
                budget,
                "ALSALS_GLUE_DIR",
                f"the GLUE folder holding {self.folder}/ (train.tsv, dev files)",
            )
            root, source = base, "tsv"
            for candidate in (base / self.folder, base / self.glue_task):
                if candidate.is_dir():
                    root = candidate
                    break
        return root, source

    def load_data(self, budget: Budget) -> dict[str, Any]:
        root, source = self._glue_root(budget)
        train = load_glue(self.glue_task, root, "train", source=source)
        dev = load_glue(self.glue_task, root, "dev", source=source)
        return {
            "train_a": train["text_a"],
            "train_b": train["text_b"],
            "train_labels": train["labels"],
            "test_a": dev["text_a"],
            "test_b": dev["text_b"],
            "test_labels": dev["labels"],
        }


# --------------------------------------------------------------------------- CIFAR

CIFAR_STATS = {
    10: ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    100: ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


class ResNetCifar(Task):
    """ResNet-34 (3x3 stem, no max-pool) on CIFAR-10/100 with the ResNet paper's augmentation."""

    domain = "image"
    adam_lr = 1e-3
    adam_grid = (3e-4, 1e-3, 3e-3)
    metrics = ("accuracy", "val_loss")
    offline = False

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.name = f"resnet34-cifar{num_classes}"
        self.description = (
            f"ResNet-34 on CIFAR-{num_classes} (python batches in $ALSALS_CIFAR_DIR), "
            "batch 128, pad-crop-flip augmentation"
        )
        self.budgets = {
            # The ImageNet stem shrinks 32x32 inputs to 8x8 at once: a cheap ResNet-34.
            "smoke": Budget(
                steps=2,
                batch_size=4,
                eval_every=2,
                options={"eval_size": 4, "stem": "imagenet"},
            ),
            # Sec. IV-C: batch 128, 100 epochs (50000 // 128 = 390 steps each).
            "paper": Budget(steps=39_000, batch_size=128, eval_every=390),
        }

    def data_root(self, budget: Budget) -> Path:
        return data_location(
            budget,
            "ALSALS_CIFAR_DIR",
            "the folder holding cifar-10-batches-py/ and/or cifar-100-python/",
        )

    def check_data(self, budget: Budget) -> None:
        self.data_root(budget)

    def setup(self, seed: int, budget: Budget, device: torch.device) -> TaskRun:
        opts = budget.options
        root = self.data_root(budget)
        data = load_cifar10(root) if self.num_classes == 10 else load_cifar100(root)
        mean, std = CIFAR_STATS[self.num_classes]
        x_train, y_train = data["x_train"].to(device), data["y_train"].to(device)
        x_test, y_test = data["x_test"], data["y_test"]
        keep = fixed_subset(len(y_test), opts.get("eval_size"))
        if keep is not None:
            x_test, y_test = x_test[keep], y_test[keep]
        x_test, y_test = normalize_uint8(x_test.to(device), mean, std), y_test.to(device)

        torch.manual_seed(seed)
        model = resnet34(self.num_classes, stem=opts.get("stem", "cifar")).to(device)
        return image_classification_run(
            model,
            (x_train, y_train, x_test, y_test),
            (mean, std),
            budget.batch_size,
            seed,
            4 if opts.get("augment", True) else None,
            500,
            device,
        )


# --------------------------------------------------------------------------- ImageNet


class _Batches:
    """An endless ``batch_sampler`` for a DataLoader: the index batches of ``batch_stream``."""

    def __init__(self, next_indices) -> None:
        self.next_indices = next_indices

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_indices().tolist()


class ResNet50ImageNet(Task):
    name = "resnet50-imagenet"
    description = (
        "ResNet-50 on ImageNet at 224x224 (image folder $ALSALS_IMAGENET_DIR with train/ and "
        "val/<class>/), batch 128"
    )
    domain = "image"
    adam_lr = 1e-3
    adam_grid = (3e-4, 1e-3, 3e-3)
    metrics = ("accuracy", "val_loss")
    offline = False
    budgets = {
        "smoke": Budget(
            steps=2,
            batch_size=2,
            eval_every=2,
            options={"image_size": 32, "num_workers": 0, "eval_size": 2},
        ),
        # Sec. IV-C: batch 128, 5 epochs (1281167 // 128 = 10009 steps each), 224x224.
        "paper": Budget(steps=50_045, batch_size=128, eval_every=10_009),
    }

    def data_root(self, budget: Budget) -> Path:
        return data_location(
            budget, "ALSALS_IMAGENET_DIR", "the ImageNet folder with train/ and val/<class>/"
        )

    def check_data(self, budget: Budget) -> None:
        self.data_root(budget)

    def setup(self, seed: int, budget: Budget, device: torch.device) -> TaskRun:
        from torch.utils.data import DataLoader, Subset

        opts = budget.options
        root = self.data_root(budget)
        size = opts.get("image_size", 224)
        train = ImageFolderDataset(root, "train", size=size)
        val = ImageFolderDataset(root, "val", size=size, classes=train.classes)
        keep = fixed_subset(len(val), opts.get("eval_size"))
        val_set = val if keep is None else Subset(val, keep.tolist())
        workers = opts.get("num_workers", min(8, os.cpu_count() or 1))
        pin = device.type == "cuda"

        torch.manual_seed(seed)
        model = resnet50(len(train.classes)).to(device)
        indices = batch_stream(len(train), budget.batch_size, seed)
        flips = torch.Generator().manual_seed(seed + 1)
        loader = DataLoader(
            train, batch_sampler=_Batches(indices), num_workers=workers, pin_memory=pin
        )
        stream: dict[str, Iterator] = {}

        def next_batch():
            if "it" not in stream:  # workers start on the first batch, not in setup
                stream["it"] = iter(loader)
            x, y = next(stream["it"])
            x = crop_flip(x.to(device, non_blocking=True), flips, pad=0)
            return x, y.to(device, non_blocking=True)

        def loss(model, batch):
            x, y = batch
            return nn.functional.cross_entropy(model(x), y)

        @torch.no_grad()
        def evaluate(model):
            eval_loader = DataLoader(
                val_set,
                batch_size=opts.get("eval_batch_size", 256),
                num_workers=workers,
                pin_memory=pin,
            )
            correct, total, n = 0, 0.0, 0
            with eval_mode(model):
                for x, y in eval_loader:
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    logits = model(x).float()
                    total += nn.functional.cross_entropy(logits, y, reduction="sum").item()
                    correct += (logits.argmax(-1) == y).sum().item()
                    n += len(y)
            return {"accuracy": correct / n, "val_loss": total / n}

        return TaskRun(model=model, next_batch=next_batch, loss=loss, evaluate=evaluate)


FULLSCALE_TASKS: tuple[Task, ...] = (
    GPT2OpenWebText(),
    *(BertGlue(name) for name in _GLUE),
    ResNetCifar(10),
    ResNetCifar(100),
    ResNet50ImageNet(),
)

__all__ = [
    "FULLSCALE_TASKS",
    "BertGlue",
    "DataLocationError",
    "GPT2OpenWebText",
    "ResNet50ImageNet",
    "ResNetCifar",
    "data_location",
]
