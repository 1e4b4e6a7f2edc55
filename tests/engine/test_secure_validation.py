"""Server validation that cannot be gamed: float64 norms, rows scaled to the clip bound, bounded counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.engine.aggregation import DEFAULT_MAX_EXAMPLES, UpdateAccumulator, float64_norms
from fedsim.errors import FedsimError
from fedsim.privacy.clipping import NORM_TOLERANCE, clip_by_norm
from fedsim.scenario import scenario_from_dict
from fedsim.types import CohortChunk
from strategies.fedavg import FedAvg

N = 1_300_000


def _acc(num_params: int, clip: float | None, **kw) -> UpdateAccumulator:
    base = dict(num_params=num_params, round=0, clip_norm=clip, weighting="uniform", ledger=None, num_devices=10)
    base.update(kw)
    return UpdateAccumulator(**base)


def _chunk(rows: torch.Tensor, counts=None) -> CohortChunk:
    m = rows.shape[0]
    return CohortChunk(
        device_ids=np.arange(m),
        deltas=rows,
        num_examples=torch.tensor(counts if counts is not None else [1] * m),
        losses=torch.zeros(m),
    )


def _crafted(eps: float = 2e-4) -> torch.Tensor:
    """One large entry first, then 1.3M small ones whose squares a float32 accumulator drops."""
    x = torch.full((N,), eps, dtype=torch.float32)
    x[0] = 1.0
    return x


def _true_norm(x: torch.Tensor) -> float:
    return float(np.sqrt(np.sum(x.double().numpy() ** 2)))


def test_crafted_float32_delta_is_not_accepted_unscaled() -> None:
    x = _crafted()
    n32, n64 = float(torch.linalg.vector_norm(x)), _true_norm(x)
    if n64 <= n32 * (1 + NORM_TOLERANCE):  # pragma: no cover - depends on torch's float32 reduction
        pytest.skip("this torch build's float32 norm is not fooled by the crafted delta")
    # a clip bound that the float32 norm says the delta respects: the old check accepted it
    clip = n32 / (1 + NORM_TOLERANCE / 2)
    assert n64 > clip * (1 + NORM_TOLERANCE)
    acc = _acc(N, clip)
    mask = acc.add(_chunk(x[None, :].clone()))
    assert not mask.any() and acc.rejected["norm_exceeds_clip"] == 1
    assert acc.num_updates == 0 and float(acc.delta_sum.abs().max()) == 0.0


def test_rows_within_tolerance_are_scaled_to_the_bound() -> None:
    x = _crafted()
    n64 = _true_norm(x)
    clip = n64 / (1 + NORM_TOLERANCE / 2)  # the row is within tolerance, but above C
    acc = _acc(N, clip, keep_individual=True)
    assert acc.add(_chunk(x[None, :].clone())).all()
    batch = acc.result()
    assert _true_norm(batch.deltas[0]) <= clip
    assert _true_norm(batch.delta_sum) <= clip
    assert _true_norm(batch.delta_sum) >= clip * (1 - 1e-5)  # scaled, not zeroed


def test_every_accepted_row_has_true_norm_at_most_c() -> None:
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(64, 5000, generator=gen) * torch.logspace(-3, 1, 64)[:, None]
    clip = 1.0
    clipped = clip_by_norm(rows, clip)
    # float32 clipping lands within rounding of C: some rows a hair above, some below
    acc = _acc(5000, clip, keep_individual=True, num_devices=64)
    assert acc.add(_chunk(clipped)).all()
    kept = acc.result().deltas
    true = np.sqrt((kept.double().numpy() ** 2).sum(axis=1))
    assert true.max() <= clip
    # rows well inside the bound are untouched
    small = float64_norms(clipped) < clip * 0.5
    assert torch.equal(kept[small], clipped[small])


def test_float64_norms_match_exact_values_in_blocks() -> None:
    gen = torch.Generator().manual_seed(4)
    for shape in [(3, 7), (5, 300_000), (2, 600_000)]:
        x = torch.randn(*shape, generator=gen)
        ref = np.sqrt((x.double().numpy() ** 2).sum(axis=1))
        assert np.allclose(float64_norms(x).numpy(), ref, rtol=1e-13, atol=0)


def test_huge_example_count_is_rejected_and_fedavg_weights_exact() -> None:
    acc = _acc(2, None, weighting="examples")
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0], [2.0, 2.0]])
    mask = acc.add(_chunk(rows, counts=[3, DEFAULT_MAX_EXAMPLES, 2**53 - 1, DEFAULT_MAX_EXAMPLES + 1]))
    assert mask.tolist() == [True, True, False, False]
    assert acc.rejected["bad_example_count"] == 2
    batch = acc.result()
    assert isinstance(batch.weight_sum, float) and batch.weight_sum == 3 + DEFAULT_MAX_EXAMPLES
    new = FedAvg().aggregate(round=0, params=torch.zeros(2), batch=batch)
    expected = torch.tensor([3.0, DEFAULT_MAX_EXAMPLES]) / (3 + DEFAULT_MAX_EXAMPLES)
    assert torch.allclose(new, expected, rtol=1e-6)
    # the bound is the scenario's [engine] max-examples
    acc = _acc(2, None, weighting="examples", max_examples=10)
    assert acc.add(_chunk(rows[:2], counts=[10, 11])).tolist() == [True, False]


def test_one_client_cannot_set_fedavgs_step_at_the_defaults(tmp_path) -> None:
    """The engine's accumulator at the scenario defaults: one client reporting max-examples
    (1,000,000) beside nine honest clients with 10 examples used to take 99.99 % of the step.
    Now it takes at most [engine] max-weight-share (0.5) of the round's total weight."""
    from fedsim.engine.rounds import RoundOwner

    owner = RoundOwner(scenario_from_dict({
        "name": "t", "rounds": 1, "clients-per-round": 10, "data": {"num-devices": 10}, "model": {"name": "logreg"},
    }))
    assert owner.scenario.engine.max_weight_share == 0.5
    plan = owner.begin(0)
    acc = owner.accumulator(plan)
    p = owner.params.numel()
    attacker = torch.zeros(p)
    attacker[0] = 1.0
    honest = torch.zeros(9, p)
    honest[:, 1] = 1.0
    rows = torch.cat([honest[:4], attacker[None], honest[4:]])
    counts = [10] * 4 + [DEFAULT_MAX_EXAMPLES] + [10] * 5
    assert acc.add(CohortChunk(device_ids=np.arange(10), deltas=rows, num_examples=torch.tensor(counts),
                               losses=torch.zeros(10), rounds=np.zeros(10, dtype=np.int64))).all()
    step = FedAvg().aggregate(round=0, params=torch.zeros(p), batch=acc.result())
    assert float(step[0]) == pytest.approx(0.5)  # the attacker's share of the step: the cap
    assert float(step[1]) == pytest.approx(0.5)  # the nine honest clients keep the rest
    # a client that does not dominate is averaged exactly as before
    plain = owner.accumulator(plan)
    plain.add(CohortChunk(device_ids=np.arange(10), deltas=rows, num_examples=torch.tensor([10] * 4 + [30] + [10] * 5),
                          losses=torch.zeros(10), rounds=np.zeros(10, dtype=np.int64)))
    step = FedAvg().aggregate(round=0, params=torch.zeros(p), batch=plain.result())
    assert float(step[0]) == pytest.approx(30 / 120) and float(step[1]) == pytest.approx(90 / 120)


