"""Full-scale loaders, tested on tiny files written here in each dataset's real format."""

from __future__ import annotations

import os
import pickle
import sys

import numpy as np
import pytest
import torch

from alsals_bench.data import fullscale

# --------------------------------------------------------------------------- CIFAR


def write_cifar_batch(path, data: np.ndarray, labels: dict[bytes, list[int]]) -> None:
    """Write a batch like the official (Python 2 era) archive: protocol 2, numpy.core globals."""
    batch = {
        b"batch_label": b"testing batch",
        b"data": data,
        b"filenames": [b"img_%d.png" % i for i in range(len(data))],
        **labels,
    }
    raw = pickle.dumps(batch, protocol=2)
    path.write_bytes(raw.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))


def images(n: int, first_value: int) -> np.ndarray:
    """[n, 3072] uint8 rows whose R, G, B planes are constant: value, value+1, value+2."""
    planes = [np.full((n, 1024), first_value + c, dtype=np.uint8) for c in range(3)]
    return np.concatenate(planes, axis=1) + np.arange(n, dtype=np.uint8)[:, None] * 10


@pytest.fixture
def cifar10_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for i in range(1, 6):
        write_cifar_batch(folder / f"data_batch_{i}", images(4, i), {b"labels": [0, 3, 9, i]})
    write_cifar_batch(folder / "test_batch", images(3, 100), {b"labels": [1, 2, 3]})
    return tmp_path


def test_cifar10(cifar10_root):
    for root in (cifar10_root, cifar10_root / "cifar-10-batches-py"):
        data = fullscale.load_cifar10(root)
        assert data["x_train"].shape == (20, 3, 32, 32) and data["x_test"].shape == (3, 3, 32, 32)
        assert data["x_train"].dtype == torch.uint8 and data["y_train"].dtype == torch.int64
        assert data["y_train"][:4].tolist() == [0, 3, 9, 1]
        assert data["y_test"].tolist() == [1, 2, 3]
        # channel planes land in dim 1 (R, G, B), rows in dim 0
        assert data["x_train"][0, :, 5, 7].tolist() == [1, 2, 3]
        assert data["x_train"][1, :, 0, 0].tolist() == [11, 12, 13]
        assert data["x_test"][0, 2].unique().tolist() == [102]


