"""Check tasks: small problems unlike the paper's six, to test that a method generalises.

Issue #11 warned that the optimizers are judged on tasks that are not the six the
configuration was chosen on (a tabular MLP, a regression MLP, a character-level
transformer). These three are our stand-ins for that kind of task. Nothing in the library
was chosen on them; they are run after a choice, to check it (``--tasks checks``). They
are not part of ``offline`` (the paper's six), so the six-task tables keep their meaning.

Adam's baseline here is what a user tunes today: a learning-rate grid with a 10% linear
warm-up and cosine decay (``domain`` is not ``"image"``). The data are generated or read
locally: scikit-learn's generators with a fixed data seed (the run's seed sets the
initialisation and the batch order only), and the Austen novels that ``alsals-bench fetch``
stores for the GPT-2 stand-in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from alsals_bench.data.fullscale import random_lm_batch
from alsals_bench.data.offline import load_austen_texts
from alsals_bench.tasks._util import eval_mode, tensor_classification_run, tensor_dataset_run
from alsals_bench.tasks.austen_gpt2 import VAL_FRACTION, lm_windows
from alsals_bench.tasks.base import (
    Budget,
    Task,
    TaskRun,
    long_budget,
)

#: the generated data sets are the same for every run; the run's seed is the model's and
#: the batch order's
DATA_SEED = 100


def standardised(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Both sets scaled by the training set's mean and standard deviation."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-8)
    return (train - mean) / std, (test - mean) / std


def loss_evaluation(
    x_test: Tensor,
    y_test: Tensor,
    loss: Callable[[Tensor, Tensor], Tensor] = nn.functional.mse_loss,
) -> Callable[[nn.Module], dict[str, float]]:
    """The held-out ``loss`` (the mean squared error unless given) of a model's outputs on
    ``x_test`` against ``y_test``, as ``val_loss``."""

    @torch.no_grad()
    def evaluate(model: nn.Module) -> dict[str, float]:
        return {"val_loss": loss(model(x_test), y_test).item()}

    return evaluate


def language_model_run(
    model: nn.Module,
    train: Tensor,
    validation: tuple[Tensor, Tensor],
    budget: Budget,
    seed: int,
    device: torch.device,
) -> TaskRun:
    """A next-token model on a token stream: random windows of ``budget.options["context"]``
    tokens of ``train`` (batch order from ``seed``), cross-entropy over every position, and
    the validation windows' mean cross-entropy as ``val_loss``."""
    x_val, y_val = (t.to(device) for t in validation)
    generator = torch.Generator().manual_seed(seed)
    context = budget.options["context"]

    def next_batch():
        x, y = random_lm_batch(train, budget.batch_size, context, generator)
        return x.to(device), y.to(device)

    def loss(model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())

    @torch.no_grad()
    def evaluate(model):
        with eval_mode(model):
            logits = model(x_val).flatten(0, 1)
            return {"val_loss": nn.functional.cross_entropy(logits, y_val.flatten()).item()}

    return TaskRun(model=model, next_batch=next_batch, loss=loss, evaluate=evaluate)


def _budgets(smoke: Budget, quick: Budget) -> dict[str, Budget]:
    """A check task's budgets: ``smoke``, ``quick`` and ``long`` (quick x5)."""
    return {"smoke": smoke, "quick": quick, "long": long_budget(quick)}


#: both MLP tasks: 800 steps of 64 examples, evaluated every 100
MLP_QUICK = Budget(steps=800, batch_size=64, eval_every=100)
MLP_SMOKE = Budget(steps=6, batch_size=32, eval_every=3)


def _mlp(sizes: tuple[int, ...], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


class TabularMLP(Task):
    name = "tabular-mlp"
    description = (
        "ReLU MLP 40-256-256-5 on a generated 5-class tabular problem "
        "(scikit-learn make_classification, 5000 train / 1000 test, 5% flipped labels)"
    )
    domain = "tabular"
    suite = "check"
    adam_lr = 1e-3
    adam_grid = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    metrics = ("accuracy", "val_loss")
    budgets = _budgets(MLP_SMOKE, MLP_QUICK)

    def setup(self, seed: int, budget: Budget, device: torch.device) -> TaskRun:
        from sklearn.datasets import make_classification

        x, y = make_classification(
            n_samples=6000,
            n_features=40,
            n_informative=20,
            n_redundant=10,
            n_classes=5,
            n_clusters_per_class=2,
            flip_y=0.05,
            random_state=DATA_SEED,
        )
        x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.int64)
        x_train, x_test = standardised(x[:5000], x[5000:])
        x_train, x_test = x_train.to(device), x_test.to(device)
        y_train, y_test = y[:5000].to(device), y[5000:].to(device)
        torch.manual_seed(seed)
        model = _mlp((40, 256, 256, 5), nn.ReLU).to(device)
        return tensor_classification_run(
            model, (x_train, y_train), (x_test, y_test), budget.batch_size, seed, 1000
        )


