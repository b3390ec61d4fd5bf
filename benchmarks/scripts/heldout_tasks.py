"""Fourteen held-out-style tasks for exploring a method on problems it was not chosen on.

The first six: ``lstm-char`` (2-layer LSTM character model), ``digits-autoencoder``,
``digits-vit``, ``matrix-factorisation``, ``diabetes-deep-mlp`` (8 ReLU layers, no
normalisation) and ``breast-cancer-logreg``; four more, unlike those and the benchmark's own:
``skipgram-embeddings`` (word2vec's skip-gram, full softmax: each batch touches few input
embedding rows), ``gru-sequence-classification`` (a GRU telling noisy sinusoids' frequencies
apart), ``wine-wide-mlp`` (one hidden layer of 1024 with dropout on 142 examples) and
``conv1d-denoising`` (a 1-D conv net denoising piecewise-smooth signals). The last four were
built in section 35's round, unlike the ten before them and the benchmark's own:
``heteroscedastic-nll`` (an MLP predicting a mean and a log-variance, trained on the Gaussian
negative log-likelihood, a loss that goes below 0), ``digits-label-noise-cnn`` (a small CNN
on digits with 40% of the training labels random, judged on the clean test labels),
``digits-contrastive`` (an MLP encoder trained with NT-Xent on two augmented views of each
digit, a loss whose floor is not 0) and ``sequence-sorting-transformer`` (a transformer
encoder outputting its input sequence sorted).

Not part of the benchmark's suites (no stored runs, no report of their own): section 32 of
``benchmarks/docs/method.md`` reports what ``ALSALS(params)`` and the peers did on the first
six, section 33 on the four more (built after ``start_rise`` was chosen, to test it), section
35 on the last four. The data come from scikit-learn's bundled sets, a seeded generator, or the
source of three modules of the running Python's standard library each for ``lstm-char`` and
``skipgram-embeddings`` (the text, and so the numbers, follow the Python version; 3.11.7 for
section 32); the run's seed sets the model's initialisation and the batch order (and, for
``digits-contrastive``, the training views). Run through the benchmark's own command line, with
these tasks registered first::

    python benchmarks/scripts/heldout_tasks.py run --budget quick --tasks matrix-factorisation \
        --optimizers alsals-schedulefree adam-tuned --seeds 0,1 --out /tmp/heldout --no-report
    python benchmarks/scripts/heldout_tasks.py report --budget quick --out /tmp/heldout
"""

from __future__ import annotations

import math
import os
import re
import sys
import sysconfig
from collections import Counter

import torch
from torch import Tensor, nn

from alsals_bench.tasks._util import eval_mode, tensor_classification_run, tensor_dataset_run
from alsals_bench.tasks.austen_gpt2 import lm_windows
from alsals_bench.tasks.base import Budget, Task, TaskRun, batch_stream
from alsals_bench.tasks.checks import language_model_run, loss_evaluation, standardised

DATA_SEED = 1234
GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def _split(n: int, test_fraction: float) -> tuple[Tensor, Tensor]:
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(DATA_SEED))
    n_test = int(round(test_fraction * n))
    return perm[n_test:], perm[:n_test]


def _standardised_classes(load) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """A scikit-learn classification set (``load``): (inputs, labels) for training and test,
    a seeded 80/20 split, the inputs standardised by the training part's statistics."""
    d = load()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = _split(len(y), 0.2)
    x_tr, x_te = standardised(x[tr], x[te])
    return (x_tr, y[tr]), (x_te, y[te])


class HeldoutTask(Task):
    """What every held-out task shares: a check-style task, Adam's grid ``GRID`` around 1e-3."""

    suite = "check"
    adam_lr = 1e-3
    adam_grid = GRID


# ---------------------------------------------------------------- 1. LSTM char LM
STDLIB_MODULES = ("inspect", "argparse", "typing")
_TEXT: dict = {}