def test_cifar10_missing_batch(cifar10_root):
    (cifar10_root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        fullscale.load_cifar10(cifar10_root)


@pytest.mark.parametrize("garble", [lambda raw: raw[: len(raw) // 2], lambda raw: b"<html>" + raw])
def test_cifar10_garbled_batch(cifar10_root, garble):
    path = cifar10_root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(garble(path.read_bytes()))  # truncated download / error page
    with pytest.raises(ValueError, match="test_batch is not a CIFAR python batch"):
        fullscale.load_cifar10(cifar10_root)


def test_cifar10_wrong_shape(cifar10_root):
    path = cifar10_root / "cifar-10-batches-py" / "test_batch"
    write_cifar_batch(path, np.zeros((3, 100), np.uint8), {b"labels": [0, 0, 0]})
    with pytest.raises(ValueError, match=r"expected uint8 \[N, 3072\]"):
        fullscale.load_cifar10(cifar10_root)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_cifar_refuses_code_in_pickles(cifar10_root):
    path = cifar10_root / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}, protocol=2))
    with pytest.raises(ValueError, match="refusing to load global"):
        fullscale.load_cifar10(cifar10_root)


@pytest.fixture
def cifar100_root(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    write_cifar_batch(
        folder / "train",
        images(5, 0),
        {b"fine_labels": [0, 99, 50, 7, 7], b"coarse_labels": [0, 19, 10, 1, 1]},
    )
    write_cifar_batch(
        folder / "test", images(2, 0), {b"fine_labels": [42, 3], b"coarse_labels": [5, 6]}
    )
    return tmp_path


def test_cifar100(cifar100_root):
    data = fullscale.load_cifar100(cifar100_root)
    assert data["x_train"].shape == (5, 3, 32, 32) and data["x_test"].shape == (2, 3, 32, 32)
    assert data["y_train"].tolist() == [0, 99, 50, 7, 7] and data["y_test"].tolist() == [42, 3]
    assert fullscale.load_cifar100(cifar100_root, labels="coarse")["y_train"].tolist() == [
        0,
        19,
        10,
        1,
        1,
    ]
    with pytest.raises(ValueError, match="'fine' or 'coarse'"):
        fullscale.load_cifar100(cifar100_root, labels="medium")


def test_cifar100_label_out_of_range(cifar100_root):
    write_cifar_batch(
        cifar100_root / "cifar-100-python" / "test",
        images(1, 0),
        {b"fine_labels": [100], b"coarse_labels": [0]},
    )
    with pytest.raises(ValueError, match=r"outside \[0, 100\)"):
        fullscale.load_cifar100(cifar100_root)


def test_cifar100_missing_key(cifar100_root):
    write_cifar_batch(cifar100_root / "cifar-100-python" / "test", images(1, 0), {})
    with pytest.raises(ValueError, match="fine_labels"):
        fullscale.load_cifar100(cifar100_root)


# --------------------------------------------------------------------------- image folder


@pytest.fixture
def image_root(tmp_path):
    """``train/<class>/`` with placeholder files; decoding tests overwrite them with images."""
    for cls, names in {"n02": ["b.JPEG", "a.JPEG", "notes.txt"], "n01": ["z.jpg"]}.items():
        (tmp_path / "train" / cls).mkdir(parents=True)
        for name in names:
            (tmp_path / "train" / cls / name).write_bytes(b"")
    (tmp_path / "val" / "n02").mkdir(parents=True)
    (tmp_path / "val" / "n02" / "x.png").write_bytes(b"")
    return tmp_path


def test_image_folder_lists_deterministically(image_root):
    ds = fullscale.ImageFolderDataset(image_root, "train", size=8)
    assert ds.classes == ["n01", "n02"] and ds.class_to_idx == {"n01": 0, "n02": 1}
    assert [(p.name, y) for p, y in ds.samples] == [("z.jpg", 0), ("a.JPEG", 1), ("b.JPEG", 1)]
    assert len(ds) == 3
    val = fullscale.ImageFolderDataset(image_root, "val", size=8, classes=ds.classes)
    assert [y for _, y in val.samples] == [1]  # n02 keeps the training index
    assert fullscale.ImageFolderDataset(image_root, "val", size=8).samples[0][1] == 0


def test_image_folder_errors(image_root):
    with pytest.raises(FileNotFoundError, match="expected .*<class>/<image>"):
        fullscale.ImageFolderDataset(image_root, "test")
    with pytest.raises(ValueError, match="not in `classes`"):
        fullscale.ImageFolderDataset(image_root, "train", classes=["n01"])
    with pytest.raises(ValueError, match="smaller than the crop"):
        fullscale.ImageFolderDataset(image_root, "train", size=8, resize=4)


def test_image_folder_without_pillow(image_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "PIL", None)
    ds = fullscale.ImageFolderDataset(image_root, "train", size=8)
    with pytest.raises(ImportError, match="pip install pillow"):
        ds[0]


def test_image_folder_decodes(image_root):
    image_mod = pytest.importorskip("PIL.Image")
    # 20x10 image: left half red, right half blue
    array = np.zeros((10, 20, 3), dtype=np.uint8)
    array[:, :10, 0] = 255
    array[:, 10:, 2] = 255
    image_mod.fromarray(array).save(image_root / "train" / "n01" / "z.jpg", format="PNG")
    image_mod.fromarray(array[:, :, ::-1].copy()).save(
        image_root / "train" / "n02" / "a.JPEG", format="JPEG", quality=95
    )
    (image_root / "train" / "n02" / "b.JPEG").write_bytes(b"not an image")
    ds = fullscale.ImageFolderDataset(image_root, "train", size=8, resize=8, mean=None, std=None)
    x, y = ds[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y == 0
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert x[0, :, 0].mean() > 0.9 and x[2, :, -1].mean() > 0.9  # red left, blue right
    x1, y1 = ds[1]
    assert x1.shape == (3, 8, 8) and y1 == 1 and x1[2, :, 0].mean() > 0.8
    normalized, _ = fullscale.ImageFolderDataset(image_root, "train", size=8)[0]
    assert normalized.min() < 0.0
    with pytest.raises(ValueError, match="cannot decode image"):
        ds[2]


# --------------------------------------------------------------------------- GLUE


def write_tsv(path, rows: list[list[str]], bom: bool = False) -> None:
    """Write a GLUE-style TSV: tab-separated, no quoting, optional UTF-8 byte-order mark."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join("\t".join(row) + "\n" for row in rows)
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode("utf-8"))


MNLI_TRAIN_HEADER = [
    "index",
    "promptID",
    "pairID",
    "genre",
    "sentence1_binary_parse",
    "sentence2_binary_parse",
    "sentence1_parse",
    "sentence2_parse",
    "sentence1",
    "sentence2",
    "label1",
    "gold_label",
]
MNLI_DEV_HEADER = [*MNLI_TRAIN_HEADER[:-1], "label2", "label3", "label4", "label5", "gold_label"]


def mnli_row(i: int, s1: str, s2: str, label: str, dev: bool = False) -> list[str]:
    parses = ["( x )"] * 4
    labels = [label] * (5 if dev else 1)
    return [str(i), "1", f"{i}e", "fiction", *parses, s1, s2, *labels, label]


def test_glue_mrpc(tmp_path):
    header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    write_tsv(
        tmp_path / "MRPC" / "train.tsv",
        [
            header,
            ["1", "702876", "702977", 'He said "yes".', "He agreed."],
            ["0", "2108705", "2108831", "Shares rose.", 'Shares "fell" sharply.'],
        ],
        bom=True,
    )
    write_tsv(tmp_path / "MRPC" / "dev.tsv", [header, ["1", "1", "2", "a", "b"]], bom=True)
    data = fullscale.load_glue("mrpc", tmp_path / "MRPC")
    assert data["text_a"] == ['He said "yes".', "Shares rose."]
    assert data["text_b"] == ["He agreed.", 'Shares "fell" sharply.']
    assert data["labels"].tolist() == [1, 0] and data["labels"].dtype == torch.int64
    assert data["classes"] == ["0", "1"]
    assert fullscale.load_glue("MRPC", tmp_path / "MRPC", split="dev")["labels"].tolist() == [1]


def test_glue_sst2(tmp_path):
    write_tsv(
        tmp_path / "train.tsv", [["sentence", "label"], ["a gorgeous film ", "1"], ["dull", "0"]]
    )
    data = fullscale.load_glue("sst-2", tmp_path)
    assert data["text_a"] == ["a gorgeous film ", "dull"] and data["text_b"] is None
    assert data["labels"].tolist() == [1, 0]


def test_glue_qnli(tmp_path):
    write_tsv(
        tmp_path / "dev.tsv",
        [
            ["index", "question", "sentence", "label"],
            ["0", "What is it?", "It is a test.", "entailment"],
            ["1", "Why?", "Because.", "not_entailment"],
        ],
    )
    data = fullscale.load_glue("qnli", tmp_path, split="dev")
    assert data["text_a"] == ["What is it?", "Why?"]
    assert data["text_b"] == ["It is a test.", "Because."]
    assert data["labels"].tolist() == [0, 1]


def test_glue_mnli(tmp_path):
    write_tsv(
        tmp_path / "train.tsv",
        [
            MNLI_TRAIN_HEADER,
            mnli_row(0, "A man sleeps.", "A person rests.", "entailment"),
            mnli_row(1, "A cat.", "A dog.", "contradiction"),
            mnli_row(2, "Rain.", "Clouds.", "neutral"),
        ],
    )
    write_tsv(
        tmp_path / "dev_matched.tsv", [MNLI_DEV_HEADER, mnli_row(9, "x", "y", "neutral", dev=True)]
    )
    write_tsv(
        tmp_path / "dev_mismatched.tsv",
        [MNLI_DEV_HEADER, mnli_row(8, "p", "q", "contradiction", dev=True)],
    )
    train = fullscale.load_glue("mnli", tmp_path)
    assert train["labels"].tolist() == [0, 2, 1]
    assert train["text_a"][1] == "A cat." and train["text_b"][1] == "A dog."
    assert train["classes"] == ["entailment", "neutral", "contradiction"]
    assert fullscale.load_glue("mnli", tmp_path, split="dev")["text_a"] == ["x"]
    assert fullscale.load_glue("mnli", tmp_path, split="dev_mismatched")["labels"].tolist() == [2]


def test_glue_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dev_matched.tsv"):
        fullscale.load_glue("mnli", tmp_path, split="dev")
    with pytest.raises(ValueError, match="unsupported GLUE task 'cola'"):
        fullscale.load_glue("cola", tmp_path)
    with pytest.raises(ValueError, match="unknown split 'dev_mismatched'"):
        fullscale.load_glue("sst2", tmp_path, split="dev_mismatched")
    with pytest.raises(ValueError, match="needs root"):
        fullscale.load_glue("sst2")
    write_tsv(tmp_path / "train.tsv", [["text", "label"], ["x", "1"]])
    with pytest.raises(ValueError, match="lacks the columns"):
        fullscale.load_glue("sst2", tmp_path)
    write_tsv(tmp_path / "train.tsv", [["sentence", "label"], ["x", "positive"]])
    with pytest.raises(ValueError, match=r"train.tsv:2: unknown label 'positive'"):
        fullscale.load_glue("sst2", tmp_path)
    write_tsv(tmp_path / "train.tsv", [["index", "question", "sentence", "label"], ["0", "q"]])
    with pytest.raises(ValueError, match=r"train.tsv:2: 2 fields, expected 4"):
        fullscale.load_glue("qnli", tmp_path)


def test_glue_hf_source_is_lazy(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(ImportError, match="pip install datasets"):
        fullscale.load_glue("sst2", source="hf")
    with pytest.raises(ValueError, match="'tsv' or 'hf'"):
        fullscale.load_glue("sst2", source="csv")


# --------------------------------------------------------------------------- OpenWebText


@pytest.fixture
def owt_root(tmp_path):
    np.arange(1000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    (np.arange(100, dtype=np.uint16) + 50000).tofile(tmp_path / "val.bin")
    return tmp_path


def test_openwebtext_memmaps(owt_root):
    data = fullscale.load_openwebtext(owt_root)
    assert isinstance(data["train"], np.memmap) and data["train"].dtype == np.uint16
    assert len(data["train"]) == 1000 and len(data["val"]) == 100
    assert int(data["val"][-1]) == 50099


def test_random_lm_batch(owt_root):
    tokens = fullscale.load_openwebtext(owt_root)["train"]
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()[1]  # noqa: NPY002
    x, y = fullscale.random_lm_batch(tokens, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state)  # noqa: NPY002
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # tokens are 0..999: targets are the next ids
    assert torch.equal(x[:, 1:], x[:, :-1] + 1)
    assert int(x.max()) + 1 <= 999
    x2, _ = fullscale.random_lm_batch(tokens, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)
    x3, _ = fullscale.random_lm_batch(tokens, 4, 16, torch.Generator().manual_seed(1))
    assert not torch.equal(x, x3)
    xt, yt = fullscale.random_lm_batch(torch.arange(50), 2, 49, torch.Generator().manual_seed(0))
    assert xt[0].tolist() == list(range(49)) and yt[0].tolist() == list(range(1, 50))
    with pytest.raises(ValueError, match="too few"):
        fullscale.random_lm_batch(tokens[:16], 1, 16, torch.Generator())


def test_token_bin_errors(owt_root):
    (owt_root / "val.bin").write_bytes(b"\x01\x02\x03")
    with pytest.raises(ValueError, match="3 bytes"):
        fullscale.load_openwebtext(owt_root)
    with pytest.raises(FileNotFoundError, match="missing token file"):
        fullscale.load_token_bin(owt_root / "nope.bin")
