"""Bad input at the edges: hostile clients in a real run, replays of earlier rounds, huge values
without clipping, and the privacy accountant at extreme parameters."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from clients.sgd import SGDTrainer
from fedsim.engine import Simulation
from fedsim.engine.aggregation import UpdateAccumulator
from fedsim.errors import ScenarioError
from fedsim.privacy.accountant import Accountant, dp_fedavg_privacy, dp_ftrl_privacy
from fedsim.privacy.events import GaussianEvent, PrivacyLedger, TreeAggregationEvent
from fedsim.privacy.sensitivity import max_tree_sensitivity_sq
from fedsim.scenario import load_scenario, scenario_from_dict
from fedsim.types import ClientTask, CohortChunk, TrainConfig

from ..conftest import run_cli


def _acc(**kw) -> UpdateAccumulator:
    base = dict(num_params=3, round=5, clip_norm=None, weighting="uniform", ledger=None, num_devices=10, max_norm=100.0)
    base.update(kw)
    return UpdateAccumulator(**base)


def _chunk(ids, rows, *, rounds=None, counts=None) -> CohortChunk:
    return CohortChunk(
        device_ids=np.asarray(ids),
        deltas=torch.tensor(rows, dtype=torch.float32),
        num_examples=torch.tensor(counts if counts is not None else [1] * len(ids)),
        losses=torch.zeros(len(ids)),
        rounds=None if rounds is None else np.asarray(rounds),
    )


# ----------------------------------------------------------------------------------------------
# replays and huge values


def test_report_trained_for_another_round_is_rejected_as_stale() -> None:
    acc = _acc()
    mask = acc.add(_chunk([0, 1, 2, 3], [[0.1, 0, 0]] * 4, rounds=[5, 4, 6, 5]))
    assert mask.tolist() == [True, False, False, True]
    batch = acc.result()
    assert batch.rejected == {"stale_round": 2}
    assert torch.allclose(batch.delta_sum, torch.tensor([0.2, 0.0, 0.0]))


def test_replayed_report_of_a_device_that_also_reported_fresh_is_stale_not_duplicate() -> None:
    acc = _acc()
    acc.add(_chunk([3], [[0.1, 0, 0]], rounds=[5]))
    acc.add(_chunk([3], [[0.5, 0, 0]], rounds=[4]))  # last round's report, sent again
    assert acc.result().rejected == {"stale_round": 1}


def test_chunks_that_state_no_round_skip_the_round_check() -> None:
    acc = _acc()
    assert acc.add(_chunk([0, 1], [[0.1, 0, 0]] * 2)).all()


def test_huge_finite_values_rejected_without_clipping() -> None:
    """Non-DP strategies have no clip bound; the engine's max-update-norm keeps junk out."""
    acc = _acc(weighting="examples")
    rows = [[1.0, 2.0, 2.0], [1e30, 0, 0], [3e38, 3e38, 0], [99.0, 0, 0], [100.5, 0, 0]]
    mask = acc.add(_chunk([0, 1, 2, 3, 4], rows, counts=[2, 1, 1, 1, 1]))
    assert mask.tolist() == [True, False, False, True, False]
    batch = acc.result()
    assert batch.rejected == {"norm_exceeds_max": 3}
    assert torch.equal(batch.delta_sum, torch.tensor([2.0 + 99.0, 4.0, 4.0]))
    assert batch.weight_sum == 3.0


def test_example_counts_beyond_float_precision_rejected() -> None:
    acc = _acc(weighting="examples")
    mask = acc.add(_chunk([0, 1], [[0.1, 0, 0]] * 2, counts=[2**53, 7]))
    assert mask.tolist() == [False, True]
    assert acc.result().rejected == {"bad_example_count": 1}


def test_max_update_norm_is_a_validated_scenario_key() -> None:
    raw = {"name": "x", "clients-per-round": 2, "data": {"num-devices": 10}}
    assert scenario_from_dict(raw).engine.max_update_norm == 1e4
    for bad, needle in ((0, "must be > 0"), (float("inf"), "must be a finite number"), ("big", "must be a number")):
        with pytest.raises(ScenarioError, match=rf"engine\.max-update-norm: {needle}"):
            scenario_from_dict({**raw, "engine": {"max-update-norm": bad}})


