"""Hugging Face Trainer: fine-tune the pretrained MiniLM (offline) with LineSearchTrainer.

The model is the real all-MiniLM-L6-v2 checkpoint, cut to its first 2 layers and with the
word embeddings frozen to keep the test to seconds on a CPU (every trial moves all trained
weights). Checks: a resumed run ends on exactly the weights of an uninterrupted one;
trial evaluations reproduce the gradient evaluation's loss at the starting weights
(same dropout masks, same gradient-accumulation scaling); gradient accumulation over 2
micro-batches takes the steps one batch of twice the size takes; the logged
``learning_rate`` is the step size.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (  # noqa: E402
    AutoModelForSequenceClassification,
    AutoTokenizer,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from alsals import ALSALS, SLS, AdamSLS, MomentumALSALS  # noqa: E402
from alsals.integrations.hf import (  # noqa: E402
    FollowStepSize,
    LineSearchTrainer,
    LineSearchTrainerMixin,
)

pytestmark = pytest.mark.slow

POSITIVE = [
    "a wonderful film", "I loved every minute of it", "great acting and a clever plot",
    "truly delightful", "the best movie this year", "warm, funny and moving",
    "an excellent cast", "beautifully shot and scored",
]  # fmt: skip
NEGATIVE = [
    "a boring mess", "I hated every minute of it", "terrible acting and a silly plot",
    "truly awful", "the worst movie this year", "cold, dull and slow",
    "a wasted cast", "badly shot and scored",
]  # fmt: skip


@pytest.fixture(scope="module")
def model_path():
    try:
        from alsals_bench.data.offline import minilm_path

        return minilm_path()
    except (ImportError, FileNotFoundError) as error:
        pytest.skip(
            "the offline MiniLM checkpoint is not available "
            f"(python -m alsals_bench.data.fetch --only minilm): {error}"
        )


@pytest.fixture(scope="module")
def dataset(model_path):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    texts = POSITIVE + NEGATIVE
    labels = [1] * len(POSITIVE) + [0] * len(NEGATIVE)
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=16)
    return [
        {
            "input_ids": torch.tensor(enc["input_ids"][i]),
            "attention_mask": torch.tensor(enc["attention_mask"][i]),
            "labels": torch.tensor(labels[i]),
        }
        for i in range(len(texts))
    ]


def make_model(path, dropout: bool = True):
    transformers.set_seed(0)  # the classification head is new: same init every time
    extra = {} if dropout else {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    model = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=2, num_hidden_layers=2, **extra
    )
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    return model


def make_args(out, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(out),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


class Record(TrainerCallback):
    """Per step: step size, and the closure's trial value at the starting weights."""

    def __init__(self, check_replay: bool = False) -> None:
        self.trainer = None
        self.check_replay = check_replay
        self.step_sizes: list[float] = []
        self.replays: list[tuple[float, float]] = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.check_replay:
            closure = self.trainer._line_search_closure()
            with torch.no_grad():
                trial = closure(backward=False).item()
            self.replays.append((closure(backward=True).item(), trial))

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.step_sizes.append(self.trainer.optimizer.param_groups[0]["lr"])


def train(
    model_path, dataset, out, *, dropout=True, mean_loss=False, check_replay=False, resume=None,
    **args,
):  # fmt: skip
    model = make_model(model_path, dropout=dropout)
    if mean_loss:
        # BertForSequenceClassification takes **kwargs but its loss ignores
        # num_items_in_batch, so by default the Trainer does not divide by the accumulation
        # steps and the objective is their sum. The line search follows whichever objective
        # the Trainer backpropagates (the other test covers that default); here it is the
        # mean, so both runs minimise the same numbers.
        model.accepts_loss_kwargs = False
    record = Record(check_replay=check_replay)
    trainer = LineSearchTrainer(
        model=model,
        args=make_args(out, **args),
        train_dataset=dataset,
        optimizer_cls_and_kwargs=(MomentumALSALS, {"lr": 1e-3, "slope": "analytic"}),
        callbacks=[record],
    )
    record.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    return trainer, record


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def tiny_bert():
    """A small random BERT classifier (no checkpoint), seeded."""
    from transformers import BertConfig, BertForSequenceClassification

    transformers.set_seed(0)
    config = BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, num_labels=2,
    )  # fmt: skip
    return BertForSequenceClassification(config)


