"""Benchmark tasks: the registry, every offline task on its smoke budget, and the
full-scale tasks on tiny files written here in the real formats.

Offline tasks need the fetched stand-in data (``alsals-bench fetch``); a task whose data
is missing is skipped with the data layer's message (which names the fetch command).
"""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import pytest
import torch

from alsals_bench.data import DataNotFoundError
from alsals_bench.tasks import (
    CHECK_TASKS,
    LONG_FACTOR,
    OFFLINE_TASKS,
    TASKS,
    Budget,
    Task,
    TaskRun,
    get_task,
)
from alsals_bench.tasks.fullscale import DataLocationError

CPU = torch.device("cpu")
OFFLINE = ("digits-cnn", "fashion-resnet", "austen-gpt2", "minilm-finefood", "minilm-bbc")
OFFLINE += ("minilm-tweets",)
FULLSCALE = ("gpt2-owt", "bert-mrpc", "bert-sst2", "bert-qnli", "bert-mnli")
FULLSCALE += ("resnet34-cifar10", "resnet34-cifar100", "resnet50-imagenet")
CHECKS = ("tabular-mlp", "regression-mlp", "char-transformer")


def setup_or_skip(task: Task, seed: int, budget: Budget | None = None) -> TaskRun:
    """``task.setup`` on the CPU with the smoke budget; skip if its data is not fetched."""
    try:
        return task.setup(seed, budget or task.budget("smoke"), CPU)
    except DataNotFoundError as err:
        pytest.skip(f"{task.name}: data not fetched: {err}")


def to_list(batch) -> list[torch.Tensor]:
    """The tensors of a batch (tuples and dicts of tensors), flattened in a fixed order."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for key in sorted(batch) for t in to_list(batch[key])]
    return [t for item in batch for t in to_list(item)]


def same_batches(a, b) -> bool:
    ta, tb = to_list(a), to_list(b)
    return len(ta) == len(tb) and all(
        x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb, strict=True)
    )


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def check_run(task: Task, run: TaskRun) -> None:
    """One training step's worth of calls: batch, finite scalar loss with grad, evaluate."""
    run.model.train()
    batch = run.next_batch()
    loss = run.loss(run.model, batch)
    assert loss.dim() == 0 and loss.requires_grad and math.isfinite(loss.item())
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in run.model.parameters())
    modes = []  # the model's mode in every forward pass of the evaluation
    hook = run.model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    try:
        metrics = run.evaluate(run.model)
    finally:
        hook.remove()
    assert modes and not any(modes)  # evaluated in eval mode (BatchNorm statistics, no dropout)
    assert set(metrics) == set(task.metrics)
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())
    assert run.model.training  # evaluate restores training mode
    if "accuracy" in metrics:
        assert 0.0 <= metrics["accuracy"] <= 1.0


# --------------------------------------------------------------------------- registry


def test_registry():
    assert set(TASKS) == set(OFFLINE) | set(FULLSCALE) | set(CHECKS)
    assert OFFLINE_TASKS == OFFLINE and CHECK_TASKS == CHECKS
    for name, task in TASKS.items():
        assert task.name == name and get_task(name) is task
        assert task.suite == ("check" if name in CHECKS else "paper")
        assert task.domain in (("nlp", "image", "tabular") if name in CHECKS else ("nlp", "image"))
        # A small, sorted grid that brackets the paper's rate on both sides.
        grid = task.adam_grid
        assert list(grid) == sorted(set(grid)) and 3 <= len(grid) <= 7
        assert task.adam_lr in grid and grid[0] < task.adam_lr < grid[-1]
        assert "smoke" in task.budgets
        assert ("paper" in task.budgets) == (task.suite == "paper")
        if task.offline:
            assert "quick" in task.budgets
        for budget in task.budgets.values():
            assert budget.steps > 0 and budget.batch_size > 0 and budget.eval_every > 0
        is_gpt2 = "gpt2" in name
        assert all((b.warmup_steps > 0) == is_gpt2 for b in task.budgets.values()), name
        assert task.offline == (name in OFFLINE + CHECKS)
    assert TASKS["gpt2-owt"].budget("paper").warmup_steps == 2000
    quick = TASKS["austen-gpt2"].budget("quick")
    assert quick.warmup_steps == round(0.1 * quick.steps)
    for name in ("austen-gpt2", "gpt2-owt"):
        assert TASKS[name].adam_lr == 6e-4
    for name in ("minilm-finefood", "minilm-bbc", "minilm-tweets", "bert-mnli"):
        assert TASKS[name].adam_lr == 2e-5 and TASKS[name].domain == "nlp"
    for name in ("fashion-resnet", "resnet34-cifar10", "resnet50-imagenet"):
        assert TASKS[name].adam_lr == 1e-3 and TASKS[name].domain == "image"