class RegressionMLP(Task):
    name = "regression-mlp"
    description = (
        "tanh MLP 10-128-128-1, mean squared error, on Friedman's regression problem #1 "
        "(scikit-learn make_friedman1, noise 0.5, standardised target; 5000 train / 1000 test)"
    )
    domain = "tabular"
    suite = "check"
    adam_lr = 1e-3
    adam_grid = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    metrics = ("val_loss",)
    budgets = _budgets(MLP_SMOKE, MLP_QUICK)

    def setup(self, seed: int, budget: Budget, device: torch.device) -> TaskRun:
        from sklearn.datasets import make_friedman1

        x, y = make_friedman1(n_samples=6000, n_features=10, noise=0.5, random_state=DATA_SEED)
        x = torch.tensor(x, dtype=torch.float32)
        y = torch.tensor(y, dtype=torch.float32).unsqueeze(1)
        x_train, x_test = standardised(x[:5000], x[5000:])
        y_train, y_test = standardised(y[:5000], y[5000:])
        x_train, x_test = x_train.to(device), x_test.to(device)
        y_train, y_test = y_train.to(device), y_test.to(device)
        torch.manual_seed(seed)
        model = _mlp((10, 128, 128, 1), nn.Tanh).to(device)
        return tensor_dataset_run(
            model,
            (x_train, y_train),
            budget.batch_size,
            seed,
            nn.functional.mse_loss,
            loss_evaluation(x_test, y_test),
        )


class CharTransformer(nn.Module):
    """A pre-norm causal transformer over characters, from torch's own layers."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.1, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        self.register_buffer(
            "causal", nn.Transformer.generate_square_subsequent_mask(context), persistent=False
        )

    def forward(self, tokens: Tensor) -> Tensor:
        n = tokens.shape[1]
        h = self.embed(tokens) + self.position[:n]
        h = self.blocks(h, mask=self.causal[:n, :n], is_causal=True)
        return self.head(self.norm(h))


_CHARS: dict[str, Any] = {}


def austen_characters() -> dict[str, Any]:
    """The six novels as character ids: ``train`` (1-D, books joined by a newline), ``val``
    (one tensor per book: its last 5%, as for the GPT-2 stand-in) and ``vocab`` (the
    characters of the training text; a held-out character outside it maps to id 0)."""
    if not _CHARS:
        books = load_austen_texts()
        cuts = [len(b) - math.ceil(VAL_FRACTION * len(b)) for b in books]
        train_text = "\n".join(b[:c] for b, c in zip(books, cuts, strict=True))
        vocab = sorted(set(train_text))
        index = {ch: i for i, ch in enumerate(vocab)}

        def ids(text: str) -> Tensor:
            return torch.tensor([index.get(ch, 0) for ch in text], dtype=torch.int64)

        _CHARS.update(
            train=ids(train_text),
            val=[ids(b[c:]) for b, c in zip(books, cuts, strict=True)],
            vocab=vocab,
        )
    return _CHARS


class CharTransformerTask(Task):
    name = "char-transformer"
    description = (
        "character-level causal transformer (2 layers, width 96, context 64) from scratch on "
        "Jane Austen's novels (last 5% of each book held out)"
    )
    domain = "nlp"
    suite = "check"
    adam_lr = 1e-3
    adam_grid = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    metrics = ("val_loss",)
    requires = ("austen",)
    budgets = _budgets(
        Budget(steps=4, batch_size=4, eval_every=2, options={"context": 16, "eval_windows": 8}),
        Budget(
            steps=400, batch_size=32, eval_every=100, options={"context": 64, "eval_windows": 256}
        ),
    )

    def setup(self, seed: int, budget: Budget, device: torch.device) -> TaskRun:
        context = budget.options["context"]
        chars = austen_characters()
        validation = lm_windows(chars["val"], context, budget.options["eval_windows"])
        torch.manual_seed(seed)
        model = CharTransformer(len(chars["vocab"]), 96, 2, 4, context).to(device)
        return language_model_run(model, chars["train"], validation, budget, seed, device)


CHECK_SUITE: tuple[Task, ...] = (TabularMLP(), RegressionMLP(), CharTransformerTask())