def test_max_examples_scenario_key() -> None:
    base = {"name": "t", "data": {"dataset": "synthetic", "num-devices": 10}, "clients-per-round": 2}
    assert scenario_from_dict(base).engine.max_examples == DEFAULT_MAX_EXAMPLES
    assert scenario_from_dict({**base, "engine": {"max-examples": 50}}).engine.max_examples == 50
    for bad in (0, 2**24 + 1):
        with pytest.raises(FedsimError, match="max-examples"):
            scenario_from_dict({**base, "engine": {"max-examples": bad}})


def test_renames_are_followed_by_a_directory_fsync(tmp_path, monkeypatch) -> None:
    """Device ledgers, run-directory files and key files: the directory is fsynced after the rename."""
    import os

    from fedsim.atomic import atomic_write_text
    from fedsim.flower.device import DeviceLedger
    from fedsim.privacy.csprng import NoiseKey

    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        kind = "dir" if os.path.isdir(f"/proc/self/fd/{fd}") else "file"
        events.append((kind, os.path.realpath(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("rename", os.path.realpath(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)

    def check(target) -> None:
        target = os.path.realpath(target)
        i = max(k for k, e in enumerate(events) if e == ("rename", target))
        assert ("dir", os.path.dirname(target)) in events[i + 1 :], events
        events.clear()

    atomic_write_text(tmp_path / "a.json", "{}\n")
    check(tmp_path / "a.json")
    ledger = DeviceLedger(tmp_path / "state", 3, "job")
    assert ledger.claim(0, None)
    check(ledger.path)
    NoiseKey.generate().save(tmp_path / "secret" / "noise.key")
    check(tmp_path / "secret" / "noise.key")