def stdlib_text() -> dict:
    if not _TEXT:
        root = sysconfig.get_paths()["stdlib"]
        parts = []
        for m in STDLIB_MODULES:
            with open(os.path.join(root, m + ".py"), encoding="utf-8") as f:
                parts.append(f.read())
        text = "\n".join(parts)
        cut = int(0.9 * len(text))
        train_text, test_text = text[:cut], text[cut:]
        vocab = sorted(set(train_text))
        index = {c: i for i, c in enumerate(vocab)}
        _TEXT.update(
            train=torch.tensor([index[c] for c in train_text], dtype=torch.int64),
            test=torch.tensor([index.get(c, 0) for c in test_text], dtype=torch.int64),
            vocab=vocab,
        )
    return _TEXT


class CharLSTM(nn.Module):
    def __init__(self, vocab: int, embed: int = 64, hidden: int = 256, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: Tensor) -> Tensor:
        h, _ = self.lstm(self.embed(tokens))
        return self.head(h)


class LSTMChar(HeldoutTask):
    name = "lstm-char"
    description = "2-layer LSTM (emb 64, hidden 256) char LM, context 64, on stdlib source"
    domain = "nlp"
    metrics = ("val_loss",)
    budgets = {
        "smoke": Budget(
            steps=4, batch_size=4, eval_every=2, options={"context": 16, "eval_windows": 8}
        ),
        "quick": Budget(
            steps=400, batch_size=32, eval_every=50, options={"context": 64, "eval_windows": 256}
        ),
    }

    def setup(self, seed: int, budget: Budget, device: torch.device) -> TaskRun:
        data = stdlib_text()
        windows = budget.options["context"], budget.options["eval_windows"]
        validation = lm_windows([data["test"]], *windows)
        torch.manual_seed(seed)
        model = CharLSTM(len(data["vocab"])).to(device)
        return language_model_run(model, data["train"], validation, budget, seed, device)


# ---------------------------------------------------------------- digits helpers
def _digits(test_fraction=0.2):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    tr, te = _split(len(y), test_fraction)
    return x[tr], y[tr], x[te], y[te]


# ---------------------------------------------------------------- 2. digits autoencoder
class DigitsAutoencoder(HeldoutTask):
    name = "digits-autoencoder"
    description = "MLP autoencoder 64-128-16-128-64 (ReLU, sigmoid out), MSE, on digits in [0,1]"
    domain = "tabular"
    metrics = ("val_loss",)
    budgets = {
        "smoke": Budget(steps=6, batch_size=32, eval_every=3),
        "quick": Budget(steps=600, batch_size=64, eval_every=50),
    }

    def setup(self, seed, budget, device):
        x_tr, _, x_te, _ = _digits()
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(64, 128),
            nn.ReLU(),
            nn.Linear(128, 16),
            nn.ReLU(),
            nn.Linear(16, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.Sigmoid(),
        ).to(device)
        return tensor_dataset_run(
            model,
            (x_tr, x_tr),
            budget.batch_size,
            seed,
            nn.functional.mse_loss,
            loss_evaluation(x_te, x_te),
        )


# ---------------------------------------------------------------- 3. digits ViT
class TinyViT(nn.Module):
    def __init__(self, dim=64, depth=2, heads=4, patch=2, classes=10):
        super().__init__()
        self.patch = patch
        n = (8 // patch) ** 2
        self.proj = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.zeros(1, n + 1, dim))
        nn.init.normal_(self.pos, std=0.02)
        nn.init.normal_(self.cls, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):  # x [B, 64]
        b, p = x.shape[0], self.patch
        img = x.view(b, 8, 8)
        patches = img.unfold(1, p, p).unfold(2, p, p).reshape(b, -1, p * p)  # [B,16,4]
        h = self.proj(patches)
        h = torch.cat([self.cls.expand(b, -1, -1), h], dim=1) + self.pos
        h = self.blocks(h)
        return self.head(self.norm(h[:, 0]))


