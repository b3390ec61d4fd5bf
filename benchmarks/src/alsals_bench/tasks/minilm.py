"""Fine-tuning a pretrained BERT-architecture encoder for text classification.

``SequenceClassificationTask`` is the machinery shared by the offline MiniLM tasks here
(stand-ins for BERT on GLUE) and the full-scale BERT/GLUE tasks in ``fullscale.py``: it
loads ``AutoModelForSequenceClassification`` with a fresh ``K``-way head on BERT's pooled
[CLS] token (as the paper does), tokenizes the texts once per process (cached in memory),
and trims every batch to its longest sequence (dynamic padding: padding is masked, so the
outputs are those of padding to the maximum length up to rounding, for much less compute
on short texts).

The offline tasks fine-tune the pretrained all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT,
22.7M parameters) from ``minilm_path()``:

- ``minilm-finefood``: Amazon fine-food reviews, "great" vs "other" (stand-in for SST-2);
- ``minilm-bbc``: BBC News articles, 5 topics (a multi-class GLUE-size label set);
- ``minilm-tweets``: crowd-labelled tweets, negative / neutral / positive.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from alsals_bench.data.offline import load_bbc_news, load_fine_food, load_tweets, minilm_path
from alsals_bench.tasks._util import eval_mode, fixed_subset
from alsals_bench.tasks.base import (
    Budget,
    Task,
    TaskRun,
    batch_stream,
    classification_metrics,
    long_budget,
)

_ENCODED: dict[tuple, tuple] = {}  # (model, data, max_length) -> encoded splits and labels
_TOKENIZERS: dict[str, Any] = {}


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report (it lists the new head's weights) and its
    progress bar for a moment."""
    from transformers.utils import logging

    level, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()


def load_tokenizer(model_path: str, local_files_only: bool = False):
    """``AutoTokenizer`` for ``model_path``, loaded once per process."""
    if model_path not in _TOKENIZERS:
        from transformers import AutoTokenizer

        _TOKENIZERS[model_path] = AutoTokenizer.from_pretrained(
            model_path, local_files_only=local_files_only
        )
    return _TOKENIZERS[model_path]


def encode_texts(
    tokenizer, text_a: list[str], text_b: list[str] | None, max_length: int
) -> dict[str, Tensor]:
    """Token ids, attention mask and segment ids padded to ``max_length`` (pairs for
    ``text_b``; the longer text is truncated first). Stored compactly: int32 ids, int8 rest."""
    enc = tokenizer(
        text_a,
        text_b,
        truncation=True,
        max_length=max_length,
        padding="max_length",
        return_tensors="pt",
        return_token_type_ids=True,
    )
    return {
        "input_ids": enc["input_ids"].to(torch.int32),
        "attention_mask": enc["attention_mask"].to(torch.int8),
        "token_type_ids": enc["token_type_ids"].to(torch.int8),
    }


def take(encoded: dict[str, Tensor], index: Tensor | slice) -> dict[str, Tensor]:
    """Rows ``index`` of an encoding, trimmed to their longest sequence, as int64 model inputs."""
    rows = {key: value[index] for key, value in encoded.items()}
    length = max(int(rows["attention_mask"].sum(dim=1).max()), 1)
    return {key: value[:, :length].long() for key, value in rows.items()}


