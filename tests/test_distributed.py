"""Under torch.distributed every rank takes the same decisions and keeps the same weights."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp

import _distributed_worker

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    out = tmp_path_factory.mktemp("dist")
    init = f"file://{out / 'rendezvous'}"  # no port to race for
    mp.start_processes(
        _distributed_worker.run, args=(2, init, str(out)), nprocs=2, start_method="spawn"
    )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("name", ["SLS", "AdamSLS", "MomentumALSALS"])
def test_ranks_take_identical_decisions_and_keep_identical_weights(rank_results, name):
    rank0, rank1 = rank_results[0][name], rank_results[1][name]
    assert rank0["local"] != rank1["local"], "each rank must see its own data"
    assert rank0["decisions"] == rank1["decisions"]
    assert any(trials > 1 for _, trials, _, _ in rank0["decisions"]), "decisions must matter"
    assert torch.equal(rank0["weights"], rank1["weights"])
    # the loss the decisions use is the mean over ranks, not either rank's own
    for (_, _, _, mean_loss), a, b in zip(
        rank0["decisions"], rank0["local"], rank1["local"], strict=True
    ):
        assert mean_loss == pytest.approx((a + b) / 2, rel=1e-6)


@pytest.mark.parametrize("name", ["SLS", "AdamSLS", "MomentumALSALS"])
def test_ranks_issue_the_same_collectives_whatever_their_local_state(rank_results, name):
    """Rank 1 has no gradient, a NaN loss, a zero gradient, or NaN trials at some steps
    while rank 0 trains: no collective mismatch (the run finished), and both ranks decide alike."""
    rank0, rank1 = rank_results[0][name]["divergent"], rank_results[1][name]["divergent"]
    assert rank0 == rank1
    kinds = [kind for kind, _ in rank0]
    events = _distributed_worker.RANK1_EVENTS
    assert kinds[events.index("nan_loss")] == "nonfinite"  # the mean loss is NaN on both
    assert kinds[events.index("no_grad")] == "search"  # rank 0's gradient still counts
    # rank 1's trials are NaN, and so is its loss at w0 the trials' way: both ranks look
    # at w0 after two trials and skip
    assert rank0[events.index("nan_without_grad")] == ("nonfinite", 2)
    assert kinds[-1] in ("search", "reuse")


@pytest.mark.parametrize("name", ["SLS", "AdamSLS", "MomentumALSALS"])
def test_a_scan_averages_the_trial_losses_over_ranks_as_the_search_does(rank_results, name):
    """Each rank scans its own batch; the decreases are of the mean loss, equal on all ranks
    and about 0 at a tiny step (they used to be the mean loss minus this rank's own)."""
    rank0, rank1 = rank_results[0][name]["scan"], rank_results[1][name]["scan"]
    assert rank0 == rank1
    assert abs(rank0[0]) < 1e-5


def test_an_untested_update_is_undone_alike_on_every_rank(rank_results):
    """Rank 1's loss is NaN on two steps in a row after AdamSLS's (untested) update: the
    mean loss is NaN on both ranks, both undo the update and keep the same weights."""
    rank0, rank1 = rank_results[0]["undo"], rank_results[1]["undo"]
    assert rank0["kinds"][5:8] == ["nonfinite", "nonfinite", "search"]
    assert rank0["state"]["undone_updates"] == 1
    assert rank0["kinds"] == rank1["kinds"]
    assert rank0["state"] == rank1["state"]
    assert torch.equal(rank0["weights"], rank1["weights"])


def test_a_kink_is_passed_alike_on_every_rank(rank_results):
    """At a tie the analytic slope is contradicted by the trials' mean losses: both ranks
    take the slope those measured and step through it together (phase 5.8)."""
    rank0, rank1 = rank_results[0]["kink"], rank_results[1]["kink"]
    assert rank0["kinds"][0] == "search"
    assert rank0["state"]["kinks_passed"] >= 1
    assert not torch.equal(rank0["weights"], torch.tensor([1.0, -2.0], dtype=torch.float64))
    assert rank0["kinds"] == rank1["kinds"]
    assert rank0["state"] == rank1["state"]
    assert torch.equal(rank0["weights"], rank1["weights"])


def test_the_loss_rise_guard_fires_alike_on_every_rank(rank_results):
    """The guard judges the batch losses averaged over ranks: both ranks fire at the same
    steps, keep the same ceiling and the same watch, and the same weights."""
    rank0, rank1 = rank_results[0]["guard"], rank_results[1]["guard"]
    assert rank0["fired"], "the guard must fire for the comparison to mean anything"
    assert rank0["fired"] == rank1["fired"]
    assert rank0["state"] == rank1["state"]
    assert rank0["state"]["step_size_ceiling"] < float("inf")
    assert torch.equal(rank0["weights"], rank1["weights"])


def test_start_rise_cuts_alike_on_every_rank(rank_results):
    """``start_rise`` judges the batch losses averaged over ranks: both ranks halve the step
    size at the same step and keep the same state (the start level and the ceiling) and the
    same weights."""
    rank0, rank1 = rank_results[0]["start_rise"], rank_results[1]["start_rise"]
    assert rank0["cut_at"] is not None, "the rule must cut for the comparison to mean anything"
    assert rank0["cut_at"] == rank1["cut_at"]
    assert rank0["state"] == rank1["state"]
    assert torch.equal(rank0["weights"], rank1["weights"])


def test_late_retry_checks_the_same_cuts_on_every_rank(rank_results):
    """Cuts after the first phase are retried on the next batch alike on every rank: the
    same retries armed at the same steps, the same decisions and weights."""
    rank0, rank1 = rank_results[0]["retry"], rank_results[1]["retry"]
    assert rank0["armed"], "cuts must be retried for the comparison to mean anything"
    assert rank0["armed"] == rank1["armed"]
    assert rank0["decisions"] == rank1["decisions"]
    assert torch.equal(rank0["weights"], rank1["weights"])


def test_regrowth_takes_the_same_verdicts_on_every_rank(rank_results):
    """The way back after a cut (``regrowth``) is judged from losses and promises averaged
    over ranks: the same verdicts at the same steps, the same decisions, state and weights."""
    rank0, rank1 = rank_results[0]["regrowth"], rank_results[1]["regrowth"]
    assert rank0["regrown"], "searches must pass as linear for the comparison to mean anything"
    assert rank0["regrown"] == rank1["regrown"]
    assert rank0["decisions"] == rank1["decisions"]
    assert rank0["state"] == rank1["state"]
    assert torch.equal(rank0["weights"], rank1["weights"])


def test_a_wrong_floor_is_refuted_alike_on_every_rank(rank_results):
    """The floor's evidence is read from losses averaged over ranks: both ranks refute
    ``loss_floor=0`` at the same step (a loss that goes below it) and keep the same state
    and weights."""
    rank0, rank1 = rank_results[0]["floor"], rank_results[1]["floor"]
    assert rank0["refuted_at"] is not None, "the floor must be refuted for this to mean anything"
    assert rank0["refuted_at"] == rank1["refuted_at"]
    assert rank0["state"] == rank1["state"]
    assert torch.equal(rank0["weights"], rank1["weights"])


def test_schedule_free_search_decides_alike_on_every_rank(rank_results):
    """ALSALS under DDP: the same searches and weights on both ranks, also after an
    ``lr`` cut 1000x that the search climbs from, and when rank 1 alone has no gradient, a
    NaN loss, a zero gradient or NaN trials."""
    rank0, rank1 = rank_results[0]["schedule_free"], rank_results[1]["schedule_free"]
    assert rank0["decisions"] == rank1["decisions"]
    assert any(trials > 1 for _, trials, _, _ in rank0["decisions"]), "decisions must matter"
    after_the_cut = [size for _, _, size, _ in rank0["decisions"][14:18]]
    assert max(after_the_cut) > 10 * rank0["written"], after_the_cut  # the climb, tested
    assert torch.equal(rank0["weights"], rank1["weights"])
    assert rank0["divergent"] == rank1["divergent"]
    kinds = [kind for kind, _ in rank0["divergent"]]
    assert kinds[_distributed_worker.RANK1_EVENTS.index("nan_loss")] == "nonfinite"


@pytest.mark.parametrize("name", ["SLS", "AdamSLS", "MomentumALSALS", "ALSALS"])
def test_a_loss_returned_as_a_dtensor_takes_the_steps_of_the_plain_loss(rank_results, name):
    """Tensor parallelism's ``loss_parallel`` returns the loss as a DTensor: its value
    (before, ``.tolist()`` on it failed in every optimizer) and its backward are the plain
    loss's, on every rank."""
    for results in rank_results:
        plain = results["dtensor_loss"][name, False]
        wrapped = results["dtensor_loss"][name, True]
        assert wrapped["decisions"] == plain["decisions"]
        assert any(trials > 1 for _, trials, _, _ in plain["decisions"]), "decisions must matter"
        assert torch.equal(wrapped["weights"], plain["weights"])


@pytest.mark.parametrize("setting", ["c", "lr"])
def test_ranks_built_with_different_settings_fail_at_the_first_step_on_every_rank(
    rank_results, setting
):
    """Another ``c``, or another ``lr``, on each rank: a clear error on both ranks at the
    first step, before any trial (their collectives would otherwise pair wrongly, or their
    weights drift)."""
    for errors in (rank_results[0]["mismatch"][setting], rank_results[1]["mismatch"][setting]):
        assert set(errors) == {"SLS", "AdamSLS", "MomentumALSALS", "ALSALS"}
        for name, message in errors.items():
            assert message is not None and "hold different settings" in message, name


def assert_refused_unmoved(rank_results, run: str, says: str) -> None:
    """On both ranks each class refused ``run``'s step with an error that says ``says``,
    and nothing it watched moved."""
    for rank in (0, 1):
        errors = rank_results[rank][run]
        for name in ("SLS", "AdamSLS", "MomentumALSALS", "ALSALS"):
            assert errors[name] is not None and says in errors[name], (rank, name)
            assert errors[f"{name}-moved"] is None, (rank, name)


def test_ranks_holding_different_parts_of_the_model_fail_at_the_first_step(rank_results):
    """Each rank an optimizer over its own layer (ZeroRedundancyOptimizer's partitions): a
    clear error on both ranks before anything moves; the searches took silently wrong steps
    (each rank's trials moved its part alone, the slope was a part's terms averaged)."""
    assert_refused_unmoved(rank_results, "partitioned", "hold different parameters")


def test_a_group_added_later_is_checked_across_ranks_at_the_next_step(rank_results):
    """A group added after the first step, of another shape on each rank: refused at the
    next step on both ranks, nothing of it moved (the check ran at the first step only)."""
    assert_refused_unmoved(rank_results, "later_group", "hold different parameters")


@pytest.mark.parametrize("key", list(_distributed_worker.WRITTEN_ON_ONE_RANK))
def test_a_setting_written_on_one_rank_between_steps_is_refused_on_every_rank(rank_results, key):
    """Rank 0 alone writes a setting after two steps: the next step is refused on both
    ranks, nothing moved (the settings were compared at the first step only: the ranks
    decided apart and their collectives paired wrongly, a hang; where the setting changed
    the size of the line searches' first collective, ``loss_floor`` or ``max_grad_norm``,
    gloo aborted). The comparison rides in the step's first collective: no collective more
    per step."""
    results = [dict(r["written_on_one_rank"][key]) for r in rank_results]
    assert_refused_unmoved([{"run": r} for r in results], "run", "hold different settings")


def test_the_same_tensor_lr_written_on_every_rank_is_no_difference(rank_results):
    """A 0-dim tensor ``lr`` written alike on both ranks: every class steps on, the weights
    alike (a guard of the tensor path; the devices' difference in its ``repr``, which two
    CPU ranks cannot show, is the unit test's below)."""
    for name in ("SLS", "AdamSLS", "MomentumALSALS", "ALSALS"):
        assert torch.equal(rank_results[0]["tensor_lr"][name], rank_results[1]["tensor_lr"][name])


def test_a_parameter_moved_to_another_group_on_one_rank_is_refused_on_every_rank(
    rank_results,
):
    """Rank 0 alone moves a bias into the other group after two steps (the same parameters,
    other groups: its decay and scale change): refused on both ranks, nothing moved (the
    marks' first cache, keyed on the parameters regardless of their groups, let the
    ranks' weights drift apart)."""
    assert_refused_unmoved(rank_results, "moved_between_groups", "hold different parameters")


def test_fsdp1_flat_parameters_are_refused_at_the_first_step(rank_results):
    """FSDP1's flat shards have one shape on every rank (padded): the shapes' check passes
    them; the FlatParameter itself is refused, on both ranks, before anything moves."""
    assert_refused_unmoved(rank_results, "fsdp1", "FlatParameter")


def test_an_overflow_on_one_rank_is_checked_and_skipped_on_every_rank(rank_results):
    """Rank 0 alone holds a float16 gradient whose square overflows: both ranks run the
    check (no collective mismatch: the run finished) and skip that step alike."""
    kinds = [rank_results[rank]["overflow"] for rank in (0, 1)]
    assert kinds[0] == kinds[1]
    assert kinds[0][0] == "nonfinite" and "nonfinite" not in kinds[0][1:]


def test_a_gradient_whose_float32_squares_underflow_is_decided_in_float64_on_every_rank(
    rank_results,
):
    """Rank 0's gradient squares underflow float32 (the norm ALSALS takes for speed) while
    rank 1's gradient is exactly 0: both ranks take the float64 decision together, and step
    alike (without it every rank would skip the step as a zero gradient)."""
    kinds = [rank_results[rank]["tiny"] for rank in (0, 1)]
    assert kinds[0] == kinds[1]
    assert "zero_grad" not in kinds[0] and "nonfinite" not in kinds[0], kinds[0]


class _Mesh:
    def __init__(self, ranks: list[list[int]]) -> None:
        self.mesh = torch.tensor(ranks)


class _DTensor(torch.Tensor):
    """A stand-in for DTensor: only its device mesh is looked at."""


def _on_mesh(ranks: list[list[int]]) -> torch.Tensor:
    p = torch.zeros(2).as_subclass(_DTensor)
    p.device_mesh = _Mesh(ranks)
    p.placements = ()
    return p


@pytest.mark.parametrize(
    ("group", "mesh", "refused"),
    [
        ([0, 1, 2, 3], [[0, 1], [2, 3]], False),  # HSDP / 2-D mesh, the default group
        ([0, 1, 2, 3], [[0, 2]], False),  # FSDP on the dp submesh of a (dp, tp) mesh
        ([1, 3], [[1, 3]], False),  # the mesh's own group (new_group)
        ([0], [[0, 1]], True),  # one shard's replica: that shard alone
        ([0, 1], [[0, 1], [2, 3]], True),  # one replica's shards: replicas decide apart
        ([0, 1, 2], [[0, 2]], True),  # not whole copies of the mesh
    ],
)
def test_a_mesh_check_accepts_copies_of_the_mesh_and_refuses_part_of_it(
    monkeypatch, group, mesh, refused
):
    """FSDP2 on one dimension of a larger mesh (each rank of the others holds the same
    parameter on its own copy of the submesh) averages to the sum over shards with the
    default group, as HSDP does: it is not refused; a group that cuts a mesh is."""
    import types

    import torch.distributed as dist

    import alsals.distributed as ad

    monkeypatch.setattr(ad, "_dtensor_module", lambda: types.SimpleNamespace(DTensor=_DTensor))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda g: group)
    monkeypatch.setattr(dist, "group", types.SimpleNamespace(WORLD=object()))
    if refused:
        with pytest.raises(ValueError, match="device mesh over ranks"):
            ad.check_meshes_span_group([_on_mesh(mesh)], None)
    else:
        ad.check_meshes_span_group([_on_mesh(mesh)], None)