def test_paper_budgets():
    for name in ("bert-mrpc", "bert-sst2", "bert-qnli", "bert-mnli"):
        paper = TASKS[name].budget("paper")
        assert paper.batch_size == 32 and paper.options["max_length"] == 256
        assert paper.steps == 5 * paper.eval_every  # five epochs, evaluated after each
    assert TASKS["bert-mrpc"].budget("paper").steps == 5 * (3668 // 32)
    for name in ("resnet34-cifar10", "resnet34-cifar100"):
        paper = TASKS[name].budget("paper")
        assert (paper.batch_size, paper.steps) == (128, 100 * (50000 // 128))
    paper = TASKS["resnet50-imagenet"].budget("paper")
    assert (paper.batch_size, paper.steps) == (128, 5 * (1281167 // 128))
    assert paper.options.get("image_size", 224) == 224
    paper = TASKS["gpt2-owt"].budget("paper")
    assert paper.options["size"] == "124M" and paper.options["block_size"] == 1024


def test_get_task_unknown_lists_names():
    match = "digits-cnn.*minilm-tweets.*gpt2-owt.*tabular-mlp.*char-transformer"
    with pytest.raises(KeyError, match=match) as info:
        get_task("cifar")
    assert "unknown task 'cifar'" in str(info.value)


# --------------------------------------------------------------------------- offline tasks


@pytest.mark.parametrize("name", OFFLINE + CHECKS)
def test_offline_task_smoke(name):
    task = TASKS[name]
    run = setup_or_skip(task, seed=0)
    check_run(task, run)
    # Same seed: same initial weights, same batches, same loss (dropout seeded too).
    first, second = setup_or_skip(task, seed=3), setup_or_skip(task, seed=3)
    assert same_weights(first.model, second.model)
    batches = [(first.next_batch(), second.next_batch()) for _ in range(3)]
    assert all(same_batches(a, b) for a, b in batches)
    torch.manual_seed(11)
    loss_a = first.loss(first.model, batches[0][0]).item()
    torch.manual_seed(11)
    loss_b = second.loss(second.model, batches[0][1]).item()
    assert loss_a == loss_b
    # Another seed: other weights (for fine-tuning, the new head) and other batches.
    other = setup_or_skip(task, seed=4)
    assert not same_weights(first.model, other.model)
    fresh = setup_or_skip(task, seed=3)
    assert not all(same_batches(fresh.next_batch(), other.next_batch()) for _ in range(3))


def test_offline_task_leaves_global_numpy_state_alone():
    state = np.random.get_state()  # noqa: NPY002 (the global state is the point)
    setup_or_skip(TASKS["fashion-resnet"], seed=0).next_batch()
    assert np.array_equal(np.random.get_state()[1], state[1])  # noqa: NPY002


def test_austen_vocabulary_and_split():
    from alsals_bench.tasks.austen_gpt2 import austen_corpus

    setup_or_skip(TASKS["austen-gpt2"], seed=0)
    corpus = austen_corpus()
    n_vocab = len(corpus["vocab"])
    assert 15_000 < n_vocab < 16_000 and 50256 in corpus["vocab"].tolist()
    train, val = corpus["train"], corpus["val"]
    assert len(val) == 6 and int(train.min()) >= 0 and int(train.max()) < n_vocab
    n_val = sum(len(v) for v in val)
    assert 0.04 < n_val / (n_val + len(train)) < 0.06
    assert int((train == corpus["eot"]).sum()) == 5  # between the six books


def test_check_tasks_data_are_fixed_and_adam_decays_on_them():
    """The generated data do not depend on the run's seed (only the model and the batch
    order do), and Adam's baseline on a check task is the warm-up + cosine a user tunes."""
    from alsals_bench.registry import paper_adam_schedule

    for name in ("tabular-mlp", "regression-mlp"):
        task = TASKS[name]
        a, b = setup_or_skip(task, seed=0), setup_or_skip(task, seed=5)
        # The evaluation on the same model is the evaluation on the same test set.
        b.model.load_state_dict(a.model.state_dict())
        assert a.evaluate(a.model) == b.evaluate(b.model)
        opt = torch.optim.Adam(a.model.parameters(), lr=1e-3)
        schedule = paper_adam_schedule(opt, task, task.budget("quick"))
        assert schedule is not None
        rates = []
        for _ in range(task.budget("quick").steps):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            schedule.step()
        peak = rates.index(max(rates))
        assert peak == round(0.1 * len(rates)) - 1 and rates[-1] < 1e-3 * max(rates)


def test_char_transformer_vocabulary_and_split():
    from alsals_bench.tasks.checks import austen_characters

    run = setup_or_skip(TASKS["char-transformer"], seed=0)
    chars = austen_characters()
    assert 60 < len(chars["vocab"]) < 120 and "\n" in chars["vocab"]
    train, val = chars["train"], chars["val"]
    n_val = sum(len(v) for v in val)
    assert len(val) == 6 and 0.04 < n_val / (n_val + len(train)) < 0.06
    assert int(train.max()) < len(chars["vocab"]) and all(
        int(v.max()) < len(chars["vocab"]) for v in val
    )
    x, y = run.next_batch()
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one


def test_quick_budgets_are_small():
    for name in OFFLINE:
        quick = TASKS[name].budget("quick")
        assert quick.steps <= 400 and quick.eval_every <= quick.steps


def test_long_budgets_are_quick_five_times_as_long_with_schedules_scaled():
    from alsals_bench.registry import get_optimizer, paper_adam_schedule

    assert LONG_FACTOR == 5
    for name in OFFLINE + CHECKS:
        task = TASKS[name]
        quick, long = task.budget("quick"), task.budget("long")
        assert long.steps == 5 * quick.steps
        assert long.warmup_steps == 5 * quick.warmup_steps
        assert long.eval_every == 5 * quick.eval_every  # as many evaluations
        assert (long.batch_size, long.options) == (quick.batch_size, quick.options)
        assert long.options is not quick.options
        # Every schedule that follows the step count keeps its shape: the rate at step
        # 5k of the long run is the rate at step k of the quick run (past the warm-up).
        for optimizer in ("adam", "adamw-cosine"):
            spec = get_optimizer(optimizer)
            rates = {}
            for budget in (quick, long):
                stepper = spec.build(torch.nn.Linear(2, 1), task, budget)
                lrs = []
                for _ in range(budget.steps):
                    lrs.append(stepper.optimizer.param_groups[0]["lr"])
                    stepper.optimizer.step()  # no gradients: nothing moves
                    if stepper.scheduler is not None:
                        stepper.scheduler.step()
                rates[budget.steps] = lrs
            for k in range(quick.steps // 5, quick.steps, quick.steps // 5):
                assert rates[long.steps][5 * k] == pytest.approx(rates[quick.steps][k], abs=1e-12)
        if get_optimizer("schedulefree").available():  # its warm-up: 5% of the steps
            warmups = [
                get_optimizer("schedulefree").build(torch.nn.Linear(2, 1), task, budget)
                for budget in (quick, long)
            ]
            quick_warmup, long_warmup = (
                w.optimizer.param_groups[0]["warmup_steps"] for w in warmups
            )
            assert long_warmup == pytest.approx(5 * quick_warmup, abs=5)
    assert all("long" not in TASKS[n].budgets for n in TASKS if n not in OFFLINE + CHECKS)
    # the Adam schedule's warm-up scales with the task's (GPT-2: 16 -> 80 steps)
    gpt2 = TASKS["austen-gpt2"]
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([param], lr=1.0)
    schedule = paper_adam_schedule(opt, gpt2, gpt2.budget("long"))
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert lrs[79] == pytest.approx(1.0) and lrs[39] == pytest.approx(0.5)


# --------------------------------------------------------------------------- full scale


def test_fullscale_tasks_name_their_env_var(monkeypatch):
    for var in ("ALSALS_OWT_DIR", "ALSALS_GLUE_DIR", "ALSALS_CIFAR_DIR", "ALSALS_IMAGENET_DIR"):
        monkeypatch.delenv(var, raising=False)
    expected = {
        "gpt2-owt": "ALSALS_OWT_DIR",
        "bert-sst2": "ALSALS_GLUE_DIR",
        "resnet34-cifar10": "ALSALS_CIFAR_DIR",
        "resnet50-imagenet": "ALSALS_IMAGENET_DIR",
    }
    for name, var in expected.items():
        with pytest.raises(DataLocationError, match=var):
            TASKS[name].setup(0, TASKS[name].budget("smoke"), CPU)


def check_fullscale(task: Task, budget: Budget | None = None) -> TaskRun:
    """Smoke-check a full-scale task, and that two setups with one seed agree."""
    budget = budget or task.budget("smoke")
    run = task.setup(0, budget, CPU)
    check_run(task, run)
    first, second = task.setup(0, budget, CPU), task.setup(0, budget, CPU)
    assert same_weights(first.model, second.model)
    assert same_batches(first.next_batch(), second.next_batch())
    return first


def test_gpt2_owt(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    rng.integers(0, 50257, 500).astype(np.uint16).tofile(tmp_path / "train.bin")
    rng.integers(0, 50257, 100).astype(np.uint16).tofile(tmp_path / "val.bin")
    monkeypatch.setenv("ALSALS_OWT_DIR", str(tmp_path))
    run = check_fullscale(TASKS["gpt2-owt"])
    x, y = run.next_batch()
    assert x.shape == y.shape == (2, 16) and x.dtype == torch.int64
    assert run.model.config.vocab_size == 50257


def write_cifar(path, n: int, label_key: bytes, n_classes: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    batch = {
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: rng.integers(0, n_classes, n).tolist(),
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))


def test_resnet34_cifar(tmp_path, monkeypatch):
    ten, hundred = tmp_path / "cifar-10-batches-py", tmp_path / "cifar-100-python"
    ten.mkdir()
    hundred.mkdir()
    for i in range(1, 6):
        write_cifar(ten / f"data_batch_{i}", 4, b"labels", 10, i)
    write_cifar(ten / "test_batch", 6, b"labels", 10, 9)
    for split, n in (("train", 12), ("test", 6)):
        write_cifar(hundred / split, n, b"fine_labels", 100, n)
    monkeypatch.setenv("ALSALS_CIFAR_DIR", str(tmp_path))
    run = check_fullscale(TASKS["resnet34-cifar10"])
    x, y = run.next_batch()
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    assert run.model.fc.out_features == 10
    task = TASKS["resnet34-cifar100"]  # same code path: check the data and the head only
    run = task.setup(0, task.budget("smoke"), CPU)
    x, y = run.next_batch()
    assert x.shape == (4, 3, 32, 32) and run.model.fc.out_features == 100
    assert int(y.min()) >= 0 and int(y.max()) < 100


def write_tsv(path, rows: list[list[str]]) -> None:
    path.write_text("".join("\t".join(row) + "\n" for row in rows), encoding="utf-8")


WORDS = [
    "the",
    "a",
    "movie",
    "film",
    "good",
    "bad",
    "great",
    "awful",
    "is",
    "was",
    "not",
    "it",
    "and",
    "what",
    "who",
]


@pytest.fixture
def tiny_bert(tmp_path_factory):
    """A 1-layer, 16-wide BERT and its WordPiece vocabulary, saved like a hub checkpoint."""
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("bert")
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    (folder / "vocab.txt").write_text("\n".join(special + WORDS) + "\n", encoding="utf-8")
    config = transformers.BertConfig(
        vocab_size=len(special) + len(WORDS),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(folder)
    return folder


def sentence(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))


def write_glue(root) -> None:
    rng = np.random.default_rng(0)
    (root / "MRPC").mkdir()
    (root / "SST-2").mkdir()
    (root / "QNLI").mkdir()
    (root / "MNLI").mkdir()
    mrpc = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
    for split, n in (("train", 10), ("dev", 5)):
        rows = [[str(i % 2), "1", "2", sentence(rng), sentence(rng)] for i in range(n)]
        write_tsv(root / "MRPC" / f"{split}.tsv", [mrpc, *rows])
        rows = [[sentence(rng), str(i % 2)] for i in range(n)]
        write_tsv(root / "SST-2" / f"{split}.tsv", [["sentence", "label"], *rows])
        labels = ("entailment", "not_entailment")
        rows = [[str(i), sentence(rng), sentence(rng), labels[i % 2]] for i in range(n)]
        write_tsv(
            root / "QNLI" / f"{split}.tsv", [["index", "question", "sentence", "label"], *rows]
        )
    header = ["index", "sentence1", "sentence2", "gold_label"]
    labels = ("entailment", "neutral", "contradiction")
    for name, n in (("train.tsv", 10), ("dev_matched.tsv", 5)):
        rows = [[str(i), sentence(rng), sentence(rng), labels[i % 3]] for i in range(n)]
        write_tsv(root / "MNLI" / name, [header, *rows])


def test_bert_glue(tmp_path, tiny_bert, monkeypatch):
    write_glue(tmp_path)
    monkeypatch.setenv("ALSALS_GLUE_DIR", str(tmp_path))
    monkeypatch.setenv("ALSALS_BERT_PATH", str(tiny_bert))
    for name, labels in (("bert-mrpc", 2), ("bert-sst2", 2), ("bert-qnli", 2), ("bert-mnli", 3)):
        run = check_fullscale(TASKS[name])
        assert run.model.config.num_labels == labels
        inputs, y = run.next_batch()
        assert inputs["input_ids"].shape[0] == 4 and inputs["input_ids"].shape[1] <= 32
        assert (inputs["input_ids"] == 1).sum() == 0  # every word is in the vocabulary
        if name == "bert-mrpc":  # sentence pairs: segment ids 0 then 1
            assert inputs["token_type_ids"].max() == 1


def test_bert_model_path_error(tmp_path, monkeypatch):
    write_glue(tmp_path)
    monkeypatch.setenv("ALSALS_GLUE_DIR", str(tmp_path))
    monkeypatch.setenv("ALSALS_BERT_PATH", str(tmp_path / "no-such-model"))
    with pytest.raises(DataLocationError, match="ALSALS_BERT_PATH"):
        TASKS["bert-sst2"].setup(0, TASKS["bert-sst2"].budget("smoke"), CPU)


def test_resnet50_imagenet(tmp_path, monkeypatch):
    """Real PNGs when Pillow is installed; otherwise the files are listed for real and
    decoding is stubbed, so the task's own pipeline is still exercised."""
    from alsals_bench.data.fullscale import ImageFolderDataset

    try:
        from PIL import Image
    except ImportError:
        Image = None

        def fake_load(self, path):
            seed = sum(path.name.encode())
            return torch.rand(
                3, self.size, self.size, generator=torch.Generator().manual_seed(seed)
            )

        monkeypatch.setattr(ImageFolderDataset, "_load", fake_load)
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 3), ("val", 1)):
        for name in ("n01", "n02"):
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                path = folder / f"img{i}.png"
                if Image is None:
                    path.write_bytes(b"")
                else:
                    pixels = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
                    Image.fromarray(pixels).save(path)
    monkeypatch.setenv("ALSALS_IMAGENET_DIR", str(tmp_path))
    task = TASKS["resnet50-imagenet"]
    budget = dataclasses.replace(
        task.budget("smoke"), options={**task.budget("smoke").options, "eval_size": None}
    )
    run = check_fullscale(task, budget)
    x, y = run.next_batch()
    assert x.shape == (2, 3, 32, 32) and y.dtype == torch.int64
    assert run.model.fc.out_features == 2


def test_task_groups_on_the_command_line():
    """``offline`` is the paper's six (the tables of #11 are over them), ``checks`` the check
    tasks, ``fullscale`` the GPU experiments; names and groups mix, duplicates dropped."""
    from alsals_bench.cli import _tasks

    assert _tasks(["offline"]) == list(OFFLINE)
    assert _tasks(["checks"]) == list(CHECKS)
    assert _tasks(["fullscale"]) == list(FULLSCALE)
    assert _tasks(["digits-cnn,checks", "tabular-mlp"]) == ["digits-cnn", *CHECKS]
    with pytest.raises(KeyError, match="check tasks: tabular-mlp"):
        _tasks(["tabular"])