class DigitsViT(HeldoutTask):
    name = "digits-vit"
    description = "tiny ViT (2x2 patches, dim 64, 2 layers, 4 heads, pre-LN, GELU) on 8x8 digits"
    domain = "tabular"
    metrics = ("accuracy", "val_loss")
    budgets = {
        "smoke": Budget(steps=6, batch_size=32, eval_every=3),
        "quick": Budget(steps=600, batch_size=64, eval_every=50),
    }

    def setup(self, seed, budget, device):
        x_tr, y_tr, x_te, y_te = _digits()
        torch.manual_seed(seed)
        model = TinyViT().to(device)
        return tensor_classification_run(
            model, (x_tr, y_tr), (x_te, y_te), budget.batch_size, seed, 512
        )


# ---------------------------------------------------------------- 4. matrix factorisation
class MF(nn.Module):
    def __init__(self, users, items, rank=32, init_std=0.1):
        super().__init__()
        self.u = nn.Embedding(users, rank)
        self.v = nn.Embedding(items, rank)
        self.bu = nn.Embedding(users, 1)
        self.bv = nn.Embedding(items, 1)
        self.b = nn.Parameter(torch.zeros(()))
        nn.init.normal_(self.u.weight, std=init_std)
        nn.init.normal_(self.v.weight, std=init_std)
        nn.init.zeros_(self.bu.weight)
        nn.init.zeros_(self.bv.weight)

    def forward(self, ij):
        i, j = ij[:, 0], ij[:, 1]
        return (self.u(i) * self.v(j)).sum(-1) + self.bu(i)[:, 0] + self.bv(j)[:, 0] + self.b