class _Placement:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    def is_partial(self) -> bool:
        return self.kind == "partial"

    def is_replicate(self) -> bool:
        return self.kind == "replicate"

    def __str__(self) -> str:
        return f"{self.kind.title()}()"


def test_a_parameter_with_a_partial_placement_is_refused_naming_it(monkeypatch):
    """Its local values are terms of a sum not yet taken, no shard of the parameter: the
    search would read them as the weights."""
    import types

    import torch.distributed as dist

    import alsals.distributed as ad

    monkeypatch.setattr(ad, "_dtensor_module", lambda: types.SimpleNamespace(DTensor=_DTensor))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_process_group_ranks", lambda g: [0, 1])
    monkeypatch.setattr(dist, "group", types.SimpleNamespace(WORLD=object()))
    p = _on_mesh([[0, 1]])
    p.placements = (_Placement("replicate"),)
    ad.check_meshes_span_group([p], None)
    p.placements = (_Placement("partial"),)
    with pytest.raises(ValueError, match=r"partial placement \(Partial\(\)\)"):
        ad.check_meshes_span_group([p], None)


@pytest.mark.parametrize("ranks", [2, 3, 64, 2**20])
def test_the_marks_sums_tell_ranks_that_agree_from_ranks_that_do_not(ranks):
    """The sums a collective gives of each mark's halves and their squares are exact and
    tell one rank's different mark apart, however close (one bit) and however many ranks
    (up to 2**20: the squares' sums stay below 2**53)."""
    from alsals.distributed import RankMarks, _check_mark_sums, _mark_terms

    def sums(marks: list[RankMarks]) -> list[float]:
        total = [0.0] * 8
        for m in marks:  # (float64 adds, as the all-reduce does, exact here)
            total = [a + b for a, b in zip(total, _mark_terms(m), strict=True)]
        return total

    def ranks_of(settings: int, shapes: int, odd: tuple[int, int] | None) -> list[float]:
        same = RankMarks("X", settings, shapes)
        if ranks > 64:  # (many equal ranks: their terms times the count, as the sum gives)
            terms = [t * (ranks - 1) for t in _mark_terms(same)]
            one = _mark_terms(RankMarks("X", *odd) if odd else same)
            return [a + b for a, b in zip(terms, one, strict=True)]
        return sums([same] * (ranks - 1) + [RankMarks("X", *odd) if odd else same])

    for settings, shapes in ((0, 0), (0xFFFFFFFF, 0xFFFFFFFF), (0x12345678, 0x9ABCDEF0)):
        _check_mark_sums(ranks_of(settings, shapes, None), ranks, "X")
        for bit in (0, 15, 16, 31):
            with pytest.raises(ValueError, match="different settings"):
                _check_mark_sums(
                    ranks_of(settings, shapes, (settings ^ 1 << bit, shapes)), ranks, "X"
                )
            with pytest.raises(ValueError, match="different parameters"):
                _check_mark_sums(
                    ranks_of(settings, shapes, (settings, shapes ^ 1 << bit)), ranks, "X"
                )


def test_a_tensor_setting_counts_by_its_values_in_the_settings_mark():
    """A setting written as a tensor enters the ranks' mark by its values: two whose
    ``repr`` agrees (4 digits) but whose values differ are told apart, and the same value
    gives the same mark (its ``repr`` would name its device: ``cuda:0`` on one rank,
    ``cuda:1`` on the other, a false difference)."""
    from alsals.distributed import settings_mark

    def groups(lr):
        return [{"params": [], "lr": lr, "betas": (0.9, 0.999)}]

    assert repr(torch.tensor(0.05)) == repr(torch.tensor(0.050001))
    assert settings_mark("X", groups(torch.tensor(0.05))) != settings_mark(
        "X", groups(torch.tensor(0.050001))
    )
    assert settings_mark("X", groups(torch.tensor(0.05))) == settings_mark(
        "X", groups(torch.tensor(0.05))
    )
