"""Loaders for the paper's real datasets, for users who have downloaded them.

None of these datasets can be obtained on the benchmark machines; point the
loaders at your own copies in their official formats:

- CIFAR-10 / CIFAR-100: the "python version" archives (pickled batches).
- ImageNet: an image folder ``root/<split>/<class>/<image>``.
- GLUE MRPC, SST-2, QNLI, MNLI: the official TSV files (or Hugging Face ``datasets``).
- OpenWebText: nanoGPT's ``train.bin`` / ``val.bin`` (flat uint16 GPT-2 token ids).

Nothing here uses the global random state: ``random_lm_batch`` takes a generator.
"""

from __future__ import annotations

import csv
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

PathLike = str | os.PathLike[str]

# --------------------------------------------------------------------------- CIFAR

# What a CIFAR pickle may reference: numpy array reconstruction and bytes decoding.
# Anything else (e.g. os.system in a tampered file) is refused instead of executed.
_PICKLE_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler restricted to the globals CIFAR batches need."""

    def find_class(self, module: str, name: str) -> Any:
        """Resolve allowed numpy globals (mapping numpy.core to numpy 2's numpy._core)."""
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        if module.startswith("numpy.core") and hasattr(np, "_core"):
            module = "numpy._core" + module[len("numpy.core") :]
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Read one pickled CIFAR batch: uint8 data [N,3072] and its labels."""
    if not path.is_file():
        raise FileNotFoundError(f"missing CIFAR batch {path}")
    try:
        with path.open("rb") as f:
            batch = _CifarUnpickler(f, encoding="bytes").load()
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[label_key], dtype=np.int64)
    except Exception as err:  # garbled bytes can fail in many ways; all mean "not a batch"
        raise ValueError(f"{path} is not a CIFAR python batch with {label_key!r}: {err!r}") from err
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(f"{path}: data is {data.dtype} {data.shape}, expected uint8 [N, 3072]")
    if labels.shape != (len(data),):
        raise ValueError(f"{path}: {len(labels)} labels for {len(data)} images")
    return data, labels


def _cifar(folder: Path, files: dict[str, list[str]], label_key: bytes, n_classes: int) -> dict:
    """Stack the batches of each split into uint8 [N,3,32,32] images + int64 labels."""
    out: dict[str, torch.Tensor] = {}
    for split, names in files.items():
        parts = [_read_cifar_batch(folder / name, label_key) for name in names]
        data = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
            raise ValueError(f"{folder}: {split} labels outside [0, {n_classes})")
        out[f"x_{split}"] = torch.from_numpy(data.reshape(-1, 3, 32, 32))
        out[f"y_{split}"] = torch.from_numpy(labels)
    return out


def _find_dir(root: PathLike, name: str) -> Path:
    """``root/name`` if it exists, else ``root`` itself (users pass either)."""
    root = Path(root).expanduser()
    return root / name if (root / name).is_dir() else root


def load_cifar10(root: PathLike) -> dict[str, torch.Tensor]:
    """CIFAR-10 from the official python archive (``cifar-10-batches-py``).

    ``root`` is that folder or its parent. Returns ``x_train`` uint8 [50000,3,32,32],
    ``y_train`` int64, ``x_test`` [10000,3,32,32], ``y_test``.
    """
    folder = _find_dir(root, "cifar-10-batches-py")
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    return _cifar(folder, files, b"labels", 10)


def load_cifar100(root: PathLike, labels: str = "fine") -> dict[str, torch.Tensor]:
    """CIFAR-100 from the official python archive (``cifar-100-python``: ``train``, ``test``).

    ``labels`` picks the 100 ``"fine"`` classes (the paper's) or 20 ``"coarse"`` ones.
    """
    if labels not in ("fine", "coarse"):
        raise ValueError(f"labels must be 'fine' or 'coarse', got {labels!r}")
    folder = _find_dir(root, "cifar-100-python")
    key = b"fine_labels" if labels == "fine" else b"coarse_labels"
    return _cifar(
        folder, {"train": ["train"], "test": ["test"]}, key, 100 if labels == "fine" else 20
    )


# --------------------------------------------------------------------------- ImageNet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".ppm", ".webp")


def _pil_image():
    """Import ``PIL.Image`` lazily: Pillow is only needed for image folders."""
    try:
        from PIL import Image
    except ImportError as err:
        raise ImportError(
            "ImageFolderDataset needs Pillow to decode images: pip install pillow"
        ) from err
    return Image


class ImageFolderDataset(Dataset):
    """ImageNet-style folder ``root/<split>/<class>/<image>`` as (float image, label) pairs.

    Files are listed sorted, so the order is the same on every machine. Class indices
    follow the sorted class folder names of the split, or ``classes`` if given (pass
    the training set's ``classes`` to a validation set that lacks some folders).
    Images are converted to RGB, resized so the shorter side is ``resize`` (default
    ``size / 0.875``), center-cropped to ``size`` and returned as float32 [3,size,size]
    in [0, 1], then normalized by ``mean``/``std`` unless those are None.
    """

    def __init__(
        self,
        root: PathLike,
        split: str = "train",
        size: int = 224,
        resize: int | None = None,
        classes: Sequence[str] | None = None,
        mean: Sequence[float] | None = IMAGENET_MEAN,
        std: Sequence[float] | None = IMAGENET_STD,
    ) -> None:
        folder = Path(root).expanduser() / split
        if not folder.is_dir():
            raise FileNotFoundError(f"no image folder {folder} (expected {folder}/<class>/<image>)")
        found = sorted(p.name for p in folder.iterdir() if p.is_dir())
        self.classes = list(classes) if classes is not None else found
        unknown = set(found) - set(self.classes)
        if unknown:
            raise ValueError(f"{folder} has class folders not in `classes`: {sorted(unknown)[:5]}")
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples = [
            (path, self.class_to_idx[name])
            for name in found
            for path in sorted((folder / name).iterdir())
            if path.suffix.lower() in IMAGE_EXTENSIONS
        ]
        if not self.samples:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
        self.size = size
        self.resize = resize if resize is not None else round(size / 0.875)
        if self.resize < size:
            raise ValueError(f"resize={self.resize} is smaller than the crop size {size}")
        self._normalize = (
            None
            if mean is None or std is None
            else (torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1))
        )

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = self._load(path)
        if self._normalize is not None:
            mean, std = self._normalize
            image = (image - mean) / std
        return image, label

    def _load(self, path: Path) -> torch.Tensor:
        """Decode, resize the shorter side, center-crop, scale to [0, 1]."""
        image_mod = _pil_image()
        try:
            with image_mod.open(path) as img:
                img = img.convert("RGB")
        except OSError as err:
            raise ValueError(f"cannot decode image {path}: {err}") from err
        width, height = img.size
        scale = self.resize / min(width, height)
        new_w, new_h = max(self.size, round(width * scale)), max(self.size, round(height * scale))
        img = img.resize((new_w, new_h), image_mod.Resampling.BILINEAR)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        img = img.crop((left, top, left + self.size, top + self.size))
        array = np.asarray(img, dtype=np.uint8)
        return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


# --------------------------------------------------------------------------- GLUE


@dataclass(frozen=True)
class GlueTask:
    """Where a GLUE task's TSV columns and Hugging Face fields are, and its label order."""

    text_a: str
    text_b: str | None
    label: str
    classes: tuple[str, ...]  # label strings in Hugging Face's id order
    hf_text_a: str
    hf_text_b: str | None
    dev_file: str = "dev.tsv"


GLUE_TASKS: dict[str, GlueTask] = {
    "mrpc": GlueTask("#1 String", "#2 String", "Quality", ("0", "1"), "sentence1", "sentence2"),
    "sst2": GlueTask("sentence", None, "label", ("0", "1"), "sentence", None),
    "qnli": GlueTask(
        "question", "sentence", "label", ("entailment", "not_entailment"), "question", "sentence"
    ),
    "mnli": GlueTask(
        "sentence1",
        "sentence2",
        "gold_label",
        ("entailment", "neutral", "contradiction"),
        "premise",
        "hypothesis",
        dev_file="dev_matched.tsv",
    ),
}
_HF_SPLITS = {"train": "train", "dev": "validation"}
_HF_MNLI_SPLITS = {"dev": "validation_matched", "dev_mismatched": "validation_mismatched"}


def _glue_task(task: str) -> GlueTask:
    """Look up a GLUE task by name (``sst-2`` and ``SST2`` both mean ``sst2``)."""
    key = task.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unsupported GLUE task {task!r}; choose from {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def _glue_file(task: str, spec: GlueTask, split: str) -> str:
    """The TSV file name of a split: train.tsv, dev.tsv, or MNLI's dev_(mis)matched.tsv."""
    if split == "train":
        return "train.tsv"
    if split == "dev":
        return spec.dev_file
    if split == "dev_mismatched" and spec.dev_file == "dev_matched.tsv":
        return "dev_mismatched.tsv"
    raise ValueError(f"unknown split {split!r} for GLUE {task}")


def _read_glue_tsv(path: Path, spec: GlueTask) -> dict[str, Any]:
    """Parse an official GLUE TSV by its header (quotes are literal text, not quoting)."""
    if not path.is_file():
        raise FileNotFoundError(f"missing GLUE file {path}")
    # utf-8-sig: the MRPC files start with a byte-order mark.
    with path.open(encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(rows, None)
        wanted = [c for c in (spec.text_a, spec.text_b, spec.label) if c is not None]
        if header is None or not set(wanted) <= set(header):
            raise ValueError(f"{path}: header {header} lacks the columns {wanted}")
        col = {name: header.index(name) for name in wanted}
        label_id = {name: i for i, name in enumerate(spec.classes)}
        text_a, text_b, labels = [], [], []
        for line, row in enumerate(rows, start=2):
            if len(row) < len(header):
                raise ValueError(f"{path}:{line}: {len(row)} fields, expected {len(header)}")
            if row[col[spec.label]] not in label_id:
                raise ValueError(f"{path}:{line}: unknown label {row[col[spec.label]]!r}")
            text_a.append(row[col[spec.text_a]])
            if spec.text_b is not None:
                text_b.append(row[col[spec.text_b]])
            labels.append(label_id[row[col[spec.label]]])
    return {
        "text_a": text_a,
        "text_b": text_b if spec.text_b is not None else None,
        "labels": torch.tensor(labels, dtype=torch.int64),
        "classes": list(spec.classes),
    }


def _load_glue_hf(task: str, spec: GlueTask, split: str) -> dict[str, Any]:
    """The same dict from Hugging Face ``datasets`` (downloads: needs network or its cache)."""
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError("source='hf' needs Hugging Face datasets: pip install datasets") from err
    splits = {**_HF_SPLITS, **_HF_MNLI_SPLITS} if task == "mnli" else _HF_SPLITS
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for GLUE {task}")
    data = load_dataset("glue", task, split=splits[split])
    return {
        "text_a": list(data[spec.hf_text_a]),
        "text_b": list(data[spec.hf_text_b]) if spec.hf_text_b is not None else None,
        "labels": torch.tensor(data["label"], dtype=torch.int64),
        "classes": list(spec.classes),
    }


def load_glue(
    task: str, root: PathLike | None = None, split: str = "train", source: str = "tsv"
) -> dict[str, Any]:
    """One split of a GLUE task (``mrpc``, ``sst2``, ``qnli``, ``mnli``).

    With ``source="tsv"`` reads ``root/train.tsv`` or the dev file (``dev.tsv``;
    MNLI: ``dev_matched.tsv``, or ``dev_mismatched.tsv`` for ``split="dev_mismatched"``);
    ``root`` is the task folder of the official GLUE download (e.g. ``glue_data/MRPC``).
    With ``source="hf"`` uses ``datasets.load_dataset("glue", task)``. Returns
    ``text_a`` (list of str), ``text_b`` (list, or None for SST-2), ``labels`` (int64,
    numbered as in Hugging Face: MNLI entailment/neutral/contradiction = 0/1/2, QNLI
    entailment = 0) and ``classes``. GLUE test files are unlabelled, so not loadable.
    """
    spec = _glue_task(task)
    name = task.lower().replace("-", "")
    if source == "hf":
        return _load_glue_hf(name, spec, split)
    if source != "tsv":
        raise ValueError(f"source must be 'tsv' or 'hf', got {source!r}")
    if root is None:
        raise ValueError("source='tsv' needs root: the task folder holding the GLUE TSV files")
    return _read_glue_tsv(Path(root).expanduser() / _glue_file(name, spec, split), spec)


# --------------------------------------------------------------------------- OpenWebText


def load_token_bin(path: PathLike) -> np.memmap:
    """Memory-map a nanoGPT token file: a flat array of uint16 GPT-2 token ids."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"missing token file {path} (nanoGPT's prepare.py writes it)")
    size = path.stat().st_size
    if size == 0 or size % 2:
        raise ValueError(f"{path} has {size} bytes; a uint16 token file has a positive even size")
    return np.memmap(path, dtype=np.uint16, mode="r")


def load_openwebtext(root: PathLike) -> dict[str, np.memmap]:
    """OpenWebText in nanoGPT's format: ``{"train": memmap, "val": memmap}`` of uint16 ids."""
    root = Path(root).expanduser()
    return {split: load_token_bin(root / f"{split}.bin") for split in ("train", "val")}


def random_lm_batch(
    tokens: np.ndarray | torch.Tensor,
    batch_size: int,
    block_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` random windows: inputs x and next-token targets y, int64 [B, T].

    Window starts are drawn from ``generator`` only, so the global RNG is untouched
    and the same seed gives the same batches. Works on memmaps, arrays and tensors.
    """
    if len(tokens) <= block_size:
        raise ValueError(f"{len(tokens)} tokens is too few for block_size={block_size}")
    starts = torch.randint(len(tokens) - block_size, (batch_size,), generator=generator).tolist()
    windows = [
        torch.as_tensor(np.asarray(tokens[s : s + block_size + 1]).astype(np.int64)) for s in starts
    ]
    batch = torch.stack(windows)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