def test_resume_from_checkpoint_equals_uninterrupted_run(model_path, dataset, tmp_path):
    straight, record = train(
        model_path,
        dataset,
        tmp_path / "straight",
        check_replay=True,
        save_strategy="steps",
        save_steps=2,
    )
    checkpoint = tmp_path / "straight" / "checkpoint-2"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "scheduler.pt").exists()
    assert isinstance(straight.lr_scheduler, FollowStepSize)
    optimizer = straight.optimizer.optimizer  # inside accelerate's wrapper
    assert isinstance(optimizer, MomentumALSALS) and optimizer.last_step.kind == "search"
    assert optimizer.state[optimizer.param_groups[0]["params"][0]]["line_search"]["step"] == 3

    # each trial re-evaluates the window with its dropout masks and its 1/2 scaling: at the
    # starting weights it reproduces the loss the gradients came from, to the last bit
    assert len(record.replays) == 3
    for window_loss, trial in record.replays:
        assert trial == window_loss

    # the logged learning_rate is the step size the line search ended each step with
    logged = [h["learning_rate"] for h in straight.state.log_history if "learning_rate" in h]
    assert logged == record.step_sizes and len(set(logged)) == 3

    resumed, _ = train(model_path, dataset, tmp_path / "resumed", resume=str(checkpoint))
    assert resumed.state.global_step == 3
    final, again = weights(straight.model), weights(resumed.model)
    assert final.keys() == again.keys()
    for name in final:
        assert torch.equal(final[name], again[name]), name
    # the optimizer's state (moments and line-search state) continued from the checkpoint
    ours, theirs = resumed.optimizer.optimizer.state_dict(), optimizer.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for index, entry in theirs["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(ours["state"][index][key], value), (index, key)
            else:
                assert ours["state"][index][key] == value, (index, key)


def test_gradient_accumulation_matches_one_batch_of_twice_the_size(model_path, dataset, tmp_path):
    runs = {}
    for name, batch, accumulate in (("accumulated", 4, 2), ("whole", 8, 1)):
        trainer, record = train(
            model_path,
            dataset,
            tmp_path / name,
            dropout=False,
            mean_loss=True,
            max_steps=2,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulate,
        )
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        assert trainer.optimizer.optimizer.last_step.kind == "search"
        runs[name] = (weights(trainer.model), record.step_sizes, losses)
    (w_acc, steps_acc, loss_acc), (w_one, steps_one, loss_one) = runs.values()
    # same decisions and losses; the weights agree to rounding (summing 2 x 4 examples or
    # 8 differs in the last bits, which Adam's normalisation lifts for near-zero gradients;
    # atol is 1 % of one step of size 1e-3)
    assert steps_acc == pytest.approx(steps_one, rel=1e-6)
    assert loss_acc == pytest.approx(loss_one, rel=1e-5)
    for name in w_one:
        torch.testing.assert_close(w_acc[name], w_one[name], rtol=1e-4, atol=1e-5)


def test_user_optimizer_instance_and_wrong_optimizer(model_path, dataset, tmp_path):
    model = make_model(model_path, dropout=False)
    with pytest.raises(TypeError, match="alsals line-search optimizer.*got SGD"):
        LineSearchTrainer(
            model=model,
            args=make_args(tmp_path),
            train_dataset=dataset,
            optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
        )
    with pytest.raises(TypeError, match="got AdamW; use transformers.Trainer"):  # (a class)
        LineSearchTrainer(
            model=model,
            args=make_args(tmp_path),
            train_dataset=dataset,
            optimizer_cls_and_kwargs=(torch.optim.AdamW, {}),
        ).create_optimizer()
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainer = LineSearchTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=1),
        train_dataset=dataset,
        optimizers=(AdamSLS(trainable, lr=1e-3), None),
    )
    before = weights(model)
    trainer.train()
    assert trainer.optimizer.optimizer.last_step.kind == "search"
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    # a factory whose result is a line-search optimizer: the paper's configuration (its
    # name, a method, was refused as "use transformers.Trainer for others")
    trainer = LineSearchTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=1),
        train_dataset=dataset,
        optimizer_cls_and_kwargs=(ALSALS.paper, {"lr": 1e-3}),
    )
    trainer.train()
    held = trainer.optimizer.optimizer
    assert type(held) is MomentumALSALS and held.param_groups[0]["slope"] == "finite_difference"
    with pytest.raises(TypeError, match=r"got: .*buffers.*use transformers\.Trainer"):
        LineSearchTrainer(  # (a factory of another optimizer: what it got, and the way)
            model=model,
            args=make_args(tmp_path),
            train_dataset=dataset,
            optimizer_cls_and_kwargs=(functools.partial(torch.optim.AdamW, lr=1e-3), {}),
        ).create_optimizer()