class MatrixFactorisation(HeldoutTask):
    name = "matrix-factorisation"
    description = (
        "400x400 rank-8 matrix, 20% observed (+N(0,0.3^2)), 5% test; MF rank 32 + biases, MSE"
    )
    domain = "tabular"
    metrics = ("val_loss",)
    budgets = {
        "smoke": Budget(steps=6, batch_size=32, eval_every=3),
        "quick": Budget(steps=800, batch_size=256, eval_every=50),
    }

    def setup(self, seed, budget, device):
        g = torch.Generator().manual_seed(DATA_SEED)
        n, rank = 400, 8
        U = torch.randn(n, rank, generator=g) / rank**0.25
        V = torch.randn(n, rank, generator=g) / rank**0.25
        R = U @ V.T  # entries ~ variance 1
        perm = torch.randperm(n * n, generator=g)
        n_train, n_test = int(0.2 * n * n), int(0.05 * n * n)
        tr, te = perm[:n_train], perm[n_train : n_train + n_test]

        def pairs(idx):
            return torch.stack([idx // n, idx % n], dim=1)

        noise = 0.3
        y_tr = R.flatten()[tr] + noise * torch.randn(n_train, generator=g)
        y_te = R.flatten()[te] + noise * torch.randn(n_test, generator=g)
        torch.manual_seed(seed)
        model = MF(n, n).to(device)
        return tensor_dataset_run(
            model,
            (pairs(tr), y_tr),
            budget.batch_size,
            seed,
            nn.functional.mse_loss,
            loss_evaluation(pairs(te), y_te),
        )


# ---------------------------------------------------------------- 5. diabetes deep MLP
class DiabetesDeepMLP(HeldoutTask):
    name = "diabetes-deep-mlp"
    description = "8-layer ReLU MLP width 64 (no normalisation), MSE, standardised load_diabetes"
    domain = "tabular"
    metrics = ("val_loss",)
    budgets = {
        "smoke": Budget(steps=6, batch_size=32, eval_every=3),
        "quick": Budget(steps=600, batch_size=32, eval_every=50),
    }

    def setup(self, seed, budget, device):
        from sklearn.datasets import load_diabetes

        d = load_diabetes()
        x = torch.tensor(d.data, dtype=torch.float32)
        y = torch.tensor(d.target, dtype=torch.float32).unsqueeze(1)
        tr, te = _split(len(y), 0.2)
        x_tr, x_te = standardised(x[tr], x[te])
        y_tr, y_te = standardised(y[tr], y[te])
        torch.manual_seed(seed)
        sizes = [10] + [64] * 7 + [1]  # 8 Linear layers
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        model = nn.Sequential(*layers).to(device)
        return tensor_dataset_run(
            model,
            (x_tr, y_tr),
            budget.batch_size,
            seed,
            nn.functional.mse_loss,
            loss_evaluation(x_te, y_te),
        )


# ---------------------------------------------------------------- 6. breast cancer logreg
class BreastCancerLogreg(HeldoutTask):
    name = "breast-cancer-logreg"
    description = "logistic regression (one nn.Linear) on standardised load_breast_cancer"
    domain = "tabular"
    metrics = ("accuracy", "val_loss")
    budgets = {
        "smoke": Budget(steps=6, batch_size=32, eval_every=3),
        "quick": Budget(steps=300, batch_size=64, eval_every=25),
    }

    def setup(self, seed, budget, device):
        from sklearn.datasets import load_breast_cancer

        train, test = _standardised_classes(load_breast_cancer)
        torch.manual_seed(seed)
        model = nn.Linear(30, 2).to(device)
        return tensor_classification_run(model, train, test, budget.batch_size, seed, 512)


# ---------------------------------------------------------------- 7. skip-gram embeddings
SKIPGRAM_MODULES = ("collections/__init__", "logging/__init__", "unittest/case")
_SKIPGRAM: dict = {}


def skipgram_pairs(vocab_size: int = 500, window: int = 2) -> dict:
    """(centre, context) word-id pairs of three standard-library modules (other than the
    LSTM's): lower-case runs of letters, the ``vocab_size`` most frequent kept and the rest
    dropped before windowing (word2vec's rule), every context within ``window`` words;
    ``train``/``test`` a seeded 90/10 split of the pairs."""
    key = (vocab_size, window)
    if key not in _SKIPGRAM:
        root = sysconfig.get_paths()["stdlib"]
        words: list[str] = []
        for m in SKIPGRAM_MODULES:
            with open(os.path.join(root, m + ".py"), encoding="utf-8") as f:
                words += re.findall(r"[a-z]+", f.read().lower())
        vocab = [w for w, _ in Counter(words).most_common(vocab_size)]
        index = {w: i for i, w in enumerate(vocab)}
        ids = torch.tensor([index[w] for w in words if w in index], dtype=torch.int64)
        pairs = torch.cat(
            [
                torch.stack(
                    [ids[max(0, -o) : len(ids) - max(0, o)], ids[max(0, o) : len(ids) + min(0, o)]],
                    1,
                )
                for o in range(-window, window + 1)
                if o != 0
            ]
        )
        tr, te = _split(len(pairs), 0.1)
        _SKIPGRAM[key] = {"train": pairs[tr], "test": pairs[te], "vocab": vocab}
    return _SKIPGRAM[key]


class SkipGram(nn.Module):
    """word2vec's skip-gram with a full softmax: the centre word's input embedding scored
    against every word's output embedding."""

    def __init__(self, vocab: int, dim: int = 32):
        super().__init__()
        self.inp = nn.Embedding(vocab, dim)
        self.out = nn.Embedding(vocab, dim)
        nn.init.uniform_(self.inp.weight, -0.5 / dim, 0.5 / dim)
        nn.init.normal_(self.out.weight, std=dim**-0.5)

    def forward(self, centre: Tensor) -> Tensor:
        return self.inp(centre) @ self.out.weight.T


class SkipGramEmbeddings(HeldoutTask):
    name = "skipgram-embeddings"
    description = (
        "skip-gram word2vec (dim 32, full softmax over the 500 commonest words, window 2) on "
        "three stdlib modules; 10% of the pairs held out"
    )
    domain = "nlp"
    metrics = ("accuracy", "val_loss")
    budgets = {
        "smoke": Budget(steps=6, batch_size=32, eval_every=3),
        "quick": Budget(steps=600, batch_size=256, eval_every=50),
    }

    def setup(self, seed, budget, device):
        data = skipgram_pairs()
        (c_tr, o_tr), (c_te, o_te) = data["train"].T, data["test"].T
        torch.manual_seed(seed)
        model = SkipGram(len(data["vocab"])).to(device)
        return tensor_classification_run(
            model, (c_tr, o_tr), (c_te, o_te), budget.batch_size, seed, 4096
        )


# ---------------------------------------------------------------- 8. GRU sequence classes
def noisy_sinusoids(n: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` sequences ``a sin(2 pi f t + phi) + N(0, 0.5^2)``, ``f`` one of four close
    frequencies (the class), amplitude in [0.5, 1.5], phase uniform: [n, length, 1], [n]."""
    freqs = torch.tensor([0.06, 0.08, 0.10, 0.12])
    y = torch.randint(0, 4, (n,), generator=generator)
    amp = 0.5 + torch.rand(n, 1, generator=generator)
    phase = 2 * torch.pi * torch.rand(n, 1, generator=generator)
    t = torch.arange(length, dtype=torch.float32)
    x = amp * torch.sin(2 * torch.pi * freqs[y][:, None] * t + phase)
    x = x + 0.5 * torch.randn(n, length, generator=generator)
    return x.unsqueeze(-1), y


class GRUClassifier(nn.Module):
    def __init__(self, hidden: int = 64, classes: int = 4):
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x: Tensor) -> Tensor:
        _, h = self.gru(x)
        return self.head(h[-1])


class GRUSequenceClassification(HeldoutTask):
    name = "gru-sequence-classification"
    description = (
        "1-layer GRU (hidden 64) on the last state: which of 4 close frequencies a noisy "
        "length-30 sinusoid has (4000 train / 1000 test, seeded)"
    )
    domain = "nlp"
    metrics = ("accuracy", "val_loss")
    budgets = {
        "smoke": Budget(steps=6, batch_size=32, eval_every=3),
        "quick": Budget(steps=500, batch_size=64, eval_every=50),
    }

    def setup(self, seed, budget, device):
        g = torch.Generator().manual_seed(DATA_SEED)
        x_tr, y_tr = noisy_sinusoids(4000, 30, g)
        x_te, y_te = noisy_sinusoids(1000, 30, g)
        torch.manual_seed(seed)
        model = GRUClassifier().to(device)
        return tensor_classification_run(
            model, (x_tr, y_tr), (x_te, y_te), budget.batch_size, seed, 1000
        )


# ---------------------------------------------------------------- 9. wine wide MLP
class WineWideMLP(HeldoutTask):
    name = "wine-wide-mlp"
    description = "wide shallow MLP 13-1024-3 (ReLU, dropout 0.5), standardised load_wine"
    domain = "tabular"
    metrics = ("accuracy", "val_loss")
    budgets = {
        "smoke": Budget(steps=6, batch_size=16, eval_every=3),
        "quick": Budget(steps=400, batch_size=32, eval_every=25),
    }

    def setup(self, seed, budget, device):
        from sklearn.datasets import load_wine

        train, test = _standardised_classes(load_wine)
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(13, 1024), nn.ReLU(), nn.Dropout(0.5), nn.Linear(1024, 3)
        ).to(device)
        return tensor_classification_run(model, train, test, budget.batch_size, seed, 512)


# ---------------------------------------------------------------- 10. conv1d denoising
def piecewise_smooth(n: int, length: int, generator: torch.Generator) -> Tensor:
    """``n`` signals of ``length``: four random pieces, each a constant plus a slope plus a
    slow sinusoid, joined with jumps at random breakpoints: [n, 1, length]."""
    t = torch.linspace(0, 1, length)
    cuts = torch.sort(torch.rand(n, 3, generator=generator), dim=1).values
    piece = (t[None, :, None] > cuts[:, None, :]).sum(-1)  # [n, length] in 0..3
    level, slope, amp = (torch.randn(n, 4, generator=generator) for _ in range(3))
    freq = 1 + 3 * torch.rand(n, 4, generator=generator)
    phase = 2 * torch.pi * torch.rand(n, 4, generator=generator)

    def take(v: Tensor) -> Tensor:
        return v.gather(1, piece)

    x = (
        take(level)
        + take(slope) * t
        + 0.5 * take(amp) * torch.sin(2 * torch.pi * take(freq) * t + take(phase))
    )
    return x.unsqueeze(1)


class Conv1dDenoising(HeldoutTask):
    name = "conv1d-denoising"
    description = (
        "4-layer 1-D conv net (32 channels, kernel 7, ReLU, no normalisation) denoising "
        "piecewise-smooth length-128 signals (+N(0,0.5^2)), MSE; 2000 train / 500 test"
    )
    domain = "tabular"
    metrics = ("val_loss",)
    budgets = {
        "smoke": Budget(steps=6, batch_size=8, eval_every=3),
        "quick": Budget(steps=600, batch_size=32, eval_every=50),
    }

    def setup(self, seed, budget, device):
        g = torch.Generator().manual_seed(DATA_SEED)
        clean_tr = piecewise_smooth(2000, 128, g)
        clean_te = piecewise_smooth(500, 128, g)
        noisy_tr = clean_tr + 0.5 * torch.randn(clean_tr.shape, generator=g)
        noisy_te = clean_te + 0.5 * torch.randn(clean_te.shape, generator=g)
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate([(1, 32), (32, 32), (32, 32), (32, 1)]):
            layers.append(nn.Conv1d(a, b, 7, padding=3))
            if i < 3:
                layers.append(nn.ReLU())
        model = nn.Sequential(*layers).to(device)
        return tensor_dataset_run(
            model,
            (noisy_tr, clean_tr),
            budget.batch_size,
            seed,
            nn.functional.mse_loss,
            loss_evaluation(noisy_te, clean_te),
        )


# ---------------------------------------------------------------- 11. heteroscedastic NLL
def heteroscedastic_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` points ``x ~ U(-3, 3)``, ``y = 0.5 x + sin(2x) + s(x) e`` with ``e ~ N(0, 1)``
    and a noise level ``s(x) = 0.02 + 0.15 (1 + sin(1.5 x))`` between 0.02 and 0.32 (the
    true model's expected negative log-likelihood is about -0.64): [n, 1], [n, 1]."""
    x = 6 * torch.rand(n, 1, generator=generator) - 3
    scale = 0.02 + 0.15 * (1 + torch.sin(1.5 * x))
    y = 0.5 * x + torch.sin(2 * x) + scale * torch.randn(n, 1, generator=generator)
    return x, y


def gaussian_nll(output: Tensor, y: Tensor) -> Tensor:
    """The mean negative log-likelihood of ``y`` [n, 1] under ``N(mean, exp(log_var))``, the
    model's ``output`` [n, 2] being (mean, log-variance); the constant ``0.5 log(2 pi)`` kept,
    so the loss is negative wherever the model is sure and right."""
    mean, log_var = output[:, :1], output[:, 1:]
    return 0.5 * (log_var + (y - mean) ** 2 * torch.exp(-log_var) + math.log(2 * math.pi)).mean()


class HeteroscedasticNLL(HeldoutTask):
    name = "heteroscedastic-nll"
    description = (
        "SiLU MLP 1-64-64-2 predicting mean and log-variance, Gaussian negative log-likelihood "
        "(can go below 0) on a seeded 1-D regression whose noise level varies with x "
        "(2000 train / 1000 test)"
    )
    domain = "tabular"
    metrics = ("val_loss",)
    budgets = {
        "smoke": Budget(steps=6, batch_size=32, eval_every=3),
        "quick": Budget(steps=600, batch_size=64, eval_every=50),
    }

    def setup(self, seed, budget, device):
        g = torch.Generator().manual_seed(DATA_SEED)
        x_tr, y_tr = (t.to(device) for t in heteroscedastic_data(2000, g))
        x_te, y_te = (t.to(device) for t in heteroscedastic_data(1000, g))
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Linear(1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 2)
        ).to(device)
        return tensor_dataset_run(
            model,
            (x_tr, y_tr),
            budget.batch_size,
            seed,
            gaussian_nll,
            loss_evaluation(x_te, y_te, gaussian_nll),
        )


# ---------------------------------------------------------------- 12. digits label-noise CNN
class DigitsLabelNoiseCNN(HeldoutTask):
    name = "digits-label-noise-cnn"
    description = (
        "small CNN (conv 16, conv 32, max-pool, linear; ReLU, no normalisation) on 8x8 digits "
        "with 40% of the training labels replaced by uniformly random classes; clean test labels"
    )
    domain = "tabular"
    metrics = ("accuracy", "val_loss")
    budgets = {
        "smoke": Budget(steps=6, batch_size=32, eval_every=3),
        "quick": Budget(steps=600, batch_size=64, eval_every=50),
    }

    def setup(self, seed, budget, device):
        x_tr, y_tr, x_te, y_te = _digits()
        g = torch.Generator().manual_seed(DATA_SEED)
        noisy = torch.rand(len(y_tr), generator=g) < 0.4
        random_labels = torch.randint(0, 10, (len(y_tr),), generator=g)
        y_tr = torch.where(noisy, random_labels, y_tr)
        images = [x.view(-1, 1, 8, 8).to(device) for x in (x_tr, x_te)]
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 4 * 4, 10),
        ).to(device)
        return tensor_classification_run(
            model,
            (images[0], y_tr.to(device)),
            (images[1], y_te.to(device)),
            budget.batch_size,
            seed,
            512,
        )


# ---------------------------------------------------------------- 13. digits contrastive
def augmented_view(x: Tensor, generator: torch.Generator) -> Tensor:
    """A random view of digits ``x`` [n, 64] in [0, 1]: each image shifted by -1, 0 or 1
    pixel in each direction (zeros shifted in), plus N(0, 0.1^2) noise on every pixel."""
    n = len(x)
    padded = nn.functional.pad(x.view(n, 8, 8), (1, 1, 1, 1))
    dy, dx = (torch.randint(0, 3, (n,), generator=generator).to(x.device) for _ in range(2))
    span = torch.arange(8, device=x.device)
    rows = (dy[:, None] + span)[:, :, None]
    cols = (dx[:, None] + span)[:, None, :]
    shifted = padded[torch.arange(n, device=x.device)[:, None, None], rows, cols]
    noise = torch.randn(n, 64, generator=generator).to(x.device)
    return shifted.reshape(n, 64) + 0.1 * noise


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.2) -> Tensor:
    """SimCLR's NT-Xent loss of two views' embeddings [n, d]: each of the 2n embeddings
    should pick its other view among the 2n - 1 others by cosine similarity / temperature.
    Its floor is above 0 (the negatives cannot all be far)."""
    n = len(z1)
    z = nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    similarity = z @ z.T / temperature
    similarity = similarity.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), -1e9)
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return nn.functional.cross_entropy(similarity, target)


