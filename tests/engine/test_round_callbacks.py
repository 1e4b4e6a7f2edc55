"""Round callbacks: a capability plugs into every round without touching the round owner.

The audit's canary clients are one (:class:`~fedsim.engine.canaries.CanaryCallback`); a callback
written here, outside fedsim, is another: its hooks run at each step of a real in-process run
and its state travels through the checkpoint under its own key.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedsim.engine.callbacks import RoundCallback
from fedsim.engine.canaries import CanaryCallback
from fedsim.engine.simulation import Simulation
from fedsim.scenario import scenario_from_dict

from ..conftest import tiny_scenario


class Steps(RoundCallback):
    """Counts the rounds it saw and publishes the update's norm per round."""

    state_key = "steps"

    def __init__(self) -> None:
        self.rounds = 0
        self.calls: list[str] = []

    def before_aggregate(self, round: int, params: torch.Tensor) -> None:
        self.calls.append(f"before {round}")

    def after_aggregate(self, round: int, before: torch.Tensor, after: torch.Tensor, accepted: np.ndarray) -> None:
        self.calls.append(f"after {round}")
        self.rounds += 1
        self.last_step = float((after - before).norm())

    def on_row(self, row: dict[str, Any], params: torch.Tensor) -> None:
        row["step_norm"] = self.last_step

    def on_summary(self, summary: dict[str, Any], params: torch.Tensor, rounds_done: int) -> None:
        summary["steps"] = self.rounds

    def state_dict(self) -> dict[str, int]:
        return {"rounds": self.rounds}

    def load_state_dict(self, state: Any) -> None:
        self.rounds = int(state["rounds"])


def test_a_callback_sees_every_round_and_adds_to_the_row_and_summary(tmp_path: Path) -> None:
    sim = Simulation(scenario_from_dict(tiny_scenario("cb", rounds=3)), run_dir=tmp_path / "run", progress=False)
    steps = Steps()
    sim.callbacks.append(steps)
    result = sim.run()
    assert steps.calls == ["before 0", "after 0", "before 1", "after 1", "before 2", "after 2"]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step_norm"] > 0 for r in rows] == [True] * 3
    assert result.summary["steps"] == 3 and json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3
    assert not sim.keyed  # a callback that is not keyed leaves a run without DP unkeyed


def test_a_callbacks_state_travels_in_the_checkpoint_under_its_key() -> None:
    sc = scenario_from_dict(tiny_scenario("cb", rounds=2))
    first = Simulation(sc, progress=False)
    first.callbacks.append(Steps())
    first.run()
    state = first.state_dict()
    assert state["steps"] == {"rounds": 2} and state["audit"] is None
    second = Simulation(sc, progress=False)
    restored = Steps()
    second.callbacks.append(restored)
    second.load_state_dict(state)
    assert restored.rounds == 2


def test_the_audit_is_a_callback_that_keys_the_run() -> None:
    plain = Simulation(scenario_from_dict(tiny_scenario("plain", rounds=1)), progress=False)
    assert plain.callbacks == [] and plain.canaries is None and not plain.keyed
    audited = Simulation(scenario_from_dict(tiny_scenario("audited", rounds=1, audit={"canaries": 4})), progress=False)
    [callback] = audited.callbacks
    assert isinstance(callback, CanaryCallback) and audited.canaries is callback.clients and audited.keyed
    assert audited.population.num_devices == audited.data.num_devices + 4
    plan = audited.begin(0)
    assert plan is not None and all(d < audited.data.num_devices for d in plan.cohort)
    assert all(d >= audited.data.num_devices for d in plan.canaries)
