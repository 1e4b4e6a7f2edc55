"""fedsim's Flower ClientApp: one SuperNode is one device.

The node's identity comes from its ``--node-config``:

==========================  ===================================================================
key                         meaning
==========================  ===================================================================
``partition-id``            the fedsim device id (required; Flower's simulation engine sets it)
``state-dir``               where the device keeps its participation ledger (default
                            ``$FEDSIM_STATE_DIR``, else ``$FLWR_HOME/fedsim``)
``max-participations``,     optional device-side tightening of the server's limit (the device
``min-separation``          enforces the stricter of its own and the server's)
``fault``                   fault injection for testing a server: comma-separated list of
                            ``nan``, ``wrong-shape``, ``exceed-clip``, ``error``, ``none``,
                            applied by round (round ``r`` uses entry ``r mod len``): the first
                            three corrupt the reply, ``error`` makes the ClientApp fail before it
                            records or trains anything (Flower replies with an error)
==========================  ===================================================================

On a ``train`` message the device checks its own participation ledger (on disk, so a restarted
SuperNode still honours it), records the contribution, loads its local partition with the same
``build_data(scenario)`` as the simulator, trains with the same trainer and task seed, clips the
delta to the round's bound and replies with the delta and its example count. On a ``query``
message (the server's check-in) it replies with its device id.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import torch
from flwr.app import Array, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.builders import build_data, build_scenario_model, build_trainer, client_task
from fedsim.client import ClientTrainer
from fedsim.data.federated import FederatedData
from fedsim.flower.device import DeviceLedger, default_state_dir
from fedsim.flower.protocol import TrainInstruction, scenario_from_sections
from fedsim.flower.records import ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, ParamLayout, dumps
from fedsim.flower.secagg import (
    clip_to,
    is_secure,
    secure_aggregation_mod,
    secure_clip_bound,
    secure_instruction,
    secure_reply,
    split_like,
)
from fedsim.privacy.clipping import below_clip
from fedsim.scenario import Scenario
from fedsim.strategy import ParticipationLimit
from fedsim.validation import is_int

FAULTS = ("none", "nan", "wrong-shape", "exceed-clip", "error")

logger = logging.getLogger("flwr.fedsim.client")

app = ClientApp()


def device_id_of(context: Context) -> int:
    """The node's device id: its ``partition-id`` node-config value."""
    value = context.node_config.get("partition-id")
    if not is_int(value) or value < 0:
        raise ValueError(f"node-config partition-id must be a non-negative integer, got {value!r}")
    return int(value)


def _node_int(context: Context, key: str) -> int | None:
    value = context.node_config.get(key)
    if value is None:
        return None
    if not is_int(value) or value < 0:
        raise ValueError(f"node-config {key} must be a non-negative integer, got {value!r}")
    return int(value)


def device_limit(server: ParticipationLimit | None, context: Context) -> ParticipationLimit | None:
    """The stricter of the server's limit and the node's own ``max-participations`` / ``min-separation``."""
    k_node, b_node = _node_int(context, "max-participations"), _node_int(context, "min-separation")
    if server is None and k_node is None and b_node is None:
        return None
    k_server = server.max_participations if server else None
    ks = [k for k in (k_server, k_node or None) if k is not None]
    b = max(server.min_separation if server else 0, b_node or 0)
    return ParticipationLimit(min(ks) if ks else None, b)


def faults_of(context: Context) -> tuple[str, ...]:
    """The node's configured faults (``("none",)`` when unset)."""
    raw = context.node_config.get("fault", "none")
    items = tuple(s.strip() for s in str(raw).split(",") if s.strip()) or ("none",)
    unknown = [f for f in items if f not in FAULTS]
    if unknown:
        raise ValueError(f"node-config fault: unknown {unknown}; allowed: {', '.join(FAULTS)}")
    return items


@functools.lru_cache(maxsize=4)
def _setup(sections_json: str) -> tuple[Scenario, FederatedData, ClientTrainer, ParamLayout]:
    """Scenario, local data source, trainer and parameter layout (cached per process)."""
    import json

    scenario = scenario_from_sections(json.loads(sections_json))
    data = build_data(scenario)
    model = build_scenario_model(scenario, data)
    return scenario, data, build_trainer(scenario, model, data), ParamLayout.of(model)


