"""One contract suite over every registered mechanism, and a new mechanism added in one file.

The contract (``fedsim.privacy.mechanisms.base``): a round's noise is a pure function of the key
and the state saved before it (a resumed run adds the same noise); ``state_dict`` round-trips;
the calibrated noise reaches a target ``rho`` without overshooting it; the ``rho`` planned from
the mechanism's events is the ``rho`` a real run of a strategy using it ends at (contract 3, by
construction: the run records exactly the planned events); its events round-trip through JSON.

The same suite runs on :class:`ScaledGaussianMechanism`, defined here with its own kind of event
(:class:`ScaledGaussianEvent`, its accounting included): the test of "a new mechanism is one
file". It is planned by ``fedsim privacy`` and run end to end by a scenario naming it, registered
by name or by import path.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch

from fedsim.cli import main
from fedsim.engine import run_scenario
from fedsim.errors import ScenarioError
from fedsim.privacy.accountant import Accountant
from fedsim.privacy.calibration import calibrate
from fedsim.privacy.events import (
    EventGroup,
    PrivacyEvent,
    PrivacyLedger,
    common_fields,
    event_from_dict,
    event_to_dict,
    register_event,
)
from fedsim.privacy.mechanisms import (
    MECHANISMS,
    Mechanism,
    PlanDescription,
    mechanism_class,
    option,
    register_mechanism,
)
from fedsim.privacy.noise import NoiseKey, NoiseSource
from fedsim.privacy.sensitivity import max_gaussian_participations
from fedsim.scenario import scenario_from_dict
from fedsim.validation import positive_number

from ..conftest import tiny_scenario

# -- a new mechanism, in one file ------------------------------------------------------------------


@dataclass(frozen=True)
class ScaledGaussianEvent(PrivacyEvent):
    """One round of a Gaussian sum with noise std ``scale * z * C`` (sensitivity ``C``)."""

    kind: ClassVar[str] = "test_scaled_gaussian"

    noise_multiplier: float
    scale: float
    max_participations: int | None = None
    min_separation: int = 0

    @classmethod
    def group_rho(cls, group: EventGroup) -> tuple[float, float | None]:
        """``m / (2 (scale z)^2)`` for ``m`` contributions of a device (zCDP of the Gaussian)."""
        p = common_fields(group, ("noise_multiplier", "scale", "max_participations", "min_separation"),
                          "ScaledGaussianEvent")
        sigma = p["scale"] * p["noise_multiplier"]
        m = max_gaussian_participations(group.count, p["max_participations"], p["min_separation"])
        return m / (2.0 * sigma * sigma), p["noise_multiplier"]


register_event(ScaledGaussianEvent)


@dataclass(frozen=True)
class ScaledOptions:
    scale: float = option(2.0, "noise std in units of z C (default 2)")

    def __post_init__(self) -> None:
        positive_number("scale", self.scale)


class ScaledGaussianMechanism(Mechanism):
    """Fresh Gaussian noise ``N(0, (scale z C)^2 I)`` each round."""

    name = "scaled-gaussian"
    Options = ScaledOptions
    options: ScaledOptions
    TAG = 0x53434C44  # "SCLD"

    def privacy_event(self, round: int) -> ScaledGaussianEvent:
        return ScaledGaussianEvent(self.noise_multiplier, self.options.scale,
                                   self.max_participations, self.min_separation)

    def release(self, round: int, clipped_sum: torch.Tensor) -> torch.Tensor:
        noise = self.require_setup().normal((self.TAG, round), self.num_params)
        return clipped_sum + noise * (self.options.scale * self.std)

    def describe_plan(self, num_rounds: int, rho: float) -> PlanDescription:
        return PlanDescription(f"Gaussian, std {self.options.scale:g} z C",
                               fields={"scale": self.options.scale})


TOY_PATH = "tests.contracts.test_mechanism_contract:ScaledGaussianMechanism"


@contextlib.contextmanager
def registered() -> Iterator[None]:
    """The toy registered as ``"scaled-gaussian"`` for the duration (other tests see the built-ins)."""
    register_mechanism("scaled-gaussian", ScaledGaussianMechanism)
    try:
        yield
    finally:
        MECHANISMS.unregister("scaled-gaussian")


# -- the contract suite ----------------------------------------------------------------------------
NAMES = [*MECHANISMS.names(), TOY_PATH]
P, T, K, B = 24, 8, 2, 1


def _make(name: str, z: float = 1.3, **options: Any) -> Mechanism:
    return mechanism_class(name)(noise_multiplier=z, clip_norm=0.5, max_participations=K,
                                 min_separation=B, **options)


def _source() -> NoiseSource:
    return NoiseSource(NoiseKey.from_seed(2024))


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _planned_report(mech: Mechanism, rounds: int, delta: float = 1e-6):
    return Accountant(delta).report(PrivacyLedger.planned(mech.plan_events(rounds)))


@pytest.mark.parametrize("name", NAMES)
def test_noise_is_replayed_after_a_state_round_trip(name: str) -> None:
    xs = torch.randn(T, P, generator=torch.Generator().manual_seed(0))
    first = _make(name)
    first.setup(num_params=P, num_rounds=T, source=_source())
    for t in range(3):
        first.release(t, xs[t])
    saved = copy.deepcopy(first.state_dict())
    tail = [first.release(t, xs[t]) for t in range(3, T)]
    second = _make(name)
    second.setup(num_params=P, num_rounds=T, source=_source())
    second.load_state_dict(copy.deepcopy(saved))
    assert _same(second.state_dict(), saved)  # the state round-trips
    for t, expected in zip(range(3, T), tail, strict=True):
        got = second.release(t, xs[t])
        assert got.shape == (P,) and torch.equal(got, expected), (name, t)
    # and the noise depends on the key
    other = _make(name)
    other.setup(num_params=P, num_rounds=T, source=NoiseSource(NoiseKey.from_seed(7)))
    assert not torch.equal(other.release(0, xs[0]), _replay_first(name, xs[0]))


def _replay_first(name: str, x: torch.Tensor) -> torch.Tensor:
    mech = _make(name)
    mech.setup(num_params=P, num_rounds=T, source=_source())
    return mech.release(0, x)


@pytest.mark.parametrize("name", NAMES)
def test_the_run_records_the_planned_events_and_they_round_trip_json(name: str) -> None:
    mech = _make(name)
    planned = mech.plan_events(T)
    mech.setup(num_params=P, num_rounds=T, source=_source())
    assert [mech.privacy_event(t) for t in range(T)] == planned
    for event in planned:
        assert isinstance(event, PrivacyEvent)
        assert event_from_dict(json.loads(json.dumps(event_to_dict(event)))) == event
    description = mech.describe_plan(T, _planned_report(mech, T).rho)
    assert isinstance(description, PlanDescription) and description.title
    json.dumps(description.fields)  # the report's extras are JSON


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("target", [0.3, 4.0])
def test_calibrated_noise_reaches_the_target_rho_and_does_not_overshoot(name: str, target: float) -> None:
    mech = _make(name)
    z = calibrate(mech, target, num_rounds=T)
    assert mech.noise_multiplier == 1.3  # calibration does not change the mechanism
    at_z = _make(name, z=z)
    assert _planned_report(at_z, T).rho <= target
    assert _planned_report(_make(name, z=z * (1 - 2e-6)), T).rho > target


def _strategy_for(name: str) -> str:
    return "dp-ftrl" if mechanism_class(name).correlated else "dp-fedavg"


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("noise", [{"noise-multiplier": 2.5}, {"target-rho": 1.5}])
def test_planned_rho_is_the_rho_of_a_real_run(name: str, noise: dict, tmp_path: Path) -> None:
    strategy = {"name": _strategy_for(name), "mechanism": name, "max-participations": K,
                "min-separation": B, "clip-norm": 0.5, **noise}
    result = run_scenario(scenario_from_dict(tiny_scenario(rounds=T, strategy=strategy)), run_dir=tmp_path / "run")
    mech = _make(name, z=noise.get("noise-multiplier", 1.0))
    if "target-rho" in noise:
        mech.noise_multiplier = calibrate(mech, noise["target-rho"], num_rounds=T)
    plan = _planned_report(mech, T)
    assert result.summary["rho"] == plan.rho and result.summary["epsilon"] == plan.epsilon
    ledger = json.loads((tmp_path / "run" / "ledger.json").read_text())
    assert [event_from_dict(e["event"]) for e in ledger] == mech.plan_events(T)


# -- the new mechanism, planned by `fedsim privacy` and run by a scenario --------------------------
def _plan(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["privacy", *argv])
        except SystemExit as exc:
            code = int(exc.code or 0)
    return code, out.getvalue(), err.getvalue()


FEDAVG = ["dp-fedavg", "--rounds", str(T), "--max-participations", str(K), "--min-separation",
          str(B), "--delta", "1e-6"]


def test_a_new_mechanism_is_planned_by_fedsim_privacy_and_run_end_to_end(tmp_path: Path) -> None:
    with registered():
        code, out, err = _plan([*FEDAVG, "--mechanism", "scaled-gaussian", "--scale", "3",
                                "--noise-multiplier", "2.5", "--json"])
        assert code == 0, err
        plan = json.loads(out)
        assert plan["noise_mechanism"] == "scaled-gaussian" and plan["scale"] == 3.0
        assert plan["rho"] == max_gaussian_participations(T, K, B) / (2 * (3 * 2.5) ** 2)
        code, table, _ = _plan([*FEDAVG, "--mechanism", "scaled-gaussian", "--scale", "3",
                                "--noise-multiplier", "2.5"])
        assert code == 0 and "dp-fedavg (Gaussian, std 3 z C)" in table
        # its option is a flag of its own: another mechanism refuses it
        code, _, err = _plan([*FEDAVG, "--scale", "3", "--noise-multiplier", "2.5"])
        assert code == 2 and err.strip() == "error: --scale needs --mechanism scaled-gaussian"
        code, _, err = _plan([*FEDAVG, "--mechanism", "scaled-gaussian", "--scale", "-1",
                              "--noise-multiplier", "2.5"])
        assert code == 2 and err.strip() == "error: --scale must be > 0, got -1.0"
        # the same mechanism and option in a scenario: the run ends at the planned privacy
        strategy = {"name": "dp-fedavg", "mechanism": "scaled-gaussian", "scale": 3.0,
                    "noise-multiplier": 2.5, "max-participations": K, "min-separation": B}
        run = run_scenario(scenario_from_dict(tiny_scenario(rounds=T, strategy=strategy)),
                           run_dir=tmp_path / "named")
        assert run.summary["rho"] == plan["rho"] and run.summary["epsilon"] == plan["epsilon"]
        ledger = json.loads((tmp_path / "named" / "ledger.json").read_text())
        assert {e["event"]["type"] for e in ledger} == {"test_scaled_gaussian"}
        # calibration: the same z from the command line and from the scenario
        code, out, err = _plan([*FEDAVG, "--mechanism", "scaled-gaussian", "--scale", "3",
                                "--target-rho", "0.05", "--json"])
        assert code == 0, err
        target_plan = json.loads(out)
    assert "scaled-gaussian" not in MECHANISMS.names()
    # by import path, unregistered: the scenario loader takes its option, the run its target
    strategy = {"name": "dp-ftrl", "mechanism": TOY_PATH, "scale": 3.0, "target-rho": 0.05,
                "max-participations": K, "min-separation": B}
    run = run_scenario(scenario_from_dict(tiny_scenario(rounds=T, strategy=strategy)),
                       run_dir=tmp_path / "by-path")
    assert run.summary["rho"] == target_plan["rho"] <= 0.05
    ledger = json.loads((tmp_path / "by-path" / "ledger.json").read_text())
    assert {e["event"]["noise_multiplier"] for e in ledger} == {target_plan["noise_multiplier"]}


def test_a_new_mechanisms_options_are_checked_like_the_built_ins() -> None:
    base = {"name": "dp-fedavg", "mechanism": TOY_PATH}
    with pytest.raises(ScenarioError, match=r"^strategy\.scale: must be a number, got 'big'$"):
        scenario_from_dict(tiny_scenario(strategy={**base, "scale": "big"}))
    with pytest.raises(ScenarioError, match=r"^strategy: scale must be > 0, got -2\.0$"):
        scenario_from_dict(tiny_scenario(strategy={**base, "scale": -2.0}))
    with pytest.raises(ScenarioError, match=r"^strategy\.scal: unknown key 'scal' \(did you mean 'scale'\?\)"):
        scenario_from_dict(tiny_scenario(strategy={**base, "scal": 2.0}))
    with pytest.raises(ScenarioError, match=r"^strategy\.scale: unknown key 'scale'"):
        scenario_from_dict(tiny_scenario(strategy={"name": "dp-fedavg", "scale": 2.0}))
    with registered():  # registered: another mechanism's option, accepted only at its default
        scenario_from_dict(tiny_scenario(strategy={"name": "dp-fedavg", "scale": 2.0}))
        with pytest.raises(ScenarioError, match=r"^strategy: scale does not apply to mechanism = 'gaussian'$"):
            scenario_from_dict(tiny_scenario(strategy={"name": "dp-fedavg", "scale": 3.0}))
    with pytest.raises(ScenarioError, match="sampling = \"poisson\" needs a mechanism that accounts for sampling"):
        scenario_from_dict(tiny_scenario(strategy={**base, "sampling": "poisson"}))
    with pytest.raises(ScenarioError, match="mechanism = 'tree' does not fit dp-fedavg; it takes: 'gaussian'"):
        scenario_from_dict(tiny_scenario(strategy={"name": "dp-fedavg", "mechanism": "tree"}))
