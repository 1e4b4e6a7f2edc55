"""Adaptive clipping (Andrew et al. 2021): the clip norm tracks a target quantile of the update
norms, the clipped-count queries are accounted with the updates (ledger = ``fedsim privacy``'s
plan), the clip norm per round is published, and bad settings are refused before anything runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedsim.engine import run_scenario
from fedsim.engine.aggregation import UpdateAccumulator
from fedsim.privacy.accountant import Accountant
from fedsim.privacy.clipping import clip_by_norm
from fedsim.privacy.events import ClippedCountEvent, PrivacyLedger, SampledGaussianEvent
from fedsim.privacy.noise import NoiseKey, NoiseSource
from fedsim.privacy.rdp import RDP_ORDERS, privacy_spent, sampled_rdp_per_round
from fedsim.privacy_cli import plan
from fedsim.scenario import load_scenario, parse_override
from fedsim.strategy import StrategyContext
from fedsim.types import CohortChunk, TrainConfig
from strategies.dp_fedavg import DPFedAvg
from strategies.dp_ftrl import DPFTRL

from ..conftest import SCENARIOS, run_cli

P = 16  # parameters of the synthetic updates


def _context(rounds: int, cohort: int, devices: int) -> StrategyContext:
    return StrategyContext(
        num_params=P, num_rounds=rounds, num_devices=devices, clients_per_round=cohort, seed=0,
        base_train_config=TrainConfig(round=0, lr=0.1, local_epochs=1, batch_size=1),
        noise=NoiseSource(NoiseKey.generate(), "00" * 16),
    )


def _round(strategy, round: int, norms: np.ndarray, rng: np.random.Generator, *, state_bits: bool) -> None:
    """One server round on synthetic updates of the given norms, clipped as clients clip them."""
    config = strategy.configure_client(round=round, base=TrainConfig(round=round, lr=0.1, local_epochs=1, batch_size=1))
    directions = torch.from_numpy(rng.standard_normal((len(norms), P))).to(torch.float32)
    raw = directions / directions.norm(dim=1, keepdim=True) * torch.from_numpy(norms).to(torch.float32)[:, None]
    clipped = clip_by_norm(raw, config.clip_norm)
    acc = UpdateAccumulator(num_params=P, round=round, clip_norm=config.clip_norm, weighting="uniform",
                            ledger=None, num_devices=len(norms))
    bits = (norms <= config.clip_norm) if state_bits else None
    acc.add(CohortChunk(np.arange(len(norms)), clipped, torch.ones(len(norms), dtype=torch.int64),
                        torch.zeros(len(norms)), np.full(len(norms), round), below_clip=bits))
    strategy.aggregate(round=round, params=torch.zeros(P), batch=acc.result())


@pytest.mark.parametrize(("quantile", "state_bits"), [(0.5, True), (0.2, False), (0.8, True)])
def test_clip_norm_converges_to_the_target_quantile(quantile: float, state_bits: bool) -> None:
    """Update norms log-normal(0, 0.5): the clip norm ends at their ``quantile`` from 30x away."""
    rounds, cohort = 250, 200
    strategy = DPFedAvg(noise_multiplier=1.0, clip_norm=30.0, target_quantile=quantile, clip_lr=0.2,
                        count_noise_multiplier=20.0)  # Andrew et al.'s sigma_b = m / 20 -> z_b = m / 10
    strategy.setup(_context(rounds, cohort, cohort))
    rng = np.random.default_rng(1)
    seen = []
    for r in range(rounds):
        _round(strategy, r, np.exp(rng.normal(0.0, 0.5, cohort)), rng, state_bits=state_bits)
        seen.append(strategy.clip_norm)
    from scipy.stats import norm

    truth = float(np.exp(0.5 * norm.ppf(quantile)))
    late = np.asarray(seen[-50:])
    assert abs(np.median(late) / truth - 1) < 0.08, (np.median(late), truth)
    assert seen[0] < 30.0 and seen[10] > 5 * truth  # it moved there, geometrically (at most exp(0.2) a round)


def test_fixed_clip_norm_is_unchanged_and_state_keys_stay() -> None:
    strategy = DPFTRL(noise_multiplier=1.0, clip_norm=0.7)
    strategy.setup(_context(4, 10, 10))
    assert set(strategy.state_dict()) == {"mechanism", "optimizer"}
    assert [type(e) for e in strategy.privacy_events(round=0)] == [type(strategy.privacy_event(round=0))]
    _round(strategy, 0, np.full(10, 2.0), np.random.default_rng(0), state_bits=True)
    assert strategy.clip_norm == 0.7 and strategy.public_metrics(round=0, config=TrainConfig(0, 0.1, 1, 1, 0.7)) == {}


def test_released_update_is_the_fixed_clip_gaussian_at_the_rounds_clip_norm() -> None:
    """DP-FedAvg: the normalised mechanism scaled back is x + N(0, (z C_t)^2), the same noise
    words as a fixed-clip run at C_t."""
    key = NoiseKey.generate()
    ctx = _context(3, 5, 5)
    ctx = StrategyContext(**{**ctx.__dict__, "noise": NoiseSource(key, "11" * 16)})
    adaptive = DPFedAvg(noise_multiplier=0.8, clip_norm=0.3, target_quantile=0.5, count_noise_multiplier=0.1)
    fixed = DPFedAvg(noise_multiplier=0.8, clip_norm=0.3)
    adaptive.setup(ctx)
    fixed.setup(ctx)
    x = torch.linspace(-0.1, 0.1, P)
    from fedsim.types import UpdateBatch

    batch = UpdateBatch(delta_sum=x, weight_sum=5.0, num_updates=5, num_examples=5, num_below_clip=5)
    a = adaptive.aggregate(round=0, params=torch.zeros(P), batch=batch)
    b = fixed.aggregate(round=0, params=torch.zeros(P), batch=batch)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)  # float32 rounding of (x / C + n) C vs x + n C
    assert adaptive.clip_norm < 0.3  # every update fit (count noise std 0.05): the clip norm shrinks


def test_sampled_count_is_accounted_jointly_with_its_update() -> None:
    z, zb, q, n = 1.1, 5.0, 0.05, 30
    ledger = PrivacyLedger()
    for t in range(n):
        ledger.record(t, SampledGaussianEvent(z, q))
        ledger.record(t, ClippedCountEvent(zb, None, 0, q, z))
    report = Accountant(1e-6).report(ledger)
    joint = (z ** -2 + zb ** -2) ** -0.5
    assert report.rho == pytest.approx(n / (2 * z * z) + n / (2 * zb * zb))
    expected = privacy_spent(np.minimum(sampled_rdp_per_round(q, joint) * n, np.asarray(RDP_ORDERS) * report.rho), 1e-6)
    assert report.epsilon_rdp == pytest.approx(min(expected, report.epsilon_rdp), rel=1e-9)
    assert report.epsilon_rdp == pytest.approx(expected, rel=1e-9)
    orphan = PrivacyLedger.planned([ClippedCountEvent(zb, None, 0, q, z)] * 3)
    with pytest.raises(ValueError, match="accounted jointly"):
        Accountant(1e-6).report(orphan)
    with pytest.raises(ValueError, match="strictly increasing"):
        ledger.record(n - 1, ClippedCountEvent(zb, None, 0, q, z))  # one count per round


def _scenario(*overrides: str):
    return load_scenario(SCENARIOS / "adaptive_clipping.toml", [parse_override(o) for o in overrides])


def test_in_process_run_ledger_and_rho_equal_the_plan(tmp_path: Path) -> None:
    rounds = 6
    result = run_scenario(_scenario(f"rounds={rounds}", "clients-per-round=20", "strategy.min-separation=2"),
                          run_dir=tmp_path / "run")
    planned = plan("dp-ftrl", ["--target-rho", "2.0", "--rounds", str(rounds), "--max-participations", "2",
                               "--min-separation", "2", "--target-quantile", "0.5",
                               "--count-rho-fraction", "0.05", "--delta", "1e-6"])
    assert result.summary["rho"] == planned["rho"] and result.summary["epsilon"] == planned["epsilon"]
    assert result.summary["noise_multiplier"] == planned["noise_multiplier"]
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    kinds = [(e["round"], e["event"]["type"]) for e in ledger]
    assert kinds == [(r, k) for r in range(rounds) for k in ("tree_aggregation", "clipped_count")]
    assert {e["event"]["noise_multiplier"] for e in ledger if e["event"]["type"] == "clipped_count"} == {
        planned["count_noise_multiplier"]}
    assert planned["count_rho"] == pytest.approx(0.05 * 2.0, rel=1e-5)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    clips = [row["clip_norm"] for row in rows]
    assert clips[0] == 0.05 and len(set(clips)) == rounds  # starts at clip-norm, moves every round
    assert all(row["rho"] is not None for row in rows) and rows[-1]["rho"] == result.summary["rho"]


def test_budget_stop_counts_the_rounds_count_query() -> None:
    """max-rho stops before a round whose update and count together would exceed it."""
    result = run_scenario(_scenario("rounds=8", "strategy.min-separation=0", "privacy.max-rho=1.5"))
    assert result.summary["rounds"] == 7 and "round 8 would reach rho=2 > max-rho=1.5" in result.summary["stopped_reason"]
    assert len(result.ledger) == 14 and result.summary["rho"] < 1.5


def test_poisson_dp_fedavg_run_equals_the_plan() -> None:
    """DP-FedAvg with Poisson sampling: the count is joint with the sampled update (amplified
    epsilon), rho and epsilon as planned."""
    sc = load_scenario(SCENARIOS / "dp_fedavg.toml", [parse_override(o) for o in (
        "rounds=4", "strategy.target-quantile=0.5", "strategy.count-noise-multiplier=8.0")])
    result = run_scenario(sc)
    q = 100 / 1437
    planned = plan("dp-fedavg", ["--noise-multiplier", "1.3", "--rounds", "4", "--sampling-rate", repr(q),
                                 "--target-quantile", "0.5", "--count-noise-multiplier", "8", "--delta", "1e-6"])
    assert result.summary["rho"] == planned["rho"] and result.summary["epsilon"] == planned["epsilon"]
    counts = [e for _, e in result.ledger if isinstance(e, ClippedCountEvent)]
    assert len(counts) == 4 and counts[0].sampling_rate == pytest.approx(q) and counts[0].update_noise_multiplier == 1.3


@pytest.mark.parametrize(("old", "new", "message"), [
    ("target-quantile = 0.5", "target-quantile = 1.5", "target-quantile must be a number in (0, 1), got 1.5"),
    ("clip-lr = 0.2", "clip-lr = 0.0", "clip-lr must be"),
    # target-rho = 2 over 40 rounds with k = 2: z_b = 0.5 alone spends rho = 8
    ("count-rho-fraction = 0.05", "count-noise-multiplier = 0.5",
     "leaving nothing for the updates"),
])
def test_bad_settings_are_one_line_and_nothing_runs(tmp_path: Path, old: str, new: str, message: str) -> None:
    text = (SCENARIOS / "adaptive_clipping.toml").read_text()
    assert old in text
    path = tmp_path / "s.toml"
    path.write_text(text.replace(old, new))
    proc = run_cli("run", str(path), "--quiet", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in proc.stderr, lines
    assert new.split(" = ")[0] in lines[0]  # names the key
    assert not (tmp_path / "r").exists()