def sort_by_length(encoded: dict[str, Tensor], labels: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """Order an evaluation set by length so that its batches need little padding."""
    order = torch.argsort(encoded["attention_mask"].sum(dim=1), stable=True)
    return {key: value[order] for key, value in encoded.items()}, labels[order]


class SequenceClassificationTask(Task):
    """Fine-tune ``AutoModelForSequenceClassification`` on (text[, text pair], label) data.

    Subclasses set ``num_labels`` and implement ``load_data`` and ``model_path``. Budget
    options: ``max_length`` (tokens, default 128), ``eval_size`` (a fixed subset of the
    test set, default all), ``eval_batch_size`` (default 128).
    """

    domain = "nlp"
    adam_lr = 2e-5
    adam_grid = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3)  # small model, few steps: wide
    metrics = ("accuracy", "val_loss")
    num_labels: int

    local_files_only = False  # True: never ask the Hugging Face hub (offline stand-ins)

    def load_data(self, budget: Budget) -> dict[str, Any]:
        """``train_a``, ``train_b`` (or None), ``train_labels``, ``test_a``, ``test_b``,
        ``test_labels``."""
        raise NotImplementedError

    def data_key(self, budget: Budget) -> tuple:
        """What identifies the data ``load_data`` returns (for the tokenization cache)."""
        return (self.name,)

    def model_path(self, budget: Budget) -> str:
        raise NotImplementedError

    def load_model(self, path: str) -> nn.Module:
        from transformers import AutoModelForSequenceClassification

        with _quiet_transformers():
            return AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=self.num_labels, local_files_only=self.local_files_only
            )

    def encoded(
        self, budget: Budget
    ) -> tuple[dict[str, Tensor], Tensor, dict[str, Tensor], Tensor]:
        """Tokenized train and test sets with their labels, cached per process."""
        path, max_length = self.model_path(budget), budget.options.get("max_length", 128)
        key = (path, self.data_key(budget), max_length)
        if key not in _ENCODED:
            data = self.load_data(budget)
            tokenizer = load_tokenizer(path, self.local_files_only)
            _ENCODED[key] = tuple(
                item
                for split in ("train", "test")
                for item in (
                    encode_texts(tokenizer, data[f"{split}_a"], data[f"{split}_b"], max_length),
                    data[f"{split}_labels"],
                )
            )
        return _ENCODED[key]

    def setup(self, seed: int, budget: Budget, device: torch.device) -> TaskRun:
        opts = budget.options
        train, y_train, test, y_test = self.encoded(budget)
        keep = fixed_subset(len(y_test), opts.get("eval_size"))
        if keep is not None:
            test, y_test = {k: v[keep] for k, v in test.items()}, y_test[keep]
        test, y_test = sort_by_length(test, y_test)
        train = {k: v.to(device) for k, v in train.items()}
        test = {k: v.to(device) for k, v in test.items()}
        y_train, y_test = y_train.to(device), y_test.to(device)
        path = self.model_path(budget)

        torch.manual_seed(seed)
        model = self.load_model(path).to(device)
        indices = batch_stream(len(y_train), budget.batch_size, seed)

        def next_batch():
            idx = indices().to(device)
            return take(train, idx), y_train[idx]

        def loss(model, batch):
            inputs, labels = batch
            return nn.functional.cross_entropy(model(**inputs).logits.float(), labels)

        forward: Callable = lambda m, inputs, s: m(**take(inputs, s)).logits  # noqa: E731

        def evaluate(model):
            with eval_mode(model):
                return classification_metrics(
                    model, test, y_test, opts.get("eval_batch_size", 128), forward
                )

        return TaskRun(model=model, next_batch=next_batch, loss=loss, evaluate=evaluate)


class MiniLMTask(SequenceClassificationTask):
    """Shared budgets and model of the offline MiniLM tasks; subclasses name the dataset."""

    requires = ("minilm",)
    local_files_only = True  # the fetched folder; the hub is never asked (HF_HUB_OFFLINE)
    loader: Callable[[], dict[str, Any]]

    def model_path(self, budget: Budget) -> str:
        return str(minilm_path())

    def load_data(self, budget: Budget) -> dict[str, Any]:
        data = type(self).loader()
        return {
            "train_a": data["train_texts"],
            "train_b": None,
            "train_labels": data["train_labels"],
            "test_a": data["test_texts"],
            "test_b": None,
            "test_labels": data["test_labels"],
        }


# Sized so that one MomentumALSALS run takes about two minutes on 2 CPU cores (benchmarks/docs/tasks.md).
QUICK = Budget(steps=40, batch_size=16, eval_every=20, options={"max_length": 64, "eval_size": 256})


def minilm_budgets(n_train: int, quick: Budget) -> dict[str, Budget]:
    """Smoke, the given quick budget, ``long`` (quick 5x as long), and the paper's GLUE
    protocol on the stand-in data: batch 32, sequences up to 256 tokens, 5 epochs, evaluated
    after each epoch."""
    epoch = n_train // 32
    return {
        "smoke": Budget(
            steps=3, batch_size=4, eval_every=3, options={"max_length": 16, "eval_size": 8}
        ),
        "quick": quick,
        "long": long_budget(quick),
        "paper": Budget(
            steps=5 * epoch, batch_size=32, eval_every=epoch, options={"max_length": 256}
        ),
    }


class MiniLMFineFood(MiniLMTask):
    name = "minilm-finefood"
    description = (
        "pretrained MiniLM-L6 (BERT, 22.7M) fine-tuned on Amazon fine-food reviews, "
        "'great' vs 'other' (4000 train / 1000 test): stand-in for BERT on SST-2"
    )
    num_labels = 2
    requires = ("minilm", "fine-food")
    loader = staticmethod(load_fine_food)
    budgets = minilm_budgets(4000, QUICK)


class MiniLMBBC(MiniLMTask):
    name = "minilm-bbc"
    description = (
        "pretrained MiniLM-L6 fine-tuned on BBC News topics, 5 classes (1781 train / 444 "
        "test, title and first lines): stand-in for BERT on a multi-class GLUE task"
    )
    num_labels = 5
    requires = ("minilm", "bbc-news")
    loader = staticmethod(load_bbc_news)
    budgets = minilm_budgets(1781, QUICK)


class MiniLMTweets(MiniLMTask):
    name = "minilm-tweets"
    description = (
        "pretrained MiniLM-L6 fine-tuned on tweet sentiment, negative/neutral/positive "
        "(16314 train / 4079 test): stand-in for BERT on a 3-class GLUE task (MNLI's size)"
    )
    num_labels = 3
    requires = ("minilm", "tweets")
    loader = staticmethod(load_tweets)
    budgets = minilm_budgets(16314, QUICK)