class DigitsContrastive(HeldoutTask):
    name = "digits-contrastive"
    description = (
        "MLP encoder 64-128-32 (ReLU) trained with NT-Xent (temperature 0.2) on two augmented "
        "views (shift by up to 1 pixel, N(0, 0.1^2) noise) of each digit; accuracy: nearest "
        "class mean of the test embeddings"
    )
    domain = "tabular"
    metrics = ("accuracy", "val_loss")
    budgets = {
        "smoke": Budget(steps=6, batch_size=32, eval_every=3),
        "quick": Budget(steps=500, batch_size=128, eval_every=50),
    }

    def setup(self, seed, budget, device):
        x_tr, y_tr, x_te, y_te = (t.to(device) for t in _digits())
        g = torch.Generator().manual_seed(DATA_SEED)
        views_te = augmented_view(x_te, g), augmented_view(x_te, g)
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32)).to(device)
        indices = batch_stream(len(x_tr), budget.batch_size, seed)
        batches = 0

        def next_batch():
            # the views of the k-th batch come from a generator seeded by (seed, k): every
            # closure call of a step sees the same views, and every run of a seed the same
            # (modulo 2**64, a generator's seed: a seed from 2**64 / 1_000_003 on overflowed)
            nonlocal batches
            batches += 1
            views = torch.Generator().manual_seed((1_000_003 * seed + batches) % 2**64)
            x = x_tr[indices().to(device)]
            return augmented_view(x, views), augmented_view(x, views)

        def loss(model, batch):
            return nt_xent(model(batch[0]), model(batch[1]))

        @torch.no_grad()
        def evaluate(model):
            with eval_mode(model):
                size, total = budget.batch_size, 0.0
                for start in range(0, len(x_te), size):
                    v1, v2 = (v[start : start + size] for v in views_te)
                    total += len(v1) * nt_xent(model(v1), model(v2)).item()
                train = nn.functional.normalize(model(x_tr), dim=1)
                means = torch.stack([train[y_tr == c].mean(0) for c in range(10)])
                test = nn.functional.normalize(model(x_te), dim=1)
                guess = (test @ nn.functional.normalize(means, dim=1).T).argmax(1)
                return {
                    "accuracy": (guess == y_te).float().mean().item(),
                    "val_loss": total / len(x_te),
                }

        return TaskRun(model=model, next_batch=next_batch, loss=loss, evaluate=evaluate)


