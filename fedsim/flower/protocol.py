"""The messages fedsim's ServerApp and ClientApp exchange (Flower Message API).

========================  ======================================================================
message                   content
========================  ======================================================================
``query`` (check-in)      server -> node: empty. Reply: ``metrics`` ``{"device-id": d}``, the
                          node's ``partition-id`` from its ``--node-config``.
``train``                 server -> node: ``arrays`` (global model, one array per parameter) and
                          ``config`` (:class:`TrainInstruction`). Reply: ``arrays`` (the clipped
                          delta, same layout) and ``metrics`` ``{"device-id", "round",
                          "num-examples", "loss"}``; or only ``metrics``
                          ``{"device-id", "declined": 1}`` when the device's own
                          participation ledger forbids the round.
========================  ======================================================================

The instruction carries everything a device needs to train exactly as the simulator would: the
round, the round's :class:`~fedsim.types.TrainConfig` (learning rate, epochs, batch size, clip
bound), the per-(seed, round, device) task seed, the participation limit ``(k, b)``, the job id its
participation ledger is kept under, and the scenario sections that define its local data, model
and trainer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord

from fedsim.flower.records import config_get, dumps
from fedsim.scenario import Scenario, scenario_from_dict
from fedsim.strategy import ParticipationLimit
from fedsim.types import TrainConfig

#: Scenario sections a device needs (its data partition, the model, the trainer, threads).
CLIENT_SECTIONS = ("data", "model", "client", "engine")


def client_scenario_sections(scenario: Scenario) -> dict[str, Any]:
    """The parts of a scenario a device needs, as a TOML-ready dict."""
    full = scenario.to_dict()
    out: dict[str, Any] = {"name": full["name"], "seed": full["seed"]}
    for key in CLIENT_SECTIONS:
        out[key] = full[key]
    # a warm start's file is the server's: a device trains from the parameters it is sent
    out["model"] = {k: v for k, v in out["model"].items() if k not in ("init", "init-sha256")}
    return out


def scenario_from_sections(sections: dict[str, Any]) -> Scenario:
    """Rebuild (and validate) a scenario from :func:`client_scenario_sections`."""
    raw = {k: v for k, v in sections.items() if k in ("name", "seed", *CLIENT_SECTIONS)}
    raw["clients-per-round"] = 1
    return scenario_from_dict(raw, source="<train message>")


@dataclass(frozen=True)
class TrainInstruction:
    """What the server tells one device in one round (sent as the ``config`` ConfigRecord)."""

    device_id: int
    task_seed: int
    train: TrainConfig
    limit: ParticipationLimit | None
    job_id: str
    scenario: dict[str, Any]

    def to_config(self) -> ConfigRecord:
        """Encode as a ConfigRecord (``clip_norm`` only when set; ``max-participations`` 0 = none)."""
        limit = self.limit or ParticipationLimit()
        values: dict[str, Any] = dict(self.train.to_dict())
        values.update(
            {
                "device-id": self.device_id,
                "task-seed": self.task_seed,
                "max-participations": limit.max_participations or 0,
                "min-separation": limit.min_separation,
                "job-id": self.job_id,
                "scenario": dumps(self.scenario),
            }
        )
        return ConfigRecord(values)

    @classmethod
    def from_config(cls, config: ConfigRecord) -> TrainInstruction:
        """Decode :meth:`to_config`; a malformed record raises ``ValueError``."""
        train = TrainConfig.from_dict(config)
        k = config_get(config, "max-participations", int)
        b = config_get(config, "min-separation", int)
        limit = ParticipationLimit(k or None, b) if (k or b) else None
        scenario = json.loads(config_get(config, "scenario", str))
        if not isinstance(scenario, dict):
            raise ValueError("config 'scenario' must be a JSON object")
        return cls(
            device_id=config_get(config, "device-id", int),
            task_seed=config_get(config, "task-seed", int),
            train=train,
            limit=limit,
            job_id=config_get(config, "job-id", str),
            scenario=scenario,
        )