def _corrupt(delta: torch.Tensor, fault: str, clip: float | None) -> torch.Tensor:
    if fault == "nan":
        out = delta.clone()
        out[0] = float("nan")
        return out
    if fault == "exceed-clip":
        bound = clip if clip is not None else float(torch.linalg.vector_norm(delta)) or 1.0
        norm = float(torch.linalg.vector_norm(delta)) or 1.0
        return delta * (2.0 * bound / norm)
    return delta


@app.query()
def check_in(msg: Message, context: Context) -> Message:
    """Reply with this node's device id (the server's check-in)."""
    device = device_id_of(context)
    return Message(RecordDict({METRICS_KEY: MetricRecord({"device-id": device})}), reply_to=msg)


@app.train(mods=[secure_aggregation_mod])
def train(msg: Message, context: Context) -> Message:
    """Train this device's local data from the received global model; reply with the delta.

    Under secure aggregation (``[flower] secure-aggregation``) the message is SecAgg+'s
    masked-vector stage, reached through :func:`~fedsim.flower.secagg.secure_aggregation_mod`:
    the device clips to the bound that leaves room for the quantisation
    (:func:`~fedsim.flower.secagg.secure_clip_bound`) and replies in the layout Flower's
    ``secaggplus_mod`` quantises and masks; its clear metrics are its id, the round and whether it
    declined.
    """
    device = device_id_of(context)
    secure = is_secure(msg)
    config, global_arrays = secure_instruction(msg) if secure else (msg.content[CONFIG_KEY], None)
    instruction = TrainInstruction.from_config(config)
    if instruction.device_id != device:
        raise ValueError(f"train message for device {instruction.device_id} reached device {device}")
    faults = faults_of(context)
    state_dir = context.node_config.get("state-dir") or default_state_dir()
    ledger = DeviceLedger(str(state_dir), device, instruction.job_id)
    round_ = instruction.train.round
    fault = faults[round_ % len(faults)]
    if fault == "error":
        raise RuntimeError(f"fault injection: device {device} fails in round {round_ + 1}")
    if not ledger.claim(round_, device_limit(instruction.limit, context)):
        logger.info("device %d declines round %d: participation limit (%s)", device, round_ + 1, ledger.path)
        if secure:  # it takes part in the protocol with weight 0
            return secure_reply(msg, device=device, round_=round_, arrays=None)
        metrics = MetricRecord({"device-id": device, "declined": 1})
        return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)

    scenario, data, trainer, layout = _setup(dumps(instruction.scenario))
    torch.set_num_threads(scenario.engine.threads)
    if global_arrays is not None:
        if [tuple(a.shape) for a in global_arrays] != list(layout.shapes):
            raise ValueError(f"the global model's arrays {[a.shape for a in global_arrays]} do not match the model's {layout.shapes}")
        params = torch.from_numpy(np.concatenate([np.asarray(a, dtype=np.float32).reshape(-1) for a in global_arrays]))
    else:
        params = layout.to_flat(msg.content[ARRAYS_KEY])
    result = trainer.train_client(params, client_task(data, device, instruction.task_seed), instruction.train)
    if secure:
        delta = _corrupt(result.delta, fault, instruction.train.clip_norm)
        bound = secure_clip_bound(instruction.train.clip_norm, context, layout.num_params)
        flat = clip_to(delta, bound) if bound is not None else delta.detach().to(torch.float64).cpu().numpy()
        return secure_reply(msg, device=device, round_=round_, arrays=split_like(flat, list(layout.shapes)))
    arrays = layout.to_arrays(_corrupt(result.delta, fault, instruction.train.clip_norm))
    if fault == "wrong-shape":  # the first parameter gains a column the server cannot map
        name, shape = layout.names[0], layout.shapes[0]
        arrays[name] = Array(np.zeros((*shape[:-1], shape[-1] + 1), dtype=np.float32))
    metrics: dict[str, Any] = {
        "device-id": device,
        "round": round_,
        "num-examples": result.num_examples,
        "loss": result.loss,
    }
    clip = instruction.train.clip_norm
    if clip is not None:
        # adaptive clipping's bit: the delta's norm before clipping was at most the round's clip
        # norm (a trainer that does not say is read off its clipped delta, as the server would)
        bit = result.below_clip
        if bit is None:
            bit = bool(below_clip(torch.linalg.vector_norm(result.delta, dtype=torch.float64).reshape(1), clip)[0])
        metrics["below-clip"] = int(bit)
    return Message(RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: MetricRecord(metrics)}), reply_to=msg)