def test_alsals_takes_its_gradient_at_y_and_the_trainer_evaluates_at_x(
    model_path, dataset, tmp_path, monkeypatch
):
    """ALSALS under the Trainer: the window's closure drives its searches; every
    training_step moves the weights to y (train()) before the Trainer's backward, each step
    brings them back to the average x, and evaluate() leaves them there."""
    moved = []
    original = ALSALS.train

    def spy(self):
        before = [p.detach().clone() for p in self.param_groups[0]["params"]]
        original(self)
        after = self.param_groups[0]["params"]
        moved.append(not all(torch.equal(a, b) for a, b in zip(before, after, strict=True)))

    monkeypatch.setattr(ALSALS, "train", spy)
    model = make_model(model_path, dropout=False)
    trainer = LineSearchTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=3),
        train_dataset=dataset,
        eval_dataset=dataset,
        optimizer_cls_and_kwargs=(ALSALS, {"lr": 1e-3}),
    )
    before = weights(model)
    trainer.train()
    optimizer = trainer.optimizer.optimizer  # inside accelerate's wrapper
    assert isinstance(optimizer, ALSALS)
    assert optimizer.search_state.steps == 3 and optimizer.search_state.searches == 3
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    # the first two steps start where x = z = y (alpha is 1 at the first step, so x' = z');
    # the third moves the weights from x to y before the Trainer's backward, once
    assert moved.count(True) == 1 and moved[-1] is False
    trained = weights(model)
    trainer.evaluate()
    assert all(torch.equal(trained[n], p) for n, p in model.named_parameters())


def test_fp16_with_accelerates_grad_scaler_skips_overflow_steps(tmp_path):
    """The fp16 path accelerate takes on CUDA: scaled backward, unscale before clipping,
    scaler.step(optimizer) skipping steps whose gradients overflowed, scaler.update().
    accelerate disables fp16 on CPU, so the test hands its accelerator a CPU GradScaler and
    turns its native AMP on: everything else is the library's own code path. A small random
    BERT is enough here (no checkpoint needed)."""
    model = tiny_bert()
    gen = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, 100, (8,), generator=gen), "labels": torch.tensor(i % 2)}
        for i in range(64)
    ]
    seen = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            info = trainer.optimizer.optimizer.last_step
            skipped = trainer.accelerator.optimizer_step_was_skipped
            seen.append((trainer.accelerator.scaler.get_scale(), skipped, info))

    trainer = LineSearchTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=10, fp16=True),
        train_dataset=data,
        optimizer_cls_and_kwargs=(MomentumALSALS, {"lr": 1e-2, "slope": "analytic"}),
        callbacks=[Watch()],
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22)
    trainer.accelerator.native_amp = True  # fp16 autocast in the forward, unscale_ on clip
    trainer.train()

    scales = [scale for scale, _, _ in seen]
    skipped = [was_skipped for _, was_skipped, _ in seen]
    assert skipped[0] and not all(skipped), "overflow first, then steps"
    for i in range(1, len(seen)):
        if skipped[i]:
            assert scales[i] == scales[i - 1] / 2  # backoff after an overflow
            assert seen[i][2] is seen[i - 1][2]  # the optimizer did not run
        else:
            assert seen[i][2].kind == "search"
    optimizer = trainer.optimizer.optimizer
    search = optimizer.state[optimizer.param_groups[0]["params"][0]]["line_search"]
    assert search["searches"] == skipped.count(False)
    assert search["skipped_nonfinite"] == 0  # the scaler skipped those steps before us
    # the line search saw unscaled gradients: a scaled (x 65536 and more) slope would have
    # made every trial fail
    assert search["failed_searches"] == 0 and 0 < search["slope_avg"] < 1e3