class HostileTrainer(SGDTrainer):
    """Honest local SGD, except: devices ``id % 10 == 1`` report NaN, ``== 2`` report 1e30
    everywhere, ``== 3`` report float64; and every round also replays the previous round's
    (honest) reports."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__(model)
        self.previous: list[CohortChunk] = []

    def train_cohort(
        self, params: torch.Tensor, tasks: Iterable[ClientTask], config: TrainConfig, *, chunk_size: int = 256
    ) -> Iterator[CohortChunk]:
        honest = list(super().train_cohort(params, tasks, config, chunk_size=chunk_size))
        for chunk in honest:
            ids = np.asarray(chunk.device_ids)
            deltas = chunk.deltas.clone()
            deltas[torch.from_numpy(ids % 10 == 1), 0] = float("nan")
            deltas[torch.from_numpy(ids % 10 == 2)] = 1e30
            bad_dtype = ids % 10 == 3
            keep = ~bad_dtype
            yield CohortChunk(ids[keep], deltas[torch.from_numpy(keep)], chunk.num_examples[torch.from_numpy(keep)],
                              chunk.losses[torch.from_numpy(keep)], None if chunk.rounds is None else chunk.rounds[keep])
            if bad_dtype.any():
                sel = torch.from_numpy(bad_dtype)
                yield CohortChunk(ids[bad_dtype], deltas[sel].double(), chunk.num_examples[sel], chunk.losses[sel],
                                  None if chunk.rounds is None else chunk.rounds[bad_dtype])
        yield from self.previous
        self.previous = honest


class DroppingTrainer(SGDTrainer):
    """The same clients, where the hostile ones simply do not report (the reference run)."""

    def train_cohort(
        self, params: torch.Tensor, tasks: Iterable[ClientTask], config: TrainConfig, *, chunk_size: int = 256
    ) -> Iterator[CohortChunk]:
        for chunk in super().train_cohort(params, tasks, config, chunk_size=chunk_size):
            keep = ~np.isin(np.asarray(chunk.device_ids) % 10, [1, 2, 3])
            sel = torch.from_numpy(keep)
            yield CohortChunk(chunk.device_ids[keep], chunk.deltas[sel], chunk.num_examples[sel], chunk.losses[sel],
                              None if chunk.rounds is None else chunk.rounds[keep])


def test_hostile_clients_in_a_real_run_are_counted_and_never_averaged_in(tmp_path: Path) -> None:
    raw = {
        "name": "hostile",
        "rounds": 6,
        "clients-per-round": 30,
        "data": {"num-devices": 100},
        "model": {"name": "logreg"},
        "client": {"lr": 0.1},
    }
    sim = Simulation(scenario_from_dict(raw), run_dir=tmp_path / "run", progress=False)
    sim.trainer = HostileTrainer(sim.trainer.model)
    expected = {"non_finite": 0, "norm_exceeds_max": 0, "wrong_dtype": 0, "stale_round": 0}
    original = sim.run_round

    def counting_round(r: int):
        cohort_before = sim.population.device_memory.count.copy()
        row = original(r)
        cohort = np.flatnonzero(sim.population.device_memory.count != cohort_before)
        expected["non_finite"] += int(np.sum(cohort % 10 == 1))
        expected["norm_exceeds_max"] += int(np.sum(cohort % 10 == 2))
        expected["wrong_dtype"] += int(np.sum(cohort % 10 == 3))
        expected["stale_round"] += getattr(counting_round, "last", 0)
        counting_round.last = len(cohort)  # type: ignore[attr-defined]
        honest = len(cohort) - int(np.sum(np.isin(cohort % 10, [1, 2, 3])))
        assert row is not None and row["clients"] == honest
        return row

    sim.run_round = counting_round  # type: ignore[method-assign]
    result = sim.run()
    assert result.summary["rejected"] == dict(sorted(expected.items()))
    assert expected["stale_round"] == 5 * 30
    total = sum(m["rejected"] for m in result.metrics)
    assert total == sum(expected.values())
    # exactly the run in which the hostile devices never reported: bit-identical parameters
    reference = Simulation(scenario_from_dict(raw), progress=False)
    reference.trainer = DroppingTrainer(reference.trainer.model)
    ref = reference.run()
    assert torch.equal(result.params, ref.params)
    assert [{**m, "rejected": 0} for m in result.metrics] == ref.metrics


# ----------------------------------------------------------------------------------------------
# scenario files that cannot be read


def test_unreadable_and_pathological_scenario_files(tmp_path: Path) -> None:
    deep = tmp_path / "deep.toml"
    deep.write_text("x = " + "[" * 5000 + "]" * 5000)
    with pytest.raises(ScenarioError, match="invalid TOML: nested too deeply"):
        load_scenario(deep)
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00name")
    with pytest.raises(ScenarioError, match="is not UTF-8 text"):
        load_scenario(binary)
    with pytest.raises(ScenarioError, match="is not a file"):
        load_scenario(tmp_path)
    huge = tmp_path / "huge.toml"
    huge.write_text('name = "h"\n[client]\nlr = ' + "9" * 400 + "\n")
    with pytest.raises(ScenarioError, match="client.lr: must be a finite number"):
        load_scenario(huge)
    for text, needle in (
        ('name = "p"\n[strategy]\nname = "os:getcwd"\n', "strategy.name: 'os:getcwd' is not a Strategy subclass"),
        ('name = "p"\n[strategy]\nname = "..:X"\n', "strategy.name: cannot load '..:X'"),
        ('name = "p"\n[client]\ntrainer = "collections:OrderedDict"\n', "is not a ClientTrainer subclass"),
    ):
        path = tmp_path / "p.toml"
        path.write_text(text)
        with pytest.raises(ScenarioError, match=needle):
            load_scenario(path)


# ----------------------------------------------------------------------------------------------
# the accountant at the edges


def test_accountant_huge_number_of_rounds_is_finite() -> None:
    ftrl = dp_ftrl_privacy(7.0, 10**18, 6, 313, 1e-10)  # closed form per tree level: no loop over T
    fedavg = dp_fedavg_privacy(1.0, 10**18, 1e-6)
    assert math.isfinite(ftrl.rho) and math.isfinite(ftrl.epsilon)
    # each of k contributions lies on one root-to-leaf path of depth+1 nodes, and a node holds at
    # most k of them: k <= S <= k**2 (depth + 1)
    depth = math.ceil(math.log2(10**18))
    assert 6 / (2 * 49) <= ftrl.rho <= 36 * (depth + 1) / (2 * 49)
    assert fedavg.rho == 10**18 / 2.0


def test_accountant_ledger_of_many_rounds_matches_the_closed_form() -> None:
    ledger = PrivacyLedger()
    event = TreeAggregationEvent(1.0, 4, 2)
    for r in range(3000):
        ledger.record(r, event)
    acc = Accountant(1e-6)
    for r in range(3000, 3050):
        ahead = acc.report_with(ledger, r, event)
        ledger.record(r, event)
        assert acc.report(ledger).rho == ahead.rho
    assert acc.report(ledger).rho == max_tree_sensitivity_sq(3050, 4, 2) / 2.0


def test_accountant_infeasible_k_warns_and_uses_the_effective_value() -> None:
    with pytest.warns(UserWarning, match="infeasible"):
        over = dp_ftrl_privacy(1.0, 10, 50, 3, 1e-6)
    assert over.rho == dp_ftrl_privacy(1.0, 10, 3, 3, 1e-6).rho  # ceil(10 / 4) = 3 fit
    with pytest.warns(UserWarning, match="infeasible"):
        over = dp_fedavg_privacy(1.0, 10, 1e-6, max_participations=50, min_separation=3)
    assert over.rho == 3 / 2.0


def test_accountant_small_noise_gives_large_but_finite_figures() -> None:
    report = dp_ftrl_privacy(1e-6, 100, 2, 3, 1e-6)  # the smallest accepted noise multiplier
    assert report.rho > 1e11 and math.isfinite(report.rho)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        huge_z = dp_fedavg_privacy(1e150, 100, 1e-6)
    assert huge_z.rho >= 0.0 and math.isfinite(huge_z.epsilon)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_accountant_rejects_invalid_noise_with_a_value_error(bad: float) -> None:
    with pytest.raises(ValueError, match="noise_multiplier"):
        dp_ftrl_privacy(bad, 10, 1, 0, 1e-6)
    with pytest.raises(ValueError, match="noise_multiplier"):
        GaussianEvent(bad)


def test_underflowing_noise_is_a_clear_error_everywhere() -> None:
    # 2*z*z underflows to 0 near z = 1e-154; anything below MIN_NOISE_MULTIPLIER is refused
    with pytest.raises(ValueError, match="noise_multiplier must be >= 1e-06"):
        dp_ftrl_privacy(1e-200, 100, 2, 3, 1e-6)
    with pytest.raises(ValueError, match="noise_multiplier must be >= 1e-06"):
        GaussianEvent(1e-300)
    proc = run_cli("privacy", "dp-ftrl", "--noise-multiplier", "1e-300", "--rounds", "10",
                   "--max-participations", "1", "--min-separation", "0", "--delta", "1e-6")
    assert proc.returncode == 2 and "--noise-multiplier must be a finite number >= 1e-06" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ledger_refuses_to_count_a_round_twice() -> None:
    ledger = PrivacyLedger()
    ledger.record(0, GaussianEvent(1.0))
    with pytest.raises(ValueError, match="strictly increasing"):
        ledger.record(0, GaussianEvent(1.0))
    assert len(ledger) == 1


def test_memory_benchmark_script_runs_end_to_end() -> None:
    """The long-run memory benchmark itself (tiny settings; its verdict is for the full run)."""
    import subprocess
    import sys

    from ..conftest import ROOT

    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_memory.py"), "--devices", "300", "--rounds", "24",
         "--clients-per-round", "10", "--checkpoint-every", "5", "--model", "logreg"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode in (0, 1), proc.stderr
    assert "rounds run     24 (completed)" in proc.stdout
    assert "KiB/round" in proc.stdout and "verdict" in proc.stdout