# ---------------------------------------------------------------- 14. sorting transformer
def sorting_data(n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """``n`` sequences of 12 tokens drawn uniformly from 16, and each one sorted: [n, 12] x 2."""
    x = torch.randint(0, 16, (n, 12), generator=generator)
    return x, x.sort(dim=1).values


class SortingTransformer(nn.Module):
    def __init__(self, vocab=16, length=12, dim=64, depth=2, heads=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(1, length, dim))
        nn.init.normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens: Tensor) -> Tensor:  # [B, L] -> [B, L, vocab]
        h = self.blocks(self.embed(tokens) + self.pos[:, : tokens.shape[1]])
        return self.head(self.norm(h))


def per_token_cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


class SequenceSortingTransformer(HeldoutTask):
    name = "sequence-sorting-transformer"
    description = (
        "pre-LN transformer encoder (2 layers, d_model 64, 4 heads, learned positions) "
        "outputting the sorted sequence of 12 tokens from 16, cross-entropy per position "
        "(8000 train / 1000 test, seeded)"
    )
    domain = "nlp"
    metrics = ("accuracy", "val_loss")
    budgets = {
        "smoke": Budget(steps=6, batch_size=32, eval_every=3),
        "quick": Budget(steps=600, batch_size=64, eval_every=50),
    }

    def setup(self, seed, budget, device):
        g = torch.Generator().manual_seed(DATA_SEED)
        x_tr, y_tr = (t.to(device) for t in sorting_data(8000, g))
        x_te, y_te = (t.to(device) for t in sorting_data(1000, g))
        torch.manual_seed(seed)
        model = SortingTransformer().to(device)

        @torch.no_grad()
        def evaluate(model):
            logits = model(x_te)
            return {
                "accuracy": (logits.argmax(-1) == y_te).float().mean().item(),
                "val_loss": per_token_cross_entropy(logits, y_te).item(),
            }

        return tensor_dataset_run(
            model, (x_tr, y_tr), budget.batch_size, seed, per_token_cross_entropy, evaluate
        )


HELDOUT_TASKS = (
    LSTMChar(),
    DigitsAutoencoder(),
    DigitsViT(),
    MatrixFactorisation(),
    DiabetesDeepMLP(),
    BreastCancerLogreg(),
    SkipGramEmbeddings(),
    GRUSequenceClassification(),
    WineWideMLP(),
    Conv1dDenoising(),
    HeteroscedasticNLL(),
    DigitsLabelNoiseCNN(),
    DigitsContrastive(),
    SequenceSortingTransformer(),
)


def register() -> None:
    """Add the tasks to the benchmark's ``TASKS`` (the runner and the report read it)."""
    import alsals_bench.tasks

    for task in HELDOUT_TASKS:
        alsals_bench.tasks.TASKS[task.name] = task


if __name__ == "__main__":
    register()
    from alsals_bench.cli import main

    sys.exit(main(sys.argv[1:]))