def test_alsals_under_fp16_is_back_at_the_average_after_a_skipped_step(tmp_path):
    """``training_step`` moves ALSALS's weights to ``y`` for the Trainer's backward; a step
    the GradScaler skips (an overflow) never runs the optimizer, and the weights must still
    come back to the average ``x`` the last step left, for checkpoints and the run's end."""
    model = tiny_bert()
    gen = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, 100, (8,), generator=gen), "labels": torch.tensor(i % 2)}
        for i in range(64)
    ]
    overflow_at = 3  # the global step whose gradient gets an inf
    ends = []

    class Watch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            skipped = trainer.accelerator.optimizer_step_was_skipped
            ends.append((skipped, {n: p.detach().clone() for n, p in model.named_parameters()}))

    trainer = LineSearchTrainer(
        model=model,
        args=make_args(tmp_path, max_steps=overflow_at + 1, fp16=True),
        train_dataset=data,
        optimizer_cls_and_kwargs=(ALSALS, {"lr": 1e-3}),
        callbacks=[Watch()],
    )
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    trainer.accelerator.native_amp = True

    def overflow(grad):
        if trainer.state.global_step == overflow_at:
            grad = grad.clone()
            grad.view(-1)[0] = math.inf
        return grad

    next(model.parameters()).register_hook(overflow)
    trainer.train()
    skipped = [s for s, _ in ends]
    assert skipped == [False] * overflow_at + [True]
    before, after = ends[-2][1], ends[-1][1]
    assert all(torch.equal(before[n], after[n]) for n in before)  # x, where the last step left
    assert trainer.optimizer.optimizer._held is None


class _BatchNormNet(torch.nn.Module):
    """BatchNorm with ``momentum=None``: its running statistics are the cumulative average
    over ``num_batches_tracked`` batches, so an extra count changes them too."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(10, 32)
        self.bn = torch.nn.BatchNorm1d(32, momentum=None)
        self.l2 = torch.nn.Linear(32, 2)

    def forward(self, x, labels=None):
        logits = self.l2(torch.relu(self.bn(self.l1(x))))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def test_trials_leave_integer_buffers_alone(tmp_path):
    """The Trainer's optimizer protects every buffer, integer ones included: BatchNorm's
    ``num_batches_tracked`` counts one batch per optimizer step however many trials the
    searches ran, and each step leaves the BatchNorm buffers as the step's training forward
    left them."""
    torch.manual_seed(0)
    data = [{"x": torch.randn(10), "labels": torch.tensor(i % 2)} for i in range(64)]
    model = _BatchNormNet()
    before_steps, after_steps = [], []

    class Watch(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            before_steps.append({k: v.clone() for k, v in model.bn.named_buffers()})

        def on_optimizer_step(self, args, state, control, **kwargs):
            after_steps.append({k: v.clone() for k, v in model.bn.named_buffers()})

    trainer = LineSearchTrainer(
        model=model,
        args=make_args(tmp_path, gradient_accumulation_steps=1, max_steps=4),
        train_dataset=data,
        optimizer_cls_and_kwargs=(MomentumALSALS, {"lr": 1.0, "search_interval": 1}),
        callbacks=[Watch()],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert trainer.state.global_step == 4
    assert optimizer.search_state.forwards > 4, "the searches ran trials"
    assert int(model.bn.num_batches_tracked) == 4
    for before, after in zip(before_steps, after_steps, strict=True):
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
    protected = {id(b) for b in optimizer.protected_buffers}
    assert all(id(b) in protected for b in model.buffers())
    assert not [w for w in caught if "updated its buffers" in str(w.message)]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({}, None),
        ({"learning_rate": 2e-5}, "learning_rate"),
        ({"lr_scheduler_type": "cosine"}, "lr_scheduler_type"),
        ({"warmup_steps": 2}, "warmup_steps"),
        ({"lr_scheduler_kwargs": {"num_cycles": 2}}, "lr_scheduler_kwargs"),
        ({"learning_rate": 5e-5, "lr_scheduler_type": "linear"}, None),  # (the defaults)
    ],
)
def test_schedule_arguments_that_do_not_apply_are_named_in_a_warning(tmp_path, overrides, named):
    """``learning_rate``, ``lr_scheduler_type`` and ``warmup_steps`` set to other than their
    defaults would silently do nothing: the trainer names each in one warning, and says
    nothing where they are left at their defaults."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LineSearchTrainer(
            model=_BatchNormNet(),
            args=make_args(tmp_path, **overrides),
            train_dataset=[{"x": torch.randn(10), "labels": torch.tensor(0)}],
        )
    ignored = [str(w.message) for w in caught if "ignores TrainingArguments" in str(w.message)]
    assert len(ignored) == (named is not None)
    assert named is None or f"TrainingArguments.{named}:" in ignored[0]


def test_a_scheduler_the_user_passes_draws_one_warning_not_torchs(tmp_path):
    """A scheduler built before the trainer replaced ``optimizer.step`` (one the user passes
    in ``optimizers=``) draws the trainer's warning that it overrides the search, and not
    torch's that ``step`` was overridden after the scheduler was built: the replacement
    keeps the schedulers' contract. The run trains."""
    torch.manual_seed(0)
    data = [{"x": torch.randn(10), "labels": torch.tensor(i % 2)} for i in range(32)]
    model = _BatchNormNet()
    optimizer = ALSALS(model.parameters(), buffers=model.buffers())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = LineSearchTrainer(
            model=model,
            args=make_args(tmp_path, gradient_accumulation_steps=1, max_steps=3),
            train_dataset=data,
            optimizers=(optimizer, scheduler),
        )
        trainer.train()
    messages = [str(w.message) for w in caught]
    assert trainer.state.global_step == 3 and optimizer.last_step.kind != "zero_lr"
    assert sum("LineSearchTrainer got a LambdaLR" in m for m in messages) == 1
    assert not any("has been overridden after learning rate scheduler" in m for m in messages)
    assert not any("before `optimizer.step()`" in m for m in messages)


def test_constant_integer_buffers_raise_no_buffer_warning(tmp_path):
    """BERT's ``position_ids`` and ``token_type_ids`` are constant integer buffers: they are
    protected like the others, so no trial reports unprotected buffers."""
    model = tiny_bert()
    assert any(not torch.is_floating_point(b) for b in model.buffers())
    gen = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(0, 100, (8,), generator=gen), "labels": torch.tensor(i % 2)}
        for i in range(16)
    ]
    trainer = LineSearchTrainer(
        model=model,
        args=make_args(tmp_path, gradient_accumulation_steps=1, max_steps=2),
        train_dataset=data,
        optimizer_cls_and_kwargs=(MomentumALSALS, {"lr": 1e-2}),
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert optimizer.search_state.forwards > 2, "the searches ran trials"
    protected = {id(b) for b in optimizer.protected_buffers}
    assert all(id(b) in protected for b in model.buffers())
    messages = [str(w.message) for w in caught]
    assert not [m for m in messages if "updated its buffers" in m], messages


@pytest.mark.distributed
def test_trainer_under_torchrun_keeps_ranks_identical(tmp_path):
    """Two processes: the Trainer wraps the model in DDP, the trials use the plain module,
    the optimizer averages the losses it compares, and the ranks stay identical."""
    worker = Path(__file__).resolve().parent / "_hf_ddp_worker.py"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--standalone", str(worker), str(tmp_path),  # the agent binds a free port itself
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert rank0["wrapped"] == "DistributedDataParallel"
    assert not torch.equal(rank0["first_batch"], rank1["first_batch"]), "one shard per rank"
    assert len(rank0["decisions"]) == 6 and rank0["decisions"] == rank1["decisions"]
    assert all(kind == "search" for kind, *_ in rank0["decisions"])
    assert any(trials > 1 for _, trials, *_ in rank0["decisions"]), "backtracking happened"
    assert torch.equal(rank0["weights"], rank1["weights"])
    assert not torch.equal(rank0["weights"], rank0["initial"])


def test_the_trainers_max_grad_norm_clips_in_the_optimizer(model_path, dataset, tmp_path):
    """``TrainingArguments.max_grad_norm`` becomes the optimizer's: the Trainer clipping
    ``.grad`` before the step would scale the Armijo test's slope too. A run clipped by
    the Trainer's argument equals one clipped by the optimizer's own, step for step."""
    runs = {}
    for name, trainer_clip, optimizer_clip in (("args", 0.05, None), ("optimizer", 0.0, 0.05)):
        kwargs = {"lr": 1e-3} if optimizer_clip is None else {"lr": 1e-3, "max_grad_norm": 0.05}
        args = make_args(tmp_path / name, max_steps=2, max_grad_norm=trainer_clip)
        trainer = LineSearchTrainer(
            model=make_model(model_path, dropout=False),
            args=args,
            train_dataset=dataset,
            optimizer_cls_and_kwargs=(ALSALS, kwargs),
        )
        assert trainer.args.max_grad_norm == 0.0  # the Trainer does not clip
        assert args.max_grad_norm == trainer_clip  # the caller's arguments stay as given
        trainer.train()
        optimizer = trainer.optimizer.optimizer
        assert optimizer.param_groups[0]["max_grad_norm"] == 0.05
        assert optimizer.last_step.grad_norm > 0.05  # the clip acted
        runs[name] = weights(trainer.model)
    for key, value in runs["args"].items():
        assert torch.equal(value, runs["optimizer"][key])


# The settings the trainer hands the optimizer, on a tiny model that needs no checkpoint.


class _TinyNet(torch.nn.Module):
    """A Trainer-compatible classifier: ``forward(x, labels)`` returns the loss."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(6, 8)
        self.l2 = torch.nn.Linear(8, 2)

    def forward(self, x, labels=None):
        logits = self.l2(torch.relu(self.l1(x)))
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def _tiny_data(n=16):
    gen = torch.Generator().manual_seed(0)
    return [{"x": torch.randn(6, generator=gen), "labels": torch.tensor(i % 2)} for i in range(n)]


@pytest.mark.parametrize("how", ["instance", "kwargs"])
def test_the_trainers_max_grad_norm_leaves_the_optimizers_own_alone(tmp_path, how):
    """``TrainingArguments.max_grad_norm`` becomes the optimizer's only where it has none of
    its own: an optimizer built with ``max_grad_norm=0.5`` keeps 0.5 under the default
    ``max_grad_norm=1.0``, whether passed as an instance or through its kwargs."""
    model = _TinyNet()
    if how == "instance":
        extra = {"optimizers": (SLS(model.parameters(), max_grad_norm=0.5), None)}
    else:
        extra = {"optimizer_cls_and_kwargs": (SLS, {"max_grad_norm": 0.5})}
    trainer = LineSearchTrainer(
        model=model,
        args=make_args(tmp_path, gradient_accumulation_steps=1, max_steps=1),
        train_dataset=_tiny_data(),
        **extra,
    )
    optimizer = trainer.create_optimizer()
    assert trainer.args.max_grad_norm == 0.0  # the Trainer does not clip
    assert [g["max_grad_norm"] for g in optimizer.param_groups] == [0.5] * len(
        optimizer.param_groups
    )


def test_max_grad_norm_zero_turns_clipping_off_in_the_optimizer_too(tmp_path):
    """``max_grad_norm=0`` is the Trainer's "no clipping": the optimizer gets no
    ``max_grad_norm`` of 0 (a clip to nothing, or a refused value), and trains."""
    model = _TinyNet()
    trainer = LineSearchTrainer(
        model=model,
        args=make_args(tmp_path, gradient_accumulation_steps=1, max_steps=1, max_grad_norm=0.0),
        train_dataset=_tiny_data(),
        optimizer_cls_and_kwargs=(SLS, {"lr": 0.1}),
    )
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    optimizer = trainer.optimizer.optimizer
    assert all(g["max_grad_norm"] is None for g in optimizer.param_groups)
    assert optimizer.last_step.kind == "search" and optimizer.last_step.step_size > 0.0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_an_optimizer_instance_takes_the_trainers_max_grad_norm_when_the_trainer_is_built(
    tmp_path,
):
    """An optimizer passed in ``optimizers=`` without a clip of its own holds
    ``TrainingArguments.max_grad_norm`` as soon as the trainer exists (the Trainer's own
    clipping is off from then on)."""
    model = _TinyNet()
    optimizer = SLS(model.parameters())
    trainer = LineSearchTrainer(
        model=model,
        args=make_args(tmp_path, gradient_accumulation_steps=1, max_steps=1, max_grad_norm=0.25),
        train_dataset=_tiny_data(),
        optimizers=(optimizer, None),
    )
    assert trainer.args.max_grad_norm == 0.0
    assert [g["max_grad_norm"] for g in optimizer.param_groups] == [0.25]


def test_the_trainers_weight_decay_goes_to_the_decayed_group(tmp_path):
    """The parameters are grouped by weight decay as the Trainer groups them: weights get
    ``args.weight_decay``, biases (and norms) 0."""
    model = _TinyNet()
    trainer = LineSearchTrainer(
        model=model,
        args=make_args(tmp_path, gradient_accumulation_steps=1, max_steps=1, weight_decay=0.01),
        train_dataset=_tiny_data(),
        optimizer_cls_and_kwargs=(MomentumALSALS, {"lr": 1e-2}),
    )
    optimizer = trainer.create_optimizer()
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert decay[id(model.l1.weight)] == decay[id(model.l2.weight)] == 0.01
    assert decay[id(model.l1.bias)] == decay[id(model.l2.bias)] == 0.0


def test_empty_scheduler_kwargs_are_not_named_as_ignored(tmp_path):
    """``lr_scheduler_kwargs={}`` sets nothing (its default is ``None``): no warning that the
    trainer ignores it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LineSearchTrainer(
            model=_TinyNet(),
            args=make_args(
                tmp_path, gradient_accumulation_steps=1, max_steps=1, lr_scheduler_kwargs={}
            ),
            train_dataset=_tiny_data(),
        )
    assert not [w for w in caught if "ignores TrainingArguments" in str(w.message)]


def test_the_mixin_moves_alsals_to_y_under_a_trainer_whose_step_does_not(tmp_path, monkeypatch):
    """``LineSearchTrainerMixin`` on a Trainer subclass with its own ``training_step`` (one
    that does not call ``optimizer.train()``, as transformers' does for Schedule-Free): the
    mixin still moves ``ALSALS``'s weights to ``y`` before the backward pass, once per
    training step."""

    class PlainStepTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            model.train()
            loss = self.compute_loss(model, inputs)
            self.accelerator.backward(loss)
            return loss.detach()

    class Mixed(LineSearchTrainerMixin, PlainStepTrainer):
        pass

    at_backward = []
    original = PlainStepTrainer.training_step

    def spy(self, model, inputs, num_items_in_batch=None):
        at_backward.append(self.optimizer.optimizer._held is not None)  # at y: held x
        return original(self, model, inputs, num_items_in_batch)

    monkeypatch.setattr(PlainStepTrainer, "training_step", spy)
    trainer = Mixed(
        model=_TinyNet(),
        args=make_args(tmp_path, gradient_accumulation_steps=1, max_steps=3),
        train_dataset=_tiny_data(),
        optimizer_cls_and_kwargs=(ALSALS, {"lr": 1e-2}),
    )
    trainer.train()
    assert at_backward == [True, True, True]
    assert trainer.optimizer.optimizer._held is None  # back at x after the run


def test_a_second_train_call_reuses_the_line_search_optimizer(tmp_path):
    """``train()`` twice on one trainer: the second run unwraps accelerate's wrapper from
    the first and trains on with the same line-search optimizer."""
    model = _TinyNet()
    trainer = LineSearchTrainer(
        model=model,
        args=make_args(tmp_path, gradient_accumulation_steps=1, max_steps=2),
        train_dataset=_tiny_data(),
        optimizer_cls_and_kwargs=(SLS, {"lr": 0.1}),
    )
    trainer.train()
    first = trainer.optimizer.optimizer
    steps = first.search_state.step
    trainer.train()
    assert trainer.optimizer.optimizer is first
    assert first.search_state.step > steps


def test_a_scheduler_the_user_passes_is_kept(tmp_path):
    """A scheduler given in ``optimizers=`` is warned about, not silently replaced by
    ``FollowStepSize``: it stays the trainer's scheduler and writes its lr."""
    model = _TinyNet()
    optimizer = SLS(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = LineSearchTrainer(
            model=model,
            args=make_args(tmp_path, gradient_accumulation_steps=1, max_steps=2),
            train_dataset=_tiny_data(),
            optimizers=(optimizer, scheduler),
        )
        trainer.train()
    assert not isinstance(trainer.lr_scheduler, FollowStepSize)
    assert getattr(trainer.lr_scheduler, "scheduler", trainer.lr_scheduler) is scheduler
